"""Build the pack's UI-format workflows (workflows/<name>.json + workflows/<name>.jpg) from the
API-format specs in scripts/workflow_specs/<name>.json, through the real ComfyUI frontend.

    .venv/bin/python scripts/build_workflows.py [names...]          build (all specs by default)
    .venv/bin/python scripts/build_workflows.py [names...] --check  exit 1 if any workflow is missing
                                                                    or stale (no server, no browser)

A spec is exactly a POST /prompt "prompt" (nodes may carry "_meta": {"title": ...}), plus an optional "_ui" key
(not part of the prompt): {"about": one line, what it shows; "needs": the model files a user must supply and their
folders; "groups": [{"title", "note", "nodes": [ids]}]; "demo": the name of an existing demo_ spec}. Every
workflow has a demo counterpart on the pack's demo model: a twin ``{"demo_twin_of": BASE, ...}`` (see demo_twin),
or, for a workflow on a model family whose twin would only repeat an existing demo (or cannot show its subject,
e.g. video), ``"_ui": {"demo": "demo_<name>"}`` naming that demo; the builder checks that it exists and runs on the
demo model, and the About note says to try the technique there first. For each spec the builder, in one ComfyUI
server + one headless Debian chromium (tests/harness.py):

1. calls the frontend's own ``app.loadApiJson(spec, "<name>.json")`` (frontend 1.32.9), which
   creates the nodes, sets widget values, links them and applies the ``_meta`` titles; sets every
   "control after generate" widget to ``fixed`` (the spec's seeds are part of the experiment:
   three samplers compared at seed 42 must stay at 42) and gives image-preview nodes room for
   their images; checks that ``app.graphToPrompt`` of the result is the spec;
2. queues it as the Run button does and waits until the server finished it and the previews are
   loaded in the page; nodes that show images grow when they arrive, so the graph is then laid out
   left to right by dependency depth with the grown sizes (positions computed here from the
   spec's links: deterministic, no overlaps) and serialized with ``app.graph.serialize()`` (what
   the frontend's Save/Export write);
3. makes that deterministic: links renumbered 1..N in creation order, a uuid5 workflow id from the
   name, a fixed view (``extra.ds``), and ``extra.prompt_anatomy`` = {spec path, sha256 of the
   spec's canonical JSON, builder version} so --check and tests/browser/test_workflow_specs.py can
   tell a stale workflow without a server;
4. takes the thumbnail: a screenshot of the executed graph (menus hidden, whole graph in view, full
   detail, 64 px previews magnified) downscaled to a 512 x 512 JPEG (the template browser shows
   custom-node templates as ``/api/workflow_templates/<pack>/<name>.jpg`` in square cards);
5. loads the file it is about to write with ``app.loadGraphData``, as a user would: no missing node
   types or models, no validation toast, and ``app.graphToPrompt`` equals the spec (every node,
   class, title, link and widget value).

Files are only written when all of this succeeded; a failing spec is reported with the server's
error text and leaves the old files alone. Exit status: 0 all built/up to date, 1 otherwise.
Set PROMPT_ANATOMY_SERVER_URL to use a running server instead of starting one; the server log is
tests/_artifacts/build-workflows-server.log, full-size screenshots go to tests/_artifacts/browser/.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPECS_DIR = ROOT / "scripts" / "workflow_specs"
WORKFLOWS_DIR = ROOT / "workflows"
TESTS_DIR = ROOT / "tests"

# Bump when the builder's output format changes: every workflow then reads as stale.
BUILDER_VERSION = 1
EXTRA_KEY = "prompt_anatomy"
DEMO_LOADER = "PromptAnatomyDemoLoader"
# a spec's "_ui" key (not part of the prompt): {"about": one line shown on the thumbnail and in the first Note,
# "needs": the model a user must supply (full-size workflows), "groups": [{"title", "note", "nodes": [ids]}],
# "demo": the existing demo_ spec that shows the same technique on the demo model, for a base spec without a twin}
UI_KEY = "_ui"
UI_KEYS = ("about", "needs", "groups", "demo")
UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/prompt-anatomy/comfyui-prompt-anatomy/workflows")

# layout (graph units)
ORIGIN = (0, 0)
COLUMN_GAP = 80
ROW_GAP = 50
TITLE_H = 30  # LiteGraph.NODE_TITLE_HEIGHT: a node's title bar sits above node.pos
PREVIEW_SIZE = {"PreviewImage": (260, 300), "SaveImage": (260, 330), "PreviewAny": (360, 220)}
GROUP_PAD = 30  # space between a group's frame and its nodes
GROUP_HEADER = 50  # a group's title bar (font 24)
GROUP_GAP = 90  # between groups
NOTE_W, NOTE_LINE_H, NOTE_MIN_H = 460, 20, 90  # Note nodes: width, text line height, minimum height
READABLE_SCALE = 0.7  # the opening view of a grouped workflow is at least this zoom (text drawn in full)
# the view stored in extra.ds is fitted to this canvas size
VIEW_W, VIEW_H = 1400, 860

# thumbnail: a caption band above the screenshot carries the one-line description (the template browser
# shows custom-node templates with their file name as title and description, nothing else)
CAPTION_H = 84
THUMB_VIEWPORT = (1280, 1280)  # square: the template browser shows thumbnails in aspect-square cards
THUMB_PREVIEW_PX = 256  # previews smaller than this (64 px test images) are magnified for the thumbnail
THUMB_WIDTH = 512
THUMB_QUALITY = 85
RUN_TIMEOUT_S = 900.0


# ---------------------------------------------------------------------------------------------
# specs, hashes, staleness (no server needed)
# ---------------------------------------------------------------------------------------------
def spec_path(name: str) -> Path:
    return SPECS_DIR / f"{name}.json"


def workflow_path(name: str) -> Path:
    return WORKFLOWS_DIR / f"{name}.json"


def thumbnail_path(name: str) -> Path:
    return WORKFLOWS_DIR / f"{name}.jpg"


def spec_names() -> list[str]:
    return sorted(p.stem for p in SPECS_DIR.glob("*.json"))


def demo_twin(path: Path, twin: dict) -> dict:
    """The API prompt of a demo twin: ``{"demo_twin_of": BASE, "set": {...}, "remove": [...]}`` is BASE's spec
    with every CheckpointLoaderSimple replaced by PromptAnatomyDemoLoader (same outputs MODEL, CLIP, VAE),
    the node ids in ``remove`` dropped, and ``set`` applied: ``{node id: {input: value, "_meta": {...}}}``
    updates a node's inputs (links included); a full node (with ``class_type``) adds or replaces one."""
    unknown = set(twin) - {"demo_twin_of", "set", "remove", UI_KEY}
    base_name = twin.get("demo_twin_of")
    if unknown or not isinstance(base_name, str) or base_name.startswith("demo_"):
        raise ValueError(f"{path}: a demo twin has keys demo_twin_of (a base spec's name, not another twin), "
                         f"set, remove; got {sorted(twin)}")
    spec = json.loads(json.dumps(load_spec(base_name)))
    for node in spec.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["class_type"], node["inputs"] = DEMO_LOADER, {"weight_dtype": "default"}
            node["_meta"] = {"title": "Prompt Anatomy demo model"}
    for node_id in twin.get("remove", []):
        if spec.pop(str(node_id), None) is None:
            raise ValueError(f"{path}: remove lists node {node_id}, which {base_name} does not have")
    for node_id, change in (twin.get("set") or {}).items():
        if "class_type" in change:
            spec[node_id] = change
        elif node_id in spec:
            meta = change.get("_meta")
            spec[node_id]["inputs"].update({k: v for k, v in change.items() if k != "_meta"})
            if meta:
                spec[node_id]["_meta"] = meta
        else:
            raise ValueError(f"{path}: set changes node {node_id}, which {base_name} does not have "
                             "(give a full node with class_type to add one)")
    return dict(sorted(spec.items(), key=lambda kv: int(kv[0])))


