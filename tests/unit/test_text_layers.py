"""TextLayerPatch, TextLayerWordSubstitute, LoraLoaderTextLayers and TextLayerLocalize on tiny models (paper 2)."""

from __future__ import annotations

import ast
import inspect
import textwrap

import comfy.lora
import comfy.model_detection
import comfy.ops
import comfy.sd
import comfy.utils
import folder_paths
import pytest
import torch
from pa_support import count_rows, ksample, tiny
from prompt_anatomy.nodes.core import families, hooks, runs
from prompt_anatomy.nodes.core import layers as cl
from prompt_anatomy.nodes.text_layers import localize as tll
from prompt_anatomy.nodes.text_layers import lora as tl_lora
from prompt_anatomy.nodes.text_layers import nodes as tl_nodes
from prompt_anatomy.nodes.text_layers import patch as tl
from prompt_anatomy.nodes.text_layers import words as tl_words

SOURCE = 'a wooden sign that says "HELLO" in a park'
TARGET = 'a wooden sign that says "WORLD" in a park'


def model(family, dtype=None):
    return tiny(family, dtype=dtype)


@pytest.fixture(scope="module")
def conds():
    cache = {}

    def get(t):
        if t.family not in cache:
            cache[t.family] = (t.encode(SOURCE), t.encode("blurry"), t.encode(TARGET))
        return cache[t.family]

    return get


def dit_kw(t, cfg=None):
    return {"channels": t.latent_channels, "cfg": (1.0 if t.family == "flux" else 5.0) if cfg is None else cfg}


# ============================================================================== layer strings
class _Fake:
    pass


def real_sdxl_patcher():
    """A stand-in ModelPatcher for a full-size SDXL UNet built on the meta device (no weights) from the SDXL unet
    config in comfy/model_detection.py; the config must be detected as SDXL by ComfyUI itself."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    src = textwrap.dedent(inspect.getsource(comfy.model_detection.unet_config_from_diffusers_unet))
    node = next(n for n in ast.walk(ast.parse(src))
                if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "SDXL")
    config = eval(compile(ast.Expression(node.value), "model_detection", "eval"), {"dtype": torch.float16})
    model_config = comfy.model_detection.model_config_from_unet_config(dict(config))
    assert type(model_config).__name__ == "SDXL"
    config.pop("dtype")
    with torch.device("meta"):
        unet = UNetModel(**config, dtype=torch.float16, device="meta", operations=comfy.ops.disable_weight_init)
    p = _Fake()
    p.model = _Fake()
    p.model.diffusion_model, p.model.model_config = unet, model_config
    return p


def test_sdxl_paper_preset_is_cross_attention_55_56_of_70_on_full_size_sdxl():
    p = real_sdxl_patcher()
    ml = cl.model_layers(p, "test")
    assert ml.family.name == "sdxl" and len(ml.layers) == 70
    want = (("output", 2, 1), ("output", 2, 2))
    for spec in ("sdxl_paper", "auto", "55,56", "55-56", "output.2.1, output.2.2", "output.2.1-2", " 56 ; 55 "):
        assert cl.parse_layers(spec, ml) == want, spec
    assert ml.index(want[0]) == 55 and ml.index(want[1]) == 56
    assert "output.2.0-9 [54-63]" in ml.describe() and ml.describe().startswith("input.4.0-1 [0-1]")
    assert len(cl.parse_layers("output.2", ml)) == 10
    assert cl.layer_heads(p, ml, want[0]) == 20  # 1280 channels / 64 per head
    assert cl.weight_prefixes(ml, want[0]) == ("diffusion_model.output_blocks.2.1.transformer_blocks.1.attn2.",)


def test_paper_presets_refuse_other_architectures_with_the_same_layer_names():
    """#16.2: a 70-layer UNet that is not SDXL base (its config says SSD-1B), and an SD3-config MMDiT with SD3.5
    Medium's self-attention x-blocks, have the preset's layer names but not the paper's architecture."""
    p = real_sdxl_patcher()
    ssd1b = type("SSD1B", (type(p.model.model_config),), {})
    p.model.model_config = ssd1b.__new__(ssd1b)
    ml = cl.model_layers(p, "TextLayerPatch")
    assert len(ml.layers) == 70 and not ml.paper_arch
    for spec in ("auto", "sdxl_paper"):
        with pytest.raises(ValueError, match=r"was localized on SDXL base \(70 cross-attention layers\), and this model "
                                             r"\(SSD1B, 70 cross-attention layers\) is another architecture.*"
                                             r"Run TextLayerLocalize"):
            cl.parse_layers(spec, ml)
    assert cl.parse_layers("55,56", ml) == (("output", 2, 1), ("output", 2, 2))  # explicit layers still work
    sd3 = families.by_name("sd3")
    fake = _Fake()
    fake.model = _Fake()
    fake.model.model_config = _Fake()
    fake.model.model_config.unet_config = {"x_block_self_attn_layers": list(range(13))}
    assert not sd3.preset_arch(fake, 24)
    fake.model.model_config.unet_config = {"x_block_self_attn_layers": []}
    assert sd3.preset_arch(fake, 24) and not sd3.preset_arch(fake, 38)  # SD3 Medium yes, SD3.5 Large no


def test_sd3_paper_preset_is_joint_block_10():
    layers = tuple(cl.Layer(("joint", i), i, 0, f"joint_blocks.{i}") for i in range(24))  # SD3-medium: 24 joint blocks
    ml = cl.ModelLayers(families.by_name("sd3"), "dit", layers)
    assert cl.parse_layers("auto", ml) == cl.parse_layers("sd3_paper", ml) == cl.parse_layers("joint.10", ml) == \
        cl.parse_layers("10", ml) == (("joint", 10),)
    assert cl.parse_layers("joint.9-11", ml) == (("joint", 9), ("joint", 10), ("joint", 11))


def test_layer_strings_on_tiny_models(sd1, sdxl, flux):
    ml = cl.model_layers(sd1.model, "test")
    assert [x.label for x in ml.layers] == ["input.1.0", "input.3.0", "middle.0.0", "output.0.0", "output.1.0", "output.2.0",
                                           "output.3.0"]
    assert cl.parse_layers("", ml) == () and cl.parse_layers("  ", ml) == ()
    assert cl.parse_layers("output.2, 0, input.1.0", ml) == (("input", 1, 0), ("output", 2, 0))
    assert cl.parse_layers("3-4", ml) == (("output", 0, 0), ("output", 1, 0))
    mlx = cl.model_layers(sdxl.model, "test")
    assert cl.parse_layers("input.3", mlx) == (("input", 3, 0), ("input", 3, 1))
    mlf = cl.model_layers(flux.model, "test")
    assert mlf.layers == (("double", 0), ("single", 0))
    assert cl.parse_layers("single.0", mlf) == cl.parse_layers("1", mlf) == (("single", 0),)


