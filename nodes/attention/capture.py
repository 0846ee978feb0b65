"""Cross-attention capture (paper 1, Sec. 4.1 and 5.1, Fig. 1 and 3): the attention probabilities
softmax(Q Kᵀ / √d) of the text tokens, accumulated while any sampler runs, for CrossAttentionMapViewer.

**What is recorded.** For every chosen layer, every model evaluation and every batch row of the chosen
conditioning (positive by default; rows are found by the conds' uuids, so batch > 1, a negative of another
length and foreign guiders are safe), the probabilities are computed explicitly in fp32, in chunks of
queries and heads, and averaged over heads:

    UNet (SD1.x, SD2.x, SDXL)  the cross-attention (attn2) of each transformer block: image queries x text
                               keys; each pixel's row sums to 1 over the context tokens.
    SD3 (MMDiT), Flux          the joint attention of each joint / double / single block: the image-query
                               rows against *all* keys (text first, then image); the text columns keep the
                               full-row normaliser, and one extra channel holds the weight on every
                               non-text key ("[image]"), so text + [image] sums to 1 per pixel. With
                               ``normalise="text_keys"``: the softmax over the prompt's keys alone (each
                               pixel sums to 1 over the prompt; no "[image]" channel), which needs no pass over
                               the image keys.
    Wan (DiT cross-attention)  the cross-attention of each block (its second attention call, after the
                               self-attention: the registry's ``BlockKind.text_call``): video queries x text
                               keys, each row sums to 1 over the text tokens. Maps are kept PER LATENT FRAME:
                               (frames, h, w) per token, frames = the latent's T (patch 1 in time).
    PixArt α / Σ, Hunyuan-DiT  the cross-attention of each block, as for Wan (rows sum to 1 over the text
                               tokens). Their attention gets no transformer_options: a text-attention proxy
                               (:mod:`..core.text_attn`, an object patch of the clone) in front of each chosen
                               block's text attention recomputes q and k through that module's own projections
                               (registry ``text_qk``) and runs the module itself for the output. Hunyuan-DiT's
                               keys are the BERT tokens, then the mT5 states (a second encoding of the prompt):
                               its maps are over the BERT tokens, renormalised over them (``context_first``).

A context repeated to the LCM of two lengths (ComfyUI batches a 77- and a 154-token prompt that way) is
folded back: token t of the repeated context is token t mod L of the prompt, and the repeats are summed.

**Where it goes.** Running sums with a fixed size, so memory does not grow with the number of steps:
per layer on its own grid (whole-run mean; for video the mean over the frames, so the per-layer sums do not
grow with the frame count), and averaged over layers on one reference grid (the largest
grid of the captured layers; for video every frame's grid) for each of ``buckets`` step buckets (bucket j holds steps
[ceil(j·n/b), ceil((j+1)·n/b)) of the n steps); the whole-run mean is the sum of the buckets. Per step
only each token's spatial mean is kept (tokens x steps numbers, for the class-share plot). Accumulators are
grouped by the prompt's token count, so timestep-ranged entries of one prompt add up and the viewer picks
the group its text tokenizes to.

**Bit-identical sampling.** The probabilities come from a chained ``optimized_attention_override``
(:func:`hooks.chain_attention_override`), which then calls the next override or the original backend
with the untouched arguments. The sampled latent is the same, bit for bit, as without the capture.

**Layers with an attn2 replace (IPAdapter, SAG...).** Such a replace computes the attention itself, without
``transformer_options``, so the override never sees those layers. An ``attn2_patch`` remembers the block's
normalised input and context, and when the attention of a chosen layer has not been seen by the time its
``attn2_output_patch`` runs, Q and K are recomputed through the layer's own ``to_q`` / ``to_k`` (the
projections ComfyUI hands to the replace) and captured from there. The record names those layers, and any
chosen layer that was never seen.

Per-run state lives in the run's store (:func:`runs.ensure_run_tracking`): every run starts empty, and
a finished run is published, moved to the CPU, to the ``PA_ATTENTION_RECORD`` handle (the last few runs
are kept; the viewer picks the one that produced its LATENT). The accumulators (``MapSums``) and the published
record (``AttentionRun``) are defined in :mod:`.capture_record`.
"""


