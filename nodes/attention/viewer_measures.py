"""CrossAttentionMapViewer's numbers: token-class shares of the attention, and shape convergence (Fig. 1b): the
F1 score between the Canny edges of a token's map per step bucket and those of the final image."""

from __future__ import annotations

import math

import kornia
import numpy as np
import torch
import torch.nn.functional as F

from .capture import OTHER_LABEL
from .viewer_tokens import CLASSES, TokenInfo

CANNY_LOW, CANNY_HIGH = 0.4, 0.8  # ComfyUI Canny node defaults, on min-max stretched maps and image grey levels
EDGE_SIZE = 128  # long side of the images the Canny edges are taken on


def class_of_channels(table: list[TokenInfo], extra: bool) -> list[str]:
    return [t.klass for t in table] + ([OTHER_LABEL] if extra else [])


def class_shares(shares: torch.Tensor, classes: list[str]) -> dict[str, torch.Tensor]:
    """(..., channels) spatial-mean weights -> {class: (...)} summed per class."""
    out = {}
    for name in list(CLASSES) + [OTHER_LABEL]:
        idx = [i for i, c in enumerate(classes) if c == name]
        if idx:
            out[name] = shares[..., idx].sum(-1)
    return out


def normalise(maps: torch.Tensor, dims=(-2, -1)) -> torch.Tensor:
    """Min-max to [0, 1] over ``dims`` (flat maps -> 0)."""
    lo = maps.amin(dim=dims, keepdim=True)
    hi = maps.amax(dim=dims, keepdim=True)
    return torch.where(hi > lo, (maps - lo) / (hi - lo).clamp(min=1e-12), torch.zeros_like(maps))


def edge_size(h: int, w: int, long_side: int = EDGE_SIZE) -> tuple[int, int]:
    s = min(1.0, long_side / max(h, w))
    return max(8, round(h * s)), max(8, round(w * s))


def hysteresis(weak_or_strong: torch.Tensor, strong: torch.Tensor) -> torch.Tensor:
    """Canny hysteresis: keep the 8-connected components of ``weak_or_strong`` (N, 1, H, W) that contain a pixel of
    ``strong``. The same result as kornia's iterated 3x3 growth (``hysteresis=True``), in one labelling pass."""
    import scipy.ndimage

    out = torch.zeros_like(weak_or_strong, dtype=torch.float32)
    structure = np.ones((3, 3), dtype=bool)
    for i in range(weak_or_strong.shape[0]):
        cand = weak_or_strong[i, 0].cpu().numpy().astype(bool)
        labels, n = scipy.ndimage.label(cand, structure=structure)
        if n == 0:
            continue
        keep = np.zeros(n + 1, dtype=bool)
        keep[np.unique(labels[strong[i, 0].cpu().numpy().astype(bool)])] = True
        keep[0] = False
        out[i, 0] = torch.from_numpy(keep[labels].astype(np.float32))
    return out


def canny_edges(images: torch.Tensor, relative: bool = False) -> torch.Tensor:
    """Canny edges (kornia.filters.canny with the thresholds of ComfyUI's Canny node) of (N, C, H, W) images in
    [0, 1] -> (N, 1, H, W) in {0, 1}. kornia gives the weak (0.5) and strong (1) edges after non-maximum
    suppression; :func:`hysteresis` links them (kornia's own iterated hysteresis is slow on CPU).
    ``relative``: the thresholds are fractions of each image's strongest gradient instead (attention maps: smooth
    fields upsampled from a coarse grid, whose gradients shrink with the upsampling factor)."""
    if not relative:
        _mag, edges = kornia.filters.canny(images.float(), low_threshold=CANNY_LOW, high_threshold=CANNY_HIGH,
                                           hysteresis=False)
        return hysteresis(edges > 0.25, edges > 0.75)
    # the gradient magnitude is linear in the image: scaling each image by 1 / its strongest gradient puts the
    # relative thresholds on the absolute scale, so one batched pass finds every image's edges
    mag, _ = kornia.filters.canny(images.float(), low_threshold=1e-12, high_threshold=2e-12, hysteresis=False)
    top = mag.amax(dim=(1, 2, 3), keepdim=True)
    return canny_edges(images.float() / top.clamp(min=1e-6)) * (top > 1e-6)


def edge_f1(pred: torch.Tensor, ref: torch.Tensor, tolerance: int = 2) -> torch.Tensor:
    """F1 of edge maps (N, 1, H, W) against ``ref`` (1 or N, 1, H, W): an edge pixel counts as matched when
    the other map has an edge within ``tolerance`` pixels (Chebyshev distance). No edges at all -> 0."""
    k = 2 * int(tolerance) + 1

    def dilate(x):
        return F.max_pool2d(x, k, stride=1, padding=int(tolerance)) if tolerance > 0 else x

    ref = ref.expand_as(pred)
    tp_p = (pred * dilate(ref)).sum((1, 2, 3))
    tp_r = (ref * dilate(pred)).sum((1, 2, 3))
    n_p, n_r = pred.sum((1, 2, 3)), ref.sum((1, 2, 3))
    precision = torch.where(n_p > 0, tp_p / n_p.clamp(min=1), torch.zeros_like(n_p))
    recall = torch.where(n_r > 0, tp_r / n_r.clamp(min=1), torch.zeros_like(n_r))
    denom = precision + recall
    return torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(denom))


def shape_convergence(bucket_maps: list[torch.Tensor | None], image: torch.Tensor, tolerance: int = 2) -> torch.Tensor:
    """F1 (items, buckets) between the Canny edges of each item's map per bucket (None = empty bucket -> NaN)
    and those of ``image`` (H, W, 3), both at the edge size of the image. Maps and the image's grey levels are
    stretched to 0..1 first, so the thresholds do not depend on their contrast."""
    h, w = edge_size(int(image.shape[0]), int(image.shape[1]))
    img = F.interpolate(image.movedim(-1, 0)[None].float(), size=(h, w), mode="bilinear", align_corners=False)
    ref = canny_edges(normalise(kornia.color.rgb_to_grayscale(img.clamp(0, 1))))  # contrast-stretched grey
    n_items = next(m.shape[0] for m in bucket_maps if m is not None)
    out = torch.full((n_items, len(bucket_maps)), float("nan"))
    for j, m in enumerate(bucket_maps):
        if m is None:
            continue
        up = F.interpolate(m[:, None].float(), size=(h, w), mode="bilinear", align_corners=False)
        out[:, j] = edge_f1(canny_edges(normalise(up), relative=True), ref, tolerance)
    return out


def relative_to_last(f1: torch.Tensor) -> torch.Tensor:
    """F1_t / F1_last per row, the last non-NaN column being "last"; NaN where F1_last is 0."""
    out = torch.full_like(f1, float("nan"))
    for r in range(f1.shape[0]):
        valid = [j for j in range(f1.shape[1]) if not math.isnan(float(f1[r, j]))]
        if not valid:
            continue
        last = float(f1[r, valid[-1]])
        if last > 0:
            out[r] = f1[r] / last
    return out
