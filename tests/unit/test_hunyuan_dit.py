"""Hunyuan-DiT (tiny HunyuanDiT1 of ``scripts/tiny_models.py``: 2 blocks, BERT + mT5 stand-in). ComfyUI's Hunyuan-DiT
calls its attention without transformer_options, so no hook sees the attention weights (the capture refuses, naming
that); its block replace is handed the text stream (BERT states + mT5 through mlp_t5, built inside the forward), so
TextLayerPatch appends the target rows the model builds from the target's conditioning (registry ``text_extras``:
mT5 states and both masks) and swaps the selected blocks' text stream of the source rows with theirs."""

from __future__ import annotations

import contextlib

import pytest
import torch
from pa_support import ksample, patch_rows_check, rank1_lora, tiny
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


def test_capture_refused_with_the_reason():
    t = tiny("hunyuan_dit")
    with pytest.raises(ValueError, match=r"CrossAttentionCapture does not support this model \(HunyuanDiT1\): "
                                         r"ComfyUI's Hunyuan-DiT calls its attention without transformer_options"):
        cap.install_capture(t.model)


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


def test_eos_swap_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"does not support Hunyuan-DiT's text encoders: .*conditioning_mt5xl"):
        es_nodes.swap_conditioning(tiny("hunyuan_dit").clip, PROMPT, TARGET)


def test_lora_training_on_the_chosen_block(tmp_path):
    """TextLayerLoraTrain under the server's inference mode trains the chosen block's cross-attention weights."""
    from prompt_anatomy.nodes.text_layers import train_node

    t = tiny("hunyuan_dit")
    with torch.inference_mode():
        model, name, plot, report, losses = train_node.train(t.model, kw(t)["latent"], t.encode(PROMPT), "cross.0", 2,
                                                             2, 0.01, 0, "hydit", str(tmp_path))
    assert name == "hydit.safetensors" and len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert "cross.0 [0] of 2 attention blocks; 3 weight matrices" in report
