"""Tiny text-to-image models built from ComfyUI's own classes, for unit tests.

Every family the pack supports gets a factory that returns a :class:`TinyModel` with a real
``ModelPatcher`` (so every patch point and sampler is ComfyUI's) and a real ``comfy.sd.CLIP`` with the
shipped tokenizers (CLIP BPE, T5 SentencePiece) in front of a small text encoder:

=========  ===========================================  ============================================
family     diffusion model                              text side
=========  ===========================================  ============================================
sd1        UNetModel, ch 32, attn at 2 levels, ctx 64   CLIP-L-like (hidden 64), pads with [EOS]
sd2        UNetModel, ch 32, linear ST, ctx 64          CLIP-H-like (pads with 0), penultimate layer
sdxl       UNetModel + ADM (pooled ‖ size embeddings)   CLIP-L ‖ CLIP-G-like (64 + 64 channels)
sd3        MMDiT, depth 2 (hidden 128)                  CLIP-L + CLIP-G-like, zero-padded to 4096
flux       Flux, 1 double + 1 single block              T5-like (d_model 64) context, CLIP-L pooled
=========  ===========================================  ============================================

Weights are random but deterministic (``seed``). Import this module only after ComfyUI is importable
(``.comfyui`` on sys.path, ``--cpu`` parsed); ``python scripts/tiny_models.py OUT_DIR`` does that itself
and writes each model's diffusion weights as safetensors (used to check the factories are stable).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_by_path(name: str, path: Path, package_dir: Path | None = None):
    """Import the file ``path`` as module ``name`` (a package when ``package_dir`` is given), once: how the
    tests, benchmarks and scripts load the pack (by file location, as ComfyUI does) without putting the
    checkout on sys.path (its nodes/ would shadow ComfyUI's top-level nodes module)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[str(package_dir)] if package_dir else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def bootstrap_comfy() -> None:
    """Make ``import comfy`` work in a plain Python process (CPU, no CLI args of ours)."""
    comfy_dir = str(ROOT / ".comfyui")
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    if "comfy.cli_args" in sys.modules:
        return
    saved = sys.argv
    sys.argv = [saved[0] if saved else "python", "--cpu"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401  (parses --cpu now)
        import comfy.model_management  # noqa: F401
    finally:
        sys.argv = saved


@dataclasses.dataclass
class TinyModel:
    family: str
    model: object  # comfy.model_patcher.ModelPatcher
    clip: object  # comfy.sd.CLIP
    latent_channels: int

    def encode(self, text: str):
        """CLIPTextEncode equivalent: a CONDITIONING list."""
        tokens = self.clip.tokenize(text)
        cond = self.clip.encode_from_tokens_scheduled(tokens)
        if self.family == "flux":
            import node_helpers

            cond = node_helpers.conditioning_set_values(cond, {"guidance": 3.5})
        return cond


CLIP_SMALL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 2,
    "num_hidden_layers": 3,
    "projection_dim": 64,
}
T5_SMALL = {"d_model": 64, "d_ff": 128, "d_kv": 32, "num_heads": 2, "num_layers": 2}


def _init_weights(module, seed: int) -> None:
    """Deterministic init: ComfyUI's ops skip weight init, so every parameter is set here."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if p.ndim >= 2:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif name.endswith("weight") or name.endswith("scale"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
        for name, b in sorted(module.named_buffers(), key=lambda kv: kv[0]):
            if name.endswith("position_ids"):
                b.copy_(torch.arange(b.shape[-1]).expand_as(b))
            elif name.endswith("pos_embed"):  # MMDiT allocates it with torch.empty (loaded from the checkpoint)
                b.copy_(0.02 * torch.randn(b.shape, generator=g))


def _patcher(model):
    import comfy.model_patcher
    import torch

    model.eval()

    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def _clip(tokenizer_cls, clip_cls, seed, dtype, model_options_extra=None):
    import comfy.sd
    import comfy.supported_models_base
    import torch

    opts = {"dtype": dtype or torch.float32, "load_device": torch.device("cpu"),
            "offload_device": torch.device("cpu"), "initial_device": torch.device("cpu")}
    opts.update(model_options_extra or {})
    clip = comfy.sd.CLIP(target=comfy.supported_models_base.ClipTarget(tokenizer_cls, clip_cls), model_options=opts)
    _init_weights(clip.cond_stage_model, seed)
    return clip


UNET_BASE = {
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth": [1, 1],
    "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1, 1, 1],
    "use_linear_in_transformer": False,
    "context_dim": 64,
    "num_heads": 2,
    "num_head_channels": -1,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
    "adm_in_channels": None,
}


def _unet_model(supported_cls, base_cls, unet_config, seed, dtype):
    import torch

    cfg = supported_cls(dict(unet_config))
    cfg.unet_config.update(unet_config)  # the family's unet_extra_config must not override the tiny sizes
    cfg.set_inference_dtype(dtype or torch.float32, None)
    model = base_cls(cfg, device="cpu")
    _init_weights(model.diffusion_model, seed)
    model.diffusion_model.to(dtype or torch.float32)
    return model


def make_sd1(seed: int = 0, dtype=None) -> TinyModel:
    bootstrap_comfy()
    import comfy.model_base
    import comfy.sd1_clip
    import comfy.supported_models

    model = _unet_model(comfy.supported_models.SD15, comfy.model_base.BaseModel, UNET_BASE, seed, dtype)

    class TinySD1Clip(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=dtype, model_options={**model_options, "clip_l_model_config": CLIP_SMALL})

    clip = _clip(comfy.sd1_clip.SD1Tokenizer, TinySD1Clip, seed + 1, dtype)
    return TinyModel("sd1", _patcher(model), clip, 4)


def make_sd2(seed: int = 0, dtype=None) -> TinyModel:
    bootstrap_comfy()
    import comfy.model_base
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.text_encoders.sd2_clip as sd2_clip

    cfg = dict(UNET_BASE, use_linear_in_transformer=True, num_heads=-1, num_head_channels=16)
    model = _unet_model(comfy.supported_models.SD20, comfy.model_base.BaseModel, cfg, seed, dtype)

    class TinySD2Clip(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=dtype, clip_name="h", clip_model=sd2_clip.SD2ClipHModel,
                             model_options={**model_options, "clip_h_model_config": CLIP_SMALL})

    clip = _clip(sd2_clip.SD2Tokenizer, TinySD2Clip, seed + 1, dtype)
    return TinyModel("sd2", _patcher(model), clip, 4)


def make_sdxl(seed: int = 0, dtype=None) -> TinyModel:
    bootstrap_comfy()
    import comfy.model_base
    import comfy.sdxl_clip
    import comfy.supported_models

    cfg = dict(UNET_BASE, context_dim=128, adm_in_channels=64 + 6 * 256, num_classes="sequential", use_linear_in_transformer=True,
               num_heads=-1, num_head_channels=16, transformer_depth=[1, 2], transformer_depth_output=[1, 1, 2, 2])
    model = _unet_model(comfy.supported_models.SDXL, comfy.model_base.SDXL, cfg, seed, dtype)

    class TinySDXLClip(comfy.sdxl_clip.SDXLClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=dtype, model_options={
                **model_options, "clip_l_model_config": CLIP_SMALL, "clip_g_model_config": CLIP_SMALL})

    clip = _clip(comfy.sdxl_clip.SDXLTokenizer, TinySDXLClip, seed + 1, dtype)
    return TinyModel("sdxl", _patcher(model), clip, 4)


def make_sd3(seed: int = 0, dtype=None) -> TinyModel:
    bootstrap_comfy()
    import comfy.model_base
    import comfy.supported_models
    import comfy.text_encoders.sd3_clip as sd3_clip
    import torch

    unet_config = {
        "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "adm_in_channels": 128,
        "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
        "num_patches": 1024, "pos_embed_max_size": 32, "x_block_self_attn_layers": [],
        "pos_embed_scaling_factor": None,
    }
    cfg = comfy.supported_models.SD3(unet_config)
    cfg.set_inference_dtype(dtype or torch.float32, None)
    model = comfy.model_base.SD3(cfg, device="cpu")
    _init_weights(model.diffusion_model, seed)
    model.diffusion_model.to(dtype or torch.float32)

    class TinySD3Clip(sd3_clip.SD3ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(clip_l=True, clip_g=True, t5=False, device=device, dtype=dtype, model_options={
                **model_options, "clip_l_model_config": CLIP_SMALL, "clip_g_model_config": CLIP_SMALL})

    clip = _clip(sd3_clip.SD3Tokenizer, TinySD3Clip, seed + 1, dtype)
    return TinyModel("sd3", _patcher(model), clip, 16)


def make_flux(seed: int = 0, dtype=None) -> TinyModel:
    bootstrap_comfy()
    import comfy.model_base
    import comfy.supported_models
    import comfy.text_encoders.flux as flux_te
    import torch

    unet_config = {
        "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 64, "context_in_dim": 64,
        "hidden_size": 128, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
        "axes_dim": [16, 24, 24], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
    }
    cfg = comfy.supported_models.Flux(unet_config)
    cfg.set_inference_dtype(dtype or torch.float32, None)
    model = comfy.model_base.Flux(cfg, device="cpu")
    _init_weights(model.diffusion_model, seed)
    model.diffusion_model.to(dtype or torch.float32)

    class TinyFluxClip(flux_te.FluxClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=dtype, model_options={
                **model_options, "clip_l_model_config": CLIP_SMALL, "t5xxl_model_config": T5_SMALL})

    clip = _clip(flux_te.FluxTokenizer, TinyFluxClip, seed + 1, dtype)
    return TinyModel("flux", _patcher(model), clip, 16)


FACTORIES = {"sd1": make_sd1, "sd2": make_sd2, "sdxl": make_sdxl, "sd3": make_sd3, "flux": make_flux}


def make(family: str, seed: int = 0, dtype=None) -> TinyModel:
    try:
        factory = FACTORIES[family]
    except KeyError:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {sorted(FACTORIES)}") from None
    return factory(seed=seed, dtype=dtype)


def main(argv: list[str]) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="[tiny_models] %(message)s")
    out_dir = Path(argv[0]) if argv else ROOT / ".models" / "tiny"
    bootstrap_comfy()
    import safetensors.torch

    out_dir.mkdir(parents=True, exist_ok=True)
    for family in FACTORIES:
        tiny = make(family)
        sd = {k: v.contiguous() for k, v in tiny.model.model.diffusion_model.state_dict().items()}
        path = out_dir / f"tiny_{family}.safetensors"
        safetensors.torch.save_file(sd, str(path))
        n = sum(v.numel() for v in sd.values())
        logging.info("%s: %d parameters -> %s", family, n, path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
