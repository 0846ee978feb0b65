"""CrossAttentionMapViewer on the shipped demo model (64 px images, 8x8 / 4x4 maps): the shape-convergence curve is
computed at that size, and every plot says which steps it covers and why a curve is missing."""
from __future__ import annotations

import json
import math

import pytest
import torch
from prompt_anatomy.nodes import demo_model as dm
from prompt_anatomy.nodes.attention import nodes as an
from prompt_anatomy.nodes.attention import viewer
from prompt_anatomy.nodes.guidance_cutoff import nodes as gc

import nodes as comfy_nodes

TEXT = "a red star above a blue square"


@pytest.fixture(scope="module")
def demo():
    if dm.missing_files(dm.MODEL_DIR):
        pytest.skip(f"the shipped demo weights are missing in {dm.MODEL_DIR}")
    return dm.PromptAnatomyDemoLoader.execute().args


def _view(demo, steps=10, cutoff=None):
    model, clip, vae = demo
    with torch.inference_mode():  # as the server runs nodes
        m, record = an.CrossAttentionCapture.execute(model).args[:2]
        (pos,) = comfy_nodes.CLIPTextEncode().encode(clip, TEXT)
        (neg,) = comfy_nodes.CLIPTextEncode().encode(clip, "")
        (latent,) = comfy_nodes.EmptyLatentImage().generate(64, 64, 1)
        if cutoff is None:
            (out,) = comfy_nodes.KSampler().sample(m, 0, steps, 7.0, "euler", "normal", pos, neg, latent)
        else:
            out = gc.GuidanceCutoffKSampler.execute(m, 0, steps, 7.0, "euler", "normal", pos, neg, latent,
                                                    cutoff=cutoff, keep="negative").args[0]
        (images,) = comfy_nodes.VAEDecode().decode(vae, out)
        res = an.CrossAttentionMapViewer.execute(record, TEXT, latent=out, image=images, clip=clip)
    return json.loads(res.args[6])


def test_demo_model_gives_a_shape_convergence_curve(demo):
    summary = _view(demo)
    curves = [[v for v in s["f1_relative"] if v is not None and math.isfinite(v)] for s in summary["shown"]]
    full = [c for c in curves if len(c) == len(summary["buckets"])]
    assert full, f"no token has a whole convergence curve: {curves}"
    assert any(len(set(round(v, 6) for v in c)) > 2 for c in full), f"only flat curves: {full}"
    assert any(f > 0 for s in summary["shown"] for f in s["f1"])
    assert not any("shape convergence" in n for n in summary["notes"]), summary["notes"]


def test_maps_that_stop_early_say_which_steps_and_why(demo):
    summary = _view(demo, steps=10, cutoff=0.5)
    covered = [i for i, v in enumerate(summary["class_share_per_step"]["semantic"]) if v is not None
               and math.isfinite(v)]
    assert covered == list(range(5)), covered
    note = next(n for n in summary["notes"] if n.startswith("maps cover"))
    assert note.startswith("maps cover 5 of 10 steps (0-4): no positive rows reached the chosen layers"), note


def test_step_coverage_and_convergence_notes():
    nan = float("nan")
    assert viewer.step_coverage({"semantic": [0.5, 0.4, 0.3]}, 3, "positive", {}) == ""
    assert viewer.step_coverage({"semantic": [nan, 0.4, nan]}, 3, "positive", {"a reason": 2}) == (
        "maps cover 1 of 3 steps (1-1): no positive rows reached the chosen layers in the others (2x a reason)")
    assert viewer.step_coverage({"semantic": [nan, nan]}, 2, "negative", {}) == (
        "no step reached the chosen layers with negative rows")
    f1 = torch.tensor([[0.2, 0.4], [0.3, 0.0]])
    rel = viewer.relative_to_last(f1)
    assert viewer.convergence_notes(f1, rel, ["red", "star"], True) == [
        "no shape-convergence curve for star: F1 of the last bucket is 0 (no map edge near an image edge at the end), "
        "so F1_t / F1_last is undefined"]
    zero = torch.zeros(2, 2)
    assert viewer.convergence_notes(zero, viewer.relative_to_last(zero), ["a", "b"], True)[0].startswith(
        "shape convergence not computed: no map edge")
    assert viewer.convergence_notes(zero, zero, ["a"], False) == [
        "shape convergence not computed: no step bucket holds maps"]


def test_relative_canny_finds_the_edges_of_a_coarse_upsampled_map():
    blob = torch.zeros(1, 1, 8, 8)
    blob[0, 0, 2:5, 3:6] = 1.0
    up = torch.nn.functional.interpolate(blob, size=(128, 128), mode="bilinear", align_corners=False)
    assert viewer.canny_edges(up).sum() == 0  # absolute thresholds: the 16x upsampled ramp is too gentle
    edges = viewer.canny_edges(up, relative=True)
    assert edges.sum() > 0
    assert viewer.canny_edges(torch.zeros(1, 1, 32, 32), relative=True).sum() == 0