def load_spec(name: str) -> dict:
    """The spec as a dict, checked to be a pure API prompt (a demo twin is derived first: demo_twin)."""
    path = spec_path(name)
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the spec as JSON: {exc}") from exc
    if isinstance(spec, dict) and "demo_twin_of" in spec:
        spec = demo_twin(path, spec)
    if isinstance(spec, dict):
        spec = {k: v for k, v in spec.items() if k != UI_KEY}
    if not isinstance(spec, dict) or not spec:
        raise ValueError(f"{path}: a spec must be a non-empty JSON object of nodes (POST /prompt format)")
    for node_id, node in spec.items():
        if not (isinstance(node, dict) and isinstance(node.get("class_type"), str)
                and isinstance(node.get("inputs", {}), dict)):
            raise ValueError(f"{path}: key {node_id!r} is not an API-format node "
                             '({"class_type": ..., "inputs": {...}}); top-level keys must all be nodes')
        if not node_id.isdigit():
            raise ValueError(f"{path}: node id {node_id!r} must be a positive integer string "
                             "(the frontend uses it as the UI node id)")
        for key, value in node.get("inputs", {}).items():
            if isinstance(value, list) and (len(value) != 2 or str(value[0]) not in spec):
                raise ValueError(f"{path}: node {node_id} input {key!r} links to {value!r}, "
                                 "which is not [existing node id, output index]")
    return spec


def load_ui(name: str) -> dict:
    """The spec's "_ui" (about, needs, groups) checked against its nodes. A demo twin's own "_ui" keys replace
    its base's; it inherits the base's about and groups (without the nodes it removed), never its "needs"."""
    path = spec_path(name)
    raw = json.loads(path.read_text())
    ui = dict(raw.get(UI_KEY) or {})
    spec = load_spec(name)
    if raw.get("demo_twin_of"):
        base = load_ui(raw["demo_twin_of"])
        if "about" in base:
            ui.setdefault("about", base["about"])
        if base.get("groups") and "groups" not in ui:
            ui["groups"] = [{**g, "nodes": [n for n in g["nodes"] if n in spec]} for g in base["groups"]]
    unknown = set(ui) - set(UI_KEYS)
    if unknown or not all(isinstance(ui.get(k, ""), str) for k in ("about", "needs", "demo")):
        raise ValueError(f"{path}: {UI_KEY} has the keys about and needs (one line of text each), groups and demo "
                         f"(a demo_ spec's name); got {sorted(ui)}")
    if "demo" in ui:
        check_demo_counterpart(path, ui["demo"], twin=bool(raw.get("demo_twin_of")))
    seen: set[str] = set()
    for group in ui.get("groups") or []:
        ids = [str(n) for n in group.get("nodes") or []]
        bad = [n for n in ids if n not in spec or n in seen]
        if not isinstance(group.get("title"), str) or not ids or bad:
            raise ValueError(f"{path}: every group needs a title and node ids of the spec, each in one group; "
                             f"group {group.get('title')!r} has {bad or 'no nodes'}")
        seen.update(ids)
        group["nodes"] = ids
    return ui


def check_demo_counterpart(path: Path, demo: str, twin: bool = False) -> None:
    """A base spec's ``"_ui": {"demo": NAME}``: NAME must be an existing demo_ spec that runs on the demo model."""
    if twin:
        raise ValueError(f"{path}: {UI_KEY}.demo names a base workflow's demo counterpart; a demo twin is one itself")
    if not (isinstance(demo, str) and demo.startswith("demo_") and spec_path(demo).is_file()):
        have = [n for n in spec_names() if n.startswith("demo_")]
        raise ValueError(f"{path}: {UI_KEY}.demo is {demo!r}, which is not a demo workflow's spec "
                         f"(scripts/workflow_specs/demo_<name>.json); have: {have}")
    if not any(node["class_type"] == DEMO_LOADER for node in load_spec(demo).values()):
        raise ValueError(f"{path}: {UI_KEY}.demo names {demo}, which does not run on the demo model ({DEMO_LOADER})")


