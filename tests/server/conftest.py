"""Server tier: the real ComfyUI (CPU) with the pack loaded; see tests/harness.py."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

_TESTS = str(Path(__file__).resolve().parent.parent)
if _TESTS not in sys.path:  # tests/ only, never the checkout root (its nodes/ shadows ComfyUI's)
    sys.path.insert(0, _TESTS)

import harness  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "server: needs the real ComfyUI server (slow; tests/server)")


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.server)


@pytest.fixture(scope="session")
def comfy_server():
    """The session's ComfyUI server (shared with the browser tier), killed at session end."""
    server = harness.acquire_server()
    try:
        yield server
    finally:
        harness.release_server()


@pytest.fixture(scope="session")
def base_url(comfy_server) -> str:
    return comfy_server.base_url


@pytest.fixture(scope="session")
def object_info(base_url) -> dict:
    return harness.get_json(base_url, "/object_info", timeout=60)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    harness.attach_server_log(item, outcome.get_result())
