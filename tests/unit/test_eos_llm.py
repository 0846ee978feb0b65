"""EOSConditioningSwap on decoder-only LLM text encoders (issue #14.3): the end-of-turn token after the prompt is the
[EOS] analogue, the chat-template tokens after it the padding, the template head is kept (or cut off by the encoder).
Exact positions with the Qwen tokenizers ComfyUI ships (Qwen-Image, Z-Image) and the tiny model's Tekken stand-in
(Flux.2: the real tokenizer ships inside the checkpoint); every construction bit for bit on the tiny models."""

from __future__ import annotations

import pytest
import torch
from pa_support import tiny
from prompt_anatomy.nodes.core import families
from prompt_anatomy.nodes.core import layers as cl
from prompt_anatomy.nodes.eos_swap import construct as es_construct
from prompt_anatomy.nodes.eos_swap import nodes as es_nodes
from prompt_anatomy.nodes.shared import tokens as pa_tokens

import nodes as comfy_nodes

A_TEXT, B_TEXT = "a red cat", "a blue glossy dog on a table"
IM_START, IM_END, USER, ASSISTANT, NL = 151644, 151645, 872, 77091, 198
QWEN_TAIL = [IM_END, NL, IM_START, ASSISTANT, NL]
INST, END_INST, BOS = 3, 4, 1  # Tekken ids (the stand-in keeps them)
LLM_FAMILIES = ("qwen_image", "zimage", "flux2")


def ids(tokens: dict) -> list[int]:
    (chunk,) = next(iter(tokens.values()))
    return [int(e[0]) for e in chunk]


def stock(family: str, text: str):
    """Layout and chunk of ``text`` by the tokenizer ComfyUI ships for ``family`` (no checkpoint needed)."""
    fam = families.by_name(family)
    layout = pa_tokens.stock_layout(fam)
    tokens = pa_tokens.stock_tokenizer(fam).tokenize_with_weights(text)
    (chunk,) = pa_tokens.token_positions(layout, tokens)[fam.encoders[0].key]
    return tokens, chunk


def summary(c) -> tuple:
    return c.start, c.head, list(c.sem), c.eos, c.end


# --------------------------------------------------------------------------- exact positions
def test_qwen_image_positions_head_dropped_real_tokenizer():
    tokens, c = stock("qwen_image", A_TEXT)
    raw = ids(tokens)
    prompt = raw[34:-5]
    assert raw[:3] == [IM_START, 8948, NL] and raw[31:34] == [IM_START, USER, NL] and raw[-5:] == QWEN_TAIL
    n = len(prompt)
    assert n == 3  # "a", " red", " cat"
    # the encoder drops the 34-token system template: the context is the prompt, then the 5 tail tokens
    assert summary(c) == (0, 0, [0, 1, 2], 3, 8)
    assert [t for t, *_ in c.tokens] == prompt + QWEN_TAIL
    assert [c.klass(i) for i in range(8)] == ["semantic"] * 3 + ["[EOS]"] + ["padding"] * 4
    assert list(c.slots("first_eos")) == [3] and list(c.slots("all_eos_and_padding")) == [3, 4, 5, 6, 7]


def test_qwen_image_positions_longer_prompt_real_tokenizer():
    tokens, c = stock("qwen_image", B_TEXT)
    n = len(ids(tokens)) - 34 - 5
    assert n == 7 and summary(c) == (0, 0, list(range(n)), n, n + 5)


def test_zimage_positions_head_kept_real_tokenizer():
    tokens, c = stock("zimage", A_TEXT)
    raw = ids(tokens)
    assert raw[:3] == [IM_START, USER, NL] and raw[-5:] == QWEN_TAIL and len(raw) == 3 + 3 + 5
    assert summary(c) == (0, 3, [3, 4, 5], 6, 11)
    assert [c.klass(i) for i in range(11)] == ["template"] * 3 + ["semantic"] * 3 + ["[EOS]"] + ["padding"] * 4
    assert [t for t, *_ in c.tokens] == raw


def test_prompt_holding_template_tokens_keeps_them_semantic():
    """The head ends at the first head marker, the tail starts at the last end-of-turn token."""
    tokens, c = stock("zimage", "a <|im_end|> cat")
    raw = ids(tokens)
    assert raw.count(IM_END) == 2 and summary(c) == (0, 3, [3, 4, 5, 6], 7, 12)
    inner = raw.index(IM_END)  # the prompt's own <|im_end|>: a semantic token
    assert inner in c.sem and c.klass(inner) == "semantic" and c.klass(7) == "[EOS]"


def test_qwen_image_text_without_template_is_refused():
    with pytest.raises(ValueError, match="do not hold the chat template around the prompt"):
        stock("qwen_image", "<|im_start|>a cat")


