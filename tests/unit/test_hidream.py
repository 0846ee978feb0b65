"""HiDream (tiny model of ``scripts/tiny_models.py``: 1 double + 1 single block). ComfyUI's HiDream offers no block
replace and passes its forward's arguments by position; each block makes one attention call on [image, text], the
text being T5 (128 tokens) + the last Llama layer + that block's Llama layer (both from conditioning_llama3). The
pack counts the calls (core.layers.CallPlan), reads the text length from the registry's ``text_len``, and gives the
patch's target rows the target prompt's Llama states (registry ``text_extras``). The [EOS] swap rebuilds the T5
context and every layer of the Llama states (registry ``EncoderSpec.cond_key``, ``token_axis``, ``pad_is_end``)."""

from __future__ import annotations

import pytest
import torch
from pa_support import (
    attention_spy,
    capture_check,
    ksample,
    patch_rows_check,
    patched_kv_records,
    rank1_lora,
    running_block,
    tiny,
)
from prompt_anatomy.nodes.core import hooks, runs
from prompt_anatomy.nodes.core import layers as cl
from prompt_anatomy.nodes.eos_swap import nodes as es_nodes
from prompt_anatomy.nodes.text_layers import localize as tll
from prompt_anatomy.nodes.text_layers.lora import load_text_layer_lora

PROMPT, TARGET = "a red cat", "a red car"


def kw(t):
    return {"latent": {"samples": torch.zeros(t.latent_shape(1, size=4))}, "cfg": 2.0}


HIDREAM_BLOCKS = (("double_stream_blocks", "double"), ("single_stream_blocks", "single"))


def test_registry_entry():
    t = tiny("hidream")
    ml = cl.model_layers(t.model, "test")
    assert ml.family.name == "hidream" and ml.family.text_last and ml.kind == "dit"
    assert [x.label for x in ml.layers] == ["double.0", "single.0"]
    assert cl.weight_prefixes(ml, ml.layers[1]) == ("diffusion_model.single_stream_blocks.0.block.attn1.",)
    keys = t.model.model.state_dict()
    assert any(k.startswith("diffusion_model.double_stream_blocks.0.block.attn1.to_q_t.") for k in keys)
    assert cl.layer_heads(t.model, ml, ml.layers[0]) == 2
    assert ml.family.context_width(t.model) == t.encode(PROMPT)[0][0].shape[-1]


def test_counted_layer_is_the_block_that_runs_and_text_is_t5_plus_two_llama_segments():
    t = tiny("hidream")
    pos, neg = t.encode(PROMPT), t.encode("")
    m = t.model.clone()
    runs.ensure_run_tracking(m)
    cl.ensure_layer_tracking(m, cl.model_layers(m, "test"))
    records = []
    with running_block(m.model.diffusion_model, HIDREAM_BLOCKS) as live:
        hooks.chain_attention_override(m, attention_spy(records, live))
        ksample(m, pos, neg, steps=2, **kw(t))
    assert [r["running"] for r in records] == [("double", 0), ("single", 0)] * (len(records) // 2)
    assert len(records) == 2 * 2  # 2 steps, cond and uncond batched (same lengths)
    n_img = 4  # 4 x 4 latent, patch 2
    llama = pos[0][1]["conditioning_llama3"].shape[2]
    for r in records:
        assert r["counted"] == r["running"]
        assert r["txt"] == pos[0][0].shape[1] + 2 * llama == r["k"].shape[1] - n_img


def test_capture_maps_bit_identical_and_complete():
    t = tiny("hidream")
    pos, neg = t.encode(PROMPT), t.encode("")
    run = capture_check(t, pos, neg, **kw(t))
    assert run.ref_hw == (2, 2) and run.seen == {"double.0": 3, "single.0": 3} and not run.skipped
    (length,) = run.sums
    assert length == pos[0][0].shape[1]  # the T5 prompt's columns; the Llama segments count with "[image]"
    total = run.sums[length].bucket_mean(0).sum(1)
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5)


def test_patch_adds_target_rows_only_in_patched_steps():
    t = tiny("hidream")
    patch_rows_check(t, t.encode(PROMPT), t.encode(""), t.encode(TARGET), ("double", 0), **kw(t))


@pytest.mark.parametrize("layer", [0, 1])
def test_patch_swaps_the_whole_text_of_the_patched_layer_only(layer):
    """The source row's text K/V (the last 128 + 2 x Llama tokens: T5 and both Llama segments, the target rows
    carrying the target's Llama states) equal the target row's in the patched layer and in no other."""
    t = tiny("hidream")
    chosen = (("double", 0), ("single", 0))[layer]
    swapped = 0
    for r, s, g in patched_kv_records(t, t.encode(PROMPT), t.encode(""), t.encode(TARGET), chosen, **kw(t)):
        txt = r["txt"]
        same = torch.equal(r["k"][s, -txt:], r["k"][g, -txt:]) and torch.equal(r["v"][s, -txt:], r["v"][g, -txt:])
        assert same == (r["counted"] == chosen), r["counted"]
        swapped += same
    assert swapped == 2


