"""Browser tier: the pack's workflows load in the real frontend and run on the server, in the classic canvas and in
Nodes 2.0 (see conftest.py); every report a run sends (ui "text") is shown in its node's report widget."""
from __future__ import annotations

import json

import harness
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.timeout(900)]

WORKFLOWS = harness.workflow_files()
REPORT_WIDGET = "prompt_anatomy_report"  # js/prompt_anatomy.js
FIT_LINES = 12  # reports this short must show whole (the widget grows its node by up to 600 px)

# For each node id: centre the node at zoom 1 (so either renderer draws its widgets), then report the value of its
# report widget and the text a person sees: the widget's own element (classic canvas: a textarea laid over the
# canvas) or the textareas inside the node's DOM element [data-node-id] (Nodes 2.0).
REPORT_WIDGETS_JS = """async ([ids, name, vue]) => {
  const out = {};
  for (const id of ids) {
    const n = app.graph.getNodeById(Number(id)) ?? app.graph.getNodeById(id);
    if (!n) { out[id] = {error: 'node not in the graph'}; continue; }
    const ds = app.canvas.ds;
    ds.scale = 1; ds.offset[0] = 320 - n.pos[0]; ds.offset[1] = 140 - n.pos[1];
    app.canvas.setDirty(true, true);
    await new Promise(r => setTimeout(r, 250));
    const w = (n.widgets || []).find(w => w.name === name);
    await new Promise(r => setTimeout(r, 250));  // the report box grows on the draw after it is laid out
    app.canvas.setDirty(true, true);
    await new Promise(r => setTimeout(r, 250));
    let boxes = [];
    if (vue) {
      const el = document.querySelector(`[data-node-id="${n.id}"]`);
      boxes = el ? [...el.querySelectorAll('textarea')] : [];
    } else {
      const el = w?.element ?? w?.inputEl;
      boxes = el && el.isConnected ? [el] : [];
    }
    const shown = boxes.map(t => t.value);
    const hidden = boxes.filter(t => t.value === w?.value).map(t => t.scrollHeight - t.clientHeight);
    out[id] = {type: n.type, widget: !!w, value: w?.value ?? null, shown, hidden};
  }
  return out;
}"""


def check_reports(page, entry: dict, name: str) -> int:
    """Every pack node whose run sent a text report shows exactly that text in its report widget; returns how many."""
    texts = {nid: "\n".join(out["text"]) if isinstance(out.get("text"), list) else str(out["text"])
             for nid, out in (entry.get("outputs") or {}).items() if out.get("text") is not None}
    if not texts:
        return 0
    seen = page.evaluate(REPORT_WIDGETS_JS, [sorted(texts), REPORT_WIDGET, getattr(page, "renderer", "classic") == "vue"])
    wrong = {}
    for nid, text in texts.items():
        got = seen[nid]
        if not got.get("widget"):
            continue  # a core node with ui text (none in the shipped workflows) has no report widget
        if got["value"] != text or text not in got["shown"]:
            wrong[nid] = {"type": got.get("type"), "want": text[:200], "value": (got["value"] or "")[:200],
                          "shown": [t[:200] for t in got["shown"]]}
    assert not wrong, f"{name}: report widgets do not show the run's reports:\n{json.dumps(wrong, indent=1)}"
    # a report of up to FIT_LINES lines is read whole: its box hides nothing (js/prompt_anatomy.js grows the node;
    # nodes that also show images keep their size)
    clipped = {nid: {"type": seen[nid].get("type"), "lines": text.count("\n") + 1, "hidden_px": seen[nid]["hidden"]}
               for nid, text in texts.items() if seen[nid].get("widget") and text.count("\n") < FIT_LINES
               and not (entry["outputs"][nid].get("images")) and any(h > 2 for h in seen[nid].get("hidden") or [])}
    assert not clipped, f"{name}: report boxes clip short reports:\n{json.dumps(clipped, indent=1)}"
    return len(texts)


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
        _, entry = queue_and_wait(page, comfy_server, workflow.name)
        # 4. the reports it sent are shown in the nodes (js/prompt_anatomy.js), in either renderer
        check_reports(page, entry, workflow.name)
    except BaseException:
        shot = f"{workflow.stem}-FAILED"
        raise
    finally:
        for stale in (f"{workflow.stem}.png", f"{workflow.stem}-FAILED.png"):
            (harness.BROWSER_ARTIFACTS / stale).unlink(missing_ok=True)
        harness.dump_page(page, shot)
