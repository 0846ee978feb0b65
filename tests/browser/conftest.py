"""Browser tier: Debian chromium driven by Python playwright against the real ComfyUI frontend.

Every test that uses a page runs once per renderer of $PROMPT_ANATOMY_RENDERERS (default "classic vue"): the
LiteGraph canvas, and Nodes 2.0 (the frontend setting ``Comfy.VueNodes.Enabled``, Vue components in the DOM).
Both share the session's one server (tests/conftest.py); the frontend is whatever that server serves
($PROMPT_ANATOMY_FRONTEND_ROOT, else the venv's comfyui-frontend-package; see scripts/comfy_path.py)."""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import harness  # tests/ is on sys.path (tests/conftest.py), which also has comfy_server and base_url
import pytest

RUN_TIMEOUT_S = 600.0


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: drives the ComfyUI frontend in chromium (slow; tests/browser)")


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.browser)


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


@pytest.fixture(scope="session", params=harness.renderers())
def renderer(request) -> str:
    """"classic" (LiteGraph canvas) or "vue" (Nodes 2.0): the renderer the session page was opened with."""
    return request.param


@pytest.fixture(scope="session")
def _session_page(browser, base_url, renderer):
    harness.reset_execution_cache(base_url)  # every renderer runs the workflows for real, not from the cache
    page = harness.open_frontend(browser, base_url, renderer=renderer)
    harness.BROWSER_ARTIFACTS = harness.browser_artifacts(page.frontend_version, renderer)
    print(f"\n[browser tier] frontend {page.frontend_version}, renderer {renderer} ({base_url})")
    run = harness.note_browser_run(page.frontend_version, renderer)
    yield page
    page.close()
    run["seconds"] = time.monotonic() - run["t0"]


@pytest.fixture
def app_page(_session_page, base_url):
    """The frontend page with window.app ready; reloaded if an earlier test left it broken."""
    page = _session_page
    harness.ensure_frontend(page, base_url)
    page.console_errors.clear()
    return page


def _pack_errors(errors: list[str]) -> list[str]:
    return [e for e in errors if f"/extensions/{harness.PACK_NAME}/" in e]


def _load_workflow(page, data: dict, name: str) -> dict:
    """Load a UI-format workflow with app.loadGraphData; fail the test when it does not load cleanly
    (unknown node types, missing nodes/models dialogs, error toasts, nodes lost)."""
    assert isinstance(data.get("nodes"), list), f"{name} is not a UI-format workflow (no 'nodes' list)"
    loaded = page.evaluate(harness.LOAD_WORKFLOW_JS, [data, name])
    problems = {k: loaded[k] for k in ("unknownBefore", "unknownAfter", "missingNodes", "missingModels", "dialogs",
                                       "toasts")
                if loaded[k]}
    assert not problems, f"{name} does not load cleanly: {json.dumps(problems, indent=1)}"
    assert loaded["nodeCount"] == len(data["nodes"]), loaded
    return loaded


def _queue_and_wait(page, server, name: str, timeout: float = RUN_TIMEOUT_S) -> tuple[str, dict]:
    """Queue the loaded graph as the Queue button does, wait until the server finished it (PromptFailed on an
    execution error), let the page draw what it received and fail on pack JS errors; return (prompt_id, entry)."""
    base_url = server.base_url
    before = set(harness.get_json(base_url, "/history"))
    queued = page.evaluate(harness.QUEUE_JS)
    # (app.queuePrompt's boolean is unreliable in 1.32.9: it returns !node_errors and {} is
    # truthy, so judge by what POST /prompt answered)
    responses = [c for c in queued["captured"] if c.get("ok") and not (c.get("response") or {}).get("node_errors")]
    if not responses:
        detail = [c.get("response") or c.get("error") for c in queued["captured"]]
        pytest.fail(f"{name}: queueing failed (POST /prompt): "
                    f"{harness.format_rejection(detail[0]) if detail and isinstance(detail[0], dict) else detail}")
    prompt_id = responses[-1]["response"].get("prompt_id")
    if not prompt_id:  # fall back to whatever appeared in /queue or /history
        q = harness.get_json(base_url, "/queue")
        ids = {item[1] for item in q.get("queue_running", []) + q.get("queue_pending", [])}
        ids |= set(harness.get_json(base_url, "/history")) - before
        assert len(ids) == 1, f"cannot identify the queued prompt: {ids}"
        prompt_id = ids.pop()

    t0 = time.monotonic()
    entry = harness.wait_for_prompt(base_url, prompt_id, timeout=timeout, server=server)
    print(f"{name}: prompt {prompt_id} ran in {time.monotonic() - t0:.1f} s, "
          f"outputs from nodes {sorted(entry.get('outputs', {}))}")
    page.wait_for_timeout(500)  # let the page draw the previews it received
    errors = _pack_errors(page.page_errors)
    assert not errors, f"pack JS errors while loading/running {name}:\n" + "\n".join(errors)
    return prompt_id, entry


@pytest.fixture(scope="session")
def pack_errors():
    """``pack_errors(messages)``: the page/console error messages that come from the pack's JS files."""
    return _pack_errors


@pytest.fixture(scope="session")
def load_workflow():
    """``load_workflow(page, data, name)``: load a UI-format workflow in the frontend; fails unless clean."""
    return _load_workflow


@pytest.fixture(scope="session")
def queue_and_wait():
    """``queue_and_wait(page, server, name)``: queue the loaded graph, wait for it, return (prompt_id, entry)."""
    return _queue_and_wait
