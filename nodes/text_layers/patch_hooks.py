"""TextLayerPatch's model hooks, one set per architecture: the UNet attn2 patches and heads override
(injection), the Wan block replace and heads override (injection into the text stream), and the MMDiT / Flux
APPLY_MODEL wrapper that appends the target rows with the attention override that swaps their text K/V in."""

from __future__ import annotations

import math

import torch

from ..core import hooks, runs
from ..core.errors import InternalError
from ..core.layers import (
    FRONT_LEN_KEY,
    LAYER_KEY,
    TXT_LEN_KEY,
    CallCounter,
    current_attn2_layer,
    layer_label,
    running_dit_layer,
)
from .patch_settings import ACTIVE_KEY, HOOK_KEY, MARK_KEY, PLAN_KEY, TARGET_UUID, PatchSettings, TargetText, _is_active


# ----------------------------------------------------------------------------------------------
# tensor helpers (pure)
# ----------------------------------------------------------------------------------------------
def blend(a: torch.Tensor, b: torch.Tensor, strength: float) -> torch.Tensor:
    """(1 - s)·a + s·b, exactly b for s = 1 and exactly a for s = 0."""
    if strength >= 1.0:
        return b
    if strength <= 0.0:
        return a
    return torch.lerp(a, b.to(a.dtype), strength)


