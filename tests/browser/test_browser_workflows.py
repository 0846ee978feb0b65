"""Browser tier: the pack's workflows load in the real frontend (1.32.9) and run on the server."""
from __future__ import annotations

import json
import time

import harness
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.timeout(900)]

WORKFLOWS = harness.workflow_files()
RUN_TIMEOUT_S = 600.0


def _pack_errors(errors: list[str]) -> list[str]:
    return [e for e in errors if f"/extensions/{harness.PACK_NAME}/" in e]


def test_frontend_loads_pack_extensions(app_page, comfy_server):
    """Every pack JS file the server lists was fetched by the page, and none of them threw."""
    listed = [p for p in harness.get_json(comfy_server.base_url, "/extensions")
              if p.startswith(f"/extensions/{harness.PACK_NAME}/")]
    if not listed:
        pytest.skip("the pack serves no JS extension yet")
    page = app_page
    not_loaded = {p: page.pack_js.get(p) for p in listed if page.pack_js.get(p) != 200}
    assert not not_loaded, f"pack JS not loaded by the page (path: HTTP status or None): {not_loaded}"
    errors = _pack_errors(page.page_errors + page.console_errors)
    assert not errors, "pack JS errors in the page:\n" + "\n".join(errors)


def test_pack_nodes_create_in_frontend(app_page, comfy_server):
    """LiteGraph can create every pack node (widgets built from /object_info, JS hooks run)."""
    info = harness.get_json(comfy_server.base_url, "/object_info")
    types = sorted(harness.pack_nodes(info))
    if not types:
        pytest.fail("the pack registered no nodes on the server (see test_pack_nodes_listed / server log)")
    result = app_page.evaluate("""(types) => {
        const out = {};
        for (const t of types) {
          try {
            if (!(t in LiteGraph.registered_node_types)) { out[t] = 'not registered in LiteGraph'; continue; }
            const n = LiteGraph.createNode(t);
            if (!n) { out[t] = 'createNode returned null'; continue; }
            app.graph.add(n); app.graph.remove(n);
          } catch (e) { out[t] = String(e && e.stack || e); }
        }
        return out;
    }""", types)
    assert not result, "pack nodes the frontend cannot create:\n" + json.dumps(result, indent=1)
    errors = _pack_errors(app_page.page_errors)
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize(
    "workflow",
    WORKFLOWS or [pytest.param(None, marks=pytest.mark.skip(reason="the pack has no workflows/*.json yet"))],
    ids=lambda p: p.stem if p else "none")
def test_workflow_loads_and_runs(workflow, app_page, comfy_server):
    page, base_url = app_page, comfy_server.base_url
    data = json.loads(workflow.read_text())
    assert isinstance(data.get("nodes"), list), f"{workflow.name} is not a UI-format workflow (no 'nodes' list)"
    shot = f"{workflow.stem}"
    try:
        # 1. load: no missing node types, no missing-nodes/models dialog
        loaded = page.evaluate(harness.LOAD_WORKFLOW_JS, [data, workflow.name])
        problems = {k: loaded[k] for k in ("unknownBefore", "unknownAfter", "missingNodes", "missingModels", "dialogs",
                                                       "toasts")
                    if loaded[k]}
        assert not problems, f"{workflow.name} does not load cleanly: {json.dumps(problems, indent=1)}"
        assert loaded["nodeCount"] == len(data["nodes"]), loaded

        # 2. queue as the Queue button does and find the prompt id
        before = set(harness.get_json(base_url, "/history"))
        queued = page.evaluate(harness.QUEUE_JS)
        # (app.queuePrompt's boolean is unreliable in 1.32.9: it returns !node_errors and {} is
        # truthy, so judge by what POST /prompt answered)
        responses = [c for c in queued["captured"] if c.get("ok") and not (c.get("response") or {}).get("node_errors")]
        if not responses:
            detail = [c.get("response") or c.get("error") for c in queued["captured"]]
            pytest.fail(f"{workflow.name}: queueing failed (POST /prompt): "
                        f"{harness.format_rejection(detail[0]) if detail and isinstance(detail[0], dict) else detail}")
        prompt_id = responses[-1]["response"].get("prompt_id")
        if not prompt_id:  # fall back to whatever appeared in /queue or /history
            q = harness.get_json(base_url, "/queue")
            ids = {item[1] for item in q.get("queue_running", []) + q.get("queue_pending", [])}
            ids |= set(harness.get_json(base_url, "/history")) - before
            assert len(ids) == 1, f"cannot identify the queued prompt: {ids}"
            prompt_id = ids.pop()

        # 3. wait for the server to finish it
        t0 = time.monotonic()
        entry = harness.wait_for_prompt(base_url, prompt_id, timeout=RUN_TIMEOUT_S, server=comfy_server)
        print(f"{workflow.name}: prompt {prompt_id} ran in {time.monotonic() - t0:.1f} s, "
              f"outputs from nodes {sorted(entry.get('outputs', {}))}")
        page.wait_for_timeout(500)  # let the page draw the previews it received
        errors = _pack_errors(page.page_errors)
        assert not errors, "pack JS errors while loading/running:\n" + "\n".join(errors)
    except BaseException:
        shot = f"{workflow.stem}-FAILED"
        raise
    finally:
        for stale in (f"{workflow.stem}.png", f"{workflow.stem}-FAILED.png"):
            (harness.BROWSER_ARTIFACTS / stale).unlink(missing_ok=True)
        harness.dump_page(page, shot)
