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

* **TextLayerWordSubstitute** builds the target conditioning from a prompt and a "word => replacement" list
  (paper 2's toxic-text application: only the text layers see the replacement).
* **LoraLoaderTextLayers** applies only the LoRA weights of the selected layers' attention (paper 2's
  localized fine-tuning).
* **TextLayerLocalize** (in text_layers_localize.py) runs paper 2's Algorithm 1 on the user's model.

Layer strings (:func:`parse_layers`): presets ``auto``, ``sdxl_paper``, ``sd3_paper``; UNet ``output.2.1``
(block, id, block_index), ``output.2`` (every depth of that block), global cross-attention indices in forward
order ``55``, ``54-56``; DiT ``joint.10``, ``double.7``, ``single.20``, ``double.3-5``, global block indices.
"""

from __future__ import annotations

import dataclasses
import math
import re
import uuid

import comfy.lora
import comfy.lora_convert
import comfy.utils
import folder_paths
import torch
from comfy.patcher_extension import WrappersMP
from comfy_api.latest import io, ui

from . import toolkit

UNET_FAMILIES = ("sd1", "sd2", "sdxl")
DIT_FAMILIES = ("sd3", "flux")
FAMILY_LABELS = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "sd3": "SD3", "flux": "Flux.1"}
ROW_MODES = ("positive", "positive_and_negative")
ROW_ROLES = {"positive": ("positive",), "positive_and_negative": ("positive", "negative")}

# paper 2, Sec. 4 / App. A.9: SDXL cross-attention layers 55 and 56 of 70 (0-based, forward order) =
# up_blocks.0.attentions.2 transformer blocks 1 and 2; SD3-medium joint block 10.
PRESETS = {
    "sdxl_paper": ("sdxl", (("output", 2, 1), ("output", 2, 2))),
    "sd3_paper": ("sd3", (("joint", 10),)),
}
AUTO_PRESET = {"sdxl": "sdxl_paper", "sd3": "sd3_paper"}
UNET_BLOCKS = ("input", "middle", "output")
DIT_KINDS = {"sd3": ("joint",), "flux": ("double", "single")}

ACTIVE_KEY = f"{toolkit.PACK}.text_layers.active"  # token of the TextLayerPatch in force on a model
PLAN_KEY = f"{toolkit.PACK}.text_layers.plan"  # per model call (DiT): which rows take which rows' text K/V
MARK_KEY = f"{toolkit.PACK}.text_layers.heads_mark"  # UNet heads subset: did the override run on this layer?
WRAPPER_KEY = f"{toolkit.PACK}.text_layers"
TARGET_UUID = uuid.UUID("7e7a1a7e-0000-4000-8000-7e7a1a7e7e7a")  # chunk id of the appended target rows


# ----------------------------------------------------------------------------------------------
# layers of a model and layer strings
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelLayers:
    """The attention layers TextLayerPatch can select on one model, in forward order."""

    family: str
    kind: str  # "unet" (cross-attention layers (block, id, block_index)) or "dit" ((kind, index) blocks)
    layers: tuple

    @property
    def label(self) -> str:
        return FAMILY_LABELS.get(self.family, self.family)

    @property
    def unit(self) -> str:
        return "cross-attention layers" if self.kind == "unet" else "attention blocks"

    def index(self, layer) -> int:
        return self.layers.index(layer)

    def describe(self) -> str:
        """Compact listing, e.g. 'input.1.0 [0], ..., output.2.0-9 [54-63]'."""
        groups: list[list] = []
        for i, layer in enumerate(self.layers):
            head = layer[:-1]
            if groups and groups[-1][0] == head and groups[-1][-1][1] == i - 1:
                groups[-1].append((layer[-1], i))
            else:
                groups.append([head, (layer[-1], i)])
        parts = []
        for g in groups:
            head, first, last = g[0], g[1], g[-1]
            name = ".".join(str(p) for p in head)
            if first is last:
                parts.append(f"{name}.{first[0]} [{first[1]}]")
            else:
                parts.append(f"{name}.{first[0]}-{last[0]} [{first[1]}-{last[1]}]")
        return ", ".join(parts)


def layer_label(layer) -> str:
    return ".".join(str(p) for p in layer)


def model_layers(model, what: str = "TextLayerPatch") -> ModelLayers:
    family = toolkit.model_family(model)
    if family in UNET_FAMILIES:
        return ModelLayers(family, "unet", tuple(toolkit.unet_attn2_layers(model)))
    if family in DIT_FAMILIES:
        return ModelLayers(family, "dit", tuple(toolkit.dit_blocks(model)))
    raise toolkit.unsupported_family(
        family, what, "it knows the text-writing attention layers of UNet models (SD1.x, SD2.x, SDXL) and of "
        "SD3 (joint blocks) and Flux.1 (double/single blocks) only. Use one of those model families.")


def _layers_error(token: str, ml: ModelLayers, why: str) -> ValueError:
    forms = ("block.id.depth (e.g. output.2.1), block.id (every depth of that block), or global indices in forward "
             "order (55, 54-56)" if ml.kind == "unet" else
             f"{'/'.join(DIT_KINDS[ml.family])}.i (e.g. {DIT_KINDS[ml.family][0]}.10), a range "
             f"{DIT_KINDS[ml.family][0]}.3-5, or global indices in forward order (10, 8-10)")
    return ValueError(f"layers: {token!r} {why}. Valid {ml.unit} of this {ml.label} model ({len(ml.layers)}): "
                      f"{ml.describe()}. Write them as {forms}, or a preset (auto, sdxl_paper, sd3_paper); separate "
                      f"several with commas.")


def _preset_layers(name: str, ml: ModelLayers) -> tuple:
    family, layers = PRESETS[name]
    if ml.family != family:
        raise ValueError(f"layers: preset {name!r} is paper 2's {FAMILY_LABELS[family]} preset, but this model is "
                         f"{ml.label}. Use 'auto' (the paper's preset for SDXL and SD3), TextLayerLocalize's "
                         f"'layers' output, or explicit layers.")
    missing = [layer for layer in layers if layer not in ml.layers]
    if missing:
        raise _layers_error(name, ml, f"names {', '.join(layer_label(m) for m in missing)}, which this model does "
                                      f"not have (the paper's {FAMILY_LABELS[family]} has 70 cross-attention layers / "
                                      f"24 joint blocks; a smaller variant needs TextLayerLocalize or explicit layers)")
    return layers


def _int_range(text: str) -> range:
    a, _, b = text.partition("-")
    lo, hi = int(a), int(b) if b else int(a)
    if hi < lo:
        raise ValueError(f"range {text} runs backwards")
    return range(lo, hi + 1)


def parse_layers(spec: str, ml: ModelLayers) -> tuple:
    """The layers a layer string names, in forward order without duplicates (empty string: none)."""
    chosen = set()
    for token in re.split(r"[,;\s]+", (spec or "").strip()):
        if not token:
            continue
        low = token.lower()
        if low == "auto":
            preset = AUTO_PRESET.get(ml.family)
            if preset is None:
                raise ValueError(
                    f"layers: 'auto' has no preset for {ml.label}: paper 2 localized the text layers of SDXL and "
                    f"SD3 only. Run TextLayerLocalize on this model and wire its 'layers' output here, or give "
                    f"explicit layers (valid: {ml.describe()}).")
            chosen.update(_preset_layers(preset, ml))
        elif low in PRESETS:
            chosen.update(_preset_layers(low, ml))
        elif re.fullmatch(r"\d+(-\d+)?", low):
            try:
                idx = _int_range(low)
            except ValueError as e:
                raise _layers_error(token, ml, str(e)) from e
            bad = [i for i in idx if i >= len(ml.layers)]
            if bad:
                raise _layers_error(token, ml, f"is out of range: indices run from 0 to {len(ml.layers) - 1}")
            chosen.update(ml.layers[i] for i in idx)
        else:
            chosen.update(_parse_named(token, low, ml))
    return tuple(layer for layer in ml.layers if layer in chosen)


def _parse_named(token: str, low: str, ml: ModelLayers) -> list:
    if ml.kind == "unet":
        m = re.fullmatch(r"(input|middle|output)\.(\d+)(?:\.(\d+(?:-\d+)?))?", low)
        if not m:
            raise _layers_error(token, ml, "is not a layer name")
        block, bid = m.group(1), int(m.group(2))
        in_block = [layer for layer in ml.layers if layer[0] == block and layer[1] == bid]
        if not in_block:
            raise _layers_error(token, ml, f"is out of range: ({block}, {bid}) has no cross-attention")
        if m.group(3) is None:
            return in_block
        depths = _int_range(m.group(3))
        found = [layer for layer in in_block if layer[2] in depths]
        if len(found) != len(depths):
            raise _layers_error(token, ml, f"is out of range: {block}.{bid} has depths 0-{len(in_block) - 1}")
        return found
    m = re.fullmatch(r"([a-z]+)\.(\d+(?:-\d+)?)", low)
    if not m or m.group(1) not in DIT_KINDS[ml.family]:
        raise _layers_error(token, ml, "is not a block name of this model")
    kind, idx = m.group(1), _int_range(m.group(2))
    found = [layer for layer in ml.layers if layer[0] == kind and layer[1] in idx]
    if len(found) != len(idx):
        n = sum(1 for layer in ml.layers if layer[0] == kind)
        raise _layers_error(token, ml, f"is out of range: {kind} blocks run from 0 to {n - 1}")
    return found


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
            heads.update(_int_range(token))
        except ValueError as e:
            raise ValueError(f"heads: {e}; write the lower index first, e.g. '0-3'.") from e
    return tuple(sorted(heads))


# ----------------------------------------------------------------------------------------------
# modules of the layers (candidates for the toolkit: toolkit.unet_attn2_layers walks the same way)
# ----------------------------------------------------------------------------------------------
def unet_attn2_modules(model) -> dict:
    """(block_name, block_id, block_index) -> (module path under diffusion_model, the attn2 CrossAttention)."""
    dm = model.model.diffusion_model
    from comfy.ldm.modules.attention import SpatialTransformer

    out = {}

    def visit(name, prefix, idx, block):
        for j, module in enumerate(block):
            if isinstance(module, SpatialTransformer):
                for bi, tb in enumerate(module.transformer_blocks):
                    if getattr(tb, "attn2", None) is not None:
                        out[(name, idx, bi)] = (f"{prefix}.{j}.transformer_blocks.{bi}.attn2", tb.attn2)

    for i, block in enumerate(dm.input_blocks):
        visit("input", f"input_blocks.{i}", i, block)
    visit("middle", "middle_block", 0, dm.middle_block)
    for i, block in enumerate(dm.output_blocks):
        visit("output", f"output_blocks.{i}", i, block)
    return out


def layer_heads(model, ml: ModelLayers, layer) -> int:
    """Number of attention heads of a layer."""
    if ml.kind == "unet":
        return int(unet_attn2_modules(model)[layer][1].heads)
    dm = model.model.diffusion_model
    kind, i = layer
    if kind == "joint":
        return int(dm.joint_blocks[i].x_block.attn.num_heads)
    return int((dm.double_blocks if kind == "double" else dm.single_blocks)[i].num_heads)


def layer_weight_prefixes(model, ml: ModelLayers, layer) -> tuple[str, ...]:
    """State-dict key prefixes of a layer's attention weights (for LoraLoaderTextLayers)."""
    if ml.kind == "unet":
        return (f"diffusion_model.{unet_attn2_modules(model)[layer][0]}.",)
    kind, i = layer
    if kind == "joint":
        return (f"diffusion_model.joint_blocks.{i}.context_block.attn.", f"diffusion_model.joint_blocks.{i}.x_block.attn.")
    if kind == "double":
        return (f"diffusion_model.double_blocks.{i}.img_attn.", f"diffusion_model.double_blocks.{i}.txt_attn.")
    # Flux single blocks fuse the attention with the MLP: linear1 = qkv ‖ mlp_in, linear2 = proj ‖ mlp_out
    return (f"diffusion_model.single_blocks.{i}.linear1.", f"diffusion_model.single_blocks.{i}.linear2.",
            f"diffusion_model.single_blocks.{i}.norm.")


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


