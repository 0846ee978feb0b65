#!/usr/bin/env python3
"""Write a full-size random-weight SDXL checkpoint (for the text-layer server test, workflows/text_edit_sdxl.json).

Built like scripts/make_sd15_checkpoint.py from ComfyUI's own classes, so core ``CheckpointLoaderSimple`` detects
it as SDXL from its keys and shapes:

* ``model.diffusion_model.*``                UNetModel with the SDXL config of comfy/model_detection.py
                                             (70 cross-attention layers; paper 2's text layers are 55 and 56)
* ``conditioner.embedders.0.transformer.*``  CLIP-L (comfy.sdxl_clip.SDXLClipModel's clip_l)
* ``conditioner.embedders.1.model.*``        OpenCLIP-G in the original checkpoint layout (converted with
                                             ComfyUI's own SDXL.process_clip_state_dict_for_saving)
* ``first_stage_model.*``                    the SD/SDXL VAE

Weights are uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), biases 0, norm scales 1, drawn in sorted key order from a
fixed seed, stored as fp16 (~6.9 GB). The models are built on the ``meta`` device (no memory) and every tensor is
generated and written one at a time, so the script needs well under 1 GB of RAM. Images are noise, but every code
path is the real one.

Loading it needs about 14 GB of RAM on CPU (ComfyUI runs the UNet in fp32 there); sampling 64 x 64 takes a few
seconds per step on a desktop CPU.

    .venv/bin/python scripts/make_sdxl_checkpoint.py            # write (kept when already valid)
    .venv/bin/python scripts/make_sdxl_checkpoint.py --check    # build the key/shape list and check ComfyUI's
                                                                # detection on it, write nothing
    .venv/bin/python scripts/make_sdxl_checkpoint.py --output /tmp/x.safetensors --force
"""
from __future__ import annotations

import argparse
import ast
import inspect
import json
import logging
import math
import os
import struct
import sys
import textwrap
import time
from pathlib import Path

LOG = logging.getLogger("make_sdxl_checkpoint")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))  # scripts/ only (the checkout's nodes/ would shadow ComfyUI's)
import comfy_path  # noqa: E402

COMFY_DIR = comfy_path.comfy_dir()  # $PROMPT_ANATOMY_COMFYUI or the pinned .comfyui/
DEFAULT_CKPT = comfy_path.models_dir() / "checkpoints" / "prompt_anatomy_random_sdxl.safetensors"
FORMAT_VERSION = "1"
CKPT_KIND = "prompt_anatomy_random_sdxl"
DEFAULT_SEED = 20241125
SD_VAE_DDCONFIG = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}
_ST_DTYPES = {"float16": "F16", "float32": "F32", "int64": "I64", "int32": "I32"}


def _import_comfy():
    """make_sd15_checkpoint's import of ComfyUI (--cpu, args parsing on) plus the SDXL modules."""
    from make_sd15_checkpoint import _import_comfy as import_comfy_cpu  # scripts/ is sys.path[0] when run

    import_comfy_cpu()
    import comfy.model_detection
    import comfy.sdxl_clip
    import comfy.supported_models  # noqa: F401

    return comfy


def sdxl_unet_config(comfy, torch) -> dict:
    """The SDXL unet config exactly as comfy/model_detection.py writes it (read from its source)."""
    src = textwrap.dedent(inspect.getsource(comfy.model_detection.unet_config_from_diffusers_unet))
    node = next(n for n in ast.walk(ast.parse(src))
                if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "SDXL")
    return eval(compile(ast.Expression(node.value), "model_detection", "eval"), {"dtype": torch.float16})


def meta_state_dict() -> dict:
    """Final checkpoint keys -> meta (or small real) tensors with the right shapes and dtypes."""
    comfy = _import_comfy()
    import torch

    config = sdxl_unet_config(comfy, torch)
    model_config = comfy.model_detection.model_config_from_unet_config(dict(config))
    if type(model_config).__name__ != "SDXL":
        raise SystemExit(f"internal: ComfyUI detects the SDXL config as {type(model_config).__name__}")
    config = dict(config)
    config.pop("dtype")
    state: dict = {}
    with torch.device("meta"):
        unet = comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel(
            **config, dtype=torch.float16, device="meta", operations=comfy.ops.disable_weight_init)
        state.update({"model.diffusion_model." + k: v for k, v in unet.state_dict().items()})
        clip = comfy.sdxl_clip.SDXLClipModel(device="meta", dtype=torch.float16)
        clip_sd = model_config.process_clip_state_dict_for_saving(clip.state_dict())
        state.update(clip_sd)
        vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(SD_VAE_DDCONFIG), embed_dim=4)
        state.update({"first_stage_model." + k: v for k, v in vae.state_dict().items()})
    return state