@pytest.mark.parametrize("family,spec,msg", [
    ("sd1", "auto", r"'auto' has no preset for SD1\.x: paper 2 localized .* Run TextLayerLocalize"),
    ("sd2", "auto", r"no preset for SD2\.x"),
    ("flux", "auto", r"no preset for Flux\.1"),
    ("sd1", "sdxl_paper", r"preset 'sdxl_paper' is paper 2's SDXL preset, but this model is SD1\.x"),
    ("sdxl", "sdxl_paper", r"names output\.2\.1, output\.2\.2, which this model does not have"),
    ("sd3", "sd3_paper", r"names joint\.10, which this model does not have"),
    ("sd1", "7", r"'7' is out of range: indices run from 0 to 6\. Valid cross-attention layers of this SD1\.x "
                 r"model \(7\): input\.1\.0 \[0\], input\.3\.0 \[1\], middle\.0\.0 \[2\]"),
    ("sd1", "output.9.0", r"'output\.9\.0' is out of range: \(output, 9\) has no cross-attention"),
    ("sd1", "output.2.1", r"out of range: output\.2 has depths 0-0"),
    ("sd1", "joint.1", r"'joint\.1' is not a layer name"),
    ("sd1", "hello", r"'hello' is not a layer name.*Write them as block\.id\.depth"),
    ("sd3", "joint.2", r"'joint\.2' is out of range: joint blocks run from 0 to 1"),
    ("sd3", "double.0", r"'double\.0' is not a block name of this model"),
    ("flux", "single.1", r"out of range: single blocks run from 0 to 0"),
    ("sd1", "5-3", r"range 5-3 runs backwards"),
])
def test_bad_layer_strings_raise_listing_valid_layers(family, spec, msg):
    ml = cl.model_layers(tiny(family).model, "test")
    with pytest.raises(ValueError, match=msg):
        cl.parse_layers(spec, ml)


def test_heads_strings():
    assert tl.parse_heads("") is None and tl.parse_heads("all") is None
    assert tl.parse_heads("0-3,7") == (0, 1, 2, 3, 7)
    with pytest.raises(ValueError, match="heads: 'x' is not a head index"):
        tl.parse_heads("0,x")
    with pytest.raises(ValueError, match="lower index first"):
        tl.parse_heads("3-1")


def test_unsupported_family_raises():
    p = _Fake()
    p.model = _Fake()
    p.model.model_config = object()
    with pytest.raises(ValueError, match="TextLayerPatch does not support this model \\(object\\)"):
        cl.model_layers(p, "TextLayerPatch")


# ============================================================================== capture helpers
def _layer_of(to, calls):
    layer = cl.current_attn2_layer(to)
    if layer is not None:
        return layer
    value = cl.running_dit_layer(to, calls)
    return value if isinstance(value, tuple) else None


def spy_override(records):
    """Attention override recording the K/V of every cross-attention (UNet) / joint block (DiT) call."""
    calls = cl.CallCounter()

    def spy(call_next, func, *args, **kwargs):
        to = kwargs["transformer_options"]
        layer = _layer_of(to, calls)
        if layer is not None:
            records.append({
                "step": runs.current_step(to), "layer": layer, "k": args[1].clone(), "v": args[2].clone(),
                "roles": runs.chunk_roles(to), "txt": to.get(cl.TXT_LEN_KEY),
                "rows": args[1].shape[0],
            })
        return call_next(*args, **kwargs)

    return spy


def recording(model):
    """Clone with a K/V recorder that ends up *inside* any patch applied to the clone afterwards."""
    m = model.clone()
    runs.ensure_run_tracking(m)
    cl.ensure_layer_tracking(m, cl.model_layers(m, "test"))
    records = []
    hooks.chain_attention_override(m, spy_override(records))
    return m, records


def rows_of(rec, role):
    per = rec["rows"] // len(rec["roles"])
    return [r for j, ro in enumerate(rec["roles"]) if ro == role for r in range(j * per, (j + 1) * per)]


# ============================================================================== UNet injection
def _three_runs(t, conds, batch=1, steps=3, **patch):
    """K/V at every cross-attention of: A (source, unpatched), B (target, unpatched), P (source, patched)."""
    pos, neg, tgt = conds(t)
    base, rec = recording(t.model)
    ksample(base, pos, neg, steps=steps, batch=batch)
    a = list(rec)
    rec.clear()
    ksample(base, tgt, neg, steps=steps, batch=batch)
    b = list(rec)
    rec.clear()
    m, _ = tl.apply_text_layer_patch(base, tgt, **patch)
    ksample(m, pos, neg, steps=steps, batch=batch)
    p = list(rec)
    assert [(r["step"], r["layer"]) for r in p] == [(r["step"], r["layer"]) for r in a] == \
        [(r["step"], r["layer"]) for r in b]
    return a, b, p


@pytest.mark.parametrize("family,batch", [("sd1", 3), ("sdxl", 1), ("sd2", 2)])
def test_unet_selected_layers_see_the_target_every_other_layer_bit_identical(family, batch, conds):
    t = model(family)
    layers = cl.model_layers(t.model, "test").layers
    chosen = (layers[1], layers[-2])
    a, b, p = _three_runs(t, conds, batch=batch, steps=4, layers=chosen, start_percent=0.5, end_percent=0.75)
    patched_calls = 0
    for ra, rb, rp in zip(a, b, p, strict=True):
        assert ra["rows"] == rp["rows"] == 2 * batch  # no extra rows on UNets
        pos, neg = rows_of(rp, "positive"), rows_of(rp, "negative")
        assert len(pos) == len(neg) == batch
        inside = rp["step"] == 2 and rp["layer"] in chosen  # [0.5, 0.75) of 4 steps: step 2 only
        patched_calls += inside
        for key in ("k", "v"):
            assert torch.equal(rp[key][neg], ra[key][neg])  # rows=positive: negative rows untouched
            want = rb[key][rows_of(rb, "positive")] if inside else ra[key][rows_of(ra, "positive")]
            assert torch.equal(rp[key][pos], want), (rp["step"], rp["layer"], key)
    assert patched_calls == 2  # 2 layers x step 2


def test_unet_rows_positive_and_negative_patches_both(sd1, conds):
    layer = cl.model_layers(sd1.model, "test").layers[3]
    a, b, p = _three_runs(sd1, conds, steps=2, layers=(layer,), rows="positive_and_negative")
    for rb, rp in zip(b, p, strict=True):
        for key in ("k", "v"):
            if rp["layer"] == layer:
                target = rb[key][rows_of(rb, "positive")]
                assert torch.equal(rp[key][rows_of(rp, "negative")], target)
                assert torch.equal(rp[key][rows_of(rp, "positive")], target)


def test_unet_every_layer_patched_equals_sampling_the_target(sd1, conds):
    # SD1.x reads the text only in cross-attention: injecting the target everywhere is sampling the target
    pos, neg, tgt = conds(sd1)
    m, _ = tl.apply_text_layer_patch(sd1.model, tgt, "0-6")
    assert torch.equal(ksample(m, pos, neg, steps=2), ksample(sd1.model, tgt, neg, steps=2))


