"""Frequency split (paper 1, Sec. 4.2, Prop. 1), its recorder/viewer and the noising analysis, on tiny models."""

from __future__ import annotations

import json
import math

import comfy.sample
import comfy.sd
import comfy.taesd.taesd
import comfy.utils
import folder_paths
import pytest
import torch
from comfy.patcher_extension import WrappersMP
from comfy_extras import nodes_custom_sampler
from pa_support import empty_latent, ksample, tiny
from prompt_anatomy.nodes.frequency import nodes as fq_nodes
from prompt_anatomy.nodes.frequency import recorder as fq_recorder
from prompt_anatomy.nodes.frequency import schedules as fq_schedules
from prompt_anatomy.nodes.guidance_cutoff import nodes as gc_nodes
from prompt_anatomy.nodes.shared import drawing, spectral


@pytest.fixture(autouse=True)
def _temp_dir(tmp_path, monkeypatch):
    """Node previews (ui.PreviewImage) go to a per-test temp folder, never into the ComfyUI tree."""
    monkeypatch.setattr(folder_paths, "temp_directory", str(tmp_path))


@pytest.fixture(scope="module")
def conds(sd1):
    return sd1.encode("a red square on a blue background"), sd1.encode("")


def tiny_vae(channels: int = 4, seed: int = 0):
    """A real comfy.sd.VAE (TAESD architecture, random deterministic weights): latent h x w -> image 8h x 8w."""
    m = comfy.taesd.taesd.TAESD(latent_channels=channels)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(m.named_parameters()):
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(math.prod(p.shape[1:])))
            elif name.endswith("vae_scale"):
                p.fill_(1.0)
            else:
                p.zero_()
    return comfy.sd.VAE(sd=m.state_dict())


# =========================================================================== the split is exact
@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (3, 4, 9, 7), (2, 16, 12, 10), (1, 16, 5, 6), (2, 4, 1, 1),
                                   (1, 16, 3, 6, 8)])
