"""TextLayerLocalize: paper 2's Algorithm 1 (find the layers that write the text) on the user's own model.

For each candidate (one layer, or a group of layers) the node samples the source prompt with only that candidate
patched by TextLayerPatch (the target prompt in those layers, fixed seed, few steps, small size) and scores how
far the result moved toward the target prompt's image where the text is, and how little it moved elsewhere.

The paper decides with OCR whether the rendered words became the target's. The pack has no OCR model, so the
score is measured on the final latents instead (any model family, no extra download):

* region R: the latent positions where the source and target images differ most — the channel-mean absolute
  difference |target − source| is at least ``region_threshold`` × its maximum (per image);
* toward = <patched − source, target − source>_R / ||target − source||²_R — the share of the source→target change
  inside R that the patch reproduces (1: the patched image equals the target there; 0: still the source);
* moved = RMS(patched − source outside R) / RMS(target − source inside R) — how much the rest of the image moved;
* score = toward − moved. The best ``top_k`` candidates form the ``layers`` output, wired into Text Layer Patch.

For a source/target pair that differ only in the quoted words, R is where the text is, so the score rewards the
layers that change the text and nothing else; it cannot read the words, so check the candidates' images (the
``latents`` output: source, target, then every candidate, in order) before trusting a ranking.
"""

from __future__ import annotations

import dataclasses
import math
import re

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import torch

from ..core.layers import ModelLayers, layer_label, model_layers, parse_layers
from ..shared.drawing import bar_chart
from .patch import PatchSettings, TargetText, apply_text_layer_patch


@dataclasses.dataclass(frozen=True)
class CandidateScore:
    layers: tuple
    label: str
    indices: str
    toward: float
    moved: float

    @property
    def score(self) -> float:
        return self.toward - self.moved


def parse_candidates(spec: str, ml: ModelLayers) -> list[tuple]:
    """Candidates to test, each a tuple of layers. Empty: every layer of the model alone. Otherwise items separated
    by ';' or new lines, each one candidate (a layer string; several layers are tested together); an item
    'each <layers>' gives one candidate per layer."""
    spec = (spec or "").strip()
    if not spec:
        return [(layer,) for layer in ml.layers]
    out: list[tuple] = []
    for item in re.split(r"[;\n]+", spec):
        item = item.strip()
        if not item:
            continue
        if item.lower().startswith("each "):
            out.extend((layer,) for layer in parse_layers(item[5:], ml))
            continue
        layers = parse_layers(item, ml)
        if layers:
            out.append(layers)
    unique = list(dict.fromkeys(out))
    if not unique:
        raise ValueError(f"candidates: {spec!r} names no layer. Leave it empty to test every layer, or list "
                         f"candidates separated by ';' (valid: {ml.describe()}).")
    return unique


def score_edit(source: torch.Tensor, target: torch.Tensor, patched: torch.Tensor,
               region_threshold: float = 0.5) -> tuple[float, float, float]:
    """(toward, moved, region fraction) of a patched latent against the source and target latents (B, C, H, W)."""
    s, t, p = source.float(), target.float(), patched.float()
    diff = t - s
    dmap = diff.abs().mean(dim=1, keepdim=True)
    peak = dmap.amax(dim=(-2, -1), keepdim=True)
    if float(peak.max()) == 0.0:
        raise ValueError("The source and target prompts give the same image, so there is nothing to localize: make "
                         "the target differ from the source (e.g. other words in quotes).")
    region = (dmap >= region_threshold * peak) & (peak > 0)
    region = region.expand_as(diff)
    moved_vec = p - s
    den = float((diff[region] ** 2).sum())
    toward = float((moved_vec[region] * diff[region]).sum()) / den
    rms_in = math.sqrt(den / max(1, int(region.sum())))
    outside = ~region
    moved = math.sqrt(float((moved_vec[outside] ** 2).mean())) / rms_in if bool(outside.any()) else 0.0
    return toward, moved, float(region.float().mean())


def rank(scores: list[CandidateScore]) -> list[CandidateScore]:
    return sorted(scores, key=lambda c: -c.score)


def best_layers(scores: list[CandidateScore], top_k: int, ml: ModelLayers) -> str:
    chosen = set()
    for c in rank(scores)[:max(1, top_k)]:
        chosen.update(c.layers)
    return ", ".join(layer_label(layer) for layer in ml.layers if layer in chosen)


