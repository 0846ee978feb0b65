"""Frequency split in space and time (issue #15 item 5): the optional 3-D split of video latents (B, C, T, H, W)
over frames, height and width; the per-frame default unchanged; the viewer's grid over frames."""

from __future__ import annotations

import math

import folder_paths
import pytest
import torch
from pa_support import tiny
from prompt_anatomy.nodes.frequency import nodes as fq_nodes
from prompt_anatomy.nodes.shared import spectral

import nodes as comfy_nodes


@pytest.fixture(autouse=True)
def _temp_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(folder_paths, "temp_directory", str(tmp_path))


def video(shape=(2, 16, 5, 6, 8), seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3 + 0.5


# =========================================================================== the 3-D split
@pytest.mark.parametrize("shape", [(2, 16, 5, 6, 8), (1, 4, 8, 7, 9), (1, 48, 2, 4, 4), (1, 16, 1, 6, 6)])
def test_space_time_split_and_merge_reconstruct_to_float_tolerance(shape):
    x = video(shape)
    low, high = spectral.split_frequencies(x, 0.2, mode="space_time")
    assert low.shape == x.shape and low.dtype == x.dtype
    assert (low + high - x).abs().max() <= 1e-5  # fp32 FFT round trip of values ~ 10
    assert torch.allclose(low.pow(2).sum() + high.pow(2).sum(), x.pow(2).sum(), rtol=1e-5)  # orthogonal (Parseval)
    merged = spectral.merge_frequencies(x, x, 0.2, mode="space_time")
    assert (merged - x).abs().max() <= 1e-5
    # a projection: splitting the low part again keeps all of it low
    low2, high2 = spectral.split_frequencies(low, 0.2, mode="space_time")
    assert (low2 - low).abs().max() <= 1e-5 and high2.abs().max() <= 1e-5


def test_slow_change_over_frames_stays_low_and_flicker_goes_high():
    t = torch.arange(8, dtype=torch.float32)
    slow = torch.cos(2 * math.pi * t / 8).reshape(1, 1, 8, 1, 1).expand(1, 4, 8, 6, 6).contiguous()  # 0.125 c/frame
    flicker = torch.cos(math.pi * t).reshape(1, 1, 8, 1, 1).expand(1, 4, 8, 6, 6).contiguous()  # 0.5 c/frame
    low, high = spectral.split_frequencies(slow, 0.2, mode="space_time")
    assert (low - slow).abs().max() <= 1e-5 and high.abs().max() <= 1e-5
    low, high = spectral.split_frequencies(flicker, 0.2, mode="space_time")
    assert low.abs().max() <= 1e-5 and (high - flicker).abs().max() <= 1e-5
    # per frame, every frame is a constant: both signals are all low (the split cannot see time)
    for x in (slow, flicker):
        low, high = spectral.split_frequencies(x, 0.2)
        assert (low - x).abs().max() <= 1e-5 and high.abs().max() <= 1e-5


def test_space_time_low_band_is_the_threshold_fraction_of_the_spectrum():
    assert spectral.low_radius_3d(0.2) == pytest.approx((0.6 / (4 * math.pi)) ** (1 / 3), rel=1e-12)
    assert spectral.ball_volume_in_spectrum(spectral.low_radius_3d(0.6)) == pytest.approx(0.6, abs=1e-9)  # clipped
    t, h, w = 16, 32, 32
    f = (torch.fft.fftfreq(t)[:, None, None] ** 2 + torch.fft.fftfreq(h)[None, :, None] ** 2
         + torch.fft.fftfreq(w)[None, None, :] ** 2).sqrt()
    for threshold in (0.2, 0.6):
        frac = float((f <= spectral.low_radius_3d(threshold)).float().mean())
        assert abs(frac - threshold) < 0.005, (threshold, frac)


def test_per_frame_default_is_unchanged_bit_for_bit():
    x = video()
    low, high = spectral.split_frequencies(x, 0.2)
    low_pf, high_pf = spectral.split_frequencies(x, 0.2, mode="per_frame")
    assert torch.equal(low, low_pf) and torch.equal(high, high_pf)
    # the per-frame split is the 2-D split of every frame on its own
    for f in range(x.shape[2]):
        lo_f, hi_f = spectral.split_frequencies(x[:, :, f].contiguous(), 0.2)
        assert torch.equal(low[:, :, f], lo_f) and torch.equal(high[:, :, f], hi_f)
    samples = {"samples": x}
    default = fq_nodes.FrequencySplit.execute(samples, 0.2).args
    explicit = fq_nodes.FrequencySplit.execute(samples, 0.2, video_split="per_frame").args
    assert torch.equal(default[0]["samples"], low) and torch.equal(explicit[0]["samples"], low)
    assert torch.equal(default[1]["samples"], high)
    merged = fq_nodes.FrequencyMerge.execute(samples, {"samples": video(seed=2)}, 0.2).args[0]["samples"]
    ref = spectral.merge_frequencies(x, video(seed=2), 0.2)
    assert torch.equal(merged, ref)


def test_nodes_space_time_on_video_and_image_latents():
    x = video()
    low, high = fq_nodes.FrequencySplit.execute({"samples": x}, 0.2, video_split="space_time").args
    ref_low, _ = spectral.split_frequencies(x, 0.2, mode="space_time")
    assert torch.equal(low["samples"], ref_low)
    assert not torch.allclose(low["samples"], spectral.split_frequencies(x, 0.2)[0], atol=1e-3)
    merged = fq_nodes.FrequencyMerge.execute(low, high, 0.2, video_split="space_time").args[0]["samples"]
    assert (merged - x).abs().max() <= 1e-5
    # image latents have no time axis: space_time splits them exactly as per_frame does
    img = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    a = fq_nodes.FrequencySplit.execute({"samples": img}, 0.2, video_split="space_time").args[0]["samples"]
    b = fq_nodes.FrequencySplit.execute({"samples": img}, 0.2).args[0]["samples"]
    assert torch.equal(a, b)


def test_bad_video_split_raises():
    with pytest.raises(ValueError, match="video_split must be one of per_frame, space_time"):
        fq_nodes.FrequencySplit.execute({"samples": video()}, 0.2, video_split="3d")
    with pytest.raises(ValueError, match="video_split must be one of"):
        fq_nodes.FrequencySplitPreview.execute(tiny("sd1").model, video_split="time")


# =========================================================================== recorder and viewer on tiny Wan
@pytest.fixture(scope="module")
def wan():
    return tiny("wan21_t2v")


def sample_wan(wan, model, frames=3, steps=3):
    latent = wan.empty_latent(1, 4, frames=frames)
    (out,) = comfy_nodes.common_ksampler(model, 0, steps, 4.0, "euler", "simple", wan.encode("a fox"), wan.encode(""),
                                         latent)
    return out["samples"]


def test_wan_recorder_space_time_keeps_the_latent_and_changes_the_statistics(wan):
    ref = sample_wan(wan, wan.model)
    m_pf, h_pf = fq_nodes.FrequencySplitPreview.execute(wan.model, grid_columns=2).args
    m_st, h_st = fq_nodes.FrequencySplitPreview.execute(wan.model, grid_columns=2, video_split="space_time").args
    assert torch.equal(sample_wan(wan, m_pf), ref) and torch.equal(sample_wan(wan, m_st), ref)
    (run_pf,), (run_st,) = h_pf.runs, h_st.runs
    assert run_pf.video_split == "per_frame" and run_st.video_split == "space_time"
    final = run_st.final
    fl, _ = spectral.split_frequencies(final, 0.2, mode="space_time")
    assert torch.allclose(run_st.stats["x0_low_rms"][-1], spectral.rms_per_item(fl))
    assert not torch.allclose(run_st.stats["x0_low_rms"], run_pf.stats["x0_low_rms"])


def test_viewer_grid_over_frames(wan):
    m, handle = fq_nodes.FrequencySplitPreview.execute(wan.model, grid_columns=2, video_split="space_time").args
    samples = sample_wan(wan, m, frames=3)
    latent = {"samples": samples}
    steps_grid = fq_nodes.FrequencySplitViewer.execute(handle, latent).args[0]
    frames_grid, _, stats, _ = fq_nodes.FrequencySplitViewer.execute(handle, latent, grid_over="frames").args
    step0_grid = fq_nodes.FrequencySplitViewer.execute(handle, latent, grid_over="frames", grid_step=0).args[0]
    assert frames_grid.ndim == 4 and frames_grid.shape[0] == 1
    # 3 frame columns vs 2 recorded steps + final = 3 step columns: same layout, other cells
    assert frames_grid.shape == steps_grid.shape and not torch.equal(frames_grid, steps_grid)
    assert step0_grid.shape == frames_grid.shape and not torch.equal(step0_grid, frames_grid)
    assert '"video_split": "space_time"' in stats
    with pytest.raises(ValueError, match="grid_step 1 was not recorded"):
        fq_nodes.FrequencySplitViewer.execute(handle, latent, grid_over="frames", grid_step=1)


def test_viewer_grid_over_frames_needs_a_video_run(sd1):
    m, handle = fq_nodes.FrequencySplitPreview.execute(sd1.model, grid_columns=2).args
    pos, neg = sd1.encode("a cat"), sd1.encode("")
    (out,) = comfy_nodes.common_ksampler(m, 0, 2, 4.0, "euler", "normal", pos, neg,
                                         {"samples": torch.zeros(1, 4, 4, 4)})
    with pytest.raises(ValueError, match="grid_over 'frames' needs a video latent"):
        fq_nodes.FrequencySplitViewer.execute(handle, out, grid_over="frames")