from __future__ import annotations

import dataclasses
import math

import torch
from comfy.patcher_extension import WrappersMP

from ..core import LOG, PACK, hooks, records, runs, text_attn
from ..core.layers import (
    LAYER_KEY,
    TXT_LEN_KEY,
    CallCounter,
    Layer,
    current_attn2_layer,
    ensure_layer_tracking,
    model_layers,
    parse_layers,
    running_dit_layer,
    text_attn_paths,
    text_call,
    text_multiple,
)
from .capture_record import AttentionRun, MapSums, context_print
from .probs import (
    attention_probs,
    bucket_of,
    bucket_ranges,
    fold_repeats,
    heads_first,
    joint_text_probs,
    mask_rows,
    tensor_bytes,
    to_grid,
)

NODE_ID = "CrossAttentionCapture"
WRAPPER_KEY = f"{PACK}.attention_capture"
STORE = f"{PACK}.attention_capture"
ROW_ROLES = ("positive", "negative")
NORMALISE = ("all_keys", "text_keys")  # softmax over every key the attention has / over the prompt's tokens only
DEFAULT_BUCKETS = 10
MAX_BUCKETS = 100
OTHER_LABEL = "[image]"  # the extra DiT channel: weight on every non-text key


# ----------------------------------------------------------------------------------------------
# per-run capture state
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CaptureConfig:
    arch: str  # "unet" / "dit" (joint attention) / "cross" (DiT cross-attention, Wan)
    family: str
    layers: list[Layer]  # chosen
    all_layers: int
    rows: str  # "positive" / "negative"
    buckets: int
    ref_level: int  # UNet: level of the largest chosen grid
    patch: tuple[int, ...]  # DiT token patch: (h, w), or (t, h, w) for video
    register_length: int  # register tokens in front of the text (SD3, AuraFlow)
    text_pad: int | None  # the model left-pads the text to this length (Flux.2)
    text_multiple: int | None  # the model right-pads the text to a multiple of this (Z-Image's learned pad tokens)
    modules: dict  # UNet: attn2 key -> module (fallback projections)
    text_calls: dict = dataclasses.field(default_factory=dict)  # cross: layer key -> ordinal of its text attention call
    text_last: bool = False  # the joint sequence is [image, text] (HunyuanImage 2.1, HunyuanVideo 1.5, HiDream)
    text_extras: bool = False  # other per-prompt tokens join the text stream (glyphs, CLIP-vision, Llama states)
    prompt_last: bool = False  # ... in front of the prompt (the prompt ends the stream), else after it
    context_first: bool = False  # cross: the keys are the context's tokens, then other text (Hunyuan-DiT's mT5)
    text_keys: bool = False  # joint attention normalised over the prompt's tokens only (no "[image]" channel)

    @property
    def by_key(self) -> dict[tuple, Layer]:
        return {layer.key: layer for layer in self.layers}


@dataclasses.dataclass
class _Pending:
    layer: Layer
    n: torch.Tensor  # normalised block input handed to attn2
    context: torch.Tensor
    options: dict  # the block's extra_options (transformer_options copy)


