"""Server tier: the real ComfyUI (CPU) with the pack loaded; see tests/harness.py and tests/conftest.py."""
from __future__ import annotations

from pathlib import Path

import pytest

# comfy_server, base_url and object_info come from tests/conftest.py (shared with the browser tier)


def pytest_configure(config):
    config.addinivalue_line("markers", "server: needs the real ComfyUI server (slow; tests/server)")


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.server)
