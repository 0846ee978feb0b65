"""Cross-attention capture and CrossAttentionMapViewer (paper 1, Fig. 1, 3) on tiny models."""

from __future__ import annotations

import json
import math
from unittest import mock

import folder_paths
import kornia
import pytest
import torch
from comfy.ldm.modules.attention import optimized_attention
from comfy.patcher_extension import WrappersMP
from pa_support import ksample, tiny, tiny_models
from prompt_anatomy.nodes.attention import capture as cap
from prompt_anatomy.nodes.attention import nodes as att_nodes
from prompt_anatomy.nodes.attention import probs as cap_probs
from prompt_anatomy.nodes.attention import viewer as am
from prompt_anatomy.nodes.core import families, hooks
from prompt_anatomy.nodes.core import layers as cl
from prompt_anatomy.nodes.shared import tokens as pa_tokens

PROMPT = "a red square on a blue background"


@pytest.fixture(autouse=True)
def _temp_dir(tmp_path, monkeypatch):
    """Node previews (ui.PreviewImage) go to a per-test temp folder, never into the ComfyUI tree."""
    monkeypatch.setattr(folder_paths, "temp_directory", str(tmp_path))


@pytest.fixture(scope="module")
def sd3_ok():
    """An own tiny SD3 whose MMDiT pos_embed buffer is filled: tiny_models leaves that buffer uninitialised (it is
    not a parameter), which makes the shared tiny SD3 sample NaN."""
    from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed

    t = tiny_models.make("sd3")
    pe = t.model.model.diffusion_model.pos_embed
    grid = int(round(pe.shape[1] ** 0.5))
    pe.copy_(torch.from_numpy(get_2d_sincos_pos_embed(pe.shape[-1], grid)).float()[None])
    return t


def family_model(name, sd3_ok=None):
    return sd3_ok if name == "sd3" else tiny(name)


def sample_kw(t, **kw):
    base = dict(steps=3, channels=t.latent_channels, cfg=1.0 if t.family == "flux" else 4.0)
    base.update(kw)
    return base


def captured(model, pos, neg, layers="all", rows="positive", buckets=10, **kw):
    m, handle = cap.install_capture(model, layers, rows, buckets)
    out = ksample(m, pos, neg, **kw)
    return out, handle.runs[-1], m, handle


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32 if x.element_size() == 4 else torch.int16)


# =========================================================================== pure functions
def test_attention_probs_matches_softmax_and_chunking():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 10, 8, generator=g), torch.randn(2, 3, 7, 8, generator=g)
    want = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1).mean(1)
    full = cap_probs.attention_probs(q, k)
    assert torch.allclose(full, want, atol=1e-6)
    for budget in (1, 7, 40, 300):  # one head and few queries at a time ... all at once
        assert torch.allclose(cap_probs.attention_probs(q, k, budget=budget), want, atol=1e-6)
    # text columns of a joint attention keep the full-row normaliser; "other" holds the rest
    part = cap_probs.attention_probs(q, k, queries=(4, 10), columns=(1, 3), other=True)
    assert torch.allclose(part[..., :2], want[:, 4:, 1:3], atol=1e-6)
    assert torch.allclose(part.sum(-1), torch.ones(2, 6), atol=1e-6)
    # a boolean mask removes keys; a float mask is added
    mask = torch.ones(10, 7, dtype=torch.bool)
    mask[:, 5:] = False
    masked = cap_probs.attention_probs(q, k, mask=cap_probs.mask_rows(mask, slice(0, 2)))
    want5 = torch.softmax(q @ k[:, :, :5].transpose(-1, -2) / math.sqrt(8), -1).mean(1)
    assert torch.allclose(masked, torch.nn.functional.pad(want5, (0, 2)), atol=1e-6)
    fmask = torch.zeros(10, 7)
    fmask[:, 5:] = float("-inf")
    assert torch.allclose(cap_probs.attention_probs(q, k, mask=cap_probs.mask_rows(fmask, slice(0, 2))), masked, atol=1e-6)


def test_attention_probs_per_head_mask_in_head_chunks_and_fully_masked_rows():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 4, 6, 8, generator=g), torch.randn(1, 4, 5, 8, generator=g)
    mask = torch.rand(1, 4, 6, 5, generator=g) > 0.3  # a different mask per head
    mask[:, :, :, 0] = True
    mask[0, 2, 3] = False  # head 2 masks every key of query 3
    logits = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~mask, float("-inf"))
    want = torch.softmax(logits, -1).nan_to_num(0.0).mean(1)
    for budget in (5, 30, 10_000):  # one head per chunk ... all heads at once
        got = cap_probs.attention_probs(q, k, mask=mask, budget=budget)
        assert torch.isfinite(got).all() and torch.allclose(got, want, atol=1e-6), budget