class CaptureRun:
    """Working state of one sampling run (in the RunState store)."""

    def __init__(self, cfg: CaptureConfig, lengths: dict, latent_shape, n_steps: int, prints: dict | None = None):
        self.cfg = cfg
        self.by_key = cfg.by_key
        self.lengths = lengths  # cond uuid -> text token count
        self.prints = prints or {}  # cond uuid -> context fingerprint (see context_print)
        self.captured_prints: dict[int, dict] = {}  # text token count -> {uuid: fingerprint} of captured rows
        self.appended_frames = False  # a cond appends latent frames after the video (Wan's time_dim_concat)
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.batch = self.latent_shape[0]
        self.n_steps = max(1, int(n_steps))
        self.n_buckets = max(1, min(cfg.buckets, self.n_steps))
        h, w = self.latent_shape[-2:]
        if cfg.arch == "unet":
            for _ in range(cfg.ref_level):
                h, w = math.ceil(h / 2), math.ceil(w / 2)
            self.ref_hw = (h, w)
        else:  # the DiT pads the latent to its patch, so partial patches count
            dims = self.latent_shape[-len(cfg.patch):]
            self.ref_hw = tuple(math.ceil(d / p) for d, p in zip(dims, cfg.patch, strict=True))
        self.sums: dict[int, MapSums] = {}
        self.seen: dict[str, int] = {}  # layer label -> model calls with captured rows, through the override
        self.fallback: dict[str, int] = {}  # ... recomputed from to_q / to_k (attn2 replace present)
        self.skipped: dict[str, int] = {}
        self.errors: list[str] = []  # the first error stops the capture for the rest of the run
        self.pending: _Pending | None = None
        self.calls = CallCounter()  # cross: which attention call of the running block this is
        self.peak_transient = 0
        self.final: torch.Tensor | None = None

    # ---- helpers
    def _skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1

    def fail(self, exc: Exception) -> None:
        LOG.exception("CrossAttentionCapture: capture failed and stops for this run; the image is unaffected, "
                              "the maps of this run are incomplete")
        self.pending = None
        self.errors.append(f"{type(exc).__name__}: {exc}")

    def _groups(self, to: dict, n_rows: int):
        """(rows slice, text length) of every chunk of this model call with the captured role."""
        roles = runs.chunk_roles(to)
        uuids = to.get("uuids") or []
        if not roles or n_rows % len(roles):
            self._skip("model calls without conditioning rows")
            return []
        per = n_rows // len(roles)
        out = []
        for c, role in enumerate(roles):
            if role != self.cfg.rows:
                continue
            length = self.lengths.get(uuids[c]) if c < len(uuids) else None
            if length is None:
                self._skip("rows whose prompt length is unknown")
                continue
            if per != self.batch:
                self._skip("calls whose batch is not the latent batch")
                continue
            out.append((slice(c * per, (c + 1) * per), length))
            if uuids[c] in self.prints:
                self.captured_prints.setdefault(length, {})[uuids[c]] = self.prints[uuids[c]]
        return out

    def _sums(self, length: int, device) -> MapSums:
        s = self.sums.get(length)
        if s is None:
            image_channel = self.cfg.arch == "dit" and not self.cfg.text_keys
            s = self.sums[length] = MapSums(length, image_channel, self.batch, self.ref_hw, self.n_steps,
                                            self.n_buckets, device)
        return s

    def _step(self, to: dict) -> int | None:
        step = runs.current_step(to)
        if step is None:
            self._skip("calls outside a sampler's schedule")
            return None
        return min(max(0, int(step)), self.n_steps - 1)

    def _add(self, layer: Layer, step: int, length: int, maps: torch.Tensor, transient: int) -> None:
        sums = self._sums(length, maps.device)
        extra = sums.add(layer.label, step, bucket_of(step, self.n_steps, self.n_buckets), maps)
        self.peak_transient = max(self.peak_transient, transient + extra + maps.numel() * 4)

    # ---- UNet
    def attn2_in(self, n, context, extra_options) -> None:
        layer_key = current_attn2_layer(extra_options)
        layer = self.by_key.get(layer_key) if layer_key is not None else None
        self.pending = _Pending(layer, n, context, extra_options) if layer is not None and context is not None else None

    def unet_override(self, args, kwargs, to) -> None:
        pending = self.pending
        if pending is None:
            return
        layer_key = current_attn2_layer(to)
        if layer_key != pending.layer.key:
            return
        q, k = args[0], args[1]
        if q.shape[:2] != pending.n.shape[:2] or k.shape[1] != pending.context.shape[1]:
            return  # another attention inside the layer (e.g. an image-prompt branch)
        heads = args[3] if len(args) > 3 else kwargs.get("heads")
        self.pending = None
        if self._capture_unet(pending, q, k, int(heads), bool(kwargs.get("skip_reshape", False)), to):
            self.seen[pending.layer.label] = self.seen.get(pending.layer.label, 0) + 1

    def attn2_out(self) -> None:
        pending, self.pending = self.pending, None
        if pending is None:
            return
        module = self.cfg.modules.get(pending.layer.key)
        if module is None:
            return
        q = module.to_q(pending.n)
        k = module.to_k(pending.context)
        if self._capture_unet(pending, q, k, int(module.heads), False, pending.options):
            self.fallback[pending.layer.label] = self.fallback.get(pending.layer.label, 0) + 1

    def _capture_unet(self, pending: _Pending, q, k, heads: int, skip_reshape: bool, to: dict) -> int:
        """Capture the chosen rows of one attn2 call; returns how many row groups were added."""
        step = self._step(to)
        if step is None:
            return 0
        shape = to.get("activations_shape") or pending.options.get("activations_shape")
        original = to.get("original_shape") or pending.options.get("original_shape")
        if shape is None:
            self._skip("layers without a known grid")
            return 0
        if original is not None and tuple(original[-2:]) != self.latent_shape[-2:]:
            self._skip("area-conditioned calls (cropped latent)")
            return 0
        h, w = int(shape[-2]), int(shape[-1])
        q4, k4 = heads_first(q, heads, skip_reshape), heads_first(k, heads, skip_reshape)
        added = 0
        for rows, length in self._groups(to, q.shape[0]):
            if k4.shape[2] % length:
                self._skip("contexts that are not a repeat of the prompt")
                continue
            stats: dict = {}
            p = attention_probs(q4[rows], k4[rows], stats=stats)
            maps = to_grid(fold_repeats(p, length), h, w)
            self._add(pending.layer, step, length, maps, stats.get("transient", 0))
            added += 1
        return added

    # ---- DiT
    def dit_override(self, args, kwargs, to) -> None:
        layer = self.by_key.get(running_dit_layer(to, self.calls))
        txt_len = to.get(TXT_LEN_KEY)
        if layer is None or txt_len is None:
            return
        q, k = args[0], args[1]
        skip_reshape = bool(kwargs.get("skip_reshape", False))
        heads = args[3] if len(args) > 3 else kwargs.get("heads")
        q4, k4 = heads_first(q, int(heads), skip_reshape), heads_first(k, int(heads), skip_reshape)
        seq = q4.shape[2]
        n_img = math.prod(self.ref_hw)
        if k4.shape[2] != seq or seq == n_img:
            return  # image-only self-attention (SD3.5 x-blocks), not the joint attention
        if seq < txt_len + n_img:
            self._skip("area-conditioned calls (cropped latent)")
            return
        if self.cfg.text_last and seq != txt_len + n_img:
            self._skip("calls with more image tokens than the latent's (reference images, edit models)")
            return
        step = self._step(to)
        if step is None:
            return
        mask = args[4] if len(args) > 4 else kwargs.get("mask")
        img0, txt0 = (0, n_img) if self.cfg.text_last else (txt_len, 0)  # [image, text] or [text, image]
        added = 0
        for rows, length in self._groups(to, q4.shape[0]):
            first = self._prompt_start(txt_len, length)
            if first is None:
                self._skip("text streams whose length differs from the prompt's")
                continue
            stats: dict = {}
            columns, m = (txt0 + first, txt0 + first + length), mask_rows(mask, rows)
            if self.cfg.text_keys:  # the prompt's keys alone: no pass over the image keys
                p = attention_probs(q4[rows], k4[rows, :, columns[0]:columns[1]], queries=(img0, img0 + n_img),
                                    mask=None if m is None else m[..., columns[0]:columns[1]], stats=stats)
            else:
                p = joint_text_probs(q4[rows], k4[rows], queries=(img0, img0 + n_img), columns=columns, mask=m,
                                     stats=stats)
            self._add(layer, step, length, to_grid(p, *self.ref_hw), stats.get("transient", 0))
            added += 1
        if added:
            self.seen[layer.label] = self.seen.get(layer.label, 0) + 1

    # ---- DiT cross-attention (Wan; PixArt through the text-attention proxies)
    def cross_override(self, args, kwargs, to) -> None:
        key = to.get(LAYER_KEY)
        layer = self.by_key.get(key)
        if key is None:
            return
        ordinal = self.calls.next(to)
        if layer is None or ordinal != self.cfg.text_calls.get(layer.key, 0):
            return  # another block, or the block's self-attention
        q, k = args[0], args[1]
        skip_reshape = bool(kwargs.get("skip_reshape", False))
        heads = args[3] if len(args) > 3 else kwargs.get("heads")
        self.cross_capture(layer, heads_first(q, int(heads), skip_reshape), heads_first(k, int(heads), skip_reshape),
                           to)

    def cross_capture(self, layer: Layer, q4: torch.Tensor, k4: torch.Tensor, to: dict) -> None:
        """Capture one DiT cross-attention call of ``layer``: q4, k4 (B, H, L, D)."""
        n_img = math.prod(self.ref_hw)
        if q4.shape[2] < n_img:
            self._skip("area-conditioned calls (cropped latent)")
            return
        step = self._step(to)
        if step is None:
            return
        if q4.shape[2] > n_img and self.appended_frames:
            self._skip("calls with frames appended after the video (time_dim_concat, e.g. Phantom subject images)")
            return
        first = q4.shape[2] - n_img  # tokens in front of the video (Wan 2.2's reference latent): not mapped
        added = 0
        for rows, length in self._groups(to, q4.shape[0]):
            keys = k4[rows, :, :length] if self.cfg.context_first else k4[rows]
            if keys.shape[2] % length:
                self._skip("contexts that are not a repeat of the prompt")
                continue
            stats: dict = {}
            p = attention_probs(q4[rows], keys, queries=(first, first + n_img), stats=stats)
            maps = fold_repeats(p, length).transpose(1, 2).reshape(p.shape[0], length, *self.ref_hw)
            self._add(layer, step, length, maps, stats.get("transient", 0))
            added += 1
        if added:
            self.seen[layer.label] = self.seen.get(layer.label, 0) + 1

    def _prompt_start(self, txt_len: int, length: int) -> int | None:
        """Where the prompt's ``length`` tokens start in a text stream of ``txt_len``: after the family's register
        tokens, at the end of a zero-padded stream (Flux.2), at the start of one padded up to a multiple (Z-Image);
        next to other per-prompt tokens (HunyuanImage's glyphs: after it; HunyuanVideo 1.5's: before it);
        None when the stream does not hold the prompt."""
        if self.cfg.text_extras:
            if txt_len < length:
                return None
            return txt_len - length if self.cfg.prompt_last else 0
        if self.cfg.text_multiple:
            return 0 if txt_len == length + (-length) % self.cfg.text_multiple else None
        if self.cfg.text_pad:
            return txt_len - length if txt_len == max(self.cfg.text_pad, length) else None
        return self.cfg.register_length if txt_len - self.cfg.register_length == length else None

    # ---- end of run
    def persistent_bytes(self) -> int:
        return tensor_bytes(self.sums)

    def finish(self, sampler_name: str | None, latent_format) -> AttentionRun | None:
        if self.final is None:
            return None
        chosen = [layer.label for layer in self.cfg.layers]
        missing = [lab for lab in chosen if lab not in self.seen and lab not in self.fallback]
        if missing and self.sums:
            LOG.warning("CrossAttentionCapture: %d chosen layer(s) were never seen during sampling: %s",
                                len(missing), ", ".join(missing))
        if self.fallback:
            LOG.info("CrossAttentionCapture: layers with an attn2 replace, maps recomputed from to_q/to_k: %s",
                             ", ".join(self.fallback))
        return AttentionRun(
            family=self.cfg.family, arch=self.cfg.arch, rows=self.cfg.rows, layers=chosen,
            normalise="text_keys" if self.cfg.text_keys else "all_keys",
            all_layers=self.cfg.all_layers, seen=dict(self.seen), fallback=dict(self.fallback), missing=missing,
            skipped=dict(self.skipped), errors=list(self.errors), n_steps=self.n_steps,
            buckets=bucket_ranges(self.n_steps, self.n_buckets), ref_hw=self.ref_hw,
            sums={k: v.to_cpu() for k, v in self.sums.items()}, final=self.final, latent_format=latent_format,
            sampler=sampler_name, peak_bytes=self.persistent_bytes() + self.peak_transient,
            contexts={k: list(v.values()) for k, v in self.captured_prints.items()})


