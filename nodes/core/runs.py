"""Run tracking, step arithmetic and the rows of a model call: the one place every node gets them from.

* **Run tracking.** :func:`ensure_run_tracking` installs keyed wrappers on a cloned ModelPatcher:
  OUTER_SAMPLE creates a fresh :class:`RunState` for every sampling run (and publishes it to every
  model call through ``transformer_options``), SAMPLER_SAMPLE records the sampler's per-step callback,
  PREDICT_NOISE fixes the step of each sampler evaluation. Per-run stores (:meth:`RunState.store`)
  therefore start empty on every run and are never shared between runs or between clones of a model.
* **Step arithmetic.** :func:`current_step` maps a model call to the sampler's step index, also for
  2nd-order samplers whose corrector runs at the *next* sigma (heun, heunpp2) and for denoise < 1
  (indices are relative to the schedule actually sampled). :func:`resolve_cutoff_step` builds on it.
* **Rows.** :func:`chunk_roles` / :func:`row_mask` say which batch rows of a model call belong to the
  positive or negative conditioning, by the conds' uuids (never by assuming ``[uncond, cond]`` order).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from comfy.patcher_extension import WrappersMP

from . import LOG, PACK
from .errors import InternalError

RUN_KEY = f"{PACK}.run"  # key of the RunState in transformer_options
RUN_WRAPPER_KEY = f"{PACK}.run_tracking"  # key of the pack's tracking wrappers


# Evaluations of step i that run after its callback, per sampler (see CORRECTOR_AT_NEXT_SIGMA).
def _heun_extra(sigmas: torch.Tensor, i: int) -> int:
    return 0 if float(sigmas[i + 1]) == 0.0 else 1


def _seeds3_extra(sigmas: torch.Tensor, i: int) -> int:
    return 0 if float(sigmas[i + 1]) == 0.0 else 2


def _heunpp2_extra(sigmas: torch.Tensor, i: int) -> int:
    s_end = float(sigmas[-1])
    if float(sigmas[i + 1]) == s_end:
        return 0
    if float(sigmas[i + 2]) == s_end:
        return 1
    return 2


# Samplers whose later evaluations of step i run after step i's callback, at the next schedule sigma (heun) or at a
# midpoint that can coincide with it (dpm_2_ancestral on karras): counted, since their sigma cannot tell.
CORRECTOR_AT_NEXT_SIGMA: dict[str, Callable[[torch.Tensor, int], int]] = {
    "sample_heun": _heun_extra,
    "sample_heunpp2": _heunpp2_extra,
    **{f"sample_{name}": _heun_extra for name in (
        "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu",
        "seeds_2", "exp_heun_2_x0", "exp_heun_2_x0_sde")},  # the last two: seeds_2 with r = 1 (ComfyUI >= 0.8)
    "sample_seeds_3": _seeds3_extra,
}


class _Evaluation:
    """One sampler evaluation (PREDICT_NOISE call): its step is worked out when first asked, from the run's state
    when the evaluation began. On an accelerator the sigma is copied to the host without waiting and read only
    then, so a run whose hooks never ask (tracking alone) never stalls the device queue."""

    __slots__ = ("run", "corrector", "last", "sigma", "ready", "_step")

    def __init__(self, run: RunState, timestep):
        self.run, self.corrector, self.last = run, run.corrector_left > 0, run.last_callback_step
        self._step: int | None = None
        self.ready = None
        sigma = timestep.detach().reshape(-1)[:1] if isinstance(timestep, torch.Tensor) else timestep
        if isinstance(sigma, torch.Tensor) and sigma.device.type == "cuda":
            with torch.cuda.device(sigma.device):  # the event must follow the copy on the sigma's own device
                host = torch.empty(1, dtype=sigma.dtype, pin_memory=True)
                host.copy_(sigma, non_blocking=True)
                self.ready = torch.cuda.Event()
                self.ready.record()
            sigma = host
        self.sigma = sigma

    def step(self) -> int:
        if self._step is None:
            if self.ready is not None:
                self.ready.synchronize()
            self._step = self.run.step_for_sigma(self.sigma, self.corrector, self.last)
        return self._step


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
        self._eval: _Evaluation | None = None  # the sampler evaluation in progress
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

    @property
    def eval_step(self) -> int | None:
        """Step of the sampler evaluation in progress (None outside one)."""
        return None if self._eval is None else self._eval.step()

    def step_for_sigma(self, sigma, corrector: bool | None = None, last_callback_step: int | None = None) -> int:
        """Step of a sampler evaluation at ``sigma`` (given the corrector count and last callback step when the
        evaluation began; default: now). A step's first evaluation runs at its schedule sigma, then the sampler's
        callback fires; later evaluations of the same step run after that callback: the heun family's correctors at
        the *next* schedule sigma (counted, see CORRECTOR_AT_NEXT_SIGMA), and midpoint evaluations (dpm_2,
        ancestral 2S, SDE samplers) at a sigma off the schedule — which can lie below the next step's sigma, so an
        off-schedule evaluation after step i's callback belongs to step i."""
        corrector = self.corrector_left > 0 if corrector is None else corrector
        last = self.last_callback_step if last_callback_step is None else last_callback_step
        if corrector:
            return last
        ss = self.sample_sigmas
        if schedule_index(ss, sigma) is None and 0 <= last < len(ss) - 1 and _sigma_value(sigma) < float(ss[last]):
            return last
        return sigma_step_index(ss, sigma)

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
        run.sample_sigmas = sigmas.detach().cpu()  # one copy per run: step arithmetic never waits for the device
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
    outer = run._eval
    run._eval = _Evaluation(run, timestep)
    run.evaluations += 1
    try:
        return executor(x, timestep, model_options, seed)
    finally:
        if outer is None and run.corrector_left > 0:
            run.corrector_left -= 1
        run._eval = outer


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