def test_unet_target_of_other_length_is_repeated_to_the_lcm(sd1):
    pos, neg = sd1.encode(SOURCE), sd1.encode("")
    long_target = sd1.encode(", ".join(['a sign that says "WORLD"'] * 12))
    assert long_target[0][0].shape[1] == 154
    layer = ("output", 1, 0)
    seen = []
    m, _ = tl.apply_text_layer_patch(sd1.model, long_target, (layer,))

    def rec(n, context, value, extra):
        if (extra["block"][0], extra["block"][1], extra["block_index"]) == layer:
            seen.append((context.clone(), runs.row_mask(extra, context.shape[0])))
        return n, context, value

    m.set_model_attn2_patch(rec)  # after ours: sees what the attention gets
    ksample(m, pos, neg, steps=2)
    ctx, mask = seen[0]
    assert ctx.shape[1] == 154  # source 77 repeated twice; the negative rows are repeated too (same attention)
    assert torch.equal(ctx[mask][0], long_target[0][0][0])
    assert torch.equal(ctx[~mask][0], neg[0][0][0].repeat(2, 1))


def test_unet_heads_subset_mixes_projected_heads(sd1, conds):
    t = sd1
    layer = ("output", 0, 0)
    heads = (1,)
    a, b, p = _three_runs(t, conds, layers=(layer,), heads="1")
    n_heads = cl.layer_heads(t.model, cl.model_layers(t.model, "test"), layer)
    assert n_heads == 2
    hit = 0
    for ra, rb, rp in zip(a, b, p, strict=True):
        pos = rows_of(rp, "positive")
        for key in ("k", "v"):
            if rp["layer"] != layer:
                assert torch.equal(rp[key], ra[key])
                continue
            hit += 1
            d = rp[key].shape[-1] // n_heads
            for h in range(n_heads):
                cols = slice(h * d, (h + 1) * d)
                want = (rb if h in heads else ra)[key][rows_of(rb, "positive")][..., cols]
                torch.testing.assert_close(rp[key][pos][..., cols], want, rtol=0, atol=1e-5)
            assert torch.equal(rp[key][rows_of(rp, "negative")], ra[key][rows_of(ra, "negative")])
    assert hit == 2 * 3


def test_unet_strength_blends_keys_and_values(sd1, conds):
    layer = ("middle", 0, 0)
    a, b, p = _three_runs(sd1, conds, steps=2, layers=(layer,), strength=0.25)
    for ra, rb, rp in zip(a, b, p, strict=True):
        if rp["layer"] == layer:
            pos = rows_of(rp, "positive")
            want = torch.lerp(ra["k"][pos], rb["k"][pos], 0.25)
            torch.testing.assert_close(rp["k"][pos], want, rtol=0, atol=1e-5)


NOOPS = [{"layers": ""}, {"layers": "0", "start_percent": 1.0}, {"layers": "0", "strength": 0.0},
         {"layers": "0", "start_percent": 0.5, "end_percent": 0.5}]


@pytest.mark.parametrize("family", ["sd1", "sd3", "flux"])
def test_no_layers_or_no_steps_is_bit_identical_with_no_extra_rows(family, conds):
    t = model(family)
    pos, neg, tgt = conds(t)
    plain, ref_rows = count_rows(t.model)
    ref = ksample(plain, pos, neg, steps=2, **dit_kw(t))
    for kw in NOOPS:
        m, report = tl.apply_text_layer_patch(t.model, tgt, **kw)
        counted, counter = count_rows(m)
        assert torch.equal(ksample(counted, pos, neg, steps=2, **dit_kw(t)), ref), kw
        assert counter == ref_rows, kw
        assert "Nothing to patch" in report, kw


@pytest.mark.parametrize("family", ["sd1", "sd3"])
def test_patched_run_leaves_no_trace_and_plain_clone_unaffected(family, conds):
    t = model(family)
    pos, neg, tgt = conds(t)
    kw = dit_kw(t)
    ref = ksample(t.model, pos, neg, steps=2, **kw)
    m, _ = tl.apply_text_layer_patch(t.model, tgt, "1")
    plain = t.model.clone()  # made after the patch: must not see it
    patched = ksample(m, pos, neg, steps=2, **kw)
    assert not torch.equal(patched, ref)
    assert torch.equal(ksample(t.model, pos, neg, steps=2, **kw), ref)  # patched run, then unpatched run
    assert torch.equal(ksample(plain, pos, neg, steps=2, **kw), ref)
    assert torch.equal(ksample(m, pos, neg, steps=2, **kw), patched)  # and the patch is repeatable
    assert tl.ACTIVE_KEY not in t.model.model_options.get("transformer_options", {})


def test_reapplying_replaces_the_earlier_patch(sd1, conds):
    pos, neg, tgt = conds(sd1)
    once, _ = tl.apply_text_layer_patch(sd1.model, tgt, "2")
    twice, _ = tl.apply_text_layer_patch(tl.apply_text_layer_patch(sd1.model, tgt, "5")[0], tgt, "2")
    assert torch.equal(ksample(once, pos, neg, steps=2), ksample(twice, pos, neg, steps=2))
    assert len([p for p in twice.model_options["transformer_options"]["patches"]["attn2_patch"]
                if getattr(p, hooks.KEY_ATTR, None) == tl.HOOK_KEY]) == 1
    off, _ = tl.apply_text_layer_patch(once, tgt, "")  # an empty patch on top switches the earlier one off
    assert torch.equal(ksample(off, pos, neg, steps=2), ksample(sd1.model, pos, neg, steps=2))