def test_joint_text_probs_equal_the_full_softmax_columns():
    """The joint-attention path (text softmax x the text's share from one attention call over all keys) gives the
    columns and the "other" weight of the full softmax, with boolean and float masks, and no NaN where a query's
    text keys are all masked."""
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 3, 12, 8, generator=g) * 2, torch.randn(2, 3, 9, 8, generator=g) * 2
    for queries, columns in (((4, 12), (0, 3)), ((0, 8), (8, 9)), ((0, 12), (2, 7))):
        want = cap_probs.attention_probs(q, k, queries=queries, columns=columns, other=True)
        got = cap_probs.joint_text_probs(q, k, queries, columns)
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6)
    mask = torch.ones(12, 9, dtype=torch.bool)
    mask[:, 1] = False
    mask[5, 0:3] = False  # query 5 sees none of the text columns 0-2
    m = cap_probs.mask_rows(mask, slice(0, 2))
    want = cap_probs.attention_probs(q, k, queries=(4, 12), columns=(0, 3), other=True, mask=m)
    got = cap_probs.joint_text_probs(q, k, (4, 12), (0, 3), mask=m)
    assert torch.isfinite(got).all() and torch.allclose(got, want.nan_to_num(0.0), atol=1e-6)
    assert torch.allclose(got[:, 1, :3], torch.zeros(2, 3)) and torch.allclose(got.sum(-1), torch.ones(2, 8))
    fmask = torch.zeros(12, 9).masked_fill(~mask, float("-inf"))
    got_f = cap_probs.joint_text_probs(q, k, (4, 12), (0, 3), mask=cap_probs.mask_rows(fmask, slice(0, 2)))
    assert torch.allclose(got_f, got, atol=1e-6)


def test_fold_repeats_equals_attention_on_the_original_context():
    # ComfyUI repeats a 77-token context to the LCM with a longer one; the folded maps are the original ones
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 6, 4, generator=g), torch.randn(1, 2, 5, 4, generator=g)
    folded = cap_probs.fold_repeats(cap_probs.attention_probs(q, k.repeat(1, 1, 3, 1)), 5)
    assert torch.allclose(folded, cap_probs.attention_probs(q, k), atol=1e-6)
    with pytest.raises(ValueError, match="not a repeat"):
        cap_probs.fold_repeats(torch.zeros(1, 2, 7), 5)


def test_resize_keeps_maps_summing_to_one():
    p = torch.softmax(torch.randn(2, 5, 3, 4), 1)
    for size in ((6, 8), (9, 7), (2, 2), (3, 4)):
        assert torch.allclose(cap_probs.resize_maps(p, size).sum(1), torch.ones(2, *size), atol=1e-5)


def test_bucket_arithmetic():
    assert [cap_probs.bucket_of(s, 10, 10) for s in range(10)] == list(range(10))
    assert [cap_probs.bucket_of(s, 25, 10) for s in range(25)] == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4, 4, 5, 5, 6, 6, 6, 7, 7,
                                                             8, 8, 8, 9, 9]
    assert cap_probs.bucket_ranges(25, 10)[:3] == [(0, 2), (3, 4), (5, 7)]
    assert cap_probs.bucket_ranges(4, 2) == [(0, 1), (2, 3)]


def test_layer_spec(sd1, sdxl, flux):
    ml = cl.model_layers(sd1.model, "CrossAttentionCapture")
    layers = ml.layers
    assert [x.label for x in layers] == ["input.1.0", "input.3.0", "middle.0.0", "output.0.0", "output.1.0",
                                         "output.2.0", "output.3.0"]
    assert [x.level for x in layers] == [0, 1, 1, 1, 1, 0, 0]
    assert [x.index for x in cl.parse_layers("0-1, output.3.0", ml)] == [0, 1, 6]
    assert [x.label for x in cl.parse_layers("middle", ml)] == ["middle.0.0"]
    assert cl.parse_layers("all", ml) == layers
    with pytest.raises(ValueError, match="outside 0-6"):
        cl.parse_layers("3-9", ml)
    with pytest.raises(ValueError, match="'up' is not a layer"):
        cl.parse_layers("up", ml)
    xl = cl.model_layers(sdxl.model, "CrossAttentionCapture")
    assert [x.label for x in cl.parse_layers("input", xl)] == ["input.1.0", "input.3.0", "input.3.1"]
    fl = cl.model_layers(flux.model, "CrossAttentionCapture")
    assert [x.label for x in cl.parse_layers("single", fl)] == ["single.0"]


def test_bad_inputs_raise_clear_errors(sd1):
    with pytest.raises(ValueError, match="rows must be one of positive, negative"):
        cap.install_capture(sd1.model, rows="both")
    with pytest.raises(ValueError, match="buckets must be a whole number from 1 to 100"):
        cap.install_capture(sd1.model, buckets=0)
    with mock.patch.object(families, "config_name", return_value="WAN21"), \
            mock.patch.object(families, "lookup", return_value=None):
        with pytest.raises(ValueError, match=r"does not support this model \(WAN21\)"):
            cap.install_capture(sd1.model)


