"""Guidance cutoff on a schedule split over two KSamplerAdvanced nodes (Wan 2.2's high- and low-noise experts):
GuidanceCutoffPatch with full_sigmas puts the cutoff on the same step of the whole schedule whichever part it
falls in; rows per model call match an unsplit run step by step; GuidanceCutoffReport adds both parts up."""

from __future__ import annotations

import pytest
import torch
from comfy.patcher_extension import WrappersMP
from comfy_extras import nodes_custom_sampler
from pa_support import empty_latent, tiny
from prompt_anatomy.nodes.core import runs
from prompt_anatomy.nodes.guidance_cutoff import logic as gc_logic
from prompt_anatomy.nodes.guidance_cutoff import nodes as gc_nodes

import nodes as comfy_nodes

STEPS = 8
SPLIT = 4  # high-noise expert: steps 0..4, low-noise expert: steps 4..8


@pytest.fixture(scope="module")
def wan():
    return tiny("wan22_t2v")


def recorder(model, offset: int, calls: list):
    """Clone appending (step of the whole schedule, rows) for every diffusion-model call; ``offset`` = the first
    step of the part this model samples (current_step counts steps of the run, i.e. of the part)."""
    m = model.clone()
    runs.ensure_run_tracking(m)

    def rec(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kw):
        calls.append((offset + runs.current_step(transformer_options), x.shape[0]))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw)

    m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "test.steps", rec)
    return m


def full_sigmas(model, scheduler="simple", steps=STEPS):
    return nodes_custom_sampler.BasicScheduler.execute(model, scheduler, steps, 1.0).args[0]


def split_sample(model_high, model_low, pos, neg, latent, *, sampler="euler", scheduler="simple", split=SPLIT,
                 steps=STEPS, cfg=5.0):
    ks = comfy_nodes.KSamplerAdvanced()
    (mid,) = ks.sample(model_high, "enable", 0, steps, cfg, sampler, scheduler, pos, neg, latent, 0, split, "enable")
    (out,) = ks.sample(model_low, "disable", 0, steps, cfg, sampler, scheduler, pos, neg, mid, split, 10000, "disable")
    return out["samples"]


def patch(model, cutoff, unit="fraction", full=None, keep="negative"):
    return gc_nodes.GuidanceCutoffPatch.execute(model, cutoff=cutoff, cutoff_unit=unit, keep=keep,
                                                full_sigmas=full).args


@pytest.mark.parametrize("family", ["wan22_t2v", "sd1"])
@pytest.mark.parametrize("cutoff,cut_step", [(0.25, 2), (0.75, 6)])  # in the first part / in the second part
def test_split_run_cuts_the_same_steps_as_an_unsplit_run(family, cutoff, cut_step):
    t = tiny(family)
    pos, neg = t.encode("a red square"), t.encode("")
    latent = t.empty_latent(1, 4, frames=2) if family == "wan22_t2v" else empty_latent()
    full = full_sigmas(t.model)
    # unsplit reference: one KSampler run with the cutoff
    ref_calls: list = []
    m, _ = patch(recorder(t.model, 0, ref_calls), cutoff)
    comfy_nodes.common_ksampler(m, 0, STEPS, 5.0, "euler", "simple", pos, neg, latent)
    assert ref_calls == [(s, 2 if s < cut_step else 1) for s in range(STEPS)]
    # split: the same patch (with the whole schedule) on both parts' models
    calls: list = []
    high, rec_high = patch(recorder(t.model, 0, calls), cutoff, full=full)
    low, rec_low = patch(recorder(t.model, SPLIT, calls), cutoff, full=full)
    out = split_sample(high, low, pos, neg, latent)
    assert calls == ref_calls
    # the same as cutting each part at its own local step (bit-identical)
    local_high = min(cut_step, SPLIT)
    local_low = max(cut_step - SPLIT, 0)
    same = split_sample(patch(t.model, local_high, "step")[0], patch(t.model, local_low, "step")[0], pos, neg, latent)
    assert torch.equal(out, same)
    # the report adds the two parts up: exact rows
    rows = sum(r for _, r in ref_calls)
    report = gc_nodes.GuidanceCutoffReport.execute(rec_high, {"samples": out}, rec_low).args[0]
    assert report.startswith(f"2 sampling run(s) added up. Model rows evaluated: {rows} (plain CFG: {2 * STEPS}; "
                             f"{100.0 * (1 - rows / (2 * STEPS)):.1f} % fewer, {2 * STEPS - rows} rows saved).")
    part_rows = [sum(r for s, r in ref_calls if s < SPLIT), sum(r for s, r in ref_calls if s >= SPLIT)]
    assert f"Run 1: {part_rows[0]} rows (plain CFG {2 * SPLIT}). This run sampled steps 0-{SPLIT} of the " \
           f"{STEPS}-step schedule" in report
    assert f"Run 2: {part_rows[1]} rows (plain CFG {2 * (STEPS - SPLIT)}). This run sampled steps {SPLIT}-{STEPS}" in report
    if cut_step < SPLIT:
        assert f"guidance stopped at step {cut_step} of {STEPS}" in report and "no guidance in it" in report
    else:
        assert "guidance on every step of it" in report and f"guidance stopped at step {cut_step} of {STEPS}" in report