def _expected_context_channels(model, ml: ModelLayers) -> int | None:
    cfg = getattr(model.model.model_config, "unet_config", {}) or {}
    if ml.kind == "unet":
        return cfg.get("context_dim")
    if ml.family == "flux":
        return cfg.get("context_in_dim")
    params = (cfg.get("context_embedder_config") or {}).get("params") or {}
    return params.get("in_features")


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

    def validate(self) -> None:
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
        run = toolkit.run_state(to)
        ss = run.sample_sigmas if run is not None else None
    if ss is None:
        return None
    return (toolkit.resolve_cutoff_step(s.start_percent, "fraction", ss),
            toolkit.resolve_cutoff_step(s.end_percent, "fraction", ss))


def _is_active(to: dict, s: PatchSettings, token: str) -> bool:
    """This patch is the one in force on the model and the current step is inside [start, end)."""
    if to.get(ACTIVE_KEY) != token:
        return False
    step = toolkit.current_step(to)
    window = _step_window(to, s) if step is not None else None
    if step is None or window is None:  # not inside a sampler run: only an all-steps patch applies
        return s.start_percent <= 0.0 and s.end_percent >= 1.0
    return window[0] <= step < window[1]


class _HeadsMark:
    """Shared by the attn2 output patch and the attention override of one model call (UNet heads subset):
    records that the override reached the selected layer. A fresh one per clone."""

    __slots__ = ("layer",)

    def __init__(self):
        self.layer = None

    def __deepcopy__(self, memo):
        return _HeadsMark()


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
        return toolkit.row_mask(to, n_rows, roles, device=device)

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
        tgt = toolkit.like(target.context, context)
        length = match_token_lengths(context.shape[1], tgt.shape[1])
        same = value is context
        context = repeat_tokens(context, length)
        value = context if same else repeat_tokens(value, length)
        tgt = repeat_tokens(tgt, length)
        sel = rows[:, None, None]
        new_context = torch.where(sel, blend(context, tgt.expand_as(context), s.strength), context)
        new_value = new_context if same else torch.where(sel, blend(value, tgt.expand_as(value), s.strength), value)
        return n, new_context, new_value

    attn2_patch.prompt_anatomy_text_layers = True

    def heads_override(call_next, func, *args, **kwargs):
        to = kwargs.get("transformer_options") or {}
        layer = toolkit.current_attn2_layer(to)
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
        tgt = toolkit.like(target.context, k)
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

    heads_output_patch.prompt_anatomy_text_layers = True
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


