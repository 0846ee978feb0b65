#!/usr/bin/env python3
"""Write a full-size random-weight SD1.5 checkpoint (and a small random LoRA for it).

The checkpoint is built from ComfyUI's own classes, so core ``CheckpointLoaderSimple`` detects it
as SD1.5 from its keys and shapes and loads it exactly like a real one:

* ``model.diffusion_model.*``        UNetModel with the SD15 config of comfy/model_detection.py
* ``cond_stage_model.transformer.*`` comfy.sd1_clip.SDClipModel (CLIP ViT-L/14 text tower)
* ``first_stage_model.*``            the SD VAE (comfy.ldm.models.autoencoder.AutoencoderKL,
                                     an AutoencodingEngine) with ComfyUI's default SD1 ddconfig

Weights are uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's default Linear/Conv bound),
biases 0, norm scales 1, drawn in a fixed order from a fixed seed, stored as fp16 safetensors
(~2.1 GB). Images come out as noise, but every code path is the real one.

Usage (run with the project venv; paths default to scripts/comfy_path.models_dir(): .comfyui/models, or .comfybase/models
for a tree given by PROMPT_ANATOMY_COMFYUI):

    .venv/bin/python scripts/make_sd15_checkpoint.py            # checkpoint + LoRA
    .venv/bin/python scripts/make_sd15_checkpoint.py --no-lora  # checkpoint only
    .venv/bin/python scripts/make_sd15_checkpoint.py --lora-only
    .venv/bin/python scripts/make_sd15_checkpoint.py --force    # rewrite even if valid

An existing file is kept when its safetensors header carries this script's marker metadata with
the same format version and seed and the expected number of tensors.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from pathlib import Path

LOG = logging.getLogger("make_sd15_checkpoint")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))  # scripts/ only (the checkout's nodes/ would shadow ComfyUI's)
import comfy_path  # noqa: E402

COMFY_DIR = comfy_path.comfy_dir()  # $PROMPT_ANATOMY_COMFYUI or the pinned .comfyui/
DEFAULT_CKPT = comfy_path.models_dir() / "checkpoints" / "prompt_anatomy_random_sd15.safetensors"
DEFAULT_LORA = comfy_path.models_dir() / "loras" / "prompt_anatomy_random_lora.safetensors"

FORMAT_VERSION = "2"
CKPT_KIND = "prompt_anatomy_random_sd15"
LORA_KIND = "prompt_anatomy_random_lora"
MINI_DIR = ROOT / "models" / "prompt_anatomy_mini"
MINI_UNET = MINI_DIR / "unet.safetensors"
MINI_LORA = MINI_DIR / "loras" / "prompt_anatomy_mini_demo_lora.safetensors"
MINI_LORA_KIND = "prompt_anatomy_mini_demo_lora"
DEFAULT_SEED = 20240611
LORA_RANK = 4

# SD1.5 UNet config exactly as comfy/model_detection.py (unet_config_from_diffusers_unet, "SD15")
# builds it; dtype is set when the model is created.
SD15_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
# comfy/sd.py VAE: "default SD1.x/SD2.x VAE parameters"
SD_VAE_DDCONFIG = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}
# Diffusers-style names of the cross-attention projections the LoRA touches (kohya naming is
# "lora_unet_" + name with dots replaced by underscores); ComfyUI maps them with
# comfy.utils.unet_to_diffusers, exactly as core LoraLoader does.
LORA_TARGETS = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
    "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k",
    "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
    "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k",
    "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v",
]


def _read_header(path: Path):
    """(metadata dict, number of tensors) of a safetensors file, or (None, 0) if unreadable."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}), len(list(f.keys()))
    except Exception as exc:  # noqa: BLE001 - any failure means "not valid"
        LOG.warning("cannot read %s: %s", path, exc)
        return None, 0


def is_valid(path: Path, kind: str, seed: int) -> bool:
    if not path.is_file():
        return False
    meta, n = _read_header(path)
    if meta is None:
        return False
    ok = (meta.get("prompt_anatomy_kind") == kind and meta.get("format_version") == FORMAT_VERSION
          and meta.get("seed") == str(seed) and n > 0 and str(n) == meta.get("num_tensors"))
    if not ok:
        LOG.info("%s exists but is not a current %s file (metadata %s, %d tensors)", path, kind, meta, n)
    return ok