def format_table(ml: ModelLayers, scores: list[CandidateScore], top_k: int, header: str, region: float,
                 threshold: float, best: str) -> str:
    lines = [header,
             "score = toward − moved, measured on the final latents (paper 2 used OCR; this score needs none): "
             f"toward = share of the source→target change reproduced inside the region where source and target "
             f"differ most (≥ {threshold:.2f} × the largest difference; {100 * region:.1f} % of the latent), moved = "
             f"RMS change outside it ÷ RMS source→target change inside.",
             f"{'rank':>4}  {'layers':<28} {'index':<10} {'toward':>8} {'moved':>8} {'score':>8}"]
    for r, c in enumerate(rank(scores), 1):
        mark = " *" if r <= top_k else ""
        lines.append(f"{r:>4}  {c.label:<28} {c.indices:<10} {c.toward:>8.3f} {c.moved:>8.3f} {c.score:>8.3f}{mark}")
    lines.append(f"best layers (top {top_k}): {best}")
    return "\n".join(lines)


def render_chart(scores: list[CandidateScore], top_k: int, title: str) -> torch.Tensor:
    """Bar chart of the scores in forward order (top_k highlighted), as an IMAGE [1, H, W, 3]."""
    best = {id(c) for c in rank(scores)[:top_k]}
    return bar_chart([f"{c.label} {c.indices}"[:32] for c in scores], [c.score for c in scores],
                     [id(c) in best for c in scores], title, "score = toward - moved (orange: best)")


def sample_latent(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent) -> torch.Tensor:
    """KSampler's sampling without its per-step progress bar and previews (the node shows one bar over runs)."""
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    return comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                               denoise=1.0, noise_mask=latent.get("noise_mask"), callback=None, disable_pbar=True,
                               seed=seed)


def localize(model, positive, target, negative, latent, seed=0, steps=6, cfg=5.0, sampler_name="euler",
             scheduler="normal", candidates="", start_percent=0.0, end_percent=1.0, region_threshold=0.5, top_k=1,
             progress=None):
    """Algorithm 1. Returns (scores in candidate order, source latent, target latent, patched latents, table,
    best layers, region fraction)."""
    ml = model_layers(model, "TextLayerLocalize")
    if not (math.isfinite(region_threshold) and 0.0 < region_threshold <= 1.0):
        raise ValueError(f"region_threshold must be in (0, 1], got {region_threshold}: it is the fraction of the largest "
                         f"source/target difference that counts as 'the text region'; 0.5 is a good start.")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}.")
    cands = parse_candidates(candidates, ml)
    tgt = TargetText.from_conditioning(target)
    PatchSettings(cands[0], start_percent, end_percent).validate()
    if start_percent >= 1.0 or start_percent >= end_percent:
        raise ValueError(f"start_percent {start_percent} / end_percent {end_percent} leave no step to patch, so every "
                         f"candidate would give the source image. Use e.g. 0.0 and 1.0.")
    pbar = progress or comfy.utils.ProgressBar(len(cands) + 2)

    def run(m, pos):
        out = sample_latent(m, seed, steps, cfg, sampler_name, scheduler, pos, negative, latent)
        pbar.update(1)
        return out

    src = run(model, positive)
    tgt_latent = run(model, target)
    patched, scores, region = [], [], 0.0
    for layers in cands:
        comfy.model_management.throw_exception_if_processing_interrupted()
        m, _ = apply_text_layer_patch(model, tgt, layers, start_percent, end_percent)
        out = run(m, positive)
        toward, moved, region = score_edit(src, tgt_latent, out, region_threshold)
        label = ", ".join(layer_label(layer) for layer in layers)
        indices = ",".join(str(ml.index(layer)) for layer in layers)
        scores.append(CandidateScore(layers, label if len(label) <= 28 else label[:27] + "…", f"[{indices}]"
                                     if len(indices) <= 8 else f"[{indices[:7]}…]", toward, moved))
        patched.append(out)
    top_k = min(top_k, len(scores))
    best = best_layers(scores, top_k, ml)
    header = (f"TextLayerLocalize · {ml.label} · {len(cands)} candidates of {len(ml.layers)} {ml.unit} · {steps} "
              f"steps, seed {seed}, cfg {cfg}, {sampler_name}/{scheduler}, patched from {start_percent:.2f} to "
              f"{end_percent:.2f}")
    table = format_table(ml, scores, top_k, header, region, region_threshold, best)
    return scores, src, tgt_latent, patched, table, best, top_k