def spec_hash(spec: dict) -> str:
    """sha256 of the spec's canonical JSON (key order and whitespace do not matter)."""
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def build_stamp(name: str, spec: dict) -> dict:
    ui = load_ui(name)
    return {"spec": f"scripts/workflow_specs/{name}.json", "spec_sha256": spec_hash({**spec, UI_KEY: ui} if ui else spec),
            "builder_version": BUILDER_VERSION}


def staleness(name: str) -> list[str]:
    """Why workflows/<name>.json (+ .jpg) is not an up-to-date build of its spec ([] = up to date)."""
    problems = []
    wf_file, jpg_file = workflow_path(name), thumbnail_path(name)
    if not spec_path(name).is_file():
        return [f"{wf_file.name} has no spec {spec_path(name).relative_to(ROOT)}"]
    try:
        spec = load_spec(name)
    except ValueError as exc:
        return [str(exc)]
    if not wf_file.is_file():
        problems.append(f"{wf_file.relative_to(ROOT)} missing")
    else:
        try:
            stamp = (json.loads(wf_file.read_text()).get("extra") or {}).get(EXTRA_KEY)
        except ValueError as exc:
            stamp = None
            problems.append(f"{wf_file.relative_to(ROOT)} is not valid JSON: {exc}")
        want = build_stamp(name, spec)
        if stamp != want and not problems:
            problems.append(f"{wf_file.relative_to(ROOT)} is stale: built from {stamp}, spec is now {want}")
    if not jpg_file.is_file():
        problems.append(f"{jpg_file.relative_to(ROOT)} missing")
    return problems


def check(names: list[str]) -> list[str]:
    """All problems of the given specs plus orphan workflows/*.json (no spec) and *.jpg (no json)."""
    problems = []
    for name in names:
        problems += staleness(name)
    specs = set(spec_names())
    for wf in sorted(WORKFLOWS_DIR.glob("*.json")):
        if wf.stem not in specs:
            problems.append(f"{wf.relative_to(ROOT)} has no spec scripts/workflow_specs/{wf.name} "
                            "(workflows are generated: add the spec or delete the workflow)")
    for jpg in sorted(WORKFLOWS_DIR.glob("*.jpg")):
        if not workflow_path(jpg.stem).is_file():
            problems.append(f"{jpg.relative_to(ROOT)} has no workflow {jpg.stem}.json")
    return problems


# ---------------------------------------------------------------------------------------------
# layout (pure; positions from the spec's links and the node sizes the frontend computed)
# ---------------------------------------------------------------------------------------------
def spec_edges(spec: dict) -> dict[str, list[str]]:
    """node id -> ids of the nodes it takes links from (in input order, unique)."""
    edges = {}
    for node_id, node in spec.items():
        srcs = []
        for value in node.get("inputs", {}).values():
            if isinstance(value, list) and str(value[0]) not in srcs:
                srcs.append(str(value[0]))
        edges[node_id] = srcs
    return edges


def layout(spec: dict, sizes: dict[str, tuple[float, float]]) -> dict[str, tuple[int, int]]:
    """Left-to-right layered layout: column = longest path from a source node; inside a column nodes
    are placed at the height of their direct predecessors (the previous column), pushed down so
    they never overlap. Deterministic: ties break by numeric node id."""
    edges = spec_edges(spec)
    depth: dict[str, int] = {}

    def _depth(nid: str, stack: tuple = ()) -> int:
        if nid in depth:
            return depth[nid]
        if nid in stack:
            raise ValueError(f"the spec has a cycle through node {nid}")
        d = 0 if not edges[nid] else 1 + max(_depth(s, stack + (nid,)) for s in edges[nid])
        depth[nid] = d
        return d

    for nid in spec:
        _depth(nid)
    columns: dict[int, list[str]] = {}
    for nid in sorted(spec, key=int):
        columns.setdefault(depth[nid], []).append(nid)
    pos: dict[str, tuple[int, int]] = {}
    x = ORIGIN[0]
    for col in sorted(columns):
        ids = columns[col]

        def wanted(nid: str, col: int = col) -> float:
            near = [s for s in edges[nid] if depth[s] == col - 1] or edges[nid]
            ys = [pos[s][1] for s in near if s in pos]
            return sum(ys) / len(ys) if ys else ORIGIN[1]

        order = sorted(ids, key=lambda n: (wanted(n), int(n)))
        y_free = ORIGIN[1]
        for nid in order:
            y = max(wanted(nid), y_free) if col else y_free
            y = int(math.ceil(y / 10.0) * 10)
            pos[nid] = (x, y)
            y_free = y + sizes[nid][1] + TITLE_H + ROW_GAP
        x += int(max(sizes[n][0] for n in ids)) + COLUMN_GAP
    return pos


def _subspec(spec: dict, ids: list[str]) -> dict:
    """The nodes `ids` with only the links between them (layout of one group)."""
    keep = set(ids)
    return {n: {**spec[n], "inputs": {k: v for k, v in spec[n].get("inputs", {}).items()
                                      if not isinstance(v, list) or str(v[0]) in keep}} for n in ids}


def note_size(text: str) -> tuple[int, int]:
    """Size of a Note node showing `text` whole (wrapped at the width's ~58 characters)."""
    lines = sum(max(1, math.ceil(len(line) / 58)) for line in text.split("\n"))
    return NOTE_W, max(NOTE_MIN_H, lines * NOTE_LINE_H + 30)


