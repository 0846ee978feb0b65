"""Text-attention layers of a model, the one layer grammar, and which layer is running inside an attention call.

* :class:`Layer` is a layer's ComfyUI key — ``("input", 1, 0)`` (UNet attn2 patch key: block, id, depth) or
  ``("joint", 3)`` / ``("double", i)`` / ``("single", i)`` (DiT block) — with its forward-order index, label,
  resolution level and module path. It *is* that tuple (equal to it, same hash), so keys from ComfyUI's
  ``extra_options`` find it in sets and dicts.
* :func:`model_layers` lists them in forward order, from the family registry (DiT block kinds) or by walking the
  UNet (every ``SpatialTransformer`` block with an attn2; KOALA's missing middle block is skipped).
* :func:`parse_layers` is the one grammar of every node that takes layers (see :data:`GRAMMAR`).
* :func:`ensure_layer_tracking` makes the running layer visible to attention overrides.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import re

import torch

from . import PACK, families, hooks, text_attn
from .errors import InternalError

GRAMMAR = ("'all'; a preset ('auto' = the paper's layers where the paper localized this architecture); forward-order "
           "indices and ranges ('55', '54-56'); a group ('input', 'middle', 'output' on UNets; 'joint', 'double', "
           "'single' on DiTs; 'cross' on Wan); UNet 'output.2.1' (block.id.depth), 'output.2' (every depth of that "
           "block), 'output.2.0-1'; DiT 'joint.10', 'double.3-5', Wan 'cross.12'. Separate several with commas. "
           "Empty = no layer.")


class Layer(tuple):
    """A text-attention layer: the tuple of its ComfyUI key, plus ``index`` (forward order), ``label``
    ('output.2.1'), ``group`` ('output', 'joint', ...), ``level`` (UNet resolution level, 0 = latent grid; 0 for
    DiT blocks) and ``module`` (path of its attention module (UNet attn2) or block (DiT) under diffusion_model)."""

    def __new__(cls, key: tuple, index: int, level: int = 0, module: str = ""):
        self = super().__new__(cls, key)
        self.index, self.level, self.module = index, level, module
        return self

    def __getnewargs__(self):
        return tuple(self), self.index, self.level, self.module

    @property
    def key(self) -> tuple:
        return tuple(self)

    @property
    def label(self) -> str:
        return layer_label(self)

    @property
    def group(self) -> str:
        return str(self[0])


def layer_label(layer) -> str:
    return ".".join(str(p) for p in layer)


@dataclasses.dataclass(frozen=True)
class ModelLayers:
    """The text-attention layers of one model, in forward order."""

    family: families.Family
    kind: str  # "unet" (cross-attention layers) or "dit" (attention blocks)
    layers: tuple[Layer, ...]
    paper_arch: bool = True  # the exact architecture the family's paper presets were localized on
    model_name: str = ""  # the model's config class, for messages

    @property
    def label(self) -> str:
        return self.family.label

    @property
    def unit(self) -> str:
        return "cross-attention layers" if self.kind == "unet" else "attention blocks"

    @functools.cached_property
    def by_key(self) -> dict:
        return {layer.key: layer for layer in self.layers}

    def index(self, layer) -> int:
        return self.by_key[tuple(layer)].index

    def groups(self) -> list[str]:
        return list(dict.fromkeys(layer.group for layer in self.layers))

    def describe(self) -> str:
        """Compact listing, e.g. 'input.1.0 [0], ..., output.2.0-9 [54-63]'."""
        runs: list[list] = []
        for layer in self.layers:
            head = layer[:-1]
            if runs and runs[-1][0] == head and runs[-1][-1][1] == layer.index - 1:
                runs[-1].append((layer[-1], layer.index))
            else:
                runs.append([head, (layer[-1], layer.index)])
        parts = []
        for run in runs:
            name, first, last = ".".join(str(p) for p in run[0]), run[1], run[-1]
            parts.append(f"{name}.{first[0]} [{first[1]}]" if first is last else
                         f"{name}.{first[0]}-{last[0]} [{first[1]}-{last[1]}]")
        return ", ".join(parts)


# ----------------------------------------------------------------------------------------------
# listing
# ----------------------------------------------------------------------------------------------
def _unet_layers(dm) -> list[Layer]:
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, Upsample

    found: list[Layer] = []

    def visit(name, prefix, idx, block, level):
        for j, module in enumerate(block or ()):
            if isinstance(module, SpatialTransformer):
                for bi, tb in enumerate(module.transformer_blocks):
                    if getattr(tb, "attn2", None) is not None:
                        found.append(Layer((name, idx, bi), len(found), level,
                                           f"{prefix}.{j}.transformer_blocks.{bi}.attn2"))

    def resamples(block, cls) -> bool:
        return any(isinstance(m, cls) or (isinstance(m, ResBlock) and isinstance(getattr(m, "h_upd", None), cls))
                   for m in block)

    level = 0
    for i, block in enumerate(dm.input_blocks):
        visit("input", f"input_blocks.{i}", i, block, level)
        level += resamples(block, Downsample)
    visit("middle", "middle_block", 0, getattr(dm, "middle_block", None), level)
    for i, block in enumerate(dm.output_blocks):
        visit("output", f"output_blocks.{i}", i, block, level)
        level -= resamples(block, Upsample)
    return found


def _dit_layers(dm, family: families.Family) -> list[Layer]:
    found: list[Layer] = []
    for kind in family.blocks:
        for i in range(len(getattr(dm, kind.attr, None) or ())):
            found.append(Layer((kind.name, i), len(found), 0, f"{kind.attr}.{i}"))
    return found


def model_layers(model, what: str) -> ModelLayers:
    """The text-attention layers of a MODEL. ValueError (naming ``what``, the node) for families the registry
    does not know, or a model where none are found."""
    family = families.family_of(model, what)
    if family.no_attention_hook:
        raise families.unsupported(families.config_name(model), what, family.no_attention_hook + ".")
    dm = model.model.diffusion_model
    kind = "unet" if family.is_unet else "dit"
    layers = _unet_layers(dm) if kind == "unet" else _dit_layers(dm, family)
    if not layers:
        raise families.unsupported(families.config_name(model), what,
                                   f"this {family.label} model has no text-attention layers the pack can find.")
    exact = family.preset_arch is not None and family.preset_arch(model, len(layers))
    return ModelLayers(family, kind, tuple(layers), exact, families.config_name(model))


def block_kind(ml: ModelLayers, layer) -> families.BlockKind:
    return next(k for k in ml.family.blocks if k.name == layer[0])


def text_embedder(model, family: families.Family):
    """The diffusion model's per-token text embedding of a DiT cross-attention family (registry ``text_embedder``,
    a dotted path: Wan ``text_embedding``, PixArt ``y_embedder.y_proj``)."""
    return functools.reduce(getattr, family.text_embedder.split("."), model.model.diffusion_model)


def text_attn_paths(ml: ModelLayers, layers) -> dict:
    """Layer key -> path (under the ModelPatcher's model) of each DiT block's text-attention module (the
    registry's ``BlockKind.text_attn``)."""
    out = {}
    for layer in layers:
        layer = ml.by_key[tuple(layer)]
        attr = block_kind(ml, layer).text_attn
        if attr is None:
            raise InternalError(f"{ml.label} {layer.group} blocks name no text-attention module")
        out[layer.key] = f"diffusion_model.{layer.module}.{attr}"
    return out


def module_of(model, layer: Layer):
    """The attention module (UNet attn2) or block (DiT) of ``layer`` in ``model``'s diffusion model."""
    return model.model.diffusion_model.get_submodule(layer.module)


def layer_heads(model, ml: ModelLayers, layer) -> int:
    """Number of attention heads of a layer."""
    layer = ml.by_key[tuple(layer)]
    module = module_of(model, layer)
    path = "heads" if ml.kind == "unet" else block_kind(ml, layer).heads
    return int(functools.reduce(getattr, path.split("."), module))


def weight_prefixes(ml: ModelLayers, layer) -> tuple[str, ...]:
    """State-dict key prefixes of a layer's attention weights (for LoRA filtering and training)."""
    layer = ml.by_key[tuple(layer)]
    if ml.kind == "unet":
        return (f"diffusion_model.{layer.module}.",)
    return tuple(f"diffusion_model.{p.format(i=layer[1])}" for p in block_kind(ml, layer).weights)


# ----------------------------------------------------------------------------------------------
# the layer grammar
# ----------------------------------------------------------------------------------------------
def _forms(ml: ModelLayers) -> str:
    if ml.kind == "unet":
        return ("block.id.depth (e.g. output.2.1), block.id (every depth of that block), a group (input, middle, "
                "output), or global indices in forward order (55, 54-56)")
    first = ml.family.blocks[0].name
    return (f"{'/'.join(k.name for k in ml.family.blocks)}.i (e.g. {first}.10), a range {first}.3-5, a group "
            f"({', '.join(ml.groups())}), or global indices in forward order (10, 8-10)")


def _error(token: str, ml: ModelLayers, why: str, tail: str = "") -> ValueError:
    presets = ", ".join(["auto"] + [name for f in families.all_families() for name, _ in f.presets])
    return ValueError(f"layers: {token!r} {why}. Valid {ml.unit} of this {ml.label} model ({len(ml.layers)}): "
                      f"{ml.describe()}. Write them as {_forms(ml)}, 'all', or a preset ({presets}); separate "
                      f"several with commas.{tail}")


def int_range(text: str) -> range:
    a, _, b = text.partition("-")
    lo, hi = int(a), int(b) if b else int(a)
    if hi < lo:
        raise ValueError(f"range {text} runs backwards")
    return range(lo, hi + 1)


def _preset(name: str, ml: ModelLayers) -> tuple:
    owner = next((f for f in families.all_families() if f.preset(name) is not None), None)
    if owner is not ml.family:
        raise ValueError(f"layers: preset {name!r} is paper 2's {owner.label} preset, but this model is {ml.label}. "
                         f"Use 'auto' (the paper's layers where it localized this architecture), TextLayerLocalize's "
                         f"'layers' output, or explicit layers.")
    keys = ml.family.preset(name)
    missing = [k for k in keys if k not in ml.by_key]
    if missing:
        raise _error(name, ml, f"names {', '.join(map(layer_label, missing))}, which this model does not have (the "
                               f"preset was localized on {ml.family.preset_note}; a smaller variant needs "
                               f"TextLayerLocalize or explicit layers)")
    if not ml.paper_arch:
        raise ValueError(f"layers: preset {name!r} was localized on {ml.family.preset_note}, and this model "
                         f"({ml.model_name or ml.label}, {len(ml.layers)} {ml.unit}) is another architecture, where "
                         f"the same indices need not write the text. Run TextLayerLocalize on this model and wire its "
                         f"'layers' output here, or give explicit layers (valid: {ml.describe()}).")
    return keys


def _auto(ml: ModelLayers) -> tuple:
    if ml.family.auto_preset is None:
        localized = " and ".join(f.label for f in families.all_families() if f.auto_preset)
        raise ValueError(f"layers: 'auto' has no preset for {ml.label}: paper 2 localized the text layers of "
                         f"{localized} only. Run TextLayerLocalize on this model and wire its 'layers' output here, "
                         f"or give explicit layers (valid: {ml.describe()}).")
    return _preset(ml.family.auto_preset, ml)


def _indices(token: str, ml: ModelLayers) -> list:
    try:
        idx = int_range(token)
    except ValueError as e:
        raise _error(token, ml, str(e)) from e
    n = len(ml.layers)
    if idx[-1] >= n:
        raise _error(token, ml, f"is out of range: indices run from 0 to {n - 1}",
                     f" Indices outside 0-{n - 1} name no layer.")
    return [ml.layers[i] for i in idx]


def _named_unet(token: str, low: str, ml: ModelLayers) -> list:
    m = re.fullmatch(r"(input|middle|output)\.(\d+)(?:\.(\d+(?:-\d+)?))?", low)
    if not m:
        raise _error(token, ml, "is not a layer name")
    block, bid = m.group(1), int(m.group(2))
    in_block = [layer for layer in ml.layers if layer[0] == block and layer[1] == bid]
    if not in_block:
        raise _error(token, ml, f"is out of range: ({block}, {bid}) has no cross-attention")
    if m.group(3) is None:
        return in_block
    try:
        depths = int_range(m.group(3))
    except ValueError as e:
        raise _error(token, ml, str(e)) from e
    found = [layer for layer in in_block if layer[2] in depths]
    if len(found) != len(depths):
        raise _error(token, ml, f"is out of range: {block}.{bid} has depths 0-{len(in_block) - 1}")
    return found


def _named_dit(token: str, low: str, ml: ModelLayers) -> list:
    m = re.fullmatch(r"([a-z_]+)\.(\d+(?:-\d+)?)", low)
    if not m or m.group(1) not in ml.groups():
        raise _error(token, ml, "is not a block name of this model")
    kind = m.group(1)
    try:
        idx = int_range(m.group(2))
    except ValueError as e:
        raise _error(token, ml, str(e)) from e
    found = [layer for layer in ml.layers if layer[0] == kind and layer[1] in idx]
    if len(found) != len(idx):
        n = sum(1 for layer in ml.layers if layer[0] == kind)
        raise _error(token, ml, f"is out of range: {kind} blocks run from 0 to {n - 1}")
    return found


def _token_layers(token: str, ml: ModelLayers) -> list:
    low = token.lower()
    if low in ("all", "*"):
        return list(ml.layers)
    if low == "auto":
        return [ml.by_key[k] for k in _auto(ml)]
    if any(f.preset(low) is not None for f in families.all_families()):
        return [ml.by_key[k] for k in _preset(low, ml)]
    if re.fullmatch(r"\d+(-\d+)?", low):
        return _indices(token, ml)
    if low in ml.groups():
        return [layer for layer in ml.layers if layer.group == low]
    return _named_unet(token, low, ml) if ml.kind == "unet" else _named_dit(token, low, ml)


def parse_layers(spec: str, ml: ModelLayers) -> tuple[Layer, ...]:
    """The layers a layer string names (see :data:`GRAMMAR`), in forward order without duplicates; empty: none."""
    chosen: set = set()
    for token in re.split(r"[,;\s]+", (spec or "").strip()):
        if token:
            chosen.update(_token_layers(token, ml))
    return tuple(layer for layer in ml.layers if layer in chosen)


# ----------------------------------------------------------------------------------------------
# which layer runs now (inside an attention override)
# ----------------------------------------------------------------------------------------------
LAYER_KEY = f"{PACK}.layer"  # transformer_options key: the attention layer running now (or None)
TXT_LEN_KEY = f"{PACK}.txt_len"  # transformer_options key: text tokens at the front of a DiT sequence
FRONT_LEN_KEY = f"{PACK}.txt_front"  # transformer_options key: tokens in front of the text in a block's txt
TRACKING_KEY = f"{PACK}.layer_tracking"  # hooks key of the UNet flagging patches
BLOCK_RUN_KEY = f"{PACK}.block_run"  # transformer_options key: a new number each time a tracked DiT block starts
_block_runs = itertools.count(1)


class Marker:
    """Mutable holder shared by the patches of one model call: UNet attention patches get a *copy* of
    transformer_options, so what one patch records for another lives in an object both copies point to.
    Each clone of a model gets its own (``__deepcopy__``)."""

    __slots__ = ("layer",)

    def __init__(self):
        self.layer = None

    def __deepcopy__(self, memo):
        return type(self)()


def _flag_attn2_on(n, context, value, extra_options):
    flag = extra_options.get(LAYER_KEY)
    if flag is not None:
        block = extra_options.get("block") or (None, None)
        flag.layer = (block[0], block[1], extra_options.get("block_index", 0))
    return n, context, value


def _flag_attn2_off(n, extra_options):
    flag = extra_options.get(LAYER_KEY)
    if flag is not None:
        flag.layer = None
    return n


def current_attn2_layer(transformer_options: dict):
    """(block_name, block_id, block_index) when a UNet cross-attention runs now, else None (self-attention,
    or a model without layer tracking). Use inside an attention override."""
    flag = (transformer_options or {}).get(LAYER_KEY)
    return flag.layer if isinstance(flag, Marker) else None


def _stamp_replace(kind: str, index: int, previous):
    def replace(args, extra):
        to = args.get("transformer_options")
        if to is not None:
            to[LAYER_KEY] = (kind, index)
            to[BLOCK_RUN_KEY] = next(_block_runs)
            if "txt" in args and args["txt"] is not None:
                to[TXT_LEN_KEY] = args["txt"].shape[1]
        try:
            if previous is not None:
                return previous(args, extra)
            return extra["original_block"](args)
        finally:
            if to is not None:
                to[LAYER_KEY] = None

    return hooks.keyed(replace, TRACKING_KEY)


class CallCounter:
    """Which attention call of the running DiT block this is (0 = its first), for blocks with several attention
    calls (Wan: self-attention, then cross-attention). Each attention override that needs it owns one counter and
    asks it on every call it sees, so overrides chained together never count a call twice."""

    __slots__ = ("run", "n")

    def __init__(self):
        self.run, self.n = None, -1

    def next(self, transformer_options: dict) -> int:
        run = (transformer_options or {}).get(BLOCK_RUN_KEY)
        if run != self.run:
            self.run, self.n = run, 0
        else:
            self.n += 1
        return self.n


def text_call(ml: ModelLayers, layer) -> int:
    """Ordinal of a block's attention call that attends to the text (the registry's BlockKind.text_call; 0 when the
    block's first call is the text attention)."""
    return block_kind(ml, layer).text_call or 0


CALLS_KEY = f"{PACK}.layer_calls"  # transformer_options key: the CallPlan of the running forward (counted layers)


@dataclasses.dataclass(frozen=True)
class CallPlan:
    """Which attention call of one forward is which layer, for DiTs without a block replace (NextDiT): every
    forward makes ``lead`` attention calls first (text and image refiner blocks), then one per layer in order."""

    lead: int
    layers: tuple[Layer, ...]

    def layer(self, ordinal: int) -> Layer | None:
        i = ordinal - self.lead
        return self.layers[i] if 0 <= i < len(self.layers) else None


def running_dit_layer(transformer_options: dict, counter: CallCounter) -> tuple | None:
    """The DiT layer whose attention runs now, inside an attention override: the key a block replace stamped, or,
    on counted models, the layer of this call's ordinal in the forward (``counter``: the override's own)."""
    to = transformer_options or {}
    plan = to.get(CALLS_KEY)
    if isinstance(plan, CallPlan):
        return plan.layer(counter.next(to))
    return to.get(LAYER_KEY)


def text_multiple(dm, family: families.Family) -> int | None:
    """The multiple the model right-pads its text stream to (registry ``text_multiple``; Z-Image: 32), or None."""
    multiple = getattr(dm, family.text_multiple, None) if family.text_multiple else None
    return int(multiple) if multiple else None


def _context_len(arguments: dict) -> int | None:
    context = arguments.get("context")
    return int(context.shape[1]) if torch.is_tensor(context) else None


def _forward_reader(model_patcher):
    """(args, kwargs) of the diffusion model's forward -> its arguments by name, read through its own signature
    (HiDream passes them all by position, NextDiT transformer_options inside ``**kwargs``, which is flattened)."""
    dm = model_patcher.model.diffusion_model
    signature = inspect.signature(getattr(dm, "_forward", dm.forward))  # what the DIFFUSION_MODEL wrappers wrap
    var_kw = next((n for n, p in signature.parameters.items() if p.kind is inspect.Parameter.VAR_KEYWORD), None)

    def read(args, kwargs) -> dict:
        try:
            arguments = dict(signature.bind_partial(*args, **kwargs).arguments)
        except TypeError as e:
            raise InternalError(f"the diffusion model's forward was called with arguments its signature {signature} "
                                f"does not take; the pack cannot find its layers") from e
        arguments.update(arguments.pop(var_kw, None) or {})
        return arguments

    return read


def _counting_wrapper(plan: CallPlan, multiple: int | None, read, text_len):
    """DIFFUSION_MODEL wrapper stamping ``plan``, a new block-run number and the text length on every forward
    (``read``: :func:`_forward_reader`)."""

    def wrapper(executor, *args, **kwargs):
        arguments = read(args, kwargs)
        to = arguments.get("transformer_options")
        if isinstance(to, dict):
            to[CALLS_KEY] = plan
            to[BLOCK_RUN_KEY] = next(_block_runs)
            n = text_len(arguments)
            to[TXT_LEN_KEY] = n + (-n) % multiple if n is not None and multiple else n
        return executor(*args, **kwargs)

    return wrapper


def _front_wrapper(read, text_front):
    """DIFFUSION_MODEL wrapper stamping the tokens in front of the text in the blocks' txt (registry
    ``text_front``; Wan image-to-video: the CLIP-vision tokens) on every forward."""

    def wrapper(executor, *args, **kwargs):
        arguments = read(args, kwargs)
        to = arguments.get("transformer_options")
        if isinstance(to, dict):
            to[FRONT_LEN_KEY] = text_front(arguments)
        return executor(*args, **kwargs)

    return wrapper


def ensure_layer_tracking(model_patcher, ml: ModelLayers) -> None:
    """Make the attention layer that runs visible to attention overrides (read it with
    :func:`current_attn2_layer` on UNets, :func:`running_dit_layer` on DiTs): an attn2_patch / attn2_output_patch
    pair on UNets; chained "dit" block replaces that stamp ``transformer_options[LAYER_KEY]`` = (kind, i) and
    ``[TXT_LEN_KEY]``; on DiTs without a block replace a DIFFUSION_MODEL wrapper that stamps the forward's
    :class:`CallPlan` (layers found by counting attention calls) and ``[TXT_LEN_KEY]``; on DiT cross-attention
    without any hook (registry ``proxied``) the text-attention proxies of :mod:`.text_attn`, which hand every hook
    its layer. Idempotent."""
    to = model_patcher.model_options.setdefault("transformer_options", {})
    if ml.kind == "unet":
        if not isinstance(to.get(LAYER_KEY), Marker):
            to[LAYER_KEY] = Marker()
        if not hooks.has_attn2_patch(model_patcher, TRACKING_KEY):
            hooks.set_attn2_patches(model_patcher, TRACKING_KEY, _flag_attn2_on, _flag_attn2_off)
        return
    if ml.family.proxied:
        text_attn.install_proxies(model_patcher, ml.layers, text_attn_paths(ml, ml.layers), ml.family.flat_text)
        return
    if all(kind.replace is None for kind in ml.family.blocks):
        from comfy.patcher_extension import WrappersMP

        dm = model_patcher.model.diffusion_model
        plan = CallPlan(sum(len(getattr(dm, attr, None) or ()) for attr in ml.family.lead_calls), tuple(ml.layers))
        hooks.add_keyed_wrapper(model_patcher, WrappersMP.DIFFUSION_MODEL, TRACKING_KEY,
                                _counting_wrapper(plan, text_multiple(dm, ml.family), _forward_reader(model_patcher),
                                                  ml.family.text_len or _context_len))
        return
    if ml.family.text_front is not None:
        from comfy.patcher_extension import WrappersMP

        hooks.add_keyed_wrapper(model_patcher, WrappersMP.DIFFUSION_MODEL, TRACKING_KEY,
                                _front_wrapper(_forward_reader(model_patcher), ml.family.text_front))
    for layer in ml.layers:
        chain_block_replace(model_patcher, ml, layer, lambda previous, layer=layer: previous if getattr(
            previous, hooks.KEY_ATTR, None) == TRACKING_KEY else _stamp_replace(layer[0], layer[1], previous))


def chain_block_replace(model_patcher, ml: ModelLayers, layer, make) -> None:
    """Install ``make(previous)`` as the "dit" block replace of ``layer``; ``previous`` is the replace already
    installed there (None: none), which the new one must run instead of the original block."""
    kind = block_kind(ml, layer)
    if kind.replace is None:
        raise InternalError(f"{ml.label} {kind.name} blocks have no block replace")
    replaces = model_patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    model_patcher.set_model_patch_replace(make(replaces.get((kind.replace, layer[1]))), "dit", kind.replace,
                                          layer[1])