# ------------------------------------------------------------------------------ UNet composition
def write_lora(path, model_patcher, targets, rank=2, seed=0, extra=None):
    """A kohya-format LoRA ('lora_unet_' + module path with underscores) on the given diffusion-model modules."""
    import safetensors.torch

    g = torch.Generator().manual_seed(seed)
    sd = model_patcher.model.state_dict()
    state = {}
    for module in targets:
        out_f, in_f = sd[f"diffusion_model.{module}.weight"].shape
        name = "lora_unet_" + module.replace(".", "_")
        state[f"{name}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) * 0.3
        state[f"{name}.lora_up.weight"] = torch.randn(out_f, rank, generator=g) * 0.3
        state[f"{name}.alpha"] = torch.tensor(float(rank))
    state.update(extra or {})
    safetensors.torch.save_file(state, str(path))
    return state


def test_composes_with_lora_freeu_and_order_does_not_matter(sd1, conds, tmp_path):
    from comfy_extras.nodes_freelunch import FreeU

    pos, neg, tgt = conds(sd1)
    lora_sd = write_lora(tmp_path / "l.safetensors", sd1.model,
                         ["output_blocks.1.1.transformer_blocks.0.attn2.to_k",
                          "input_blocks.1.1.transformer_blocks.0.attn1.to_q"])
    layer = ("output", 1, 0)

    def lora(m):
        return comfy.sd.load_lora_for_models(m, None, lora_sd, 1.0, 0.0)[0]

    def freeu(m):
        return FreeU().patch(m, 1.3, 1.4, 0.9, 0.2)[0]

    def patch(m):
        return tl.apply_text_layer_patch(m, tgt, (layer,))[0]

    outs = [ksample(patch(freeu(lora(sd1.model))), pos, neg, steps=2),
            ksample(lora(patch(freeu(sd1.model))), pos, neg, steps=2)]
    assert torch.equal(outs[0], outs[1])
    alone = ksample(freeu(lora(sd1.model)), pos, neg, steps=2)
    assert not torch.equal(outs[0], alone)
    # with LoRA + FreeU the selected layer still sees the target: K/V equal the target run's (same LoRA weights)
    base, rec = recording(freeu(lora(sd1.model)))
    ksample(base, tgt, neg, steps=2)
    b = [r for r in rec if r["layer"] == layer]
    rec.clear()
    ksample(patch(base), pos, neg, steps=2)
    p = [r for r in rec if r["layer"] == layer]
    for rb, rp in zip(b, p, strict=True):
        assert torch.equal(rp["k"][rows_of(rp, "positive")], rb["k"][rows_of(rb, "positive")])


def _ipadapter_like_replace(seen):
    """An attn2 replace like IPAdapter's: computes the attention itself (no transformer_options)."""
    from comfy.ldm.modules.attention import optimized_attention

    def replace(q, k, v, extra_options):
        seen.append((k.clone(), runs.row_mask(extra_options, k.shape[0])))
        return optimized_attention(q, k, v, extra_options["n_heads"])

    return replace


def test_composes_with_an_attn2_replace_already_present(sd1, conds):
    pos, neg, tgt = conds(sd1)
    layer = ("output", 2, 0)
    seen_b, seen_p = [], []
    base_b = sd1.model.clone()
    base_b.set_model_attn2_replace(_ipadapter_like_replace(seen_b), "output", 2)
    ksample(base_b, tgt, neg, steps=2)
    base_p = sd1.model.clone()
    base_p.set_model_attn2_replace(_ipadapter_like_replace(seen_p), "output", 2)
    m, _ = tl.apply_text_layer_patch(base_p, tgt, (layer,))
    ksample(m, pos, neg, steps=2)
    assert len(seen_p) == len(seen_b) == 2
    for (kb, mb), (kp, mp) in zip(seen_b, seen_p, strict=True):  # the replace got its K from our target context
        assert torch.equal(kp[mp], kb[mb])
    # a heads subset needs the attention hook, which the replace bypasses: a clear error instead of a no-op
    m, _ = tl.apply_text_layer_patch(base_p, tgt, (layer,), heads="0")
    with pytest.raises(ValueError, match="heads: .*could not reach the attention of layer output.2.0.*IPAdapter"):
        ksample(m, pos, neg, steps=2)


# ============================================================================== SD3 / Flux patching
def dit_runs(t, conds, batch=1, cfg=None, steps=4, unpatched=True, **patch):
    """Unpatched run A (records), and patched run P with records inside (post-swap) and outside (pre-swap)."""
    pos, neg, tgt = conds(t)
    kw = dit_kw(t, cfg)
    base, rec_a = recording(t.model)
    a = []
    if unpatched:
        ksample(base, pos, neg, steps=steps, batch=batch, **kw)
        a = list(rec_a)
        rec_a.clear()
    m, _ = tl.apply_text_layer_patch(base, tgt, **patch)
    m = m.clone()
    outer = []
    hooks.chain_attention_override(m, spy_override(outer))
    counted, counter = count_rows(m)
    ksample(counted, pos, neg, steps=steps, batch=batch, **kw)
    return a, list(rec_a), outer, counter


@pytest.mark.parametrize("family,batch", [("sd3", 1), ("sd3", 3), ("flux", 1), ("flux", 3)])
def test_dit_text_kv_of_selected_blocks_come_from_the_target_rows(family, batch, conds):
    t = model(family)
    blocks = cl.model_layers(t.model, "test").layers
    chosen = blocks[1]
    a, inner, outer, counter = dit_runs(t, conds, batch=batch, layers=(chosen,), start_percent=0.5)
    assert [(r["step"], r["layer"]) for r in inner] == [(r["step"], r["layer"]) for r in outer]
    calls_per_step = len(a) // 4
    swapped = 0
    for i, (ri, ro) in enumerate(zip(inner, outer, strict=True)):
        ra = a[i] if i < len(a) else None
        if ro["step"] < 2:  # before start: exactly the unpatched run, no extra rows
            assert ro["rows"] == ra["rows"] and torch.equal(ro["k"], ra["k"]) and torch.equal(ro["v"], ra["v"])
            assert None not in ro["roles"]
            continue
        targets = rows_of(ro, None)
        sources = rows_of(ro, "positive")
        assert len(targets) == len(sources) == batch  # one extra row per image
        if ro["layer"] != chosen:
            assert torch.equal(ri["k"], ro["k"]) and torch.equal(ri["v"], ro["v"])
            continue
        swapped += 1
        txt = ro["txt"]
        for key in ("k", "v"):
            tok = 2 if family == "flux" else 1
            pre, post = ro[key], ri[key]
            for s, g in zip(sources, targets, strict=True):  # image b takes the text K/V of target row b
                assert torch.equal(post[s].narrow(tok - 1, 0, txt), pre[g].narrow(tok - 1, 0, txt))
                assert torch.equal(post[s].narrow(tok - 1, txt, pre.shape[tok] - txt),
                                   pre[s].narrow(tok - 1, txt, pre.shape[tok] - txt))
            others = [r for r in range(pre.shape[0]) if r not in sources]
            assert torch.equal(post[others], pre[others])  # negative and target rows untouched
    assert swapped == 2 * calls_per_step // len(blocks)
    rows_per_step = sum(r["rows"] for r in a[:calls_per_step] if r["layer"] == blocks[0])
    assert counter["rows"] == 4 * rows_per_step + 2 * batch  # + one row per image on the 2 patched steps only


def test_dit_target_rows_are_the_target_prompts_own_pass(sd3, conds):
    # at step 0 the latent is the same noise for every run: the appended rows must compute exactly what an
    # unpatched run of the target prompt computes in every block
    pos, neg, tgt = conds(sd3)
    base, rec = recording(sd3.model)
    ksample(base, tgt, neg, steps=2, channels=16, cfg=5.0)
    b = [r for r in rec if r["step"] == 0]
    rec.clear()
    m, _ = tl.apply_text_layer_patch(base, tgt, "joint.1", end_percent=0.5)
    m = m.clone()
    outer = []
    hooks.chain_attention_override(m, spy_override(outer))
    ksample(m, pos, neg, steps=2, channels=16, cfg=5.0)
    p = [r for r in outer if r["step"] == 0]
    assert len(p) == len(b) == 2
    for rb, rp in zip(b, p, strict=True):
        for key in ("k", "v"):
            torch.testing.assert_close(rp[key][rows_of(rp, None)], rb[key][rows_of(rb, "positive")], rtol=1e-5,
                                       atol=1e-5)


def test_dit_rows_positive_and_negative_share_the_target_rows(sd3, conds):
    a, inner, outer, counter = dit_runs(sd3, conds, steps=2, unpatched=False, layers="joint.0",
                                        rows="positive_and_negative")
    for ri, ro in zip(inner, outer, strict=True):
        assert len(rows_of(ro, None)) == 1  # one target row per image, shared by both branches
        if ro["layer"] == ("joint", 0):
            g = rows_of(ro, None)[0]
            for r in rows_of(ro, "positive") + rows_of(ro, "negative"):
                assert torch.equal(ri["k"][r, :ro["txt"]], ro["k"][g, :ro["txt"]])


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_dit_heads_subset_and_strength(family, conds):
    t = model(family)
    block = cl.model_layers(t.model, "test").layers[0]
    a, inner, outer, _ = dit_runs(t, conds, steps=2, unpatched=False, layers=(block,), heads="1", strength=0.5)
    n_heads = cl.layer_heads(t.model, cl.model_layers(t.model, "test"), block)
    seen = 0
    for ri, ro in zip(inner, outer, strict=True):
        if ro["layer"] != block:
            continue
        seen += 1
        s, g, txt = rows_of(ro, "positive")[0], rows_of(ro, None)[0], ro["txt"]
        for key in ("k", "v"):
            pre, post = ro[key], ri[key]
            if family == "flux":  # (B, H, L, D)
                heads = [pre[:, h] for h in range(n_heads)], [post[:, h] for h in range(n_heads)]
            elif pre.ndim == 4:  # SD3 v: (B, L, H, D)
                heads = [pre[:, :, h] for h in range(n_heads)], [post[:, :, h] for h in range(n_heads)]
            else:  # SD3 k: (B, L, H*D)
                d = pre.shape[-1] // n_heads
                heads = ([pre[..., h * d:(h + 1) * d] for h in range(n_heads)],
                         [post[..., h * d:(h + 1) * d] for h in range(n_heads)])
            (pre0, pre1), (post0, post1) = heads[0][:2], heads[1][:2]
            assert torch.equal(post0[s], pre0[s])
            torch.testing.assert_close(post1[s, :txt], torch.lerp(pre1[s, :txt], pre1[g, :txt], 0.5))
            assert torch.equal(post1[s, txt:], pre1[s, txt:])
    assert seen == 2  # 2 steps, one model call each (flux: cfg 1; sd3: both branches batched)


def test_dit_target_of_other_token_length_raises(sd3):
    pos, neg = sd3.encode(SOURCE), sd3.encode("")
    long_target = sd3.encode(", ".join(['a sign that says "WORLD"'] * 12))
    m, _ = tl.apply_text_layer_patch(sd3.model, long_target, "joint.0")
    with pytest.raises(ValueError, match="encodes to 154 text tokens but the prompt it edits has 77"):
        ksample(m, pos, neg, steps=1, channels=16)


def test_dit_block_replaced_without_attention_hook_raises(flux, conds):
    pos, neg, tgt = conds(flux)
    base = flux.model.clone()

    def replace(args, extra):  # a foreign replace that never runs the original block's attention
        return {"img": args["img"], "txt": args["txt"]}

    base.set_model_patch_replace(replace, "dit", "double_block", 0)
    m, _ = tl.apply_text_layer_patch(base, tgt, "double.0")
    with pytest.raises(ValueError, match="could not reach the attention of double.0"):
        ksample(m, pos, neg, steps=1, channels=16, cfg=1.0)


def test_dit_composes_with_a_lora_and_a_chained_block_replace(flux, conds):
    pos, neg, tgt = conds(flux)
    lora = {"diffusion_model.double_blocks.0.img_attn.qkv": ("diff", (torch.randn(384, 128) * 0.05,))}
    base = flux.model.clone()
    base.add_patches(lora, 1.0)
    calls = []

    def replace(args, extra):
        calls.append(args["img"].shape[0])
        return extra["original_block"](args)

    base.set_model_patch_replace(replace, "dit", "single_block", 0)
    m, _ = tl.apply_text_layer_patch(base, tgt, "single.0", start_percent=0.5)
    out = ksample(m, pos, neg, steps=4, channels=16, cfg=1.0)
    assert torch.isfinite(out).all()
    assert calls == [1, 1, 2, 2]  # the foreign replace still runs; the target row only on the patched steps
    assert not torch.equal(out, ksample(base, pos, neg, steps=4, channels=16, cfg=1.0))


@pytest.mark.parametrize("family", ["sd1", "sd3"])
def test_bfloat16(family):
    t = model(family, dtype=torch.bfloat16)
    pos, neg, tgt = t.encode(SOURCE), t.encode(""), t.encode(TARGET)
    base, rec = recording(t.model)
    m, _ = tl.apply_text_layer_patch(base, tgt, "1", heads="0")
    out = ksample(m, pos, neg, steps=2, **dit_kw(t))
    assert torch.isfinite(out).all()
    assert rec and all(r["k"].dtype == torch.bfloat16 for r in rec)
    assert not torch.equal(out, ksample(t.model, pos, neg, steps=2, **dit_kw(t)))


def test_bad_settings_raise(sd1, sdxl, conds):
    pos, neg, tgt = conds(sd1)
    with pytest.raises(ValueError, match=r"start_percent \(0.8\) must not be above end_percent \(0.2\)"):
        tl.apply_text_layer_patch(sd1.model, tgt, "0", start_percent=0.8, end_percent=0.2)
    with pytest.raises(ValueError, match="heads: 2 out of range: layer input.1.0 has 2 heads"):
        tl.apply_text_layer_patch(sd1.model, tgt, "0", heads="0-2")
    with pytest.raises(ValueError, match="rows must be one of"):
        tl.apply_text_layer_patch(sd1.model, tgt, "0", rows="negative")
    with pytest.raises(ValueError, match="target: the edited prompt's embedding has 128 channels but this SD1.x "
                                         "model takes 64"):
        tl.apply_text_layer_patch(sd1.model, sdxl.encode(TARGET), "0")
    with pytest.raises(ValueError, match="target: the conditioning has 2 entries"):
        tl.apply_text_layer_patch(sd1.model, tgt + tgt, "0")
    with pytest.raises(ValueError, match="target: the conditioning is empty"):
        tl.apply_text_layer_patch(sd1.model, [], "0")


def test_node_outputs_model_and_report(sd3, conds):
    pos, neg, tgt = conds(sd3)
    out = tl_nodes.TextLayerPatch.execute(sd3.model, tgt, "joint.1", 0.0, 1.0)
    m, report = out.args
    assert "SD3 · MMDiT/Flux patching" in report and "layers: joint.1 [1] of 2 attention blocks" in report
    assert "steps: from 0.000 to 1.000" in report and out.ui.as_dict()["text"] == (report,)
    assert not torch.equal(ksample(m, pos, neg, steps=2, channels=16), ksample(sd3.model, pos, neg, steps=2, channels=16))


# ============================================================================== word substitution
def test_word_substitution_rules():
    rules = tl_words.parse_replacements("hello => world\n\n# comment\nbad word=>nice word\nBye => ")
    assert rules == [("hello", "world"), ("bad word", "nice word"), ("Bye", "")]
    text, counts = tl_words.substitute_words('"HELLO" Hello hello, othello, bad  word; goodbye bye!', rules)
    assert text == '"WORLD" World world, othello, nice word; goodbye !'
    assert counts == [3, 1, 1]
    swapped, counts = tl_words.substitute_words("cat dog cats", tl_words.parse_replacements("cat => dog\ndog => cat"))
    assert swapped == "dog cat cats" and counts == [1, 1]


@pytest.mark.parametrize("text,msg", [
    ("hello world", r"replacements line 1 \('hello world'\): write exactly one 'word => replacement'"),
    ("a => b\n => x", r"line 2 \('=> x'\): the word before '=>' is empty"),
    ("a => b => c", r"line 1 .*exactly one"),
    ("Cat => dog\n\ncat => mouse", r"line 3 \('cat => mouse'\): 'cat' is already replaced on line 1"),
])
def test_bad_replacement_lines_raise_naming_the_line(text, msg):
    with pytest.raises(ValueError, match=msg):
        tl_words.parse_replacements(text)


def test_word_substitution_node_encodes_both(sd1):
    out = tl_nodes.TextLayerWordSubstitute.execute(sd1.clip, SOURCE, "hello => world\nmoon => sun")
    source, target, text, report = out.args
    assert text == TARGET
    assert torch.equal(source[0][0], sd1.encode(SOURCE)[0][0]) and torch.equal(target[0][0], sd1.encode(TARGET)[0][0])
    assert "'hello' => 'world': replaced 1×" in report and "'moon' => 'sun': not in the prompt" in report
    same = tl_nodes.TextLayerWordSubstitute.execute(sd1.clip, SOURCE, "moon => sun").args
    assert same[1] is same[0] and "None of the words occurs" in same[3]
    with pytest.raises(ValueError, match="remove every word of the prompt, so the target prompt is empty"):
        tl_nodes.TextLayerWordSubstitute.execute(sd1.clip, "hello", "hello =>")


# ============================================================================== localized LoRA
SD1_TARGETS = ["output_blocks.1.1.transformer_blocks.0.attn2.to_k", "output_blocks.1.1.transformer_blocks.0.attn2.to_v",
               "output_blocks.1.1.transformer_blocks.0.attn1.to_q", "input_blocks.1.1.transformer_blocks.0.attn2.to_k",
               "middle_block.1.transformer_blocks.0.ff.net.2"]


def test_lora_keeps_only_the_selected_layers_attention(sd1, conds, tmp_path):
    pos, neg, _ = conds(sd1)
    te = {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(4, 2)}
    lora_sd = write_lora(tmp_path / "full.safetensors", sd1.model, SD1_TARGETS, extra=te)
    m, report = tl_lora.load_text_layer_lora(sd1.model, lora_sd, "output.1.0, input.1", 0.8, name="full")
    kept = {k for k in m.patches if k not in sd1.model.patches}
    assert kept == {"diffusion_model.output_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                    "diffusion_model.output_blocks.1.1.transformer_blocks.0.attn2.to_v.weight",
                    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"}
    assert "kept 3 of 5 diffusion-model weights" in report
    assert "input.1.0 [0]: 1 weights" in report and "output.1.0 [4]: 2 weights" in report
    # identical to core LoRA loading of a file that holds only those weights
    names = ["lora_unet_" + SD1_TARGETS[i].replace(".", "_") for i in (0, 1, 3)]
    only = {k: v for k, v in lora_sd.items() if k.split(".")[0] in names}
    assert len(only) == 9
    core = comfy.sd.load_lora_for_models(sd1.model, None, only, 0.8, 0.0)[0]
    assert torch.equal(ksample(m, pos, neg, steps=2), ksample(core, pos, neg, steps=2))


def test_lora_node_loads_from_the_loras_folder(sd1, tmp_path, monkeypatch):
    write_lora(tmp_path / "pa_test_lora.safetensors", sd1.model, SD1_TARGETS[:2])
    paths, exts = folder_paths.folder_names_and_paths["loras"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(tmp_path)] + list(paths), exts))
    out = tl_nodes.LoraLoaderTextLayers.execute(sd1.model, "pa_test_lora.safetensors", 1.0, "4")
    assert "kept 2 of 2" in out.args[1] and out.ui.as_dict()["text"] == (out.args[1],)
    with pytest.raises(ValueError, match=r"none of the 2 weights pa_test_lora.safetensors patches lies in the "
                                         r"selected layers \(middle.0.0\); it patches output_blocks.1"):
        tl_nodes.LoraLoaderTextLayers.execute(sd1.model, "pa_test_lora.safetensors", 1.0, "middle.0")
    assert tl_nodes.LoraLoaderTextLayers.execute(sd1.model, "pa_test_lora.safetensors", 0.0, "4").args[0] is sd1.model
    empty = tl_nodes.LoraLoaderTextLayers.execute(sd1.model, "pa_test_lora.safetensors", 1.0, "")  # the node's default
    assert empty.args[0] is sd1.model and "layers: none selected, so nothing of the LoRA is applied" in empty.args[1]


