"""EOSConditioningSwap on the real tokenizers and tiny text encoders of every supported family."""

from __future__ import annotations

import re

import comfy.samplers
import comfy.sdxl_clip
import pytest
import torch
from comfy.patcher_extension import WrappersMP
from pa_support import count_rows, ksample, tiny, tiny_models
from prompt_anatomy.nodes.core import hooks, runs
from prompt_anatomy.nodes.eos_swap import construct as es_construct
from prompt_anatomy.nodes.eos_swap import nodes as es_nodes
from prompt_anatomy.nodes.shared import tokens as pa_tokens

EOS, SOS = 49407, 49406
A_TEXT, B_TEXT = "a red cube", "a blue glossy sphere on a table"  # A: 3 CLIP tokens, B: 7
LONG = ", ".join(["a very detailed red square with a thin golden outline"] * 8)  # two CLIP chunks


def encode(t, text):
    return t.clip.encode_from_tokens_scheduled(t.clip.tokenize(text))


def swap(t, a=A_TEXT, b=B_TEXT, **kw):
    return es_nodes.swap_conditioning(t.clip, a, b, **kw)


def layout_positions(t, text):
    layout = pa_tokens.detect_layout(t.clip)
    return layout, pa_tokens.token_positions(layout, t.clip.tokenize(text))


def summary(chunks):
    return [(c.start, c.sos, c.eos, c.end) for c in chunks]


# --------------------------------------------------------------------------- layouts and exact positions
def test_positions_sd1_clip_l_pads_with_eos(sd1):
    layout, pos = layout_positions(sd1, A_TEXT)
    assert layout.family.name == "sd1" and [(p.key, p.channels) for p in layout.parts] == [("l", (0, 64))]
    (c,) = pos["l"]
    assert summary(pos["l"]) == [(0, 0, 4, 77)] and list(c.sem) == [1, 2, 3] and list(c.padding) == list(range(5, 77))
    assert [t for t, _ in c.tokens[4:]] == [EOS] * 73  # CLIP-L pads with [EOS]: only position tells them apart
    assert [c.klass(i) for i in (0, 1, 3, 4, 5, 76)] == ["[SOS]", "semantic", "semantic", "[EOS]", "padding", "padding"]


def test_positions_sd2_open_clip_h_pads_with_zero(sd2):
    layout, pos = layout_positions(sd2, A_TEXT)
    assert layout.family.name == "sd2" and [(p.key, p.label, p.pad_token) for p in layout.parts] == [("h", "OpenCLIP-H", 0)]
    (c,) = pos["h"]
    assert summary(pos["h"]) == [(0, 0, 4, 77)]
    assert [t for t, _ in c.tokens[4:]] == [EOS] + [0] * 72


def test_positions_sdxl_two_encoders_on_channels(sdxl):
    layout, pos = layout_positions(sdxl, A_TEXT)
    # channel ranges come from the encoders (64 + 64 in the tiny model), never from 768 / 1280
    assert [(p.key, p.channels, p.pad_token) for p in layout.parts] == [("l", (0, 64), EOS), ("g", (64, 128), 0)]
    assert summary(pos["l"]) == summary(pos["g"]) == [(0, 0, 4, 77)]
    assert encode(sdxl, A_TEXT)[0][0].shape == (1, 77, 128)


def test_positions_sd3_t5_appended_after_clip_tokens(sd3):
    layout, pos = layout_positions(sd3, A_TEXT)
    assert [(p.key, p.channels, p.encoded) for p in layout.parts] == [
        ("l", (0, 64), True), ("g", (64, 128), True), ("t5xxl", None, False)]  # the tiny SD3 has no T5
    assert summary(pos["l"]) == summary(pos["g"]) == [(0, 0, 4, 77)]
    # T5 from the tokenizer alone: no [SOS], "▁ a ▁red ▁cu be" then </s> (id 1), padded with 0 to 77,
    # placed after the 77 CLIP positions
    (t5,) = pos["t5xxl"]
    assert (t5.start, t5.sos, t5.eos, t5.end) == (77, None, 82, 154) and list(t5.sem) == [77, 78, 79, 80, 81]
    assert [t for t, _ in t5.tokens[5:]] == [1] + [0] * 71
    # with two CLIP chunks the T5 tokens start at 154
    _, pos_long = layout_positions(sd3, LONG)
    assert pos_long["t5xxl"][0].start == 154 and [c.start for c in pos_long["l"]] == [0, 77]
    cond = encode(sd3, A_TEXT)[0][0]
    assert cond.shape == (1, 77, 4096) and torch.count_nonzero(cond[..., 128:]) == 0


