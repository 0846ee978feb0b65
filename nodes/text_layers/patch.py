"""Text layers (paper 2, "Precise Parameter Localization for Textual Generation in Diffusion Models"): the few
cross-/joint-attention layers that decide *what text* is rendered, and four nodes built on them.

* **TextLayerPatch** feeds a target prompt (e.g. the same prompt with "HELLO" replaced by "WORLD") to the
  selected layers only, for a range of sampling steps:

  - UNet (SD1.x / SD2.x / SDXL) — "injection". Every cross-attention layer reads the same text embedding, so
    the selected layers simply take the target's embedding as their context (keys) and value on the selected
    rows. One ``attn2_patch`` (a list hook) does it before the K/V projections, so an attn2 *replace*
    installed by another node (IPAdapter) on the same layer computes its K/V from our tensors.
    Blending inputs before the projection is exact: ``to_k((1-s)·a + s·b) = (1-s)·to_k(a) + s·to_k(b)``.
    A ``heads`` subset needs the *projected* K/V: a chained attention override on the selected layers mixes
    the heads there (see :func:`_unet_heads_override`). An attn2 replace runs the attention itself without
    the override, so a heads subset on a layer an attn2 replace owns raises a clear error.
  - SD3 (MMDiT) / Flux — "patching". Only the first block sees the text encoder's output; every later block
    sees a text stream transformed by the blocks before it, so the target's text keys/values at block i must
    come from the target prompt's own pass. On patched steps an APPLY_MODEL wrapper appends one batch row per
    image that runs the target prompt (same latent, timestep, guidance; target context and pooled vector),
    and a chained attention override swaps the text part of K/V of the source rows for the target rows' in
    the selected blocks. Nothing is cached across calls; outside [start, end] nothing is added.
    Text comes first in both sequences: Flux q,k,v are (B, H, L, D); SD3 q,k are (B, L, H·D), v (B, L, H, D).
  - Wan (DiT cross-attention) — "injection", as on UNets: every block's cross-attention reads the same text
    stream (the encoder's context through the model's per-token ``text_embedding``, the registry's
    ``text_embedder``), so a chained ``patches_replace["dit"][("double_block", i)]`` on each selected block
    calls the block (or the replacement installed before) with the text stream of the selected rows swapped
    for the target prompt's, embedded by the same module (blended with ``strength``). No extra batch row; the
    other blocks, rows and steps get the untouched arguments. A ``heads`` subset needs the projected K/V: a
    chained attention override takes them at the block's text attention call (the registry's ``text_call``).

  - PixArt α / Σ — "injection", as on Wan, without a block replace or an attention hook: the text-attention proxy
    in front of each block's cross_attn (:mod:`..core.text_attn`, an object patch of the clone) runs a TEXT_INPUT
    hook that hands the selected blocks the selected rows' caption replaced by the target's, embedded by the
    model's own ``y_embedder.y_proj``. No heads subset (no attention hook to take projected K/V from).

* **TextLayerWordSubstitute** builds the target conditioning from a prompt and a "word => replacement" list
  (paper 2's toxic-text application: only the text layers see the replacement).
* **LoraLoaderTextLayers** applies only the LoRA weights of the selected layers' attention (paper 2's
  localized fine-tuning).
* **TextLayerLocalize** (:mod:`.localize`) runs paper 2's Algorithm 1 on the user's model.

Layer strings (:func:`parse_layers`): presets ``auto``, ``sdxl_paper``, ``sd3_paper``; UNet ``output.2.1``
(block, id, block_index), ``output.2`` (every depth of that block), global cross-attention indices in forward
order ``55``, ``54-56``; DiT ``joint.10``, ``double.7``, ``single.20``, ``double.3-5``, global block indices.

The settings and target are in :mod:`.patch_settings`, the per-architecture hooks in :mod:`.patch_hooks`.
"""

from __future__ import annotations

import dataclasses
import functools
import uuid

import torch
from comfy.patcher_extension import WrappersMP