def test_low_plus_high_reproduces_latent(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3 + 0.5
    low, high = spectral.split_frequencies(x, 0.2)
    assert low.shape == x.shape and high.shape == x.shape and low.dtype == x.dtype
    assert (low + high - x).abs().max() <= 1e-5
    # orthogonal parts: the energies add up (Parseval)
    assert torch.allclose(low.pow(2).sum() + high.pow(2).sum(), x.pow(2).sum(), rtol=1e-5)
    # a projection: the low part of the low part is itself, its high part vanishes
    low2, high2 = spectral.split_frequencies(low, 0.2)
    assert (low2 - low).abs().max() <= 1e-5 and high2.abs().max() <= 1e-5


@pytest.mark.parametrize("hw", [(33, 20), (32, 32)])
def test_image_split_and_merge_nodes_are_exact(hw):
    img = torch.rand(2, *hw, 3, generator=torch.Generator().manual_seed(2))
    low, high = fq_nodes.FrequencySplitImage.execute(img, 0.2).args
    assert low.shape == img.shape and (low + high - img).abs().max() <= 1e-5
    (merged,) = fq_nodes.FrequencyMergeImage.execute(low, high, 0.2).args
    assert (merged - img).abs().max() <= 1e-5


def test_latent_split_node_keeps_latent_keys_and_merge_swaps_bands():
    gen = torch.Generator().manual_seed(3)
    a = {"samples": torch.randn(2, 4, 16, 16, generator=gen), "noise_mask": torch.ones(2, 1, 16, 16),
         "batch_index": [4, 5]}
    b = {"samples": torch.randn(2, 4, 16, 16, generator=gen)}
    lo, hi = fq_nodes.FrequencySplit.execute(a, 0.3).args
    assert lo["batch_index"] == [4, 5] and lo["noise_mask"] is a["noise_mask"] and "samples" in hi
    assert (lo["samples"] + hi["samples"] - a["samples"]).abs().max() <= 1e-5
    (back,) = fq_nodes.FrequencyMerge.execute(lo, hi, 0.3).args
    assert (back["samples"] - a["samples"]).abs().max() <= 1e-5
    (mixed,) = fq_nodes.FrequencyMerge.execute(a, b, 0.3).args
    a_low, _ = spectral.split_frequencies(a["samples"], 0.3)
    _, b_high = spectral.split_frequencies(b["samples"], 0.3)
    assert torch.allclose(mixed["samples"], a_low + b_high, atol=1e-6)
    assert mixed["batch_index"] == [4, 5]
    m_low, m_high = spectral.split_frequencies(mixed["samples"], 0.3)
    assert torch.allclose(m_low, a_low, atol=1e-5) and torch.allclose(m_high, b_high, atol=1e-5)


def test_split_keeps_dtype_and_works_in_bfloat16():
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    low, high = spectral.split_frequencies(x)
    assert low.dtype == torch.bfloat16 and high.dtype == torch.bfloat16
    # computed in fp32, rounded once per part: the sum is within two bf16 roundings of the input
    assert ((low.float() + high.float()) - x.float()).abs().max() <= 2 * 2 ** -8 * x.float().abs().max()


# =========================================================================== the low band
def test_low_band_is_the_threshold_fraction_of_the_spectrum():
    assert spectral.low_radius(0.2) == pytest.approx(math.sqrt(0.2 / math.pi))
    for t in (0.05, 0.2, 0.5, 0.9, 0.99):
        r = spectral.low_radius(t)
        assert spectral.disc_area_in_spectrum(r) == pytest.approx(t, abs=1e-9)
        # on a 128 x 128 grid the fraction of Fourier bins in the band differs from t only by discretisation
        assert spectral.low_frequency_mask(128, 128, t, full=True).float().mean().item() == pytest.approx(t, abs=0.005)
    # radial in normalised frequency: a non-square grid has the same band fraction
    assert spectral.low_frequency_mask(96, 160, 0.2, full=True).float().mean().item() == pytest.approx(0.2, abs=0.005)
    # the rfft half-mask is the full mask's left half (DC at [0, 0])
    full, half = spectral.low_frequency_mask(10, 9, 0.3, full=True), spectral.low_frequency_mask(10, 9, 0.3)
    assert torch.equal(full[:, :5], half)


def test_larger_threshold_moves_energy_to_low():
    x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    fractions = [spectral.split_frequencies(x, t)[0].pow(2).sum().item() / x.pow(2).sum().item()
                 for t in (0.1, 0.3, 0.6, 0.9)]
    assert fractions == sorted(fractions)


# =========================================================================== Prop. 1
K, M = 256, 64  # noise samples, grid size


def test_prop1_gaussian_noise_has_flat_spectrum():
    eps = torch.randn(K, 1, M, M, generator=torch.Generator().manual_seed(6))
    energy = spectral.fourier_energy(eps).mean(dim=(0, 1))  # [M, M], averaged over K samples
    # Prop. 1: E|F(u, v)|^2 = 1 / MN at every frequency (F normalised by 1/MN as in the paper's eq. 6)
    assert energy.mean().item() * M * M == pytest.approx(1.0, rel=0.01)
    # Flatness: |F|^2 of one sample is exponential (chi^2_2 / 2, coefficient of variation 1) at every complex
    # bin, so the average of K samples has CV 1/sqrt(K) = 0.0625 across bins if the spectrum is flat. 2/sqrt(K)
    # leaves margin for the few real bins (DC, Nyquist: CV sqrt(2)); a non-flat spectrum gives CV >> 1 (below).
    cv = (energy.std() / energy.mean()).item()
    assert cv < 2 / math.sqrt(K)
    # the control: the same statistic on smoothed (correlated) noise is far from flat
    smooth = torch.nn.functional.avg_pool2d(eps, 5, stride=1, padding=2, count_include_pad=False)
    e2 = spectral.fourier_energy(smooth).mean(dim=(0, 1))
    assert (e2.std() / e2.mean()).item() > 1.0


def test_prop1_high_part_holds_80_percent_of_noise_energy():
    eps = torch.randn(16, 4, M, M, generator=torch.Generator().manual_seed(7))
    low, high = spectral.split_frequencies(eps, 0.2)
    frac_high = high.pow(2).sum().item() / eps.pow(2).sum().item()
    expected = 1.0 - spectral.low_frequency_mask(M, M, 0.2, full=True).float().mean().item()  # 1 - bins in the band
    assert expected == pytest.approx(0.8, abs=0.005)
    # 16 * 4 samples of 64 x 64: the std of the fraction is ~0.001, so 0.01 is > 5 sigma
    assert frac_high == pytest.approx(expected, abs=0.01)


def test_smooth_image_energy_is_low_and_fine_texture_is_high():
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, M), torch.linspace(-1, 1, M), indexing="ij")
    smooth = (torch.exp(-(xx ** 2 + yy ** 2) / 0.3) + 0.5 * xx)[None, None]  # blob + gradient
    low, high = spectral.split_frequencies(smooth, 0.2)
    # > 0.95, not ~1: the FFT sees the image periodically extended, so the gradient's wrap-around edge puts
    # ~1 % of the energy into high frequencies (measured 0.988)
    assert low.pow(2).sum() / smooth.pow(2).sum() > 0.95
    checker = ((torch.arange(M)[:, None] + torch.arange(M)[None, :]) % 2).float()[None, None] - 0.5
    low, high = spectral.split_frequencies(checker, 0.2)
    assert high.pow(2).sum() / checker.pow(2).sum() > 0.99


