"""GuidanceCutoffKSampler / Guider / Patch on tiny models: exact row counts, bit-identity, every sampler."""

from __future__ import annotations

import comfy.samplers
import node_helpers
import pytest
import torch
from comfy.patcher_extension import WrappersMP
from comfy_extras import nodes_custom_sampler
from pa_support import count_rows, empty_latent, ksample, tiny
from prompt_anatomy.nodes.core import runs
from prompt_anatomy.nodes.guidance_cutoff import logic as gc_logic
from prompt_anatomy.nodes.guidance_cutoff import nodes as gc_nodes

Node = gc_nodes.GuidanceCutoffKSampler


@pytest.fixture(scope="module")
def conds(sd1):
    return sd1.encode("a red square on a blue background"), sd1.encode("")


def run_node(model, pos, neg, *, steps=10, cfg=5.0, sampler="euler", scheduler="normal", latent=None, denoise=1.0,
             seed=0, **kw):
    latent = latent or empty_latent()
    out = Node.execute(model, seed, steps, cfg, sampler, scheduler, pos, neg, latent, denoise, **kw)
    return out.args[0]["samples"], out.args[1]


def record_steps(model):
    """Clone recording (step, rows) of every diffusion-model call."""
    m = model.clone()
    runs.ensure_run_tracking(m)
    calls = []

    def rec(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kw):
        calls.append((runs.current_step(transformer_options), x.shape[0]))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw)

    m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "test.steps", rec)
    return m, calls


# ------------------------------------------------------------------ exact counts
@pytest.mark.parametrize("batch", [1, 2])
def test_euler_10_steps_half_cutoff_runs_15_rows_per_image(sd1, conds, batch):
    m, counter = count_rows(sd1.model)
    _, report = run_node(m, *conds, steps=10, cutoff=0.5, latent=empty_latent(batch))
    assert counter["rows"] == 15 * batch
    assert counter["calls"] == 10
    assert f"Model rows evaluated: {15 * batch} (plain CFG: {20 * batch}; 25.0 % fewer)" in report
    assert "Guidance stopped at step 5 of 10" in report


@pytest.mark.parametrize("keep", ["negative", "positive"])
def test_cutoff_beyond_last_step_is_bit_identical_to_ksampler(sd1, conds, keep):
    ref = ksample(sd1.model, *conds, steps=6)
    for cutoff, unit in ((1.0, "fraction"), (6, "step"), (3.0, "fraction"), (1e-4, "sigma")):
        out, report = run_node(sd1.model, *conds, steps=6, cutoff=cutoff, cutoff_unit=unit, keep=keep)
        assert torch.equal(out, ref), (cutoff, unit)
        assert "Guidance ran on every step" in report


def test_keep_positive_cutoff_zero_equals_ksampler_cfg1(sd1, conds):
    ref = ksample(sd1.model, *conds, steps=6, cfg=1.0)
    out, _ = run_node(sd1.model, *conds, steps=6, cfg=7.0, cutoff=0.0, keep="positive")
    assert torch.equal(out, ref)


def test_keep_negative_after_cutoff_uses_negative_prediction_only(sd1, conds):
    # cutoff 0 with keep=negative = sampling with the negative prompt alone at cfg 1
    ref = ksample(sd1.model, conds[1], conds[0], steps=5, cfg=1.0)
    out, _ = run_node(sd1.model, *conds, steps=5, cfg=7.0, cutoff=0.0, keep="negative")
    assert torch.equal(out, ref)


def test_patched_run_leaves_no_trace(sd1, conds):
    ref = ksample(sd1.model, *conds, steps=4)
    run_node(sd1.model, *conds, steps=4, cutoff=0.25)
    assert torch.equal(ksample(sd1.model, *conds, steps=4), ref)
    assert not sd1.model.get_wrappers(WrappersMP.CALC_COND_BATCH, gc_logic.WRAPPER_KEY)