def test_positions_flux_context_is_t5_only(flux):
    layout, pos = layout_positions(flux, A_TEXT)
    assert [(p.key, p.channels, p.in_context) for p in layout.parts] == [("t5xxl", (0, 64), True), ("l", None, False)]
    (t5,) = pos["t5xxl"]
    assert (t5.start, t5.sos, t5.eos, t5.end) == (0, None, 5, 256) and list(t5.sem) == [0, 1, 2, 3, 4]
    assert summary(pos["l"]) == [(0, 0, 4, 77)]  # CLIP-L: pooled only
    assert encode(flux, A_TEXT)[0][0].shape == (1, 256, 64)


def test_positions_multi_chunk_eos_per_chunk(sd1):
    _, pos = layout_positions(sd1, LONG)
    tokens = sd1.clip.tokenize(LONG)["l"]
    n = [sum(1 for t, _ in ch[1:] if t != EOS) for ch in tokens]
    assert len(tokens) == 2
    # EOS of chunk c is at 77c + 1 + n_c; everything after it in the chunk is padding
    assert summary(pos["l"]) == [(0, 0, 1 + n[0], 77), (77, 77, 77 + 1 + n[1], 154)]
    assert n[0] == 75 and not list(pos["l"][0].padding)


def test_positions_embedding_vectors_take_one_position_each(sd1):
    layout = pa_tokens.detect_layout(sd1.clip)
    tokens = sd1.clip.tokenize(A_TEXT)
    vec = torch.randn(64)
    chunk = list(tokens["l"][0])
    chunk[2] = (vec, 1.0)  # an embedding vector in place of "red"
    (c,) = pa_tokens.chunk_positions(layout.part("l"), [chunk])
    assert (c.sos, c.eos, list(c.sem)) == (0, 4, [1, 2, 3]) and c.tokens[2][0] is vec


# --------------------------------------------------------------------------- swap: bit identity and alignment
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "sd3", "flux"])
def test_source_sem_target_eos_kept_positions_bit_identical(family):
    t = tiny(family)
    layout = pa_tokens.detect_layout(t.clip)
    (ca, _), = encode(t, A_TEXT)
    (cb, _), = encode(t, B_TEXT)
    pa = pa_tokens.token_positions(layout, t.clip.tokenize(A_TEXT))
    pb = pa_tokens.token_positions(layout, t.clip.tokenize(B_TEXT))
    cond, _, _ = swap(t)
    (out, _), = cond
    assert out.shape == ca.shape and out.dtype == ca.dtype
    for part in layout.context_parts:
        c0, c1 = part.channels
        a, b = pa[part.key][0], pb[part.key][0]
        keep = slice(a.start, a.eos)  # [SOS] + semantic tokens of A
        assert torch.equal(out[0, keep, c0:c1], ca[0, keep, c0:c1])
        assert not torch.equal(out[0, a.eos, c0:c1], ca[0, a.eos, c0:c1])
        n_b = b.end - b.eos  # B's [EOS] + padding slots (B is longer, so fewer than A needs)
        assert torch.equal(out[0, a.eos:a.eos + n_b, c0:c1], cb[0, b.eos:b.end, c0:c1])  # k-th slot = B's k-th
        rest = out[0, a.eos + n_b:a.end, c0:c1]  # B ran out: its last slot is repeated
        assert torch.equal(rest, cb[0, b.end - 1, c0:c1].expand_as(rest))
    if family == "sd3":
        assert torch.count_nonzero(out[..., 128:]) == 0  # SD3's zero channels stay zero


def test_first_eos_scope_changes_only_the_eos_position(sdxl):
    (ca, _), = encode(sdxl, A_TEXT)
    (cb, _), = encode(sdxl, B_TEXT)
    (out, _), = swap(sdxl, eos_scope="first_eos")[0]
    diff = (out != ca).any(dim=-1)[0]
    assert diff.nonzero().reshape(-1).tolist() == [4]
    assert torch.equal(out[0, 4], cb[0, 8])  # both CLIP-L and CLIP-G halves: B's first [EOS] at 1 + 7


def test_multi_chunk_rule_chunk_c_takes_donor_chunk_min_c(sd1):
    (ca, _), = encode(sd1, LONG)
    (cb, _), = encode(sd1, B_TEXT)
    cond, _, table = swap(sd1, LONG, B_TEXT)
    (out, _), = cond
    _, pa = layout_positions(sd1, LONG)
    c0, c1 = pa["l"]
    assert out.shape == (1, 154, 64)
    assert torch.equal(out[0, :c0.eos], ca[0, :c0.eos])
    assert torch.equal(out[0, c0.eos], cb[0, 8])  # chunk 1 has no padding: only its [EOS] slot
    assert torch.equal(out[0, 77:c1.eos], ca[0, 77:c1.eos])
    n = 154 - c1.eos  # A's chunk 2 has fewer slots than B's chunk: B's first n slots
    assert torch.equal(out[0, c1.eos:], cb[0, 8:8 + n])  # chunk 2 takes B's only chunk
    # and the other way round: B's extra chunk is not used and the table says so
    cond2, _, table2 = swap(sd1, A_TEXT, LONG)
    (out2, _), = cond2
    (cl, _), = encode(sd1, LONG)
    assert out2.shape == (1, 77, 64) and torch.equal(out2[0, 4], cl[0, c0.eos])
    assert "extra chunks are not used" in table2


