"""Lumina 2 and Z-Image (ComfyUI's single-stream NextDiT; tiny models of ``scripts/tiny_models.py``: 2 text refiner
blocks, 2 image refiner blocks, 2 joint layers). NextDiT offers no block replace, so the pack finds each layer by
counting attention calls per forward (core.layers.CallPlan): the capture, TextLayerPatch, Localize and the LoRA
loader on its joint layers. Z-Image pads the text stream to a multiple of 32 with a learned token."""

from __future__ import annotations

import json

import pytest
import torch
from comfy.patcher_extension import WrappersMP
from pa_support import attention_spy, count_rows, ksample, patched_kv_records, rank1_lora, running_block, tiny
from prompt_anatomy.nodes.attention import capture as cap
from prompt_anatomy.nodes.attention import nodes as att_nodes
from prompt_anatomy.nodes.core import families, hooks, runs
from prompt_anatomy.nodes.core import layers as cl
from prompt_anatomy.nodes.text_layers import localize as tll
from prompt_anatomy.nodes.text_layers.lora import load_text_layer_lora
from prompt_anatomy.nodes.text_layers.patch import apply_text_layer_patch

NEXTDIT = ["zimage", "lumina2"]
PROMPT, TARGET = "a red cat", "a red car"  # the same token count with both tokenizers (Qwen3, Gemma stand-in)


def kw(t, **extra):
    return {"channels": t.latent_channels, "size": 16, "cfg": 2.0, **extra}


NEXTDIT_BLOCKS = (("context_refiner", "context"), ("noise_refiner", "noise"), ("layers", "single"))


# =========================================================================== registry and counting
@pytest.mark.parametrize("family", NEXTDIT)
def test_registry_entry(family):
    t = tiny(family)
    ml = cl.model_layers(t.model, "test")
    assert ml.family.text_entry == (families.SINGLE,) and ml.kind == "dit"
    assert [x.label for x in ml.layers] == ["single.0", "single.1"]
    assert cl.weight_prefixes(ml, ml.layers[1]) == ("diffusion_model.layers.1.attention.",)
    keys = t.model.model.state_dict()
    assert any(k.startswith("diffusion_model.layers.1.attention.qkv.") for k in keys)
    assert cl.layer_heads(t.model, ml, ml.layers[0]) == 2
    assert [x.label for x in cl.parse_layers("single.1", ml)] == ["single.1"]


@pytest.mark.parametrize("family", NEXTDIT)
def test_counted_layer_is_the_block_that_runs(family):
    t = tiny(family)
    pos, neg = t.encode(PROMPT), t.encode("")
    m = t.model.clone()
    runs.ensure_run_tracking(m)
    cl.ensure_layer_tracking(m, cl.model_layers(m, "test"))
    cl.ensure_layer_tracking(m, cl.model_layers(m, "test"))  # idempotent: one wrapper
    assert len(m.wrappers[WrappersMP.DIFFUSION_MODEL][cl.TRACKING_KEY]) == 1
    records = []
    with running_block(m.model.diffusion_model, NEXTDIT_BLOCKS) as live:
        hooks.chain_attention_override(m, attention_spy(records, live))
        ksample(m, pos, neg, steps=2, **kw(t))
    order = [r["running"] for r in records]
    per_forward = [("context", 0), ("context", 1), ("noise", 0), ("noise", 1), ("single", 0), ("single", 1)]
    assert order == per_forward * (len(order) // 6) and len(order) == 6 * 2 * 2  # 2 steps x (cond, uncond)
    for r in records:
        assert r["counted"] == (r["running"] if r["running"][0] == "single" else None)
    ctx = [r for r in records if r["counted"] is not None]
    tokens = {pos[0][0].shape[1], neg[0][0].shape[1]}
    multiple = 32 if family == "zimage" else 1
    assert {r["txt"] for r in ctx} == {n + (-n) % multiple for n in tokens}


# =========================================================================== capture
@pytest.mark.parametrize("family", NEXTDIT)
def test_capture_maps_bit_identical(family):
    t = tiny(family)
    pos, neg = t.encode(PROMPT), t.encode("")
    ref = ksample(t.model, pos, neg, steps=3, **kw(t))
    m, handle = cap.install_capture(t.model, "all", buckets=3)
    assert torch.equal(ksample(m, pos, neg, steps=3, **kw(t)), ref)
    (run,) = handle.runs
    assert run.ref_hw == (2, 2) and run.seen == {"single.0": 3, "single.1": 3} and not run.skipped
    (length,) = run.sums
    assert length == pos[0][0].shape[1]
    sums = run.sums[length]
    assert sums.extra  # the [image] column: image keys (and Z-Image's learned text pad tokens)
    total = sums.bucket_mean(0).sum(1)  # text columns + the extra column: every query's whole attention
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5)