def test_lora_for_another_model_and_dit_blocks(sd1, flux, tmp_path):
    lora_sd = write_lora(tmp_path / "l.safetensors", sd1.model, SD1_TARGETS[:1])
    with pytest.raises(ValueError, match="no weight of LoRA matches this Flux.1 model"):
        tl_lora.load_text_layer_lora(flux.model, lora_sd, "double.0")
    dit = {}
    for module in ("double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.proj", "double_blocks.0.img_mlp.0",
                   "single_blocks.0.linear1"):
        w = flux.model.model.state_dict()[f"diffusion_model.{module}.weight"]
        dit[f"diffusion_model.{module}.lora_up.weight"] = torch.randn(w.shape[0], 2) * 0.1
        dit[f"diffusion_model.{module}.lora_down.weight"] = torch.randn(2, w.shape[1]) * 0.1
    m, report = tl_lora.load_text_layer_lora(flux.model, dit, "double.0")
    assert "kept 2 of 4" in report
    assert {k for k in m.patches if k not in flux.model.patches} == {
        "diffusion_model.double_blocks.0.img_attn.qkv.weight", "diffusion_model.double_blocks.0.txt_attn.proj.weight"}
    assert "MLP part is kept too" in tl_lora.load_text_layer_lora(flux.model, dit, "single.0")[1]


