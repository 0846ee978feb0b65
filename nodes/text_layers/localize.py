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

``score = "ocr"`` ranks the way the paper does (Algorithm 1 with OCR): every candidate's latent is decoded with the
VAE and read with RapidOCR (:mod:`..shared.ocr`, an optional dependency; without it the node raises the how-to-enable
message, never falls back silently). Per image, :func:`ocr.score_edit` gives text = (word F1 + 1 − normalised
Levenshtein) / 2 against the target words and multiplies it by the background SSIM against the source image (text
boxes masked), so a layer that writes the target words and leaves the rest of the image scores highest; a batch
scores the mean of its images. The target words are the quoted parts of ``target_text`` (TextLayerWordSubstitute's
``target_text`` output is the whole prompt), or all of it when nothing is quoted.

Start search (paper 2 also chose the step the patch starts at): ``start_search`` lists start fractions; the best
``top_k`` candidates are re-run from each and the best (candidate, start) pair gives ``best_start``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import torch

from ..core import LOG
from ..core.layers import ModelLayers, layer_label, model_layers, parse_layers
from ..shared import ocr
from ..shared.drawing import bar_chart
from .patch import PatchSettings, TargetText, apply_text_layer_patch

MAX_PAIR_LAYERS = 16  # 'pairs <layers>' in candidates: at most 120 pairs, each one sampled batch


@dataclasses.dataclass(frozen=True)
class CandidateScore:
    layers: tuple
    label: str
    indices: str
    toward: float
    moved: float
    ocr: dict | None = None  # score="ocr": mean f1, lev, bg_ssim, score over the batch, and the first image's text
    start: float | None = None  # start search: the start fraction of this run

    @property
    def score(self) -> float:
        return self.ocr["score"] if self.ocr is not None else self.toward - self.moved


def parse_candidates(spec: str, ml: ModelLayers) -> list[tuple]:
    """Candidates to test, each a tuple of layers. Empty: every layer of the model alone. Otherwise items separated
    by ';' or new lines, each one candidate (a layer string; several layers are tested together); an item
    'each <layers>' gives one candidate per layer, 'pairs <layers>' one per pair of those layers."""
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
        if item.lower().startswith("pairs "):
            out.extend(itertools.combinations(_pair_layers(item[6:], ml), 2))
            continue
        layers = parse_layers(item, ml)
        if layers:
            out.append(layers)
    unique = list(dict.fromkeys(out))
    if not unique:
        raise ValueError(f"candidates: {spec!r} names no layer. Leave it empty to test every layer, or list "
                         f"candidates separated by ';' (valid: {ml.describe()}).")
    return unique


def _pair_layers(spec: str, ml: ModelLayers) -> tuple:
    layers = parse_layers(spec, ml)
    if len(layers) < 2:
        raise ValueError(f"candidates: 'pairs {spec.strip()}' names {len(layers)} layer(s); a pair needs two. Name "
                         f"two or more layers after 'pairs', e.g. 'pairs all' or 'pairs output' (valid: "
                         f"{ml.describe()}).")
    if len(layers) > MAX_PAIR_LAYERS:
        raise ValueError(f"candidates: 'pairs {spec.strip()}' names {len(layers)} layers, which makes "
                         f"{len(layers) * (len(layers) - 1) // 2} pairs, one sampled image batch each. Name at most "
                         f"{MAX_PAIR_LAYERS} layers after 'pairs' (e.g. the best few of a single-layer run).")
    return layers


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
                 threshold: float, best: str, target_words: str | None = None) -> str:
    if target_words is not None:
        return _format_ocr_table(scores, top_k, header, best, target_words)
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


def _format_ocr_table(scores: list[CandidateScore], top_k: int, header: str, best: str, target_words: str) -> str:
    lines = [header,
             f"score = OCR (paper 2's Algorithm 1): text = (word F1 + 1 − normalised Levenshtein) / 2 of the words read "
             f"in the decoded image against the target words {target_words!r}, × SSIM of the background (text boxes "
             f"masked) against the source image; mean over the batch.",
             f"{'rank':>4}  {'layers':<28} {'index':<10} {'f1':>6} {'lev':>6} {'bg_ssim':>8} {'score':>7}  read"]
    for r, c in enumerate(rank(scores), 1):
        o = c.ocr
        mark = " *" if r <= top_k else ""
        lines.append(f"{r:>4}  {c.label:<28} {c.indices:<10} {o['f1']:>6.3f} {o['lev']:>6.3f} {o['bg_ssim']:>8.3f} "
                     f"{o['score']:>7.3f}  {o['text'][:24]!r}{mark}")
    lines.append(f"best layers (top {top_k}): {best}")
    tied = sum(c.score <= 0.0 for c in rank(scores)[:top_k])
    if tied:
        lines.append(f"note: {tied} of the top {top_k} scored 0 (OCR read nothing of the target words), so "
                     f"they are ties kept in candidate order, not a finding. Test layers together ('pairs all' or "
                     f"'pairs <the best few layers>' in candidates), use more images (the latent's batch) or "
                     f"score = latent, which ranks partial changes.")
    return "\n".join(lines)