def test_target_sem_source_eos_is_laid_out_on_target(sd2):
    (ca, da), = encode(sd2, A_TEXT)
    (cb, db), = encode(sd2, B_TEXT)
    (out, d), = swap(sd2, construction="target_sem+source_eos", pooled="target")[0]
    assert torch.equal(out[0, :8], cb[0, :8])
    assert torch.equal(out[0, 8:77], ca[0, 4:73])  # A has more slots than B needs: its first 69
    assert torch.equal(d["pooled_output"], db["pooled_output"])


def test_pooled_source_or_target(sd3):
    (_, da), = encode(sd3, A_TEXT)
    (_, db), = encode(sd3, B_TEXT)
    (_, d_src), = swap(sd3, pooled="source")[0]
    (_, d_tgt), = swap(sd3, pooled="target")[0]
    assert d_src["pooled_output"].shape == (1, 128)  # CLIP-L ‖ CLIP-G [EOS] states
    assert torch.equal(d_src["pooled_output"], da["pooled_output"])
    assert torch.equal(d_tgt["pooled_output"], db["pooled_output"])


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_pooled_follows_the_eos_by_default(family):
    """#16.4: the pooled vector is an [EOS] state, so by default it comes from the prompt that supplies the [EOS]
    slots: B for source_sem+target_eos / repeat_sem, A for target_sem+source_eos and the single-prompt ones."""
    t = tiny(family)
    (_, da), = encode(t, A_TEXT)
    (_, db), = encode(t, B_TEXT)
    want = {"source_sem+target_eos": db, "repeat_sem": db, "target_sem+source_eos": da, "sem+zero": da,
            "eos_only": da}
    for construction, d_want in want.items():
        cond, _, table = swap(t, construction=construction)
        (_, d), = cond
        assert torch.equal(d["pooled_output"], d_want["pooled_output"]), construction
        assert f"pooled_output: {'B' if d_want is db else 'A'}'s (follow_eos" in table
    pooled_input = next(i for i in es_nodes.EOSConditioningSwap.define_schema().inputs if i.id == "pooled")
    assert pooled_input.default == "follow_eos" and pooled_input.options == ["follow_eos", "source", "target"]
    # source / target keep their meaning (saved workflows store 'source')
    (_, d), = swap(t, pooled="source")[0]
    assert torch.equal(d["pooled_output"], da["pooled_output"])


# --------------------------------------------------------------------------- the other constructions
def test_zero_and_noise_constructions(sdxl):
    (ca, _), = encode(sdxl, A_TEXT)
    (sz, _), = swap(sdxl, construction="sem+zero")[0]
    assert torch.equal(sz[0, :4], ca[0, :4]) and torch.count_nonzero(sz[0, 4:]) == 0
    (sz1, _), = swap(sdxl, construction="sem+zero", eos_scope="first_eos")[0]
    assert torch.count_nonzero(sz1[0, 4]) == 0 and torch.equal(sz1[0, 5:], ca[0, 5:])
    (zs, _), = swap(sdxl, construction="zero+eos")[0]
    assert torch.equal(zs[0, 0], ca[0, 0]) and torch.equal(zs[0, 4:], ca[0, 4:])
    assert torch.count_nonzero(zs[0, 1:4]) == 0
    (sn, _), = swap(sdxl, construction="sem+noise", seed=7)[0]
    (sn_again, _), = swap(sdxl, construction="sem+noise", seed=7)[0]
    (sn_other, _), = swap(sdxl, construction="sem+noise", seed=8)[0]
    assert torch.equal(sn, sn_again) and not torch.equal(sn, sn_other)
    assert torch.equal(sn[0, :4], ca[0, :4])
    noise = sn[0, 4:]
    assert noise.shape == (73, 128) and abs(float(noise.mean())) < 0.05 and abs(float(noise.std()) - 1.0) < 0.05
    (ns, _), = swap(sdxl, construction="noise+eos", seed=7)[0]
    assert torch.equal(ns[0, 4:], ca[0, 4:]) and torch.equal(ns[0, 0], ca[0, 0])
    assert not torch.equal(ns[0, 1:4], ca[0, 1:4])