# =========================================================================== bad input
@pytest.mark.parametrize("threshold", [0.0, 1.0, -0.1, 1.5, float("nan"), "abc"])
def test_bad_threshold_raises(threshold):
    with pytest.raises(ValueError, match="threshold"):
        spectral.split_frequencies(torch.zeros(1, 4, 8, 8), threshold)


def test_empty_batch_and_mismatched_merge_raise():
    with pytest.raises(ValueError, match="empty"):
        spectral.split_frequencies(torch.zeros(0, 4, 8, 8))
    with pytest.raises(ValueError, match="empty"):
        fq_nodes.FrequencySplitImage.execute(torch.zeros(0, 8, 8, 3), 0.2)
    with pytest.raises(ValueError, match="same shape"):
        fq_nodes.FrequencyMerge.execute({"samples": torch.zeros(1, 4, 8, 8)}, {"samples": torch.zeros(1, 4, 8, 10)}, 0.2)
    with pytest.raises(ValueError, match="same shape"):
        fq_nodes.FrequencyMergeImage.execute(torch.zeros(2, 8, 8, 3), torch.zeros(1, 8, 8, 3), 0.2)
    with pytest.raises(ValueError, match="grid_steps"):
        fq_nodes.FrequencySplitPreview.execute(tiny("sd1").model, 0.2, 6, "0, x")
    with pytest.raises(ValueError, match="threshold"):
        fq_nodes.FrequencySplitPreview.execute(tiny("sd1").model, 1.0)


# =========================================================================== the recorder
def record(model, **kw):
    m, handle = fq_nodes.FrequencySplitPreview.execute(model, **kw).args
    return m, handle


@pytest.mark.parametrize("sampler", ["euler", "heun", "euler_ancestral"])
def test_recorder_leaves_latent_bit_identical(sd1, conds, sampler):
    ref = ksample(sd1.model, *conds, steps=3, sampler=sampler, seed=3)
    m, handle = record(sd1.model)
    out = ksample(m, *conds, steps=3, sampler=sampler, seed=3)
    assert torch.equal(out, ref)
    assert len(handle.runs) == 1 and handle.runs[0].reported_steps == 3
    # no trace on later runs: an unpatched run after the patched one equals a fresh unpatched run
    assert torch.equal(ksample(sd1.model, *conds, steps=3, sampler=sampler, seed=3), ref)
    assert not sd1.model.get_wrappers(WrappersMP.SAMPLER_SAMPLE, fq_recorder.WRAPPER_KEY)