def target_words(text: str) -> str:
    """The words the image should show: the quoted parts of ``text`` ("…", “…” or '…' around words), joined by
    spaces, or the whole text when nothing is quoted."""
    quoted = re.findall(r'"([^"]+)"|“([^”]+)”', text or "")
    parts = [a or b for a, b in quoted]
    return " ".join(p.strip() for p in parts if p.strip()) if parts else (text or "").strip()


def decode(vae, latent: torch.Tensor) -> torch.Tensor:
    """VAE Decode of a latent batch as an IMAGE [B, H, W, 3] (video VAEs: frames folded into the batch)."""
    images = vae.decode(latent)
    if images.ndim == 5:
        images = images.reshape(-1, *images.shape[-3:])
    return images


class OcrScorer:
    """Scores patched latents with OCR against the decoded source image (read once)."""

    def __init__(self, vae, source: torch.Tensor, text: str):
        ocr.require("TextLayerLocalize score=ocr")
        if vae is None:
            raise ValueError("vae: score=ocr decodes every candidate's image to read its text, so connect the VAE of "
                             "this model (or use score=latent, which needs none).")
        self.words = target_words(text)
        if not self.words:
            raise ValueError("target_text: score=ocr needs the words the image should show, e.g. WORLD, or the whole "
                             "target prompt with the words in quotes. Wire TextLayerWordSubstitute's target_text "
                             "output here or type them.")
        self.vae = vae
        self.source = decode(vae, source)
        self.source_words = ocr.read(self.source)

    def __call__(self, patched: torch.Tensor) -> dict:
        images = decode(self.vae, patched)
        if images.shape != self.source.shape:
            raise ValueError(f"vae: decoded candidate images {tuple(images.shape)} differ from the source's "
                             f"{tuple(self.source.shape)}.")
        per = [ocr.score_edit(self.source[i:i + 1], images[i:i + 1], self.words, source_words=self.source_words[i])
               for i in range(images.shape[0])]
        mean = {k: sum(p[k] for p in per) / len(per) for k in ("f1", "lev", "bg_ssim", "score")}
        return {**mean, "text": per[0]["text"]}


def parse_starts(spec: str, end_percent: float) -> list[float]:
    """'0, 0.04, 0.08' -> [0.0, 0.04, 0.08]; empty -> [] (no search)."""
    out = []
    for token in re.split(r"[,;\s]+", (spec or "").strip()):
        if not token:
            continue
        try:
            v = float(token)
        except ValueError as e:
            raise ValueError(f"start_search: {token!r} is not a number; list start fractions of the steps, e.g. "
                             f"'0, 0.04, 0.08, 0.12', or leave it empty.") from e
        if not (math.isfinite(v) and 0.0 <= v < end_percent):
            raise ValueError(f"start_search: {v} is outside [0, end_percent = {end_percent}): a patch starting there "
                             f"patches no step.")
        out.append(v)
    return list(dict.fromkeys(out))


def render_chart(scores: list[CandidateScore], top_k: int, title: str) -> torch.Tensor:
    """Bar chart of the scores in forward order (top_k highlighted), as an IMAGE [1, H, W, 3]."""
    best = {id(c) for c in rank(scores)[:top_k]}
    what = "OCR text match x background SSIM" if scores and scores[0].ocr is not None else "toward - moved"
    return bar_chart([f"{c.label} {c.indices}"[:32] for c in scores], [c.score for c in scores],
                     [id(c) in best for c in scores], title, f"score = {what} (orange: best)")


def sample_latent(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent) -> torch.Tensor:
    """KSampler's sampling without its per-step progress bar and previews (the node shows one bar over runs)."""
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    return comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                               denoise=1.0, noise_mask=latent.get("noise_mask"), callback=None, disable_pbar=True,
                               seed=seed)


SCORES = ("latent", "ocr")