# =========================================================================== capture on real sampling
@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3", "flux"])
def test_capture_is_bit_identical_and_sums_to_one(family, sd3_ok):
    t = family_model(family, sd3_ok)
    # a negative longer than one CLIP chunk: SD1/SDXL batch it with the positive repeated to 154 tokens, SD3 runs
    # the two in separate model calls, Flux (T5, 256 tokens) batches them as they are
    pos, neg = t.encode(PROMPT), t.encode(", ".join(["blurry, ugly, low quality, bad anatomy"] * 10))
    kw = sample_kw(t)
    ref = ksample(t.model, pos, neg, **kw)
    assert torch.isfinite(ref).all()
    out, run, _, _ = captured(t.model, pos, neg, **kw)
    assert torch.equal(bits(out), bits(ref))  # bit for bit
    ml = cl.model_layers(t.model, "CrossAttentionCapture")
    arch, layers = ml.kind, ml.layers
    # every chosen layer was seen through the override once per step (euler: one evaluation per step)
    assert run.seen == {x.label: 3 for x in layers} and not run.fallback and not run.missing
    assert not run.errors and not run.skipped
    (length,) = run.sums
    assert length == pos[0][0].shape[1]
    sums = run.sums[length]
    assert sums.extra == (arch == "dit")
    ones = torch.ones(1, *run.ref_hw)
    assert torch.allclose(sums.mean().sum(1), ones, atol=1e-5)
    for label in sums.layer_sum:
        m = sums.layer_mean(label)
        assert torch.allclose(m.sum(1), torch.ones(1, *m.shape[-2:]), atol=1e-5)
    for j in range(len(run.buckets)):
        assert torch.allclose(sums.bucket_mean(j).sum(1), ones, atol=1e-5)
    assert torch.allclose(sums.step_share().sum(-1), torch.ones(3, 1), atol=1e-5)
    assert run.ref_hw == ((4, 4) if arch == "unet" else (2, 2))  # 16 px image: latent 4x4, DiT patches 2x2


def test_capture_leaves_no_trace_and_each_run_starts_empty(sd1):
    pos, neg = sd1.encode(PROMPT), sd1.encode("")
    fresh = ksample(sd1.model, pos, neg, steps=3)
    m, handle = cap.install_capture(sd1.model)
    a = ksample(m, pos, neg, steps=3)
    after = ksample(sd1.model, pos, neg, steps=3)
    assert torch.equal(a, fresh) and torch.equal(after, fresh)
    ksample(m, pos, neg, steps=3)
    first, second = handle.runs
    assert first is not second and first.sums[77] is not second.sums[77]
    assert torch.equal(first.sums[77].bucket_sum, second.sums[77].bucket_sum)  # not accumulated over runs
    assert "optimized_attention_override" not in sd1.model.model_options.get("transformer_options", {})
    assert not sd1.model.get_wrappers(WrappersMP.OUTER_SAMPLE, f"{cap.WRAPPER_KEY}.{handle.serial}")


def test_memory_does_not_grow_with_steps(sd1):
    pos, neg = sd1.encode(PROMPT), sd1.encode("")
    peaks, persistent = {}, {}
    for steps in (10, 40):
        _, run, _, _ = captured(sd1.model, pos, neg, steps=steps, size=32, cfg=1.0)
        assert sum(run.seen.values()) == 7 * steps
        peaks[steps] = run.peak_bytes
        persistent[steps] = cap_probs.tensor_bytes(run.sums)
    # accumulators: fixed-size running sums; only one number per token and step grows (tokens x steps floats)
    assert persistent[40] - persistent[10] == 30 * 77 * 4 + 30 * 8  # step_sum rows + step counts
    assert peaks[40] <= 1.10 * peaks[10]
    assert persistent[10] < 400_000


def test_batch_and_a_longer_negative(sd1):
    long_prompt = ", ".join(["a very detailed red square with a thin golden outline"] * 12)  # 154 tokens
    pos, neg = sd1.encode(long_prompt), sd1.encode("blurry")
    contexts = []

    def spy(executor, x, t, c_concat=None, c_crossattn=None, *args, **kwargs):
        contexts.append(c_crossattn.shape[1])
        return executor(x, t, c_concat, c_crossattn, *args, **kwargs)

    m, handle = cap.install_capture(sd1.model)
    m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "test.spy", spy)
    out3 = ksample(m, pos, neg, steps=3, batch=3)
    run = handle.runs[-1]
    assert contexts == [154] * 3 and list(run.sums) == [154] and run.sums[154].batch == 3
    assert torch.allclose(run.sums[154].mean().sum(1), torch.ones(3, 4, 4), atol=1e-5)
    # row 0 of the batch sees the same noise as a batch of 1: the same maps
    out1, run1, _, _ = captured(sd1.model, pos, neg, steps=3, batch=1)
    assert torch.allclose(out3[0], out1[0], rtol=1e-4, atol=1e-3)
    assert torch.allclose(run.sums[154].mean()[0], run1.sums[154].mean()[0], atol=1e-4)
    assert not torch.allclose(run.sums[154].mean()[0], run.sums[154].mean()[1], atol=1e-4)


