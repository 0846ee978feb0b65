"""Coverage: every node of the pack on every model family ComfyUI loads (tiny models of ``scripts/tiny_models.py``).

Each cell either WORKS (the node ran and its output is finite / recorded / patched as it should be) or is REFUSED
with a ValueError whose message names the model and the reason; anything else fails the test. The results are
written to ``tests/_artifacts/coverage.json``; ``scripts/coverage_matrix.py`` turns them into the README's matrix.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import comfy.lora
import pytest
import tiny_models
import torch
from pa_support import tiny
from prompt_anatomy.nodes.attention import capture as cap
from prompt_anatomy.nodes.attention.viewer import render_view
from prompt_anatomy.nodes.core import layers as cl
from prompt_anatomy.nodes.eos_swap import swap_conditioning
from prompt_anatomy.nodes.frequency.recorder import apply_recorder
from prompt_anatomy.nodes.guidance_cutoff import CutoffSettings, apply_cutoff
from prompt_anatomy.nodes.text_layers.localize import localize
from prompt_anatomy.nodes.text_layers.lora import load_text_layer_lora
from prompt_anatomy.nodes.text_layers.patch import apply_text_layer_patch

import nodes as comfy_nodes

FAMILIES = list(tiny_models.FACTORIES)
NODES = ("GuidanceCutoffKSampler", "EOSConditioningSwap", "TextLayerPatch", "TextLayerLocalize", "LoraLoaderTextLayers",
         "CrossAttentionCapture", "CrossAttentionMapViewer", "FrequencySplitPreview")
RESULTS: dict = {}
ARTIFACT = Path(__file__).resolve().parents[2] / "tests" / "_artifacts" / "coverage.json"
SOURCE, TARGET = "a red cat", "a red car"  # one token count with every tokenizer (text-layer swaps)


def _sample(model, t, pos, neg, steps=2):
    latent = {"samples": torch.zeros(t.latent_shape(1))}
    (out,) = comfy_nodes.common_ksampler(model, 0, steps, 2.0, "euler", "normal", pos, neg, latent)
    return out["samples"]


def _lora_for_first_layer(model, ml) -> dict:
    """A rank-1 LoRA on the first 2-D weight of the first text layer, named as core LoraLoader expects."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    prefixes = cl.weight_prefixes(ml, ml.layers[0])
    sd = model.model.state_dict()
    for lora_key, model_key in key_map.items():
        if isinstance(model_key, str) and model_key.startswith(prefixes) and sd[model_key].ndim == 2:
            out_f, in_f = sd[model_key].shape
            return {f"{lora_key}.lora_up.weight": torch.full((out_f, 1), 0.1),
                    f"{lora_key}.lora_down.weight": torch.full((1, in_f), 0.1)}
    raise AssertionError(f"no LoRA key for {prefixes}")


def _run(node: str, t, pos, neg):
    m = t.model
    if node == "GuidanceCutoffKSampler":
        assert torch.isfinite(_sample(apply_cutoff(m, CutoffSettings(cutoff=0.5)), t, pos, neg)).all()
    elif node == "EOSConditioningSwap":
        cond, _, table = swap_conditioning(t.clip, SOURCE, TARGET)
        assert torch.isfinite(_sample(m, t, cond, neg)).all() and "[EOS]" in table
    elif node == "TextLayerPatch":
        patched, report = apply_text_layer_patch(m, t.encode(TARGET), "0")
        out = _sample(patched, t, pos, neg)
        assert torch.isfinite(out).all() and not torch.equal(out, _sample(m, t, pos, neg)), report
    elif node == "TextLayerLocalize":
        latent = {"samples": torch.zeros(t.latent_shape(1))}
        scores, *_ = localize(m, pos, t.encode(TARGET), neg, latent, steps=2, candidates="")  # every layer alone
        assert len(scores) == len(cl.model_layers(m, node).layers) and all(math.isfinite(s.score) for s in scores)
    elif node == "LoraLoaderTextLayers":
        ml = cl.model_layers(m, node)
        patched, report = load_text_layer_lora(m, _lora_for_first_layer(m, ml), "0")
        assert "kept 1 of 1" in report and torch.isfinite(_sample(patched, t, pos, neg)).all()
    elif node in ("CrossAttentionCapture", "CrossAttentionMapViewer"):
        captured, handle = cap.install_capture(m, "all")
        ref = _sample(m, t, pos, neg)
        assert torch.equal(_sample(captured, t, pos, neg), ref)  # bit-identical with capture on
        (run,) = handle.runs
        assert run.seen and not run.errors, (run.skipped, run.errors)
        if node == "CrossAttentionMapViewer":
            view = render_view(run, True, SOURCE, clip=t.clip)
            assert torch.isfinite(view.heatmaps).all() and view.heatmaps.shape[0] >= 1
    elif node == "FrequencySplitPreview":
        rec, handle = apply_recorder(m)
        _sample(rec, t, pos, neg)
        assert len(handle.runs) == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_every_node_on_every_family(family):
    t = tiny(family)
    pos, neg = t.encode(SOURCE), t.encode("")
    row = RESULTS.setdefault(family, {"config": t.config_class})
    for node in NODES:
        try:
            _run(node, t, pos, neg)
            row[node] = {"status": "works"}
        except ValueError as e:
            msg = str(e)
            # a refusal must name the model (its config class or family label) and give a reason
            refused = "does not support" in msg or "is not one" in msg
            assert refused and (t.config_class in msg or "text encoder" in msg), f"{family} / {node}: {msg}"
            row[node] = {"status": "refused", "reason": msg}


def teardown_module(module):
    if RESULTS:
        ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
        ARTIFACT.write_text(json.dumps({"nodes": list(NODES), "families": RESULTS}, indent=1))