def test_sos_only_and_eos_only(sd1):
    (ca, _), = encode(sd1, A_TEXT)
    (so, _), = swap(sd1, construction="sos_only")[0]
    assert torch.equal(so[0], ca[0, 0].expand(77, -1))
    (eo, _), = swap(sd1, construction="eos_only")[0]
    assert torch.equal(eo[0, 0], ca[0, 0]) and torch.equal(eo[0, 1:], ca[0, 4].expand(76, -1))


def test_eos_only_on_t5_and_sos_only_refused(flux):
    (ca, _), = encode(flux, A_TEXT)
    (eo, _), = swap(flux, construction="eos_only")[0]
    assert torch.equal(eo[0], ca[0, 5].expand(256, -1))  # T5 has no [SOS]: every position is the end token's
    with pytest.raises(ValueError, match="T5 has no \\[SOS\\]"):
        swap(flux, construction="sos_only")


def test_repeat_sem_matches_encoding_of_repeated_text(sd1):
    layout = pa_tokens.detect_layout(sd1.clip)
    tokens = es_construct.repeat_semantic_tokens(layout, sd1.clip.tokenize(A_TEXT), 3)
    assert tokens == sd1.clip.tokenize(" ".join([A_TEXT] * 3))
    (cr, _), = encode(sd1, " ".join([A_TEXT] * 3))
    (cb, _), = encode(sd1, B_TEXT)
    cond, _, table = swap(sd1, construction="repeat_sem", repeat_count=3)
    (out, _), = cond
    assert torch.equal(out[0, :10], cr[0, :10])  # [SOS] + 3 × 3 semantic tokens of the repeated source
    assert torch.equal(out[0, 10:77], cb[0, 8:75])  # then B's first 67 [EOS] slots
    assert re.search(r"^\s+10\s+<\|endoftext\|>\s+\[EOS\]\s+B 8$", table, re.M), table
    assert "A×3" in table
    with pytest.raises(ValueError, match="repeat_count 30 is too large.*at most 25"):
        swap(sd1, construction="repeat_sem", repeat_count=30)


def test_repeat_sem_t5_grows_past_min_length(flux):
    layout = pa_tokens.detect_layout(flux.clip)
    tokens = es_construct.repeat_semantic_tokens(layout, flux.clip.tokenize(A_TEXT), 60)
    (t5,) = pa_tokens.token_positions(layout, tokens)["t5xxl"]
    assert (t5.eos, t5.end) == (300, 301)  # 5 × 60 semantic tokens, the end token, no padding left


# --------------------------------------------------------------------------- weights and embeddings
def test_prompt_weights_kept_for_kept_tokens(sd1):
    a, b = "a (red:1.5) cube", "(blue:1.3) sphere"
    (ca_w, _), = encode(sd1, a)
    (ca, _), = encode(sd1, A_TEXT)
    (cb_w, _), = encode(sd1, b)
    (out, _), = swap(sd1, a, b)[0]
    assert torch.equal(out[0, :4], ca_w[0, :4]) and not torch.equal(ca_w[0, 2], ca[0, 2])
    assert torch.equal(out[0, 4:77], cb_w[0, 3:76])


def test_embedding_kept_positions_bit_identical(sd1, tmp_path, monkeypatch):
    import safetensors.torch

    vecs = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    safetensors.torch.save_file({"clip_l": vecs}, str(tmp_path / "pa_emb.safetensors"))
    monkeypatch.setattr(sd1.clip.tokenizer.clip_l, "embedding_directory", [str(tmp_path)])
    text = "a embedding:pa_emb cube"
    tokens = sd1.clip.tokenize(text)["l"][0]
    assert torch.is_tensor(tokens[2][0]) and torch.is_tensor(tokens[3][0])
    _, pos = layout_positions(sd1, text)
    assert (pos["l"][0].eos, list(pos["l"][0].sem)) == (5, [1, 2, 3, 4])
    (ce, _), = encode(sd1, text)
    (cb, _), = encode(sd1, B_TEXT)
    cond, _, table = swap(sd1, text, B_TEXT)
    (out, _), = cond
    assert torch.equal(out[0, :5], ce[0, :5]) and torch.equal(out[0, 5:5 + 69], cb[0, 8:77])
    assert table.count("<embedding>") == 2


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("a,b,construction,msg", [
    ("", B_TEXT, "source_sem+target_eos", "source_text is empty"),
    ("   ", B_TEXT, "sem+zero", "source_text is empty"),
    (A_TEXT, "", "source_sem+target_eos", "target_text is empty"),
    (A_TEXT, " ", "target_sem+source_eos", "target_text is empty"),
])
def test_empty_texts_raise(sd1, a, b, construction, msg):
    with pytest.raises(ValueError, match=msg):
        swap(sd1, a, b, construction=construction)