# ------------------------------------------------------------------ every sampler
def expected_rows(calls, cutoff_step, batch=1):
    return [(s, 2 * batch if s < cutoff_step else batch) for s, _ in calls]


@pytest.mark.parametrize("sampler", comfy.samplers.KSampler.SAMPLERS)
def test_every_sampler_follows_the_step_rule(sd1, conds, sampler):
    steps = 4
    m, calls = record_steps(sd1.model)
    patched = gc_logic.apply_cutoff(m, gc_logic.CutoffSettings(cutoff=2, cutoff_unit="step"))
    ksample(patched, *conds, steps=steps, sampler=sampler)
    assert calls, sampler
    if sampler in ("dpm_fast", "dpm_adaptive"):
        # these samplers pick their own sigmas: the step is the schedule interval of each sigma
        assert all(rows == (2 if s < 2 else 1) for s, rows in calls)
    else:
        assert calls == expected_rows(calls, 2)
        assert sorted({s for s, _ in calls}) == list(range(steps))
    if sampler == "dpm_adaptive":
        return  # hundreds of evaluations on a random model; the bit-identity below is covered by the others
    # with the cutoff beyond the last step the sampler's output is untouched
    ref = ksample(sd1.model, *conds, steps=steps, sampler=sampler, seed=1)
    same = ksample(gc_logic.apply_cutoff(sd1.model, gc_logic.CutoffSettings(cutoff=1.0)), *conds, steps=steps, sampler=sampler,
                   seed=1)
    assert torch.equal(same, ref), sampler


def test_second_order_sampler_both_calls_follow_step_rule(sd1, conds):
    m, calls = record_steps(sd1.model)
    ksample(gc_logic.apply_cutoff(m, gc_logic.CutoffSettings(cutoff=0.5)), *conds, steps=4, sampler="heun")
    # heun: 2 calls per step except the last; cutoff at step 2
    assert calls == [(0, 2), (0, 2), (1, 2), (1, 2), (2, 1), (2, 1), (3, 1)]


@pytest.mark.parametrize("sampler", ["euler_cfg_pp", "dpmpp_2m_cfg_pp", "res_multistep_cfg_pp"])
def test_cfg_pp_samplers_are_cut_too(sd1, conds, sampler):
    m, counter = count_rows(sd1.model)
    out, _ = run_node(m, *conds, steps=6, cfg=1.0, sampler=sampler, cutoff=0.5)
    # CFG++ disables the cfg=1 shortcut, so plain sampling runs both branches on all 6 steps
    assert counter["rows"] == 3 * 2 + 3 * 1
    assert torch.isfinite(out).all()


def test_denoise_below_one_counts_steps_actually_run(sd1, conds):
    m, counter = count_rows(sd1.model)
    latent = {"samples": torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))}
    _, report = run_node(m, *conds, steps=10, denoise=0.5, cutoff=0.5, latent=latent)
    assert counter["rows"] == 15  # 10 steps run: 5 with both branches, 5 with one
    assert "step 5 of 10" in report


def test_batch3_and_negative_of_other_length(sd1):
    pos = sd1.encode(", ".join(["a very detailed red square with a thin golden outline"] * 12))
    neg = sd1.encode("blurry")
    m, counter = count_rows(sd1.model)
    out, _ = run_node(m, pos, neg, steps=6, cutoff=0.5, latent=empty_latent(3))
    assert counter["rows"] == 3 * (3 * 2 + 3 * 1)
    assert out.shape[0] == 3


def test_area_and_combined_conditionings(sd1, conds):
    pos, neg = conds
    area = node_helpers.conditioning_set_values(sd1.encode("a green circle"),
                                                {"area": (4, 4, 0, 0), "strength": 1.0, "set_area_to_bounds": False})
    combined = pos + area
    m, calls = record_steps(sd1.model)
    run_node(m, combined, neg, steps=4, cutoff=0.5, latent=empty_latent(size=32))
    # ComfyUI gives the negative a same-area twin of the positive's area entry (process_conds), so every
    # step has a full-size call and an area call. Before the cutoff each holds a positive and a negative row;
    # after it (keep=negative) each holds the negative row only.
    assert calls == [(0, 2), (0, 2), (1, 2), (1, 2), (2, 1), (2, 1), (3, 1), (3, 1)]