def _make_dit_hooks(s: PatchSettings, target: TargetText, token: str, family: str):
    layer_set = frozenset(s.layers)
    roles = s.roles

    def apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        to = transformer_options
        chunks = toolkit.chunk_roles(to)
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
                f"{c_crossattn.shape[1]}. On {FAMILY_LABELS[family]} the text keys/values are swapped token for "
                f"token, so both prompts must encode to the same length: keep them about as long (SD3: under 75 "
                f"CLIP and 76 T5 tokens each; Flux: under 255 T5 tokens).")
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
        c2 = torch.cat([c_crossattn, toolkit.like(target.context, c_crossattn).expand(extra, -1, -1)], 0)
        kwargs2 = {k: rows_extend(v, index, n) for k, v in kwargs.items()}
        y = kwargs.get("y")
        if target.pooled is not None and torch.is_tensor(y) and y.ndim == 2 and y.shape[0] == n:
            if target.pooled.shape[-1] != y.shape[-1]:
                raise ValueError(f"target: the edited prompt's pooled vector has {target.pooled.shape[-1]} channels, "
                                 f"the model's has {y.shape[-1]}: encode it with the same CLIP as the positive prompt.")
            kwargs2["y"] = torch.cat([y, toolkit.like(target.pooled, y).expand(extra, -1)], 0)
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

    def override(call_next, func, *args, **kwargs):
        to = kwargs.get("transformer_options") or {}
        plan = to.get(PLAN_KEY)
        layer = to.get(toolkit.LAYER_KEY)
        if plan is None or layer not in layer_set or layer in plan.done or to.get(ACTIVE_KEY) != token:
            return call_next(*args, **kwargs)
        plan.done.add(layer)  # the first attention call of a block is the joint one (SD3.5's 2nd is image-only)
        txt_len = to.get(toolkit.TXT_LEN_KEY)
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