def test_recorder_publishes_one_run_per_sampling_with_exact_statistics(sd1, conds):
    n = 4
    m, handle = record(sd1.model, grid_steps="0, 1, 2, 3")  # every step kept: the curves can be re-derived
    out = ksample(m, *conds, steps=n, batch=2, seed=1)
    (run,) = handle.runs
    assert run.n_steps == n and run.batch == 2 and run.kind == "eps" and run.sampler == "sample_euler"
    assert torch.equal(run.final_out, out)  # the published output is exactly the KSampler's LATENT
    for k in fq_recorder.STAT_NAMES:
        assert run.stats[f"{k}_rms"].shape == (n + 1, 2) and run.stats[f"{k}_change"].shape == (n + 1, 2)
        assert torch.isfinite(run.stats[f"{k}_rms"]).all()
        assert (run.stats[f"{k}_change"][n] == 0).all()
    final_low, final_high = spectral.split_frequencies(run.final, 0.2)
    for s in range(n):
        x_vp, x0 = run.grid_latents[s]
        # EPS model: x_t is stored in variance-preserving form x / sqrt(1 + sigma^2)
        assert run.signal_coef[s] == pytest.approx(1 / math.sqrt(1 + run.sigmas[s] ** 2))
        assert run.noise_coef[s] == pytest.approx(run.sigmas[s] / math.sqrt(1 + run.sigmas[s] ** 2))
        for name, lat in (("xt", x_vp), ("x0", x0)):
            lo, hi = spectral.split_frequencies(lat, 0.2)
            assert torch.allclose(run.stats[f"{name}_low_rms"][s], spectral.rms_per_item(lo), rtol=1e-5)
            assert torch.allclose(run.stats[f"{name}_high_rms"][s], spectral.rms_per_item(hi), rtol=1e-5)
            for part, mine, fin in (("low", lo, final_low), ("high", hi, final_high)):
                assert torch.allclose(run.stats[f"{name}_{part}_change"][s], spectral.relative_change(mine, fin),
                                      rtol=1e-4, atol=1e-5)
    # step 0 of a full-denoise run from an empty latent: ComfyUI starts at x = sqrt(1 + sigma_max^2) * noise, so
    # the VP form is exactly the initial noise
    noise = comfy.sample.prepare_noise(torch.zeros(2, 4, 4, 4), 1)
    assert torch.allclose(run.grid_latents[0][0], noise, atol=1e-5)
    # a second run is a second record
    ksample(m, *conds, steps=n, seed=2)
    assert len(handle.runs) == 2 and not torch.equal(handle.runs[-1].final, run.final)


def test_recorder_keeps_only_the_chosen_steps(sd1, conds):
    m, handle = record(sd1.model, grid_columns=3)
    ksample(m, *conds, steps=5)
    (run,) = handle.runs
    assert run.grid_steps == [0, 2, 4] and sorted(run.grid_latents) == [0, 2, 4]
    m, handle = record(sd1.model, grid_steps="-1, 2")
    ksample(m, *conds, steps=4)
    assert handle.runs[0].grid_steps == [2, 3]
    m, handle = record(sd1.model, grid_steps="7")
    with pytest.raises(ValueError, match="grid_steps contains step 7 but this sampling run has 4 steps"):
        ksample(m, *conds, steps=4)


def test_recorder_does_not_stack_and_chains_the_callback(sd1, conds):
    m, h1 = record(sd1.model)
    m2, h2 = record(m)
    assert len(m2.get_wrappers(WrappersMP.SAMPLER_SAMPLE, fq_recorder.WRAPPER_KEY)) == 1  # keyed: replaced, not stacked
    seen = []
    latent = empty_latent()
    noise = comfy.sample.prepare_noise(latent["samples"], 0)
    comfy.sample.sample(m2, noise, 3, 5.0, "euler", "normal", *conds, latent["samples"],
                        callback=lambda step, x0, x, total: seen.append((step, total)))
    assert seen == [(0, 3), (1, 3), (2, 3)]  # the sampler's own callback still runs, every step
    assert len(h2.runs) == 1 and len(h1.runs) == 0


def test_live_preview_shows_low_and_high_side_by_side(sd1, conds, monkeypatch):
    events = []

    def hook(value, total, preview, prompt_id=None, node_id=None):
        events.append((value, total, preview))

    ref = ksample(sd1.model, *conds, steps=3)
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    m, _ = record(sd1.model)
    out = ksample(m, *conds, steps=3)  # latent 4 x 4 -> Latent2RGB previews of 4 x 4
    assert torch.equal(out, ref)  # bit-identical with the live preview running too
    stock = [(v, t) for v, t, p in events if p is None]
    ours = [(v, t, p) for v, t, p in events if p is not None]
    assert stock == [(1, 3), (2, 3), (3, 3)]  # the normal progress bar still advances
    assert [(v, t) for v, t, _ in ours] == [(1, 3), (2, 3), (3, 3)]
    for _, _, (fmt, img, max_px) in ours:
        assert fmt == "JPEG" and img.size == (4 + 4 + 4, 4) and max_px > 0
    events.clear()
    m, _ = record(sd1.model, live_preview=False)
    ksample(m, *conds, steps=3)
    assert [p for _, _, p in events] == [None, None, None]


