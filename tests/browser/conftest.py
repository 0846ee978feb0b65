"""Browser tier: Debian chromium driven by Python playwright against the real ComfyUI frontend."""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import pytest

_TESTS = str(Path(__file__).resolve().parent.parent)
if _TESTS not in sys.path:  # tests/ only, never the checkout root (its nodes/ shadows ComfyUI's)
    sys.path.insert(0, _TESTS)

import harness  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: drives the ComfyUI frontend in chromium (slow; tests/browser)")


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="session")
def comfy_server():
    """The session's ComfyUI server (shared with the server tier), killed at session end."""
    server = harness.acquire_server()
    try:
        yield server
    finally:
        harness.release_server()


@pytest.fixture(scope="session")
def base_url(comfy_server) -> str:
    return comfy_server.base_url


@pytest.fixture(scope="session")
def browser():
    if not Path(harness.CHROMIUM).exists():
        pytest.fail(f"{harness.CHROMIUM} missing: run scripts/install_browser.sh")
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="prompt-anatomy-chromium-")
    with sync_playwright() as pw:
        context = harness.launch_browser(pw, profile)
        try:
            yield context
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="session")
def _session_page(browser, base_url):
    page = harness.open_frontend(browser, base_url)
    yield page
    page.close()


@pytest.fixture
def app_page(_session_page, base_url):
    """The frontend page with window.app ready; reloaded if an earlier test left it broken."""
    page = _session_page
    harness.ensure_frontend(page, base_url)
    page.console_errors.clear()
    return page


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    harness.attach_server_log(item, outcome.get_result())