def test_localize_and_lora_on_the_blocks_attention():
    t = tiny("hidream")
    pos, neg, tgt = t.encode(PROMPT), t.encode(""), t.encode(TARGET)
    scores, *_rest = tll.localize(t.model, pos, tgt, neg, {"samples": torch.zeros(t.latent_shape(1, size=4))},
                                  steps=2, cfg=2.0)
    assert [s.layers for s in scores] == [(("double", 0),), (("single", 0),)]
    lora = rank1_lora(t.model, ["double_stream_blocks.0.block.attn1.to_q", "single_stream_blocks.0.block.attn1.to_k",
                                "double_stream_blocks.0.block.ff_i.shared_experts.w1"])
    patched, report = load_text_layer_lora(t.model, lora, "single.0")
    assert "kept 1 of 3" in report and "fuse attention and MLP" not in report
    assert [k[0] if isinstance(k, tuple) else k for k in patched.patches] == [
        "diffusion_model.single_stream_blocks.0.block.attn1.to_k.weight"]


def test_eos_swap_rebuilds_t5_and_every_llama_layer():
    """T5 (the context): semantic from 0, </s> = [EOS], padding to 128. Llama-3.1 (conditioning_llama3, (1, layers,
    tokens, C)): <|begin_of_text|> at 0, the prompt, then <|eot_id|> padding to 128 — causal, so the first
    <|eot_id|> (end of turn) is the [EOS] and the rest the padding. source_sem+target_eos takes both encoders' [EOS]
    and padding slots from the target in every Llama layer; everything else stays the source's."""
    from prompt_anatomy.nodes.shared import tokens as pa_tokens

    t = tiny("hidream")
    layout = pa_tokens.detect_layout(t.clip)
    llama = layout.part("llama")
    assert llama.in_entry and llama.token_axis == 2 and llama.start_token == 128000 and llama.end_token == 128009
    a_text, b_text = "a red cat", "a blue dog on a wooden table"
    pa = pa_tokens.token_positions(layout, t.clip.tokenize(a_text))
    pb = pa_tokens.token_positions(layout, t.clip.tokenize(b_text))
    (la,), (lb,) = pa["llama"], pb["llama"]
    ids = [e[0] for e in t.clip.tokenize(a_text)["llama"][0]]
    assert (la.start, la.sos, la.end) == (0, 0, 128) and ids[la.eos] == 128009 and 128009 not in ids[:la.eos]
    assert lb.eos > la.eos
    (ca, da), = t.clip.encode_from_tokens_scheduled(t.clip.tokenize(a_text))
    (cb, db), = t.clip.encode_from_tokens_scheduled(t.clip.tokenize(b_text))
    cond, _, table = es_nodes.swap_conditioning(t.clip, a_text, b_text)
    (out, d), = cond
    (ta,), (tb,) = pa["t5xxl"], pb["t5xxl"]
    assert torch.equal(out[0, :ta.eos], ca[0, :ta.eos]) and torch.equal(out[0, ta.eos], cb[0, tb.eos])
    got, la3, lb3 = d["conditioning_llama3"], da["conditioning_llama3"], db["conditioning_llama3"]
    assert got.shape == la3.shape and got.shape[1] > 1  # (1, layers, tokens, C)
    assert torch.equal(got[0, :, :la.eos], la3[0, :, :la.eos])
    n_b = lb.end - lb.eos
    assert torch.equal(got[0, :, la.eos:la.eos + n_b], lb3[0, :, lb.eos:lb.end])
    assert torch.equal(got[0, :, la.eos + n_b:], lb3[0, :, lb.end - 1:lb.end].expand_as(got[0, :, la.eos + n_b:]))
    assert "'conditioning_llama3' tokens 0–127, every layer" in table
    zero, _, _ = es_nodes.swap_conditioning(t.clip, a_text, b_text, construction="sem+zero", eos_scope="first_eos")
    (_, dz), = zero
    assert torch.count_nonzero(dz["conditioning_llama3"][0, :, la.eos]) == 0
    assert torch.equal(dz["conditioning_llama3"][0, :, la.eos + 1:], la3[0, :, la.eos + 1:])
    assert torch.isfinite(ksample(t.model, cond, t.encode(""), steps=2, **kw(t))).all()
    long = " ".join(["red"] * 140)  # more Llama tokens than the 128 positions: no <|eot_id|> follows the prompt
    with pytest.raises(ValueError, match=r"the prompt fills all \d+ Llama-3.1 positions.*Shorten the prompt"):
        es_nodes.swap_conditioning(t.clip, long, b_text)


def test_lora_training_refused_with_the_measured_reason(tmp_path):
    """Measured: training through HiDream's blocks under inference mode fails in its MoE gate (F.linear on the
    raw weight): the trainer refuses up front, naming that reason."""
    from prompt_anatomy.nodes.text_layers import train_node

    t = tiny("hidream")
    with pytest.raises(ValueError, match=r"cannot train a LoRA on HiDream: the MoE gate .*inference mode"):
        train_node.train(t.model, {"samples": torch.zeros(t.latent_shape(1, size=4))}, t.encode(PROMPT), "double.0",
                         2, 2, 0.01, 0, "x", str(tmp_path))