def test_capture_and_patch_chained_each_count_every_call():
    t = tiny("zimage")
    pos, neg, tgt = t.encode(PROMPT), t.encode(""), t.encode(TARGET)
    ml = cl.model_layers(t.model, "test")
    patched, _ = apply_text_layer_patch(t.model, tgt, (ml.layers[0],))
    alone = ksample(patched, pos, neg, steps=2, **kw(t))
    m, handle = cap.install_capture(patched, "all", buckets=1)
    assert torch.equal(ksample(m, pos, neg, steps=2, **kw(t)), alone)
    (run,) = handle.runs
    assert run.seen == {"single.0": 2, "single.1": 2} and not run.skipped


def test_zimage_pad_tokens_are_not_prompt_columns():
    t = tiny("zimage")
    pos, neg = t.encode(PROMPT), t.encode("")
    n = pos[0][0].shape[1]
    assert n < 32  # padded to 32 in the model: the maps keep n prompt columns
    m, handle = cap.install_capture(t.model, "all", buckets=1)
    with torch.inference_mode():
        out = {"samples": ksample(m, pos, neg, steps=2, **kw(t))}
        res = att_nodes.CrossAttentionMapViewer.execute(handle, PROMPT, latent=out, clip=t.clip)
    summary = json.loads(res.args[6])
    assert summary["context_tokens"] == n and summary["family"] == "zimage"
    assert summary["layers"]["seen"] == {"single.0": 2, "single.1": 2}
    # token labels from the registry's chat-template rules: Qwen3's template head, the prompt, <|im_end|> = [EOS]
    assert [(x["text"], x["class"]) for x in summary["tokens"]] == [
        ("<|im_start|>", "template"), ("user", "template"), ("\\n", "template"), ("a", "semantic"),
        ("red", "semantic"), ("cat", "semantic"), ("<|im_end|>", "[EOS]"), ("\\n", "padding"),
        ("<|im_start|>", "padding"), ("assistant", "padding"), ("\\n", "padding")]
    assert set(summary["class_share"]) == {"template", "semantic", "[EOS]", "padding", "[image]"}
    assert not any("positions only" in note for note in summary["notes"])


def test_lumina2_tokens_are_positions_with_the_reason():
    t = tiny("lumina2")
    pos, neg = t.encode(PROMPT), t.encode("")
    m, handle = cap.install_capture(t.model, "all", buckets=1)
    with torch.inference_mode():
        out = {"samples": ksample(m, pos, neg, steps=1, **kw(t))}
        res = att_nodes.CrossAttentionMapViewer.execute(handle, PROMPT, latent=out, clip=t.clip)
    summary = json.loads(res.args[6])
    assert [x["text"] for x in summary["tokens"]] == [f"#{i}" for i in range(pos[0][0].shape[1])]
    assert any(note.startswith("token labels are positions only: the registry gives Lumina 2's Gemma-2 no token "
                               "classes (its tokenizer puts only <bos>") for note in summary["notes"])