def test_sigma_cutoff_needs_no_full_schedule(wan):
    """cutoff_unit 'sigma' is the same in every part: without full_sigmas it lands on the same step."""
    pos, neg = wan.encode("a red square"), wan.encode("")
    latent = wan.empty_latent(1, 4, frames=2)
    sigma = float(full_sigmas(wan.model)[6])
    calls: list = []
    split_sample(patch(recorder(wan.model, 0, calls), sigma, "sigma")[0],
                 patch(recorder(wan.model, SPLIT, calls), sigma, "sigma")[0], pos, neg, latent)
    assert calls == [(s, 2 if s < 6 else 1) for s in range(STEPS)]


def test_without_full_schedule_a_fraction_counts_the_part(wan):
    """Today's behaviour, kept: without full_sigmas a fraction refers to the steps each sampler runs."""
    pos, neg = wan.encode("a red square"), wan.encode("")
    calls: list = []
    split_sample(patch(recorder(wan.model, 0, calls), 0.75)[0], patch(recorder(wan.model, SPLIT, calls), 0.75)[0],
                 pos, neg, wan.empty_latent(1, 4, frames=2))
    assert calls == [(0, 2), (1, 2), (2, 2), (3, 1), (4, 2), (5, 2), (6, 2), (7, 1)]


def test_one_patched_model_for_both_parts_and_the_report_picks_the_newest_pass(sd1):
    pos, neg = sd1.encode("a red square"), sd1.encode("")
    m, handle = patch(sd1.model, 0.75, full=full_sigmas(sd1.model))
    for _ in range(2):  # two passes: the report adds up the newest one only
        out = split_sample(m, m, pos, neg, empty_latent(batch=2))
    assert len(handle.runs) == 4
    report = gc_nodes.GuidanceCutoffReport.execute(handle, {"samples": out}).args[0]
    # batch 2: steps 0-5 with both branches (4 rows), 6-7 with one (2 rows)
    assert report.startswith("2 sampling run(s) added up. Model rows evaluated: 28 (plain CFG: 32; 12.5 % fewer, "
                             "4 rows saved).")


def test_full_schedule_that_does_not_match_the_run_raises(sd1):
    pos, neg = sd1.encode("a red square"), sd1.encode("")
    m, _ = patch(sd1.model, 0.5, full=full_sigmas(sd1.model, "karras"))
    with pytest.raises(ValueError, match="not a stretch of full_sigmas"):
        split_sample(m, m, pos, neg, empty_latent())


@pytest.mark.parametrize("bad,msg", [(torch.tensor([1.0]), "at least one step"),
                                     (torch.tensor([1.0, 2.0, 0.0]), "non-increasing")])
def test_bad_full_schedule_raises_at_the_node(sd1, bad, msg):
    with pytest.raises(ValueError, match=msg):
        patch(sd1.model, 0.5, full=bad)


def test_step_cutoff_beyond_the_full_schedule_raises(sd1):
    with pytest.raises(ValueError, match="beyond the last step"):
        patch(sd1.model, 9, "step", full=full_sigmas(sd1.model))


def test_newest_schedule_chains_contiguous_runs():
    def r(serial, offset, steps):
        return gc_logic.CutoffRun(steps=steps, offset=offset, full_steps=8, serial=serial)

    a, b, c = r(1, 0, 4), r(2, 4, 4), r(3, 0, 8)
    assert gc_logic.newest_schedule([a, b]) == [a, b]
    assert gc_logic.newest_schedule([a, b, c]) == [c]
    assert gc_logic.newest_schedule([b, a]) == [a, b]
    plain = gc_logic.CutoffRun(steps=8, serial=4)
    assert gc_logic.newest_schedule([a, b, plain]) == [plain]