def test_recorder_works_with_guidance_cutoff_and_custom_sampler(sd1, conds):
    m, handle = record(sd1.model)
    out = gc_nodes.GuidanceCutoffKSampler.execute(m, 0, 4, 5.0, "euler", "normal", *conds, empty_latent(), 1.0,
                                            cutoff=0.5).args[0]["samples"]
    ref = gc_nodes.GuidanceCutoffKSampler.execute(sd1.model, 0, 4, 5.0, "euler", "normal", *conds, empty_latent(), 1.0,
                                            cutoff=0.5).args[0]["samples"]
    assert torch.equal(out, ref) and len(handle.runs) == 1
    assert torch.equal(handle.runs[0].final_out, out)
    guider = nodes_custom_sampler.CFGGuider.execute(m, *conds, 5.0).args[0]
    sampler = nodes_custom_sampler.KSamplerSelect.execute("euler").args[0]
    sigmas = nodes_custom_sampler.BasicScheduler.execute(m, "normal", 3, 1.0).args[0]
    noise = nodes_custom_sampler.RandomNoise.execute(0).args[0]
    nodes_custom_sampler.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, empty_latent())
    assert len(handle.runs) == 2 and handle.runs[-1].n_steps == 3


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_recorder_on_other_families(family):
    t = tiny(family)
    pos, neg = t.encode("a cat"), t.encode("")
    cfg = 1.0 if family == "flux" else 4.0
    ref = ksample(t.model, pos, neg, steps=2, channels=t.latent_channels, cfg=cfg)
    m, handle = record(t.model)
    out = ksample(m, pos, neg, steps=2, channels=t.latent_channels, cfg=cfg)
    assert torch.equal(out, ref)
    (run,) = handle.runs
    assert run.final.shape[1] == t.latent_channels
    assert run.kind == ("flow" if family in ("sd3", "flux") else "eps")
    if run.kind == "flow":  # x_t = (1 - s) x0 + s eps, VP-normalised
        s = run.sigmas[0]
        n = math.hypot(1 - s, s)
        assert run.signal_coef[0] == pytest.approx((1 - s) / n) and run.noise_coef[0] == pytest.approx(s / n)
    for v in run.stats.values():
        assert torch.isfinite(v).all()


def test_recorder_in_bfloat16(conds):
    t = tiny("sd1", dtype=torch.bfloat16)
    pos, neg = t.encode("a red square"), t.encode("")
    ref = ksample(t.model, pos, neg, steps=3)
    m, handle = record(t.model)
    assert torch.equal(ksample(m, pos, neg, steps=3), ref)
    assert all(torch.isfinite(v).all() for v in handle.runs[0].stats.values())


# =========================================================================== the viewer
def view(handle, latent, **kw):
    return fq_nodes.FrequencySplitViewer.execute(handle, latent, **kw)


def test_viewer_outputs_grid_plots_json_and_cutoff(sd1, conds):
    m, handle = record(sd1.model, grid_columns=3)
    samples = ksample(m, *conds, steps=6, batch=2)
    vae = tiny_vae()
    out = view(handle, {"samples": samples}, vae=vae, batch_index=1, settle_threshold=0.5)
    grid, plots, stats, cutoff = out.args
    # 6 rows of 32 x 32 VAE decodes (latent 4 x 4), 3 recorded steps + final = 4 columns, plus labels and gaps
    assert grid.ndim == 4 and grid.shape[0] == 1 and grid.shape[-1] == 3
    assert grid.shape[1] > 6 * 32 + 5 * 4 and grid.shape[2] > 4 * 32 + 3 * 4
    assert plots.shape == (2, 420, 640, 3) and 0 <= plots.min() and plots.max() <= 1
    data = json.loads(stats)
    assert data["steps"] == list(range(7)) and data["batch_index"] == 1 and data["matched_latent"] is True
    assert data["grid_steps"] == [0, 3, 5]
    assert len(data["sigma"]) == len(data["signal_coef"]) == len(data["noise_coef"]) == 7
    assert data["model_sampling"] == "ModelSamplingDiscrete + EPS" and data["signal_coef"][-1] == 1.0
    run = handle.runs[-1]
    low_x0 = run.stats["x0_low_change"][:6, 1].tolist()
    assert data["rel_change"]["x0_low"][:6] == pytest.approx(low_x0)
    expect, step = fq_schedules.suggested_cutoff(low_x0, 0.5, "x0")
    assert cutoff == pytest.approx(expect) and data["suggested_cutoff_step"] == step
    assert out.ui["text"][0].startswith("6 steps (sample_euler), image 1 of 2")
    # the grid cells are the VAE decodes: the final column's x_t cell is the decoded final latent
    final_img = vae.decode(run.final_out[1:2])[0]
    assert final_img.shape == (32, 32, 3)


