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

* **TextLayerWordSubstitute** builds the target conditioning from a prompt and a "word => replacement" list
  (paper 2's toxic-text application: only the text layers see the replacement).
* **LoraLoaderTextLayers** applies only the LoRA weights of the selected layers' attention (paper 2's
  localized fine-tuning).
* **TextLayerLocalize** (:mod:`.localize`) runs paper 2's Algorithm 1 on the user's model.

Layer strings (:func:`parse_layers`): presets ``auto``, ``sdxl_paper``, ``sd3_paper``; UNet ``output.2.1``
(block, id, block_index), ``output.2`` (every depth of that block), global cross-attention indices in forward
order ``55``, ``54-56``; DiT ``joint.10``, ``double.7``, ``single.20``, ``double.3-5``, global block indices.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import uuid

import torch
from comfy.patcher_extension import WrappersMP

from ..core import PACK, hooks, runs
from ..core.layers import (
    LAYER_KEY,
    TXT_LEN_KEY,
    CallCounter,
    Marker,
    ModelLayers,
    block_kind,
    current_attn2_layer,
    ensure_layer_tracking,
    int_range,
    layer_heads,
    layer_label,
    model_layers,
    module_of,
    parse_layers,
    running_dit_layer,
    text_call,
)

ROW_MODES = ("positive", "positive_and_negative")
RANGE_UNITS = ("step_fraction", "timestep_percent")  # unit of start_percent / end_percent (see PatchSettings)
ROW_ROLES = {"positive": ("positive",), "positive_and_negative": ("positive", "negative")}

ACTIVE_KEY = f"{PACK}.text_layers.active"  # token of the TextLayerPatch in force on a model
PLAN_KEY = f"{PACK}.text_layers.plan"  # per model call (DiT): which rows take which rows' text K/V
MARK_KEY = f"{PACK}.text_layers.heads_mark"  # UNet heads subset: did the override run on this layer?
WRAPPER_KEY = f"{PACK}.text_layers"
HOOK_KEY = f"{PACK}.text_layers"  # key of its attn2 patches
TARGET_UUID = uuid.UUID("7e7a1a7e-0000-4000-8000-7e7a1a7e7e7a")  # chunk id of the appended target rows


def parse_heads(spec: str) -> tuple[int, ...] | None:
    """'0-3,7' -> (0, 1, 2, 3, 7); empty or 'all' -> None (every head)."""
    spec = (spec or "").strip().lower()
    if spec in ("", "all"):
        return None
    heads = set()
    for token in re.split(r"[,;\s]+", spec):
        if not token:
            continue
        if not re.fullmatch(r"\d+(-\d+)?", token):
            raise ValueError(f"heads: {token!r} is not a head index or range; write e.g. '0-3,7' (0-based), or leave "
                             f"it empty for every head.")
        try:
            heads.update(int_range(token))
        except ValueError as e:
            raise ValueError(f"heads: {e}; write the lower index first, e.g. '0-3'.") from e
    return tuple(sorted(heads))


# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# the target conditioning
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TargetText:
    context: torch.Tensor  # (1, L, C) on the CPU (moved to each call's device/dtype)
    pooled: torch.Tensor | None  # (1, P) or None

    @property
    def tokens(self) -> int:
        return int(self.context.shape[1])

    @property
    def channels(self) -> int:
        return int(self.context.shape[-1])

    @classmethod
    def from_conditioning(cls, conditioning, name: str = "target") -> TargetText:
        if not conditioning:
            raise ValueError(f"{name}: the conditioning is empty. Connect a CLIPTextEncode (or the word substitution "
                             f"node) with the edited prompt.")
        if len(conditioning) != 1:
            raise ValueError(f"{name}: the conditioning has {len(conditioning)} entries (combined, area or scheduled "
                             f"conditionings); the text layers take one prompt. Encode the edited prompt with a single "
                             f"CLIPTextEncode.")
        tensor, extra = conditioning[0][0], conditioning[0][1] or {}
        if not torch.is_tensor(tensor) or tensor.ndim != 3 or tensor.shape[0] != 1:
            shape = tuple(tensor.shape) if torch.is_tensor(tensor) else type(tensor).__name__
            raise ValueError(f"{name}: expected one text embedding of shape (1, tokens, channels), got {shape}.")
        pooled = extra.get("pooled_output")
        if pooled is not None and (not torch.is_tensor(pooled) or pooled.ndim != 2):
            pooled = None
        return cls(tensor.detach(), None if pooled is None else pooled.detach())



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


def head_mask(heads: tuple[int, ...], n_heads: int, dim: int, device) -> torch.Tensor:
    """Boolean mask over the ``n_heads * dim`` channels of a (.., H·D) tensor: True on the selected heads."""
    mask = torch.zeros(n_heads, dim, dtype=torch.bool, device=device)
    mask[list(heads)] = True
    return mask.reshape(-1)


