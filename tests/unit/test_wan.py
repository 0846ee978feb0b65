"""Wan 2.1 / 2.2 text-to-video (tiny models of ``scripts/tiny_models.py``: 2 blocks, 2 heads, UMT5 stand-in):
the registry entry, CrossAttentionCapture per latent frame, the viewer on a video record, TextLayerPatch and
LoraLoaderTextLayers on the blocks' cross-attention, and the Wan variants the pack refuses."""

from __future__ import annotations

import json

import comfy.supported_models
import pytest
import torch
from pa_support import block_contexts, patched_block_contexts, rank1_lora, tiny
from prompt_anatomy.nodes.attention import capture as cap
from prompt_anatomy.nodes.attention import nodes as att_nodes
from prompt_anatomy.nodes.attention.viewer import render_view
from prompt_anatomy.nodes.core import families
from prompt_anatomy.nodes.core import layers as cl
from prompt_anatomy.nodes.text_layers.lora import load_text_layer_lora
from prompt_anatomy.nodes.text_layers.patch import apply_text_layer_patch

import nodes as comfy_nodes

WAN = ["wan21_t2v", "wan22_t2v"]
PROMPT, TARGET = "a red cat", "a blue dog"


def sample(t, model, pos, neg, *, steps=4, frames=3, size=4, cfg=2.0):
    latent = {"samples": torch.zeros(t.latent_shape(1, size=size, frames=frames))}
    (out,) = comfy_nodes.common_ksampler(model, 0, steps, cfg, "euler", "normal", pos, neg, latent)
    return out["samples"]


# =========================================================================== registry
@pytest.mark.parametrize("family", WAN)
def test_registry_entry(family):
    t = tiny(family)
    ml = cl.model_layers(t.model, "test")
    assert ml.family.text_entry == (families.DIT_CROSS,) and ml.family.patch == (1, 2, 2)
    assert [x.label for x in ml.layers] == ["cross.0", "cross.1"] and ml.kind == "dit"
    assert cl.weight_prefixes(ml, ml.layers[1]) == ("diffusion_model.blocks.1.cross_attn.",)
    assert cl.layer_heads(t.model, ml, ml.layers[0]) == 2 and cl.text_call(ml, ml.layers[0]) == 1
    assert ml.family.context_width(t.model) == 64  # the tiny UMT5's width, text_embedding's input
    assert [x.label for x in cl.parse_layers("cross.1", ml)] == ["cross.1"]
    assert families.lookup_clip(t.clip).name in ("wan21", "wan22")  # one UMT5 CLIP serves both entries


# =========================================================================== capture
@pytest.mark.parametrize("family", WAN)
def test_capture_per_frame_maps_bit_identical(family):
    t = tiny(family)
    pos, neg = t.encode(PROMPT), t.encode("")
    ref = sample(t, t.model, pos, neg)
    m, handle = cap.install_capture(t.model, "all", buckets=2)
    assert torch.equal(sample(t, m, pos, neg), ref)  # bit for bit
    (run,) = handle.runs
    # latent (1, C, 3, 4, 4), patch (1, 2, 2): 3 latent frames of 2 x 2 tokens
    assert run.ref_hw == (3, 2, 2) and run.video and run.buckets == [(0, 1), (2, 3)]
    assert run.seen == {"cross.0": 4, "cross.1": 4} and not run.skipped and not run.errors
    (length,) = run.sums
    assert length == pos[0][0].shape[1] == 512  # UMT5 pads to 512 tokens
    sums = run.sums[length]
    assert not sums.extra
    # at most one map per frame per bucket per token, whatever the step count
    assert tuple(sums.bucket_sum.shape) == (2, 1, 512, 3, 2, 2) and sums.bucket_count.tolist() == [4, 4]
    assert tuple(sums.mean().shape) == (1, 512, 3, 2, 2)
    assert {k: tuple(v.shape) for k, v in sums.layer_sum.items()} == {"cross.0": (1, 512, 2, 2),
                                                                      "cross.1": (1, 512, 2, 2)}
    assert tuple(sums.step_sum.shape) == (4, 1, 512)
    # each video query's row sums to 1 over the text tokens, on every frame
    for j in range(2):
        assert torch.allclose(sums.bucket_mean(j).sum(1), torch.ones(1, 3, 2, 2), atol=1e-5)
    # the memory of the maps does not grow with the steps
    m8, h8 = cap.install_capture(t.model, "all", buckets=2)
    sample(t, m8, pos, neg, steps=8)
    assert tuple(h8.runs[0].sums[512].bucket_sum.shape) == (2, 1, 512, 3, 2, 2)