def localize(model, positive, target, negative, latent, seed=0, steps=6, cfg=5.0, sampler_name="euler",
             scheduler="normal", candidates="", start_percent=0.0, end_percent=1.0, region_threshold=0.5, top_k=1,
             progress=None, score="latent", vae=None, target_text="", start_search="", details: dict | None = None):
    """Algorithm 1. Returns (scores in candidate order, source latent, target latent, patched latents, table,
    best layers, top_k). ``details`` (a dict, filled in): ``score`` used, ``best_start`` and the start-search
    scores ``search`` (CandidateScore with ``start``)."""
    ml = model_layers(model, "TextLayerLocalize")
    if not (math.isfinite(region_threshold) and 0.0 < region_threshold <= 1.0):
        raise ValueError(f"region_threshold must be in (0, 1], got {region_threshold}: it is the fraction of the largest "
                         f"source/target difference that counts as 'the text region'; 0.5 is a good start.")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}.")
    if score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}.")
    if score == "ocr":
        ocr.require("TextLayerLocalize score=ocr")
    cands = parse_candidates(candidates, ml)
    tgt = TargetText.from_conditioning(target)
    PatchSettings(cands[0], start_percent, end_percent).validate()
    if start_percent >= 1.0 or start_percent >= end_percent:
        raise ValueError(f"start_percent {start_percent} / end_percent {end_percent} leave no step to patch, so every "
                         f"candidate would give the source image. Use e.g. 0.0 and 1.0.")
    starts = parse_starts(start_search, end_percent)
    if score == "ocr" and not target_words(target_text):
        raise ValueError("target_text: score=ocr needs the words the image should show, e.g. WORLD, or the whole "
                         "target prompt with the words in quotes. Wire TextLayerWordSubstitute's target_text output "
                         "here or type them.")
    if score == "ocr" and vae is None:
        raise ValueError("vae: score=ocr decodes every candidate's image to read its text, so connect the VAE of "
                         "this model (or use score=latent, which needs none).")
    n_search = len(starts) * min(top_k, len(cands))
    pbar = progress or comfy.utils.ProgressBar(len(cands) + 2 + n_search)

    def run(m, pos):
        out = sample_latent(m, seed, steps, cfg, sampler_name, scheduler, pos, negative, latent)
        pbar.update(1)
        return out

    src = run(model, positive)
    tgt_latent = run(model, target)
    scorer = OcrScorer(vae, src, target_text) if score == "ocr" else None

    def evaluate(layers, start, out) -> CandidateScore:
        toward, moved, reg = score_edit(src, tgt_latent, out, region_threshold)
        label = ", ".join(layer_label(layer) for layer in layers)
        indices = ",".join(str(ml.index(layer)) for layer in layers)
        return CandidateScore(layers, label if len(label) <= 28 else label[:27] + "…", f"[{indices}]"
                              if len(indices) <= 8 else f"[{indices[:7]}…]", toward, moved,
                              scorer(out) if scorer is not None else None, start), reg

    patched, scores, region = [], [], 0.0
    for layers in cands:
        comfy.model_management.throw_exception_if_processing_interrupted()
        m, _ = apply_text_layer_patch(model, tgt, layers, start_percent, end_percent)
        out = run(m, positive)
        c, region = evaluate(layers, start_percent, out)
        scores.append(c)
        patched.append(out)
    top_k = min(top_k, len(scores))
    best = best_layers(scores, top_k, ml)
    header = (f"TextLayerLocalize · {ml.label} · {len(cands)} candidates of {len(ml.layers)} {ml.unit} · {steps} "
              f"steps, seed {seed}, cfg {cfg}, {sampler_name}/{scheduler}, patched from {start_percent:.2f} to "
              f"{end_percent:.2f} · score: {score}")
    table = format_table(ml, scores, top_k, header, region, region_threshold, best,
                         scorer.words if scorer is not None else None)
    search: list[CandidateScore] = []
    best_start = start_percent
    if starts:
        for c in rank(scores)[:top_k]:
            for st in starts:
                comfy.model_management.throw_exception_if_processing_interrupted()
                m, _ = apply_text_layer_patch(model, tgt, c.layers, st, end_percent)
                search.append(evaluate(c.layers, st, run(m, positive))[0])
        top = rank(scores)[0]
        mine = [c for c in search if c.layers == top.layers]
        best_start = max(mine, key=lambda c: c.score).start  # first listed start wins a tie
        lines = ["", f"start search (the best {top_k} candidate(s) from each start fraction, end {end_percent:.2f}):",
                 f"{'layers':<28} {'start':>6} {'score':>8}"]
        for c in search:
            lines.append(f"{c.label:<28} {c.start:>6.3f} {c.score:>8.3f}")
        lines.append(f"best start for {top.label}: {best_start:.3f} of the steps (wire 'best_start' into Text Layer "
                     f"Patch's start_percent)")
        table += "\n".join(lines)
    LOG.debug("TextLayerLocalize: score %s, best %s, start %.3f", score, best, best_start)
    if details is not None:
        details.update(score=score, best_start=best_start, search=search,
                       target_words=scorer.words if scorer is not None else None)
    return scores, src, tgt_latent, patched, table, best, top_k
