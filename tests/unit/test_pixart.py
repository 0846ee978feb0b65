"""PixArt α / Σ (tiny PixArtAlpha / PixArtSigma of ``scripts/tiny_models.py``: 2 blocks, 2 heads, T5). ComfyUI's PixArt
hands its blocks no transformer_options and offers no block replace; the pack wraps each block's cross-attention
module (``blocks.i.cross_attn``) in a text-attention proxy installed as an object patch of the clone
(``core.text_attn``), which runs the wrapped module for the output. Its blocks get the batch's text as one row
(1, B·L, C): the proxy hands the hooks one row per image."""

from __future__ import annotations

import pytest
import torch
from pa_support import ksample, module_inputs, rank1_lora, tiny
from prompt_anatomy.nodes.attention import capture as cap
from prompt_anatomy.nodes.core import layers as cl
from prompt_anatomy.nodes.core import text_attn
from prompt_anatomy.nodes.text_layers.lora import load_text_layer_lora
from prompt_anatomy.nodes.text_layers.patch import apply_text_layer_patch

PROMPT, TARGET = "a red cat", "a blue dog"
FAMILIES = ("pixart_alpha", "pixart_sigma")


def latent(t, batch=1):
    return {"samples": torch.zeros(t.latent_shape(batch, size=34))}


def sample(t, model, pos, neg, *, steps=2, cfg=2.0, batch=1):
    return ksample(model, pos, neg, steps=steps, cfg=cfg, latent=latent(t, batch))


def original_cross_attn(t, i):
    """Block i's own cross-attention module (the base ModelPatcher has no object patch: its original, even while a
    patched clone is loaded)."""
    return t.model.get_model_object(f"diffusion_model.blocks.{i}.cross_attn")


def cross_inputs(t):
    """What every block's own cross-attention module is called with: [(block, (x, text, mask))] in call order."""
    return module_inputs(t, "diffusion_model.blocks.{i}.cross_attn")


@pytest.mark.parametrize("family", FAMILIES)
def test_registry_entry(family):
    t = tiny(family)
    ml = cl.model_layers(t.model, "test")
    assert ml.family.proxied and ml.family.flat_text and ml.kind == "dit"
    assert [x.label for x in ml.layers] == ["cross.0", "cross.1"]
    assert cl.weight_prefixes(ml, ml.layers[1]) == ("diffusion_model.blocks.1.cross_attn.",)
    assert cl.layer_heads(t.model, ml, ml.layers[0]) == 2
    assert cl.text_attn_paths(ml, ml.layers[:1]) == {("cross", 0): "diffusion_model.blocks.0.cross_attn"}


def test_capture_maps_equal_the_cross_attention_and_leave_the_latent_unchanged():
    t = tiny("pixart_sigma")
    pos, neg = t.encode(PROMPT), t.encode("")
    ref = sample(t, t.model, pos, neg, steps=3)
    m, _ = cap.install_capture(t.model, "all", buckets=3)
    assert torch.equal(sample(t, m, pos, neg, steps=3), ref)  # bit-identical with the capture on
    m, handle = cap.install_capture(t.model, "all", buckets=3)
    with cross_inputs(t) as seen:
        sample(t, m, pos, pos, steps=3, cfg=1.0)  # cfg 1: the positive rows only
    (run,) = handle.runs
    length = pos[0][0].shape[1]
    assert run.seen == {"cross.0": 3, "cross.1": 3} and not run.skipped and not run.errors
    assert run.ref_hw == (17, 17)  # latent 34 / patch 2
    want = 0
    with torch.no_grad():
        for i, (x, text, _mask) in seen:
            mod = original_cross_attn(t, i)
            q = mod.q_linear(x).unflatten(-1, (2, -1)).transpose(1, 2).float()
            k = mod.kv_linear(text).unflatten(-1, (2, 2, -1))[:, :, 0].transpose(1, 2).float()
            p = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1).mean(1)
            want = want + p.transpose(1, 2).reshape(1, length, 17, 17)
    got = run.sums[length].mean()
    assert torch.allclose(got, want / len(seen), atol=1e-5)
    assert torch.allclose(got.sum(1), torch.ones(1, 17, 17), atol=1e-5)  # each pixel sums to 1 over the text
    assert not run.sums[length].extra
    # memory independent of the step count
    m8, h8 = cap.install_capture(t.model, "all", buckets=2)
    sample(t, m8, pos, neg, steps=8)
    assert tuple(h8.runs[0].sums[length].bucket_sum.shape) == (2, 1, length, 17, 17)


def test_capture_of_one_block_and_a_batch_of_two():
    t = tiny("pixart_alpha")
    pos, neg = t.encode(PROMPT), t.encode("a dog")
    m, handle = cap.install_capture(t.model, "cross.1", buckets=1)
    sample(t, m, pos, neg, batch=2)
    (run,) = handle.runs
    assert run.seen == {"cross.1": 2} and run.layers == ["cross.1"]
    assert tuple(run.sums[pos[0][0].shape[1]].bucket_sum.shape[:2]) == (1, 2)


