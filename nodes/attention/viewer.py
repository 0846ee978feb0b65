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

Token labels and the ``tokens`` items are in :mod:`.viewer_tokens`, class shares and shape convergence in
:mod:`.viewer_measures`, the plots and their notes in :mod:`.viewer_plots`.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from ..core import families
from ..shared import drawing
from ..shared.drawing import (
    caption,
    cell_size,
    colormap,
    labelled_grid,
    latent_to_rgb,
    overlay,
    pil_to_image,
    upsample,
)
from .capture import AttentionRun, MapSums
from .viewer_measures import (
    CANNY_HIGH,
    CANNY_LOW,
    canny_edges,
    class_of_channels,
    class_shares,
    edge_f1,
    normalise,
    relative_to_last,
    shape_convergence,
)
from .viewer_plots import _short, _steps_label, class_plot, convergence_notes, convergence_plot, step_coverage
from .viewer_tokens import MAX_AUTO_ITEMS, Item, check_labels, item_maps, parse_items, picker_chips, prompt_tokens, token_table

__all__ = ["CANNY_HIGH", "CANNY_LOW", "NODE_ID", "SCALES", "View", "canny_edges", "convergence_notes", "edge_f1", "item_maps",
           "parse_items", "picker_chips", "prompt_tokens", "relative_to_last", "render_view", "shape_convergence",
           "step_coverage", "token_table"]

NODE_ID = "CrossAttentionMapViewer"
SCALES = ("per_map", "shared")


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
        "extra_image_channel": extra, "normalise": run.normalise,
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
