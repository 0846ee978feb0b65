"""CrossAttentionMapViewer's plots (token-class share per step, shape convergence) and the notes that say which
steps the maps cover and why a convergence curve is missing."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from PIL import Image

from ..shared.drawing import line_plot
from .capture import OTHER_LABEL

CLASS_COLORS = {"template": (188, 189, 34), "[SOS]": (120, 120, 120), "semantic": (31, 119, 180), "[EOS]": (214, 39, 40),
                "padding": (255, 127, 14), OTHER_LABEL: (44, 160, 44)}
SERIES_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75),
                 (227, 119, 194), (23, 190, 207)]


def _steps_label(bucket: tuple[int, int], sep: str = " ") -> str:
    a, b = bucket
    return f"step{sep}{a}" if a == b else f"steps{sep}{a}-{b}"


def _short(label: str, n: int = 18) -> str:
    return label if len(label) <= n else label[:n - 1] + "…"


def class_plot(steps: list[int], shares: dict[str, list[float]], n_steps: int, message: str = "") -> Image.Image:
    series = [(name, steps, ys, CLASS_COLORS[name], False) for name, ys in shares.items()]
    return line_plot(series, title="token-class share of the attention per step (Fig. 3)",
                     xlabel=f"sampler step (0 = first of {n_steps})", ylabel="share", message=message)


def step_coverage(per_step: dict[str, list[float]], n_steps: int, rows: str, skipped: dict) -> str:
    """What steps the maps cover and, when they stop early or start late, why (empty when they cover all)."""
    seen = [i for i in range(n_steps) if any(math.isfinite(v[i]) for v in per_step.values())]
    if not seen:
        return f"no step reached the chosen layers with {rows} rows"
    if seen[0] == 0 and seen[-1] == n_steps - 1 and len(seen) == n_steps:
        return ""
    why = "; ".join(f"{count}x {reason}" for reason, count in skipped.items()) or (
        f"the sampler ran no {rows} rows there (e.g. a guidance cutoff with keep=negative drops the positive rows)")
    return (f"maps cover {len(seen)} of {n_steps} steps ({seen[0]}-{seen[-1]}): no {rows} rows reached the chosen "
            f"layers in the others ({why})")


def convergence_plot(xs: list[float], rel: torch.Tensor, labels: list[str], message: str = "") -> Image.Image:
    series = []
    with warnings.catch_warnings():  # all-NaN columns (a bucket with no edges anywhere) stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(rel.numpy(), axis=0) if rel.numel() else np.array([])
    if rel.shape[0] > 1:
        for r in range(min(rel.shape[0], len(SERIES_COLORS))):
            series.append((_short(labels[r], 14), xs, [float(v) for v in rel[r]], SERIES_COLORS[r], True))
    series.insert(0, ("mean", xs, [float(v) for v in mean], (0, 0, 0), False))
    return line_plot(series, title="shape convergence F1_t / F1_last (Canny edges: map vs final image, Fig. 1b)",
                     xlabel="sampler step (end of the bucket)", ylabel="F1_t / F1_last",
                     hlines=[(1.0, "", (160, 160, 160))], message=message)


def convergence_notes(f1: torch.Tensor, rel: torch.Tensor, labels: list[str], filled: bool) -> list[str]:
    """Why a token has no shape-convergence curve (F1_t / F1_last undefined), one note per cause."""
    if not filled:
        return ["shape convergence not computed: no step bucket holds maps"]
    if f1.numel() and not torch.isfinite(rel).any() and float(f1.nan_to_num(0).amax()) == 0.0:
        return ["shape convergence not computed: no map edge lies near an edge of the image in any bucket (F1 = 0 "
                "everywhere; a flat image or uniform maps have no Canny edges)"]
    flat = [lab for lab, r in zip(labels, rel, strict=True) if not torch.isfinite(r).any()]
    return [f"no shape-convergence curve for {', '.join(flat)}: F1 of the last bucket is 0 (no map edge near an "
            f"image edge at the end), so F1_t / F1_last is undefined"] if flat else []