def _import_comfy():
    """Import ComfyUI from .comfyui with --cpu in sys.argv and args parsing enabled."""
    if not (COMFY_DIR / "comfy").is_dir():
        raise SystemExit(f"ComfyUI not found at {COMFY_DIR}; run scripts/setup.sh first")
    if str(COMFY_DIR) not in sys.path:
        sys.path.insert(0, str(COMFY_DIR))
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.ldm.models.autoencoder  # noqa: F401
    import comfy.ldm.modules.diffusionmodules.openaimodel  # noqa: F401
    import comfy.ops  # noqa: F401
    import comfy.sd1_clip  # noqa: F401
    import comfy.utils  # noqa: F401

    return comfy


def _init_(module, prefix: str, gen, state: dict) -> None:
    """Fill every parameter of module deterministically; put fp16 copies into state."""
    import torch

    for name, p in module.state_dict(keep_vars=True).items():
        t = p.data if isinstance(p, torch.nn.Parameter) else p
        full = prefix + name
        if not t.is_floating_point():
            state[full] = t.detach().clone().contiguous()
            continue
        with torch.no_grad():
            if name.endswith("bias") or t.ndim == 0:
                t.zero_()
            elif t.ndim == 1:  # norm scales and other 1-D parameters
                t.fill_(1.0)
            else:
                fan_in = t[0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                t.uniform_(-bound, bound, generator=gen)
        state[full] = t.detach().to(torch.float16).contiguous()


def build_state_dict(seed: int):
    """Build the three models from ComfyUI's classes and return the fp16 checkpoint state dict."""
    comfy = _import_comfy()
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    gen = torch.Generator().manual_seed(seed)
    state: dict = {}
    ops = comfy.ops.disable_weight_init

    t0 = time.monotonic()
    unet = comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel(
        **SD15_UNET_CONFIG, dtype=torch.float32, device="cpu", operations=ops)
    _init_(unet, "model.diffusion_model.", gen, state)
    del unet
    LOG.info("UNet built and initialised in %.1f s", time.monotonic() - t0)

    t0 = time.monotonic()
    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    _init_(clip, "cond_stage_model.", gen, state)
    del clip
    LOG.info("CLIP text model built and initialised in %.1f s", time.monotonic() - t0)

    t0 = time.monotonic()
    vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(SD_VAE_DDCONFIG), embed_dim=4)
    _init_(vae, "first_stage_model.", gen, state)
    del vae
    LOG.info("VAE built and initialised in %.1f s", time.monotonic() - t0)
    # SDClipModel keeps helper tensors that are not part of a real checkpoint's text model.
    for k in [k for k in state if k.startswith("cond_stage_model.") and
              not k.startswith("cond_stage_model.transformer.")]:
        del state[k]
    return state


_ST_DTYPES = {"float16": "F16", "float32": "F32", "bfloat16": "BF16", "int64": "I64", "int32": "I32"}