def test_empty_target_allowed_when_unused(sd1):
    cond, _, table = swap(sd1, A_TEXT, "", construction="sem+zero")
    assert cond[0][0].shape == (1, 77, 64) and "not used by this construction" in table
    with pytest.raises(ValueError, match="target_text is empty"):
        swap(sd1, A_TEXT, "", construction="sem+zero", pooled="target")


@pytest.mark.parametrize("start,end,msg", [(0.6, 0.4, "must be below end_percent"), (0.5, 0.5, "must be below"),
                                           (-0.1, 0.5, "between 0 and 1"), (0.2, 1.5, "between 0 and 1")])
def test_bad_range_raises(sd1, start, end, msg):
    with pytest.raises(ValueError, match=msg):
        swap(sd1, start_percent=start, end_percent=end)


def test_mismatched_clip_and_model_raise(sd1, sd2, sdxl):
    with pytest.raises(ValueError, match="model is SD2.x but clip is the SD1.x"):
        swap(sd1, model=sd2.model)
    with pytest.raises(ValueError, match="model is SDXL but clip is the SD1.x"):
        swap(sd1, model=sdxl.model, kv="key_only")
    # conditionings encoded by different CLIPs cannot be spliced
    layout = pa_tokens.detect_layout(sd1.clip)
    pa = pa_tokens.token_positions(layout, sd1.clip.tokenize(A_TEXT))
    (ca, _), = encode(sd1, A_TEXT)
    (cx, _), = encode(sdxl, B_TEXT)
    with pytest.raises(ValueError, match="different text encoders"):
        es_construct.build_construction(layout, "source_sem+target_eos", "first_eos", ca, pa, cx, pa)
    (c_long, _), = encode(sd1, LONG)
    with pytest.raises(ValueError, match="not encoded by this CLIP"):
        es_construct.build_construction(layout, "sem+zero", "first_eos", c_long, pa)


def test_unsupported_text_encoder_raises():
    tm = tiny_models

    class TinyRefinerClip(comfy.sdxl_clip.SDXLRefinerClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=dtype,
                             model_options={**model_options, "clip_g_model_config": tm.CLIP_SMALL})

    clip = tm._clip(comfy.sdxl_clip.SDXLTokenizer, TinyRefinerClip, 3, None)
    with pytest.raises(ValueError, match="not one EOSConditioningSwap knows.*Supported: SD1.x"):
        es_nodes.swap_conditioning(clip, A_TEXT, B_TEXT)


@pytest.mark.parametrize("family,name", [("sd3", "SD3's MMDiT"), ("flux", "Flux's double/single blocks")])
def test_key_only_refused_on_dit_models(family, name):
    t = tiny(family)
    for kv in ("key_only", "value_only"):
        with pytest.raises(ValueError, match=f"kv={kv} needs a UNet model.*{re.escape(name)}"):
            swap(t, kv=kv, model=t.model)


def test_key_only_needs_model(sd1):
    with pytest.raises(ValueError, match="connect the MODEL input"):
        swap(sd1, kv="value_only")


# --------------------------------------------------------------------------- step range
def record_contexts(model):
    m = model.clone()
    runs.ensure_run_tracking(m)
    calls = []

    def rec(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kw):
        mask = runs.row_mask(transformer_options, x.shape[0])
        calls.append({"step": runs.current_step(transformer_options), "rows": x.shape[0],
                      "pos": [c_crossattn[r] for r in range(x.shape[0]) if mask[r]]})
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw)

    m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "test.rec", rec)
    return m, calls


def expected_in_range(model, sigmas, start, end):
    ms = model.get_model_object("model_sampling")
    hi, lo = ms.percent_to_sigma(start), ms.percent_to_sigma(end)
    return [lo <= float(s) <= hi for s in sigmas[:-1]]


def test_step_range_sd1_exact_conditioning_per_step_no_extra_rows(sd1):
    start, end, steps = 0.34, 0.67, 6
    cond, _, _ = swap(sd1, start_percent=start, end_percent=end)
    assert [(d["start_percent"], d["end_percent"]) for _, d in cond] == [
        (0.0, start - es_construct.RANGE_NUDGE), (start - es_construct.RANGE_NUDGE, end + es_construct.RANGE_NUDGE),
        (end + es_construct.RANGE_NUDGE, 1.0)]
    (plain, _), = encode(sd1, A_TEXT)
    (full, _), = swap(sd1)[0]
    neg = encode(sd1, "")
    m, calls = record_contexts(sd1.model)
    ksample(m, cond, neg, steps=steps)
    sigmas = comfy.samplers.calculate_sigmas(sd1.model.get_model_object("model_sampling"), "normal", steps)
    want = expected_in_range(sd1.model, sigmas, start, end)
    assert want == [False, False, True, True, False, False]
    assert [c["step"] for c in calls] == list(range(steps))
    for c, inside in zip(calls, want, strict=True):
        (ctx,) = c["pos"]  # exactly one positive row per call: one entry active
        assert torch.equal(ctx, (full if inside else plain)[0])
    # the same rows reach the model as with plain CLIPTextEncode conditioning
    m2, n_plain = count_rows(sd1.model)
    ksample(m2, encode(sd1, A_TEXT), neg, steps=steps)
    seen = {"rows": sum(c["rows"] for c in calls), "calls": len(calls)}
    assert seen == n_plain == {"rows": 2 * steps, "calls": steps}