def apply_text_layer_patch(model, target, layers: str | tuple, start_percent: float = 0.0, end_percent: float = 1.0,
                           heads: str | tuple | None = "", strength: float = 1.0, rows: str = "positive"):
    """Clone ``model`` and patch the selected text layers with ``target`` (a CONDITIONING or TargetText).
    ``layers``: a layer string or a tuple of resolved layers. Returns (model, report)."""
    ml = model_layers(model)
    resolved = parse_layers(layers, ml) if isinstance(layers, str) else tuple(layers)
    head_sel = parse_heads(heads) if (heads is None or isinstance(heads, str)) else tuple(heads)
    s = PatchSettings(resolved, float(start_percent), float(end_percent), float(strength), head_sel, rows)
    s.validate()
    tgt = target if isinstance(target, TargetText) else TargetText.from_conditioning(target)
    expected = _expected_context_channels(model, ml)
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
    for kind in ("attn2_patch", "attn2_output_patch"):  # re-applying replaces the earlier TextLayerPatch
        plist = to.get("patches", {}).get(kind)
        if plist:
            plist[:] = [p for p in plist if not getattr(p, "prompt_anatomy_text_layers", False)]
    if s.is_noop():
        to.pop(ACTIVE_KEY, None)
        m.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY)
        return m, format_report(ml, s, tgt, noop=True)
    token = uuid.uuid4().hex
    to[ACTIVE_KEY] = token
    toolkit.ensure_run_tracking(m)
    toolkit.ensure_layer_tracking(m)
    if ml.kind == "unet":
        modules = {layer: mod for layer, (_, mod) in unet_attn2_modules(m).items() if layer in s.layers}
        patch, heads_override, output_patch = _make_unet_hooks(s, tgt, token, modules)
        m.set_model_attn2_patch(patch)
        if s.heads is not None:
            to = m.model_options["transformer_options"]
            to[MARK_KEY] = _HeadsMark()
            toolkit.chain_attention_override(m, heads_override)
            m.set_model_attn2_output_patch(output_patch)
    else:
        wrapper, override = _make_dit_hooks(s, tgt, token, ml.family)
        toolkit.add_keyed_wrapper(m, WrappersMP.APPLY_MODEL, WRAPPER_KEY, wrapper)
        toolkit.chain_attention_override(m, override)
    return m, format_report(ml, s, tgt)


