"""Wan image-to-video (tiny WAN21_I2V of ``scripts/tiny_models.py``: 2 blocks, 2 heads, 5 CLIP-vision tokens in
every conditioning). Its cross-attention makes three attention calls per block (self-attention, the CLIP-vision
tokens, the text) and its blocks' text stream is [CLIP-vision tokens, text]: the capture maps the third call only,
the patch replaces the text part only, and the other i2v variants share the entry."""

from __future__ import annotations

import comfy.supported_models
import tiny_models
import torch
from pa_support import block_contexts, patched_block_contexts, rank1_lora, tiny
from prompt_anatomy.nodes.attention import capture as cap
from prompt_anatomy.nodes.core import families
from prompt_anatomy.nodes.core import layers as cl
from prompt_anatomy.nodes.text_layers.lora import load_text_layer_lora
from prompt_anatomy.nodes.text_layers.patch import apply_text_layer_patch

import nodes as comfy_nodes

PROMPT, TARGET = "a red cat", "a blue dog"
N_IMG = tiny_models.WAN_CLIP_VISION_TOKENS


def sample(t, model, pos, neg, *, steps=4, frames=3, size=4, cfg=2.0):
    latent = {"samples": torch.zeros(t.latent_shape(1, size=size, frames=frames))}
    (out,) = comfy_nodes.common_ksampler(model, 0, steps, cfg, "euler", "normal", pos, neg, latent)
    return out["samples"]


def _as(t, config):
    """The tiny I2V model as another config class of the same architecture (what ComfyUI's detection returns)."""
    m = t.model.clone()
    m.model = torch.nn.Module.__new__(type(m.model))
    m.model.__dict__ = dict(t.model.model.__dict__)
    cls = getattr(comfy.supported_models, config)
    cfg = cls.__new__(cls)
    cfg.__dict__ = dict(t.model.model.model_config.__dict__)
    m.model.model_config = cfg
    return m


def test_registry_entry_and_variants():
    t = tiny("wan21_i2v")
    ml = cl.model_layers(t.model, "test")
    assert ml.family.name == "wan_i2v" and ml.family.text_entry == (families.DIT_CROSS,)
    assert [x.label for x in ml.layers] == ["cross.0", "cross.1"]
    assert cl.text_call(ml, ml.layers[0]) == 2  # self-attention, CLIP-vision tokens, then the text
    assert cl.weight_prefixes(ml, ml.layers[1]) == ("diffusion_model.blocks.1.cross_attn.",)
    for config in ("WAN21_FunControl2V", "WAN21_Camera", "WAN22_Animate"):
        assert families.lookup(_as(t, config)).name == "wan_i2v"


def test_capture_maps_the_text_call_only():
    """The maps are over the 512 text tokens (not 5 + 512), bit-identical latents, and equal softmax(q kᵀ/√d) of
    the text attention, recomputed from each block's own projections on the text part of its context."""
    t = tiny("wan21_i2v")
    pos = t.encode(PROMPT)
    ref = sample(t, t.model, pos, pos, steps=1, cfg=1.0)
    inputs = []
    dm = t.model.model.diffusion_model
    spies = [b.cross_attn.register_forward_hook(lambda mod, args, kwargs, out: inputs.append((mod, args, kwargs)),
                                                with_kwargs=True) for b in dm.blocks]
    m, handle = cap.install_capture(t.model, "all", buckets=1)
    try:
        assert torch.equal(sample(t, m, pos, pos, steps=1, cfg=1.0), ref)
    finally:
        for h in spies:
            h.remove()
    (run,) = handle.runs
    assert run.ref_hw == (3, 2, 2) and run.seen == {"cross.0": 1, "cross.1": 1} and not run.skipped
    assert list(run.sums) == [512]
    want = 0
    with torch.no_grad():
        for mod, args, kwargs in inputs:
            x, context = args[0], args[1] if len(args) > 1 else kwargs["context"]
            assert context.shape[1] == N_IMG + 512
            q = mod.norm_q(mod.q(x)).unflatten(-1, (2, -1)).transpose(1, 2).float()
            k = mod.norm_k(mod.k(context[:, N_IMG:])).unflatten(-1, (2, -1)).transpose(1, 2).float()
            p = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1).mean(1)  # (1, 12, 512)
            want = want + p.transpose(1, 2).reshape(1, 512, 3, 2, 2)
    assert torch.allclose(run.sums[512].mean(), want / len(inputs), atol=1e-5)