from ..core import hooks, runs, text_attn
from ..core.layers import (
    Marker,
    ModelLayers,
    block_kind,
    chain_block_replace,
    ensure_layer_tracking,
    layer_heads,
    layer_label,
    model_layers,
    module_of,
    parse_layers,
    text_call,
    text_embedder,
)
from .patch_hooks import (
    PlanHolder,
    _make_cross_heads_override,
    _make_cross_replace,
    _make_dit_hooks,
    _make_rows_replace,
    _make_target_check,
    _make_text_input,
    _make_unet_hooks,
)
from .patch_settings import (
    ACTIVE_KEY,
    CHECK_KEY,
    HOOK_KEY,
    MARK_KEY,
    RANGE_UNITS,
    ROW_MODES,
    START_MODES,
    WRAPPER_KEY,
    PatchSettings,
    TargetText,
    parse_heads,
    resolve_start,
    step_window,
)

__all__ = ["ACTIVE_KEY", "HOOK_KEY", "RANGE_UNITS", "ROW_MODES", "START_MODES", "PatchSettings", "TargetText",
           "apply_text_layer_patch", "format_report", "parse_heads", "step_window"]


def apply_text_layer_patch(model, target, layers: str | tuple, start_percent: float = 0.0, end_percent: float = 1.0,
                           heads: str | tuple | None = "", strength: float = 1.0, rows: str = "positive",
                           range_unit: str = "step_fraction", start_mode: str = "start_percent"):
    """Clone ``model`` and patch the selected text layers with ``target`` (a CONDITIONING or TargetText).
    ``layers``: a layer string or a tuple of resolved layers. Returns (model, report)."""
    ml = model_layers(model, "TextLayerPatch")
    resolved = parse_layers(layers, ml) if isinstance(layers, str) else tuple(layers)
    head_sel = parse_heads(heads) if (heads is None or isinstance(heads, str)) else tuple(heads)
    start_percent = resolve_start(ml, start_percent, start_mode)
    sigmas = None
    if range_unit == "timestep_percent":
        ms = model.get_model_object("model_sampling")
        sigmas = (float(ms.percent_to_sigma(float(start_percent))), float(ms.percent_to_sigma(float(end_percent))))
    s = PatchSettings(resolved, float(start_percent), float(end_percent), float(strength), head_sel, rows,
                      range_unit, sigmas)
    s.validate()
    tgt = target if isinstance(target, TargetText) else TargetText.from_conditioning(target)
    pad = ml.family.text_pad
    if pad and tgt.tokens < pad:  # the model pads the source the same way (prompt at the end of the stream)
        tgt = dataclasses.replace(tgt, context=torch.nn.functional.pad(tgt.context, (0, 0, pad - tgt.tokens, 0)))
    expected = ml.family.context_width(model)
    if expected is not None and tgt.channels != expected:
        raise ValueError(f"target: the edited prompt's embedding has {tgt.channels} channels but this {ml.label} "
                         f"model takes {expected}: encode the target with this model's CLIP.")
    if s.heads is not None and (ml.family.block_text_swap or ml.family.proxied):
        raise ValueError(f"heads: {ml.label}'s attention runs without ComfyUI's attention hook, so a subset of heads "
                         f"cannot be patched; leave heads empty (the chosen blocks read the edited prompt's whole "
                         f"text stream).")
    if s.heads is not None:
        for layer in s.layers:
            n_heads = layer_heads(model, ml, layer)
            bad = [h for h in s.heads if h >= n_heads]
            if bad:
                raise ValueError(f"heads: {', '.join(map(str, bad))} out of range: layer {layer_label(layer)} has "
                                 f"{n_heads} heads (0-{n_heads - 1}).")
    m = model.clone()
    to = m.model_options.setdefault("transformer_options", {})
    hooks.remove_attn2_patches(m, HOOK_KEY)
    hooks.remove_list_patches(m, text_attn.TEXT_INPUT, HOOK_KEY)
    note = f"start: paper 2's {start_percent:.3f} of the steps for {ml.label} (start_mode=paper)." \
        if start_mode == "paper" else ""  # re-applying replaces the earlier TextLayerPatch
    if s.is_noop():
        to.pop(ACTIVE_KEY, None)
        m.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY)
        m.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, CHECK_KEY)
        return m, _with_note(format_report(ml, s, tgt, noop=True), note)
    token = uuid.uuid4().hex
    to[ACTIVE_KEY] = token
    runs.ensure_run_tracking(m)
    ensure_layer_tracking(m, ml)
    hooks.add_keyed_wrapper(m, WrappersMP.APPLY_MODEL, CHECK_KEY, _make_target_check(tgt, token))
    if ml.kind == "unet":
        modules = {layer: module_of(m, ml.by_key[layer]) for layer in s.layers}
        patch, heads_override, output_patch = _make_unet_hooks(s, tgt, token, modules)
        if s.heads is None:
            hooks.set_attn2_patches(m, HOOK_KEY, patch)
        else:
            m.model_options["transformer_options"][MARK_KEY] = Marker()
            hooks.chain_attention_override(m, heads_override)
            hooks.set_attn2_patches(m, HOOK_KEY, patch, output_patch)
    elif ml.family.block_text_swap:
        holder = PlanHolder()
        wrapper, _ = _make_dit_hooks(s, tgt, token, ml.label, ml.family, holder)
        hooks.add_keyed_wrapper(m, WrappersMP.APPLY_MODEL, WRAPPER_KEY, wrapper)
        for layer in s.layers:
            chain_block_replace(m, ml, layer, functools.partial(_make_rows_replace, s, layer, holder=holder))
    elif ml.family.proxied:
        text_attn.set_text_hook(m, text_attn.TEXT_INPUT, HOOK_KEY,
                                _make_text_input(s, tgt, token, text_embedder(m, ml.family)))
    elif ml.family.is_dit_cross and s.heads is not None:
        embedder = text_embedder(m, ml.family)
        modules = {layer: functools.reduce(getattr, block_kind(ml, layer).text_attn.split("."),
                                           module_of(m, ml.by_key[layer])) for layer in s.layers}
        hooks.chain_attention_override(m, _make_cross_heads_override(
            s, tgt, token, embedder, modules, {layer: text_call(ml, layer) for layer in s.layers}))
    elif ml.family.is_dit_cross:
        embedder = text_embedder(m, ml.family)
        for layer in s.layers:  # an earlier TextLayerPatch's replace stays in the chain, inert (ACTIVE_KEY)
            chain_block_replace(m, ml, layer, functools.partial(_make_cross_replace, s, tgt, token, embedder, layer))
    else:
        wrapper, override = _make_dit_hooks(s, tgt, token, ml.label, ml.family)
        hooks.add_keyed_wrapper(m, WrappersMP.APPLY_MODEL, WRAPPER_KEY, wrapper)
        hooks.chain_attention_override(m, override)
    text_attn.keep_innermost(m)  # a capture's proxies must see the target rows this patch appends
    return m, _with_note(format_report(ml, s, tgt), note)