def test_viewer_without_vae_and_run_matching(sd1, conds):
    m, handle = record(sd1.model)
    a = ksample(m, *conds, steps=3, seed=1)
    b = ksample(m, *conds, steps=4, seed=2)
    assert len(handle.runs) == 2
    data = json.loads(view(handle, {"samples": a}).args[2])
    assert data["matched_latent"] and len(data["steps"]) == 4  # picked run a, not the newer b
    data = json.loads(view(handle, {"samples": b}).args[2])
    assert data["matched_latent"] and len(data["steps"]) == 5
    data = json.loads(view(handle, {"samples": torch.zeros_like(a)}).args[2])
    assert not data["matched_latent"] and len(data["steps"]) == 5  # falls back to the newest run


def test_viewer_errors(sd1, conds):
    m, handle = record(sd1.model)
    with pytest.raises(ValueError, match="no finished sampling run"):
        view(handle, empty_latent())
    ksample(m, *conds, steps=2)
    with pytest.raises(ValueError, match="batch_index 3 is out of range"):
        view(handle, empty_latent(), batch_index=3)
    with pytest.raises(ValueError, match="settle_threshold"):
        view(handle, empty_latent(), settle_threshold=float("nan"))
    with pytest.raises(ValueError, match="record must be"):
        view({"not": "a handle"}, empty_latent())


def test_suggested_cutoff_rules():
    ch = [3.0, 1.0, 0.2, 0.05, 0.3, 0.04, 0.01, 0.0]  # 8 steps
    assert fq_schedules.settle_step(ch, 0.1) == 5  # step 4 goes back above the threshold
    assert fq_schedules.suggested_cutoff(ch, 0.1, "x_t") == (5 / 8, 5)
    assert fq_schedules.suggested_cutoff(ch, 0.1, "x0") == (6 / 8, 6)  # the x0 of step 5 already used step 5's guidance
    assert fq_schedules.suggested_cutoff([5.0, 4.0, 3.0], 0.1, "x0") == (1.0, 3)  # never settles: guidance on every step
    assert fq_schedules.suggested_cutoff([0.01, 0.0], 0.1, "x_t") == (0.0, 0)
    assert fq_schedules.settle_step([0.01, math.nan, 0.0], 0.1) == 2  # an unreported step is not settled
    with pytest.raises(ValueError, match="cutoff_signal"):
        fq_schedules.suggested_cutoff([1.0], 0.1, "eps")


def test_latent_to_rgb_shapes():
    import comfy.latent_formats

    assert drawing.latent_to_rgb(torch.zeros(2, 16, 4, 6), comfy.latent_formats.Flux()).shape == (2, 64, 96, 3)
    assert drawing.latent_to_rgb(torch.zeros(1, 16, 3, 4, 4), comfy.latent_formats.Flux()).shape == (1, 64, 64, 3)
    assert drawing.latent_to_rgb(torch.zeros(1, 2, 8, 8)).shape == (1, 64, 64, 3)  # no format: channel 0 as grey


def test_line_plot_draws_series():
    img = drawing.line_plot([("a", [0, 1, 2], [1.0, 0.1, 0.01], (255, 0, 0), False),
                        ("b", [0, 1, 2], [0.5, math.nan, 0.0], (0, 0, 255), True)],
                       title="t", xlabel="x", ylabel="y", log_y=True, size=(320, 200), hlines=[(0.1, "thr", (0, 0, 0))])
    assert img.size == (320, 200)
    px = set(img.getdata())
    assert (255, 0, 0) in px and (0, 0, 255) in px