# ============================================================================== localization
def test_score_edit_definition():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(1, 4, 8, 8, generator=g)
    t = s.clone()
    t[:, :, 2:4, 2:6] += 3.0  # the "text region"
    toward, moved, region = tll.score_edit(s, t, t)
    assert toward == pytest.approx(1.0) and moved == 0.0 and region == pytest.approx(8 / 64)
    assert tll.score_edit(s, t, s)[:2] == (0.0, 0.0)
    half = s + 0.5 * (t - s)
    assert tll.score_edit(s, t, half)[0] == pytest.approx(0.5)
    noisy = s + 0.3 * torch.randn(s.shape, generator=g)
    assert tll.score_edit(s, t, noisy)[1] > 0.05
    with pytest.raises(ValueError, match="same image"):
        tll.score_edit(s, s, s)


def test_candidate_strings(sd1):
    ml = cl.model_layers(sd1.model, "test")
    assert len(tll.parse_candidates("", ml)) == 7
    assert tll.parse_candidates("each 5-6; 0,1\n0,1; middle.0", ml) == [
        (("output", 2, 0),), (("output", 3, 0),), (("input", 1, 0), ("input", 3, 0)), (("middle", 0, 0),)]
    with pytest.raises(ValueError, match="names no layer"):
        tll.parse_candidates(" ; ", ml)
    pairs = tll.parse_candidates("pairs 6, 0, 2", ml)  # one candidate per pair, in forward order
    assert pairs == [(ml.layers[0], ml.layers[2]), (ml.layers[0], ml.layers[6]), (ml.layers[2], ml.layers[6])]
    every = tll.parse_candidates("each all; pairs all", ml)
    assert every[:7] == [(layer,) for layer in ml.layers] and len(every) == 7 + 21
    assert len({frozenset(c) for c in every[7:]}) == 21 and all(len(c) == 2 for c in every[7:])
    with pytest.raises(ValueError, match="'pairs 5' names 1 layer.*a pair needs two"):
        tll.parse_candidates("pairs 5", ml)