def _with_note(report: str, note: str) -> str:
    return f"{report}\n{note}" if note else report


def format_report(ml: ModelLayers, s: PatchSettings, target: TargetText, noop: bool = False) -> str:
    method = ("UNet injection: the selected cross-attention layers take the target's keys/values"
              if ml.kind == "unet" else
              "text-stream patching: the target prompt runs as one extra batch row per image on patched steps and "
              "gives its whole text stream to the selected blocks"
              if ml.family.block_text_swap else
              "DiT cross-attention injection: the selected blocks' cross-attention reads the target's text stream"
              if ml.family.is_dit_cross else
              "MMDiT/Flux patching: the target prompt runs as one extra batch row per image on patched steps and "
              "gives its text keys/values to the selected blocks")
    lines = [f"TextLayerPatch · {ml.label} · {method}."]
    if s.layers:
        names = ", ".join(f"{layer_label(layer)} [{ml.index(layer)}]" for layer in s.layers)
        lines.append(f"layers: {names} of {len(ml.layers)} {ml.unit}.")
    else:
        lines.append("layers: none selected.")
    unit = ("of the sampler's steps (step_fraction)" if s.range_unit == "step_fraction" else
            "of ComfyUI's timestep range (timestep_percent: sigma-based, the step count depends on the scheduler)")
    lines.append(f"steps: from {s.start_percent:.3f} to {s.end_percent:.3f} {unit}; rows: {s.rows}; "
                 f"heads: {'all' if s.heads is None else ','.join(map(str, s.heads))}; strength {s.strength:.2f}.")
    lines.append(f"target: {target.tokens} tokens × {target.channels} channels"
                 + ("" if target.pooled is None or ml.kind == "unet" else " (its pooled vector drives the target rows)")
                 + ".")
    if noop:
        lines.append("Nothing to patch (no layers, strength 0 or an empty step range): the model is unchanged.")
    return "\n".join(lines)