def _save(state: dict, path: Path, metadata: dict) -> None:
    """Write a safetensors file byte-for-byte reproducibly (safetensors.torch.save_file orders the
    metadata at random), via a temporary file renamed into place."""
    import json
    import struct

    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    metadata = {**metadata, "num_tensors": str(len(state)), "format_version": FORMAT_VERSION}
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    names = sorted(state)
    for name in names:
        t = state[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[str(t.dtype).removeprefix("torch.")], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            f.write(state[name].contiguous().reshape(-1).view(torch.uint8).numpy().data)
    os.replace(tmp, path)


def make_checkpoint(path: Path = DEFAULT_CKPT, seed: int = DEFAULT_SEED, force: bool = False) -> Path:
    """Write the random SD1.5 checkpoint to path unless a valid one is already there."""
    if not force and is_valid(path, CKPT_KIND, seed):
        LOG.info("checkpoint up to date: %s", path)
        return path
    t0 = time.monotonic()
    state = build_state_dict(seed)
    n_params = sum(t.numel() for t in state.values())
    LOG.info("writing %d tensors (%.2f G parameters) to %s", len(state), n_params / 1e9, path)
    _save(state, path, {"prompt_anatomy_kind": CKPT_KIND, "seed": str(seed),
                        "modelspec.architecture": "stable-diffusion-v1",
                        "description": "random weights, for tests only"})
    LOG.info("checkpoint written in %.1f s (%.2f GB)", time.monotonic() - t0, path.stat().st_size / 1e9)
    return path


def lora_unet_keys():
    """kohya LoRA base names -> ComfyUI UNet weight keys, via comfy.utils.unet_to_diffusers."""
    comfy = _import_comfy()
    diffusers = comfy.utils.unet_to_diffusers(dict(SD15_UNET_CONFIG))
    out = {}
    for target in LORA_TARGETS:
        out["lora_unet_" + target.replace(".", "_")] = "model.diffusion_model." + diffusers[target + ".weight"]
    return out


def write_random_lora(path: Path, shapes: dict, seed: int, kind: str, rank: int = LORA_RANK) -> Path:
    """Write a random kohya-format LoRA: ``shapes`` maps LoRA base names to their weights' (out, in) shapes."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    state = {}
    for lora_name, (out_f, in_f) in shapes.items():
        down = torch.empty(rank, in_f).uniform_(-1, 1, generator=gen) / math.sqrt(in_f)
        up = torch.empty(out_f, rank).uniform_(-1, 1, generator=gen) * 0.5
        state[lora_name + ".lora_down.weight"] = down.to(torch.float16).contiguous()
        state[lora_name + ".lora_up.weight"] = up.to(torch.float16).contiguous()
        state[lora_name + ".alpha"] = torch.tensor(float(rank), dtype=torch.float16)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(state, path, {"prompt_anatomy_kind": kind, "seed": str(seed), "rank": str(rank),
                        "ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                        "ss_network_alpha": str(rank)})
    LOG.info("LoRA written: %s (%d modules, rank %d)", path, len(shapes), rank)
    return path


def make_lora(path: Path = DEFAULT_LORA, ckpt: Path = DEFAULT_CKPT, seed: int = DEFAULT_SEED,
              force: bool = False, rank: int = LORA_RANK) -> Path:
    """Write a small random kohya-format LoRA (attn2 to_k/to_v of a few SD1.5 blocks).

    Shapes are read from the checkpoint's header, so the checkpoint must exist.
    """
    if not force and is_valid(path, LORA_KIND, seed):
        LOG.info("LoRA up to date: %s", path)
        return path
    from safetensors import safe_open

    with safe_open(str(ckpt), framework="pt") as f:
        shapes = {name: tuple(f.get_slice(key).get_shape()) for name, key in lora_unet_keys().items()}
    return write_random_lora(path, shapes, seed, LORA_KIND, rank)


def make_mini_lora(path: Path = MINI_LORA, unet_file: Path = MINI_UNET, seed: int = DEFAULT_SEED,
                   force: bool = False) -> Path:
    """The demo model's random LoRA (to_k/to_v of every cross-attention layer of models/prompt_anatomy_mini's
    UNet, whose keys are ComfyUI's own: kohya names are "lora_unet_" + key with dots as underscores), shipped
    for the demo workflows' LoraLoaderTextLayers. It only demonstrates the mechanics: the weights are random."""
    if not force and is_valid(path, MINI_LORA_KIND, seed):
        LOG.info("LoRA up to date: %s", path)
        return path
    from safetensors import safe_open

    with safe_open(str(unet_file), framework="pt") as f:
        shapes = {"lora_unet_" + k[:-len(".weight")].replace(".", "_"): tuple(f.get_slice(k).get_shape())
                  for k in sorted(f.keys()) if k.endswith((".attn2.to_k.weight", ".attn2.to_v.weight"))}
    if not shapes:
        raise SystemExit(f"{unet_file} has no cross-attention to_k/to_v weights")
    return write_random_lora(path, shapes, seed, MINI_LORA_KIND, rank=2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", type=Path, default=DEFAULT_CKPT, help="checkpoint path (default: %(default)s)")
    ap.add_argument("--lora-output", type=Path, default=DEFAULT_LORA, help="LoRA path (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--force", action="store_true", help="rewrite even when the files are valid")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--no-lora", action="store_true", help="write only the checkpoint")
    g.add_argument("--lora-only", action="store_true", help="write only the LoRA (checkpoint must exist)")
    g.add_argument("--mini-lora", action="store_true",
                   help=f"write only the demo model's random LoRA ({MINI_LORA.relative_to(ROOT)}, shipped in the repo)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[make_sd15_checkpoint] %(message)s")
    if args.mini_lora:
        make_mini_lora(force=args.force)
        return 0
    if not args.lora_only:
        make_checkpoint(args.output, args.seed, args.force)
    if not args.no_lora:
        if not args.output.is_file():
            LOG.error("checkpoint %s missing; run without --lora-only first", args.output)
            return 1
        make_lora(args.lora_output, args.output, args.seed, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
