"""Single-slot hooks chained, keyed wrappers and keyed attn2 patches: how every node of the pack patches a model.

* ``chain_*`` install a single-slot hook (``optimized_attention_override``, ``model_function_wrapper``,
  ``sampler_cfg_function``) that calls whatever was installed before, so other packs' hooks keep running.
* :func:`add_keyed_wrapper` replaces the pack's wrapper under a key (re-applying a node never stacks).
* :func:`set_attn2_patches` / :func:`remove_attn2_patches`: the one idiom for ComfyUI's list hooks
  ``attn2_patch`` / ``attn2_output_patch``: every patch of the pack carries a key (:data:`KEY_ATTR`), so a node
  replaces its own earlier patches and never touches anybody else's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

KEY_ATTR = "prompt_anatomy_key"  # attribute naming the pack's key on every list-hook patch it installs
ATTN2_HOOKS = ("attn2_patch", "attn2_output_patch")


def chain_attention_override(model_patcher, fn: Callable) -> None:
    """Install ``fn(call_next, func, *args, **kwargs)`` as the optimized_attention_override of
    ``model_patcher`` (a clone you own). ``call_next(*args, **kwargs)`` runs the previously installed
    override, or the raw backend ``func``; kwargs keep ``_inside_attn_wrapper`` and transformer_options."""
    to = model_patcher.model_options.setdefault("transformer_options", {})
    prev = to.get("optimized_attention_override")

    def override(func, *args, **kwargs):
        def call_next(*a, **kw):
            if prev is not None:
                return prev(func, *a, **kw)
            return func(*a, **kw)

        return fn(call_next, func, *args, **kwargs)

    to["optimized_attention_override"] = override


def chain_model_function_wrapper(model_patcher, fn: Callable) -> None:
    """Install ``fn(apply_model, args)`` as model_function_wrapper, where ``apply_model`` already goes
    through any previously installed wrapper."""
    prev = model_patcher.model_options.get("model_function_wrapper")

    def wrapper(apply_model, args):
        if prev is not None:
            def inner(x, t, **c):
                return prev(apply_model, {"input": x, "timestep": t, "c": c, "cond_or_uncond": args.get("cond_or_uncond")})
        else:
            inner = apply_model
        return fn(inner, args)

    model_patcher.set_model_unet_function_wrapper(wrapper)


def chain_sampler_cfg_function(model_patcher, fn: Callable, disable_cfg1_optimization: bool = False) -> None:
    """Install ``fn(args, previous)`` as sampler_cfg_function; ``previous(args)`` computes what the
    previously installed function (or plain CFG) would return (a noise-like tensor: x - denoised)."""
    prev = model_patcher.model_options.get("sampler_cfg_function")

    def previous(args):
        if prev is not None:
            return prev(args)
        return args["uncond"] + (args["cond"] - args["uncond"]) * args["cond_scale"]

    model_patcher.set_model_sampler_cfg_function(lambda args: fn(args, previous),
                                                 disable_cfg1_optimization=disable_cfg1_optimization)


def add_keyed_wrapper(model_patcher, wrapper_type: str, key: str, fn: Callable) -> None:
    """Replace the pack's wrapper under ``key`` (remove, then add) so re-applying a node never stacks."""
    model_patcher.remove_wrappers_with_key(wrapper_type, key)
    model_patcher.add_wrapper_with_key(wrapper_type, key, fn)


def like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` on ``ref``'s device and dtype (tensors made inside patches follow the incoming tensor)."""
    return t.to(device=ref.device, dtype=ref.dtype)



def keyed(fn: Callable, key: str) -> Callable:
    """Mark ``fn`` as the pack's patch under ``key`` (see :func:`remove_attn2_patches`)."""
    setattr(fn, KEY_ATTR, key)
    return fn


def has_attn2_patch(model_patcher, key: str) -> bool:
    patches = model_patcher.model_options.get("transformer_options", {}).get("patches", {})
    return any(getattr(p, KEY_ATTR, None) == key for kind in ATTN2_HOOKS for p in patches.get(kind, []))


def remove_list_patches(model_patcher, kind: str, key: str) -> None:
    """Remove the pack's patches installed under ``key`` from the list hook ``kind`` (on a clone you own)."""
    plist = model_patcher.model_options.get("transformer_options", {}).get("patches", {}).get(kind)
    if plist:
        plist[:] = [p for p in plist if getattr(p, KEY_ATTR, None) != key]


def remove_attn2_patches(model_patcher, key: str) -> None:
    """Remove the pack's attn2 list-hook patches installed under ``key`` (on a clone you own)."""
    for kind in ATTN2_HOOKS:
        remove_list_patches(model_patcher, kind, key)


def set_attn2_patches(model_patcher, key: str, attn2: Callable | None = None, output: Callable | None = None) -> None:
    """Install ``attn2`` (``fn(n, context, value, extra_options)``) and/or ``output`` (``fn(n, extra_options)``)
    under ``key``, replacing what the pack installed under that key before."""
    remove_attn2_patches(model_patcher, key)
    if attn2 is not None:
        model_patcher.set_model_attn2_patch(keyed(attn2, key))
    if output is not None:
        model_patcher.set_model_attn2_output_patch(keyed(output, key))