def test_patch_replaces_the_text_part_of_the_selected_block_only():
    t = tiny("wan21_i2v")
    pos, neg, tgt = t.encode(PROMPT), t.encode(""), t.encode(TARGET)
    dm = t.model.model.diffusion_model
    with torch.no_grad():
        want = dm.text_embedding(tgt[0][0])[0]  # the target's text stream
    plain, seen, ref, out, report = patched_block_contexts(t, sample, pos, neg, tgt, "cross.1")
    assert "DiT cross-attention injection" in report
    assert not torch.equal(out, ref)
    assert len(seen[0]) == len(seen[1]) == 4
    for call in range(4):
        assert torch.equal(seen[0][call], plain[0][call])  # unselected block: untouched
        rows, before = seen[1][call], plain[1][call]
        assert rows.shape == before.shape == (2, N_IMG + 512, 64)
        assert torch.equal(rows[:, :N_IMG], before[:, :N_IMG])  # the CLIP-vision tokens stay the source's
        changed = [r for r in range(2) if not torch.equal(rows[r], before[r])]
        assert len(changed) == 1  # the negative row keeps its text
        assert torch.equal(rows[changed[0], N_IMG:], want.to(rows.dtype))
    # strength 0 and a window past the last step: exact no-ops
    for kwargs in ({"strength": 0.0}, {"start_percent": 1.0}):
        assert torch.equal(sample(t, apply_text_layer_patch(t.model, tgt, "cross.1", **kwargs)[0], pos, neg), ref)


def test_patch_without_an_image_and_with_a_heads_subset():
    """No CLIP-vision output (the i2v model run as text-to-video): the whole text stream is the text. heads 0-1 =
    the all-heads patch, at the third (text) call of the block."""
    t = tiny("wan21_i2v")
    tgt = t.encode(TARGET)
    pos, neg = t.encode(PROMPT), t.encode("")
    whole = sample(t, apply_text_layer_patch(t.model, tgt, "cross.0")[0], pos, neg)
    heads = sample(t, apply_text_layer_patch(t.model, tgt, "cross.0", heads="0-1")[0], pos, neg)
    assert torch.allclose(heads, whole, atol=1e-5) and not torch.equal(heads, sample(t, t.model, pos, neg))
    bare = [[c, {k: v for k, v in d.items() if k != "clip_vision_output"}] for c, d in pos]
    bare_neg = [[c, {k: v for k, v in d.items() if k != "clip_vision_output"}] for c, d in neg]
    bare_tgt = [[c, {k: v for k, v in d.items() if k != "clip_vision_output"}] for c, d in tgt]
    with block_contexts(t.model) as plain:
        ref = sample(t, t.model, bare, bare_neg, steps=1)
    with block_contexts(apply_text_layer_patch(t.model, bare_tgt, "cross.0")[0]) as seen:
        assert not torch.equal(sample(t, apply_text_layer_patch(t.model, bare_tgt, "cross.0")[0], bare, bare_neg,
                                      steps=1), ref)
    assert plain[0][0].shape[1] == 512 and seen[0][0].shape[1] == 512


def test_lora_keeps_the_selected_cross_attention():
    """The layer is the block's whole cross-attention, its CLIP-vision keys/values (k_img, v_img) included."""
    t = tiny("wan21_i2v")
    lora = rank1_lora(t.model, [f"blocks.{b}.{part}" for b in (0, 1)
                                for part in ("cross_attn.k_img", "cross_attn.k", "self_attn.q")])
    patched, report = load_text_layer_lora(t.model, lora, "cross.0")
    assert "kept 2 of 6" in report
    assert sorted(k[0] if isinstance(k, tuple) else k for k in patched.patches) == [
        "diffusion_model.blocks.0.cross_attn.k.weight", "diffusion_model.blocks.0.cross_attn.k_img.weight"]
