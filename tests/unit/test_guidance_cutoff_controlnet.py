"""GuidanceCutoffKSampler with a ControlNet in the graph (issue 3: "correct ... with ControlNet in the graph").

The ControlNet is ComfyUI's own ``comfy.cldm.cldm.ControlNet`` sized like the tiny SD1 UNet, with random non-zero
weights, wrapped as ``comfy.controlnet.ControlNet`` and applied with the core ``ControlNetApplyAdvanced`` node, so
every ControlNet code path (hint upscaling and broadcasting to the batch, ``get_control`` per model call, control
merging into the UNet) is ComfyUI's. Rows are counted twice: entering the diffusion model (APPLY_MODEL wrapper)
and entering the control model (a forward pre-hook on it).
"""

from __future__ import annotations

import contextlib

import comfy.cldm.cldm
import comfy.controlnet
import comfy.ops
import pytest
import torch
from pa_support import count_rows, empty_latent, ksample, tiny_models
from prompt_anatomy.nodes.guidance_cutoff import nodes as gc_nodes

import nodes as comfy_nodes

Node = gc_nodes.GuidanceCutoffKSampler


@pytest.fixture(scope="module")
def conds(sd1):
    return sd1.encode("a red square on a blue background"), sd1.encode("")


@pytest.fixture(scope="module")
def controlnet(sd1):
    """A tiny ControlNet matching the tiny SD1 UNet, random weights (zero convs included, so it acts)."""
    config = dict(sd1.model.model.model_config.unet_config)
    config.pop("out_channels")
    config.update(hint_channels=3, dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    control_model = comfy.cldm.cldm.ControlNet(**config)
    tiny_models._init_weights(control_model, seed=11)
    control_model.eval()
    return comfy.controlnet.ControlNet(control_model, load_device=torch.device("cpu"), manual_cast_dtype=None)


@pytest.fixture(scope="module")
def hint():
    return torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(3))  # IMAGE [B, H, W, 3]


def apply_controlnet(pos, neg, controlnet, hint, strength=0.5):
    """Core ControlNetApplyAdvanced (the node users wire between the prompts and the sampler)."""
    return comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, controlnet, hint, strength, 0.0, 1.0)


@contextlib.contextmanager
def control_rows(controlnet):
    """Batch rows of every call that enters the control model."""
    rows: list[int] = []
    handle = controlnet.control_model.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(kwargs["x"].shape[0]), with_kwargs=True)
    try:
        yield rows
    finally:
        handle.remove()


def run_node(model, pos, neg, *, steps=10, cfg=5.0, sampler="euler", latent=None, seed=0, **kw):
    out = Node.execute(model, seed, steps, cfg, sampler, "normal", pos, neg, latent or empty_latent(), 1.0, **kw)
    return out.args[0]["samples"], out.args[1]


def test_the_tiny_controlnet_changes_the_output(sd1, conds, controlnet, hint):
    pos_c, neg_c = apply_controlnet(*conds, controlnet, hint)
    with control_rows(controlnet) as rows:
        out = ksample(sd1.model, pos_c, neg_c, steps=4)
    assert rows == [2, 2, 2, 2]  # core KSampler: both branches in one call per step, the control model with them
    assert torch.isfinite(out).all()
    assert not torch.equal(out, ksample(sd1.model, *conds, steps=4))


@pytest.mark.parametrize("keep", ["negative", "positive"])
def test_cutoff_beyond_last_step_is_bit_identical_to_ksampler_with_controlnet(sd1, conds, controlnet, hint, keep):
    pos_c, neg_c = apply_controlnet(*conds, controlnet, hint)
    ref = ksample(sd1.model, pos_c, neg_c, steps=6)
    for cutoff, unit in ((1.0, "fraction"), (6, "step"), (1e-4, "sigma")):
        with control_rows(controlnet) as rows:
            out, report = run_node(sd1.model, pos_c, neg_c, steps=6, cutoff=cutoff, cutoff_unit=unit, keep=keep)
        assert torch.equal(out, ref), (cutoff, unit)
        assert rows == [2] * 6, (cutoff, unit)
        assert "Guidance ran on every step" in report