def header_text(ui: dict, spec: dict) -> str:
    """The first Note: what the workflow shows and which model it runs on."""
    if ui.get("needs") and ui.get("demo"):
        model = (f"Needs: {ui['needs']}; pick them in the loader nodes. Try the technique first on the bundled "
                 f"demo model: {ui['demo']} (a CPU runs it in seconds).")
    elif ui.get("needs"):
        model = (f"Needs: {ui['needs']}; pick it in the loader node. With the pack's random test checkpoints "
                 "(prompt_anatomy_random_*) every image is noise: that is expected, the graph still runs. "
                 "The demo_ twin of this workflow runs on the bundled demo model.")
    elif any(n["class_type"] == DEMO_LOADER for n in spec.values()):
        model = "Runs on the pack's demo model (ships with the pack): a CPU finishes it in seconds."
    else:
        model = ""
    return "\n".join(t for t in (ui.get("about", ""), model) if t)


def plan_layout(spec: dict, ui: dict, sizes: dict) -> tuple[dict, list[dict], list[dict]]:
    """Positions of the spec's nodes, the Note nodes and the groups' frames. A header Note sits top left; without
    groups the dependency layout follows below it; with groups, the nodes of no group (inputs) stay in a column
    under the header and the groups are stacked to their right, each with its Note above its own layout."""
    next_id = max(int(n) for n in spec) + 1
    notes, groups, pos = [], [], {}
    y = ORIGIN[1]
    text = header_text(ui, spec)
    if text:
        notes.append({"id": next_id, "title": "About this workflow", "text": text, "pos": list(ORIGIN),
                      "size": list(note_size(text))})
        next_id += 1
        y += notes[0]["size"][1] + ROW_GAP + TITLE_H
    grouped = [n for g in ui.get("groups") or [] for n in g["nodes"]]
    free = [n for n in spec if n not in grouped]
    sub = layout(_subspec(spec, free), sizes) if free else {}
    pos.update({n: (x, yy + y) for n, (x, yy) in sub.items()})
    right = max([p[0] + sizes[n][0] for n, p in pos.items()] + [ORIGIN[0] + (NOTE_W if notes else 0)])
    gx, gy = right + GROUP_GAP, ORIGIN[1] - TITLE_H
    for i, group in enumerate(ui.get("groups") or []):
        inner_y = gy + GROUP_HEADER
        if group.get("note"):
            size = note_size(group["note"])
            notes.append({"id": next_id, "title": "What to look at", "text": group["note"],
                          "pos": [gx + GROUP_PAD, inner_y + TITLE_H], "size": list(size)})
            next_id += 1
            inner_y += TITLE_H + size[1] + ROW_GAP
        sub = layout(_subspec(spec, group["nodes"]), sizes)
        for n, (x, yy) in sub.items():
            pos[n] = (gx + GROUP_PAD + x, inner_y + TITLE_H + yy)
        boxes = [(p[0], p[1] - TITLE_H, p[0] + sizes[n][0], p[1] + sizes[n][1]) for n, p in pos.items()
                 if n in group["nodes"]] + [(nt["pos"][0], nt["pos"][1] - TITLE_H, nt["pos"][0] + nt["size"][0],
                                             nt["pos"][1] + nt["size"][1]) for nt in notes[-1:] if group.get("note")]
        w = max(b[2] for b in boxes) - gx + GROUP_PAD
        h = max(b[3] for b in boxes) - gy + GROUP_PAD
        groups.append({"id": i + 1, "title": group["title"], "bounding": [gx, gy, int(w), int(h)]})
        gy += int(h) + GROUP_GAP
    return pos, notes, groups


def opening_view(nodes: list[dict], groups: list[dict]) -> dict:
    """extra.ds: the whole graph fitted, or, for a grouped workflow, its inputs and first group at a readable
    zoom (READABLE_SCALE or more), anchored top left when they do not fit."""
    if not groups:
        return fitted_view(nodes)
    first = groups[0]["bounding"]
    left = [n for n in nodes if n["pos"][0] < first[0]]
    x0 = min([n["pos"][0] for n in left] + [first[0]])
    y0 = min([n["pos"][1] - TITLE_H for n in left] + [first[1]])
    x1 = max([n["pos"][0] + n["size"][0] for n in left] + [first[0] + first[2]])
    y1 = max([n["pos"][1] + n["size"][1] for n in left] + [first[1] + first[3]])
    view = fitted_view([{"pos": [x0, y0 + TITLE_H], "size": [x1 - x0, y1 - y0 - TITLE_H]}])
    if view["scale"] >= READABLE_SCALE:
        return view
    margin = 30
    return {"scale": READABLE_SCALE, "offset": [round(margin / READABLE_SCALE - x0, 1),
                                                round(margin / READABLE_SCALE - y0, 1)]}


def fitted_view(nodes: list[dict], width: int = VIEW_W, height: int = VIEW_H) -> dict:
    """extra.ds that shows the whole graph in a width x height canvas (LGraphCanvas.ds.fitToBounds)."""
    x0 = min(n["pos"][0] for n in nodes)
    y0 = min(n["pos"][1] for n in nodes) - TITLE_H
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes)
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes)
    w, h = x1 - x0, y1 - y0
    scale = min(0.95 * width / max(w, 300), 0.95 * height / max(h, 300), 1.0)
    scale = math.floor(scale * 100) / 100
    off_x = -x0 - w / 2 + width / scale / 2
    off_y = -y0 - h / 2 + height / scale / 2
    return {"scale": scale, "offset": [round(off_x, 1), round(off_y, 1)]}


