"""Browser tier: the pack's workflows load in the real frontend (1.32.9) and run on the server."""
from __future__ import annotations

import json

import harness
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.timeout(900)]

WORKFLOWS = harness.workflow_files()


def test_frontend_loads_pack_extensions(app_page, comfy_server, pack_errors):
    """Every pack JS file the server lists was fetched by the page, and none of them threw."""
    listed = [p for p in harness.get_json(comfy_server.base_url, "/extensions")
              if p.startswith(f"/extensions/{harness.PACK_NAME}/")]
    if not listed:
        pytest.skip("the pack serves no JS extension yet")
    page = app_page
    not_loaded = {p: page.pack_js.get(p) for p in listed if page.pack_js.get(p) != 200}
    assert not not_loaded, f"pack JS not loaded by the page (path: HTTP status or None): {not_loaded}"
    errors = pack_errors(page.page_errors + page.console_errors)
    assert not errors, "pack JS errors in the page:\n" + "\n".join(errors)


def test_pack_nodes_create_in_frontend(app_page, comfy_server, pack_errors):
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
    errors = pack_errors(app_page.page_errors)
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize(
    "workflow",
    WORKFLOWS or [pytest.param(None, marks=pytest.mark.skip(reason="the pack has no workflows/*.json yet"))],
    ids=lambda p: p.stem if p else "none")
def test_workflow_loads_and_runs(workflow, app_page, comfy_server, load_workflow, queue_and_wait):
    page, base_url = app_page, comfy_server.base_url
    data = json.loads(workflow.read_text())
    shot = f"{workflow.stem}"
    try:
        # 1. load: no missing node types, no missing-nodes/models dialog
        load_workflow(page, data, workflow.name)
        not_here = harness.missing_optional_models(
            base_url, [v for n in data["nodes"] for v in harness.widget_values(n)])
        if not_here:
            pytest.skip(f"{workflow.name} loads cleanly; not run here: " + "; ".join(not_here))

        # 2. queue as the Queue button does, 3. wait for the server to finish it (no pack JS errors)
        queue_and_wait(page, comfy_server, workflow.name)
    except BaseException:
        shot = f"{workflow.stem}-FAILED"
        raise
    finally:
        for stale in (f"{workflow.stem}.png", f"{workflow.stem}-FAILED.png"):
            (harness.BROWSER_ARTIFACTS / stale).unlink(missing_ok=True)
        harness.dump_page(page, shot)