# =========================================================================== noising analysis
def test_named_sd1_schedule_equals_the_models_schedule(sd1):
    named = fq_schedules.named_schedule("sd1_scaled_linear", 50)
    model = fq_schedules.model_schedule(sd1.model.get_model_object("model_sampling"), 50)
    assert named.timesteps == model.timesteps == [20 * k - 1 for k in range(1, 51)]
    assert named.signal == pytest.approx(model.signal, rel=1e-5)
    assert named.noise == pytest.approx(model.noise, rel=1e-5)
    # sqrt(abar) of the last timestep of SD's scaled-linear schedule (abar_999 = 0.00466)
    assert named.signal[-1] == pytest.approx(math.sqrt(0.0046600), rel=1e-3)
    flow = fq_schedules.named_schedule("rectified_flow", 10)
    t = 0.3  # timestep index 299 -> sigma 0.3 -> a = 0.7, b = 0.3 before VP normalisation
    i = flow.timesteps.index(299)
    assert flow.signal[i] == pytest.approx(0.7 / math.hypot(0.7, t))
    assert flow.noise[i] == pytest.approx(t / math.hypot(0.7, t))
    for name in fq_schedules.NAMED_SCHEDULES:
        s = fq_schedules.named_schedule(name, 20)
        assert all(abs(a * a + b * b - 1) < 1e-9 for a, b in zip(s.signal, s.noise, strict=True))
        assert s.signal == sorted(s.signal, reverse=True)  # more noise at later timesteps


def test_noising_curves_are_exact_and_show_high_frequencies_drown_first():
    gen = torch.Generator().manual_seed(8)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    x0 = torch.stack([torch.exp(-(xx ** 2 + yy ** 2) / 0.2), xx, yy * xx])[None]
    x0 = x0 + 0.05 * torch.randn(1, 3, 64, 64, generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    sched = fq_schedules.named_schedule("sd1_scaled_linear", 10)
    c = fq_schedules.noising_curves(x0, eps, sched, 0.2)
    x0l, x0h = spectral.split_frequencies(x0)
    el, eh = spectral.split_frequencies(eps)
    for i, (a, b) in enumerate(zip(sched.signal, sched.noise, strict=True)):  # brute force: build x_t
        xt = a * x0 + b * eps
        lo, hi = spectral.split_frequencies(xt)
        assert c["rel_change_low"][i] == pytest.approx(float(spectral.relative_change(lo, x0l)), rel=1e-4)
        assert c["rel_change_high"][i] == pytest.approx(float(spectral.relative_change(hi, x0h)), rel=1e-4)
        assert c["signal_low"][i] == pytest.approx(a * float(spectral.rms_per_item(x0l)), rel=1e-5)
        assert c["noise_high"][i] == pytest.approx(b * float(spectral.rms_per_item(eh)), rel=1e-5)
        assert c["rel_change_high"][i] > c["rel_change_low"][i]  # the paper's Fig. 2c, noising side
    assert c["x0_low_energy_fraction"] > 0.9
    hi_at, lo_at = c["noise_exceeds_signal_high_at"], c["noise_exceeds_signal_low_at"]
    assert hi_at is not None and (lo_at is None or lo_at > hi_at)


def test_noising_analysis_node_on_image_and_latent(sd1):
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 48), torch.linspace(0, 1, 40), indexing="ij")
    img = torch.stack([xx, yy, 0.5 * (xx + yy)], dim=-1)[None]
    grid, plots, stats = fq_nodes.FrequencyNoisingAnalysis.execute(image=img, points=20, grid_columns=4).args
    data = json.loads(stats)
    assert data["space"] == "pixel" and data["shape"] == [1, 3, 48, 40] and len(data["timesteps"]) == 20
    assert plots.shape == (2, 420, 640, 3) and grid.shape[0] == 1
    assert grid.shape[1] > 3 * 48 and grid.shape[2] > 4 * 40
    # large pictures: grid cells are downscaled to 256 px on the long side
    big = torch.rand(1, 300, 600, 3, generator=torch.Generator().manual_seed(2))
    grid = fq_nodes.FrequencyNoisingAnalysis.execute(image=big, points=4, grid_columns=2).args[0]
    assert 3 * 128 < grid.shape[1] < 3 * 300 and 2 * 256 < grid.shape[2] < 2 * 600
    # the same image in a latent space, schedule and scaling from the model, decoded by a VAE
    vae = tiny_vae()
    grid, plots, stats = fq_nodes.FrequencyNoisingAnalysis.execute(image=img[:, :40], vae=vae, model=sd1.model,
                                                             schedule="from_model", points=10).args
    data = json.loads(stats)
    assert data["space"] == "latent" and data["shape"] == [1, 4, 5, 5]
    lat = {"samples": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))}
    d_sd1 = json.loads(fq_nodes.FrequencyNoisingAnalysis.execute(latent=lat, latent_format="sd1", points=10).args[2])
    d_raw = json.loads(fq_nodes.FrequencyNoisingAnalysis.execute(latent=lat, latent_format="as_is", points=10).args[2])
    assert d_sd1["x0_low_rms"] == pytest.approx(0.18215 * d_raw["x0_low_rms"], rel=1e-5)  # SD1 latent scaling
    assert d_sd1["eps_low_rms"] == pytest.approx(d_raw["eps_low_rms"])  # same seed, same noise