def test_positive_repeated_to_lcm_is_folded(sd1):
    # positive 77 tokens, negative 154: ComfyUI repeats the positive context twice in the batched call
    pos, neg = sd1.encode(PROMPT), sd1.encode(", ".join(["blurry, ugly, bad anatomy, watermark"] * 14))
    assert neg[0][0].shape[1] == 154
    out, run, _, _ = captured(sd1.model, pos, neg, steps=2)
    assert list(run.sums) == [77] and not run.skipped
    assert torch.allclose(run.sums[77].mean().sum(1), torch.ones(1, 4, 4), atol=1e-5)
    # the negative rows, recorded by a second capture, have their own 154-token group
    _, runn, _, _ = captured(sd1.model, pos, neg, rows="negative", steps=2)
    assert list(runn.sums) == [154]


def test_two_captures_in_one_run(sd1):
    # positive and negative recorded in the same run by two stacked captures, each into its own record
    pos, neg = sd1.encode(PROMPT), sd1.encode(", ".join(["blurry, ugly, bad anatomy, watermark"] * 14))
    ref = ksample(sd1.model, pos, neg, steps=2)
    m1, h_pos = cap.install_capture(sd1.model, layers="middle")
    m2, h_neg = cap.install_capture(m1, rows="negative")
    assert torch.equal(ksample(m2, pos, neg, steps=2), ref)
    assert list(h_pos.runs[-1].sums) == [77] and list(h_neg.runs[-1].sums) == [154]
    assert h_pos.runs[-1].seen == {"middle.0.0": 2} and len(h_neg.runs[-1].seen) == 7


def test_second_order_sampler_counts_every_evaluation(sd1):
    pos, neg = sd1.encode(PROMPT), sd1.encode("")
    _, run, _, _ = captured(sd1.model, pos, neg, steps=4, sampler="heun", layers="0", buckets=2)
    sums = run.sums[77]
    assert sums.step_count.tolist() == [2, 2, 2, 1]  # heun: corrector on every step but the last
    assert sums.bucket_count.tolist() == [4, 3] and run.buckets == [(0, 1), (2, 3)]
    assert run.seen == {"input.1.0": 7}


class IPAdapterLike:
    """An attn2 replace in the style of IPAdapter: calls the attention backend without transformer_options (so
    attention overrides never see the layer) and has the method IPAdapter calls on whatever sits at its key."""

    calls = 0  # on the class: ModelPatcher.clone() deep-copies patch objects

    def set_new_condition(self, **kwargs):
        pass

    def __call__(self, q, k, v, extra_options):
        IPAdapterLike.calls += 1
        return optimized_attention(q, k, v, extra_options["n_heads"])


@pytest.mark.parametrize("order", ["replace_first", "capture_first"])
def test_layers_with_an_attn2_replace_are_still_captured(sd1, order):
    pos, neg = sd1.encode(PROMPT), sd1.encode("")
    _, plain_run, _, _ = captured(sd1.model, pos, neg, steps=2)
    replace = IPAdapterLike()
    IPAdapterLike.calls = 0
    if order == "replace_first":
        base = sd1.model.clone()
        base.set_model_attn2_replace(replace, "input", 1)
        base.set_model_attn2_replace(replace, "output", 3, 0)
        m, handle = cap.install_capture(base)
    else:
        m, handle = cap.install_capture(sd1.model)
        base = sd1.model.clone()
        for src in (m, base):
            src.set_model_attn2_replace(replace, "input", 1)
            src.set_model_attn2_replace(replace, "output", 3, 0)
    ref = ksample(base, pos, neg, steps=2)
    out = ksample(m, pos, neg, steps=2)
    run = handle.runs[-1]
    assert torch.equal(out, ref) and IPAdapterLike.calls == 8  # 2 layers x 2 steps x 2 samplings
    assert run.fallback == {"input.1.0": 2, "output.3.0": 2}
    assert set(run.seen) == {"input.3.0", "middle.0.0", "output.0.0", "output.1.0", "output.2.0"}
    assert not run.missing and not run.errors
    # the replace leaves the image as it is, so the maps equal those of the plain model
    for label in ("input.1.0", "output.3.0", "middle.0.0"):
        assert torch.allclose(run.sums[77].layer_mean(label), plain_run.sums[77].layer_mean(label), atol=1e-5)