# ------------------------------------------------------------------ families
def test_sdxl_and_sd3_rows(sdxl, sd3):
    for t in (sdxl, sd3):
        m, counter = count_rows(t.model)
        run_node(m, t.encode("a cat"), t.encode(""), steps=4, cutoff=0.5,
                 latent=empty_latent(channels=t.latent_channels))
        assert counter["rows"] == 2 * 2 + 2 * 1, t.family


def test_flux_has_nothing_to_cut(flux):
    pos, neg = flux.encode("a cat"), flux.encode("")
    latent = empty_latent(channels=16)
    ref = ksample(flux.model, pos, neg, steps=4, cfg=1.0, channels=16)
    out, report = run_node(flux.model, pos, neg, steps=4, cfg=1.0, cutoff=0.5, latent=latent)
    assert torch.equal(out, ref)
    assert report.startswith("Nothing to cut")


def test_bfloat16_tiny_model(conds):
    t = tiny("sd1", dtype=torch.bfloat16)
    pos, neg = t.encode("a red square"), t.encode("")
    m, counter = count_rows(t.model)
    out, _ = run_node(m, pos, neg, steps=4, cutoff=0.5)
    assert counter["rows"] == 6 and torch.isfinite(out).all()


# ------------------------------------------------------------------ guider and patch share the implementation
def test_guider_with_sampler_custom_advanced(sd1, conds):
    m, counter = count_rows(sd1.model)
    guider = gc_nodes.GuidanceCutoffGuider.execute(m, *conds, 5.0, cutoff=0.5).args[0]
    sampler = comfy.samplers.sampler_object("euler")
    sigmas = comfy.samplers.calculate_sigmas(sd1.model.get_model_object("model_sampling"), "normal", 10)
    noise = nodes_custom_sampler.Noise_RandomNoise(0)
    out = nodes_custom_sampler.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, empty_latent())
    assert counter["rows"] == 15
    ref, _ = run_node(sd1.model, *conds, steps=10, cutoff=0.5)
    assert torch.equal(out.args[0]["samples"], ref)


def test_patch_with_stock_ksampler_equals_node(sd1, conds):
    patched = gc_nodes.GuidanceCutoffPatch.execute(sd1.model, cutoff=0.4, keep="positive").args[0]
    m, counter = count_rows(patched)
    out = ksample(m, *conds, steps=10)
    assert counter["rows"] == 4 * 2 + 6
    ref, _ = run_node(sd1.model, *conds, steps=10, cutoff=0.4, keep="positive")
    assert torch.equal(out, ref)


def test_patch_composes_with_other_wrappers_and_is_idempotent(sd1, conds):
    patched = gc_logic.apply_cutoff(gc_logic.apply_cutoff(sd1.model, gc_logic.CutoffSettings(cutoff=0.2)),
                                    gc_logic.CutoffSettings(cutoff=0.5))
    assert len(patched.get_wrappers(WrappersMP.CALC_COND_BATCH, gc_logic.WRAPPER_KEY)) == 1
    seen = []

    def foreign(executor, model, conds_, x, t, mo):
        seen.append(len([c for c in conds_ if c is not None]))
        return executor(model, conds_, x, t, mo)

    patched.add_wrapper_with_key(WrappersMP.CALC_COND_BATCH, "other_pack.wrapper", foreign)
    ksample(patched, *conds, steps=4)
    assert seen == [2, 2, 1, 1]  # the later cutoff (0.5) won, the foreign wrapper sees the reduced call


# ------------------------------------------------------------------ adaptive
def test_adaptive_cosine_switches_when_predictions_agree(sd1):
    same = sd1.encode("a red square")
    m, counter = count_rows(sd1.model)
    _, report = run_node(m, same, same, steps=6, cutoff=1.0, adaptive="cosine", cosine_threshold=0.999)
    assert counter["rows"] == 2 + 5  # step 0 with both branches, then identical predictions -> one branch
    assert "adaptive: cosine" in report