def test_capture_takes_the_cross_attention_call_when_shapes_collide():
    """2 frames of 16 x 16 tokens = 512 video tokens = the text length: self- and cross-attention calls have the same
    shapes, so only the call order (registry: text_call = 1) tells them apart. The maps equal softmax(q kᵀ/√d) of
    the cross-attention, recomputed here from the block's own projections."""
    t = tiny("wan21_t2v")
    pos = t.encode(PROMPT)
    dm = t.model.model.diffusion_model
    inputs = []
    hooks = [b.cross_attn.register_forward_hook(lambda mod, args, kwargs, out: inputs.append((mod, args, kwargs)),
                                                with_kwargs=True) for b in dm.blocks]
    m, handle = cap.install_capture(t.model, "all", buckets=1)
    try:
        sample(t, m, pos, pos, steps=1, frames=2, size=32, cfg=1.0)  # cfg 1: the positive rows only
    finally:
        for h in hooks:
            h.remove()
    (run,) = handle.runs
    assert run.ref_hw == (2, 16, 16) and run.seen == {"cross.0": 1, "cross.1": 1} and not run.skipped
    want = 0
    with torch.no_grad():
        for mod, args, kwargs in inputs:
            x, context = args[0], args[1] if len(args) > 1 else kwargs["context"]
            q = mod.norm_q(mod.q(x)).unflatten(-1, (2, -1)).transpose(1, 2).float()
            k = mod.norm_k(mod.k(context)).unflatten(-1, (2, -1)).transpose(1, 2).float()
            p = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1).mean(1)  # (1, 512, 512)
            want = want + p.transpose(1, 2).reshape(1, 512, 2, 16, 16)
    got = run.sums[512].mean()
    assert torch.allclose(got, want / len(inputs), atol=1e-5)


def test_viewer_on_a_video_record():
    t = tiny("wan21_t2v")
    pos, neg = t.encode(PROMPT), t.encode("")
    m, handle = cap.install_capture(t.model, "all", buckets=2)
    out = sample(t, m, pos, neg)
    frames = torch.rand(9, 32, 48, 3, generator=torch.Generator().manual_seed(0))  # 3 latent frames -> 9 decoded
    res = att_nodes.CrossAttentionMapViewer.execute(handle, PROMPT, latent={"samples": out}, image=frames,
                                                    clip=t.clip, tokens="0, 1")
    heat, overlays, classes, slices, anim, conv, summary_json, video_frames = res.args
    summary = json.loads(summary_json)
    assert summary["frames"] == 3 and summary["grid"] == [3, 2, 2] and summary["context_tokens"] == 512
    assert overlays.shape == (2, 32, 48, 3) and anim.shape[0] == 2  # 2 tokens; one frame per step bucket
    assert video_frames.shape[0] == 3  # one image per latent frame
    assert len(summary["shown"][0]["mean_weight_per_frame"]) == 3
    for img in (heat, overlays, classes, slices, anim, conv, video_frames):
        assert img.ndim == 4 and img.shape[-1] == 3 and 0 <= float(img.min()) and float(img.max()) <= 1
    assert sum(summary["class_share"].values()) == pytest.approx(1.0, abs=1e-5)
    assert "[SOS]" not in summary["class_share"] and summary["class_share"]["padding"] > 0
    # time slices: (token, latent frame) rows x bucket columns: each token adds 3 rows of equal height
    heights = [render_view(handle.runs[0], True, PROMPT, clip=t.clip, tokens=tok).time_slices.shape[1]
               for tok in ("0", "0, 1", "0, 1, 2")]
    assert heights[2] - heights[1] == heights[1] - heights[0] > 0
    # without the CLIP: positions only, and the note says why
    bare = render_view(handle.runs[0], True, PROMPT, clip=None, tokens="0")
    assert bare.items[0].label == "0 #0"
    assert any("ships inside its text encoder checkpoint" in n for n in bare.summary["notes"])