def check_detection(state: dict) -> str:
    """ComfyUI's own detection on the key/shape list: SDXL, and every CLIP key the SDXL CLIP expects."""
    comfy = _import_comfy()
    import torch

    model_config = comfy.model_detection.model_config_from_unet(state, "model.diffusion_model.")
    if model_config is None or type(model_config).__name__ != "SDXL":
        raise SystemExit(f"ComfyUI would not detect this checkpoint as SDXL (got {type(model_config).__name__})")
    clip_sd = model_config.process_clip_state_dict(dict(state))
    with torch.device("meta"):
        want = set(comfy.sdxl_clip.SDXLClipModel(device="meta", dtype=torch.float16).state_dict())
    missing = sorted(k for k in want - set(clip_sd) if not k.endswith(("logit_scale", "position_ids",
                                                                     "clip_l.transformer.text_projection.weight")))
    if missing:
        raise SystemExit(f"CLIP keys missing after ComfyUI's conversion: {missing[:8]}")
    n = sum(v.numel() for v in state.values())
    return f"detected as SDXL; {len(state)} tensors, {n / 1e9:.2f} G parameters ({2 * n / 1e9:.1f} GB in fp16)"


def _fill(name: str, shape, dtype, gen, torch):
    if dtype in (torch.int64, torch.int32):  # position ids
        return torch.arange(shape[-1], dtype=dtype).expand(shape).contiguous()
    if name.endswith("bias") or len(shape) == 0:
        return torch.zeros(shape, dtype=torch.float16)
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.float16)
    fan_in = math.prod(shape[1:])
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=gen).to(torch.float16)


def write_checkpoint(state: dict, path: Path, seed: int) -> None:
    """Stream a safetensors file: header from the shapes, then each tensor generated and written in turn."""
    import torch

    names = sorted(state)
    dtypes = {n: (state[n].dtype if state[n].dtype in (torch.int64, torch.int32) else torch.float16) for n in names}
    metadata = {"prompt_anatomy_kind": CKPT_KIND, "seed": str(seed), "format_version": FORMAT_VERSION,
                "num_tensors": str(len(names)), "modelspec.architecture": "stable-diffusion-xl-v1-base",
                "description": "random weights, for tests only"}
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for n in names:
        shape = list(state[n].shape)
        nbytes = math.prod(shape) * torch.empty((), dtype=dtypes[n]).element_size()
        header[n] = {"dtype": _ST_DTYPES[str(dtypes[n]).removeprefix("torch.")], "shape": shape,
                     "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    gen = torch.Generator().manual_seed(seed)
    t0 = time.monotonic()
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for i, n in enumerate(names):
                t = _fill(n, tuple(state[n].shape), dtypes[n], gen, torch)
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
                if i % 400 == 0:
                    LOG.info("%d/%d tensors, %.1f s", i, len(names), time.monotonic() - t0)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def is_valid(path: Path, seed: int) -> bool:
    if not path.is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta, n = f.metadata() or {}, len(list(f.keys()))
    except Exception as exc:  # noqa: BLE001 - unreadable means "not valid"
        LOG.warning("cannot read %s: %s", path, exc)
        return False
    return (meta.get("prompt_anatomy_kind") == CKPT_KIND and meta.get("format_version") == FORMAT_VERSION
            and meta.get("seed") == str(seed) and str(n) == meta.get("num_tensors"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", type=Path, default=DEFAULT_CKPT, help="checkpoint path (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--force", action="store_true", help="rewrite even when the file is valid")
    ap.add_argument("--check", action="store_true", help="only check ComfyUI's detection on the key list")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[make_sdxl_checkpoint] %(message)s")
    if not args.check and not args.force and is_valid(args.output, args.seed):
        LOG.info("checkpoint up to date: %s", args.output)
        return 0
    t0 = time.monotonic()
    state = meta_state_dict()
    LOG.info("%s (%.1f s)", check_detection(state), time.monotonic() - t0)
    if args.check:
        return 0
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    write_checkpoint(state, args.output, args.seed)
    LOG.info("checkpoint written in %.1f s (%.2f GB): %s", time.monotonic() - t0, args.output.stat().st_size / 1e9,
             args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