# ----------------------------------------------------------------------------------------------
# installation
# ----------------------------------------------------------------------------------------------
def _cond_lengths(guider) -> dict:
    """Text token count of every cond entry, by uuid (CONDCrossAttn batches different lengths repeated to their
    LCM, so the model call alone does not tell the prompt's length)."""
    out = {}
    for entries in (getattr(guider, "conds", None) or {}).values():
        for entry in entries or []:
            if isinstance(entry, dict) and "uuid" in entry and isinstance(entry.get("cross_attn"), torch.Tensor):
                out[entry["uuid"]] = int(entry["cross_attn"].shape[1])
    return out


def _cond_prints(guider) -> dict:
    """context_print of every cond entry, by uuid."""
    out = {}
    for entries in (getattr(guider, "conds", None) or {}).values():
        for entry in entries or []:
            if isinstance(entry, dict) and "uuid" in entry and isinstance(entry.get("cross_attn"), torch.Tensor):
                out[entry["uuid"]] = context_print(entry["cross_attn"])
    return out


def _any_cond_has(guider, key: str) -> bool:
    return any(isinstance(entry, dict) and entry.get(key) is not None
               for entries in (getattr(guider, "conds", None) or {}).values() for entry in entries or [])


def _count(value) -> int:
    """A register-token count: an int attribute (SD3) or the token axis of a (1, n, dim) parameter (AuraFlow)."""
    return int(value.shape[1]) if torch.is_tensor(value) and value.ndim == 3 else int(value or 0)


