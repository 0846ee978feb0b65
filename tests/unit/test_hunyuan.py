"""HunyuanImage 2.1 and HunyuanVideo 1.5 (tiny models of ``scripts/tiny_models.py``: 1 double + 1 single block).
Their joint attention runs on [image, text] (double blocks flip img/txt, single blocks concatenate img then txt), so
the registry marks the text as last; their text stream also holds ByT5 glyph tokens of quoted text (after the
prompt on HunyuanImage 2.1, before it on HunyuanVideo 1.5). Capture, TextLayerPatch, Localize and the LoRA loader
on both; the [EOS] swap on their Qwen2.5-VL context with Qwen-Image's template rules."""

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
    tiny,
)
from prompt_anatomy.nodes.attention import capture as cap
from prompt_anatomy.nodes.core import families, hooks, runs
from prompt_anatomy.nodes.core import layers as cl
from prompt_anatomy.nodes.eos_swap import nodes as es_nodes
from prompt_anatomy.nodes.shared import tokens as pa_tokens
from prompt_anatomy.nodes.text_layers import localize as tll
from prompt_anatomy.nodes.text_layers.lora import load_text_layer_lora
from prompt_anatomy.nodes.text_layers.patch_hooks import _target_extras
from prompt_anatomy.nodes.text_layers.patch_settings import TargetText

HUNYUAN = ["hunyuan_image21", "hunyuan_video15"]
PROMPT, TARGET = "a red cat", "a red car"
IM_START, IM_END, ASSISTANT, NL = 151644, 151645, 77091, 198


def kw(t, **extra):
    return {"latent": {"samples": torch.zeros(t.latent_shape(1, size=4))}, "cfg": 2.0, **extra}


def encode(t, text):
    cond = t.encode(text)
    if t.family == "hunyuan_video15":  # its encode_adm reads pooled_output (None is fine)
        cond = [[c, {**d, "pooled_output": d.get("pooled_output")}] for c, d in cond]
    return cond


# =========================================================================== registry
@pytest.mark.parametrize("family", HUNYUAN)
def test_registry_entry(family):
    t = tiny(family)
    ml = cl.model_layers(t.model, "test")
    assert ml.family.name == family and ml.family.text_last and ml.kind == "dit"
    assert [x.label for x in ml.layers] == ["double.0", "single.0"]
    keys = t.model.model.state_dict()
    for layer in ml.layers:
        for prefix in cl.weight_prefixes(ml, layer):
            assert any(k.startswith(prefix) for k in keys), prefix
    assert ml.family.context_width(t.model) == t.encode(PROMPT)[0][0].shape[-1]


@pytest.mark.parametrize("family", HUNYUAN)
def test_text_is_the_last_part_of_the_joint_sequence(family):
    """Ground truth from the model: the text stream's keys (txt_attn of the double block, run on its own by a
    forward hook) are the LAST txt_len keys of the joint attention call, not the first."""
    t = tiny(family)
    pos, neg = encode(t, PROMPT), encode(t, "")
    m = t.model.clone()
    runs.ensure_run_tracking(m)
    cl.ensure_layer_tracking(m, cl.model_layers(m, "test"))
    records = []
    hooks.chain_attention_override(m, attention_spy(records))
    txt_k = []
    block = m.model.diffusion_model.double_blocks[0]
    handle = block.txt_attn.norm.register_forward_hook(lambda _m, _i, out: txt_k.append(out[1].clone()))
    try:
        ksample(m, pos, neg, steps=1, **kw(t))
    finally:
        handle.remove()
    joint = [r for r in records if r["counted"] == ("double", 0)]
    assert len(joint) == len(txt_k) == 2  # cond and uncond (different lengths: one call each)
    for r, k_txt in zip(joint, txt_k, strict=True):
        txt = r["txt"]
        assert txt == k_txt.shape[2] and r["k"].shape[2] > txt
        assert torch.allclose(r["k"][:, :, -txt:], k_txt.to(r["k"].dtype), atol=1e-6)
        assert not torch.allclose(r["k"][:, :, :txt], k_txt.to(r["k"].dtype), atol=1e-3)