# =========================================================================== text layers
@pytest.mark.parametrize("family", WAN)
def test_patch_swaps_the_text_of_the_selected_block_only(family):
    t = tiny(family)
    pos, neg, tgt = t.encode(PROMPT), t.encode(""), t.encode(TARGET)
    dm = t.model.model.diffusion_model
    with torch.no_grad():
        want = dm.text_embedding(tgt[0][0])  # the target's text stream
    plain, seen, ref, out, report = patched_block_contexts(t, sample, pos, neg, tgt, "cross.1")
    assert "DiT cross-attention injection" in report
    assert not torch.equal(out, ref)
    assert len(seen[0]) == len(seen[1]) == 4  # 4 steps, cond and uncond batched in one call
    for call in range(4):
        assert torch.equal(seen[0][call], plain[0][call])  # unselected block: untouched
        rows = seen[1][call]
        assert rows.shape[0] == 2
        pos_row = [r for r in range(2) if not torch.equal(rows[r], plain[1][call][r])]
        assert len(pos_row) == 1  # the negative row keeps its text
        assert torch.equal(rows[pos_row[0]], want[0].to(rows.dtype))


def test_patch_step_window_and_noop_exactness():
    t = tiny("wan21_t2v")
    pos, neg, tgt = t.encode(PROMPT), t.encode(""), t.encode(TARGET)
    with block_contexts(t.model) as plain:
        ref = sample(t, t.model, pos, neg)
    # the second half of the steps only: steps 0-1 see the source text in every block
    half, _ = apply_text_layer_patch(t.model, tgt, "all", start_percent=0.5)
    with block_contexts(half) as seen:
        out = sample(t, half, pos, neg)
    assert not torch.equal(out, ref)
    for block in (0, 1):
        assert [torch.equal(seen[block][c], plain[block][c]) for c in range(4)] == [True, True, False, False]
    # no-ops: strength 0, an empty step range, no layers -> bit-identical latents
    for kw in ({"strength": 0.0}, {"start_percent": 0.5, "end_percent": 0.5}, {"layers": ""}):
        layers = kw.pop("layers", "all")
        noop, report = apply_text_layer_patch(t.model, tgt, layers, **kw)
        assert torch.equal(sample(t, noop, pos, neg), ref), kw
        assert "Nothing to patch" in report
    # strength 1 on both blocks differs from one block
    both, _ = apply_text_layer_patch(t.model, tgt, "all")
    one, _ = apply_text_layer_patch(t.model, tgt, "cross.0")
    assert not torch.equal(sample(t, both, pos, neg), sample(t, one, pos, neg))


def test_patch_chains_a_previous_block_replace_and_the_capture():
    t = tiny("wan21_t2v")
    pos, neg, tgt = t.encode(PROMPT), t.encode(""), t.encode(TARGET)
    calls = []
    m = t.model.clone()

    def foreign(args, extra):
        calls.append(1)
        return extra["original_block"](args)

    m.set_model_patch_replace(foreign, "dit", "double_block", 1)
    ref = sample(t, m, pos, neg)
    plain_calls = len(calls)
    patched, _ = apply_text_layer_patch(m, tgt, "cross.1")
    captured, handle = cap.install_capture(patched, "all")
    calls.clear()
    out = sample(t, captured, pos, neg)
    assert len(calls) == plain_calls == 4 and not torch.equal(out, ref)  # the foreign replace still runs
    assert torch.equal(out, sample(t, patched, pos, neg))  # the capture changes nothing
    assert handle.runs[0].seen == {"cross.0": 4, "cross.1": 4}


def test_patch_heads_subset_on_wan():
    """heads: the projected keys/values of the chosen heads only; every head = the all-heads patch (up to rounding:
    there the block projects the swapped stream of the whole batch, here the target alone); heads out of range."""
    t = tiny("wan21_t2v")
    pos, neg, tgt = t.encode(PROMPT), t.encode(""), t.encode(TARGET)
    ref = sample(t, t.model, pos, neg)
    whole = sample(t, apply_text_layer_patch(t.model, tgt, "cross.1")[0], pos, neg)
    both = sample(t, apply_text_layer_patch(t.model, tgt, "cross.1", heads="0-1")[0], pos, neg)
    head0 = sample(t, apply_text_layer_patch(t.model, tgt, "cross.1", heads="0")[0], pos, neg)
    assert torch.allclose(both, whole, atol=1e-5) and not torch.equal(both, ref)
    assert not torch.allclose(head0, whole, atol=1e-4) and not torch.allclose(head0, ref, atol=1e-4)
    # strength 0 with a heads subset: an exact no-op
    zero = sample(t, apply_text_layer_patch(t.model, tgt, "cross.1", heads="0", strength=0.0)[0], pos, neg)
    assert torch.equal(zero, ref)
    with pytest.raises(ValueError, match=r"heads: 2 out of range: layer cross.0 has 2 heads \(0-1\)"):
        apply_text_layer_patch(t.model, tgt, "cross.0", heads="2")