# ----------------------------------------------------------------------------------------------
# the patch
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PatchSettings:
    layers: tuple
    start_percent: float = 0.0
    end_percent: float = 1.0
    strength: float = 1.0
    heads: tuple[int, ...] | None = None
    rows: str = "positive"
    # step_fraction: fractions of the steps the sampler runs (steps ceil(start·n) .. ceil(end·n) - 1);
    # timestep_percent: ComfyUI's timestep percents, as ConditioningSetTimestepRange: the steps whose schedule sigma
    # lies in [sigmas[1], sigmas[0]] = (percent_to_sigma(end), percent_to_sigma(start)), closed
    range_unit: str = "step_fraction"
    sigmas: tuple[float, float] | None = None

    def validate(self) -> None:
        if self.range_unit not in RANGE_UNITS:
            raise ValueError(f"range_unit must be one of {', '.join(RANGE_UNITS)}, got {self.range_unit!r}.")
        for name in ("start_percent", "end_percent", "strength"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be between 0 and 1, got {value}.")
        if self.start_percent > self.end_percent:
            raise ValueError(f"start_percent ({self.start_percent}) must not be above end_percent ({self.end_percent}): "
                             f"the patch runs on the steps from start to end (fractions of the sampling steps).")
        if self.rows not in ROW_MODES:
            raise ValueError(f"rows must be one of {', '.join(ROW_MODES)}, got {self.rows!r}.")

    @property
    def roles(self) -> tuple[str, ...]:
        return ROW_ROLES[self.rows]

    def is_noop(self) -> bool:
        return not self.layers or self.strength <= 0.0 or self.start_percent >= 1.0 or \
            self.start_percent >= self.end_percent


def _step_window(to: dict, s: PatchSettings) -> tuple[int, int] | None:
    ss = to.get("sample_sigmas")
    if ss is None:
        run = runs.run_state(to)
        ss = run.sample_sigmas if run is not None else None
    if ss is None:
        return None
    return step_window(s, ss)


def step_window(s: PatchSettings, ss: torch.Tensor) -> tuple[int, int]:
    """First patched step and one past the last, of the schedule ``ss`` the sampler runs."""
    if s.range_unit == "step_fraction" or s.sigmas is None:
        return runs.fraction_window(s.start_percent, s.end_percent, ss)
    hi_sigma, lo_sigma = s.sigmas
    n = len(ss) - 1
    inside = [i for i in range(n) if lo_sigma * (1 - 1e-5) <= float(ss[i]) <= hi_sigma * (1 + 1e-5)]
    return (inside[0], inside[-1] + 1) if inside else (n, n)


def _is_active(to: dict, s: PatchSettings, token: str) -> bool:
    """This patch is the one in force on the model and the current step is inside [start, end)."""
    if to.get(ACTIVE_KEY) != token:
        return False
    step = runs.current_step(to)
    window = _step_window(to, s) if step is not None else None
    if step is None or window is None:  # not inside a sampler run: only an all-steps patch applies
        return s.start_percent <= 0.0 and s.end_percent >= 1.0
    return window[0] <= step < window[1]



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
              strength: float) -> torch.Tensor:
    """``t`` (keys or values of a joint attention call) with the text tokens of the source rows taken (blended)
    from the target rows. layout: 'bhld' (Flux), 'blc' (SD3 q/k: (B, L, H·D)), 'blhd' (SD3 v)."""
    tok_dim = 2 if layout == "bhld" else 1
    src, tgt = plan.src.to(t.device), plan.tgt.to(t.device)
    a = t.index_select(0, src).narrow(tok_dim, 0, txt_len)
    b = t.index_select(0, tgt).narrow(tok_dim, 0, txt_len)
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
    out.narrow(tok_dim, 0, txt_len)[src] = mixed
    return out


def _make_cross_replace(s: PatchSettings, target: TargetText, token: str, embedder, layer, previous):
    """The ("double_block", i) replace of one selected DiT cross-attention block: the block runs with the text
    stream of the selected rows taken from the target prompt (``embedder`` = the model's per-token text
    embedding), on the patched steps only; ``previous`` (a replacement installed before) keeps running."""

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
        tgt = embedder(hooks.like(target.context, txt)).to(txt.dtype)
        length = match_token_lengths(txt.shape[1], tgt.shape[1])
        src = repeat_tokens(txt, length)
        tgt = repeat_tokens(tgt, length).expand(src.shape[0], -1, -1)
        args = dict(args, txt=torch.where(rows[:, None, None], blend(src, tgt, s.strength), src))
        return run(args, extra)

    return hooks.keyed(replace, f"{HOOK_KEY}.{layer_label(layer)}")


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