# =========================================================================== capture
@pytest.mark.parametrize("family", HUNYUAN)
def test_capture_maps_bit_identical_and_complete(family):
    t = tiny(family)
    pos, neg = encode(t, PROMPT), encode(t, "")
    run = capture_check(t, pos, neg, **kw(t))
    latent = t.latent_shape(1, size=4)
    assert run.ref_hw == tuple(latent[2:]) and run.seen == {"double.0": 3, "single.0": 3} and not run.skipped
    (length,) = run.sums
    sums = run.sums[length]
    assert length == pos[0][0].shape[1] and sums.extra
    total = sums.bucket_mean(0).sum(1)  # prompt columns + [image]: every image query's whole attention
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5)


def test_capture_prompt_columns_sit_next_to_glyph_tokens():
    """With ByT5 glyph tokens in the text stream the prompt's columns are found at its side of the stream:
    HunyuanImage 2.1 [prompt, glyphs] -> 0, HunyuanVideo 1.5 [glyphs, prompt] -> txt_len - length."""
    cfgs = {f: cap.CaptureConfig(arch="dit", family=f, layers=[], all_layers=2, rows="positive", buckets=1,
                                 ref_level=0, patch=(1, 1), register_length=0, text_pad=None, text_multiple=None,
                                 modules={}, text_last=True, text_extras=True, prompt_last=families.by_name(f).prompt_last)
            for f in HUNYUAN}
    image = cap.CaptureRun(cfgs["hunyuan_image21"], {}, (1, 64, 2, 2), 2)
    video = cap.CaptureRun(cfgs["hunyuan_video15"], {}, (1, 32, 1, 2, 2), 2)
    assert image._prompt_start(12, 7) == 0 and video._prompt_start(12, 7) == 5
    assert image._prompt_start(7, 7) == 0 and video._prompt_start(7, 7) == 0
    assert image._prompt_start(5, 7) is None and video._prompt_start(5, 7) is None


# =========================================================================== TextLayerPatch
@pytest.mark.parametrize("family", HUNYUAN)
def test_patch_adds_target_rows_only_in_patched_steps(family):
    t = tiny(family)
    patch_rows_check(t, encode(t, PROMPT), encode(t, ""), encode(t, TARGET), ("double", 0), **kw(t))


@pytest.mark.parametrize("family", HUNYUAN)
@pytest.mark.parametrize("layer", [0, 1])
def test_patch_swaps_the_last_tokens_of_the_patched_layer_only(family, layer):
    """Inside the patch, the source row's text K/V (the last txt_len tokens) equal the target row's in the patched
    layer, and in no other layer; the image part (the first tokens) keeps the source row's own keys."""
    t = tiny(family)
    chosen = (("double", 0), ("single", 0))[layer]
    swapped = 0
    for r, s, g in patched_kv_records(t, encode(t, PROMPT), encode(t, ""), encode(t, TARGET), chosen, **kw(t)):
        txt = r["txt"]
        same = torch.equal(r["k"][s, :, -txt:], r["k"][g, :, -txt:]) and \
            torch.equal(r["v"][s, :, -txt:], r["v"][g, :, -txt:])
        assert same == (r["counted"] == chosen), r["counted"]
        if r["counted"] == ("double", 0):  # first block: the image stream is still the same in both rows
            assert torch.equal(r["k"][s, :, :-txt], r["k"][g, :, :-txt])
        swapped += same
    assert swapped == 2  # 2 steps, one positive row each


