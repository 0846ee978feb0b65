"""Unit tier: real ComfyUI imported in-process (CPU), the pack loaded as package ``prompt_anatomy``
(the way ComfyUI loads it: by file location, never by putting the checkout on sys.path), tiny models."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


sys.path.insert(0, str(ROOT / "scripts"))  # scripts/ only: the checkout's nodes/ would shadow ComfyUI's
import tiny_models  # noqa: E402

tiny_models.bootstrap_comfy()

import comfy.model_management  # noqa: E402,F401
import comfy.utils  # noqa: E402
import torch  # noqa: E402

comfy.utils.PROGRESS_BAR_ENABLED = False

tiny_models.load_by_path("prompt_anatomy", ROOT / "__init__.py", ROOT)
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

support = tiny_models.load_by_path("pa_support", Path(__file__).with_name("support.py"))
tiny = support.tiny


@pytest.fixture(scope="session")
def sd1():
    return tiny("sd1")


@pytest.fixture(scope="session")
def sdxl():
    return tiny("sdxl")


@pytest.fixture(scope="session")
def sd3():
    return tiny("sd3")


@pytest.fixture(scope="session")
def flux():
    return tiny("flux")


@pytest.fixture(scope="session")
def sd2():
    return tiny("sd2")


def pytest_sessionfinish(session, exitstatus):
    """Free the tiny models while ComfyUI's modules still exist (ModelPatcher.__del__ at interpreter
    shutdown otherwise prints AttributeErrors)."""
    import gc

    import comfy.model_management

    support._CACHE.clear()
    comfy.model_management.unload_all_models()
    comfy.model_management.current_loaded_models.clear()
    gc.collect()
