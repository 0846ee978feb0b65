"""Helpers shared by the unit tests, importable as ``pa_support`` (registered by conftest.py)."""

from __future__ import annotations

import tiny_models  # noqa: E402  (scripts/ is on sys.path: conftest.py)
import torch
from comfy.patcher_extension import WrappersMP

import nodes as comfy_nodes

_CACHE: dict = {}


def tiny(family: str, dtype=None):
    """Session-cached tiny model of ``family`` (tests must clone before patching — as nodes do)."""
    key = (family, dtype)
    if key not in _CACHE:
        _CACHE[key] = tiny_models.make(family, dtype=dtype)
    return _CACHE[key]


def empty_latent(batch=1, channels=4, size=16):
    return {"samples": torch.zeros(batch, channels, size // 8 * 2, size // 8 * 2)}


def ksample(model, pos, neg, *, steps=6, sampler="euler", scheduler="normal", cfg=5.0, batch=1, size=16,
            channels=4, denoise=1.0, seed=0, latent=None):
    """Core KSampler (nodes.common_ksampler) on a tiny model; returns the latent tensor."""
    if latent is None:
        latent = empty_latent(batch, channels, size)
    (out,) = comfy_nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, pos, neg, latent, denoise=denoise)
    return out["samples"]


def count_rows(model):
    """Clone of ``model`` with an APPLY_MODEL wrapper counting batch rows that reach the diffusion model."""
    m = model.clone()
    counter = {"rows": 0, "calls": 0}

    def wrapper(executor, x, *args, **kwargs):
        counter["rows"] += x.shape[0]
        counter["calls"] += 1
        return executor(x, *args, **kwargs)

    m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "test.count_rows", wrapper)
    return m, counter


def rank1_lora(model, keys) -> dict:
    """A rank-1 LoRA (lora_up/lora_down, all 0.1) on the ``keys`` (module paths under diffusion_model.) of ``model``."""
    sd = model.model.state_dict()
    lora = {}
    for key in keys:
        out_f, in_f = sd[f"diffusion_model.{key}.weight"].shape
        lora[f"diffusion_model.{key}.lora_up.weight"] = torch.full((out_f, 1), 0.1)
        lora[f"diffusion_model.{key}.lora_down.weight"] = torch.full((1, in_f), 0.1)
    return lora