def test_target_glyph_tokens_join_the_target_rows_and_must_match():
    fam = families.by_name("hunyuan_image21")
    src = torch.randn(2, 5, 8)
    glyphs = torch.randn(1, 5, 8)
    target = TargetText(torch.zeros(1, 3, 4), None, {"conditioning_byt5small": glyphs})
    out = _target_extras(fam, target, {"txt_byt5": src}, n=2, extra=1)
    assert torch.equal(out["txt_byt5"], torch.cat([src, glyphs], 0))
    assert _target_extras(fam, TargetText(torch.zeros(1, 3, 4), None), {}, n=2, extra=1) == {}
    for kwargs, tgt_extras, msg in [({}, {"conditioning_byt5small": glyphs}, "gives 5x8 and the prompt it edits none"),
                                    ({"txt_byt5": src}, {}, "gives none and the prompt it edits 5x8"),
                                    ({"txt_byt5": src[:, :4]}, {"conditioning_byt5small": glyphs},
                                     "gives 5x8 and the prompt it edits 4x8. To match them, quote text of the same")]:
        with pytest.raises(ValueError, match=msg):
            _target_extras(fam, TargetText(torch.zeros(1, 3, 4), None, tgt_extras), kwargs, n=2, extra=1)


# =========================================================================== Localize, LoRA
@pytest.mark.parametrize("family", HUNYUAN)
def test_localize_scores_every_layer(family):
    t = tiny(family)
    pos, neg, tgt = encode(t, PROMPT), encode(t, ""), encode(t, TARGET)
    scores, _src, _tgt, patched, table, best, _k = tll.localize(
        t.model, pos, tgt, neg, {"samples": torch.zeros(t.latent_shape(1, size=4))}, steps=2, cfg=2.0)
    assert [s.layers for s in scores] == [(("double", 0),), (("single", 0),)] and len(patched) == 2
    assert best in ("double.0", "single.0") and "2 candidates" in table


def test_lora_keeps_only_the_selected_layers_attention():
    t = tiny("hunyuan_image21")
    lora = rank1_lora(t.model, ["double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.proj",
                                "double_blocks.0.img_mlp.0", "single_blocks.0.linear1"])
    patched, report = load_text_layer_lora(t.model, lora, "double.0")
    assert "kept 2 of 4" in report
    assert sorted(k[0] if isinstance(k, tuple) else k for k in patched.patches) == [
        "diffusion_model.double_blocks.0.img_attn.qkv.weight", "diffusion_model.double_blocks.0.txt_attn.proj.weight"]


# =========================================================================== [EOS] swap
@pytest.mark.parametrize("family,tail", [("hunyuan_image21", [IM_END]),
                                         ("hunyuan_video15", [IM_END, NL, IM_START, ASSISTANT, NL])])
def test_eos_positions_with_the_shipped_tokenizers(family, tail):
    """Both encoders drop the system template head like Qwen-Image's; HunyuanImage 2.1's template ends with the
    end-of-turn token, HunyuanVideo 1.5's adds the assistant turn (padding)."""
    fam = families.by_name(family)
    tokens = pa_tokens.stock_tokenizer(fam).tokenize_with_weights(PROMPT)
    (c,) = pa_tokens.token_positions(pa_tokens.stock_layout(fam), tokens)[fam.encoders[0].key]
    assert [t for t, *_ in c.tokens][3:] == tail
    assert (c.start, c.head, list(c.sem), c.eos) == (0, 0, [0, 1, 2], 3)
    assert [c.klass(i) for i in range(3 + len(tail))] == ["semantic"] * 3 + ["[EOS]"] + ["padding"] * (len(tail) - 1)


@pytest.mark.parametrize("family", HUNYUAN)
def test_eos_swap_takes_the_targets_eos_states(family):
    t = tiny(family)
    cond, _, table = es_nodes.swap_conditioning(t.clip, PROMPT, TARGET)
    a, b = t.encode(PROMPT)[0][0], t.encode(TARGET)[0][0]
    got = cond[0][0]
    assert torch.equal(got[:, :3], a[:, :3]) and torch.equal(got[:, 3:], b[:, 3:]) and "[EOS]" in table


def test_eos_swap_refuses_quoted_text_glyphs():
    t = tiny("hunyuan_image21")
    with pytest.raises(ValueError, match=r"target_text: on HunyuanImage 2.1 the prompt's quoted text is also "
                                         r"encoded into 'conditioning_byt5small'"):
        es_nodes.swap_conditioning(t.clip, PROMPT, 'a sign that says "HI"')