def test_layers_never_seen_are_reported(flux, caplog):
    # a block replace that skips the block (as step-caching nodes do): its attention never runs
    pos = flux.encode("a cat")
    base = flux.model.clone()
    base.set_model_patch_replace(lambda args, extra: {"img": args["img"], "txt": args["txt"]}, "dit", "double_block", 0)
    m, handle = cap.install_capture(base)
    with caplog.at_level("WARNING", logger="prompt_anatomy"):
        ksample(m, pos, pos, steps=2, channels=16, cfg=1.0)
    run = handle.runs[-1]
    assert run.missing == ["double.0"] and run.seen == {"single.0": 2}
    assert "never seen" in caplog.text and "double.0" in caplog.text
    res = _view(handle, text="a cat", tokens="1")
    assert "1 chosen layer(s) were never seen during sampling and are not in the maps: double.0" in res.ui["text"][0]


def test_a_failing_capture_never_breaks_sampling(sd1, caplog):
    pos, neg = sd1.encode(PROMPT), sd1.encode("")
    ref = ksample(sd1.model, pos, neg, steps=2)
    with mock.patch.object(cap, "attention_probs", side_effect=RuntimeError("boom")) as probs:
        with caplog.at_level("ERROR", logger="prompt_anatomy"):
            out, run, _, handle = captured(sd1.model, pos, neg, steps=2)
    assert torch.equal(out, ref)
    assert probs.call_count == 1 and run.errors == ["RuntimeError: boom"] and not run.sums  # stopped after the 1st
    assert "capture failed and stops for this run" in caplog.text
    with pytest.raises(ValueError, match="the recorded run has no maps"):
        _view(handle)


def test_bfloat16_model(sd1):
    t = tiny("sd1", dtype=torch.bfloat16)
    pos, neg = t.encode(PROMPT), t.encode("")
    ref = ksample(t.model, pos, neg, steps=2)
    out, run, _, _ = captured(t.model, pos, neg, steps=2)
    assert torch.equal(out, ref)
    sums = run.sums[77]
    assert sums.bucket_sum.dtype == torch.float32 and sums.bucket_sum.device.type == "cpu"
    assert torch.allclose(sums.mean().sum(1), torch.ones(1, 4, 4), atol=1e-5)


# =========================================================================== token labels
def test_token_labels_match_the_tokenizer_with_weights_and_chunks(sd1):
    words = ", ".join(["a small (red:1.3) square"] * 16) + ", on a blue background"  # > 75 tokens: two chunks
    tokens = sd1.clip.tokenize(words)["l"]
    assert len(tokens) == 2
    layout = pa_tokens.detect_layout(sd1.clip)
    table = am.token_table(layout, sd1.clip.tokenize(words))
    assert len(table) == 154
    inv = sd1.clip.tokenizer.clip_l.inv_vocab
    for chunk_i, chunk in enumerate(tokens):
        n_sem = next(i for i in range(1, 77) if chunk[i][0] == 49407) - 1
        base = 77 * chunk_i
        assert table[base].klass == "[SOS]" and table[base].text == "[SOS]" and table[base].chunk == chunk_i
        assert table[base + n_sem + 1].klass == "[EOS]"
        assert all(t.klass == "padding" for t in table[base + n_sem + 2:base + 77])
        for i in range(1, n_sem + 1):
            tok, weight = chunk[i][0], chunk[i][1]
            assert table[base + i].klass == "semantic"
            assert table[base + i].text == inv[tok].replace("</w>", "")
            assert table[base + i].weight == pytest.approx(weight)
    reds = [t for t in table if t.text == "red"]
    assert len(reds) == 16 and all(t.weight == pytest.approx(1.3) for t in reds)
    assert not any("(" in t.text or ":1.3" in t.text for t in table)


def _fake_run(family, lengths, extra=False, rows="positive"):
    sums = {n: cap.MapSums(n, extra, 1, (2, 2), 2, 2, "cpu") for n in lengths}
    return cap.AttentionRun(family=family, arch="dit" if extra else "unet", rows=rows, layers=[], all_layers=0, seen={},
                            fallback={}, missing=[], skipped={}, errors=[], n_steps=2, buckets=[(0, 0), (1, 1)],
                            ref_hw=(2, 2), sums=sums, final=torch.zeros(1, 4, 2, 2), latent_format=None, sampler=None,
                            peak_bytes=0)


