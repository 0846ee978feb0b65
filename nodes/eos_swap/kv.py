"""Key-only / value-only substitution (paper 1, App. G) on UNet cross-attention, and the model checks of the EOS
swap (does the MODEL take this CLIP's conditioning?)."""

from __future__ import annotations

import torch

from ..core import families, hooks, runs
from ..core.errors import InternalError
from ..shared.tokens import Layout
from .steps import in_window

KV_HOOK_KEY = "prompt_anatomy.eos_swap.kv"  # + one suffix per swap: two swaps on one model both apply


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
    if kv != "key_and_value" and fam is not None and fam.is_dit_cross:
        raise ValueError(
            f"kv={kv} needs a UNet model (SD1.x, SD2.x, SDXL): the key/value split patches UNet cross-attention only, "
            f"and {fam.attention_name} read the text through the model's own text embedding first, which this split "
            f"does not reach yet. Use kv=key_and_value with this model.")
    if kv != "key_and_value" and (fam is None or not fam.is_unet):
        why = (fam.attention_name or f"{fam.label}'s transformer") if fam is not None else \
            f"{families.config_name(model)}'s transformer"
        raise ValueError(
            f"kv={kv} needs a UNet model (SD1.x, SD2.x, SDXL) with separate cross-attention: {why} attend jointly over "
            f"text and image tokens and transform the text stream in every block, so there is no single text context "
            f"whose keys and values could be split. Use kv=key_and_value with this model.")


def find_chunks(row: torch.Tensor, base: torch.Tensor) -> list[int]:
    """Token offsets where ``base`` (L, C) occurs in ``row`` (N, C), non-overlapping, in order: the chunks of a
    context that are ``base`` itself — its LCM repeats (batched with a longer cond) and its place inside a
    ConditioningConcat result, wherever it sits. Candidates are the offsets whose first token equals base's first
    token (cheap), then the whole chunk is compared exactly."""
    length = base.shape[0]
    if row.shape[0] < length:
        return []
    starts = torch.nonzero((row[: row.shape[0] - length + 1] == base[0]).all(dim=-1)).reshape(-1).tolist()
    found, free = [], 0
    for o in starts:
        if o >= free and torch.equal(row[o:o + length], base):
            found.append(o)
            free = o + length
    return found


def make_kv_patch(kv: str, pairs: list[tuple[torch.Tensor, torch.Tensor]], sigma_start: float, sigma_end: float,
                  step_range: tuple[float, float] | None = None):
    """attn2_patch giving the cross-attention keys (key_only) or values (value_only) the constructed context
    on the positive rows, inside [sigma_end, sigma_start]; the other projection keeps seeing ``base``. Only the
    token chunks that equal ``base`` are replaced (by the constructed chunk): LCM repeats of it, and its place in
    a ConditioningConcat result; every other chunk of the row (e.g. an appended ", high quality") passes through
    bit-identical. ``pairs``: (base, constructed), each (1, L, C). ``step_range``: (start, end) fractions of the
    sampler's steps (range_unit step_fraction) instead of the sigma bounds."""
    if kv not in ("key_only", "value_only"):
        raise InternalError(f"kv patch for {kv!r}")
    for base, cons in pairs:
        if base.shape != cons.shape:
            raise InternalError(f"kv pair of shapes {tuple(base.shape)} / {tuple(cons.shape)}")
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
        if step_range is not None:
            run, step = runs.run_state(extra_options), runs.current_step(extra_options)
            if run is None or step is None or run.sample_sigmas is None or \
                    not in_window(*step_range, step, run.sample_sigmas):
                return n, context, value
        mask = runs.row_mask(extra_options, context.shape[0])
        new = None
        for r in torch.nonzero(mask).reshape(-1).tolist():
            row = context[r]
            for base, cons in pairs:
                offsets = find_chunks(row, cast(base, row))
                if not offsets:
                    continue
                if new is None:
                    new = (context if kv == "key_only" else value).clone()
                c, length = cast(cons, row), base.shape[1]
                for o in offsets:
                    new[r, o:o + length] = c
                break
        if new is None:
            return n, context, value
        return (n, new, value) if kv == "key_only" else (n, context, new)

    return patch