@pytest.mark.parametrize("batch", [1, 2])
def test_half_cutoff_runs_15_rows_through_unet_and_controlnet(sd1, conds, controlnet, hint, batch):
    pos_c, neg_c = apply_controlnet(*conds, controlnet, hint)
    m, counter = count_rows(sd1.model)
    with control_rows(controlnet) as rows:
        out, report = run_node(m, pos_c, neg_c, steps=10, cutoff=0.5, latent=empty_latent(batch))
    assert counter["rows"] == 15 * batch
    assert rows == [2 * batch] * 5 + [batch] * 5  # the control model follows the cut: 15 rows per image
    assert f"Model rows evaluated: {15 * batch} (plain CFG: {20 * batch}; 25.0 % fewer)" in report
    plain, _ = run_node(sd1.model, *conds, steps=10, cutoff=0.5, latent=empty_latent(batch))
    assert torch.isfinite(out).all() and not torch.equal(out, plain)


def test_keep_positive_cutoff_zero_equals_ksampler_cfg1_with_controlnet(sd1, conds, controlnet, hint):
    pos_c, neg_c = apply_controlnet(*conds, controlnet, hint)
    with control_rows(controlnet) as ref_rows:
        ref = ksample(sd1.model, pos_c, neg_c, steps=6, cfg=1.0)
    with control_rows(controlnet) as rows:
        out, _ = run_node(sd1.model, pos_c, neg_c, steps=6, cfg=7.0, cutoff=0.0, keep="positive")
    assert torch.equal(out, ref)
    assert rows == ref_rows == [1] * 6
    assert not torch.equal(out, ksample(sd1.model, *conds, steps=6, cfg=1.0))  # the hint acted on the kept branch


def test_keep_negative_cutoff_zero_uses_the_negative_branch_with_its_control(sd1, conds, controlnet, hint):
    pos_c, neg_c = apply_controlnet(*conds, controlnet, hint)
    ref = ksample(sd1.model, neg_c, pos_c, steps=5, cfg=1.0)  # the negative prompt (with its control) alone
    with control_rows(controlnet) as rows:
        out, _ = run_node(sd1.model, pos_c, neg_c, steps=5, cfg=7.0, cutoff=0.0, keep="negative")
    assert torch.equal(out, ref)
    assert rows == [1] * 5
    assert not torch.equal(out, ksample(sd1.model, conds[1], conds[0], steps=5, cfg=1.0))


@pytest.mark.parametrize("keep,control_calls", [("negative", 5), ("positive", 10)])
def test_control_on_the_positive_only_runs_only_where_that_branch_runs(sd1, conds, controlnet, hint, keep,
                                                                       control_calls):
    pos_c, _ = apply_controlnet(*conds, controlnet, hint)
    neg = conds[1]  # no control: the branches cannot share a batch, so each step makes two model calls
    m, counter = count_rows(sd1.model)
    with control_rows(controlnet) as rows:
        run_node(m, pos_c, neg, steps=10, cutoff=0.5, keep=keep)
    assert counter["rows"] == 15 and counter["calls"] == 15
    assert rows == [1] * control_calls  # the skipped branch's ControlNet is not evaluated either


@pytest.mark.parametrize("keep", ["negative", "positive"])
def test_per_image_hints_stay_with_their_images_across_the_switch(sd1, conds, controlnet, keep):
    """Batch 2 with one hint per image: ComfyUI caches the hint broadcast to the two-branch batch (4 rows) at step 0
    and re-slices it for the single-branch calls (2 rows) from step 1 on. Each image must match a batch-1 run with
    its own hint and its own noise (batch_index) up to float noise (~5e-4 on this tiny model's large latents; hints
    swapped after the switch give > 2e-2), and differ from the run with the hints swapped from the start."""
    hints = torch.stack([torch.zeros(32, 32, 3), torch.ones(32, 32, 3)])

    def run(h, latent):
        pos_c, neg_c = apply_controlnet(*conds, controlnet, h, strength=1.0)
        return run_node(sd1.model, pos_c, neg_c, steps=10, cutoff=1, cutoff_unit="step", keep=keep, latent=latent)[0]

    both = run(hints, empty_latent(2))
    for i in range(2):
        (alone,) = run(hints[i:i + 1], {"samples": torch.zeros(1, 4, 4, 4), "batch_index": [i]})
        assert torch.allclose(both[i], alone, rtol=0, atol=5e-3), (i, float((both[i] - alone).abs().max()))
    assert float((both - run(hints.flip(0), empty_latent(2))).abs().max()) > 0.1
