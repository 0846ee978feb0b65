"""Browser tier: the pack's locales/ reach the real frontend. ComfyUI serves locales/<lang>/nodeDefs.json at
/i18n; with the frontend's language set to Chinese (setting Comfy.Locale = "zh") a pack node shows its translated
title and input names, in the classic canvas and in Nodes 2.0. The files themselves: tests/unit/test_locales.py."""
from __future__ import annotations

import json

import harness
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]

ZH = json.loads((harness.ROOT / "locales" / "zh" / "nodeDefs.json").read_text())
NODE = "GuidanceCutoffKSampler"
INPUT = "cutoff"

# Adds one NODE to an empty graph and reports its title and the label of its INPUT widget, as the canvas has them,
# and (Nodes 2.0) the text of its DOM element.
NODE_TEXT_JS = """async ([type, input, vue]) => {
  app.graph.clear();
  const n = LiteGraph.createNode(type);
  n.pos = [300, 200];
  app.graph.add(n);
  app.canvas.ds.scale = 1; app.canvas.ds.offset[0] = 0; app.canvas.ds.offset[1] = 0;
  app.canvas.setDirty(true, true);
  await new Promise(r => setTimeout(r, 800));
  const w = (n.widgets || []).find(w => w.name === input);
  const el = vue ? document.querySelector(`[data-node-id="${n.id}"]`) : null;
  return {classTitle: LiteGraph.registered_node_types[type]?.title, title: n.title, label: w?.label ?? null,
          dom: el ? el.innerText : null};
}"""


def test_i18n_serves_the_pack_locales(base_url):
    served = harness.get_json(base_url, "/i18n")
    for lang in ("en", "zh"):
        mine = json.loads((harness.ROOT / "locales" / lang / "nodeDefs.json").read_text())
        got = (served.get(lang) or {}).get("nodeDefs") or {}
        missing = sorted(set(mine) - set(got))
        assert not missing, f"/i18n {lang}: nodeDefs of {missing} not served"
        assert got[NODE] == mine[NODE]


# Measured 2026-11-29: the pinned 1.32.9 frontend keeps a custom node's English title and input labels after
# Comfy.Locale = zh although /i18n serves the pack's zh nodeDefs (test above); 1.58.1 translates them.
UNTRANSLATED_FRONTENDS = {"1.32.9"}


def test_chinese_locale_shows_translated_node_title(browser, base_url, renderer):
    want_title = ZH[NODE]["display_name"]
    want_label = ZH[NODE]["inputs"][INPUT]["name"]
    page = None
    try:
        page = harness.open_frontend(browser, base_url, renderer=renderer, settings={"Comfy.Locale": "zh"})
        if page.frontend_version in UNTRANSLATED_FRONTENDS:
            pytest.skip(f"frontend {page.frontend_version} does not apply custom-node locales to node titles")
        got = page.evaluate(NODE_TEXT_JS, [NODE, INPUT, renderer == "vue"])
        shots = harness.browser_artifacts(page.frontend_version, renderer)
        shots.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shots / "locale-zh.png"))  # (CJK glyphs need a font such as fonts-noto-cjk)
        assert got["classTitle"] == want_title, got
        assert got["title"] == want_title, got
        assert got["label"] == want_label, got
        if renderer == "vue":
            assert want_title in (got["dom"] or "") and want_label in got["dom"], got
    finally:
        if page is not None:
            page.close()
        harness.post_json(base_url, "/settings", {"Comfy.Locale": "en"})  # the other tests' pages stay English