# ---------------------------------------------------------------------------------------------
# making the serialized graph deterministic
# ---------------------------------------------------------------------------------------------
def normalize_workflow(name: str, spec: dict, wf: dict) -> dict:
    """Stable ids, links numbered 1..N, groups numbered 1..N, fixed view, build stamp; returns a new dict."""
    wf = json.loads(json.dumps(wf))
    nodes = sorted(wf["nodes"], key=lambda n: int(n["id"]))
    links = sorted(wf.get("links") or [], key=lambda link: link[0])
    renumber = {link[0]: i + 1 for i, link in enumerate(links)}
    for link in links:
        link[0] = renumber[link[0]]
    for node in nodes:
        for inp in node.get("inputs") or []:
            if inp.get("link") is not None:
                inp["link"] = renumber[inp["link"]]
        for out in node.get("outputs") or []:
            if out.get("links"):
                out["links"] = sorted(renumber[i] for i in out["links"])
        node["pos"] = [int(round(v)) for v in node["pos"]]
        node["size"] = [int(math.ceil(v)) for v in node["size"]]
    groups = sorted(wf.get("groups") or [], key=lambda g: (g["bounding"][1], g["bounding"][0]))
    for i, group in enumerate(groups):
        group["id"] = i + 1
        group["bounding"] = [int(round(v)) for v in group["bounding"]]
    extra = dict(wf.get("extra") or {})
    extra["ds"] = opening_view(nodes, groups)
    extra[EXTRA_KEY] = build_stamp(name, spec)
    out = {
        "id": str(uuid.uuid5(UUID_NAMESPACE, name)),
        "revision": 0,
        "last_node_id": max(int(n["id"]) for n in nodes),
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": groups,
        "config": wf.get("config") or {},
        "extra": {k: extra[k] for k in sorted(extra)},
        "version": wf.get("version", 0.4),
    }
    for key, value in wf.items():  # anything newer frontends add (floatingLinks, definitions ...)
        if key not in out and value not in (None, [], {}):
            out[key] = value
    return out


def _compact(value, indent: int, level: int) -> str:
    """json.dumps(indent=...) but short lists/dicts of scalars stay on one line."""
    one = json.dumps(value, ensure_ascii=False)
    scalar_items = (isinstance(value, list) and all(not isinstance(v, (list, dict)) for v in value)) or (
        isinstance(value, dict) and all(not isinstance(v, (list, dict)) for v in value.values()))
    if not isinstance(value, (list, dict)) or (scalar_items and len(one) + indent * level <= 110):
        return one
    pad, pad_in = " " * (indent * level), " " * (indent * (level + 1))
    if isinstance(value, list):
        if not value:
            return "[]"
        return "[\n" + ",\n".join(pad_in + _compact(v, indent, level + 1) for v in value) + "\n" + pad + "]"
    if not value:
        return "{}"
    return "{\n" + ",\n".join(f"{pad_in}{json.dumps(k, ensure_ascii=False)}: {_compact(v, indent, level + 1)}"
                              for k, v in value.items()) + "\n" + pad + "}"


def dump_workflow(wf: dict) -> str:
    return _compact(wf, 2, 0) + "\n"


# ---------------------------------------------------------------------------------------------
# comparing the UI workflow's prompt (app.graphToPrompt) with the spec
# ---------------------------------------------------------------------------------------------
def _same(a, b) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def prompt_differences(spec: dict, prompt: dict) -> tuple[list[str], list[str]]:
    """(errors, notes): errors where the UI workflow's prompt differs from the spec; notes list
    inputs the spec leaves out that the frontend filled with their defaults."""
    errors, notes = [], []
    if set(spec) != set(prompt):
        errors.append(f"node ids differ: spec {sorted(spec, key=int)}, workflow {sorted(prompt, key=int)}")
    for nid in sorted(set(spec) & set(prompt), key=int):
        s, p = spec[nid], prompt[nid]
        if s["class_type"] != p.get("class_type"):
            errors.append(f"node {nid}: class {p.get('class_type')!r} != spec {s['class_type']!r}")
            continue
        title = (s.get("_meta") or {}).get("title")
        if title is not None and (p.get("_meta") or {}).get("title") != title:
            errors.append(f"node {nid}: title {(p.get('_meta') or {}).get('title')!r} != spec {title!r}")
        s_in, p_in = s.get("inputs", {}), p.get("inputs", {})
        for key, want in s_in.items():
            if key not in p_in:
                errors.append(f"node {nid} ({s['class_type']}): input {key!r} missing in the workflow's prompt")
            else:
                want_cmp = [str(want[0]), want[1]] if isinstance(want, list) else want
                got = p_in[key]
                got_cmp = [str(got[0]), got[1]] if isinstance(got, list) else got
                if not _same(want_cmp, got_cmp):
                    errors.append(f"node {nid} ({s['class_type']}): input {key!r} = {got!r}, spec says {want!r}")
        for key in sorted(set(p_in) - set(s_in)):
            notes.append(f"node {nid} ({s['class_type']}): input {key!r} not in the spec, default {p_in[key]!r}")
    return errors, notes


# ---------------------------------------------------------------------------------------------
# browser side
# ---------------------------------------------------------------------------------------------
# loadApiJson, then: titles, fixed seed controls, preview node sizes; returns the node sizes
LOAD_API_JS = """async ([spec, fileName, previewSizes]) => {
  const app = window.app, LG = window.LiteGraph;
  const missing = [...new Set(Object.values(spec).map(n => n.class_type).filter(t => !(t in LG.registered_node_types)))];
  if (missing.length) return {missing};
  await app.loadApiJson(spec, fileName);
  const sizes = {}, controls = [];
  for (const id of Object.keys(spec)) {
    const node = app.graph.getNodeById(+id);
    if (!node) return {error: `node ${id} (${spec[id].class_type}) was not created by loadApiJson`};
    for (const w of node.widgets || []) {
      if (w.name === 'control_after_generate' || w.name === 'control_before_generate') {
        w.value = 'fixed'; controls.push(`${id}.${w.name}`);
      }
      for (const lw of w.linkedWidgets || []) {  // older frontends: control widget linked to the seed
        if (lw.name && lw.name.startsWith('control_')) { lw.value = 'fixed'; controls.push(`${id}.${lw.name}`); }
      }
    }
    const want = previewSizes[node.type];
    const min = node.computeSize();
    node.setSize([Math.ceil(Math.max(min[0], want ? want[0] : node.size[0])),
                  Math.ceil(Math.max(min[1], want ? want[1] : node.size[1]))]);
    sizes[id] = [node.size[0], node.size[1]];
  }
  return {sizes, controls};
}"""