def repeat_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    """Repeat the token axis (dim 1) of x to ``length`` (a multiple of its length), as ComfyUI's CONDCrossAttn
    does to batch prompts of different lengths (repeating every token leaves softmax attention unchanged)."""
    n = x.shape[1]
    if n == length:
        return x
    if length % n:
        raise ValueError(f"internal: {n} tokens cannot be repeated to {length}")
    return x.repeat(1, length // n, *([1] * (x.ndim - 2)))


def match_token_lengths(source_len: int, target_len: int) -> int:
    """Common token length of a source context and the target (the LCM; the source length when it is already a
    multiple of the target's, so the source rows keep their tensors)."""
    return source_len if source_len % target_len == 0 else math.lcm(source_len, target_len)


def split_front(txt: torch.Tensor, front: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens in front of the text, the text) of a block's txt (Wan I2V: [CLIP-vision tokens, text])."""
    if not 0 <= front < txt.shape[1]:
        raise InternalError(f"{front} tokens in front of the text, but the block's text stream has {txt.shape[1]}")
    return txt[:, :front], txt[:, front:]


def head_mask(heads: tuple[int, ...], n_heads: int, dim: int, device) -> torch.Tensor:
    """Boolean mask over the ``n_heads * dim`` channels of a (.., H·D) tensor: True on the selected heads."""
    mask = torch.zeros(n_heads, dim, dtype=torch.bool, device=device)
    mask[list(heads)] = True
    return mask.reshape(-1)


# ----------------------------------------------------------------------------------------------
# the hooks
# ----------------------------------------------------------------------------------------------
def _check_channels(target: TargetText, channels: int, where: str) -> None:
    if target.channels != channels:
        raise ValueError(f"target: the edited prompt's embedding has {target.channels} channels but the model's "
                         f"{where} has {channels}: encode the target with the same CLIP as the positive prompt.")


def _make_unet_hooks(s: PatchSettings, target: TargetText, token: str, modules: dict):
    layer_set = frozenset(s.layers)
    roles = s.roles

    def current(extra_options):
        block = extra_options.get("block")
        if block is None:
            return None
        layer = (block[0], block[1], extra_options.get("block_index", 0))
        return layer if layer in layer_set else None

    def rows_of(to, n_rows, device):
        return runs.row_mask(to, n_rows, roles, device=device)

    def attn2_patch(n, context, value, extra_options):
        layer = current(extra_options)
        if layer is None or not _is_active(extra_options, s, token):
            return n, context, value
        rows = rows_of(extra_options, context.shape[0], context.device)
        if not bool(rows.any()):
            return n, context, value
        if s.heads is not None:  # projected K/V needed: the attention override does it
            return n, context, value
        _check_channels(target, context.shape[-1], f"cross-attention context at {layer_label(layer)}")
        tgt = hooks.like(target.context, context)
        length = match_token_lengths(context.shape[1], tgt.shape[1])
        same = value is context
        context = repeat_tokens(context, length)
        value = context if same else repeat_tokens(value, length)
        tgt = repeat_tokens(tgt, length)
        sel = rows[:, None, None]
        new_context = torch.where(sel, blend(context, tgt.expand_as(context), s.strength), context)
        new_value = new_context if same else torch.where(sel, blend(value, tgt.expand_as(value), s.strength), value)
        return n, new_context, new_value


    def heads_override(call_next, func, *args, **kwargs):
        to = kwargs.get("transformer_options") or {}
        layer = current_attn2_layer(to)
        if layer is None or layer not in layer_set or not _is_active(to, s, token):
            return call_next(*args, **kwargs)
        mark = to.get(MARK_KEY)
        if mark is not None:
            mark.layer = layer
        q, k, v = args[0], args[1], args[2]
        n_heads = args[3] if len(args) > 3 else kwargs["heads"]
        rows = rows_of(to, k.shape[0], k.device)
        if not bool(rows.any()):
            return call_next(*args, **kwargs)
        attn = modules[layer]
        _check_channels(target, attn.to_k.in_features if hasattr(attn.to_k, "in_features") else target.channels,
                        f"cross-attention at {layer_label(layer)}")
        tgt = hooks.like(target.context, k)
        k_t, v_t = attn.to_k(tgt), attn.to_v(tgt)
        length = match_token_lengths(k.shape[1], k_t.shape[1])
        k, v = repeat_tokens(k, length), repeat_tokens(v, length)
        k_t, v_t = repeat_tokens(k_t, length).to(k.dtype), repeat_tokens(v_t, length).to(v.dtype)
        dim = k.shape[-1] // n_heads
        sel = rows[:, None, None] & head_mask(s.heads, n_heads, dim, k.device)[None, None, :]
        k2 = torch.where(sel, blend(k, k_t.expand_as(k), s.strength), k)
        v2 = torch.where(sel, blend(v, v_t.expand_as(v), s.strength), v)
        return call_next(q, k2, v2, *args[3:], **kwargs)

    def heads_output_patch(n, extra_options):
        layer = current(extra_options)
        mark = extra_options.get(MARK_KEY)
        if layer is not None and mark is not None and _is_active(extra_options, s, token):
            reached, mark.layer = mark.layer, None
            if reached != layer and bool(rows_of(extra_options, n.shape[0], n.device).any()):
                raise ValueError(
                    f"heads: TextLayerPatch with a heads subset could not reach the attention of layer "
                    f"{layer_label(layer)}: another node (e.g. IPAdapter) replaced that cross-attention and computes it "
                    f"without ComfyUI's attention hook. Leave 'heads' empty (all heads: the patch then works through "
                    f"the replacement's keys/values) or choose other layers.")
        return n

    return attn2_patch, heads_override, heads_output_patch


class _DitPlan:
    """One model call of a patched DiT: source rows and the appended target rows that give their text K/V."""

    __slots__ = ("src", "tgt", "done")

    def __init__(self, src: torch.Tensor, tgt: torch.Tensor):
        self.src, self.tgt, self.done = src, tgt, set()


class PlanHolder:
    """The _DitPlan of the model call running now, for block replaces that are handed no transformer_options
    (Hunyuan-DiT): the patch's APPLY_MODEL wrapper sets it around the call."""

    __slots__ = ("plan",)

    def __init__(self):
        self.plan = None


def rows_extend(value, index: torch.Tensor, n_rows: int):
    """``value`` with the rows ``index`` appended, for every tensor (also inside lists, tuples and dicts) whose
    first dimension is the batch ``n_rows``; other values unchanged."""
    if torch.is_tensor(value):
        if value.ndim >= 1 and value.shape[0] == n_rows:
            return torch.cat([value, value.index_select(0, index.to(value.device))], 0)
        return value
    if isinstance(value, list):
        return [rows_extend(v, index, n_rows) for v in value]
    if isinstance(value, tuple):
        return tuple(rows_extend(v, index, n_rows) for v in value)
    if isinstance(value, dict):
        return {k: rows_extend(v, index, n_rows) for k, v in value.items()}
    return value


def swap_text(t: torch.Tensor, plan: _DitPlan, txt_len: int, layout: str, heads: tuple | None, n_heads: int,
              strength: float, text_last: bool = False) -> torch.Tensor:
    """``t`` (keys or values of a joint attention call) with the text tokens of the source rows taken (blended)
    from the target rows. layout: 'bhld' (Flux), 'blc' (SD3 q/k: (B, L, H·D)), 'blhd' (SD3 v); the text is the
    first ``txt_len`` tokens, or the last ones (``text_last``: HunyuanImage 2.1, HunyuanVideo 1.5)."""
    tok_dim = 2 if layout == "bhld" else 1
    first = t.shape[tok_dim] - txt_len if text_last else 0
    src, tgt = plan.src.to(t.device), plan.tgt.to(t.device)
    a = t.index_select(0, src).narrow(tok_dim, first, txt_len)
    b = t.index_select(0, tgt).narrow(tok_dim, first, txt_len)
    mixed = blend(a, b, strength)
    if heads is not None:
        if layout == "bhld":
            hm = torch.zeros(t.shape[1], dtype=torch.bool, device=t.device)
            hm[list(heads)] = True
            hm = hm[None, :, None, None]
        elif layout == "blhd":
            hm = torch.zeros(t.shape[2], dtype=torch.bool, device=t.device)
            hm[list(heads)] = True
            hm = hm[None, None, :, None]
        else:
            hm = head_mask(heads, n_heads, t.shape[-1] // n_heads, t.device)[None, None, :]
        mixed = torch.where(hm, mixed, a)
    out = t.clone()
    out.narrow(tok_dim, first, txt_len)[src] = mixed
    return out


def _make_target_check(target: TargetText, token: str):
    """An APPLY_MODEL wrapper that refuses a target identical to the negative prompt's context (an empty target
    prompt with an empty negative prompt, or the negative wired as the target): the patched layers would see the
    negative prompt. One comparison per negative chunk while the patch is in force."""

    def check(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        to = transformer_options
        chunks = runs.chunk_roles(to) if c_crossattn is not None and to.get(ACTIVE_KEY) == token else []
        if chunks and "negative" in chunks and c_crossattn.shape[0] % len(chunks) == 0 \
                and tuple(c_crossattn.shape[1:]) == tuple(target.context.shape[1:]):
            per = c_crossattn.shape[0] // len(chunks)
            tgt = hooks.like(target.context, c_crossattn)[0]
            if any(role == "negative" and torch.equal(c_crossattn[j * per], tgt) for j, role in enumerate(chunks)):
                raise ValueError("target: the edited prompt's conditioning is identical to the negative prompt's, so "
                                 "the patched layers would see the negative prompt (an empty target prompt does this "
                                 "when the negative prompt is empty too). Connect the edited prompt, e.g. Text Layer "
                                 "Word Substitute's target output, to TextLayerPatch's target.")
        return executor(x, t, c_concat, c_crossattn, control, to, **kwargs)

    return check


def _make_cross_replace(s: PatchSettings, target: TargetText, token: str, embedder, layer, previous):
    """The ("double_block", i) replace of one selected DiT cross-attention block: the block runs with the text
    stream of the selected rows taken from the target prompt (``embedder`` = the model's per-token text
    embedding), on the patched steps only; tokens in front of the text (Wan I2V's CLIP-vision tokens) stay the
    source's. ``previous`` (a replacement installed before) keeps running."""

    def run(args, extra):
        return previous(args, extra) if previous is not None else extra["original_block"](args)

    def replace(args, extra):
        to = args.get("transformer_options") or {}
        txt = args.get("txt")
        if txt is None or not _is_active(to, s, token):
            return run(args, extra)
        rows = runs.row_mask(to, txt.shape[0], s.roles, device=txt.device)
        if not bool(rows.any()):
            return run(args, extra)
        front, text = split_front(txt, to.get(FRONT_LEN_KEY) or 0)
        text = inject_text(text, rows, target, embedder, s.strength)
        args = dict(args, txt=torch.cat((front, text), dim=1) if front.shape[1] else text)
        return run(args, extra)

    return hooks.keyed(replace, f"{HOOK_KEY}.{layer_label(layer)}")


def inject_text(text: torch.Tensor, rows: torch.Tensor, target: TargetText, embedder, strength: float) -> torch.Tensor:
    """A DiT cross-attention text stream (B, L, C) with the ``rows`` taken (blended) from the target prompt's
    context through ``embedder`` (the model's per-token text embedding); both repeated to a common length."""
    tgt = embedder(hooks.like(target.context, text)).to(text.dtype)
    length = match_token_lengths(text.shape[1], tgt.shape[1])
    src = repeat_tokens(text, length)
    tgt = repeat_tokens(tgt, length).expand(src.shape[0], -1, -1)
    return torch.where(rows[:, None, None], blend(src, tgt, strength), src)


def _make_text_input(s: PatchSettings, target: TargetText, token: str, embedder):
    """The TEXT_INPUT hook of the text-attention proxies (core.text_attn; PixArt): a selected block's cross-attention
    reads the target's text stream on the selected rows, on the patched steps only."""
    layer_set = frozenset(s.layers)

    def text_input(layer, x, text, module, to):
        if layer not in layer_set or not _is_active(to, s, token):
            return text
        rows = runs.row_mask(to, text.shape[0], s.roles, device=text.device)
        return inject_text(text, rows, target, embedder, s.strength) if bool(rows.any()) else text

    return text_input


def _make_cross_heads_override(s: PatchSettings, target: TargetText, token: str, embedder, modules: dict,
                               text_calls: dict):
    """A heads subset on DiT cross-attention (Wan): at the text attention call of a selected block (the registry's
    ``text_call``, counted per block run), the selected rows' keys/values of the chosen heads are taken (blended)
    from the target's, projected by that block's own ``k``/``norm_k`` and ``v``."""
    layer_set = frozenset(s.layers)
    counter = CallCounter()

    def override(call_next, func, *args, **kwargs):
        to = kwargs.get("transformer_options") or {}
        layer = to.get(LAYER_KEY)
        if layer is None:
            return call_next(*args, **kwargs)
        ordinal = counter.next(to)
        if layer not in layer_set or ordinal != text_calls[layer] or not _is_active(to, s, token):
            return call_next(*args, **kwargs)
        q, k, v = args[0], args[1], args[2]
        n_heads = args[3] if len(args) > 3 else kwargs["heads"]
        rows = runs.row_mask(to, k.shape[0], s.roles, device=k.device)
        if not bool(rows.any()):
            return call_next(*args, **kwargs)
        attn = modules[layer]  # WanT2VCrossAttention: k = norm_k(k(context)), v = v(context)
        tgt = embedder(hooks.like(target.context, k))
        k_t, v_t = attn.norm_k(attn.k(tgt)), attn.v(tgt)
        length = match_token_lengths(k.shape[1], k_t.shape[1])
        k, v = repeat_tokens(k, length), repeat_tokens(v, length)
        k_t, v_t = repeat_tokens(k_t, length).to(k.dtype), repeat_tokens(v_t, length).to(v.dtype)
        sel = rows[:, None, None] & head_mask(s.heads, n_heads, k.shape[-1] // n_heads, k.device)[None, None, :]
        k2 = torch.where(sel, blend(k, k_t.expand_as(k), s.strength), k)
        v2 = torch.where(sel, blend(v, v_t.expand_as(v), s.strength), v)
        return call_next(q, k2, v2, *args[3:], **kwargs)

    return override


def _target_extras(family, target: TargetText, kwargs: dict, n: int, extra: int) -> dict:
    """The model inputs of the target rows that come from the target's conditioning besides its context (the
    registry's ``text_extras``, e.g. HunyuanImage's ByT5 glyph states): the source rows' ones plus the target's."""
    out = {}
    for cond_key, model_key in family.text_extras:
        have, want = kwargs.get(model_key), target.extras.get(cond_key)
        if have is None and want is None:
            continue
        if have is None or want is None or tuple(have.shape[1:]) != tuple(want.shape[1:]):
            def shape(v):
                return "none" if v is None else "x".join(map(str, v.shape[1:]))

            raise ValueError(
                f"target: on {family.label} the prompt also reaches the model through '{cond_key}' (more text tokens, "
                f"swapped with the prompt's token for token); the edited prompt gives {shape(want)} and the prompt it "
                f"edits {shape(have)}. To match them, {family.text_extras_hint}.")
        out[model_key] = torch.cat([have[:n], hooks.like(want, have).expand(extra, *want.shape[1:])], 0)
    return out


def _make_rows_replace(s: PatchSettings, layer, previous, holder: PlanHolder):
    """The ("double_block", i) replace of one selected block of a model whose attention no hook sees (Hunyuan-DiT):
    the source rows' text stream becomes the appended target rows' (which the model built from the target's
    conditioning itself), blended by ``strength``; ``previous`` (a replacement installed before) keeps running."""

    def run(args, extra):
        return previous(args, extra) if previous is not None else extra["original_block"](args)

    def replace(args, extra):
        plan, txt = holder.plan, args.get("txt")
        if plan is None or txt is None or layer in plan.done:
            return run(args, extra)
        plan.done.add(layer)
        src, tgt = plan.src.to(txt.device), plan.tgt.to(txt.device)
        swapped = txt.clone()
        swapped[src] = blend(txt[src], txt[tgt], s.strength)
        return run(dict(args, txt=swapped), extra)

    return hooks.keyed(replace, f"{HOOK_KEY}.{layer_label(layer)}")


def _make_dit_hooks(s: PatchSettings, target: TargetText, token: str, label: str, family,
                    holder: PlanHolder | None = None):
    layer_set = frozenset(s.layers)
    roles = s.roles

    def apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        to = transformer_options
        chunks = runs.chunk_roles(to)
        n = x.shape[0]
        if c_crossattn is None or not chunks or n % len(chunks) or not _is_active(to, s, token):
            return executor(x, t, c_concat, c_crossattn, control, to, **kwargs)
        per = n // len(chunks)
        selected = [j for j, role in enumerate(chunks) if role in roles]
        if not selected:
            return executor(x, t, c_concat, c_crossattn, control, to, **kwargs)
        _check_channels(target, c_crossattn.shape[-1], "text context")
        if target.tokens != c_crossattn.shape[1]:
            raise ValueError(
                f"target: the edited prompt encodes to {target.tokens} text tokens but the prompt it edits has "
                f"{c_crossattn.shape[1]}. On {label} the text keys/values are swapped token for token, so both "
                f"prompts must encode to the same length: keep them about as long (each within one chunk of its "
                f"text encoders).")
        # one group of target rows per distinct latent among the selected chunks (CFG: one per image)
        groups: list[tuple[int, list[int]]] = []
        for j in selected:
            xj = x[j * per:(j + 1) * per]
            for g in groups:
                if torch.equal(x[g[0] * per:(g[0] + 1) * per], xj):
                    g[1].append(j)
                    break
            else:
                groups.append((j, [j]))
        copy, src, tgt = [], [], []
        for gi, (j0, members) in enumerate(groups):
            copy.extend(range(j0 * per, (j0 + 1) * per))
            for j in members:
                src.extend(range(j * per, (j + 1) * per))
                tgt.extend(range(n + gi * per, n + (gi + 1) * per))
        index = torch.tensor(copy, dtype=torch.long, device=x.device)
        extra = len(copy)
        x2 = torch.cat([x, x.index_select(0, index)], 0)
        t2 = rows_extend(t, index, n)
        c2 = torch.cat([c_crossattn, hooks.like(target.context, c_crossattn).expand(extra, -1, -1)], 0)
        kwargs2 = {k: rows_extend(v, index, n) for k, v in kwargs.items()}
        kwargs2.update(_target_extras(family, target, kwargs, n, extra))
        y = kwargs.get("y")
        if target.pooled is not None and torch.is_tensor(y) and y.ndim == 2 and y.shape[0] == n:
            if target.pooled.shape[-1] != y.shape[-1]:
                raise ValueError(f"target: the edited prompt's pooled vector has {target.pooled.shape[-1]} channels, "
                                 f"the model's has {y.shape[-1]}: encode it with the same CLIP as the positive prompt.")
            kwargs2["y"] = torch.cat([y, hooks.like(target.pooled, y).expand(extra, -1)], 0)
        to2 = dict(to)
        coc = list(to.get("cond_or_uncond") or [])
        uuids = list(to.get("uuids") or [])
        for j0, _ in groups:
            coc.append(coc[j0] if j0 < len(coc) else 0)
            uuids.append(TARGET_UUID)
        to2["cond_or_uncond"], to2["uuids"] = coc, uuids
        plan = _DitPlan(torch.tensor(src, dtype=torch.long), torch.tensor(tgt, dtype=torch.long))
        to2[PLAN_KEY] = plan
        if holder is not None:
            holder.plan = plan
        try:
            out = executor(x2, t2, rows_extend(c_concat, index, n), c2, rows_extend(control, index, n), to2, **kwargs2)
        finally:
            if holder is not None:
                holder.plan = None
        missing = [layer for layer in s.layers if layer not in plan.done]
        if missing:
            raise ValueError(
                f"layers: TextLayerPatch could not reach the attention of {', '.join(map(layer_label, missing))}: "
                f"another node replaced those blocks without running their attention through ComfyUI's attention "
                f"hook. Remove that node or choose other blocks.")
        return out[:n]

    calls = CallCounter()

    def override(call_next, func, *args, **kwargs):
        to = kwargs.get("transformer_options") or {}
        layer = running_dit_layer(to, calls)  # first: counted models need every call
        plan = to.get(PLAN_KEY)
        if plan is None or layer not in layer_set or layer in plan.done or to.get(ACTIVE_KEY) != token:
            return call_next(*args, **kwargs)
        plan.done.add(layer)  # the first attention call of a block is the joint one (SD3.5's 2nd is image-only)
        txt_len = to.get(TXT_LEN_KEY)
        q, k, v = args[0], args[1], args[2]
        n_heads = args[3] if len(args) > 3 else kwargs.get("heads")
        if kwargs.get("skip_reshape"):
            k_layout = v_layout = "bhld"
        else:
            k_layout, v_layout = "blc", ("blhd" if v.ndim == 4 else "blc")
        k2 = swap_text(k, plan, txt_len, k_layout, s.heads, n_heads, s.strength, family.text_last)
        v2 = swap_text(v, plan, txt_len, v_layout, s.heads, n_heads, s.strength, family.text_last)
        return call_next(q, k2, v2, *args[3:], **kwargs)

    return apply_model, override