def test_prompt_tokens_per_family(sd1, sdxl, sd3_ok, flux):
    text = "a cat"
    # SD1: the CLIP and the stock tokenizer agree
    with_clip = am.prompt_tokens(_fake_run("sd1", [77]), text, sd1.clip)
    assert am.prompt_tokens(_fake_run("sd1", [77]), text) == with_clip
    assert [t.text for t in with_clip[:4]] == ["[SOS]", "a", "cat", "[EOS]"]
    # SDXL: CLIP-L labels the shared positions
    xl = am.prompt_tokens(_fake_run("sdxl", [77]), text, sdxl.clip)
    assert len(xl) == 77 and xl[0].encoder == "CLIP-L" and xl[2].text == "cat"
    # SD3 without T5 in the CLIP: 77 positions; the stock tokenizer picks the same layout from the record
    s3 = am.prompt_tokens(_fake_run("sd3", [77]), text, sd3_ok.clip)
    assert len(s3) == 77 and am.prompt_tokens(_fake_run("sd3", [77]), text) == s3
    # with T5 (stock tokenizer): 77 CLIP + 77 T5 positions, T5 has no [SOS]
    s3t5 = am.prompt_tokens(_fake_run("sd3", [154]), text)
    assert s3t5[77].klass == "semantic" and s3t5[77].encoder == "T5-XXL"
    # Flux: T5 only, 256 positions, no [SOS]
    fx = am.prompt_tokens(_fake_run("flux", [256], extra=True), text, flux.clip)
    assert len(fx) == 256 and not any(t.klass == "[SOS]" for t in fx)
    assert [t.klass for t in fx[:4]] == ["semantic", "semantic", "semantic", "[EOS]"]
    with pytest.raises(ValueError, match="tokenizes to 77 context positions, but the record holds maps for prompts of "
                                         r"\[154\] tokens"):
        am.prompt_tokens(_fake_run("sd1", [154]), text, sd1.clip)
    with pytest.raises(ValueError, match="clip is the SDXL .* but the record comes from a SD1.x model"):
        am.prompt_tokens(_fake_run("sd1", [77]), text, sdxl.clip)


def test_token_items():
    table = am.prompt_tokens(_fake_run("sd1", [77]), "a red car")
    auto = am.parse_items("auto", table, False)
    assert [it.key for it in auto] == ["1", "2", "3", "4"] and auto[-1].klass == "[EOS]"
    items = am.parse_items("2, 5-76, sos,eos", table, False)
    assert [it.channels for it in items[:1]] == [(2,)] and items[1].channels == tuple(range(5, 77))
    assert items[2].channels == (0,) and items[3].channels == (4,)
    assert items[1].klass == "padding" and items[0].label == "2 red"
    with pytest.raises(ValueError, match="outside the prompt's 77 context positions"):
        am.parse_items("80", table, False)
    with pytest.raises(ValueError, match="'red' is not a token"):
        am.parse_items("red", table, False)
    with pytest.raises(ValueError, match="only for SD3 / Flux"):
        am.parse_items("img", table, False)
    chips = am.picker_chips(table, False, items)
    assert [c["item"] for c in chips] == ["0", "1", "2", "3", "4", "5-76"]
    assert [c["selected"] for c in chips] == [False, False, True, False, False, True]  # exact items
    maps = torch.rand(77, 2, 2)
    assert torch.allclose(am.item_maps(maps, items)[1], maps[5:].sum(0))


# =========================================================================== edges and convergence
def test_canny_hysteresis_matches_kornia():
    g = torch.Generator().manual_seed(3)
    img = torch.nn.functional.interpolate(torch.rand(3, 1, 8, 8, generator=g), size=(48, 48), mode="bilinear")
    _, want = kornia.filters.canny(img, low_threshold=am.CANNY_LOW, high_threshold=am.CANNY_HIGH)
    got = am.canny_edges(img)
    assert torch.equal(got, want) and got.sum() > 0


def test_edge_f1():
    a = torch.zeros(1, 1, 20, 20)
    a[0, 0, 5, 3:15] = 1
    shifted = torch.roll(a, 2, dims=2)
    assert am.edge_f1(a, a, 0).item() == 1.0
    assert am.edge_f1(shifted, a, 0).item() == 0.0
    assert am.edge_f1(shifted, a, 2).item() == 1.0
    assert am.edge_f1(torch.zeros_like(a), a, 2).item() == 0.0


def test_shape_convergence_ratio():
    image = torch.zeros(32, 32, 3)
    image[8:24, 8:24] = 1.0  # a white square
    square = torch.zeros(1, 8, 8)
    square[0, 2:6, 2:6] = 1.0
    noise = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(0))
    f1 = am.shape_convergence([noise, None, square], image, tolerance=2)
    assert math.isnan(float(f1[0, 1])) and float(f1[0, 2]) > 0.8 and float(f1[0, 0]) < float(f1[0, 2])
    rel = am.relative_to_last(f1)
    assert float(rel[0, 2]) == 1.0 and float(rel[0, 0]) < 1.0


# =========================================================================== the viewer node
def _view(handle, latent=None, **kw):
    return att_nodes.CrossAttentionMapViewer.execute(handle, kw.pop("text", PROMPT), latent=latent, **kw)