PLACE_JS = """([positions, sizes, notes, groups]) => {
  for (const [id, s] of Object.entries(sizes)) app.graph.getNodeById(+id).setSize([s[0], s[1]]);
  for (const [id, p] of Object.entries(positions)) app.graph.getNodeById(+id).pos = [p[0], p[1]];
  for (const n of notes || []) {  // Note nodes (frontend-only, never queued) and group frames
    let node = app.graph.getNodeById(n.id);
    if (!node) { node = LiteGraph.createNode('Note'); node.id = n.id; app.graph.add(node); }
    node.title = n.title;
    node.widgets[0].value = n.text;
    node.pos = [n.pos[0], n.pos[1]];
    node.setSize([n.size[0], n.size[1]]);
  }
  for (const g of app.graph.groups || app.graph._groups || []) app.graph.remove(g);
  for (const g of groups || []) {
    const group = new LiteGraph.LGraphGroup(g.title);
    group.configure({id: g.id, title: g.title, bounding: g.bounding, color: '#3f789e', font_size: 24, flags: {}});
    app.graph.add(group);
  }
  app.canvas.deselectAll?.();
  app.graph.setDirtyCanvas(true, true);
  return JSON.parse(JSON.stringify(app.graph.serialize()));
}"""

SIZES_JS = """(ids) => Object.fromEntries(ids.map(id => [id, Array.from(app.graph.getNodeById(+id).size)]))"""

GRAPH_TO_PROMPT_JS = """async () => {
  const p = await app.graphToPrompt();
  return JSON.parse(JSON.stringify(p.output));
}"""

# every output node that got images from the run has them loaded in the page
PREVIEWS_READY_JS = """(ids) => ids.every(id => {
  const n = app.graph.getNodeById(+id);
  return n && n.imgs && n.imgs.length && n.imgs.every(i => i.complete && i.naturalWidth > 0);
})"""

# hide everything that is not the graph (menus, tabs, minimap, toasts, canvas info) and fit the
# whole graph into the canvas
THUMB_PREPARE_JS = """() => {
  if (!document.getElementById('pa-thumb-style')) {
    const s = document.createElement('style');
    s.id = 'pa-thumb-style';
    s.textContent = `#graph-canvas-container > :not(#graph-canvas):not(.isolate) { opacity: 0 !important; }
      body > :not(#vue-app) { opacity: 0 !important; }
      #vue-app > :not(main) { opacity: 0 !important; }`;
    document.head.appendChild(s);
  }
  app.canvas.show_info = false;
  app.canvas._lowQualityZoomThreshold = 0;  // full detail (titles, widgets) even when zoomed out
  app.canvas._isLowQuality = false;
  // the "W x H" caption under previews would show the magnified size: hide it in this page only
  // (settingValues is the store's in-memory state; nothing is saved to the server)
  const st = document.querySelector('#vue-app').__vue_app__?.config.globalProperties.$pinia?._s.get('setting');
  if (st && st.settingValues) {
    window.__paSizeDraw = st.settingValues['Comfy.Node.AllowImageSizeDraw'];
    st.settingValues['Comfy.Node.AllowImageSizeDraw'] = false;
  }
  app.canvas.deselectAll?.();
  const nodes = app.graph.nodes || app.graph._nodes;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of nodes) {
    x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - 30);
    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
  }
  const m = 20;
  app.canvas.ds.fitToBounds([x0 - m, y0 - m, x1 - x0 + 2 * m, y1 - y0 + 2 * m], {zoom: 1});
  app.graph.setDirtyCanvas(true, true);
  app.canvas.draw(true, true);
  const r = document.getElementById('graph-canvas').getBoundingClientRect();
  return {x: r.x, y: r.y, width: r.width, height: r.height};
}"""

# Thumbnail only (the workflow file is already written): a 64 px preview would be a dot in a 512 px
# thumbnail, and the frontend never draws previews larger than their natural size, so images whose
# longest side is under `px` are replaced in the page by a nearest-neighbour integer upscale.
MAGNIFY_PREVIEWS_JS = """async (px) => {
  const jobs = [];
  for (const n of app.graph.nodes || app.graph._nodes) {
    (n.imgs || []).forEach((img, i) => {
      const k = Math.floor(px / Math.max(img.naturalWidth, img.naturalHeight));
      if (k < 2) return;
      const c = document.createElement('canvas');
      c.width = img.naturalWidth * k; c.height = img.naturalHeight * k;
      const ctx = c.getContext('2d');
      ctx.imageSmoothingEnabled = false;
      ctx.drawImage(img, 0, 0, c.width, c.height);
      const big = new Image();
      jobs.push(new Promise(r => { big.onload = r; big.onerror = r; }).then(() => { n.imgs[i] = big; }));
      big.src = c.toDataURL('image/png');
    });
  }
  await Promise.all(jobs);
  app.graph.setDirtyCanvas(true, true);
  return jobs.length;
}"""

THUMB_RESTORE_JS = """() => {
  document.getElementById('pa-thumb-style')?.remove();
  app.canvas.show_info = true;
  app.canvas.updateLowQualityThreshold?.();
  const st = document.querySelector('#vue-app').__vue_app__?.config.globalProperties.$pinia?._s.get('setting');
  if (st && st.settingValues) {
    if (window.__paSizeDraw === undefined) delete st.settingValues['Comfy.Node.AllowImageSizeDraw'];
    else st.settingValues['Comfy.Node.AllowImageSizeDraw'] = window.__paSizeDraw;
  }
}"""