def test_patch_changes_the_selected_block_text_on_the_positive_rows_only():
    t = tiny("pixart_sigma")
    pos, neg, tgt = t.encode(PROMPT), t.encode("a fat dog"), t.encode(TARGET)
    assert pos[0][0].shape[1] == tgt[0][0].shape[1] == neg[0][0].shape[1]  # one batched call per step
    with cross_inputs(t) as plain:
        ref = sample(t, t.model, pos, neg)
    m, report = apply_text_layer_patch(t.model, tgt, "cross.1")
    with cross_inputs(t) as patched:
        out = sample(t, m, pos, neg)
    assert "DiT cross-attention injection" in report and not torch.equal(out, ref)
    assert [i for i, _ in patched] == [i for i, _ in plain] == [0, 1, 0, 1]
    y_proj = t.model.model.diffusion_model.y_embedder.y_proj
    with torch.no_grad():
        want, source = y_proj(tgt[0][0])[0], y_proj(pos[0][0])[0]
    assert torch.equal(patched[0][1][1], plain[0][1][1])  # block 0 (unselected): the source text
    before = plain[1][1][1].reshape(2, -1, want.shape[-1])  # block 1: both rows' text in one row
    after = patched[1][1][1].reshape(2, -1, want.shape[-1])
    p = next(j for j in range(2) if torch.allclose(before[j], source, atol=1e-6))  # the positive row
    assert torch.allclose(after[p], want, atol=1e-6) and torch.equal(after[1 - p], before[1 - p])


def test_noops_are_bit_identical_and_heads_are_refused():
    t = tiny("pixart_alpha")
    pos, neg, tgt = t.encode(PROMPT), t.encode(""), t.encode(TARGET)
    ref = sample(t, t.model, pos, neg)
    for kwargs in ({"strength": 0.0}, {"start_percent": 1.0}, {"layers": ""}):
        m, _ = apply_text_layer_patch(t.model, tgt, **{"layers": "all", **kwargs})
        assert torch.equal(sample(t, m, pos, neg), ref), kwargs
    with pytest.raises(ValueError, match=r"heads: PixArt α's attention runs without ComfyUI's attention hook"):
        apply_text_layer_patch(t.model, tgt, "all", heads="0")


def test_target_of_another_length_and_no_trace_after_the_run():
    t = tiny("pixart_sigma")
    pos, neg, tgt = t.encode(PROMPT), t.encode(""), t.encode("a blue dog on a long red sofa")
    ref = sample(t, t.model, pos, neg)
    dm = t.model.model.diffusion_model
    keys = list(t.model.model.state_dict())
    m, _ = apply_text_layer_patch(t.model, tgt, "all")
    assert not torch.equal(sample(t, m, pos, neg), ref)
    assert torch.equal(sample(t, t.model, pos, neg), ref)  # the base model after a patched run
    assert dm.blocks[0].cross_attn is original_cross_attn(t, 0)
    assert list(t.model.model.state_dict()) == keys


def test_proxy_keeps_module_names_and_lora_weights():
    t = tiny("pixart_alpha")
    pos, neg = t.encode(PROMPT), t.encode("")
    lora = rank1_lora(t.model, ["blocks.1.cross_attn.q_linear", "blocks.0.attn.qkv"])
    ml = cl.model_layers(t.model, "test")
    loaded, report = load_text_layer_lora(t.model, lora, "cross.1", 1.0)
    patched_keys = {k for k in loaded.patches}
    assert patched_keys == {"diffusion_model.blocks.1.cross_attn.q_linear.weight"}, report
    base = sample(t, loaded, pos, neg)
    captured, _ = cap.install_capture(loaded, "all")  # the proxies stand in front of the LoRA'd module
    assert torch.equal(sample(t, captured, pos, neg), base)
    proxy = captured.object_patches["diffusion_model.blocks.1.cross_attn"]
    assert isinstance(proxy, text_attn.TextAttentionProxy)
    names = {n for n, _ in proxy.named_parameters()}
    assert names == {n for n, _ in original_cross_attn(t, 1).named_parameters()}
    assert ml.family.text_qk is not None


def test_an_object_patch_of_a_child_runs_under_the_proxy():
    """Another node's object patch of a child of the wrapped module (here q_linear of block 1) is the module the
    wrapped cross-attention runs: the proxy shares its children, it does not copy them."""
    t = tiny("pixart_alpha")
    pos, neg = t.encode(PROMPT), t.encode("")
    path = "diffusion_model.blocks.1.cross_attn.q_linear"
    original = t.model.get_model_object(path)
    calls: list = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            calls.append(x.shape)
            return original(x)

    m, handle = cap.install_capture(t.model, "cross.0")
    m.add_object_patch(path, Spy())
    ref = sample(t, t.model, pos, neg)
    assert torch.equal(sample(t, m, pos, neg), ref) and len(calls) == 4  # 2 steps x (cond, uncond: other lengths)
    assert handle.runs[0].seen == {"cross.0": 2}
    assert t.model.get_model_object(path) is original and torch.equal(sample(t, t.model, pos, neg), ref)
