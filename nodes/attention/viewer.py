"""CrossAttentionMapViewer (paper 1, Fig. 1, 3 and 12): what CrossAttentionCapture recorded, per token and
through time.

**Token labels.** Every context position of the recorded prompt is labelled by the tokenizer of the CLIP
(``clip.tokenize``, so prompt weights, embeddings and multi-chunk prompts are what the encoder saw), or, with
no CLIP connected, by the stock tokenizer of the recorded model family. Per chunk the positions are classed
as in :mod:`eos_swap`: [SOS] (CLIP only), semantic, the first [EOS], padding (CLIP-L pads with [EOS] ids,
CLIP-G / OpenCLIP-H / T5 with their pad id; T5 has no [SOS]). SD3 / Flux records add one class,
"[image]": the weight of the image queries on the image keys of the joint attention.

**Outputs.**

* ``heatmaps``: the whole-run mean map of each chosen token (row 1) and its overlay on the image (row 2),
  labelled with the token and its mean share of the attention.
* ``overlays``: the overlays alone at image size (one image per token).
* ``class_shares``: the share of [SOS] / semantic / [EOS] / padding (/ [image]) per step (Fig. 3).
* ``time_slices``: each token's map in every step bucket, early to late (columns), on one colour scale
  per token; ``animation``: the same as one frame per bucket (an IMAGE batch).
* ``convergence``: F1_t / F1_last (Fig. 1b): the F1 score between the Canny edges (kornia; the image with
  ComfyUI's Canny thresholds, maps with the same fractions of their own strongest gradient) of a token's map in
  bucket t and those of the final image, relative to the last bucket; edges count as matched within
  ``edge_tolerance`` pixels. The plots say which steps the maps cover and why a curve is missing.
* ``video_frames`` (the last output, added for video records): one image per latent frame, each chosen
  token's whole-run map on that frame over the decoded frame (one colour scale per token across the frames);
  for image records the heat-map grid once.
* ``summary``: JSON with every number (token table, per-token mean weight, class shares per step and per
  bucket, F1 values, layers seen / recomputed / missing).

**Video records (Wan).** The capture keeps the maps per latent frame. ``heatmaps``, ``overlays``, ``animation``
and ``convergence`` show the mean over the frames, overlaid on the decoded frame of the middle latent frame;
``time_slices`` is a grid of (token, latent frame) rows x step buckets; ``video_frames`` animates a token's map
over the video. Latent frame f of T is shown on decoded frame round(f · (N − 1) / (T − 1)) of the N frames of
the connected IMAGE batch (per batch item), or on the latent preview of that frame.

The node shows the heat maps, the plots and a short summary; its JS lists the prompt's tokens as chips
that edit the ``tokens`` input (so the choice is saved with the workflow).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings

import kornia
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..core import families
from ..core.errors import InternalError
from ..shared import drawing
from ..shared.drawing import (
    caption,
    cell_size,
    colormap,
    labelled_grid,
    latent_to_rgb,
    line_plot,
    overlay,
    pil_to_image,
    upsample,
)
from ..shared.tokens import (
    EncoderPart,
    Layout,
    context_length,
    detect_layout,
    stock_layout,
    stock_tokenizer,
    token_positions,
    token_text,
)
from .capture import OTHER_LABEL, AttentionRun, MapSums, context_print

NODE_ID = "CrossAttentionMapViewer"
CLASSES = ("template", "[SOS]", "semantic", "[EOS]", "padding")  # template: an LLM encoder's chat-template head
CLASS_COLORS = {"template": (188, 189, 34), "[SOS]": (120, 120, 120), "semantic": (31, 119, 180), "[EOS]": (214, 39, 40),
                "padding": (255, 127, 14), OTHER_LABEL: (44, 160, 44)}
SERIES_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75),
                 (227, 119, 194), (23, 190, 207)]
SCALES = ("per_map", "shared")
MAX_AUTO_ITEMS = 24
MAX_ITEMS = 64
CANNY_LOW, CANNY_HIGH = 0.4, 0.8  # ComfyUI Canny node defaults, on min-max stretched maps and image grey levels
EDGE_SIZE = 128  # long side of the images the Canny edges are taken on


# ----------------------------------------------------------------------------------------------
# token labels
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TokenInfo:
    pos: int  # position in the recorded context
    text: str  # shown label
    klass: str  # template, [SOS], semantic, [EOS], padding
    chunk: int
    weight: float  # prompt weight the tokenizer gave it
    encoder: str  # CLIP-L, CLIP-G, OpenCLIP-H, T5-XXL


def _display(part: EncoderPart, token, klass: str) -> str:
    if part.kind == families.LLM and isinstance(token, numbers.Integral):  # chat-template tokens read as themselves
        text = token_text(part, token).strip()
        return text or "·"
    if klass != "semantic":
        return {"[SOS]": "[SOS]", "[EOS]": "[EOS]"}.get(klass, "[pad]")
    if not isinstance(token, numbers.Integral):
        return "<emb>"
    text = token_text(part, token)
    text = text.replace("</w>", "").replace("\u2581", " ").strip()
    return text or "·"


def token_table(layout: Layout, tokens: dict) -> list[TokenInfo]:
    """One TokenInfo per context position of a conditioning made from ``tokens`` by ``layout``'s encoders.
    CLIP-L and CLIP-G share positions (SDXL, SD3); the first in-context encoder labels them."""
    positions = token_positions(layout, tokens)
    length = context_length(layout, positions)
    table: list[TokenInfo | None] = [None] * length
    for part in layout.context_parts:
        for chunk in positions[part.key]:
            for i in range(chunk.start, min(chunk.end, length)):
                if table[i] is None:
                    entry = chunk.tokens[i - chunk.start]
                    klass = chunk.klass(i)
                    table[i] = TokenInfo(i, _display(part, entry[0], klass), klass, chunk.index, float(entry[1]),
                                         part.label)
    if any(t is None for t in table):
        raise InternalError("context positions without a token")
    return table  # type: ignore[return-value]


def positions_only(family: families.Family, length: int) -> list[TokenInfo]:
    """A table that names positions only, for encoders whose token rules the registry does not hold yet."""
    label = "+".join(e.label for e in family.context_encoders)
    return [TokenInfo(i, f"#{i}", "semantic", 0, 1.0, label) for i in range(length)]


def prompt_tokens(run: AttentionRun, text: str, clip=None) -> list[TokenInfo]:
    """The token table of ``text`` for the recorded run, checked against the recorded context lengths."""
    family = families.by_name(run.family)
    lengths = sorted(run.sums)
    if clip is None and not family.stock_tokens:  # the tokenizer ships inside the checkpoint: positions only
        if len(lengths) != 1:
            raise ValueError(f"the record holds maps for prompts of {lengths} tokens and {family.label}'s tokenizer "
                             f"ships inside its text encoder checkpoint: connect the CLIP that encoded the prompt "
                             f"(clip input) to label the tokens, or record one prompt length at a time.")
        return positions_only(family, lengths[0])
    if any(e.kind == families.LLM and e.no_eos for e in family.context_encoders):  # no token rules (Gemma-2)
        if len(lengths) != 1:
            raise ValueError(f"the record holds maps for prompts of {lengths} tokens and {family.label}'s token labels "
                             f"are positions only: record one prompt length at a time.")
        return positions_only(family, lengths[0])
    if clip is not None:
        layout = detect_layout(clip, "CrossAttentionMapViewer")
        if layout.family.encoders != family.encoders:
            raise ValueError(f"clip is the {layout.label} text encoder but the record comes from a "
                             f"{family.label} model: connect the CLIP of the sampled model.")
        candidates = [(layout, clip.tokenize(text))]
    else:
        tokens = stock_tokenizer(family).tokenize_with_weights(text)
        candidates = [(stock_layout(family), tokens)]
        first = tuple(e.key for e in family.encoders if e.group == 0)
        if len(first) < len(family.encoders):  # e.g. SD3 without T5: only the first encoders in the context
            candidates.append((stock_layout(family, first), tokens))
    tables = [token_table(layout, toks) for layout, toks in candidates]
    for table in tables:
        if len(table) in run.sums:
            return table
    got = ", ".join(str(len(t)) for t in tables)
    raise ValueError(
        f"text tokenizes to {got} context positions, but the record holds maps for prompts of {lengths} tokens: "
        f"give the text of the conditioning that was recorded (the {run.rows} prompt), and the CLIP that encoded it.")


LABEL_RTOL = 1e-3  # re-encoding on the same device gives the same values; this absorbs dtype round trips


def _mismatch(mine: torch.Tensor, recorded: torch.Tensor, keep: list[int]) -> int | None:
    """The first of the ``keep`` positions where the two fingerprints differ (None: they agree)."""
    if mine.shape != recorded.shape:
        return keep[0] if keep else 0
    tol = LABEL_RTOL * (1.0 + float(recorded[keep].abs().max())) if keep else 0.0
    bad = [i for i in keep if float((mine[i] - recorded[i]).abs().max()) > tol]
    return bad[0] if bad else None


def check_labels(run: AttentionRun, table: list[TokenInfo], text: str, clip=None) -> str:
    """Check that ``text`` is the prompt the capture saw: re-encode it with ``clip`` and compare its [SOS] and
    semantic positions (the ones every [EOS]/padding construction keeps) with the recorded fingerprints. Returns
    a note for the summary ('' when checked); raises ValueError on a different prompt."""
    prints = run.contexts.get(len(table)) or []
    if not prints or table[0].text == "#0":
        return ""
    if clip is None:
        return ("labels checked by token count only: connect the CLIP that encoded the prompt to check them "
                "token by token")
    if all(not bool(p.any()) for p in prints):
        return "the recorded conditioning is all zeros (ConditioningZeroOut): labels checked by token count only"
    mine = context_print(clip.encode_from_tokens(clip.tokenize(text)))
    keep = [t.pos for t in table if t.klass in ("[SOS]", "template", "semantic")]
    firsts = [_mismatch(mine, p, keep) for p in prints]
    if any(f is None for f in firsts):
        return ""
    k = max(firsts)
    causal = all(e.kind in ("clip", families.LLM) for e in families.by_name(run.family).context_encoders)
    where = (f"they differ from position {k} ({table[k].text!r} in this text) on" if causal else
             "they differ (this text encoder reads the whole prompt at every position, so the first differing word "
             "cannot be named)")
    listed = " ".join(f"{t.pos}:{t.text}" for t in table if t.klass != "padding")
    raise ValueError(
        f"text: {text!r} is not the prompt the capture recorded ({run.rows} rows). Both have {len(table)} context "
        f"positions, but {where}. This text's tokens: {listed}. A CONDITIONING carries no token ids, so the recorded "
        f"prompt's words cannot be listed: give the text of the conditioning the capture saw (and the CLIP that "
        f"encoded it). If that conditioning was changed after encoding (e.g. ConditioningAverage, or "
        f"CLIPTextEncodeSDXL with different text_g and text_l), disconnect clip to label the maps by token count only.")


# ----------------------------------------------------------------------------------------------
# token selection
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Item:
    key: str  # what the tokens input says: "5", "8-76", "sos", "eos", "pad", "sem", "img"
    label: str
    channels: tuple[int, ...]
    klass: str


def _item_for_positions(key: str, positions: list[int], table: list[TokenInfo]) -> Item:
    if len(positions) == 1:
        t = table[positions[0]]
        return Item(key, f"{t.pos} {t.text}", (t.pos,), t.klass)
    classes = {table[p].klass for p in positions}
    klass = classes.pop() if len(classes) == 1 else "mixed"
    return Item(key, f"{positions[0]}-{positions[-1]} ({len(positions)})", tuple(positions), klass)


def default_items(table: list[TokenInfo], extra: bool) -> list[Item]:
    """Every semantic token and the first [EOS] of each chunk (at most MAX_AUTO_ITEMS)."""
    keep = [t for t in table if t.klass in ("semantic", "[EOS]")]
    return [_item_for_positions(str(t.pos), [t.pos], table) for t in keep[:MAX_AUTO_ITEMS]]


def parse_items(spec: str, table: list[TokenInfo], extra: bool) -> list[Item]:
    """Items of the ``tokens`` input: comma-separated context positions ("5"), ranges summed into one map
    ("8-76"), or the class words sos, eos, sem, pad (all positions of that class, summed) and img (SD3 / Flux:
    the weight on the image keys). Empty or "auto": every semantic token and the first [EOS] of each chunk."""
    text = (spec or "").strip().lower()
    if text in ("", "auto"):
        return default_items(table, extra)
    n = len(table)
    words = {"sos": "[SOS]", "eos": "[EOS]", "sem": "semantic", "pad": "padding"}
    items: list[Item] = []
    seen = set()
    for raw in text.replace(";", ",").split(","):
        key = raw.strip()
        if not key or key in seen:
            continue
        seen.add(key)
        if key in words:
            positions = [t.pos for t in table if t.klass == words[key]]
            if not positions:
                raise ValueError(f"tokens: this prompt has no {words[key]} positions (item {key!r}); remove it.")
            items.append(Item(key, f"{words[key]} ({len(positions)})", tuple(positions), words[key]))
            continue
        if key in ("img", "image"):
            if not extra:
                raise ValueError("tokens: 'img' (weight on the image keys) exists only for SD3 / Flux records, whose "
                                 "joint attention also attends to image tokens; remove it for this UNet model.")
            items.append(Item(key, OTHER_LABEL, (n,), OTHER_LABEL))
            continue
        try:
            a, _, b = key.partition("-")
            lo, hi = int(a), int(b if b else a)
        except ValueError:
            raise ValueError(f"tokens: {key!r} is not a token. Use context positions (e.g. '1, 2, 5'), ranges summed "
                             f"into one map ('8-76'), 'sos', 'eos', 'sem', 'pad'{', img' if extra else ''} or 'auto'.") \
                from None
        if lo > hi or lo < 0 or hi >= n:
            raise ValueError(f"tokens: {key!r} is outside the prompt's {n} context positions (0-{n - 1}). See the token "
                             f"list in the summary or pick the tokens in the node.")
        items.append(_item_for_positions(key, list(range(lo, hi + 1)), table))
    if not items:
        return default_items(table, extra)
    if len(items) > MAX_ITEMS:
        raise ValueError(f"tokens: {len(items)} maps asked for; at most {MAX_ITEMS} fit in one grid. Sum ranges ('8-76') "
                         f"or pick fewer.")
    return items


def picker_chips(table: list[TokenInfo], extra: bool, selected: list[Item]) -> list[dict]:
    """What the JS token picker shows: one chip per non-padding position, one per chunk for its padding, and
    [image] for SD3 / Flux. ``item`` is the text the chip adds to the tokens input; ``selected``: shown in this
    run; ``auto``: part of the automatic choice."""
    chosen = {it.key for it in selected}
    auto = {it.key for it in default_items(table, extra)}
    chips = []
    pad_runs: dict[int, list[int]] = {}
    for t in table:
        if t.klass == "padding":
            pad_runs.setdefault(t.chunk, []).append(t.pos)
            continue
        chips.append({"item": str(t.pos), "label": t.text, "class": t.klass, "chunk": t.chunk,
                      "weight": round(t.weight, 3), "selected": str(t.pos) in chosen, "auto": str(t.pos) in auto})
    for chunk, positions in pad_runs.items():
        key = f"{positions[0]}-{positions[-1]}" if len(positions) > 1 else str(positions[0])
        chips.append({"item": key, "label": f"[pad]×{len(positions)}", "class": "padding", "chunk": chunk,
                      "weight": 1.0, "selected": key in chosen, "auto": False})
    if extra:
        chips.append({"item": "img", "label": OTHER_LABEL, "class": OTHER_LABEL, "chunk": -1, "weight": 1.0,
                      "selected": "img" in chosen, "auto": False})
    order = {c["item"]: i for i, c in enumerate(chips)}
    chips.sort(key=lambda c: (int(c["item"].split("-")[0]) if c["item"][0].isdigit() else 1 << 30, order[c["item"]]))
    return chips


def item_maps(maps: torch.Tensor, items: list[Item]) -> torch.Tensor:
    """(channels, h, w) -> (items, h, w): each item's channels summed."""
    return torch.stack([maps[list(it.channels)].sum(0) for it in items])