def _harness():
    if str(TESTS_DIR) not in sys.path:  # tests/ only, never the checkout root (its nodes/ shadows ComfyUI's)
        sys.path.insert(0, str(TESTS_DIR))
    import harness

    return harness


def _log(msg: str) -> None:
    print(f"[build_workflows] {msg}", flush=True)


class BuildError(RuntimeError):
    pass


def caption_lines(ui: dict, spec: dict) -> tuple[str, str]:
    """(what the workflow shows, which model it runs on) for the thumbnail's caption band."""
    if ui.get("needs"):
        model = "needs " + ui["needs"].split(" (")[0].split(";")[0]
    elif any(n["class_type"] == DEMO_LOADER for n in spec.values()):
        model = "DEMO - runs on the bundled demo model, CPU"
    else:
        model = ""
    return ui.get("about", ""), model


def _wrap(draw, text: str, font, width: int, max_lines: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1].rstrip(".,;") + " ..."
    return lines


def make_thumbnail(png: bytes, caption: tuple[str, str] = ("", "")) -> bytes:
    """A THUMB_WIDTH-wide JPEG: the screenshot, under a caption band with the description and the model when
    given (square then, as the template browser's cards are)."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.open(io.BytesIO(png)).convert("RGB")
    if any(caption):
        shot_h = THUMB_WIDTH - CAPTION_H
        k = min(THUMB_WIDTH / img.width, shot_h / img.height)
        shot = img.resize((max(1, round(img.width * k)), max(1, round(img.height * k))), Image.LANCZOS)
        img = Image.new("RGB", (THUMB_WIDTH, THUMB_WIDTH), (24, 24, 24))
        img.paste(shot, ((THUMB_WIDTH - shot.width) // 2, CAPTION_H + (shot_h - shot.height) // 2))
        draw = ImageDraw.Draw(img)
        draw.rectangle([0, 0, THUMB_WIDTH, CAPTION_H - 1], fill=(40, 52, 70))
        big, small = ImageFont.load_default(size=17), ImageFont.load_default(size=14)
        y = 7
        for line in _wrap(draw, caption[0], big, THUMB_WIDTH - 20, 2):
            draw.text((10, y), line, font=big, fill=(240, 240, 240))
            y += 22
        if caption[1]:
            draw.text((10, CAPTION_H - 24), caption[1], font=small,
                      fill=(140, 220, 140) if caption[1].startswith("DEMO") else (250, 200, 110))
    else:
        height = max(1, round(img.height * THUMB_WIDTH / img.width))
        img = img.resize((THUMB_WIDTH, height), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=THUMB_QUALITY, optimize=True, progressive=False)
    return buf.getvalue()


def _check_prompt(page, spec: dict, what: str, log_notes: bool = False, name: str = "") -> None:
    errors, notes = prompt_differences(spec, page.evaluate(GRAPH_TO_PROMPT_JS))
    if log_notes:
        for note in notes:
            _log(f"  {name}: {note}")
    if errors:
        raise BuildError(f"{what}'s prompt (app.graphToPrompt) differs from the spec:\n  " + "\n  ".join(errors))


def _run_in_page(page, server, harness) -> tuple[dict, float]:
    """Queue the page's graph as the Run button does; wait for the server; return (history entry, s)."""
    queued = page.evaluate(harness.QUEUE_JS)
    ok = [c for c in queued["captured"] if c.get("ok") and not (c.get("response") or {}).get("node_errors")]
    if not ok:
        detail = [c.get("response") or c.get("error") for c in queued["captured"]]
        raise BuildError("POST /prompt refused the workflow: " + "; ".join(
            harness.format_rejection(d) if isinstance(d, dict) else str(d) for d in detail))
    prompt_id = ok[-1]["response"]["prompt_id"]
    t1 = time.monotonic()
    try:
        entry = harness.wait_for_prompt(server.base_url, prompt_id, timeout=RUN_TIMEOUT_S,
                                        server=None if server.external else server)
    except harness.PromptFailed as exc:
        raise BuildError(f"running the workflow failed:\n{exc}") from exc
    return entry, time.monotonic() - t1


def _screenshot(page) -> bytes:
    page.set_viewport_size({"width": THUMB_VIEWPORT[0], "height": THUMB_VIEWPORT[1]})
    try:
        page.wait_for_timeout(300)
        page.evaluate(MAGNIFY_PREVIEWS_JS, THUMB_PREVIEW_PX)
        clip = page.evaluate(THUMB_PREPARE_JS)
        page.wait_for_timeout(700)  # DOM widgets follow the canvas transform on the next frames
        return page.screenshot(clip=clip, animations="disabled", caret="hide")
    finally:
        page.evaluate(THUMB_RESTORE_JS)
        page.set_viewport_size({"width": 1400, "height": 900})


