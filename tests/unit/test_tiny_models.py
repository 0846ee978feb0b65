"""The tiny models of scripts/tiny_models.py: every family builds from its ComfyUI config class, encodes text,
samples through the core KSampler, and is seed-deterministic with every tensor initialised."""

from __future__ import annotations

import re
from pathlib import Path

import pa_support as S
import pytest
import tiny_models
import torch

# family -> (comfy.supported_models class, width of the conditioning tensor the diffusion model reads)
EXPECTED = {
    "sd1": ("SD15", 64),
    "sd2": ("SD20", 64),
    "sdxl": ("SDXL", 128),
    "ssd1b": ("SSD1B", 128),
    "koala_700m": ("KOALA_700M", 128),
    "sd3": ("SD3", 4096),
    "flux": ("Flux", 64),
    "pixart_alpha": ("PixArtAlpha", 64),
    "pixart_sigma": ("PixArtSigma", 64),
    "hunyuan_dit": ("HunyuanDiT1", 64),
    "auraflow": ("AuraFlow", 64),
    "chroma": ("Chroma", 64),
    "chroma_radiance": ("ChromaRadiance", 64),
    "flux2": ("Flux2", 48),
    "qwen_image": ("QwenImage", 16),
    "hidream": ("HiDream", 64),
    "hunyuan_image21": ("HunyuanImage21", 16),
    "lumina2": ("Lumina2", 16),
    "zimage": ("ZImage", 16),
    "wan21_t2v": ("WAN21_T2V", 64),
    "wan22_t2v": ("WAN22_T2V", 64),
    "wan21_i2v": ("WAN21_I2V", 64),
    "hunyuan_video15": ("HunyuanVideo15", 16),
}
FAMILIES = list(tiny_models.FACTORIES)
VIDEO_LIKE = {"qwen_image", "wan21_t2v", "wan22_t2v", "wan21_i2v", "hunyuan_video15"}  # 5-D latents (B, C, T, H, W)


def test_every_factory_is_covered():
    assert sorted(EXPECTED) == sorted(FAMILIES)


def _tensors(tiny):
    yield from tiny.model.model.diffusion_model.named_parameters(prefix="dm")
    yield from tiny.model.model.diffusion_model.named_buffers(prefix="dm")
    yield from tiny.clip.cond_stage_model.named_parameters(prefix="te")
    yield from tiny.clip.cond_stage_model.named_buffers(prefix="te")


@pytest.mark.parametrize("family", FAMILIES)
def test_builds_initialised_and_encodes(family):
    t = S.tiny(family)
    config_class, width = EXPECTED[family]
    assert t.family == family and t.config_class == config_class
    assert type(t.model.model.model_config).__name__ == config_class
    for name, tensor in _tensors(t):
        if tensor.is_floating_point():
            assert torch.isfinite(tensor).all(), name
    cond = t.encode("a red cat")
    assert len(cond) == 1
    c, extra = cond[0]
    assert c.ndim == 3 and c.shape[0] == 1 and c.shape[-1] == width, tuple(c.shape)
    assert torch.isfinite(c).all()
    for key, value in t.cond_extra.items():
        assert extra[key] == value


@pytest.mark.parametrize("family", FAMILIES)
def test_two_step_euler_is_finite_and_repeatable(family):
    t = S.tiny(family)
    pos, neg = t.encode("a red cat"), t.encode("")
    latent = t.empty_latent(1)
    shape = t.latent_shape(1)
    assert tuple(latent["samples"].shape) == shape
    assert len(shape) == (5 if family in VIDEO_LIKE else 4) and shape[1] == t.latent_channels
    m, counter = S.count_rows(t.model)
    a = S.ksample(m, pos, neg, steps=2, cfg=2.0, latent=latent)
    assert counter["rows"] == 4  # cond + uncond per step (one batch, or two where their shapes differ)
    b = S.ksample(t.model, pos, neg, steps=2, cfg=2.0, latent=t.empty_latent(1))
    assert tuple(a.shape) == shape
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_weights(family):
    a = S.tiny(family)
    b = tiny_models.make(family, seed=0)
    for part in ("model", "clip"):
        sa = a.model.model.diffusion_model.state_dict() if part == "model" else a.clip.cond_stage_model.state_dict()
        sb = b.model.model.diffusion_model.state_dict() if part == "model" else b.clip.cond_stage_model.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{part} {k}"