def test_patch_errors_on_wan():
    t = tiny("wan21_t2v")
    with pytest.raises(ValueError, match=r"layers: 'cross.2' is out of range: cross blocks run from 0 to 1"):
        apply_text_layer_patch(t.model, t.encode(TARGET), "cross.2")


def test_lora_keeps_only_the_selected_cross_attention():
    t = tiny("wan21_t2v")
    lora = rank1_lora(t.model, [f"blocks.{b}.{part}" for b in (0, 1)
                                for part in ("cross_attn.q", "cross_attn.v", "self_attn.q")])
    patched, report = load_text_layer_lora(t.model, lora, "cross.1")
    assert "kept 2 of 6" in report and "cross.1 [1]: 2 weights" in report
    assert sorted(k[0] if isinstance(k, tuple) else k for k in patched.patches) == [
        "diffusion_model.blocks.1.cross_attn.q.weight", "diffusion_model.blocks.1.cross_attn.v.weight"]


# =========================================================================== refused variants
def _renamed(tiny_model, config_cls):
    m = tiny_model.model.clone()
    m.model = torch.nn.Module.__new__(type(m.model))
    m.model.__dict__ = dict(tiny_model.model.model.__dict__)
    cfg = config_cls.__new__(config_cls)
    cfg.__dict__ = dict(tiny_model.model.model.model_config.__dict__)
    m.model.model_config = cfg
    return m


@pytest.mark.parametrize("config, why", [
    ("WAN22_S2V", "block replace passes no transformer_options"), ("WAN21_HuMo", "audio cross-attention"),
])
def test_refused_wan_variants_say_why(config, why):
    t = tiny("wan21_t2v")
    m = _renamed(t, getattr(comfy.supported_models, config))
    cond = t.encode(TARGET)
    for what, call in [("CrossAttentionCapture", lambda: cap.install_capture(m)),
                       ("TextLayerPatch", lambda: apply_text_layer_patch(m, cond, "0")),
                       ("LoraLoaderTextLayers", lambda: load_text_layer_lora(m, {}, "0"))]:
        with pytest.raises(ValueError, match=rf"{what} does not support this model \({config}\): .*{why}"):
            call()


@pytest.mark.parametrize("config", ["WAN21_Vace", "WAN22_Camera"])
def test_t2v_variants_share_the_entry(config):
    t = tiny("wan21_t2v")
    m = _renamed(t, getattr(comfy.supported_models, config))
    assert families.lookup(m).name == "wan21"


def test_eos_swap_on_wan():
    """The registry entry gives the EOS swap UMT5's token rules (T5 kind: no [SOS], end token 1, pad 0 to 512); the
    key/value split stays UNet-only and says why."""
    from prompt_anatomy.nodes.eos_swap import swap_conditioning

    t = tiny("wan21_t2v")
    cond, _, table = swap_conditioning(t.clip, PROMPT, TARGET)
    assert "UMT5-XXL" in table and cond[0][0].shape == (1, 512, 64)
    with pytest.raises(ValueError, match="kv=key_only needs a UNet model.*Wan 2.1 / 2.2 A14B's cross-attention blocks"):
        swap_conditioning(t.clip, PROMPT, TARGET, kv="key_only", model=t.model)


def test_frames_appended_after_the_video_are_not_mapped_as_video():
    """Wan's time_dim_concat (e.g. Phantom's subject images) appends latent frames after the video: the capture
    skips those calls, with the reason, instead of mapping the wrong frames; the image is unchanged."""
    import node_helpers

    t = tiny("wan21_t2v")
    pos, neg = t.encode(PROMPT), t.encode("")
    extra = torch.zeros(t.latent_shape(1, size=4, frames=1))
    pos_x = node_helpers.conditioning_set_values(pos, {"time_dim_concat": extra})
    neg_x = node_helpers.conditioning_set_values(neg, {"time_dim_concat": extra})
    m, handle = cap.install_capture(t.model, "all", "positive", 2)
    plain = sample(t, t.model, pos_x, neg_x, steps=2)
    assert torch.equal(sample(t, m, pos_x, neg_x, steps=2), plain)
    run = handle.runs[-1]
    assert not run.sums and any("time_dim_concat" in why for why in run.skipped)