def test_step_range_boundary_on_a_schedule_sigma_is_one_entry(flux):
    # Flux "simple" with 4 steps puts steps 1 and 3 exactly on percent_to_sigma(0.25) and (0.75): without the
    # nudge both adjacent entries would be active there (an extra model row and an averaged conditioning)
    start, end, steps = 0.25, 0.75, 4
    ms = flux.model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "simple", steps)
    assert float(sigmas[1]) == torch.tensor(ms.percent_to_sigma(start), dtype=sigmas.dtype).item()
    assert float(sigmas[3]) == torch.tensor(ms.percent_to_sigma(end), dtype=sigmas.dtype).item()
    cond, _, _ = swap(flux, start_percent=start, end_percent=end)
    cond = [[c, {**d, "guidance": 3.5}] for c, d in cond]
    (plain, _), = encode(flux, A_TEXT)
    (full, _), = swap(flux)[0]
    neg = encode(flux, "")
    m, calls = record_contexts(flux.model)
    ksample(m, cond, neg, steps=steps, cfg=1.0, channels=16, scheduler="simple")
    assert [c["step"] for c in calls] == [0, 1, 2, 3]
    # ranges are closed at both ends, as ConditioningSetTimestepRange's: steps 1..3 are inside [0.25, 0.75]
    for c, inside in zip(calls, [False, True, True, True], strict=True):
        (ctx,) = c["pos"]
        assert torch.equal(ctx, (full if inside else plain)[0])
    m1, n_plain = count_rows(flux.model)
    ksample(m1, encode(flux, A_TEXT), neg, steps=steps, cfg=1.0, channels=16, scheduler="simple")
    assert {"rows": sum(c["rows"] for c in calls), "calls": len(calls)} == n_plain == {"rows": steps, "calls": steps}


def test_target_sem_outside_range_is_plain_source_of_its_own_length(sd1):
    cond, _, _ = swap(sd1, LONG, B_TEXT, construction="target_sem+source_eos", start_percent=0.5)
    assert [c.shape[1] for c, _ in cond] == [154, 77]


# --------------------------------------------------------------------------- key-only / value-only
def attn2_modules(model):
    return [mod for name, mod in model.model.diffusion_model.named_modules() if name.endswith("attn2")]


def capture_attention(model, ctx_len):
    m = model.clone()
    seen = []

    def capture(call_next, func, q, k, v, *args, **kwargs):
        if k.shape[1] == ctx_len:  # cross-attention (self-attention has one key per latent pixel)
            to = kwargs["transformer_options"]
            seen.append({"k": k.clone(), "v": v.clone(), "mask": runs.row_mask(to, k.shape[0]),
                         "step": runs.current_step(to)})
        return call_next(q, k, v, *args, **kwargs)

    hooks.chain_attention_override(m, capture)
    return m, seen


def check_kv_inside_attention(t, kv, start=0.0, end=1.0, steps=2, want_in_range=None):
    cond, patched, _ = swap(t, kv=kv, model=t.model, start_percent=start, end_percent=end)
    assert patched is not t.model
    (plain, _), = encode(t, A_TEXT)
    (constructed, _), = swap(t)[0]
    (neg_ctx, _), = neg = encode(t, "")
    m, seen = capture_attention(patched, 77)
    runs.ensure_run_tracking(m)
    ksample(m, cond, neg, steps=steps, channels=t.latent_channels)
    mods = attn2_modules(t.model)
    assert len(seen) == len(mods) * steps
    in_range = expected_in_range(t.model, comfy.samplers.calculate_sigmas(
        t.model.get_model_object("model_sampling"), "normal", steps), start, end)
    assert in_range == (want_in_range or [True] * steps)
    checked = 0
    for call in seen:
        neg_rows = ~call["mask"]
        mod = next(mm for mm in mods if call["k"].shape[-1] == mm.to_k.out_features and
                   torch.allclose(call["k"][neg_rows], mm.to_k(neg_ctx).expand(int(neg_rows.sum()), -1, -1), atol=1e-5))
        with torch.no_grad():
            k_plain, v_plain = mod.to_k(plain), mod.to_v(plain)
            k_cons, v_cons = mod.to_k(constructed), mod.to_v(constructed)
        k_pos, v_pos = call["k"][call["mask"]], call["v"][call["mask"]]
        assert torch.allclose(call["v"][neg_rows], mod.to_v(neg_ctx), atol=1e-5)
        inside = in_range[call["step"]]
        want_k = k_cons if inside and kv == "key_only" else k_plain
        want_v = v_cons if inside and kv == "value_only" else v_plain
        assert torch.allclose(k_pos, want_k, atol=1e-5) and torch.allclose(v_pos, want_v, atol=1e-5)
        if inside:
            other = k_plain if kv == "key_only" else v_plain
            assert not torch.allclose(k_pos if kv == "key_only" else v_pos, other, atol=1e-3)
            checked += 1
    assert checked == len(mods) * sum(in_range)


