"""Shared by every tier: the one ComfyUI server of a pytest session (tests/harness.py starts it).

The server and browser tiers use the same fixtures (``comfy_server``, ``base_url``, ``object_info``), so a
session that collects both tiers starts one server; the unit tier never asks for them, so it starts none.
Only ``tests/`` goes on sys.path (never the checkout root: its ``nodes/`` package would shadow ComfyUI's
``nodes`` module), which makes ``harness`` one module object for the whole session.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

import harness  # noqa: E402


@pytest.fixture(scope="session")
def comfy_server():
    """The session's ComfyUI server (server and browser tiers), killed at session end."""
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


def pytest_report_header(config):
    """Which ComfyUI tree and frontend this session's server uses (printed at the top of every run)."""
    return harness.describe_setup()


def pytest_terminal_summary(terminalreporter):
    """One line per browser run: which frontend version and renderer, and how long its tests took."""
    if not harness.BROWSER_RUNS:
        return
    terminalreporter.section("prompt-anatomy browser runs")
    terminalreporter.write_line(harness.describe_setup())
    for run in harness.BROWSER_RUNS:
        took = f"{run['seconds']:.0f} s" if run["seconds"] is not None else "?"
        terminalreporter.write_line(f"frontend {run['frontend']:<10} renderer {run['renderer']:<8} {took}")