def test_viewer_node_end_to_end(sd1):
    pos, neg = sd1.encode(PROMPT), sd1.encode("")
    out, run, _, handle = captured(sd1.model, pos, neg, steps=4, size=32, buckets=2)
    image = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    res = _view(handle, {"samples": out}, image=image, clip=sd1.clip, tokens="2, 3")
    heat, overlays, classes, slices, anim, conv, summary_json, video_frames = res.args
    summary = json.loads(summary_json)
    assert overlays.shape == (2, 32, 32, 3) and anim.shape[0] == 2 and heat.shape[0] == 1
    assert torch.equal(video_frames, heat) and summary["frames"] is None  # the last output: image records get the grid
    for img in (heat, overlays, classes, slices, anim, conv):
        assert img.ndim == 4 and img.shape[-1] == 3 and 0 <= float(img.min()) and float(img.max()) <= 1
    assert summary["matched_latent"] is True and summary["steps"] == 4 and summary["buckets"] == [[0, 1], [2, 3]]
    assert [s["label"] for s in summary["shown"]] == ["2 red", "3 square"]
    assert [t["text"] for t in summary["tokens"][:4]] == ["[SOS]", "a", "red", "square"]
    per_step = summary["class_share_per_step"]
    for s in range(4):
        assert sum(per_step[c][s] for c in per_step) == pytest.approx(1.0, abs=1e-5)
    assert sum(summary["class_share"].values()) == pytest.approx(1.0, abs=1e-5)
    assert len(summary["shown"][0]["f1"]) == 2 and summary["shown"][0]["f1_relative"][-1] in (1.0, None)
    shares = torch.tensor([t["mean_weight"] for t in summary["tokens"]])
    assert float(shares.sum()) == pytest.approx(1.0, abs=1e-5)
    assert summary["shown"][0]["mean_weight"] == pytest.approx(float(shares[2]), abs=1e-7)
    # the ui: preview images, the summary text, the token chips for the JS picker
    assert res.ui["images"] and res.ui["text"][0].startswith("SD1.x · 4 steps")
    assert res.ui["pa_selected"] == ["2", "3"]
    assert [c["label"] for c in res.ui["pa_tokens"][:3]] == ["[SOS]", "a", "red"]
    # other tokens: other maps
    res2 = _view(handle, {"samples": out}, image=image, clip=sd1.clip, tokens="1, 3")
    assert not torch.equal(res2.args[1][0], overlays[0]) and torch.equal(res2.args[1][1], overlays[1])


def _with_rows(cond, rows: torch.Tensor):
    return [[rows, dict(cond[0][1])]]


def test_viewer_checks_the_text_token_by_token(sd1):
    """Issue 16.5: a text of the same token count that is not the recorded prompt is an error naming where it
    differs; the recorded text, and a construction that keeps its [SOS] + semantic rows, pass."""
    pos, neg, other = sd1.encode(PROMPT), sd1.encode(""), sd1.encode("a red circle on a blue background")
    eos = 1 + len(PROMPT.split())  # [SOS] + 7 one-token words
    assert sd1.clip.tokenize(PROMPT)["l"][0][eos][0] == 49407  # CLIP's end token
    swapped = pos[0][0].clone()
    swapped[:, eos:] = other[0][0][:, eos:]  # [SOS] + semantic of PROMPT, [EOS] + padding of the other prompt
    for cond in (pos, _with_rows(pos, swapped)):
        out, run, _, handle = captured(sd1.model, cond, neg, steps=2, size=32, buckets=2)
        assert len(run.contexts[77]) == 1 and run.contexts[77][0].shape == (77, 64)
        summary = json.loads(_view(handle, {"samples": out}, clip=sd1.clip, tokens="2").args[6])
        assert not any("labels" in n for n in summary["notes"])
    with pytest.raises(ValueError, match=r"differ from position 3 \('circle' in this text\).*0:\[SOS\] 1:a 2:red "
                                         r"3:circle"):
        _view(handle, {"samples": out}, text="a red circle on a blue background", clip=sd1.clip)
    # without a CLIP only the token count can be checked, and the summary says so
    summary = json.loads(_view(handle, {"samples": out}, text="a red circle on a blue background").args[6])
    assert any(n.startswith("labels checked by token count only") for n in summary["notes"])
    # a conditioning changed after encoding (here: averaged) fails the check; without clip it is labelled by count
    mixed = _with_rows(pos, 0.5 * (pos[0][0] + other[0][0]))
    out, _, _, handle = captured(sd1.model, mixed, neg, steps=2, size=32, buckets=2)
    with pytest.raises(ValueError, match="disconnect clip"):
        _view(handle, {"samples": out}, clip=sd1.clip)
    _view(handle, {"samples": out})
    # a zeroed conditioning (ConditioningZeroOut) cannot be checked: labelled by count, and the summary says so
    zero = _with_rows(pos, torch.zeros_like(pos[0][0]))
    out, _, _, handle = captured(sd1.model, zero, neg, steps=2, size=32, buckets=2)
    summary = json.loads(_view(handle, {"samples": out}, clip=sd1.clip).args[6])
    assert any("all zeros" in n for n in summary["notes"])