def schedule_index(sample_sigmas: torch.Tensor, sigma) -> int | None:
    """Index of the schedule sigma equal to ``sigma`` (relative tolerance 1e-5), else None."""
    s = _sigma_value(sigma)
    ss = sample_sigmas[:-1].float()
    hits = torch.nonzero((ss - s).abs() <= 1e-5 * max(abs(s), 1e-12)).reshape(-1)
    return int(hits[-1]) if len(hits) else None


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


def fraction_window(start: float, end: float, sample_sigmas: torch.Tensor) -> tuple[int, int]:
    """First step and one past the last step of [start, end), given as fractions of the sampled steps."""
    return (resolve_cutoff_step(start, "fraction", sample_sigmas), resolve_cutoff_step(end, "fraction", sample_sigmas))


def check_full_schedule(full_sigmas, name: str = "full_sigmas") -> torch.Tensor:
    """``full_sigmas`` as a 1-D float32 CPU tensor, or the ValueError that says what to connect."""
    if not isinstance(full_sigmas, torch.Tensor) or full_sigmas.ndim != 1 or len(full_sigmas) < 2:
        shape = tuple(full_sigmas.shape) if isinstance(full_sigmas, torch.Tensor) else type(full_sigmas).__name__
        raise ValueError(f"{name} must be a SIGMAS schedule of at least one step (e.g. from BasicScheduler), got "
                         f"{shape}.")
    s = full_sigmas.detach().float().cpu()
    if not bool(torch.isfinite(s).all()) or bool((s[1:] > s[:-1] * (1.0 + 1e-6)).any()):
        raise ValueError(f"{name} must be a finite, non-increasing noise schedule (as BasicScheduler outputs), got "
                         f"{[round(float(v), 4) for v in s[:8]]}{' ...' if len(s) > 8 else ''}.")
    return s


