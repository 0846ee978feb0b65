"""Shared patch mechanics of the pack: the one place every node gets them from.

* **Run tracking.** :func:`ensure_run_tracking` installs two keyed wrappers on a cloned ModelPatcher:
  OUTER_SAMPLE creates a fresh :class:`RunState` for every sampling run (and publishes it to every
  model call through ``transformer_options``), SAMPLER_SAMPLE records the sampler's per-step callback.
  Per-run stores (:meth:`RunState.store`) therefore start empty on every run and are never shared
  between runs or between clones of a model.
* **Step arithmetic.** :func:`current_step` maps a model call to the sampler's step index, also for
  2nd-order samplers whose corrector runs at the *next* sigma (heun, heunpp2) and for denoise < 1
  (indices are relative to the schedule actually sampled). :func:`step_fraction` and
  :func:`resolve_cutoff_step` build on it.
* **Rows.** :func:`chunk_roles` / :func:`row_mask` say which batch rows of a model call belong to the
  positive or negative conditioning, by the conds' uuids (never by assuming ``[uncond, cond]`` order).
* **Single-slot hooks.** :func:`chain_attention_override`, :func:`chain_model_function_wrapper` and
  :func:`chain_sampler_cfg_function` install a hook that calls whatever was installed before.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import comfy.patcher_extension
import torch
from comfy.patcher_extension import WrappersMP

LOG = logging.getLogger("prompt_anatomy")

PACK = "prompt_anatomy"
RUN_KEY = f"{PACK}.run"  # key of the RunState in transformer_options
RUN_WRAPPER_KEY = f"{PACK}.run_tracking"  # key of the pack's tracking wrappers

# Samplers whose extra model evaluations of step i run at sigma >= sigmas[i + 1] (so their sigma alone
# would say "step i + 1"). Value: number of such evaluations after the step's callback.
def _heun_extra(sigmas: torch.Tensor, i: int) -> int:
    return 0 if float(sigmas[i + 1]) == 0.0 else 1


def _heunpp2_extra(sigmas: torch.Tensor, i: int) -> int:
    s_end = float(sigmas[-1])
    if float(sigmas[i + 1]) == s_end:
        return 0
    if float(sigmas[i + 2]) == s_end:
        return 1
    return 2


CORRECTOR_AT_NEXT_SIGMA: dict[str, Callable[[torch.Tensor, int], int]] = {
    "sample_heun": _heun_extra,
    "sample_heunpp2": _heunpp2_extra,
}


class RunState:
    """State of one sampling run (one OUTER_SAMPLE call). Not a dict on purpose: ComfyUI copies nested
    dicts of model_options per call, but passes other objects by reference."""

    def __init__(self, roles: dict[Any, str], cfg: float | None = None):
        self.roles = roles  # cond uuid -> "positive" / "negative" / other guider key
        self.cfg = cfg  # the guider's cfg scale (None for guiders without one)
        self.sample_sigmas: torch.Tensor | None = None
        self.sampler_name: str | None = None
        self.last_callback_step = -1
        self.corrector_left = 0
        self.callback_count = 0
        self.eval_step: int | None = None  # step of the sampler evaluation in progress
        self.evaluations = 0  # sampler-level evaluations (PREDICT_NOISE calls) so far
        self._stores: dict[str, Any] = {}
        self._finishers: list[Callable[[RunState], None]] = []

    def store(self, name: str, factory: Callable[[], Any]) -> Any:
        """The per-run store called ``name`` (created with ``factory()`` on first use in this run)."""
        if name not in self._stores:
            self._stores[name] = factory()
        return self._stores[name]

    def peek(self, name: str, default=None):
        return self._stores.get(name, default)

    def on_finish(self, fn: Callable[[RunState], None]) -> None:
        """Call ``fn(run)`` once when the run ends (also after an error or an interrupt)."""
        self._finishers.append(fn)

    def step_for_sigma(self, sigma) -> int:
        """Step of a sampler evaluation at ``sigma``: the step whose callback fired last while its
        corrector evaluations (heun family) are pending, else the schedule interval of the sigma."""
        if self.corrector_left > 0:
            return self.last_callback_step
        return sigma_step_index(self.sample_sigmas, sigma)

    # called by the SAMPLER_SAMPLE wrapper's callback
    def _record_callback(self, step: int) -> None:
        self.callback_count += 1
        self.last_callback_step = int(step)
        extra = CORRECTOR_AT_NEXT_SIGMA.get(self.sampler_name or "")
        ss = self.sample_sigmas
        self.corrector_left = extra(ss, int(step)) if (extra is not None and ss is not None and step + 1 < len(ss)) else 0

    def _finish(self) -> None:
        for fn in self._finishers:
            try:
                fn(self)
            except Exception:  # a finisher must never hide the sampler's own result or error
                LOG.exception("prompt_anatomy: a run finisher failed")
        self._finishers.clear()


def _roles_from_guider(guider) -> dict[Any, str]:
    roles = {}
    for key, entries in (getattr(guider, "conds", None) or {}).items():
        for entry in entries or []:
            if isinstance(entry, dict) and "uuid" in entry:
                roles[entry["uuid"]] = key
    return roles


def _outer_sample_wrapper(executor, *args, **kwargs):
    guider = executor.class_obj
    cfg = getattr(guider, "cfg", None)
    run = RunState(_roles_from_guider(guider), cfg if isinstance(cfg, (int, float)) else None)
    to = guider.model_options.setdefault("transformer_options", {})
    previous = to.get(RUN_KEY)
    to[RUN_KEY] = run
    try:
        return executor(*args, **kwargs)
    finally:
        run._finish()
        if previous is None:
            to.pop(RUN_KEY, None)
        else:
            to[RUN_KEY] = previous


def _sampler_sample_wrapper(executor, guider, sigmas, extra_args, callback, *args, **kwargs):
    to = extra_args.get("model_options", {}).get("transformer_options", {})
    run = to.get(RUN_KEY)
    if run is not None:
        run.sample_sigmas = sigmas
        fn = getattr(executor.class_obj, "sampler_function", None)
        run.sampler_name = getattr(fn, "__name__", None)

        def tracking_callback(step, x0, x, total_steps):
            run._record_callback(step)
            if callback is not None:
                return callback(step, x0, x, total_steps)

        return executor(guider, sigmas, extra_args, tracking_callback, *args, **kwargs)
    return executor(guider, sigmas, extra_args, callback, *args, **kwargs)


def _predict_noise_wrapper(executor, x, timestep, model_options={}, seed=None):
    run = run_state(model_options)
    if run is None or run.sample_sigmas is None:
        return executor(x, timestep, model_options, seed)
    outer = run.eval_step
    run.eval_step = run.step_for_sigma(timestep)
    run.evaluations += 1
    try:
        return executor(x, timestep, model_options, seed)
    finally:
        if outer is None and run.corrector_left > 0:
            run.corrector_left -= 1
        run.eval_step = outer


def ensure_run_tracking(model_patcher) -> None:
    """Install the pack's run-tracking wrappers on ``model_patcher`` (a clone you own). Idempotent; an
    existing installation keeps its place, so it stays outside every wrapper added after it."""
    for wrapper_type, fn in ((WrappersMP.OUTER_SAMPLE, _outer_sample_wrapper),
                             (WrappersMP.SAMPLER_SAMPLE, _sampler_sample_wrapper),
                             (WrappersMP.PREDICT_NOISE, _predict_noise_wrapper)):
        if not model_patcher.get_wrappers(wrapper_type, RUN_WRAPPER_KEY):
            model_patcher.add_wrapper_with_key(wrapper_type, RUN_WRAPPER_KEY, fn)


def run_state(transformer_options: dict | None) -> RunState | None:
    """The RunState of the current sampling run, from a model call's transformer_options (or a
    model_options dict, whose "transformer_options" is looked into)."""
    if not transformer_options:
        return None
    if RUN_KEY not in transformer_options and "transformer_options" in transformer_options:
        transformer_options = transformer_options["transformer_options"]
    return transformer_options.get(RUN_KEY)


# ----------------------------------------------------------------------------------------------
# step / sigma arithmetic
# ----------------------------------------------------------------------------------------------
def _sigma_value(sigma) -> float:
    if isinstance(sigma, torch.Tensor):
        return float(sigma.reshape(-1)[0])
    return float(sigma)


def sigma_step_index(sample_sigmas: torch.Tensor, sigma) -> int:
    """Index i of the schedule interval [sigmas[i], sigmas[i+1]) that ``sigma`` falls in: the last i with
    sigmas[i] >= sigma (relative tolerance 1e-5), clamped to [0, steps - 1]."""
    s = _sigma_value(sigma)
    ss = sample_sigmas[:-1].float()
    count = int((ss >= s * (1.0 - 1e-5)).sum())
    return min(max(count - 1, 0), max(len(ss) - 1, 0))


def current_step(transformer_options: dict, sigma=None) -> int | None:
    """Sampler step index (0-based) of the model call described by ``transformer_options`` (a model
    call's transformer_options or a model_options dict).

    Inside a tracked run this is the step of the sampler evaluation in progress (fixed by the pack's
    PREDICT_NOISE wrapper), so every model call of that evaluation — including extra passes by PAG, SAG
    or SLG — and both evaluations of a 2nd-order step agree. Otherwise it is computed from the sigma.
    None when the call is not part of a sampler run with a known schedule."""
    run = run_state(transformer_options)
    if run is not None and run.eval_step is not None:
        return run.eval_step
    to = transformer_options or {}
    if "sample_sigmas" not in to and "transformer_options" in to:
        to = to["transformer_options"]
    ss = to.get("sample_sigmas")
    if sigma is None:
        sigma = to.get("sigmas")
    if ss is None or sigma is None:
        return None
    return sigma_step_index(ss, sigma)


def total_steps(transformer_options: dict) -> int | None:
    to = transformer_options or {}
    if "transformer_options" in to and "sample_sigmas" not in to:
        to = to["transformer_options"]
    ss = to.get("sample_sigmas")
    return None if ss is None else len(ss) - 1


def step_fraction(step: int, n_steps: int) -> float:
    """Fraction of the sampling steps done before ``step`` starts (0 for the first step)."""
    return 0.0 if n_steps <= 0 else step / n_steps


CUTOFF_UNITS = ("fraction", "step", "sigma")


def validate_cutoff(cutoff: float, unit: str, steps: int | None = None) -> None:
    """Raise ValueError with a user-facing message for an impossible cutoff."""
    if unit not in CUTOFF_UNITS:
        raise ValueError(f"cutoff_unit must be one of {', '.join(CUTOFF_UNITS)}, got {unit!r}.")
    if not math.isfinite(cutoff):
        raise ValueError(f"cutoff must be a finite number, got {cutoff!r}.")
    if unit == "fraction" and cutoff < 0:
        raise ValueError(f"cutoff {cutoff} is negative: with cutoff_unit 'fraction' use a value from 0 "
                         f"(no guidance at all) to 1 (guidance on every step).")
    if unit == "step":
        if cutoff < 0:
            raise ValueError(f"cutoff {cutoff} is negative: with cutoff_unit 'step' give the index of the first "
                             f"step without guidance (0 to steps).")
        if cutoff != int(cutoff):
            raise ValueError(f"cutoff {cutoff} is not a whole step index: with cutoff_unit 'step' use an integer.")
        if steps is not None and cutoff > steps:
            raise ValueError(f"cutoff step {int(cutoff)} is beyond the last step: the sampler runs {steps} steps, so "
                             f"use 0..{steps} ({steps} keeps guidance on every step).")
    if unit == "sigma" and cutoff <= 0:
        raise ValueError(f"cutoff sigma {cutoff} must be > 0: guidance stops at the first step whose sigma is at or "
                         f"below it, and every sigma of a schedule but the final 0 is positive.")


def resolve_cutoff_step(cutoff: float, unit: str, sample_sigmas: torch.Tensor) -> int:
    """First step index (0..steps) at or after the cutoff; ``steps`` means "never"."""
    n = len(sample_sigmas) - 1
    validate_cutoff(cutoff, unit, n if unit == "step" else None)
    if unit == "fraction":
        return min(n, max(0, math.ceil(cutoff * n - 1e-9)))
    if unit == "step":
        return int(cutoff)
    # sigma: first step whose starting sigma is at or below the cutoff
    for i in range(n):
        if float(sample_sigmas[i]) <= cutoff * (1.0 + 1e-6):
            return i
    return n


# ----------------------------------------------------------------------------------------------
# rows of a model call
# ----------------------------------------------------------------------------------------------
def chunk_roles(transformer_options: dict, guider_order: tuple[str, ...] = ("positive", "negative")) -> list[str | None]:
    """Role of each chunk of a batched model call ("positive", "negative", ... or None if unknown).

    By uuid when the run is tracked; otherwise from ``cond_or_uncond`` read with ``guider_order`` (the
    CFGGuider convention 0 = positive, 1 = negative), which is only right for plain CFG calls."""
    uuids = transformer_options.get("uuids") or []
    run = run_state(transformer_options)
    if run is not None and run.roles and uuids:
        return [run.roles.get(u) for u in uuids]
    coc = transformer_options.get("cond_or_uncond") or []
    return [guider_order[i] if 0 <= i < len(guider_order) else None for i in coc]


def row_mask(transformer_options: dict, n_rows: int, roles=("positive",), device=None) -> torch.Tensor:
    """Boolean mask over the ``n_rows`` leading rows of a tensor of this model call: True where the row
    belongs to one of ``roles``. ``n_rows`` may be a multiple of the batch (e.g. batch * heads, rows
    grouped per chunk as ComfyUI lays them out)."""
    chunks = chunk_roles(transformer_options)
    if not chunks:
        return torch.zeros(n_rows, dtype=torch.bool, device=device)
    if n_rows % len(chunks) != 0:
        raise ValueError(f"internal: {n_rows} rows cannot be split into {len(chunks)} conditioning chunks")
    per = n_rows // len(chunks)
    flags = torch.tensor([r in roles for r in chunks], dtype=torch.bool, device=device)
    return flags.repeat_interleave(per)


# ----------------------------------------------------------------------------------------------
# single-slot hooks, chained
# ----------------------------------------------------------------------------------------------
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

    override.prompt_anatomy_previous = prev
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


def get_all_wrappers(wrapper_type: str, model_options: dict):
    return comfy.patcher_extension.get_all_wrappers(wrapper_type, model_options, is_model_options=True)


# ----------------------------------------------------------------------------------------------
# model families and attention layers
# ----------------------------------------------------------------------------------------------
FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux")


def model_family(model_patcher) -> str:
    """'sd1', 'sd2', 'sdxl', 'sd3', 'flux', or the model config's class name for anything else (matched by
    exact config class, so e.g. Flux2 — another text encoder — is not taken for Flux.1)."""
    name = type(model_patcher.model.model_config).__name__
    for family, names in _FAMILY_CONFIGS:
        if name in names:
            return family
    return name


_FAMILY_CONFIGS = (
    ("sd1", ("SD15", "SD15_instructpix2pix")),
    ("sd2", ("SD20", "SD21UnclipL", "SD21UnclipH", "SD_X4Upscaler")),
    ("sdxl", ("SDXL", "SDXLRefiner", "SSD1B", "Segmind_Vega", "KOALA_700M", "KOALA_1B", "SDXL_instructpix2pix")),
    ("sd3", ("SD3",)),
    ("flux", ("Flux", "FluxSchnell", "FluxInpaint")),
)


def unsupported_family(family: str, what: str, why: str) -> ValueError:
    return ValueError(f"{what} does not support this model ({family}): {why}")


def unet_attn2_layers(model_patcher) -> list[tuple[str, int, int]]:
    """Cross-attention layers of a UNet in forward order, as ComfyUI's attn2 patch keys
    (block_name, block_id, block_index); the position in the list is the global cross-attention index."""
    dm = model_patcher.model.diffusion_model
    if not hasattr(dm, "input_blocks"):
        return []
    from comfy.ldm.modules.attention import SpatialTransformer

    layers = []

    def visit(name, idx, block):
        for module in block:
            if isinstance(module, SpatialTransformer):
                for bi, tb in enumerate(module.transformer_blocks):
                    if getattr(tb, "attn2", None) is not None:
                        layers.append((name, idx, bi))

    for i, block in enumerate(dm.input_blocks):
        visit("input", i, block)
    visit("middle", 0, dm.middle_block)
    for i, block in enumerate(dm.output_blocks):
        visit("output", i, block)
    return layers


def dit_blocks(model_patcher) -> list[tuple[str, int]]:
    """Attention blocks of an MMDiT (("joint", i)) or Flux (("double", i), ("single", i)) in forward order."""
    dm = model_patcher.model.diffusion_model
    if hasattr(dm, "joint_blocks"):
        return [("joint", i) for i in range(len(dm.joint_blocks))]
    if hasattr(dm, "double_blocks"):
        return [("double", i) for i in range(len(dm.double_blocks))] + \
               [("single", i) for i in range(len(getattr(dm, "single_blocks", [])))]
    return []


LAYER_KEY = f"{PACK}.layer"  # transformer_options key: the attention layer running now (or None)
TXT_LEN_KEY = f"{PACK}.txt_len"  # transformer_options key: text tokens at the front of a DiT sequence


class _LayerFlag:
    """Mutable holder shared by the UNet attn2 flagging patches of one model call: UNet attention patches
    get a *copy* of transformer_options, so the flag lives in an object both copies point to."""

    __slots__ = ("layer",)

    def __init__(self):
        self.layer = None

    def __deepcopy__(self, memo):  # each clone gets its own flag
        return _LayerFlag()


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
    return flag.layer if isinstance(flag, _LayerFlag) else None


def _stamp_replace(kind: str, index: int, previous):
    def replace(args, extra):
        to = args.get("transformer_options")
        if to is not None:
            to[LAYER_KEY] = (kind, index)
            if "txt" in args and args["txt"] is not None:
                to[TXT_LEN_KEY] = args["txt"].shape[1]
        try:
            if previous is not None:
                return previous(args, extra)
            return extra["original_block"](args)
        finally:
            if to is not None:
                to[LAYER_KEY] = None

    replace.prompt_anatomy_stamp = True
    return replace


def ensure_layer_tracking(model_patcher) -> None:
    """Make the attention layer that runs visible to attention overrides: ``current_attn2_layer`` for UNets
    (an attn2_patch / attn2_output_patch pair), and ``transformer_options[LAYER_KEY]`` = ("joint"|"double"|
    "single", i) plus ``[TXT_LEN_KEY]`` for SD3/Flux (chained "dit" block replaces). Idempotent."""
    to = model_patcher.model_options.setdefault("transformer_options", {})
    dm = model_patcher.model.diffusion_model
    if hasattr(dm, "input_blocks"):
        if not isinstance(to.get(LAYER_KEY), _LayerFlag):
            to[LAYER_KEY] = _LayerFlag()
        patches = to.get("patches", {})
        if _flag_attn2_on not in patches.get("attn2_patch", []):
            model_patcher.set_model_attn2_patch(_flag_attn2_on)
        if _flag_attn2_off not in patches.get("attn2_output_patch", []):
            model_patcher.set_model_attn2_output_patch(_flag_attn2_off)
        return
    replaces = to.get("patches_replace", {}).get("dit", {})
    for kind, i in dit_blocks(model_patcher):
        key = ("single_block" if kind == "single" else "double_block", i)
        previous = replaces.get(key)
        if getattr(previous, "prompt_anatomy_stamp", False):
            continue
        model_patcher.set_model_patch_replace(_stamp_replace(kind, i, previous), "dit", key[0], i)