def test_key_only_changes_keys_not_values_inside_attention(sd1):
    check_kv_inside_attention(sd1, "key_only")


def test_value_only_changes_values_not_keys_inside_attention_in_range(sd1):
    check_kv_inside_attention(sd1, "value_only", start=0.5, end=1.0, steps=4, want_in_range=[False, False, True, True])


def test_value_only_sdxl(sdxl):
    check_kv_inside_attention(sdxl, "value_only")


def test_key_and_value_with_model_passes_it_through(sd1):
    _, m, _ = swap(sd1, model=sd1.model)
    assert m is sd1.model


def test_patched_run_leaves_no_trace(sd1):
    pos, neg = encode(sd1, A_TEXT), encode(sd1, "")
    ref = ksample(sd1.model, pos, neg, steps=2)
    cond, patched, _ = swap(sd1, kv="key_only", model=sd1.model)
    out = ksample(patched, cond, neg, steps=2)
    assert not torch.equal(out, ref)
    assert torch.equal(ksample(sd1.model, pos, neg, steps=2), ref)
    assert "patches" not in sd1.model.model_options.get("transformer_options", {})


def test_bfloat16_end_to_end():
    t = tiny("sd1", dtype=torch.bfloat16)
    (ca, _), = encode(t, A_TEXT)
    cond, patched, _ = swap(t, kv="value_only", model=t.model, start_percent=0.3)
    (out, _) = cond[1]
    assert torch.equal(out[0, :4], ca[0, :4])
    neg = encode(t, "")
    plain = ksample(t.model, encode(t, A_TEXT), neg, steps=3)
    swapped = ksample(patched, cond, neg, steps=3)
    assert torch.isfinite(swapped).all() and not torch.equal(swapped, plain)


# --------------------------------------------------------------------------- node
def test_node_schema_and_output(sd1):
    schema = es_nodes.EOSConditioningSwap.define_schema()
    assert schema.node_id == "EOSConditioningSwap" and schema.category.startswith("prompt_anatomy/")
    assert all(i.tooltip for i in schema.inputs) and schema.description
    assert [i.id for i in schema.inputs if i.optional] == ["model", "range_unit"]  # new inputs go last (widget order)
    res = es_nodes.EOSConditioningSwap.execute(sd1.clip, A_TEXT, B_TEXT)
    cond, model, table = res.args
    assert model is None and cond[0][0].shape == (1, 77, 64)
    assert res.ui.as_dict() == {"text": (table,)}
    assert re.search(r"^\s+4\s+<\|endoftext\|>\s+\[EOS\]\s+B 8$", table, re.M)
    assert re.search(r"^\s+5–72\s+<\|endoftext\|>\s+padding\s+B 9–76$", table, re.M)
    assert re.search(r"^\s+73–76\s+<\|endoftext\|>\s+padding\s+B 76 \(×4\)$", table, re.M)
    assert "repeat its last slot" in table
    assert es_nodes.EOSConditioningSwap in __import__("prompt_anatomy.nodes", fromlist=["all_nodes"]).all_nodes()


@pytest.mark.parametrize("kv", ["key_only", "value_only"])
def test_kv_swap_after_conditioning_concat_changes_only_the_constructed_chunk(sd1, kv):
    """#16.1: ConditioningConcat appends a chunk ('…, high quality'); only the chunk the construction built gets
    the constructed keys/values, the appended one passes through bit-identical (in either order of the concat)."""
    import nodes as comfy_nodes

    cond, patched, _ = swap(sd1, kv=kv, model=sd1.model)
    extra = encode(sd1, "high quality")
    neg = encode(sd1, "")
    which = "k" if kv == "key_only" else "v"
    for first, second, swapped_at in ((cond, extra, slice(0, 77)), (extra, cond, slice(77, 154))):
        (concat,) = comfy_nodes.ConditioningConcat().concat(first, second)
        (plain_concat,) = comfy_nodes.ConditioningConcat().concat(
            *((encode(sd1, A_TEXT), extra) if first is cond else (extra, encode(sd1, A_TEXT))))
        kept_at = slice(77, 154) if swapped_at.start == 0 else slice(0, 77)
        m, seen = capture_attention(patched, 154)
        runs.ensure_run_tracking(m)
        ksample(m, concat, neg, steps=1)
        m0, seen0 = capture_attention(sd1.model, 154)
        runs.ensure_run_tracking(m0)
        ksample(m0, plain_concat, neg, steps=1)
        assert len(seen) == len(seen0) == len(attn2_modules(sd1.model))
        for got, ref in zip(seen, seen0, strict=True):
            pos = got["mask"]
            assert torch.equal(got[which][pos][:, kept_at], ref[which][pos][:, kept_at])
            assert not torch.allclose(got[which][pos][:, swapped_at], ref[which][pos][:, swapped_at], atol=1e-3)
            other = "v" if which == "k" else "k"
            assert torch.equal(got[other], ref[other])