# ----------------------------------------------------------------------------------------------
# numbers
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# drawing
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# the view
# ----------------------------------------------------------------------------------------------
def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    return v


def _pick_image(run: AttentionRun, image: torch.Tensor | None, index: int) -> tuple[torch.Tensor, str]:
    if image is not None:
        if image.ndim != 4 or image.shape[-1] < 3:
            raise ValueError(f"image must be an IMAGE batch [B, H, W, 3], got shape {tuple(image.shape)}.")
        if image.shape[0] == run.batch:
            return image[index, ..., :3].float().cpu().clamp(0, 1), "image"
        if image.shape[0] == 1:
            return image[0, ..., :3].float().cpu().clamp(0, 1), "image"
        raise ValueError(f"image has {image.shape[0]} images but the recorded run sampled {run.batch}: connect the "
                         f"decoded output of the sampler that used the capture MODEL.")
    latent = run.final[index:index + 1]
    if run.latent_format is not None:  # the record keeps the sampler's output; the colours are for model space
        latent = run.latent_format.process_in(latent)
    rgb = latent_to_rgb(latent, run.latent_format, min_side=128)[0]
    return rgb.float().clamp(0, 1), "latent preview (no IMAGE connected)"


def _pick_frames(run: AttentionRun, image: torch.Tensor | None, index: int) -> tuple[list[torch.Tensor], str]:
    """Video records: one image (H, W, 3) per latent frame of batch item ``index`` — the decoded frame at the same
    place in the video (latent frame f of T -> frame round(f (N - 1) / (T - 1)) of the item's N decoded frames), or
    the latent preview of that frame."""
    n_frames = int(run.ref_hw[0])
    if image is not None:
        if image.ndim != 4 or image.shape[-1] < 3:
            raise ValueError(f"image must be an IMAGE batch [frames, H, W, 3], got shape {tuple(image.shape)}.")
        total = int(image.shape[0])
        if total % run.batch:
            raise ValueError(f"image has {total} frames, which do not split into the {run.batch} videos the recorded "
                             f"run sampled: connect the decoded output of the sampler that used the capture MODEL.")
        per = total // run.batch
        video = image[index * per:(index + 1) * per, ..., :3].float().cpu().clamp(0, 1)
        picks = [round(f * (per - 1) / (n_frames - 1)) if n_frames > 1 else 0 for f in range(n_frames)]
        return [video[i] for i in picks], "image (decoded frames)"
    latent = run.final[index:index + 1]
    if run.latent_format is not None:
        latent = run.latent_format.process_in(latent)
    frames = [latent_to_rgb(latent[:, :, f], run.latent_format, min_side=128)[0].float().clamp(0, 1)
              for f in range(min(n_frames, latent.shape[2]))]
    return frames, "latent preview (no IMAGE connected)"