def schedule_offset(sample_sigmas: torch.Tensor, full_sigmas: torch.Tensor) -> int | None:
    """Index in ``full_sigmas`` of a run's first step: the ``o`` with ``full_sigmas[o + i] == sample_sigmas[i]``
    (relative tolerance 1e-5) for every step i of the run — KSamplerAdvanced's start_at_step/end_at_step sample
    such a slice. The run's last sigma is not compared (KSamplerAdvanced sets it to 0 when it ends early with
    return_with_leftover_noise off). None when the run's sigmas are no stretch of ``full_sigmas``."""
    ss = sample_sigmas.detach().float().cpu()[:-1]
    full = full_sigmas.detach().float().cpu()
    n = len(ss)
    for o in range(0, len(full) - n):
        window = full[o:o + n]
        if bool(((window - ss).abs() <= 1e-5 * ss.abs().clamp_min(1e-12)).all()):
            return o
    return None


# Sampler functions of KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS (uni_pc, uni_pc_bh2, dpm_2, dpm_2_ancestral):
# ComfyUI samples them on a schedule of steps + 1 with its second-to-last sigma dropped.
DISCARD_PENULTIMATE_FUNCTIONS = frozenset({"sample_unipc", "sample_unipc_bh2", "sample_dpm_2",
                                           "sample_dpm_2_ancestral"})


def locate_in_schedule(sample_sigmas: torch.Tensor, full_sigmas: torch.Tensor,
                       sampler_name: str | None = None) -> tuple[int, torch.Tensor] | None:
    """(offset, whole schedule as sampled) of a run inside ``full_sigmas``; None when it is no stretch of it.
    For the samplers of DISCARD_PENULTIMATE_FUNCTIONS (``sampler_name``: RunState.sampler_name) the whole schedule
    is a BasicScheduler of steps + 1 with its second-to-last sigma dropped, as ComfyUI samples them."""
    if sampler_name in DISCARD_PENULTIMATE_FUNCTIONS and len(full_sigmas) > 2:
        full_sigmas = torch.cat([full_sigmas[:-2], full_sigmas[-1:]])
    offset = schedule_offset(sample_sigmas, full_sigmas)
    return None if offset is None else (offset, full_sigmas)


def resolve_cutoff_step(cutoff: float, unit: str, sample_sigmas: torch.Tensor,
                        full_sigmas: torch.Tensor | None = None, sampler_name: str | None = None) -> int:
    """First step index (0..steps) at or after the cutoff; ``steps`` means "never".

    With ``full_sigmas`` (the whole schedule a run is a slice of, e.g. one KSamplerAdvanced of two) the cutoff is
    resolved on the whole schedule and mapped into the run: a fraction or step of the whole schedule lands on the
    same step whichever run it falls in (0 when it lies before the run, ``steps`` when after it)."""
    if full_sigmas is not None:
        found = locate_in_schedule(sample_sigmas, full_sigmas, sampler_name)
        if found is None:
            n_full = len(full_sigmas) - 1
            raise ValueError(
                f"The sampler's sigmas ({float(sample_sigmas[0]):.4g} ... {float(sample_sigmas[-1]):.4g}, "
                f"{len(sample_sigmas) - 1} steps) are not a stretch of full_sigmas ({float(full_sigmas[0]):.4g} ... "
                f"{float(full_sigmas[-1]):.4g}, {n_full} steps). Connect to full_sigmas a BasicScheduler with the "
                f"same model, scheduler and steps as the KSamplerAdvanced nodes and denoise 1.0 (steps + 1 for "
                f"uni_pc, uni_pc_bh2, dpm_2 and dpm_2_ancestral, which ComfyUI samples on steps + 1 sigmas with the "
                f"second-to-last dropped), or disconnect it.")
        offset, full_sigmas = found
        n = len(sample_sigmas) - 1
        return min(n, max(0, resolve_cutoff_step(cutoff, unit, full_sigmas) - offset))
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
        raise InternalError(f"{n_rows} rows cannot be split into {len(chunks)} conditioning chunks")
    per = n_rows // len(chunks)
    flags = torch.tensor([r in roles for r in chunks], dtype=torch.bool, device=device)
    return flags.repeat_interleave(per)