def test_pairs_of_too_many_layers_are_refused_before_sampling(sd1, monkeypatch):
    ml = cl.model_layers(sd1.model, "test")
    monkeypatch.setattr(tll, "MAX_PAIR_LAYERS", 3)
    assert len(tll.parse_candidates("pairs 0-2", ml)) == 3
    with pytest.raises(ValueError, match="names 4 layers, which makes 6 pairs.*at most 3 layers"):
        tll.parse_candidates("pairs 0-3", ml)


def test_ocr_table_says_when_the_best_layers_are_ties_at_zero():
    def cand(label, score):
        o = {"f1": 0.0, "lev": 1.0, "bg_ssim": 0.9, "score": score, "text": "CAT"}
        return tll.CandidateScore((label,), label, "", 0.0, 0.0, ocr=o)

    scores = [cand("input.1.0", 0.0), cand("output.2.0", 0.4), cand("output.3.0", 0.0)]
    table = tll.format_table(None, scores, 2, "header", 0.0, 0.5, "input.1.0, output.2.0", target_words="BOX")
    assert "note: 1 of the top 2 scored 0" in table and "'pairs all'" in table
    clear = tll.format_table(None, scores, 1, "header", 0.0, 0.5, "output.2.0", target_words="BOX")
    assert "note:" not in clear


def test_localize_runs_algorithm_1(sd1, conds):
    pos, neg, tgt = conds(sd1)
    latent = {"samples": torch.zeros(1, 4, 4, 4)}
    calls = []
    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: calls.append((value, total)))
    try:
        out = tl_nodes.TextLayerLocalize.execute(sd1.model, pos, tgt, neg, latent, seed=3, steps=2, cfg=5.0,
                                            candidates="each 5-6; 0-6", top_k=2)
    finally:
        comfy.utils.set_progress_bar_global_hook(old)
    chart, table, best, latents, best_start = out.args
    assert best_start == 0.0  # no start search: start_percent
    assert calls == [(i, 5) for i in range(1, 6)]  # one bar over source, target and the 3 candidates
    assert chart.ndim == 4 and chart.shape[0] == 1 and chart.shape[-1] == 3 and 0 <= chart.min() <= chart.max() <= 1
    samples = latents["samples"]
    assert samples.shape == (5, 4, 4, 4)
    src, tgt_l = samples[0:1], samples[1:2]
    assert torch.equal(src, ksample(sd1.model, pos, neg, steps=2, seed=3))
    ml = cl.model_layers(sd1.model, "test")
    cands = [(ml.layers[5],), (ml.layers[6],), ml.layers]
    m, _ = tl.apply_text_layer_patch(sd1.model, tgt, cands[0])  # a candidate = TextLayerPatch with only it
    assert torch.equal(samples[2:3], ksample(m, pos, neg, steps=2, seed=3))
    assert torch.equal(samples[4:5], tgt_l)  # every layer patched = the target image ...
    scores = [tll.score_edit(src, tgt_l, samples[2 + i:3 + i]) for i in range(3)]
    assert scores[2][0] == pytest.approx(1.0, abs=1e-6)  # ... so it reproduces all of the change
    ranked = sorted(range(3), key=lambda i: -(scores[i][0] - scores[i][1]))
    want = set(cands[ranked[0]]) | set(cands[ranked[1]])
    assert best == ", ".join(cl.layer_label(layer) for layer in ml.layers if layer in want)
    rows = [line for line in table.splitlines() if line[:4].strip().isdigit()]
    assert [r.split()[0] for r in rows] == ["1", "2", "3"] and rows[0].endswith(" *") and rows[1].endswith(" *")
    assert f"{scores[ranked[0]][0]:.3f}" in rows[0] and not rows[2].endswith("*")
    assert "paper 2 used OCR" in table and f"best layers (top 2): {best}" in table
    assert out.ui["text"] == (table,) and len(out.ui["images"]) == 1


def test_localize_refuses_identical_prompts_and_empty_ranges(sd1, conds):
    pos, neg, _ = conds(sd1)
    latent = {"samples": torch.zeros(1, 4, 4, 4)}
    with pytest.raises(ValueError, match="give the same image"):
        tll.localize(sd1.model, pos, pos, neg, latent, steps=1, candidates="0")
    with pytest.raises(ValueError, match="leave no step to patch"):
        tll.localize(sd1.model, pos, pos, neg, latent, steps=1, candidates="0", start_percent=1.0)
    with pytest.raises(ValueError, match="region_threshold must be in"):
        tll.localize(sd1.model, pos, pos, neg, latent, steps=1, region_threshold=0.0)


def test_localize_on_dit(flux, conds):
    pos, neg, tgt = conds(flux)
    scores, src, tgt_l, patched, table, best, k = tll.localize(
        flux.model, pos, tgt, neg, {"samples": torch.zeros(1, 16, 4, 4)}, steps=2, cfg=1.0)
    assert [s.layers for s in scores] == [(("double", 0),), (("single", 0),)] and len(patched) == 2
    assert best in ("double.0", "single.0") and "Flux.1 · 2 candidates of 2 attention blocks" in table


def test_node_schemas_are_registered_with_tooltips():
    import prompt_anatomy.nodes as pack

    mine = [tl_nodes.TextLayerPatch, tl_nodes.TextLayerWordSubstitute, tl_nodes.LoraLoaderTextLayers, tl_nodes.TextLayerLocalize,
            tl_nodes.TextLayerLoraTrain]
    assert all(node in pack.all_nodes() for node in mine)
    for node in mine:
        schema = node.define_schema()
        assert schema.category == "prompt_anatomy/text_layers" and schema.description
        assert all(i.tooltip for i in schema.inputs), schema.node_id
        info = node.GET_NODE_INFO_V1()  # what /object_info serves
        assert info["name"] == schema.node_id


# ============================================================================== Algorithm 1 with OCR
OCR_FONTS = ["/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
             "/usr/share/fonts/truetype/liberation/LiberationSans-Bold.ttf"]
OCR_FONT = next((p for p in OCR_FONTS if __import__("os").path.exists(p)), None)


def word_image(text, *, shift=0.0, size=64):
    """[1, size, size, 3] IMAGE: ``text`` in black on a smooth gradient (``shift`` changes the background)."""
    from PIL import Image, ImageDraw, ImageFont

    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    rgb = torch.stack([0.6 + 0.3 * x, 0.7 + 0.2 * y - shift, 0.9 - 0.2 * x * y], -1).clamp(0, 1)
    img = Image.fromarray((rgb * 255).round().to(torch.uint8).numpy())
    draw = ImageDraw.Draw(img)
    font = ImageFont.truetype(OCR_FONT, 14)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text(((size - (right - left)) / 2 - left, (size - (bottom - top)) / 2 - top), text, font=font, fill=(10, 10, 10))
    return torch.tensor(list(img.getdata()), dtype=torch.float32).reshape(1, size, size, 3) / 255


class WordVAE:
    """A stand-in VAE whose decode() returns a PIL-rendered word image chosen by the latent (exact match), and
    the source's image for any latent it does not know; counts decoded images."""

    def __init__(self, table, fallback):
        self.table, self.fallback, self.decoded = table, fallback, 0

    def decode(self, samples):
        out = []
        for row in samples:
            hit = next((img for lat, img in self.table if torch.equal(lat[0], row)), self.fallback)
            out.append(hit)
            self.decoded += 1
        return torch.cat(out)