def test_find_chunks_lcm_repeat_and_concat():
    from prompt_anatomy.nodes.eos_swap.kv import find_chunks

    g = torch.Generator().manual_seed(0)
    base, other = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    other[0] = base[0]  # every CLIP chunk starts with the same [SOS] state
    assert find_chunks(torch.cat([base, base]), base) == [0, 4]
    assert find_chunks(torch.cat([other, base, other]), base) == [4]
    assert find_chunks(other, base) == []


@pytest.mark.parametrize("scheduler,want_timestep", [("normal", 10), ("exponential", 7)])
def test_range_units_step_counts_20_steps(sd1, scheduler, want_timestep):
    """#16.7: end 0.5 on 20 steps. timestep_percent (ComfyUI's sigma-based percents, the old meaning) covers 10
    steps on 'normal' and 7 on 'exponential'; step_fraction covers the first 10 steps on both, as TextLayerPatch
    (same two units there) and the guidance cutoff's 'fraction'."""
    from prompt_anatomy.nodes.text_layers import patch as tl_patch

    steps, neg = 20, encode(sd1, "")
    (plain, _), = encode(sd1, A_TEXT)
    (full, _), = swap(sd1)[0]
    sigmas = comfy.samplers.calculate_sigmas(sd1.model.get_model_object("model_sampling"), scheduler, steps)
    for unit, want in (("timestep_percent", want_timestep), ("step_fraction", 10)):
        cond, patched, table = swap(sd1, end_percent=0.5, range_unit=unit, model=sd1.model)
        m, calls = record_contexts(patched)
        ksample(m, cond, neg, steps=steps, scheduler=scheduler)
        assert [c["step"] for c in calls] == list(range(steps))
        used = [torch.equal(c["pos"][0], full[0]) for c in calls]
        assert all(u or torch.equal(c["pos"][0], plain[0]) for u, c in zip(used, calls, strict=True))
        assert used == [True] * want + [False] * (steps - want), unit
        assert unit in table
        s = tl_patch.PatchSettings(("x",), 0.0, 0.5, range_unit=unit, sigmas=None if unit == "step_fraction" else (
            float(sd1.model.get_model_object("model_sampling").percent_to_sigma(0.0)),
            float(sd1.model.get_model_object("model_sampling").percent_to_sigma(0.5))))
        assert tl_patch.step_window(s, sigmas) == (0, want), unit
    with pytest.raises(ValueError, match="step_fraction.*MODEL input"):
        swap(sd1, end_percent=0.5, range_unit="step_fraction")


def test_step_fraction_without_the_wrapper_never_averages(sd1):
    """Sampled with a MODEL lacking the step wrapper, a step_fraction conditioning is the construction on every step
    (the plain entries outside the range are off for ComfyUI itself), never two entries averaged."""
    cond, _, _ = swap(sd1, start_percent=0.25, end_percent=0.5, range_unit="step_fraction", model=sd1.model)
    (full, _), = swap(sd1)[0]
    m, calls = record_contexts(sd1.model)
    ksample(m, cond, encode(sd1, ""), steps=4)
    assert all(torch.equal(c["pos"][0], full[0]) and len(c["pos"]) == 1 for c in calls)


def test_two_kv_swaps_on_one_model_both_stay(sd1):
    """Each key_only/value_only swap installs its own keyed attn2 patch (it acts only on rows that carry its own
    context), so chaining a second swap's MODEL keeps the first one's patch."""
    _, m1, _ = es_nodes.swap_conditioning(sd1.clip, "a red cube", "a blue sphere", kv="key_only", model=sd1.model)
    _, m2, _ = es_nodes.swap_conditioning(sd1.clip, "a green cone", "a yellow star", kv="value_only", model=m1)
    mine = [p for p in m2.model_options["transformer_options"]["patches"]["attn2_patch"]
            if str(getattr(p, hooks.KEY_ATTR, "")).startswith("prompt_anatomy.eos_swap.kv.")]
    assert len(mine) == 2