def format_report(ml: ModelLayers, s: PatchSettings, target: TargetText, noop: bool = False) -> str:
    method = ("UNet injection: the selected cross-attention layers take the target's keys/values"
              if ml.kind == "unet" else
              "MMDiT/Flux patching: the target prompt runs as one extra batch row per image on patched steps and "
              "gives its text keys/values to the selected blocks")
    lines = [f"TextLayerPatch · {ml.label} · {method}."]
    if s.layers:
        names = ", ".join(f"{layer_label(layer)} [{ml.index(layer)}]" for layer in s.layers)
        lines.append(f"layers: {names} of {len(ml.layers)} {ml.unit}.")
    else:
        lines.append("layers: none selected.")
    lines.append(f"steps: from {s.start_percent:.3f} to {s.end_percent:.3f} of the sampling steps; rows: {s.rows}; "
                 f"heads: {'all' if s.heads is None else ','.join(map(str, s.heads))}; strength {s.strength:.2f}.")
    lines.append(f"target: {target.tokens} tokens × {target.channels} channels"
                 + ("" if target.pooled is None or ml.kind == "unet" else " (its pooled vector drives the target rows)")
                 + ".")
    if noop:
        lines.append("Nothing to patch (no layers, strength 0 or an empty step range): the model is unchanged.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# word substitution
# ----------------------------------------------------------------------------------------------
def parse_replacements(text: str) -> list[tuple[str, str]]:
    """'word => replacement' per line; blank lines and lines starting with '#' are skipped."""
    rules, seen = [], {}
    for number, line in enumerate((text or "").splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.count("=>") != 1:
            raise ValueError(f"replacements line {number} ({stripped!r}): write exactly one 'word => replacement' "
                             f"per line (an empty replacement removes the word).")
        left, right = (part.strip() for part in stripped.split("=>"))
        if not left:
            raise ValueError(f"replacements line {number} ({stripped!r}): the word before '=>' is empty.")
        key = " ".join(left.lower().split())
        if key in seen:
            raise ValueError(f"replacements line {number} ({stripped!r}): {left!r} is already replaced on line "
                             f"{seen[key]}; keep one rule per word.")
        seen[key] = number
        rules.append((left, right))
    return rules


def _match_case(found: str, replacement: str) -> str:
    letters = [c for c in found if c.isalpha()]
    if len(letters) > 1 and all(c.isupper() for c in letters):
        return replacement.upper()
    if letters and found[0].isupper() and all(c.islower() for c in letters[1:]):
        return replacement[:1].upper() + replacement[1:]
    return replacement


def substitute_words(text: str, rules: list[tuple[str, str]]) -> tuple[str, list[int]]:
    """Replace whole words/phrases (case-insensitive, all rules at once: 'a => b' and 'b => a' swap) and return
    the new text and the number of replacements per rule. The replacement follows the found word's case when
    that is ALL CAPS or Capitalized."""
    if not rules:
        return text, []
    keys = [" ".join(left.lower().split()) for left, _ in rules]
    patterns = sorted(((k, i) for i, k in enumerate(keys)), key=lambda ki: -len(ki[0]))
    alternation = "|".join(r"\s+".join(re.escape(w) for w in k.split()) for k, _ in patterns)
    regex = re.compile(rf"(?<!\w)(?:{alternation})(?!\w)", re.IGNORECASE)
    counts = [0] * len(rules)
    lookup = dict(zip(keys, range(len(rules)), strict=True))

    def repl(m):
        i = lookup[" ".join(m.group(0).lower().split())]
        counts[i] += 1
        return _match_case(m.group(0), rules[i][1])

    return regex.sub(repl, text), counts


def encode_text(clip, text: str):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


# ----------------------------------------------------------------------------------------------
# localized LoRA
# ----------------------------------------------------------------------------------------------
def _model_key(key) -> str:
    return key if isinstance(key, str) else key[0]


def load_text_layer_lora(model, lora_sd: dict, layers: str, strength: float = 1.0, name: str = "LoRA"):
    """Clone ``model`` with only the LoRA patches of the selected layers' attention. Returns (model, report)."""
    ml = model_layers(model, "LoraLoaderTextLayers")
    resolved = parse_layers(layers, ml)
    if not resolved:
        return model, (f"LoraLoaderTextLayers · {ml.label} · {name}\nlayers: none selected, so nothing of the LoRA is "
                       f"applied and the model is unchanged. Give the text layers (e.g. 'auto' for SDXL/SD3, or "
                       f"TextLayerLocalize's 'layers' output).")
    if not math.isfinite(strength):
        raise ValueError(f"strength_model must be a finite number, got {strength}.")
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(lora_sd), key_map, log_missing=False)
    if not patches:
        raise ValueError(f"lora_name: no weight of {name} matches this {ml.label} model's diffusion model; it is a "
                         f"LoRA for another model (or for the text encoder only).")
    per_layer = {layer: layer_weight_prefixes(model, ml, layer) for layer in resolved}
    kept, counts = {}, {}
    for key, patch in patches.items():
        mk = _model_key(key)
        for layer, prefixes in per_layer.items():
            if mk.startswith(prefixes):
                kept[key] = patch
                counts[layer] = counts.get(layer, 0) + 1
                break
    if not kept:
        touched = sorted({".".join(_model_key(k).split(".")[1:3]) for k in patches})
        raise ValueError(f"layers: none of the {len(patches)} weights {name} patches lies in the selected layers "
                         f"({', '.join(map(layer_label, resolved))}); it patches {', '.join(touched[:12])}"
                         f"{' …' if len(touched) > 12 else ''}. Select the layers it was trained on.")
    lines = [f"LoraLoaderTextLayers · {ml.label} · {name}",
             f"kept {len(kept)} of {len(patches)} diffusion-model weights of the LoRA (strength {strength:g}); "
             f"the other {len(patches) - len(kept)} and any text-encoder weights are ignored."]
    for layer in resolved:
        lines.append(f"  {layer_label(layer)} [{ml.index(layer)}]: {counts.get(layer, 0)} weights")
    if ml.kind == "dit" and any(layer[0] == "single" for layer in resolved):
        lines.append("note: Flux single blocks fuse attention and MLP in linear1/linear2, so their MLP part is kept too.")
    if strength == 0:
        lines.append("strength 0: the model is unchanged.")
        return model, "\n".join(lines)
    m = model.clone()
    applied = m.add_patches(kept, strength)
    if len(applied) != len(kept):
        raise ValueError(f"lora_name: {len(kept) - len(applied)} of the kept weights do not fit this model's shapes.")
    return m, "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# nodes
# ----------------------------------------------------------------------------------------------
LAYERS_TOOLTIP = ("Which attention layers see the edited prompt. Presets: 'auto' (paper 2's layers for SDXL and SD3), "
                  "'sdxl_paper' (output.2.1, output.2.2 = cross-attention layers 55-56 of 70), 'sd3_paper' (joint.10). "
                  "UNet: 'output.2.1' (block.id.depth), 'output.2' (all depths), or global cross-attention indices "
                  "in forward order '55,56' / '54-56'. SD3: 'joint.10'; Flux: 'double.7', 'single.20'. SD1.x/SD2.x/"
                  "Flux were not localized by the paper: use TextLayerLocalize's output. Empty = no patch.")


def _ui(text: str):
    return ui.PreviewText(text)


class TextLayerPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TextLayerPatch",
            display_name="Text Layer Patch",
            category="prompt_anatomy/text_layers",
            description="Edits the text rendered in an image (paper 2): only the few attention layers that write "
                        "the text see the edited prompt, the rest of the model keeps the original prompt, so the "
                        "words on a sign change and the image stays. UNet models (SD1.x/SD2.x/SDXL) get the target's "
                        "keys/values in the selected cross-attention layers; SD3/Flux run the target prompt as one "
                        "extra batch row per image on patched steps and swap its text keys/values into the selected "
                        "blocks.",
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (it is cloned; the input stays unchanged)."),
                io.Conditioning.Input("target", tooltip="The edited prompt (e.g. the same prompt with 'HELLO' replaced "
                                                        "by 'WORLD'), encoded with this model's CLIP. The positive "
                                                        "prompt of the sampler is the source."),
                io.String.Input("layers", default="auto", tooltip=LAYERS_TOOLTIP),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="First patched step, as a fraction of the sampling steps (0 = the first step; "
                                       "paper 2 starts at step 4 of 50 for SDXL = 0.08 and 2 of 28 for SD3 ≈ 0.07). "
                                       "1 = never."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Patched steps end here (fraction of the sampling steps; 1 = through the last "
                                       "step)."),
                io.String.Input("heads", default="", optional=True,
                                tooltip="Optional subset of attention heads that see the edited prompt, e.g. '0-3,7' "
                                        "(0-based). Empty = every head."),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Blend of the source (0) and target (1) keys/values in the selected layers."),
                io.Combo.Input("rows", options=list(ROW_MODES), default="positive", optional=True,
                               tooltip="Which batch rows are patched: the positive prompt's only (the negative keeps "
                                       "its own text), or the negative's too. Rows are found by the conditioning's "
                                       "identity, so any batch size works."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The patched model."),
                io.String.Output(display_name="report", tooltip="The resolved layers, steps and method."),
            ],
        )

    @classmethod
    def execute(cls, model, target, layers="auto", start_percent=0.0, end_percent=1.0, heads="", strength=1.0,
                rows="positive") -> io.NodeOutput:
        m, report = apply_text_layer_patch(model, target, layers, start_percent, end_percent, heads, strength, rows)
        return io.NodeOutput(m, report, ui=_ui(report))