def test_viewer_check_on_a_bidirectional_encoder_names_no_position(flux):
    pos = flux.encode("a red cat")
    out, _, _, handle = captured(flux.model, pos, pos, steps=2, channels=16, cfg=1.0, size=32, buckets=2)
    _view(handle, {"samples": out}, text="a red cat", clip=flux.clip)  # the recorded text passes
    with pytest.raises(ValueError, match="reads the whole prompt at every position"):
        _view(handle, {"samples": out}, text="a red dog", clip=flux.clip)


def test_viewer_flux_image_keys(flux):
    pos = flux.encode("a cat")
    out, run, _, handle = captured(flux.model, pos, pos, steps=2, channels=16, cfg=1.0, size=32, buckets=2)
    res = _view(handle, {"samples": out}, text="a cat", tokens="1, img")
    summary = json.loads(res.args[6])
    assert summary["extra_image_channel"] is True and summary["shown"][1]["label"] == "[image]"
    assert summary["class_share"]["[image]"] == pytest.approx(summary["image_key_weight"], abs=1e-6)
    assert sum(summary["class_share"].values()) == pytest.approx(1.0, abs=1e-5)
    assert "[SOS]" not in summary["class_share"] and summary["image"].startswith("latent preview")


def test_text_keys_normalise_over_the_prompt_only(flux):
    """normalise=text_keys on joint attention: softmax over the prompt's keys alone (recomputed here from the q, k the
    block's attention call gets), no "[image]" channel, the latent bit-identical."""
    pos = flux.encode("a red cat")
    kw = {"steps": 1, "channels": 16, "cfg": 1.0, "size": 32}
    ref = ksample(flux.model, pos, pos, **kw)
    seen: list = []

    def spy(call_next, func, *args, **kwargs):
        to = kwargs["transformer_options"]
        if to.get(cl.LAYER_KEY) == ("double", 0):
            seen.append((args[0].clone(), args[1].clone(), to[cl.TXT_LEN_KEY]))
        return call_next(*args, **kwargs)

    base = flux.model.clone()
    cl.ensure_layer_tracking(base, cl.model_layers(base, "test"))
    hooks.chain_attention_override(base, spy)
    m, handle = cap.install_capture(base, "double.0", buckets=1, normalise="text_keys")
    assert torch.equal(ksample(m, pos, pos, **kw), ref)
    (run,) = handle.runs
    (length,) = run.sums
    sums = run.sums[length]
    assert run.normalise == "text_keys" and not sums.extra and run.seen == {"double.0": 1}
    ((q, k, txt),) = seen
    h, w = run.ref_hw
    p = torch.softmax(q[:, :, txt:].float() @ k[:, :, :length].float().transpose(-1, -2) / q.shape[-1] ** 0.5, -1)
    want = p.mean(1).transpose(1, 2).reshape(1, length, h, w)
    assert torch.allclose(sums.mean(), want, atol=1e-5)
    assert torch.allclose(sums.mean().sum(1), torch.ones(1, h, w), atol=1e-5)
    res = _view(handle, {"samples": ref}, text="a red cat", tokens="1")
    assert json.loads(res.args[6])["normalise"] == "text_keys"
    with pytest.raises(ValueError, match="normalise must be one of all_keys, text_keys"):
        cap.install_capture(flux.model, normalise="text")


def test_viewer_errors(sd1):
    m, handle = cap.install_capture(sd1.model)
    with pytest.raises(ValueError, match="no finished sampling run yet"):
        _view(handle)
    pos, neg = sd1.encode(PROMPT), sd1.encode("")
    ksample(m, pos, neg, steps=2)
    with pytest.raises(ValueError, match="batch_index 3 is out of range"):
        _view(handle, batch_index=3)
    with pytest.raises(ValueError, match="record must be the record output"):
        att_nodes.CrossAttentionMapViewer.execute(object(), PROMPT)
    long_text = ", ".join(["a very detailed red square"] * 20)
    with pytest.raises(ValueError, match="text tokenizes to 154 context positions"):
        _view(handle, text=long_text)
    with pytest.raises(ValueError, match="scale must be one of"):
        _view(handle, scale="log")
    # an unmatched latent still shows the newest run, and says so
    res = _view(handle, {"samples": torch.zeros(1, 4, 4, 4)}, tokens="2")
    assert json.loads(res.args[6])["matched_latent"] is False and "no recorded run produced" in res.ui["text"][0]
