"""Browser tier: the node search (double-click on the empty canvas, type) finds the pack's nodes by the pack's
name and by the words a user would type (js/search_aliases.js), on frontends whose search reads search_aliases."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import harness
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]

# query -> node ids that must be among the results
QUERIES = {
    "prompt anatomy": ["GuidanceCutoffKSampler", "EOSConditioningSwap", "TextLayerPatch", "CrossAttentionMapViewer",
                       "FrequencySplitPreview"],
    "cfg cutoff": ["GuidanceCutoffKSampler", "GuidanceCutoffGuider", "GuidanceCutoffPatch"],
    "attention map": ["CrossAttentionCapture", "CrossAttentionMapViewer"],
    "heatmap": ["CrossAttentionMapViewer"],
    "eos": ["EOSConditioningSwap"],
    "text edit": ["TextLayerPatch", "TextLayerLocalize"],
    "frequency": ["FrequencySplitPreview", "FrequencySplit"],
    "low pass": ["FrequencySplitPreview", "FrequencySplitImage"],
}

OPTIONS_JS = """() => [...document.querySelectorAll('[role=option]')].map(e => e.innerText.replace(/\\s+/g, ' '))"""


def _static_dir() -> Path | None:
    root = harness.comfy_path.frontend_root()
    if root is not None:
        return root
    spec = importlib.util.find_spec("comfyui_frontend_package")
    return Path(spec.origin).parent / "static" if spec and spec.origin else None


def _search_reads_aliases() -> bool:
    """Whether the served frontend's node search indexes search_aliases (a key of its Fuse index)."""
    static = _static_dir()
    pattern = re.compile(r"keys:\[[^\]]{0,80}search_aliases")
    return static is not None and any(pattern.search(p.read_text(errors="ignore"))
                                      for p in (static / "assets").glob("*.js"))


def _search(page, query: str) -> list[str]:
    page.evaluate("() => { app.graph.clear(); app.canvas.setDirty(true, true); }")
    page.wait_for_timeout(300)
    page.mouse.dblclick(700, 500)
    page.wait_for_selector("[role=dialog] input, .p-autocomplete-input", timeout=15000)
    page.keyboard.type(query, delay=20)
    page.wait_for_timeout(1200)
    found = page.evaluate(OPTIONS_JS)
    page.keyboard.press("Escape")
    page.wait_for_timeout(300)
    return found


def test_node_search_finds_pack_nodes_by_name_and_words(app_page, comfy_server):
    if not _search_reads_aliases():
        pytest.skip(f"frontend {app_page.frontend_version}'s node search reads only names and display names, "
                    f"not search_aliases")
    info = harness.get_json(comfy_server.base_url, "/object_info")
    shown = {nid: info[nid]["display_name"] for ids in QUERIES.values() for nid in ids}
    missing = {}
    for query, ids in QUERIES.items():
        found = _search(app_page, query)
        lost = [nid for nid in ids if not any(opt.startswith(shown[nid] + " ") for opt in found)]
        if lost:
            missing[query] = {"not found": lost, "results": [o[:60] for o in found]}
    assert not missing, f"node search misses pack nodes: {missing}"