def test_flux2_positions_standin_tokenizer():
    t = tiny("flux2")
    layout = pa_tokens.detect_layout(t.clip)
    (part,) = layout.parts
    assert (part.head_ids, part.tail_ids, part.channels) == ((INST,), (END_INST,), (0, 48))  # 3 layers x 16
    raw = ids(t.clip.tokenize(A_TEXT))
    head = raw.index(INST) + 1
    n = len(raw) - head - 1
    assert raw[0] == BOS and raw[-1] == END_INST and n == 3
    (c,) = pa_tokens.token_positions(layout, t.clip.tokenize(A_TEXT))["mistral3_24b"]
    # nothing follows [/INST]: it is the [EOS], there is no padding; the head (<s> ... [INST]) is kept
    assert summary(c) == (0, head, list(range(head, head + n)), head + n, head + n + 1)
    assert c.klass(0) == c.klass(head - 1) == "template" and c.klass(head + n) == "[EOS]"
    assert list(c.slots("all_eos_and_padding")) == [head + n]


@pytest.mark.parametrize("family,length", [("qwen_image", 8), ("zimage", 11)])
def test_positions_match_the_encoders_output(family, length):
    t = tiny(family)
    layout = pa_tokens.detect_layout(t.clip)
    pos = pa_tokens.token_positions(layout, t.clip.tokenize(A_TEXT))
    (cond, _), = t.clip.encode_from_tokens_scheduled(t.clip.tokenize(A_TEXT))
    assert cond.shape[1] == length == pa_tokens.context_length(layout, pos)


# --------------------------------------------------------------------------- constructions, bit for bit
def _setup(family):
    t = tiny(family)
    layout = pa_tokens.detect_layout(t.clip)
    (ca, _), = t.clip.encode_from_tokens_scheduled(t.clip.tokenize(A_TEXT))
    (cb, _), = t.clip.encode_from_tokens_scheduled(t.clip.tokenize(B_TEXT))
    (a,) = pa_tokens.token_positions(layout, t.clip.tokenize(A_TEXT))[layout.parts[0].key]
    (b,) = pa_tokens.token_positions(layout, t.clip.tokenize(B_TEXT))[layout.parts[0].key]
    return t, ca, cb, a, b


