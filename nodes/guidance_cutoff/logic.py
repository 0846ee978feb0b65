"""Guidance cutoff (paper 1, Sec. 6, eq. 9): classifier-free guidance for the early steps only.

After the cutoff each sampler evaluation runs a single branch, so the model sees half the rows:

    eps = eps(neg) + w * (eps(pos) - eps(neg))   before the cutoff (plain CFG)
    eps = eps(neg)            (keep="negative", the paper's eq. 9)   after the cutoff
    eps = eps(pos)            (keep="positive", cfg 1 as A1111/Forge do)   after the cutoff

One implementation serves three nodes: a keyed CALC_COND_BATCH wrapper (:func:`apply_cutoff`) that
replaces the two-branch call by a one-branch call and hands the same prediction back for both branches,
so ``cfg_function``, post-CFG hooks and CFG++ samplers all see a consistent pair. The sampler node runs
core ``common_ksampler`` on the patched model (same noise, previews and progress bar as KSampler), the
guider node wraps the patched model in a CFGGuider, and the patch node returns the patched MODEL.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import torch
from comfy.patcher_extension import WrappersMP

from ..core import LOG, PACK, hooks, runs
from ..shared.spectral import split_frequencies

WRAPPER_KEY = f"{PACK}.guidance_cutoff"
STORE = f"{PACK}.guidance_cutoff"

KEEP_MODES = ("negative", "positive")
ADAPTIVE_MODES = ("off", "cosine", "low_frequency")


@dataclasses.dataclass(frozen=True)
class CutoffSettings:
    cutoff: float = 0.6
    cutoff_unit: str = "fraction"
    keep: str = "negative"
    adaptive: str = "off"
    cosine_threshold: float = 0.98
    lowfreq_threshold: float = 0.02

    def validate(self, steps: int | None = None) -> None:
        runs.validate_cutoff(self.cutoff, self.cutoff_unit, steps)
        if self.keep not in KEEP_MODES:
            raise ValueError(f"keep must be one of {', '.join(KEEP_MODES)}, got {self.keep!r}.")
        if self.adaptive not in ADAPTIVE_MODES:
            raise ValueError(f"adaptive must be one of {', '.join(ADAPTIVE_MODES)}, got {self.adaptive!r}.")
        for name in ("cosine_threshold", "lowfreq_threshold"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 < value <= 1.0):
                raise ValueError(f"{name} must be in (0, 1], got {value}: it is a similarity (cosine) or a relative "
                                 f"change (low_frequency), so pick e.g. 0.98 or 0.02.")


@dataclasses.dataclass
class CutoffRun:
    """Per-run record (lives in the run's store; published as a report when the run ends)."""

    cutoff_step: int | None = None  # resolved fixed cutoff (latest allowed switch)
    switched_at: int | None = None  # first single-branch step (adaptive may switch earlier)
    steps: int | None = None
    batch: int | None = None
    cfg_calls: int = 0  # two-branch calls seen (before the switch)
    cut_calls: int = 0  # calls reduced to one branch
    single_calls: int = 0  # calls that came with one branch already (cfg 1, guidance-distilled models)
    split_calls: int = 0  # of those, negative-only calls: another node ran the branches as separate calls (SLG)
    split_steps: set = dataclasses.field(default_factory=set)  # steps where that happened
    rows: int = 0  # batch rows that reached the diffusion model
    prev_low: torch.Tensor | None = None  # low-frequency part of the last CFG prediction (adaptive)
    last_step_seen: int | None = None
    reason: str = ""
    offset: int | None = None  # with a full schedule: index of the run's first step in it (KSamplerAdvanced slices)
    full_steps: int | None = None  # steps of that full schedule
    serial: int = 0  # publication order (sums of split runs pick the newest runs)
    settings: CutoffSettings | None = None  # the cutoff that ran (set when the run is published)


_serial = itertools.count(1)


# ----------------------------------------------------------------------------------------------
# pure functions
# ----------------------------------------------------------------------------------------------
def prediction_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Smallest per-image cosine similarity of two predictions (fp32)."""
    a = a.reshape(a.shape[0], -1).float()
    b = b.reshape(b.shape[0], -1).float()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12).min())


def lowfreq_relative_change(low: torch.Tensor, prev_low: torch.Tensor) -> float:
    """Largest per-image ||low - prev|| / ||prev|| (fp32)."""
    low = low.reshape(low.shape[0], -1).float()
    prev = prev_low.reshape(prev_low.shape[0], -1).float().to(low.device)
    return float(((low - prev).norm(dim=1) / prev.norm(dim=1).clamp_min(1e-12)).max())


# ----------------------------------------------------------------------------------------------
# the one implementation: a CALC_COND_BATCH wrapper
# ----------------------------------------------------------------------------------------------
def _branch_roles(conds, run) -> list[str | None]:
    roles = []
    for entries in conds:
        role = None
        for entry in entries or []:
            role = run.roles.get(entry.get("uuid")) if run is not None else None
            if role is not None:
                break
        roles.append(role)
    return roles


def _after_switch(rec: CutoffRun, step: int) -> bool:
    if rec.switched_at is not None and step >= rec.switched_at:
        return True
    return rec.cutoff_step is not None and step >= rec.cutoff_step


def _adaptive_update(settings: CutoffSettings, rec: CutoffRun, run, step: int, out, i_pos: int, i_neg: int) -> None:
    """After a full CFG step: decide whether later steps may run a single branch."""
    if settings.adaptive == "off" or rec.switched_at is not None:
        return
    if settings.adaptive == "cosine":
        cos = prediction_cosine(out[i_pos], out[i_neg])
        if cos >= settings.cosine_threshold:
            rec.switched_at = step + 1
            rec.reason = f"adaptive: cosine(positive, negative) = {cos:.4f} ≥ {settings.cosine_threshold} at step {step}"
        return

    cfg = run.cfg if run is not None and run.cfg is not None else 1.0
    denoised = out[i_neg] + (out[i_pos] - out[i_neg]) * cfg
    low, _ = split_frequencies(denoised.float())
    if rec.prev_low is not None and rec.last_step_seen is not None and step > rec.last_step_seen:
        change = lowfreq_relative_change(low, rec.prev_low)
        if change < settings.lowfreq_threshold:
            rec.switched_at = step + 1
            rec.reason = (f"adaptive: low-frequency change {change:.4f} < {settings.lowfreq_threshold} "
                          f"at step {step}")
    if rec.last_step_seen is None or step > rec.last_step_seen:
        rec.prev_low = low.detach()


def make_cutoff_wrappers(settings: CutoffSettings, on_report=None, full_sigmas: torch.Tensor | None = None):
    """The CALC_COND_BATCH wrapper doing the cutoff and an APPLY_MODEL wrapper counting the rows that reach
    the diffusion model, sharing one per-run record that is reported when the run ends. ``full_sigmas``: the whole
    schedule each run samples a slice of (split runs); fraction and step cutoffs then refer to it."""

    def finish(run):
        rec = run.peek(STORE)
        rec.prev_low = None  # published records keep counts only
        rec.serial = next(_serial)
        rec.settings = settings
        LOG.info("guidance cutoff: %s", format_report(rec, settings).replace("\n", " "))
        if on_report is not None:
            on_report(rec)

    def record(run) -> CutoffRun:
        rec = run.peek(STORE)
        if rec is None:
            rec = run.store(STORE, CutoffRun)
            run.on_finish(finish)
        return rec

    def calc_cond_batch_wrapper(executor, model, conds, x_in, timestep, model_options):
        run = runs.run_state(model_options)
        step = runs.current_step(model_options, timestep)
        if run is None or step is None:
            return executor(model, conds, x_in, timestep, model_options)
        rec = record(run)
        if rec.cutoff_step is None and run.sample_sigmas is not None:
            rec.steps = len(run.sample_sigmas) - 1
            rec.cutoff_step = runs.resolve_cutoff_step(settings.cutoff, settings.cutoff_unit, run.sample_sigmas,
                                                       full_sigmas, run.sampler_name)
            if full_sigmas is not None:  # found: resolve_cutoff_step raised otherwise
                rec.offset, whole = runs.locate_in_schedule(run.sample_sigmas, full_sigmas, run.sampler_name)
                rec.full_steps = len(whole) - 1
            rec.batch = x_in.shape[0]
        present = [c is not None for c in conds]
        roles = _branch_roles(conds, run)
        if len(conds) != 2 or not all(present) or sorted(r or "" for r in roles) != ["negative", "positive"]:
            if sum(present) == 1:
                rec.single_calls += 1
                if "negative" in roles and "positive" not in roles:
                    # a negative-only call: the guider's branches were split into separate calls by another node
                    # (SkipLayerGuidanceDiTSimple's calc_cond_batch function: positive, then negative with skipped
                    # layers); the cutoff can only drop a branch inside one two-branch call
                    rec.split_calls += 1
                    rec.split_steps.add(step)
            return executor(model, conds, x_in, timestep, model_options)
        i_pos, i_neg = roles.index("positive"), roles.index("negative")
        if _after_switch(rec, step):
            keep = i_neg if settings.keep == "negative" else i_pos
            sub = [c if i == keep else None for i, c in enumerate(conds)]
            pred = executor(model, sub, x_in, timestep, model_options)[keep]
            rec.cut_calls += 1
            if rec.switched_at is None or step < rec.switched_at:
                rec.switched_at = step
            return [pred, pred]
        out = executor(model, conds, x_in, timestep, model_options)
        rec.cfg_calls += 1
        _adaptive_update(settings, rec, run, step, out, i_pos, i_neg)
        rec.last_step_seen = step
        return out

    def count_rows_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                           **kwargs):
        run = runs.run_state(transformer_options)
        if run is not None:
            record(run).rows += x.shape[0]
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    return calc_cond_batch_wrapper, count_rows_wrapper


def apply_cutoff(model, settings: CutoffSettings, on_report=None, full_sigmas: torch.Tensor | None = None):
    """Clone ``model`` and install the cutoff. ``on_report(CutoffRun)`` is called after every run. With
    ``full_sigmas`` (the whole schedule of a run split over several samplers, e.g. two KSamplerAdvanced) a fraction
    or step cutoff refers to that whole schedule and lands on the same step whichever run samples it."""
    if full_sigmas is not None:
        full_sigmas = runs.check_full_schedule(full_sigmas)
        if settings.adaptive != "off":
            raise ValueError(f"adaptive={settings.adaptive!r} with full_sigmas: the adaptive test decides within one "
                             "sampler run, so each part of a split run would decide afresh (and could turn guidance "
                             "back on). Set adaptive to off for a split run, or disconnect full_sigmas.")
    settings.validate(steps=len(full_sigmas) - 1 if full_sigmas is not None and settings.cutoff_unit == "step"
                      else None)
    m = model.clone()
    runs.ensure_run_tracking(m)
    cutoff_wrapper, count_wrapper = make_cutoff_wrappers(settings, on_report, full_sigmas)
    hooks.add_keyed_wrapper(m, WrappersMP.CALC_COND_BATCH, WRAPPER_KEY, cutoff_wrapper)
    hooks.add_keyed_wrapper(m, WrappersMP.APPLY_MODEL, WRAPPER_KEY, count_wrapper)
    return m


def format_report(rec: CutoffRun, settings: CutoffSettings, seconds: float | None = None,
                  batch: int | None = None) -> str:
    evals = rec.cfg_calls + rec.cut_calls + rec.single_calls - rec.split_calls  # a split pair is one evaluation
    lines = []
    split = ""
    if rec.split_calls:
        split = (f"On {len(rec.split_steps)} of {rec.steps} steps another node ran the positive and negative branches "
                 f"as separate model calls (e.g. SkipLayerGuidanceDiTSimple, whose negative pass skips layers): the "
                 f"cutoff drops a branch only inside one two-branch call, so those steps kept both branches and full "
                 f"guidance whatever the cutoff, and saved nothing ({rec.split_calls} negative-only calls).")
    if rec.cfg_calls + rec.cut_calls == 0:
        if rec.split_calls:
            lines.append(f"Nothing was cut. {split} The output equals the same workflow without the cutoff.")
            split = ""
        else:
            lines.append("Nothing to cut: every model call had a single branch (cfg 1, or a guidance-distilled model "
                         "such as Flux). The output equals KSampler's.")
    else:
        plain = plain_rows(rec, batch)
        lines.append(f"Model rows evaluated: {rec.rows} (plain CFG: {plain}; "
                     f"{100.0 * (1 - rec.rows / plain) if plain else 0.0:.1f} % fewer).")
        lines.append(f"Sampler evaluations: {evals} — {rec.cfg_calls} with both branches, {rec.cut_calls} single-branch "
                     f"(kept: {settings.keep})" + (f", {rec.split_calls} with the branches in separate calls" if
                                                   rec.split_calls else "") + ".")
        lines.append(_stop_line(rec, settings))
        if split:
            lines.append(split)
    if seconds is not None:
        lines.append(f"Sampling time: {seconds:.2f} s.")
    return "\n".join(lines)


def plain_rows(rec: CutoffRun, batch: int | None = None) -> int:
    """Rows plain CFG would have run for the evaluations of ``rec`` (two per image and evaluation)."""
    return 2 * (rec.cfg_calls + rec.cut_calls + rec.split_calls) * (batch or rec.batch or 1)


def _stop_line(rec: CutoffRun, settings: CutoffSettings) -> str:
    """Where guidance stopped (in steps of the whole schedule for a run that sampled a slice of it)."""
    if rec.offset is not None:
        return _part_line(rec, settings)
    if rec.switched_at is not None and rec.cut_calls:
        return f"Guidance stopped at step {rec.switched_at} of {rec.steps}" + \
            (f" ({rec.reason})." if rec.reason else f" (cutoff {settings.cutoff} {settings.cutoff_unit}).")
    return (f"Guidance ran on every step (cutoff {settings.cutoff} {settings.cutoff_unit} is at or beyond the last of "
            f"{rec.steps} steps).")


def _part_line(rec: CutoffRun, settings: CutoffSettings) -> str:
    first, end = rec.offset, rec.offset + rec.steps
    where = f"This run sampled steps {first}-{end} of the {rec.full_steps}-step schedule"
    if rec.switched_at is not None and rec.cut_calls:
        if rec.switched_at == 0 and not rec.cfg_calls:
            return f"{where}: no guidance in it (cutoff {settings.cutoff} {settings.cutoff_unit} lies at or before " \
                   f"step {first})."
        return f"{where}: guidance stopped at step {first + rec.switched_at} of {rec.full_steps}" + \
            (f" ({rec.reason})." if rec.reason else f" (cutoff {settings.cutoff} {settings.cutoff_unit}).")
    return f"{where}: guidance on every step of it (cutoff {settings.cutoff} {settings.cutoff_unit} lies at or " \
           f"after step {end})."


def newest_schedule(records: list[CutoffRun]) -> list[CutoffRun]:
    """The runs of the newest pass over one schedule, oldest first: from the newest run back through runs whose
    steps end where the later one's begin, down to step 0 (split runs with full_sigmas). Runs without a full
    schedule (no offset) stand alone: the newest one."""
    ordered = sorted(records, key=lambda r: r.serial)
    if not ordered:
        return []
    chain = [ordered[-1]]
    if chain[0].offset is None:
        return chain
    for rec in reversed(ordered[:-1]):
        start = chain[-1].offset
        if start == 0:
            break
        if rec.offset is not None and rec.full_steps == chain[-1].full_steps and rec.offset + rec.steps == start:
            chain.append(rec)
    return chain[::-1]


def format_total(records: list[CutoffRun]) -> str:
    """One report adding up the runs of a split schedule (e.g. the high- and low-noise experts of Wan 2.2)."""
    if not records:
        return ("No sampling run has been reported yet: connect the record output of GuidanceCutoffPatch and the "
                "LATENT of the last sampler that used the patched model.")
    rows = sum(r.rows for r in records)
    plain = sum(plain_rows(r) for r in records)
    cfg_calls = sum(r.cfg_calls for r in records)
    cut_calls = sum(r.cut_calls for r in records)
    lines = [f"{len(records)} sampling run(s) added up. Model rows evaluated: {rows} (plain CFG: {plain}; "
             f"{100.0 * (1 - rows / plain) if plain else 0.0:.1f} % fewer, {plain - rows} rows saved).",
             f"Sampler evaluations with both branches: {cfg_calls}, single-branch: {cut_calls}."]
    for i, r in enumerate(records, 1):
        lines.append(f"Run {i}: {r.rows} rows (plain CFG {plain_rows(r)}). {_stop_line(r, r.settings or CutoffSettings())}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# nodes
# ----------------------------------------------------------------------------------------------