def test_other_seed_other_weights():
    a, b = S.tiny("wan21_t2v"), tiny_models.make("wan21_t2v", seed=1)
    wa, wb = a.model.model.diffusion_model.state_dict(), b.model.model.diffusion_model.state_dict()
    assert not torch.equal(wa["head.modulation"], wb["head.modulation"])


@pytest.mark.parametrize("family", ["flux", "zimage"])
def test_dtype_argument(family):
    t = tiny_models.make(family, dtype=torch.bfloat16)
    assert {p.dtype for p in t.model.model.diffusion_model.parameters()} == {torch.bfloat16}
    assert t.model.model.get_dtype() == torch.bfloat16
    assert {p.dtype for p in S.tiny(family).model.model.diffusion_model.parameters()} == {torch.float32}


def test_latent_shapes():
    assert S.tiny("pixart_sigma").latent_shape(2, 8) == (2, 4, 34, 34)  # PixArt's minimum
    assert S.tiny("flux2").latent_shape(1, 3) == (1, 128, 3, 3)
    assert S.tiny("wan22_t2v").latent_shape(1, 3, frames=2) == (1, 48, 2, 4, 4)
    assert S.tiny("chroma_radiance").latent_shape(1, 20) == (1, 3, 32, 32)  # pixel space, 16 x 16 patches


def test_flux2_standin_tokenizer_keeps_tekken_ids():
    t = S.tiny("flux2")
    ids = [tok for tok, _ in t.clip.tokenize("a red cat")["mistral3_24b"][0]]
    assert ids[0] == 1 and 17 in ids and ids[-1] == 4  # <s> ... [SYSTEM_PROMPT] ... [/INST]


def test_spiece_standins_keep_special_ids():
    import sentencepiece

    gemma = sentencepiece.SentencePieceProcessor(model_proto=tiny_models.spiece_standin("gemma"))
    assert (gemma.pad_id(), gemma.eos_id(), gemma.bos_id(), gemma.unk_id()) == (0, 1, 2, 3)
    umt5 = sentencepiece.SentencePieceProcessor(model_proto=tiny_models.spiece_standin("umt5"))
    assert (umt5.pad_id(), umt5.eos_id(), umt5.unk_id(), umt5.bos_id()) == (0, 1, 2, -1)


def test_factories_never_construct_params_dataclasses():
    """ComfyUI's *Params dataclasses (FluxParams, ChromaParams, ...) gain required fields between versions: the
    factories only hand config dicts to ComfyUI's config classes."""
    source = Path(tiny_models.__file__).read_text()
    assert not re.search(r"\b\w*Params\s*\(", source)
    assert not re.search(r"^\s*(import|from) comfy\.ldm", source, re.M)  # no direct model classes either


@pytest.mark.parametrize("family", FAMILIES)
def test_recorded_shapes_are_the_models(family):
    """tiny_model_shapes.json is what ComfyUI's model detection reads to fill config fields a newer ComfyUI
    requires: it must be this factory's state dict, key for key (regenerate: tiny_models.py --write-shapes)."""
    import comfyui_version

    table = tiny_models._shape_table()
    if table.get("comfyui") != comfyui_version.__version__:  # another tree may change parameter shapes
        pytest.skip(f"the table records ComfyUI {table.get('comfyui')}'s shapes; this is {comfyui_version.__version__}")
    t = S.tiny(family)
    recorded = table.get(t.config_class)
    assert recorded, f"{t.config_class} has no entry: run scripts/tiny_models.py --write-shapes"
    sd = t.model.model.diffusion_model.state_dict()
    assert {k: list(v.shape) for k, v in sd.items()} == recorded


@pytest.mark.parametrize("family", ["sd1", "flux", "chroma", "wan21_t2v"])
def test_detection_reads_the_recorded_shapes(family):
    """The detected config agrees with the factory on what a state dict can tell (depths, widths, channels)."""
    t = S.tiny(family)
    detected = tiny_models._detected_config(t.config_class)
    assert detected, "ComfyUI's detection found no model in the recorded shapes"
    built = t.model.model.model_config.unet_config
    for key in ("in_channels", "depth", "depth_single_blocks", "hidden_size", "num_layers", "dim",
                "context_dim", "model_channels"):
        if key in detected and key in built:
            assert detected[key] == built[key], key