def _patch(family, dm) -> tuple[int, ...]:
    """The DiT's token patch: the registry's, else the diffusion model's ``patch_size`` (an int: square)."""
    if family.patch is not None:
        return tuple(family.patch)
    size = int(getattr(dm, "patch_size", 2) or 2)
    return (size, size)


def _proxy_observer(state_of, text_qk):
    """TEXT_SEEN hook of the text-attention proxies (core.text_attn): q and k recomputed through the module's own
    projections (registry ``text_qk``), captured like a cross-attention call; the module's output is untouched."""

    def seen(layer, x, text, module, to, args):
        state = state_of(to)
        chosen = None if state is None else state.by_key.get(layer)
        if chosen is None:
            return
        try:
            with torch.no_grad():
                q4, k4 = text_qk(module, x, text, args)
                state.cross_capture(chosen, q4, k4, to)
        except Exception as e:  # the maps may be incomplete; the image must not suffer
            state.fail(e)

    return seen


def install_capture(model, layers: str = "all", rows: str = "positive", buckets: int = DEFAULT_BUCKETS,
                    normalise: str = "all_keys"):
    """Clone ``model`` with the capture installed; returns (patched model, record handle)."""
    if rows not in ROW_ROLES:
        raise ValueError(f"rows must be one of {', '.join(ROW_ROLES)}, got {rows!r}.")
    if normalise not in NORMALISE:
        raise ValueError(f"normalise must be one of {', '.join(NORMALISE)}, got {normalise!r}.")
    if not (isinstance(buckets, int) and 1 <= buckets <= MAX_BUCKETS):
        raise ValueError(f"buckets must be a whole number from 1 to {MAX_BUCKETS}, got {buckets!r}: it is how many "
                         f"time slices of the steps keep their own maps (10 = each tenth of the run).")
    ml = model_layers(model, NODE_ID)
    chosen = parse_layers(layers, ml)
    if not chosen:
        raise ValueError(f"layers: no layer chosen. Use 'all' or e.g. '0-3' (this model: {ml.describe()}).")
    dm = model.model.diffusion_model
    modules = {layer.key: dm.get_submodule(layer.module) for layer in chosen} if ml.kind == "unet" else {}
    register = ml.family.register_tokens
    arch = "cross" if ml.family.is_dit_cross else ml.kind
    cfg = CaptureConfig(arch=arch, family=ml.family.name, layers=list(chosen), all_layers=len(ml.layers),
                        rows=rows, buckets=int(buckets), ref_level=min(x.level for x in chosen),
                        patch=_patch(ml.family, dm),
                        register_length=_count(getattr(dm, register, 0)) if register else 0,
                        text_pad=ml.family.text_pad, modules=modules,
                        text_multiple=text_multiple(dm, ml.family), text_last=ml.family.text_last,
                        text_extras=bool(ml.family.text_extras), prompt_last=ml.family.prompt_last,
                        context_first=ml.family.context_first, text_keys=normalise == "text_keys",
                        text_calls={layer.key: text_call(ml, layer) for layer in chosen} if arch == "cross" else {})
    handle = records.RecordHandle("attention", cfg)
    store = f"{STORE}.{handle.serial}"

    m = model.clone()
    runs.ensure_run_tracking(m)
    ensure_layer_tracking(m, ml)

    def outer(executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        guider = executor.class_obj
        run = runs.run_state(guider.model_options)
        if run is None:
            return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        n_steps = int(sigmas.shape[-1]) - 1
        state = run.store(store, lambda: CaptureRun(cfg, _cond_lengths(guider), noise.shape, n_steps,
                                                          _cond_prints(guider)))
        state.appended_frames = _any_cond_has(guider, "time_dim_concat")
        fn = getattr(sampler, "sampler_function", None)
        sampler_name = getattr(fn, "__name__", None) or type(sampler).__name__

        def finish(_run):
            result = state.finish(sampler_name, getattr(guider.model_patcher.model, "latent_format", None))
            if result is not None:
                handle.publish(result)

        run.on_finish(finish)
        out = executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        state.final = out.detach().to("cpu", torch.float32, copy=True)
        return out

    hooks.add_keyed_wrapper(m, WrappersMP.OUTER_SAMPLE, f"{WRAPPER_KEY}.{handle.serial}", outer)

    def state_of(options) -> CaptureRun | None:
        run = runs.run_state(options)
        state = None if run is None else run.peek(store)
        return None if state is None or state.errors else state

    def override(call_next, func, *args, **kwargs):
        to = kwargs.get("transformer_options")
        state = state_of(to) if to else None
        if state is not None:
            try:
                with torch.no_grad():
                    if arch == "unet":
                        state.unet_override(args, kwargs, to)
                    elif arch == "cross":
                        state.cross_override(args, kwargs, to)
                    else:
                        state.dit_override(args, kwargs, to)
            except Exception as e:  # the maps may be incomplete; the image must not suffer
                state.fail(e)
        return call_next(*args, **kwargs)

    hooks.chain_attention_override(m, override)
    if ml.family.text_qk is not None:  # text attention without transformer_options (PixArt, Hunyuan-DiT)
        text_attn.install_proxies(m, chosen, text_attn_paths(ml, chosen), ml.family.flat_text)
        text_attn.set_text_hook(m, text_attn.TEXT_SEEN, f"{WRAPPER_KEY}.{handle.serial}",
                                _proxy_observer(state_of, ml.family.text_qk))

    if ml.kind == "unet":
        def attn2_in(n, context, value, extra_options):
            state = state_of(extra_options)
            if state is not None:
                state.attn2_in(n, context, extra_options)
            return n, context, value

        def attn2_out(n, extra_options):
            state = state_of(extra_options)
            if state is not None:
                try:
                    with torch.no_grad():
                        state.attn2_out()
                except Exception as e:
                    state.fail(e)
            return n

        hooks.set_attn2_patches(m, f"{WRAPPER_KEY}.{handle.serial}", attn2_in, attn2_out)
    return m, handle