def test_guider_with_split_sigmas_and_full_schedule(sd1):
    """SamplerCustomAdvanced twice on SplitSigmas halves: GuidanceCutoffGuider with full_sigmas cuts the same steps
    as one unsplit run."""
    pos, neg = sd1.encode("a red square"), sd1.encode("")
    full = full_sigmas(sd1.model)
    high_sigmas, low_sigmas = nodes_custom_sampler.SplitSigmas.execute(full, SPLIT).args
    sampler = nodes_custom_sampler.KSamplerSelect.execute("euler").args[0]
    calls: list = []
    latent = empty_latent()
    for part, (offset, sigmas) in enumerate(((0, high_sigmas), (SPLIT, low_sigmas))):
        guider = gc_nodes.GuidanceCutoffGuider.execute(recorder(sd1.model, offset, calls), pos, neg, 5.0,
                                                       cutoff=0.75, full_sigmas=full).args[0]
        noise = nodes_custom_sampler.RandomNoise.execute(0).args[0] if part == 0 else \
            nodes_custom_sampler.DisableNoise.execute().args[0]
        latent = nodes_custom_sampler.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, latent).args[0]
    assert calls == [(s, 2 if s < 6 else 1) for s in range(STEPS)]


def test_report_node_before_any_run_and_with_a_wrong_record(sd1):
    _, handle = patch(sd1.model, 0.5)
    report = gc_nodes.GuidanceCutoffReport.execute(handle, {"samples": torch.zeros(1, 4, 4, 4)}).args[0]
    assert report.startswith("No sampling run has been reported yet")
    with pytest.raises(ValueError, match="record must be the record output of a GuidanceCutoffPatch node"):
        gc_nodes.GuidanceCutoffReport.execute(object(), {"samples": torch.zeros(1, 4, 4, 4)})


def test_schedule_offset_finds_the_slice():
    full = torch.tensor([14.6, 8.0, 4.0, 2.0, 1.0, 0.5, 0.0])
    assert runs.schedule_offset(full[2:], full) == 2
    first = full[:4].clone()
    first[-1] = 0.0  # KSamplerAdvanced ending early with return_with_leftover_noise off
    assert runs.schedule_offset(first, full) == 0
    assert runs.schedule_offset(torch.tensor([3.0, 1.0, 0.0]), full) is None
    assert runs.resolve_cutoff_step(0.5, "fraction", full[2:], full) == 1  # step 3 of 6 = the part's step 1
    assert runs.resolve_cutoff_step(0.5, "fraction", full[:3], full) == 2  # after the part: its step count (never)
    assert runs.resolve_cutoff_step(1, "step", full[2:], full) == 0  # before the part: from its first step


@pytest.mark.parametrize("sampler", ["uni_pc", "dpm_2"])
def test_discard_penultimate_samplers_match_a_schedule_of_steps_plus_one(sd1, sampler):
    """ComfyUI samples these on steps + 1 sigmas with the second-to-last dropped: a BasicScheduler of steps + 1 is
    their whole schedule, and the cutoff lands on the same steps as in an unsplit run."""
    t = sd1
    pos, neg, latent = t.encode("a red square"), t.encode(""), empty_latent()
    ref_calls: list = []
    m, _ = patch(recorder(t.model, 0, ref_calls), 0.75)
    comfy_nodes.common_ksampler(m, 0, STEPS, 5.0, sampler, "simple", pos, neg, latent)
    rows = [r for _s, r in ref_calls]
    with pytest.raises(ValueError, match="steps \\+ 1 for uni_pc"):  # the schedule of `steps` cannot match
        split_sample(patch(t.model, 0.75, full=full_sigmas(t.model))[0], t.model, pos, neg, latent, sampler=sampler)
    calls: list = []
    full = full_sigmas(t.model, steps=STEPS + 1)
    high, rec = patch(recorder(t.model, 0, calls), 0.75, full=full)
    low, _ = patch(recorder(t.model, SPLIT, calls), 0.75, full=full)
    split_sample(high, low, pos, neg, latent, sampler=sampler)
    assert [r for _s, r in calls] == rows and rows.count(1) > 0, str((calls, ref_calls))


def test_adaptive_with_a_full_schedule_is_refused(sd1):
    with pytest.raises(ValueError, match="adaptive='cosine' with full_sigmas"):
        gc_nodes.GuidanceCutoffPatch.execute(sd1.model, cutoff=0.75, adaptive="cosine", full_sigmas=full_sigmas(sd1.model))