class TextLayerWordSubstitute(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TextLayerWordSubstitute",
            display_name="Word Substitution (Text Layers)",
            category="prompt_anatomy/text_layers",
            description="Encodes a prompt and a copy of it with words replaced ('word => replacement' per line). Wire "
                        "'source' to the sampler and 'target' to Text Layer Patch: only the text-writing layers see "
                        "the replacement, so an unwanted word on a sign is replaced while mood and content still "
                        "follow the original prompt (paper 2's safety application).",
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP (text encoder) of your model."),
                io.String.Input("text", multiline=True, dynamic_prompts=True,
                                default='a wooden sign that says "HELLO" in a sunny park',
                                tooltip="The prompt as the user wrote it (the source)."),
                io.String.Input("replacements", multiline=True, default="HELLO => WORLD",
                                tooltip="One 'word => replacement' per line. Whole words or phrases, case-insensitive; "
                                        "an ALL-CAPS or Capitalized match gets the replacement in the same case. All "
                                        "rules apply at once ('a => b' and 'b => a' swap). Empty replacement removes "
                                        "the word; lines starting with # are ignored."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="source", tooltip="The original prompt, encoded (the positive)."),
                io.Conditioning.Output(display_name="target", tooltip="The prompt with the replacements, encoded: "
                                                                      "connect to Text Layer Patch's target."),
                io.String.Output(display_name="target_text", tooltip="The prompt with the replacements."),
                io.String.Output(display_name="report", tooltip="Which words were replaced, and how often."),
            ],
        )

    @classmethod
    def execute(cls, clip, text, replacements) -> io.NodeOutput:
        if clip is None:
            raise ValueError("clip: no CLIP connected. Connect the CLIP output of your checkpoint or CLIP loader.")
        rules = parse_replacements(replacements)
        new_text, counts = substitute_words(text, rules)
        lines = []
        for (left, right), n in zip(rules, counts, strict=True):
            lines.append(f"{left!r} => {right!r}: " + (f"replaced {n}×" if n else "not in the prompt"))
        if not rules:
            lines.append("No replacement rules: target = source (Text Layer Patch will change nothing).")
        elif not any(counts):
            lines.append("None of the words occurs in the prompt: target = source (Text Layer Patch will change "
                         "nothing).")
        lines.append(f"target text: {new_text}")
        report = "\n".join(lines)
        source = encode_text(clip, text)
        target = source if new_text == text else encode_text(clip, new_text)
        return io.NodeOutput(source, target, new_text, report, ui=_ui(report))


