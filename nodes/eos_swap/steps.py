"""Step ranges of the EOS swap in either unit (issue #16.7).

* ``timestep_percent`` (the node's original meaning, kept for saved workflows): ComfyUI's timestep percents, as
  ConditioningSetTimestepRange — 0.5 is the sigma ``model_sampling.percent_to_sigma(0.5)``, whatever the
  scheduler; on 20 steps, end 0.5 covers 10 steps with ``normal`` but 7 with ``exponential``.
* ``step_fraction`` (the unit of TextLayerPatch and the guidance cutoff): a fraction of the steps the sampler
  runs, resolved with core's :func:`runs.resolve_cutoff_step`: the range [start, end) covers steps
  ``ceil(start·n) .. ceil(end·n) - 1`` of the n sampled steps (end 1 = through the last step); every model call
  of a step (2nd-order correctors and midpoints too) belongs to that step. The entries carry their step window
  under :data:`STEP_KEY` and a keyed CALC_COND_BATCH wrapper on the MODEL drops the entries whose window does not
  hold the current step, so exactly one entry of the prompt is active per step and no extra row runs. The plain
  entries outside the range are also made inactive for ComfyUI itself (a timestep range that never matches) and
  only the wrapper turns them on: a sampler given this conditioning with a MODEL that lacks the wrapper sees the
  constructed entry on every step (as start 0 / end 1), never two entries averaged.
"""

from __future__ import annotations

from comfy.patcher_extension import WrappersMP

from ..core import PACK, hooks, runs

RANGE_UNITS = ("timestep_percent", "step_fraction")
STEP_KEY = f"{PACK}.eos_swap.step_window"  # conditioning-entry key: (start, end) fractions of the steps
WRAPPER_KEY = f"{PACK}.eos_swap.step_window"


def in_window(start: float, end: float, step: int, sample_sigmas) -> bool:
    lo, hi = runs.fraction_window(start, end, sample_sigmas)
    # end 1.0 reaches step n (past the last step): the last step is inside
    return lo <= step < hi


def split_by_steps(constructed: list, plain: list, start: float, end: float) -> list:
    """CONDITIONING entries tagged with step windows: plain before ``start``, constructed in [start, end), plain
    from ``end`` on. start 0 / end 1 leave out the plain part on that side."""
    if start <= 0.0 and end >= 1.0:
        return [[c, dict(d)] for c, d in constructed]
    off = {"start_percent": 1.0, "end_percent": 1.0}  # sigma 0 .. 0: never active without the wrapper
    out = []
    if start > 0.0:
        out += [[c, {**d, **off, STEP_KEY: (0.0, start)}] for c, d in plain]
    out += [[c, {**d, STEP_KEY: (start, end)}] for c, d in constructed]
    if end < 1.0:
        out += [[c, {**d, **off, STEP_KEY: (end, 1.0)}] for c, d in plain]
    return out


def _enabled(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k not in ("timestep_start", "timestep_end")}


def _calc_cond_batch(executor, model, conds, x_in, timestep, model_options):
    run = runs.run_state(model_options)
    step = runs.current_step(model_options, timestep)
    ss = run.sample_sigmas if run is not None else None
    if step is None or ss is None:  # not a sampler run (the entries fall back to ComfyUI's own ranges)
        return executor(model, conds, x_in, timestep, model_options)
    kept = []
    for entries in conds:
        if entries is None:
            kept.append(entries)
            continue
        kept.append([c if STEP_KEY not in c else _enabled(c) for c in entries
                     if STEP_KEY not in c or in_window(*c[STEP_KEY], step, ss)])
    return executor(model, kept, x_in, timestep, model_options)


def install(model_patcher) -> None:
    """Make ``model_patcher`` (a clone you own) honour the step windows of the EOS swap's entries."""
    runs.ensure_run_tracking(model_patcher)
    hooks.add_keyed_wrapper(model_patcher, WrappersMP.CALC_COND_BATCH, WRAPPER_KEY, _calc_cond_batch)