def _make_dit_hooks(s: PatchSettings, target: TargetText, token: str, label: str):
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
        out = executor(x2, t2, rows_extend(c_concat, index, n), c2, rows_extend(control, index, n), to2, **kwargs2)
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
        k2 = swap_text(k, plan, txt_len, k_layout, s.heads, n_heads, s.strength)
        v2 = swap_text(v, plan, txt_len, v_layout, s.heads, n_heads, s.strength)
        return call_next(q, k2, v2, *args[3:], **kwargs)

    return apply_model, override


START_MODES = ("start_percent", "paper")


def paper_start(family) -> float | None:
    """Paper 2's start fraction of the steps for the family's preset (registry field ``preset_start``: step 4 of 50
    on SDXL = 0.08, step 2 of 28 on SD3 Medium ≈ 0.07); None where the registry has none."""
    return None if family.preset_start is None else float(family.preset_start)


def resolve_start(ml: ModelLayers, start_percent: float, start_mode: str) -> float:
    if start_mode not in START_MODES:
        raise ValueError(f"start_mode must be one of {', '.join(START_MODES)}, got {start_mode!r}.")
    if start_mode == "start_percent":
        return float(start_percent)
    value = paper_start(ml.family)
    if value is None:
        raise ValueError(f"start_mode=paper: the model-family registry has no paper 2 start step for {ml.label} (the "
                         f"paper gives one for the architectures it localized: SDXL base, step 4 of 50 = 0.08, and SD3 "
                         f"Medium, step 2 of 28 ≈ 0.07). Use start_mode=start_percent and set start_percent, or "
                         f"TextLayerLocalize's best_start.")
    return value


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
        tgt = TargetText(torch.nn.functional.pad(tgt.context, (0, 0, pad - tgt.tokens, 0)), tgt.pooled)
    expected = ml.family.context_width(model)
    if expected is not None and tgt.channels != expected:
        raise ValueError(f"target: the edited prompt's embedding has {tgt.channels} channels but this {ml.label} "
                         f"model takes {expected}: encode the target with this model's CLIP.")
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
    note = f"start: paper 2's {start_percent:.3f} of the steps for {ml.label} (start_mode=paper)." \
        if start_mode == "paper" else ""  # re-applying replaces the earlier TextLayerPatch
    if s.is_noop():
        to.pop(ACTIVE_KEY, None)
        m.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY)
        return m, _with_note(format_report(ml, s, tgt, noop=True), note)
    token = uuid.uuid4().hex
    to[ACTIVE_KEY] = token
    runs.ensure_run_tracking(m)
    ensure_layer_tracking(m, ml)
    if ml.kind == "unet":
        modules = {layer: module_of(m, ml.by_key[layer]) for layer in s.layers}
        patch, heads_override, output_patch = _make_unet_hooks(s, tgt, token, modules)
        if s.heads is None:
            hooks.set_attn2_patches(m, HOOK_KEY, patch)
        else:
            m.model_options["transformer_options"][MARK_KEY] = Marker()
            hooks.chain_attention_override(m, heads_override)
            hooks.set_attn2_patches(m, HOOK_KEY, patch, output_patch)
    elif ml.family.is_dit_cross and s.heads is not None:
        embedder = getattr(m.model.diffusion_model, ml.family.text_embedder)
        modules = {layer: functools.reduce(getattr, block_kind(ml, layer).text_attn.split("."),
                                           module_of(m, ml.by_key[layer])) for layer in s.layers}
        hooks.chain_attention_override(m, _make_cross_heads_override(
            s, tgt, token, embedder, modules, {layer: text_call(ml, layer) for layer in s.layers}))
    elif ml.family.is_dit_cross:
        embedder = getattr(m.model.diffusion_model, ml.family.text_embedder)
        replaces = to.get("patches_replace", {}).get("dit", {})
        for layer in s.layers:
            kind = block_kind(ml, layer)
            previous = replaces.get((kind.replace, layer[1]))  # an earlier TextLayerPatch's stays inert (ACTIVE_KEY)
            m.set_model_patch_replace(_make_cross_replace(s, tgt, token, embedder, layer, previous), "dit",
                                      kind.replace, layer[1])
    else:
        wrapper, override = _make_dit_hooks(s, tgt, token, ml.label)
        hooks.add_keyed_wrapper(m, WrappersMP.APPLY_MODEL, WRAPPER_KEY, wrapper)
        hooks.chain_attention_override(m, override)
    return m, _with_note(format_report(ml, s, tgt), note)


def _with_note(report: str, note: str) -> str:
    return f"{report}\n{note}" if note else report


def format_report(ml: ModelLayers, s: PatchSettings, target: TargetText, noop: bool = False) -> str:
    method = ("UNet injection: the selected cross-attention layers take the target's keys/values"
              if ml.kind == "unet" else
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


