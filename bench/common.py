"""Shared set-up for the benchmarks: ComfyUI in-process on CPU, the pack loaded as ``prompt_anatomy``,
the full-size random SD1.5 checkpoint, and a timer. Benchmarks print ratios measured in one run."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / ".comfyui" / "models" / "checkpoints" / "prompt_anatomy_random_sd15.safetensors"


def setup():
    """Import ComfyUI (CPU) and the pack; returns the pack module."""
    if str(ROOT / "scripts") not in sys.path:  # scripts/ only: the checkout's nodes/ would shadow ComfyUI's
        sys.path.insert(0, str(ROOT / "scripts"))
    import tiny_models

    tiny_models.bootstrap_comfy()
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    return tiny_models.load_by_path("prompt_anatomy", ROOT / "__init__.py", ROOT)


def load_sd15():
    """(model, clip, vae) of the random SD1.5 checkpoint (scripts/make_sd15_checkpoint.py writes it)."""
    if not CHECKPOINT.exists():
        raise SystemExit(f"{CHECKPOINT} is missing: run `.venv/bin/python scripts/make_sd15_checkpoint.py` first.")
    import comfy.sd

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(CHECKPOINT), output_vae=True, output_clip=True)
    return model, clip, vae


def encode(clip, text: str):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def report(result: dict, as_json: bool) -> None:
    """Every benchmark's tail: one JSON line, or one aligned "name: value" line per figure."""
    if as_json:
        print(json.dumps(result))
        return
    width = max(len(k) for k in result)
    for k, v in result.items():
        print(f"{k:>{width}}: {v}")
