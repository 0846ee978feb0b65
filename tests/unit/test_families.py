"""The model-family registry is the only place that knows model families: a family added as one registry entry is
picked up by every technique without touching technique code, and a model the registry does not know is refused
by every technique with the registry's message."""

from __future__ import annotations

import contextlib
import dataclasses

import comfy.supported_models
import pytest
import torch
from pa_support import ksample
from prompt_anatomy.nodes.attention import capture as cap
from prompt_anatomy.nodes.core import families
from prompt_anatomy.nodes.core import layers as cl
from prompt_anatomy.nodes.eos_swap import swap_conditioning
from prompt_anatomy.nodes.frequency.recorder import apply_recorder
from prompt_anatomy.nodes.guidance_cutoff import CutoffSettings, apply_cutoff
from prompt_anatomy.nodes.text_layers import patch as tl
from prompt_anatomy.nodes.text_layers.lora import load_text_layer_lora


class FakeUNetConfig(comfy.supported_models.SD15):
    """A model config class no registry entry names (another pack's UNet model, say)."""


def _renamed(tiny_model, config_cls):
    """A clone of ``tiny_model``'s MODEL whose model config is of class ``config_cls`` (same weights)."""
    m = tiny_model.model.clone()
    m.model = torch.nn.Module.__new__(type(m.model))
    m.model.__dict__ = dict(tiny_model.model.model.__dict__)
    cfg = config_cls.__new__(config_cls)
    cfg.__dict__ = dict(tiny_model.model.model.model_config.__dict__)
    m.model.model_config = cfg
    return m


@contextlib.contextmanager
def registered(family):
    families.register(family)
    try:
        yield family
    finally:
        families.unregister(family.name)


def _fake_family():
    sd1 = families.by_name("sd1")
    return dataclasses.replace(sd1, name="fake_unet", label="FakeUNet 1.0", configs=("FakeUNetConfig",),
                               clip_match=lambda csm: getattr(csm, "pa_fake", False))


def test_unknown_model_is_refused_by_every_technique_with_the_registry_message(sd1):
    m = _renamed(sd1, FakeUNetConfig)
    msg = r"does not support this model \(FakeUNetConfig\): the model-family registry does not know it.*SD1\.x, SD2\.x"
    cond = sd1.encode("a cat")
    for what, call in [
        ("CrossAttentionCapture", lambda: cap.install_capture(m)),
        ("TextLayerPatch", lambda: tl.apply_text_layer_patch(m, cond, "0")),
        ("LoraLoaderTextLayers", lambda: load_text_layer_lora(m, {}, "0")),
    ]:
        with pytest.raises(ValueError, match=what + " " + msg):
            call()
    # techniques that need no family knowledge work on any model
    out = ksample(apply_cutoff(m, CutoffSettings(cutoff=0.5)), cond, sd1.encode(""), steps=2)
    assert torch.isfinite(out).all()
    rec, handle = apply_recorder(m)
    ksample(rec, cond, sd1.encode(""), steps=2)
    assert len(handle.runs) == 1


def test_a_registered_family_is_picked_up_by_every_technique(sd1):
    m = _renamed(sd1, FakeUNetConfig)
    pos, neg = sd1.encode("a red cat"), sd1.encode("")
    with registered(_fake_family()) as fam:
        assert families.lookup(m) is fam
        ml = cl.model_layers(m, "test")
        assert ml.family is fam and [x.label for x in ml.layers] == [x.label for x in cl.model_layers(
            sd1.model, "test").layers]
        # attention capture: maps recorded, sampling bit-identical
        ref = ksample(m, pos, neg, steps=2)
        captured, handle = cap.install_capture(m, "all")
        assert torch.equal(ksample(captured, pos, neg, steps=2), ref)
        (run,) = handle.runs
        assert run.family == "fake_unet" and set(run.seen) == {x.label for x in ml.layers}
        # text layers: the report names the family; an empty layer list is an exact no-op
        patched, report = tl.apply_text_layer_patch(m, sd1.encode("a blue dog"), "output.2.0")
        assert report.startswith("TextLayerPatch · FakeUNet 1.0") and not torch.equal(
            ksample(patched, pos, neg, steps=2), ref)
        noop, _ = tl.apply_text_layer_patch(m, sd1.encode("a blue dog"), "")
        assert torch.equal(ksample(noop, pos, neg, steps=2), ref)
        # EOS swap: a CLIP the entry claims gets the entry's token rules; key-only patches its UNet
        sd1.clip.cond_stage_model.pa_fake = True
        try:
            cond, model_out, table = swap_conditioning(sd1.clip, "a red cat", "a blue dog", kv="key_only", model=m)
        finally:
            del sd1.clip.cond_stage_model.pa_fake
        assert table.startswith("EOS Conditioning Swap · FakeUNet 1.0 / SD1.x (CLIP-L)") and model_out is not m
        assert torch.isfinite(ksample(model_out, cond, neg, steps=2)).all()
    assert families.lookup(m) is None