def test_adaptive_cosine_keeps_fixed_cutoff_as_latest_switch(sd1, conds):
    m, counter = count_rows(sd1.model)
    run_node(m, *conds, steps=6, cutoff=0.5, adaptive="cosine", cosine_threshold=1.0)
    assert counter["rows"] == 3 * 2 + 3


def test_adaptive_low_frequency_switches_when_shape_settles(sd1, conds):
    m, counter = count_rows(sd1.model)
    _, report = run_node(m, *conds, steps=6, cutoff=1.0, adaptive="low_frequency", lowfreq_threshold=1.0)
    # change measured from step 1 on; threshold 1.0 means "any change below 100 %": switch after step 1
    assert counter["rows"] == 2 * 2 + 4
    assert "adaptive: low-frequency change" in report


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kw,msg", [
    ({"cutoff": -0.5}, "negative"),
    ({"cutoff": 11, "cutoff_unit": "step"}, "beyond the last step"),
    ({"cutoff": 0.0, "cutoff_unit": "sigma"}, "must be > 0"),
    ({"cutoff": -1.0, "cutoff_unit": "sigma"}, "must be > 0"),
    ({"adaptive": "cosine", "cosine_threshold": 0.0}, r"cosine_threshold must be in \(0, 1\]"),
    ({"adaptive": "low_frequency", "lowfreq_threshold": 1.5}, r"lowfreq_threshold must be in \(0, 1\]"),
    ({"keep": "both"}, "keep must be one of"),
])
def test_bad_input_raises_clear_value_error(sd1, conds, kw, msg):
    with pytest.raises(ValueError, match=msg):
        run_node(sd1.model, *conds, steps=10, **kw)


def test_skip_layer_guidance_simple_with_cutoff_report_tells_the_truth(sd3):
    """#16.8: SkipLayerGuidanceDiTSimple replaces calc_cond_batch and runs the positive and the (layer-skipped)
    negative branch as two separate calls per step. The cutoff can only drop a branch inside one two-branch call,
    so with SLG over the whole run nothing is cut: the output equals SLG without the cutoff, every step runs
    two rows, and the report says why (not 'cfg 1')."""
    from comfy_extras.nodes_slg import SkipLayerGuidanceDiTSimple

    pos, neg = sd3.encode("a cat"), sd3.encode("")
    latent = empty_latent(channels=sd3.latent_channels)
    slg = SkipLayerGuidanceDiTSimple.execute(sd3.model, 0.0, 1.0, double_layers="0", single_layers="").args[0]
    ref = ksample(slg, pos, neg, steps=4, channels=sd3.latent_channels)
    m, counter = count_rows(slg)
    out, report = run_node(m, pos, neg, steps=4, cutoff=0.5, latent=latent)
    assert torch.equal(out, ref)
    assert counter == {"rows": 8, "calls": 8}
    assert report.startswith("Nothing was cut. On 4 of 4 steps another node ran the positive and negative branches "
                             "as separate model calls")
    assert "cfg 1" not in report
    # SLG only on the first half (its own timestep percents): the second half is cut as usual, the report says both
    slg_half = SkipLayerGuidanceDiTSimple.execute(sd3.model, 0.0, 0.5, double_layers="0", single_layers="").args[0]
    m, counter = count_rows(slg_half)
    _, report = run_node(m, pos, neg, steps=4, cutoff=0.5, latent=latent)
    assert "Guidance stopped at step 2 of 4" in report and "another node ran the positive and negative" in report
    assert counter["rows"] == 2 * 2 + 2 * 1, report  # SLG steps 0-1: two single-row calls each; steps 2-3 cut
    assert "Model rows evaluated: 6 (plain CFG: 8; 25.0 % fewer)" in report and "2 with the branches in separate" in report