def test_noising_analysis_errors(sd1):
    img = torch.rand(1, 16, 16, 3)
    with pytest.raises(ValueError, match="exactly one of image or latent"):
        fq_nodes.FrequencyNoisingAnalysis.execute()
    with pytest.raises(ValueError, match="exactly one of image or latent"):
        fq_nodes.FrequencyNoisingAnalysis.execute(image=img, latent={"samples": torch.zeros(1, 4, 2, 2)})
    with pytest.raises(ValueError, match="schedule 'from_model' needs the model"):
        fq_nodes.FrequencyNoisingAnalysis.execute(image=img, schedule="from_model")
    with pytest.raises(ValueError, match="latent_format 'from_model' needs the model"):
        fq_nodes.FrequencyNoisingAnalysis.execute(latent={"samples": torch.zeros(1, 4, 2, 2)})
    with pytest.raises(ValueError, match="empty"):
        fq_nodes.FrequencyNoisingAnalysis.execute(image=torch.zeros(0, 16, 16, 3))
    with pytest.raises(ValueError, match="threshold"):
        fq_nodes.FrequencyNoisingAnalysis.execute(image=img, threshold=0.0)


def test_nodes_have_tooltips_and_descriptions():
    for node in fq_nodes.NODES:
        node.GET_SCHEMA()  # ComfyUI's own validation (unique ids, ...) as at load time
        schema = node.define_schema()
        assert schema.description and schema.category == "prompt_anatomy/frequency"
        for inp in schema.inputs:
            assert inp.tooltip, f"{schema.node_id}.{inp.id} has no tooltip"


def test_flux2_latents_are_split_unpacked():
    """#14.4: Flux.2's 128 channels are 32 channels x 2x2 pixels (channel c*4 + i*2 + j = pixel (2y+i, 2x+j)); the split
    runs on the unpacked 32-channel latent, so a threshold is the same image-space band as on SD."""
    torch.manual_seed(0)
    packed = torch.randn(2, 128, 6, 10)
    unpacked = spectral.unpatchify(packed, 2)
    assert unpacked.shape == (2, 32, 12, 20) and torch.equal(spectral.patchify(unpacked, 2), packed)
    assert unpacked[1, 5, 2 * 3 + 1, 2 * 4 + 0] == packed[1, 5 * 4 + 1 * 2 + 0, 3, 4]
    low, high = spectral.split_frequencies(packed, 0.2, patch=2)
    ref_low, _ = spectral.split_frequencies(unpacked, 0.2)
    assert torch.allclose(spectral.unpatchify(low, 2), ref_low, atol=1e-6)
    assert torch.allclose(low + high, packed, atol=1e-5)
    lo, hi = fq_nodes.FrequencySplit.execute({"samples": packed}, 0.2).args
    assert torch.equal(lo["samples"], low) and torch.equal(hi["samples"], high)
    sd_low, _ = spectral.split_frequencies(torch.randn(1, 16, 6, 10), 0.2)  # 16 channels: not unpacked
    assert sd_low.shape == (1, 16, 6, 10)
