"""Text attention of DiTs that offer no hook for it (PixArt; Hunyuan-DiT's attention weights): the pack wraps each
block's text-attention module with a :class:`TextAttentionProxy`, installed as a ComfyUI *object patch* of the
clone (``ModelPatcher.add_object_patch``: set while the clone's model is patched, restored when it is unpatched).

The proxy shares the wrapped module's children (the same ``_modules`` dict), so state-dict keys, weight patches
(LoRA) and ComfyUI's weight loading see the same modules under the same names; it calls the wrapped module (or the
object patch installed there before) for the output, never its own copy of the model code. Around that call it runs
the pack's list hooks of the running model call (``transformer_options["patches"]``, keyed like the attn2 patches):

* :data:`TEXT_INPUT` ``fn(layer, x, text, module, to) -> text`` may replace the text the module reads (TextLayerPatch);
* :data:`TEXT_SEEN` ``fn(layer, x, text, module, to, args)`` sees what it reads (CrossAttentionCapture).

``text`` is (B, L, C) with one row per batch row of ``x``: families whose blocks get the whole batch's text as one
row (registry ``flat_text``: PixArt) are unflattened for the hooks and flattened back. The running model call's
transformer_options reach the proxy through a context variable that a keyed APPLY_MODEL wrapper, kept innermost
(:func:`keep_innermost`), sets around the call (the blocks are handed none).
"""

from __future__ import annotations

import contextvars

import torch
from comfy.patcher_extension import WrappersMP

from . import PACK, hooks
from .errors import InternalError

TEXT_INPUT = f"{PACK}.text_input"  # transformer_options["patches"] kind: hooks that replace a block's text
TEXT_SEEN = f"{PACK}.text_seen"  # ... hooks that see the text a block's text attention reads
CALL_KEY = f"{PACK}.text_attn_call"  # APPLY_MODEL wrapper key: sets the running call's transformer_options
_RUNNING: contextvars.ContextVar = contextvars.ContextVar(f"{PACK}.running_options", default=None)


class TextAttentionProxy(torch.nn.Module):
    """Stands where a block's text-attention module was; runs the pack's hooks and then that module."""

    def __init__(self, inner: torch.nn.Module, layer: tuple, flat_text: bool):
        super().__init__()
        object.__setattr__(self, "inner", inner)  # not a child: the proxy shows the module's own children instead
        object.__setattr__(self, "_modules", inner._modules)  # the same dict, so a child replaced later (another
        #                                         node's object patch of a child) is the one both see
        self.layer, self.flat_text = tuple(layer), bool(flat_text)

    def forward(self, x, text, *args, **kwargs):
        to = _RUNNING.get()
        patches = (to or {}).get("patches") or {}
        if not (patches.get(TEXT_INPUT) or patches.get(TEXT_SEEN)):
            return self.inner(x, text, *args, **kwargs)
        rows = self._rows(x, text)
        for fn in patches.get(TEXT_INPUT) or ():
            rows = fn(self.layer, x, rows, self.inner, to)
        for fn in patches.get(TEXT_SEEN) or ():
            fn(self.layer, x, rows, self.inner, to, args)
        return self.inner(x, rows.reshape(1, -1, rows.shape[-1]) if self.flat_text else rows, *args, **kwargs)

    def _rows(self, x, text) -> torch.Tensor:
        if not self.flat_text:
            return text
        b = x.shape[0]
        if text.shape[0] != 1 or text.shape[1] % b:
            raise InternalError(f"{text.shape[1]} text tokens in one row cannot be split over {b} batch rows")
        return text.reshape(b, -1, text.shape[-1])


def _running_options(executor, *args, **kwargs):
    """APPLY_MODEL wrapper: the model call's transformer_options visible to the proxies while it runs."""
    to = kwargs.get("transformer_options", args[5] if len(args) > 5 else None)
    token = _RUNNING.set(to if isinstance(to, dict) else None)
    try:
        return executor(*args, **kwargs)
    finally:
        _RUNNING.reset(token)


def install_proxies(model_patcher, layers, module_paths: dict, flat_text: bool) -> None:
    """Wrap the text-attention module of every layer (``module_paths``: layer key -> path under the ModelPatcher's
    model) in a proxy, as object patches of ``model_patcher`` (a clone you own), plus the wrapper that hands them
    the running call's transformer_options. Idempotent; an object patch already there stays inside the proxy."""
    hooks.add_keyed_wrapper(model_patcher, WrappersMP.APPLY_MODEL, CALL_KEY, _running_options)  # innermost, once
    for layer in layers:
        path = module_paths[tuple(layer)]
        current = model_patcher.get_model_object(path)
        if not isinstance(current, TextAttentionProxy):
            model_patcher.add_object_patch(path, TextAttentionProxy(current, layer, flat_text))


def keep_innermost(model_patcher) -> None:
    """Move the proxies' APPLY_MODEL wrapper (if installed) inside every other APPLY_MODEL wrapper, so the proxies see
    the transformer_options the model is called with, also after a wrapper that copies them (TextLayerPatch's
    target rows). Call after adding an APPLY_MODEL wrapper to a model that may carry proxies."""
    if model_patcher.get_wrappers(WrappersMP.APPLY_MODEL, CALL_KEY):
        hooks.add_keyed_wrapper(model_patcher, WrappersMP.APPLY_MODEL, CALL_KEY, _running_options)


def set_text_hook(model_patcher, kind: str, key: str, fn) -> None:
    """Install ``fn`` as the pack's ``kind`` hook (:data:`TEXT_INPUT` / :data:`TEXT_SEEN`) under ``key``,
    replacing the one installed under that key before."""
    hooks.remove_list_patches(model_patcher, kind, key)
    model_patcher.set_model_patch(hooks.keyed(fn, key), kind)
