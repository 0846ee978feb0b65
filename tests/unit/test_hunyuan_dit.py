"""Hunyuan-DiT (tiny HunyuanDiT1 of ``scripts/tiny_models.py``: 2 blocks, BERT + mT5 stand-in). ComfyUI's Hunyuan-DiT
calls its attention without transformer_options: the capture reads its cross-attention through the text-attention
proxies (``core.text_attn``). Its block replace is handed the text stream (BERT states + mT5 through mlp_t5, built
inside the forward), so TextLayerPatch appends the target rows the model builds from the target's conditioning
(registry ``text_extras``: mT5 states and both masks) and swaps the selected blocks' text stream of the source rows
with theirs. The [EOS] swap rebuilds the BERT context and the mT5 entry (registry ``EncoderSpec.cond_key``)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from pa_support import ksample, module_inputs, patch_rows_check, rank1_lora, tiny
from prompt_anatomy.nodes.attention import capture as cap
from prompt_anatomy.nodes.core import layers as cl
from prompt_anatomy.nodes.eos_swap import nodes as es_nodes
from prompt_anatomy.nodes.text_layers import localize as tll
from prompt_anatomy.nodes.text_layers.lora import load_text_layer_lora
from prompt_anatomy.nodes.text_layers.patch import apply_text_layer_patch

PROMPT, TARGET = "a red cat", "a red car"


def kw(t):
    return {"latent": {"samples": torch.zeros(t.latent_shape(1, size=4))}, "cfg": 2.0, "steps": 2}


@contextlib.contextmanager
def block_texts(model):
    """The text stream every block is called with (its third positional argument): {block: [tensor per call]}."""
    seen: dict[int, list] = {}
    handles = [b.register_forward_pre_hook(lambda _m, args, i=i: seen.setdefault(i, []).append(args[2].clone()))
               for i, b in enumerate(model.model.diffusion_model.blocks)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def test_registry_entry():
    t = tiny("hunyuan_dit")
    ml = cl.model_layers(t.model, "test")
    assert ml.family.name == "hunyuan_dit" and ml.family.block_text_swap and ml.kind == "dit"
    assert [x.label for x in ml.layers] == ["cross.0", "cross.1"]
    assert cl.weight_prefixes(ml, ml.layers[1]) == ("diffusion_model.blocks.1.attn2.",)
    assert cl.layer_heads(t.model, ml, ml.layers[0]) == 2
    assert ml.family.context_width(t.model) == t.encode(PROMPT)[0][0].shape[-1] == 64


def test_capture_maps_over_the_bert_tokens():
    """The attention runs without transformer_options; the text-attention proxy recomputes q (q_norm, image RoPE) and
    k (k_norm) through attn2's own projections. The keys are the BERT tokens then the mT5 states: the maps are over
    the BERT tokens, renormalised over them. Latents bit-identical with the capture on."""
    from comfy.ldm.hydit.attn_layers import apply_rotary_emb

    t = tiny("hunyuan_dit")
    pos, neg = t.encode(PROMPT), t.encode("")
    ref = ksample(t.model, pos, neg, **kw(t))
    m, _ = cap.install_capture(t.model)
    assert torch.equal(ksample(m, pos, neg, **kw(t)), ref)
    m, handle = cap.install_capture(t.model, "all", buckets=1)
    with module_inputs(t, "diffusion_model.blocks.{i}.attn2") as seen:
        ksample(m, pos, pos, **{**kw(t), "cfg": 1.0})  # cfg 1: the positive rows only
    (run,) = handle.runs
    length = pos[0][0].shape[1]
    assert run.seen == {"cross.0": 2, "cross.1": 2} and not run.skipped and not run.errors
    h, w = run.ref_hw
    want = 0
    with torch.no_grad():
        for i, (x, text, rope) in seen:
            mod = t.model.get_model_object(f"diffusion_model.blocks.{i}.attn2")
            q = mod.q_norm(mod.q_proj(x).unflatten(-1, (mod.num_heads, -1)))
            q = apply_rotary_emb(q, None, rope)[0].transpose(1, 2).float()
            k = mod.k_norm(mod.kv_proj(text).unflatten(-1, (2, mod.num_heads, -1))[:, :, 0]).transpose(1, 2).float()
            assert k.shape[2] > length  # BERT tokens, then the mT5 states
            p = torch.softmax(q @ k[:, :, :length].transpose(-1, -2) / q.shape[-1] ** 0.5, -1).mean(1)
            want = want + p.transpose(1, 2).reshape(1, length, h, w)
    got = run.sums[length].mean()
    assert torch.allclose(got, want / len(seen), atol=1e-5)
    assert torch.allclose(got.sum(1), torch.ones(1, h, w), atol=1e-5)


def test_capture_sees_the_patch_rows_whatever_the_order():
    """A capture applied before TextLayerPatch still sees the rows of the patched call (the target row is not
    captured, nothing is skipped)."""
    t = tiny("hunyuan_dit")
    pos, neg, tgt = t.encode(PROMPT), t.encode(""), t.encode(TARGET)
    captured, handle = cap.install_capture(t.model, "all", buckets=1)
    patched, _ = apply_text_layer_patch(captured, tgt, "cross.1")
    ksample(patched, pos, neg, **kw(t))
    (run,) = handle.runs
    assert run.seen == {"cross.0": 2, "cross.1": 2} and not run.skipped and not run.errors


def test_patch_adds_target_rows_only_in_patched_steps():
    t = tiny("hunyuan_dit")
    patch_rows_check(t, t.encode(PROMPT), t.encode(""), t.encode(TARGET), ("cross", 1), latent=kw(t)["latent"],
                     cfg=2.0)


@pytest.mark.parametrize("layer", [0, 1])
def test_patch_swaps_the_text_stream_of_the_selected_block_only(layer):
    """In the patched block the positive row reads the target row's text stream, which equals the stream the model
    builds for the target prompt alone (BERT + mT5 through mlp_t5, padding filled); the other block and the
    negative row read their own; strength 0 is bit-identical to the plain run."""
    t = tiny("hunyuan_dit")
    pos, neg, tgt = t.encode(PROMPT), t.encode(""), t.encode(TARGET)
    with block_texts(t.model) as plain:
        ref = ksample(t.model, pos, neg, **kw(t))
    with block_texts(t.model) as alone:
        ksample(t.model, tgt, neg, **kw(t))
    patched, report = apply_text_layer_patch(t.model, tgt, f"cross.{layer}")
    assert "text-stream patching" in report
    with block_texts(patched) as seen:
        out = ksample(patched, pos, neg, **kw(t))
    assert not torch.equal(out, ref)
    for block in (0, 1):
        assert len(seen[block]) == 2  # 2 steps, one batched call each
        for call in range(2):
            rows, before = seen[block][call], plain[block][call]
            assert rows.shape[0] == 3 and before.shape[0] == 2  # cond, uncond + one target row
            target_row = rows[2]
            changed = [r for r in range(2) if not torch.equal(rows[r], before[r])]
            if block == layer:
                assert len(changed) == 1 and torch.equal(rows[changed[0]], target_row)
                assert torch.allclose(target_row, alone[block][call][changed[0]], atol=1e-5)
            else:
                assert changed == []
    zero, _ = apply_text_layer_patch(t.model, tgt, f"cross.{layer}", strength=0.0)
    assert torch.equal(ksample(zero, pos, neg, **kw(t)), ref)


def test_heads_refused_and_localize_and_lora():
    t = tiny("hunyuan_dit")
    pos, neg, tgt = t.encode(PROMPT), t.encode(""), t.encode(TARGET)
    with pytest.raises(ValueError, match=r"heads: Hunyuan-DiT's attention runs without ComfyUI's attention hook"):
        apply_text_layer_patch(t.model, tgt, "cross.0", heads="0")
    scores, *_rest = tll.localize(t.model, pos, tgt, neg, kw(t)["latent"], steps=2, cfg=2.0)
    assert [s.layers for s in scores] == [(("cross", 0),), (("cross", 1),)]
    lora = rank1_lora(t.model, ["blocks.0.attn2.q_proj", "blocks.1.attn2.kv_proj", "blocks.1.attn1.Wqkv"])
    patched, report = load_text_layer_lora(t.model, lora, "cross.1")
    assert "kept 1 of 3" in report
    assert [k[0] if isinstance(k, tuple) else k for k in patched.patches] == [
        "diffusion_model.blocks.1.attn2.kv_proj.weight"]


def test_eos_swap_rebuilds_the_bert_context_and_the_mt5_entry():
    """BERT: [CLS] 0, semantic, [SEP] = its [EOS], padding to 77 (masked); mT5 (conditioning_mt5xl): semantic from 0,
    </s> = its [EOS], padding to 256 (masked). source_sem+target_eos takes both encoders' [EOS] and padding slots from
    the target, slot k from the target's slot k; every other value and both attention masks stay the source's."""
    from prompt_anatomy.nodes.shared import tokens as pa_tokens

    t = tiny("hunyuan_dit")
    layout = pa_tokens.detect_layout(t.clip)
    bert, mt5 = layout.parts
    assert (bert.in_context, bert.cond_key, mt5.in_context, mt5.in_entry) == (True, None, False, True)
    assert mt5.cond_key == "conditioning_mt5xl" and mt5.channels[0] == 0
    a_text, b_text = "a red cat", "a blue dog on a table"
    pa = pa_tokens.token_positions(layout, t.clip.tokenize(a_text))
    pb = pa_tokens.token_positions(layout, t.clip.tokenize(b_text))
    (ba,), (ma,) = pa["hydit_clip"], pa["mt5xl"]
    (bb,), (mb,) = pb["hydit_clip"], pb["mt5xl"]
    assert (ba.start, ba.sos, ba.end, ma.start, ma.sos, ma.end) == (0, 0, 77, 0, None, 256)
    assert ba.eos == 1 + len(ba.sem) and ma.eos == len(ma.sem) and bb.eos > ba.eos and mb.eos > ma.eos
    (ca, da), = t.clip.encode_from_tokens_scheduled(t.clip.tokenize(a_text))
    (cb, db), = t.clip.encode_from_tokens_scheduled(t.clip.tokenize(b_text))
    cond, _, table = es_nodes.swap_conditioning(t.clip, a_text, b_text)
    (out, d), = cond
    for got, a, b, ca_, cb_ in ((out, ba, bb, ca, cb),
                                (d["conditioning_mt5xl"], ma, mb, da["conditioning_mt5xl"], db["conditioning_mt5xl"])):
        assert got.shape == ca_.shape and torch.equal(got[0, :a.eos], ca_[0, :a.eos])
        n_b = b.end - b.eos
        assert torch.equal(got[0, a.eos:a.eos + n_b], cb_[0, b.eos:b.end])
        assert torch.equal(got[0, a.eos + n_b:], cb_[0, b.end - 1].expand_as(got[0, a.eos + n_b:]))
    assert torch.equal(d["attention_mask"], da["attention_mask"])
    assert torch.equal(d["attention_mask_mt5xl"], da["attention_mask_mt5xl"])
    assert "'conditioning_mt5xl' tokens 0–255" in table
    first, _, _ = es_nodes.swap_conditioning(t.clip, a_text, b_text, eos_scope="first_eos")
    (fo, fd), = first
    assert torch.equal(fo[0, ba.eos + 1:], ca[0, ba.eos + 1:]) and torch.equal(fo[0, ba.eos], cb[0, bb.eos])
    assert torch.equal(fd["conditioning_mt5xl"][0, ma.eos + 1:], da["conditioning_mt5xl"][0, ma.eos + 1:])
    out_lat = ksample(t.model, cond, t.encode(""), **kw(t))
    assert torch.isfinite(out_lat).all()
    assert not torch.equal(out_lat, ksample(t.model, t.encode(a_text), t.encode(""), **kw(t)))
    with pytest.raises(ValueError, match="kv=key_only needs a UNet model"):
        es_nodes.swap_conditioning(t.clip, a_text, b_text, kv="key_only", model=t.model)


def test_lora_training_on_the_chosen_block(tmp_path):
    """TextLayerLoraTrain under the server's inference mode trains the chosen block's cross-attention weights."""
    from prompt_anatomy.nodes.text_layers import train_node

    t = tiny("hunyuan_dit")
    with torch.inference_mode():
        model, name, plot, report, losses = train_node.train(t.model, kw(t)["latent"], t.encode(PROMPT), "cross.0", 2,
                                                             2, 0.01, 0, "hydit", str(tmp_path))
    assert name == "hydit.safetensors" and len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert "cross.0 [0] of 2 attention blocks; 3 weight matrices" in report