def build_one(page, server, name: str) -> dict:
    """Build one workflow in the open frontend page; returns timings. Raises BuildError."""
    harness = _harness()
    spec = load_spec(name)
    t0 = time.monotonic()
    harness.ensure_frontend(page, server.base_url)

    # 1. convert through the frontend (fixed seed controls, room for previews), check it queues the spec
    res = page.evaluate(LOAD_API_JS, [spec, f"{name}.json", PREVIEW_SIZE])
    if res.get("missing"):
        raise BuildError(f"node types unknown to the frontend (pack not loaded or spec typo): {res['missing']}")
    if res.get("error"):
        raise BuildError(res["error"])
    sizes = {k: tuple(v) for k, v in res["sizes"].items()}
    page.evaluate(PLACE_JS, [{k: list(v) for k, v in layout(spec, sizes).items()}, {}, [], []])
    page.evaluate(harness.FIT_VIEW_JS)  # node.imgs are only loaded for nodes the canvas draws
    _check_prompt(page, spec, "the converted graph", log_notes=True, name=name)
    t_convert = time.monotonic() - t0

    # 2. run it; nodes that show images grow when they arrive: lay out again with the grown sizes
    #    (a workflow on a model this machine does not make, harness.OPTIONAL_MODELS, is built without running)
    values = [v for node in spec.values() for v in node["inputs"].values()]
    not_here = harness.missing_optional_models(server.base_url, values)
    entry, t_run, image_nodes = {}, 0.0, []
    if not_here:
        _log(f"  {name}: built without running it, the server lacks " + "; ".join(not_here))
    else:
        entry, t_run = _run_in_page(page, server, harness)
        image_nodes = sorted((nid for nid, out in (entry.get("outputs") or {}).items() if out.get("images")), key=int)
    try:
        page.wait_for_function(PREVIEWS_READY_JS, arg=image_nodes, timeout=60_000, polling=250)
    except Exception as exc:  # noqa: BLE001 - report which previews never showed
        raise BuildError(f"previews of nodes {image_nodes} did not appear in the page: {exc}") from exc
    grown = page.evaluate(SIZES_JS, list(spec))
    sizes = {k: (math.ceil(max(sizes[k][0], grown[k][0])), math.ceil(max(sizes[k][1], grown[k][1]))) for k in spec}
    ui = load_ui(name)
    positions, notes, groups = plan_layout(spec, ui, sizes)
    raw = page.evaluate(PLACE_JS, [{k: list(v) for k, v in positions.items()},
                                   {k: list(v) for k, v in sizes.items()}, notes, groups])
    text = dump_workflow(normalize_workflow(name, spec, raw))
    wf = json.loads(text)  # exactly what will be written

    # 3. thumbnail of the executed graph in its final layout
    png = _screenshot(page)
    shots = harness.BROWSER_ARTIFACTS
    shots.mkdir(parents=True, exist_ok=True)
    (shots / f"build-{name}.png").write_bytes(png)

    # 4. load the file we ship as a user would; it must load cleanly and queue exactly the spec
    t1 = time.monotonic()
    loaded = page.evaluate(harness.LOAD_WORKFLOW_JS, [wf, f"{name}.json"])
    problems = {k: loaded[k] for k in ("unknownBefore", "unknownAfter", "missingNodes", "missingModels",
                                       "dialogs", "toasts") if loaded[k]}
    if problems or loaded["nodeCount"] != len(spec) + len(notes):
        raise BuildError(f"the built workflow does not load cleanly: {json.dumps(problems)}; "
                         f"{loaded['nodeCount']} nodes of {len(spec) + len(notes)}")
    _check_prompt(page, spec, "the built workflow")
    t_verify = time.monotonic() - t1

    WORKFLOWS_DIR.mkdir(exist_ok=True)
    workflow_path(name).write_text(text)
    thumbnail_path(name).write_bytes(make_thumbnail(png, caption_lines(ui, spec)))
    return {"build_s": t_convert + t_verify, "run_s": t_run, "total_s": time.monotonic() - t0,
            "nodes": len(spec), "links": len(wf["links"]), "images": image_nodes}


def build(names: list[str]) -> int:
    harness = _harness()
    from playwright.sync_api import sync_playwright

    if not Path(harness.CHROMIUM).exists():
        _log(f"{harness.CHROMIUM} missing: run scripts/install_browser.sh")
        return 1
    url = os.environ.get(harness.SERVER_URL_ENV)
    t0 = time.monotonic()
    if url:
        server = harness._ExternalServer(url).start()
    else:
        server = harness.ComfyServer(log_path=harness.ARTIFACTS / "build-workflows-server.log").start()
    _log(f"server {server.base_url} ready after {time.monotonic() - t0:.1f} s")
    results, failures = {}, {}
    profile = tempfile.mkdtemp(prefix="prompt-anatomy-build-")
    try:
        with sync_playwright() as pw:
            context = harness.launch_browser(pw, profile)
            try:
                page = harness.open_frontend(context, server.base_url)
                for name in names:
                    _log(f"{name}: building")
                    try:
                        results[name] = build_one(page, server, name)
                        r = results[name]
                        _log(f"{name}: OK - {r['nodes']} nodes, {r['links']} links; converted+verified in "
                             f"{r['build_s']:.1f} s, ran in {r['run_s']:.1f} s, total {r['total_s']:.1f} s")
                    except Exception as exc:  # noqa: BLE001 - report and go on with the next spec
                        failures[name] = f"{type(exc).__name__}: {exc}"
                        _log(f"{name}: FAILED\n{failures[name]}")
                        harness.dump_page(page, f"build-{name}-FAILED")
                        if not server.alive():
                            _log("the server died; stopping")
                            break
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
        server.stop()
    _log("summary:")
    for name in names:
        if name in results:
            r = results[name]
            _log(f"  {name:28s} OK      build {r['build_s']:6.1f} s   run {r['run_s']:6.1f} s")
        else:
            _log(f"  {name:28s} FAILED  {failures.get(name, 'not attempted').splitlines()[0]}")
    return 0 if len(results) == len(names) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="spec names (scripts/workflow_specs/<name>.json); default: all")
    parser.add_argument("--check", action="store_true",
                        help="only check that every workflow is built and up to date (exit 1 if not); no server")
    args = parser.parse_args(argv)
    names = [n[:-5] if n.endswith(".json") else n for n in args.names] or spec_names()
    unknown = [n for n in names if not spec_path(n).is_file()]
    if unknown:
        parser.error(f"no spec for {unknown} in {SPECS_DIR.relative_to(ROOT)} (have: {spec_names()})")
    if args.check:
        problems = check(names)
        for p in problems:
            print(f"STALE: {p}")
        if not problems:
            print(f"{len(names)} workflow(s) up to date")
        return 1 if problems else 0
    return build(names)


if __name__ == "__main__":
    sys.exit(main())