class LoraLoaderTextLayers(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraLoaderTextLayers",
            display_name="Load LoRA (Text Layers Only)",
            category="prompt_anatomy/text_layers",
            description="Applies a LoRA to the attention of the selected text layers only (paper 2's localized "
                        "fine-tuning: improves text rendering with less damage to the rest of the image); every other "
                        "weight of the LoRA, and its text-encoder part, is ignored. The report says how many weights "
                        "were kept.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model the LoRA is applied to (cloned)."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="The LoRA file (models/loras)."),
                io.Float.Input("strength_model", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="How strongly the kept weights modify the model (may be negative)."),
                io.String.Input("layers", default="", tooltip="The text layers whose attention keeps the LoRA (same "
                                                              "syntax as Text Layer Patch; empty = apply nothing). "
                                                              + LAYERS_TOOLTIP),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the LoRA on the selected layers only."),
                io.String.Output(display_name="report", tooltip="How many LoRA weights were kept, per layer."),
            ],
        )

    @classmethod
    def execute(cls, model, lora_name, strength_model=1.0, layers="") -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        lora = comfy.utils.load_torch_file(path, safe_load=True)
        m, report = load_text_layer_lora(model, lora, layers, strength_model, name=lora_name)
        return io.NodeOutput(m, report, ui=_ui(report))


NODES = [TextLayerPatch, TextLayerWordSubstitute, LoraLoaderTextLayers]