needs_ocr = pytest.mark.skipif(not __import__("prompt_anatomy.nodes.shared.ocr", fromlist=["x"]).available()
                               or OCR_FONT is None, reason="rapidocr-onnxruntime or a TTF font missing")


@needs_ocr
@pytest.mark.slow
def test_localize_ocr_ranks_by_read_text_and_background(sd1, conds):
    """Paper 2's Algorithm 1 with the real OCR: the candidate whose image reads the target word with the background
    unchanged ranks first; the target word on a changed background ranks below it; the unchanged 'HELLO' last."""
    pos, neg, tgt = conds(sd1)
    latent = {"samples": torch.zeros(1, 4, 4, 4)}
    kw = dict(seed=1, steps=2, cfg=5.0, candidates="each 0-3", top_k=1)
    _, src, tgt_l, patched, _, _, _ = tll.localize(sd1.model, pos, tgt, neg, latent, **kw)
    words = [("HELLO", 0.0), ("WORLD", 0.0), ("WORLD", 0.35), ("WORD", 0.0)]  # candidates 0..3
    source_img = word_image("HELLO")
    vae = WordVAE([(src, source_img), (tgt_l, word_image("WORLD"))] +
                  [(p, word_image(w, shift=sh)) for p, (w, sh) in zip(patched, words, strict=True)], source_img)
    details = {}
    scores, *_, table, best, _ = tll.localize(sd1.model, pos, tgt, neg, latent, **kw, score="ocr", vae=vae,
                                              target_text=TARGET, start_search="0, 0.5", details=details)
    by_word = {w + ("/bg" if sh else ""): c for c, (w, sh) in zip(scores, words, strict=True)}
    assert [c.ocr["text"] for c in scores] == ["HELLO", "WORLD", "WORLD", "WORD"]
    assert by_word["WORLD"].ocr["f1"] == 1.0 and by_word["WORLD"].ocr["bg_ssim"] > 0.99
    assert by_word["WORLD/bg"].ocr["f1"] == 1.0 and by_word["WORLD/bg"].ocr["bg_ssim"] < by_word["WORLD"].ocr["bg_ssim"]
    assert by_word["HELLO"].ocr["f1"] == 0.0 and by_word["HELLO"].ocr["lev"] == 0.8  # hello -> world: 4 of 5
    order = [c.ocr["text"] + ("/bg" if c is by_word["WORLD/bg"] else "") for c in tll.rank(scores)]
    assert order[0] == "WORLD" and order[-1] == "HELLO"
    best_label = by_word["WORLD"].label
    assert best == best_label
    assert details["score"] == "ocr" and details["target_words"] == "WORLD"
    # start search on the best candidate: start 0 repeats its run ("WORLD"), start 0.5 gives a latent the VAE maps
    # to the source image, so 0 wins
    assert [(c.label, c.start) for c in details["search"]] == [(best_label, 0.0), (best_label, 0.5)]
    assert details["search"][0].ocr == by_word["WORLD"].ocr and details["search"][1].ocr["text"] == "HELLO"
    assert details["best_start"] == 0.0 and f"best start for {best_label}: 0.000" in table
    assert "score = OCR" in table and "'WORLD'" in table
    assert vae.decoded == 1 + 4 + 2  # the source, every candidate and the search runs (the target is not read)


def test_localize_ocr_errors(sd1, conds, monkeypatch):
    from prompt_anatomy.nodes.shared import ocr as pa_ocr

    pos, neg, tgt = conds(sd1)
    latent = {"samples": torch.zeros(1, 4, 4, 4)}
    with pytest.raises(ValueError, match="vae: score=ocr decodes"):
        tll.localize(sd1.model, pos, tgt, neg, latent, steps=1, candidates="0", score="ocr", target_text="WORLD")
    with pytest.raises(ValueError, match="target_text: score=ocr needs the words"):
        tll.localize(sd1.model, pos, tgt, neg, latent, steps=1, candidates="0", score="ocr", vae=object())
    with pytest.raises(ValueError, match="start_search: 'x' is not a number"):
        tll.localize(sd1.model, pos, tgt, neg, latent, steps=1, candidates="0", start_search="0, x")
    monkeypatch.setattr(pa_ocr, "available", lambda: False)
    with pytest.raises(ValueError, match="TextLayerLocalize score=ocr reads the rendered text with OCR.*pip install "
                                         "rapidocr-onnxruntime"):
        tll.localize(sd1.model, pos, tgt, neg, latent, steps=1, candidates="0", score="ocr", vae=object(),
                     target_text="WORLD")
    assert tll.target_words(TARGET) == "WORLD" and tll.target_words("WORLD") == "WORLD"


def test_start_mode_paper_reads_the_registry(sdxl, sd1, conds):
    """auto's start at the paper's value: start_mode=paper takes the family's registry field preset_start (SDXL: step 4
    of 50 = 0.08); without one, a ValueError says what to do."""
    _, _, tgt = conds(sd1)
    with pytest.raises(ValueError, match="start_mode=paper: the model-family registry has no paper 2 start step for "
                                         "SD1.x"):
        tl.apply_text_layer_patch(sd1.model, tgt, "0", start_mode="paper")
    assert families.by_name("sdxl").preset_start == 0.08
    _, _, tgt = conds(sdxl)
    m, report = tl.apply_text_layer_patch(sdxl.model, tgt, "output.2.0", start_mode="paper")  # tiny: no layer 55
    assert "steps: from 0.080 to 1.000" in report and "start: paper 2's 0.080 of the steps for SDXL" in report
    _, report = tl.apply_text_layer_patch(sdxl.model, tgt, "output.2.0", start_percent=0.3)
    assert "steps: from 0.300" in report


@pytest.mark.parametrize("family", ["sd1", "flux", "wan21_t2v"])
def test_target_identical_to_the_negative_prompt_is_refused(family):
    """Issue 17.6: an empty target prompt (with an empty negative) or the negative wired as the target gives the
    patched layers the negative prompt: refused at the first patched step, with the fix; a real target runs."""
    t = model(family)
    pos, empty = t.encode(SOURCE), t.encode("")
    layer = cl.model_layers(t.model, "test").layers[0]
    latent = {"samples": torch.zeros(t.latent_shape(1))}
    m, _ = tl.apply_text_layer_patch(t.model, t.encode(""), (layer,))
    with pytest.raises(ValueError, match=r"target: the edited prompt's conditioning is identical to the negative "
                                         r"prompt's.*Text Layer Word Substitute's target output"):
        ksample(m, pos, empty, steps=2, latent=latent, cfg=2.0)
    ok, _ = tl.apply_text_layer_patch(t.model, t.encode(TARGET), (layer,))
    assert torch.isfinite(ksample(ok, pos, empty, steps=2, latent=latent, cfg=2.0)).all()
    late, _ = tl.apply_text_layer_patch(t.model, t.encode(""), (layer,), start_percent=1.0)  # no patched step
    assert torch.isfinite(ksample(late, pos, empty, steps=2, latent=latent, cfg=2.0)).all()
