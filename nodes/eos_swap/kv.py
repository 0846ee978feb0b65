"""Key-only / value-only substitution (paper 1, App. G) on UNet cross-attention, and the model checks of the EOS
swap (does the MODEL take this CLIP's conditioning?)."""

from __future__ import annotations

import torch

from ..core import families, hooks, runs
from ..core.errors import InternalError
from ..shared.tokens import Layout

KV_HOOK_KEY = "prompt_anatomy.eos_swap.kv"


def check_model(layout: Layout, model, kv: str, channels: int) -> None:
    """Raise ValueError when ``model`` cannot take this CLIP's conditioning, or cannot do ``kv``."""
    fam = families.lookup(model)
    if fam is not None and fam.encoders != layout.family.encoders:
        raise ValueError(f"model is {fam.label} but clip is the {layout.label} text encoder: their conditioning does "
                         f"not fit. Connect the CLIP and MODEL of the same checkpoint / model family.")
    width = fam.context_width(model) if fam is not None else None
    if width is not None and width != channels:
        raise ValueError(f"model expects {width}-channel text context but clip ({layout.label}) gives {channels} "
                         f"channels: connect the CLIP and MODEL of the same model family.")
    if kv != "key_and_value" and (fam is None or not fam.is_unet):
        why = (fam.attention_name or f"{fam.label}'s transformer") if fam is not None else \
            f"{families.config_name(model)}'s transformer"
        raise ValueError(
            f"kv={kv} needs a UNet model (SD1.x, SD2.x, SDXL) with separate cross-attention: {why} attend jointly over "
            f"text and image tokens and transform the text stream in every block, so there is no single text context "
            f"whose keys and values could be split. Use kv=key_and_value with this model.")


def make_kv_patch(kv: str, pairs: list[tuple[torch.Tensor, torch.Tensor]], sigma_start: float, sigma_end: float):
    """attn2_patch giving the cross-attention keys (key_only) or values (value_only) the constructed context
    on the positive rows that carry ``base`` (their context starts with it; LCM repeats are matched), inside
    [sigma_end, sigma_start]; the other projection keeps seeing ``base``. ``pairs``: (base, constructed)."""
    if kv not in ("key_only", "value_only"):
        raise InternalError(f"kv patch for {kv!r}")
    cache: dict = {}

    def cast(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        key = (id(t), ref.device, ref.dtype)
        if key not in cache:
            cache[key] = hooks.like(t[0], ref)
        return cache[key]

    def patch(n, context, value, extra_options):
        sig = extra_options.get("sigmas")
        if sig is None or context is None:
            return n, context, value
        s = float(sig.reshape(-1)[0])
        if s > sigma_start or s < sigma_end:
            return n, context, value
        mask = runs.row_mask(extra_options, context.shape[0])
        new = None
        for r in torch.nonzero(mask).reshape(-1).tolist():
            row = context[r]
            for base, cons in pairs:
                length = base.shape[1]
                if row.shape[0] % length or not torch.equal(row[:length], cast(base, row)):
                    continue
                if new is None:
                    new = (context if kv == "key_only" else value).clone()
                new[r] = cast(cons, row).repeat(row.shape[0] // length, 1)
                break
        if new is None:
            return n, context, value
        return (n, new, value) if kv == "key_only" else (n, context, new)

    return patch