# =========================================================================== TextLayerPatch
@pytest.mark.parametrize("family,batch", [("zimage", 1), ("zimage", 2), ("lumina2", 1)])
def test_patch_adds_target_rows_only_in_patched_steps(family, batch):
    t = tiny(family)
    pos, neg, tgt = t.encode(PROMPT), t.encode(""), t.encode(TARGET)
    assert tgt[0][0].shape == pos[0][0].shape
    ml = cl.model_layers(t.model, "test")
    plain, plain_rows = count_rows(t.model)
    out_a = ksample(plain, pos, neg, steps=4, batch=batch, **kw(t))
    m, _ = apply_text_layer_patch(t.model, tgt, (ml.layers[1],), start_percent=0.5)
    counted, rows = count_rows(m)
    out_p = ksample(counted, pos, neg, steps=4, batch=batch, **kw(t))
    assert rows["rows"] == plain_rows["rows"] + 2 * batch  # one extra row per image on the 2 patched steps only
    assert not torch.equal(out_a, out_p)
    m0, _ = apply_text_layer_patch(t.model, tgt, (ml.layers[1],), start_percent=1.0)
    assert torch.equal(ksample(m0, pos, neg, steps=4, batch=batch, **kw(t)), out_a)  # no patched step: bit-identical


@pytest.mark.parametrize("family", NEXTDIT)
def test_patch_layer_kv_comes_from_the_target_rows(family):
    """Inside the patch (a recorder installed before it), the source rows' text K/V of the patched layer equal the
    target rows' and the image part and every other layer are untouched."""
    t = tiny(family)
    layer = cl.model_layers(t.model, "test").layers[0]
    swapped = 0
    for r, s, g in patched_kv_records(t, t.encode(PROMPT), t.encode(""), t.encode(TARGET), layer, **kw(t)):
        txt = r["txt"]
        same_txt = torch.equal(r["k"][s, :, :txt], r["k"][g, :, :txt]) and \
            torch.equal(r["v"][s, :, :txt], r["v"][g, :, :txt])
        assert same_txt == (r["counted"] == layer)
        swapped += same_txt
    assert swapped == 2  # 2 steps, one positive row each


# =========================================================================== Localize, LoRA, refusals
@pytest.mark.parametrize("family", NEXTDIT)
def test_localize_scores_every_layer(family):
    t = tiny(family)
    pos, neg, tgt = t.encode(PROMPT), t.encode(""), t.encode(TARGET)
    scores, _src, _tgt, patched, table, best, _k = tll.localize(
        t.model, pos, tgt, neg, {"samples": torch.zeros(t.latent_shape(1, size=4))}, steps=2, cfg=2.0)
    assert [s.layers for s in scores] == [(("single", 0),), (("single", 1),)] and len(patched) == 2
    assert best in ("single.0", "single.1") and "2 candidates of 2 attention blocks" in table


def test_lora_keeps_only_the_selected_layers_attention():
    t = tiny("zimage")
    lora = rank1_lora(t.model, [f"layers.{b}.{part}" for b in (0, 1)
                                for part in ("attention.qkv", "attention.out", "feed_forward.w1")])
    patched, report = load_text_layer_lora(t.model, lora, "single.1")
    assert "kept 2 of 6" in report
    assert sorted(k[0] if isinstance(k, tuple) else k for k in patched.patches) == [
        "diffusion_model.layers.1.attention.out.weight", "diffusion_model.layers.1.attention.qkv.weight"]


@pytest.mark.parametrize("family", NEXTDIT)
def test_lora_trains_on_the_chosen_layer_as_the_server_loads_it(family):
    import tiny_models
    from prompt_anatomy.nodes.text_layers import lora_train as lt

    with torch.inference_mode():  # as the server runs nodes: the weights are inference tensors
        t = tiny_models.make(family)
        pos = t.encode(PROMPT)
    ml = cl.model_layers(t.model, "test")
    with torch.inference_mode():
        lora, losses = lt.train_text_layer_lora(t.model, {"samples": torch.zeros(1, 16, 4, 4)}, pos,
                                                list(cl.weight_prefixes(ml, ml.layers[1])), steps=2, rank=2, seed=0,
                                                targets=None)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert lora and all(".layers.1.attention." in k for k in lora)