def _frame_cells(maps: torch.Tensor, frames: list[torch.Tensor], size: tuple[int, int]) -> list[torch.Tensor]:
    """``maps`` (items, T, h, w) in [0, 1] -> per latent frame the overlay cells (items, ch, cw, 3)."""
    out = []
    up_all = upsample(maps.reshape(-1, *maps.shape[-2:]), size).reshape(*maps.shape[:2], *size)
    for f in range(maps.shape[1]):
        frame = frames[min(f, len(frames) - 1)]
        cell = F.interpolate(frame.movedim(-1, 0)[None], size=size, mode="bilinear", align_corners=False)[0]
        out.append(overlay(cell.movedim(0, -1).clamp(0, 1), up_all[:, f]))
    return out


@dataclasses.dataclass
class View:
    heatmaps: torch.Tensor
    overlays: torch.Tensor
    class_plot: torch.Tensor
    time_slices: torch.Tensor
    animation: torch.Tensor
    convergence: torch.Tensor
    video_frames: torch.Tensor
    summary: dict
    text: str
    chips: list[dict]
    items: list[Item]


def render_view(run: AttentionRun, matched: bool, text: str, clip=None, image: torch.Tensor | None = None,
                tokens: str = "auto", batch_index: int = 0, scale: str = "per_map", edge_tolerance: int = 2) -> View:
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}.")
    if not 0 <= int(edge_tolerance) <= 32:
        raise ValueError(f"edge_tolerance must be 0-32 pixels, got {edge_tolerance}.")
    if not 0 <= batch_index < run.batch:
        raise ValueError(f"batch_index {batch_index} is out of range: the recorded run has {run.batch} image(s) "
                         f"(use 0..{run.batch - 1}).")
    table = prompt_tokens(run, text, clip)
    label_note = check_labels(run, table, text, clip)
    sums: MapSums = run.sums[len(table)]
    extra = sums.extra
    items = parse_items(tokens, table, extra)
    classes = class_of_channels(table, extra)
    video = sums.video
    frame_imgs: list[torch.Tensor] = []
    if video:
        frame_imgs, image_source = _pick_frames(run, image, batch_index)
        img = frame_imgs[len(frame_imgs) // 2]
    else:
        img, image_source = _pick_image(run, image, batch_index)
    H, W = int(img.shape[0]), int(img.shape[1])

    mean_full = sums.mean()[batch_index]  # (C, h, w); video (C, T, h, w)
    mean = mean_full.mean(1) if video else mean_full  # video: the mean over the frames
    token_share = sums.token_share()[batch_index]  # (C,)
    maps = item_maps(mean, items)  # (n, h, w)
    shares = [float(token_share[list(it.channels)].sum()) for it in items]
    labels = [_short(it.label) for it in items]

    # heat maps + overlays
    ch, cw = cell_size(H, W)
    if scale == "shared":
        top = float(maps.amax()) if maps.numel() else 1.0
        shown = (maps / top if top > 0 else maps).clamp(0, 1)
    else:
        shown = normalise(maps)
    cell_img = F.interpolate(img.movedim(-1, 0)[None], size=(ch, cw), mode="bilinear", align_corners=False)[0]
    cell_img = cell_img.movedim(0, -1).clamp(0, 1)
    up = upsample(shown, (ch, cw))
    cells = torch.cat([colormap(up), overlay(cell_img, up)])
    heat = labelled_grid(cells, 2, len(items), ["map", "overlay"],
                         [f"{lab}\n{s:.1%}" for lab, s in zip(labels, shares, strict=True)])
    full = overlay(img, upsample(shown, (H, W)))
    overlays = torch.stack([caption(full[k], labels[k]) for k in range(len(items))])

    # time slices (one colour scale per item over all buckets)
    nb = len(run.buckets)
    bucket_maps = []
    video_buckets = []  # video: (items, T, h, w) per filled bucket
    for j in range(nb):
        m = sums.bucket_mean(j)
        if m is not None and video:
            video_buckets.append(item_maps(m[batch_index], items))
        bucket_maps.append(None if m is None else item_maps(m[batch_index].mean(1) if video else m[batch_index], items))
    filled = [m for m in bucket_maps if m is not None]
    stacked = torch.stack(filled, 1) if filled else torch.zeros(len(items), 1, *mean.shape[-2:])  # (n, nb', h, w)
    norm_t = normalise(stacked, dims=(-3, -2, -1))
    sh, sw = cell_size(H, W, 64, 128)
    valid_buckets = [j for j in range(nb) if bucket_maps[j] is not None]
    slices = colormap(upsample(norm_t.reshape(-1, *norm_t.shape[-2:]), (sh, sw)))
    col_labels = [_steps_label(run.buckets[j], "\n") for j in valid_buckets]
    if video and video_buckets:  # rows: (token, latent frame); one colour scale per token over frames and buckets
        vt = normalise(torch.stack(video_buckets, 2), dims=(-4, -3, -2, -1))  # (n, T, nb', h, w)
        n_t = vt.shape[1]
        slices = colormap(upsample(vt.reshape(-1, *vt.shape[-2:]), (sh, sw)))
        row_labels = [f"{lab} · frame {f}" for lab in labels for f in range(n_t)]
        time_slices = labelled_grid(slices, len(items) * n_t, len(valid_buckets), row_labels, col_labels)
    else:
        time_slices = labelled_grid(slices, len(items), len(valid_buckets), labels, col_labels)
    frames = []
    for k, j in enumerate(valid_buckets):
        cells_j = colormap(upsample(norm_t[:, k], (ch, cw)))
        frames.append(labelled_grid(cells_j, 1, len(items), [_steps_label(run.buckets[j])], labels))
    animation = drawing.stack_padded(frames) if frames else heat

    # video: one image per latent frame (whole-run maps, one colour scale per token over the frames)
    per_frame_weight: list[list[float]] = []
    if video:
        fm = item_maps(mean_full, items)  # (n, T, h, w)
        per_frame_weight = [[float(v) for v in fm[k].mean((-2, -1))] for k in range(len(items))]
        if scale == "shared":
            top = float(fm.amax()) if fm.numel() else 1.0
            fm_shown = (fm / top if top > 0 else fm).clamp(0, 1)
        else:
            fm_shown = normalise(fm, dims=(-3, -2, -1))
        video_frames = torch.cat([labelled_grid(cells_f, 1, len(items), [f"latent frame {f}"], labels)
                                  for f, cells_f in enumerate(_frame_cells(fm_shown, frame_imgs, (ch, cw)))])
    else:
        video_frames = heat

    # class shares per step
    step_share = sums.step_share()[:, batch_index]  # (steps, C)
    per_step = class_shares(step_share, classes)
    steps = list(range(run.n_steps))
    per_step_lists = {k: [float(x) for x in v] for k, v in per_step.items()}
    overall = {k: float(v) for k, v in class_shares(token_share, classes).items()}
    bucket_share = {}
    for name in per_step:
        vals = []
        for a, b in run.buckets:
            seg = [v for v in per_step_lists[name][a:b + 1] if math.isfinite(v)] if a >= 0 else []
            vals.append(sum(seg) / len(seg) if seg else float("nan"))
        bucket_share[name] = vals
    coverage = step_coverage(per_step_lists, run.n_steps, run.rows, run.skipped)
    plot_classes = pil_to_image([class_plot(steps, per_step_lists, run.n_steps, coverage)])

    # shape convergence
    f1 = shape_convergence(bucket_maps, img, int(edge_tolerance)) if filled else torch.zeros(len(items), 0)
    rel = relative_to_last(f1)
    xs = [float(b) for _a, b in run.buckets]
    conv_notes = convergence_notes(f1, rel, labels, bool(filled))
    conv = pil_to_image([convergence_plot(xs, rel, labels, "\n".join(filter(None, [coverage, *conv_notes])))])

    chips = picker_chips(table, extra, items)
    layer_note = []
    if run.fallback:
        layer_note.append(f"{len(run.fallback)} layer(s) have an attn2 replace (IPAdapter-style); their maps were "
                          f"recomputed from the layer's to_q / to_k: {', '.join(run.fallback)}")
    if run.missing:
        layer_note.append(f"{len(run.missing)} chosen layer(s) were never seen during sampling and are not in the "
                          f"maps: {', '.join(run.missing)}")
    notes = list(layer_note) + ([label_note] if label_note else []) + ([coverage] if coverage else []) + conv_notes
    if table[0].text == "#0":
        fam = families.by_name(run.family)
        ruleless = [e for e in fam.context_encoders if e.kind == families.LLM and e.no_eos]
        why = (f"the registry gives {fam.label}'s {ruleless[0].label} no token classes ({ruleless[0].no_eos})"
               if ruleless else f"{fam.label}'s tokenizer ships inside its text encoder checkpoint: connect the CLIP "
               f"that encoded the prompt to label them")
        notes.append(f"token labels are positions only: {why}; the class plot shows them all as semantic")
    if not matched:
        notes.append("no recorded run produced exactly this LATENT; showing the newest run of the capture")
    for why, count in run.skipped.items():
        notes.append(f"skipped {count}× {why}")
    for err in run.errors[:3]:
        notes.append(f"capture error (maps incomplete): {err}")
    if tokens.strip().lower() in ("", "auto") and sum(t.klass in ("semantic", "[EOS]") for t in table) > MAX_AUTO_ITEMS:
        notes.append(f"auto shows the first {MAX_AUTO_ITEMS} semantic / [EOS] tokens; pick others in 'tokens'")

    summary = {
        "family": run.family, "rows": run.rows, "sampler": run.sampler, "steps": run.n_steps,
        "batch_index": batch_index, "batch": run.batch, "matched_latent": matched, "image": image_source,
        "grid": list(run.ref_hw), "frames": int(run.ref_hw[0]) if video else None, "context_tokens": len(table),
        "extra_image_channel": extra,
        "layers": {"chosen": run.layers, "of": run.all_layers, "seen": run.seen, "recomputed_attn2_replace": run.fallback,
                   "missing": run.missing},
        "buckets": [list(b) for b in run.buckets],
        "class_share": overall, "class_share_per_bucket": bucket_share, "class_share_per_step": per_step_lists,
        "tokens": [{"pos": t.pos, "text": t.text, "class": t.klass, "chunk": t.chunk, "weight": t.weight,
                    "encoder": t.encoder, "mean_weight": float(token_share[t.pos])} for t in table],
        "shown": [{"item": it.key, "label": it.label, "class": it.klass, "mean_weight": s,
                   "f1": [float(v) for v in f1[k]], "f1_relative": [float(v) for v in rel[k]],
                   **({"mean_weight_per_frame": per_frame_weight[k]} if video else {})}
                  for k, (it, s) in enumerate(zip(items, shares, strict=True))],
        "peak_capture_bytes": run.peak_bytes, "notes": notes,
    }
    if extra:
        summary["image_key_weight"] = float(token_share[len(table)])

    share_txt = " · ".join(f"{k} {v:.1%}" for k, v in overall.items())
    early = ", ".join(f"{_short(lab, 12)} {float(r[0]):.2f}" for lab, r in zip(labels, rel, strict=True)
                      if rel.shape[1] and math.isfinite(float(r[0])))
    lines = [
        f"{families.by_name(run.family).label} · {run.n_steps} steps ({run.sampler}) · {run.rows} rows · image "
        f"{batch_index + 1} of {run.batch} · {len(run.seen) + len(run.fallback)}/{len(run.layers)} chosen layers seen "
        f"({run.all_layers} in the model) · grid {'x'.join(map(str, run.ref_hw))}"
        + (" (frames x h x w)" if video else ""),
        f"class share (whole run): {share_txt}",
        "shown: " + ", ".join(f"{lab} {s:.1%}" for lab, s in zip(labels, shares, strict=True)),
    ]
    if early:
        lines.append(f"F1_first / F1_last (bucket steps {run.buckets[0][0]}-{run.buckets[0][1]}): {early}")
    lines += [f"note: {n}" for n in notes]
    text_summary = "\n".join(lines)
    summary["summary"] = text_summary
    return View(heat, overlays, plot_classes, time_slices, animation, conv, video_frames, _clean(summary), text_summary,
                chips, items)