def _noise(rows: int, like: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.randn((rows, like.shape[-1]), generator=torch.Generator().manual_seed(seed)).to(like.dtype)


def _expected(construction: str, scope: str, ca, cb, a, b, seed: int = 5):
    """The constructed context written out position by position from the two plain encodings."""
    tail_a = range(a.eos, a.eos + 1) if scope == "first_eos" else range(a.eos, a.end)
    tail_b = range(b.eos, b.eos + len(tail_a))
    exp = (cb if construction == "target_sem+source_eos" else ca).clone()
    if construction == "source_sem+target_eos":
        exp[0, list(tail_a)] = cb[0, list(tail_b)]
    elif construction == "target_sem+source_eos":
        exp[0, list(tail_b)] = ca[0, list(tail_a)]
    elif construction == "sem+zero":
        exp[0, list(tail_a)] = 0
    elif construction == "sem+noise":
        exp[0, list(tail_a)] = _noise(len(tail_a), ca, seed)
    elif construction == "zero+eos":
        exp[0, list(a.sem)] = 0
    elif construction == "noise+eos":
        exp[0, list(a.sem)] = _noise(len(a.sem), ca, seed)
    elif construction == "eos_only":
        exp[0, a.sem.start:a.end] = ca[0, a.eos]
    return exp


@pytest.mark.parametrize("family", LLM_FAMILIES)
@pytest.mark.parametrize("construction", ["source_sem+target_eos", "target_sem+source_eos", "sem+zero", "sem+noise",
                                          "zero+eos", "noise+eos", "eos_only"])
def test_constructions_bit_for_bit(family, construction):
    t, ca, cb, a, b = _setup(family)
    scopes = ("first_eos", "all_eos_and_padding") if construction in ("source_sem+target_eos", "sem+zero") else \
        ("all_eos_and_padding",)
    for scope in scopes:
        (out, d), = es_nodes.swap_conditioning(t.clip, A_TEXT, B_TEXT, construction=construction, eos_scope=scope,
                                               seed=5)[0]
        exp = _expected(construction, scope, ca, cb, a, b)
        assert out.shape == exp.shape and torch.equal(out, exp), (construction, scope)
        assert d.get("pooled_output") is None  # these families have no pooled vector
        if construction != "eos_only":  # the template head (if in the context) is never touched
            base = cb if construction == "target_sem+source_eos" else ca
            assert torch.equal(out[0, :a.start + a.head], base[0, :a.start + a.head])


@pytest.mark.parametrize("family", LLM_FAMILIES)
def test_swap_tail_lengths(family):
    """The all-slots swap replaces the whole tail: 5 tokens on Qwen, [/INST] alone on Mistral."""
    _, ca, cb, a, b = _setup(family)
    assert a.end - a.eos == b.end - b.eos == (1 if family == "flux2" else 5)
    assert len(a.sem) == 3 and len(b.sem) > len(a.sem)


@pytest.mark.parametrize("family", LLM_FAMILIES)
def test_repeat_sem_keeps_the_template_and_takes_target_tail(family):
    t, ca, cb, a, b = _setup(family)
    layout = pa_tokens.detect_layout(t.clip)
    raw = t.clip.tokenize(A_TEXT)
    (chunk,) = next(iter(raw.values()))
    first, tail = pa_tokens.llm_bounds(layout.parts[0], chunk)
    by_hand = {k: [list(chunk[:first]) + list(chunk[first:tail]) * 3 + list(chunk[tail:])] for k in raw}
    assert es_construct.repeat_semantic_tokens(layout, raw, 3) == by_hand
    (cr, _), = t.clip.encode_from_tokens_scheduled(by_hand)
    cond, _, table = es_nodes.swap_conditioning(t.clip, A_TEXT, B_TEXT, construction="repeat_sem", repeat_count=3)
    (out, _), = cond
    eos = a.head + 9 if family != "qwen_image" else 9  # head + 3 x 3 prompt tokens
    assert out.shape[1] == eos + (a.end - a.eos)
    assert torch.equal(out[0, :eos], cr[0, :eos])  # the head and the repeated prompt: the repeated encoding
    assert torch.equal(out[0, eos:], cb[0, b.eos:b.end])  # the whole tail: B's
    assert "A×3" in table


@pytest.mark.parametrize("family", LLM_FAMILIES)
def test_sampling_runs_with_the_swapped_conditioning(family):
    t = tiny(family)
    pos, neg = t.encode(A_TEXT), t.encode("")
    cond, _, _ = es_nodes.swap_conditioning(t.clip, A_TEXT, B_TEXT, model=t.model)
    cond = [[c, {**d, **t.cond_extra}] for c, d in cond]

    def sample(p):
        (out,) = comfy_nodes.common_ksampler(t.model, 0, 2, 2.0, "euler", "normal", p, neg,
                                             {"samples": torch.zeros(t.latent_shape(1))})
        return out["samples"]

    swapped = sample(cond)
    assert torch.isfinite(swapped).all() and not torch.equal(swapped, sample(pos))


# --------------------------------------------------------------------------- the token table
def test_table_labels_template_eos_and_tail():
    _, _, table = es_nodes.swap_conditioning(tiny("zimage").clip, A_TEXT, B_TEXT)
    lines = table.splitlines()
    assert any(line.split()[:2] == ["0–2", "<|im_start|>"] and "template" in line for line in lines), table
    assert any("<|im_end|>" in line and "[EOS]" in line and line.endswith("B 10") for line in lines), table
    assert any("assistant" in line and "padding" in line for line in lines), table
    assert "end-of-turn token after the prompt" in table
    assert "pooled_output: none (Z-Image takes no pooled vector)" in table
    _, _, table = es_nodes.swap_conditioning(tiny("qwen_image").clip, A_TEXT, B_TEXT)
    assert "cuts the chat template's head off its output" in table and "template  " not in table
    _, _, table = es_nodes.swap_conditioning(tiny("flux2").clip, A_TEXT, B_TEXT)
    assert any("<s> … [INST]" in line and "template" in line for line in table.splitlines()), table


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("family,label", [("qwen_image", "Qwen2.5-VL"), ("zimage", "Qwen3"), ("flux2", "Mistral-3")])
def test_sos_only_refused_on_llm(family, label):
    with pytest.raises(ValueError, match=rf"{label}, a decoder-only LLM, has no \[SOS\].*Use eos_only"):
        es_nodes.swap_conditioning(tiny(family).clip, A_TEXT, B_TEXT, construction="sos_only")


def test_lumina2_refused_no_state_after_the_prompt():
    with pytest.raises(ValueError, match=r"does not support Lumina 2's Gemma-2 text encoder: its tokenizer puts only "
                                         r"<bos> before the text and nothing after it.*ConditioningAverage"):
        es_nodes.swap_conditioning(tiny("lumina2").clip, A_TEXT, B_TEXT)


def test_hunyuan_image_qwen_encoder_is_not_taken_for_qwen_image():
    """HunyuanImage's text encoder subclasses Qwen-Image's: the registry gives it the Hunyuan families (its own
    templates and ByT5 entry), never Qwen-Image's (tests/unit/test_hunyuan.py covers the swap on them)."""
    clip = tiny("hunyuan_image21").clip
    assert [f.name for f in families.clip_families(clip)] == ["hunyuan_image21", "hunyuan_video15"]
    assert families.lookup_clip(tiny("qwen_image").clip).name == "qwen_image"


def test_key_only_refused_on_llm_families():
    t = tiny("qwen_image")
    with pytest.raises(ValueError, match="kv=key_only needs a UNet model"):
        es_nodes.swap_conditioning(t.clip, A_TEXT, B_TEXT, kv="key_only", model=t.model)


def test_nextdit_families_registered():
    for family, width in (("lumina2", 16), ("zimage", 16)):
        t = tiny(family)
        fam = families.lookup(t.model)
        assert fam.name == family and families.lookup_clip(t.clip) is fam and fam.context_width(t.model) == width
        assert [x.label for x in cl.model_layers(t.model, "TextLayerPatch").layers] == ["single.0", "single.1"]
