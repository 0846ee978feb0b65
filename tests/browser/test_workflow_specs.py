"""workflows/*.json are up-to-date builds of scripts/workflow_specs/*.json (scripts/build_workflows.py).

The staleness tests need neither server nor browser (the builder stamps every workflow with the sha256
of its spec's canonical JSON); test_workflow_prompt_equals_spec loads each shipped workflow in the real
frontend and checks that what it would queue (app.graphToPrompt) is the spec. Loading and running
every workflow is tests/browser/test_browser_workflows.py's job.
Rebuild after changing a spec: .venv/bin/python scripts/build_workflows.py [names...]
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import harness
import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("prompt_anatomy_build_workflows", ROOT / "scripts" / "build_workflows.py")
bw = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bw)

SPECS = bw.spec_names()
REBUILD = ".venv/bin/python scripts/build_workflows.py"
_none = [pytest.param(None, marks=pytest.mark.skip(reason="no scripts/workflow_specs/*.json yet"))]


@pytest.mark.parametrize("name", SPECS or _none)
def test_workflow_built_from_current_spec(name):
    problems = bw.staleness(name)
    assert not problems, f"{name}: " + "; ".join(problems) + f"\n-> rebuild: {REBUILD} {name}"


def test_every_workflow_has_spec_and_thumbnail():
    from PIL import Image

    orphans = [p for p in bw.check([]) if "has no" in p]
    assert not orphans, "\n".join(orphans)
    for wf in sorted(bw.WORKFLOWS_DIR.glob("*.json")):
        jpg = bw.thumbnail_path(wf.stem)
        assert jpg.is_file(), f"{jpg} missing -> rebuild: {REBUILD} {wf.stem}"
        with Image.open(jpg) as img:
            assert img.format == "JPEG", f"{jpg.name} is {img.format}, not JPEG"
            assert img.width == bw.THUMB_WIDTH and 0.25 <= img.height / img.width <= 1.0, (jpg.name, img.size)


def test_workflow_files_are_deterministic_builder_output():
    """The files are exactly what the builder writes (canonical formatting, links 1..N, uuid5 id):
    a hand edit or a foreign serializer shows up here even when the stamp was kept."""
    for wf_file in sorted(bw.WORKFLOWS_DIR.glob("*.json")):
        text = wf_file.read_text()
        wf = json.loads(text)
        # readable: no two nodes (title bar included) overlap
        boxes = [(n["id"], n["pos"][0], n["pos"][1] - bw.TITLE_H, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
                 for n in wf["nodes"]]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert a[3] <= b[1] or b[3] <= a[1] or a[4] <= b[2] or b[4] <= a[2], (
                    f"{wf_file.name}: nodes {a[0]} and {b[0]} overlap")
        assert bw.dump_workflow(wf) == text, f"{wf_file.name} is not in the builder's format -> {REBUILD} {wf_file.stem}"
        assert wf["id"] == str(bw.uuid.uuid5(bw.UUID_NAMESPACE, wf_file.stem)), wf_file.name
        assert [link[0] for link in wf["links"]] == list(range(1, len(wf["links"]) + 1)), wf_file.name
        assert wf["last_link_id"] == len(wf["links"]), wf_file.name
        # every control_after_generate next to a seed is "fixed": the shipped experiments are reproducible
        for node in wf["nodes"]:
            values = node.get("widgets_values") or []
            for v in values:
                assert v not in ("randomize", "increment", "decrement"), (
                    f"{wf_file.name} node {node['id']} ({node['type']}) has control_after_generate {v!r}")


# ---------------------------------------------------------------------------------------------
# the builder's own logic (pure functions, temporary folders)
# ---------------------------------------------------------------------------------------------
SPEC_A = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x.safetensors"}},
    "2": {"class_type": "CLIPTextEncode", "_meta": {"title": "Positive"}, "inputs": {"text": "a", "clip": ["1", 1]}},
    "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "4": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0],
                                               "latent_image": ["3", 0], "seed": 1, "steps": 2, "cfg": 7.0,
                                               "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
    "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
    "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
}


def test_workflow_spec_hash_ignores_formatting_not_content():
    reordered = json.loads(json.dumps(SPEC_A, indent=4, sort_keys=True))
    assert bw.spec_hash(reordered) == bw.spec_hash(SPEC_A)
    changed = json.loads(json.dumps(SPEC_A))
    changed["4"]["inputs"]["steps"] = 3
    assert bw.spec_hash(changed) != bw.spec_hash(SPEC_A)
    retitled = json.loads(json.dumps(SPEC_A))
    retitled["2"]["_meta"]["title"] = "Other"
    assert bw.spec_hash(retitled) != bw.spec_hash(SPEC_A)


def test_workflow_layout_left_to_right_without_overlap():
    sizes = {nid: (300, 100 + 20 * int(nid)) for nid in SPEC_A}
    pos = bw.layout(SPEC_A, sizes)
    assert pos == bw.layout(SPEC_A, sizes)
    for nid, srcs in bw.spec_edges(SPEC_A).items():
        for s in srcs:  # every link goes rightwards, past the source's right edge
            assert pos[s][0] + sizes[s][0] < pos[nid][0], (s, nid, pos)
    boxes = [(pos[n][0], pos[n][1] - bw.TITLE_H, pos[n][0] + sizes[n][0], pos[n][1] + sizes[n][1]) for n in SPEC_A]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)
    assert pos["1"][0] == pos["3"][0] < pos["2"][0] < pos["4"][0] < pos["5"][0] < pos["6"][0]


def test_workflow_spec_validation_names_the_problem(tmp_path, monkeypatch):
    monkeypatch.setattr(bw, "SPECS_DIR", tmp_path)
    (tmp_path / "bad.json").write_text(json.dumps({"_meta_title": "x", **SPEC_A}))
    with pytest.raises(ValueError, match="'_meta_title' is not an API-format node"):
        bw.load_spec("bad")
    broken = json.loads(json.dumps(SPEC_A))
    broken["5"]["inputs"]["vae"] = ["9", 2]
    (tmp_path / "bad.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"node 5 input 'vae' links to \['9', 2\]"):
        bw.load_spec("bad")


def test_workflow_staleness_detection(tmp_path, monkeypatch):
    specs, wfs = tmp_path / "specs", tmp_path / "workflows"
    specs.mkdir()
    wfs.mkdir()
    monkeypatch.setattr(bw, "SPECS_DIR", specs)
    monkeypatch.setattr(bw, "WORKFLOWS_DIR", wfs)
    monkeypatch.setattr(bw, "ROOT", tmp_path)
    (specs / "a.json").write_text(json.dumps(SPEC_A))
    assert any("workflows/a.json missing" in p for p in bw.check(["a"]))
    assert any("workflows/a.jpg missing" in p for p in bw.check(["a"]))
    wf = {"nodes": [], "links": [], "extra": {bw.EXTRA_KEY: bw.build_stamp("a", SPEC_A)}}
    (wfs / "a.json").write_text(json.dumps(wf))
    shutil.copy(Path(__file__), wfs / "a.jpg")  # content irrelevant to check()
    assert bw.check(["a"]) == []
    changed = json.loads(json.dumps(SPEC_A))
    changed["4"]["inputs"]["seed"] = 2
    (specs / "a.json").write_text(json.dumps(changed))
    assert any("is stale" in p for p in bw.check(["a"]))
    (specs / "a.json").write_text(json.dumps(SPEC_A, indent=2))  # reformatting is not a change
    assert bw.check(["a"]) == []
    wf["extra"][bw.EXTRA_KEY]["builder_version"] = bw.BUILDER_VERSION - 1
    (wfs / "a.json").write_text(json.dumps(wf))
    assert any("is stale" in p for p in bw.check(["a"]))
    (wfs / "orphan.json").write_text("{}")
    (wfs / "lonely.jpg").write_bytes(b"")
    problems = bw.check([])
    assert any("orphan.json has no spec" in p for p in problems), problems
    assert any("lonely.jpg has no workflow" in p for p in problems), problems
    assert bw.main(["--check", "a"]) == 1


def test_workflow_prompt_differences_catch_wrong_values():
    prompt = json.loads(json.dumps(SPEC_A))
    for node in prompt.values():
        node.setdefault("_meta", {"title": node["class_type"]})
    prompt["4"]["inputs"]["add_noise"] = "enable"  # a default the spec leaves out: a note, not an error
    errors, notes = bw.prompt_differences(SPEC_A, prompt)
    assert errors == [] and len(notes) == 1 and "add_noise" in notes[0]
    prompt["4"]["inputs"]["cfg"] = 7.5
    prompt["4"]["inputs"]["positive"] = ["3", 0]
    prompt["2"]["_meta"]["title"] = "CLIP Text Encode (Prompt)"
    del prompt["6"]
    errors, _ = bw.prompt_differences(SPEC_A, prompt)
    text = "\n".join(errors)
    assert "input 'cfg' = 7.5, spec says 7.0" in text
    assert "input 'positive' = ['3', 0], spec says ['2', 0]" in text
    assert "title 'CLIP Text Encode (Prompt)' != spec 'Positive'" in text
    assert "node ids differ" in text


# ---------------------------------------------------------------------------------------------
# in the real frontend: the shipped file queues exactly the spec
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SPECS or _none)
def test_workflow_prompt_equals_spec(name, app_page):
    wf_file = bw.workflow_path(name)
    if not wf_file.is_file():
        pytest.fail(f"{wf_file} missing -> rebuild: {REBUILD} {name}")
    wf = json.loads(wf_file.read_text())
    loaded = app_page.evaluate(harness.LOAD_WORKFLOW_JS, [wf, wf_file.name])
    problems = {k: loaded[k] for k in ("unknownBefore", "unknownAfter", "missingNodes", "missingModels", "dialogs")
                if loaded[k]}
    assert not problems, f"{wf_file.name} does not load cleanly: {json.dumps(problems, indent=1)}"
    prompt = app_page.evaluate(bw.GRAPH_TO_PROMPT_JS)
    errors, _ = bw.prompt_differences(bw.load_spec(name), prompt)
    assert not errors, f"{wf_file.name} queues something else than its spec:\n" + "\n".join(errors)


def test_every_workflow_has_a_demo_twin_on_the_demo_model(base_url):
    """Issue 8: every workflow has a twin (scripts/workflow_specs/demo_<name>.json, derived from it) that runs on
    the pack's demo model, or (issues 14, 15: a model family whose twin would only repeat an existing demo, or could
    not show video) names its existing demo counterpart in "_ui": {"demo": ...}; twins load no checkpoint file, and
    demo_tour uses every node of the pack."""
    names = set(SPECS)
    bases = sorted(n for n in names if not n.startswith("demo_"))
    assert bases, "no workflow specs"
    missing = [b for b in bases if f"demo_{b}" not in names and not bw.load_ui(b).get("demo")]
    assert not missing, (f"workflows without a demo twin: {missing} -> add scripts/workflow_specs/demo_<name>.json "
                         '(or name an existing demo in the spec\'s "_ui": {"demo": "demo_..."})')
    for base in bases:
        demo = bw.load_ui(base).get("demo")
        assert demo is None or demo in names, (base, demo)
    for name in sorted(n for n in names if n.startswith("demo_")):
        classes = {node["class_type"] for node in bw.load_spec(name).values()}
        assert bw.DEMO_LOADER in classes, f"{name} does not use {bw.DEMO_LOADER}"
        assert not classes & {"CheckpointLoaderSimple", "CheckpointLoader", "UNETLoader"}, (name, classes)
    pack = set(harness.pack_nodes(harness.get_json(base_url, "/object_info")))
    tour = {node["class_type"] for node in bw.load_spec("demo_tour").values()}
    assert bw.DEMO_LOADER in pack and not pack - tour, f"demo_tour lacks pack nodes: {sorted(pack - tour)}"


def test_demo_counterpart_in_ui_is_checked(tmp_path, monkeypatch):
    """A base spec may name its existing demo instead of a twin ("_ui": {"demo": ...}); a bad name is a clear error,
    and the About note points to the demo."""
    real = bw.SPECS_DIR
    monkeypatch.setattr(bw, "SPECS_DIR", tmp_path)
    shutil.copy(real / "demo_attention_maps.json", tmp_path)
    shutil.copy(real / "attention_maps.json", tmp_path)  # demo_attention_maps is its twin
    spec = {k: v for k, v in SPEC_A.items() if k != "1"}
    spec["1"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "x.safetensors", "weight_dtype": "default"}}
    ui = {"about": "shows x", "needs": "X (x.safetensors in ComfyUI/models/diffusion_models)", "demo": "demo_attention_maps"}
    (tmp_path / "x.json").write_text(json.dumps({**spec, "_ui": ui}))
    assert bw.load_ui("x")["demo"] == "demo_attention_maps"
    text = bw.header_text(bw.load_ui("x"), bw.load_spec("x"))
    assert "Needs: X (x.safetensors" in text and "bundled demo model: demo_attention_maps" in text, text
    for demo, message in [("demo_nothing", r"'demo_nothing', which is not a demo workflow's spec.*demo_attention_maps"),
                          ("attention_maps", "'attention_maps', which is not a demo workflow's spec"),
                          (["demo_attention_maps"], "about and needs")]:
        (tmp_path / "x.json").write_text(json.dumps({**spec, "_ui": {**ui, "demo": demo}}))
        with pytest.raises(ValueError, match=message):
            bw.load_ui("x")
    (tmp_path / "demo_x.json").write_text(json.dumps({**SPEC_A, "_ui": {"about": "x"}}))  # no demo model
    (tmp_path / "x.json").write_text(json.dumps({**spec, "_ui": {**ui, "demo": "demo_x"}}))
    with pytest.raises(ValueError, match="does not run on the demo model"):
        bw.load_ui("x")
    (tmp_path / "demo_y.json").write_text(json.dumps({"demo_twin_of": "attention_maps",
                                                      "_ui": {"demo": "demo_attention_maps"}}))
    with pytest.raises(ValueError, match="a demo twin is one itself"):
        bw.load_ui("demo_y")


def test_demo_twin_derivation_errors_are_clear(tmp_path):
    base = bw.load_spec("guidance_cutoff")
    twin = bw.demo_twin(tmp_path / "t.json", {"demo_twin_of": "guidance_cutoff", "set": {"5": {"steps": 20}}})
    assert twin["1"]["class_type"] == bw.DEMO_LOADER and twin["5"]["inputs"]["steps"] == 20
    assert base["5"]["inputs"]["steps"] != 20  # the base spec is not modified
    for bad, message in [({"demo_twin_of": "guidance_cutoff", "remove": ["99"]}, "does not have"),
                         ({"demo_twin_of": "guidance_cutoff", "set": {"99": {"steps": 1}}}, "does not have"),
                         ({"demo_twin_of": "demo_guidance_cutoff"}, "not another twin"),
                         ({"demo_twin_of": "guidance_cutoff", "sett": {}}, "keys")]:
        with pytest.raises(ValueError, match=message):
            bw.demo_twin(tmp_path / "t.json", bad)


# ---------------------------------------------------------------------------------------------
# what a new user sees first: notes, groups, the opening view, the thumbnail's caption (no server)
# ---------------------------------------------------------------------------------------------
def _notes(wf: dict) -> dict[str, str]:
    return {n.get("title") or "": (n.get("widgets_values") or [""])[0] for n in wf["nodes"] if n["type"] == "Note"}


@pytest.mark.parametrize("name", SPECS or _none)
def test_every_workflow_says_what_it_shows_and_which_model_it_needs(name):
    """Issue 17.3: a Note says what the workflow shows; a full-size workflow names the model the user must supply,
    where it goes and that the random test checkpoints draw noise; a demo workflow says it runs on the demo model."""
    ui, spec = bw.load_ui(name), bw.load_spec(name)
    assert ui.get("about"), f"scripts/workflow_specs/{name}.json has no _ui.about (one line: what it shows)"
    about = _notes(json.loads(bw.workflow_path(name).read_text())).get("About this workflow", "")
    assert about.startswith(ui["about"]), (name, about)
    if any(n["class_type"] == "CheckpointLoaderSimple" for n in spec.values()):
        assert ui.get("needs") and f"Needs: {ui['needs']}" in about, (name, about)
        assert "models/checkpoints" in about and "noise" in about and "expected" in about, about
    elif ui.get("demo"):  # a model-family workflow: its files and folders, and the demo to try first
        assert ui.get("needs") and f"Needs: {ui['needs']}" in about, (name, about)
        for node in spec.values():
            for value in node["inputs"].values():
                if isinstance(value, str) and value.endswith(".safetensors"):
                    assert value in ui["needs"], f"{name}: needs does not name {value}"
        assert "ComfyUI/models/" in about and f"bundled demo model: {ui['demo']}" in about, about
    else:
        assert "demo model" in about and "Needs" not in about, about


@pytest.mark.parametrize("name", SPECS or _none)
def test_thumbnails_carry_a_caption_band(name):
    """The template browser shows a custom pack's cards with the file name only: the thumbnail's top band carries
    the description (light text) and the model line (green for demo, amber for 'needs ...') on a dark blue band."""
    from PIL import Image

    with Image.open(bw.thumbnail_path(name)) as img:
        rgb = img.convert("RGB")
        assert rgb.size == (bw.THUMB_WIDTH, bw.THUMB_WIDTH), rgb.size
        band = rgb.crop((0, 0, bw.THUMB_WIDTH, bw.CAPTION_H - 2))
        colours = band.getcolors(bw.THUMB_WIDTH * bw.CAPTION_H)
    background = max(colours)[1]
    assert all(abs(a - b) <= 6 for a, b in zip(background, (40, 52, 70), strict=True)), background
    text_px = sum(c for c, rgb_ in colours if sum(rgb_) > 500)
    assert text_px > 300, f"{name}: no caption text in the band ({text_px} light pixels)"
    demo = bw.caption_lines(bw.load_ui(name), bw.load_spec(name))[1].startswith("DEMO")
    tinted = sum(c for c, (r, g, b) in colours if (g - r > 40 and g - b > 30 if demo else r - b > 50 and g - b > 25))
    assert tinted > 60, f"{name}: the model line ({'green' if demo else 'amber'}) is missing ({tinted} px)"


def test_demo_tour_opens_readable_on_its_first_group():
    """Issue 17.4: demo_tour is grouped by technique (titled groups, a Note in each) and opens at a readable zoom
    on the inputs and the first group, not on the whole graph at 17 %."""
    wf = json.loads(bw.workflow_path("demo_tour").read_text())
    ui = bw.load_ui("demo_tour")
    assert [g["title"] for g in wf["groups"]] == [g["title"] for g in ui["groups"]]
    nodes = {str(n["id"]): n for n in wf["nodes"]}
    for group, want in zip(wf["groups"], ui["groups"], strict=True):
        x, y, w, h = group["bounding"]
        for nid in want["nodes"]:
            n = nodes[nid]
            assert x <= n["pos"][0] and n["pos"][0] + n["size"][0] <= x + w, (group["title"], nid)
            assert y <= n["pos"][1] - bw.TITLE_H and n["pos"][1] + n["size"][1] <= y + h, (group["title"], nid)
        notes = [n for n in wf["nodes"] if n["type"] == "Note" and x <= n["pos"][0] <= x + w and y <= n["pos"][1] <= y + h]
        assert len(notes) == 1 and notes[0]["widgets_values"][0] == want["note"], group["title"]
    ds = wf["extra"]["ds"]
    assert ds["scale"] >= bw.READABLE_SCALE, ds
    x, y = wf["groups"][0]["bounding"][:2]
    sx, sy = (x + ds["offset"][0]) * ds["scale"], (y + ds["offset"][1]) * ds["scale"]
    assert 0 <= sx < bw.VIEW_W / 2 and 0 <= sy < bw.VIEW_H / 3, (sx, sy)  # first group's title on screen


def test_grouped_layout_keeps_groups_apart_and_nodes_inside():
    ui = {"about": "x", "groups": [{"title": "A", "note": "look here\n" * 3, "nodes": ["2", "4"]},
                                   {"title": "B", "nodes": ["5", "6"]}]}
    sizes = {nid: (300, 100 + 20 * int(nid)) for nid in SPEC_A}
    pos, notes, groups = bw.plan_layout(SPEC_A, ui, sizes)
    assert (pos, notes, groups) == bw.plan_layout(SPEC_A, ui, sizes)
    boxes = [(n, pos[n][0], pos[n][1] - bw.TITLE_H, pos[n][0] + sizes[n][0], pos[n][1] + sizes[n][1]) for n in pos]
    boxes += [(f"note{n['id']}", n["pos"][0], n["pos"][1] - bw.TITLE_H, n["pos"][0] + n["size"][0],
               n["pos"][1] + n["size"][1]) for n in notes]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert a[3] <= b[1] or b[3] <= a[1] or a[4] <= b[2] or b[4] <= a[2], (a, b)
    assert [n["title"] for n in notes] == ["About this workflow", "What to look at"]
    (ax, ay, aw, ah), (bx, by, bw_, bh) = groups[0]["bounding"], groups[1]["bounding"]
    assert ay + ah < by, "groups overlap"
    for (gx, gy, gw, gh), ids in (((ax, ay, aw, ah), ["2", "4"]), ((bx, by, bw_, bh), ["5", "6"])):
        for n in ids:
            assert gx < pos[n][0] and pos[n][0] + sizes[n][0] < gx + gw, n
            assert gy < pos[n][1] - bw.TITLE_H and pos[n][1] + sizes[n][1] < gy + gh, n
    for n in ("1", "3"):  # inputs of no group stay left of the groups
        assert pos[n][0] + sizes[n][0] < ax


def test_ui_of_a_spec_is_checked(tmp_path, monkeypatch):
    monkeypatch.setattr(bw, "SPECS_DIR", tmp_path)
    for ui, message in [({"groups": [{"title": "A", "nodes": ["2"]}, {"title": "B", "nodes": ["2"]}]}, "each in one group"),
                        ({"groups": [{"title": "A", "nodes": ["99"]}]}, "node ids of the spec"),
                        ({"about": "x", "colour": "red"}, "about and needs")]:
        (tmp_path / "x.json").write_text(json.dumps({**SPEC_A, "_ui": ui}))
        with pytest.raises(ValueError, match=message):
            bw.load_ui("x")
    (tmp_path / "x.json").write_text(json.dumps({**SPEC_A, "_ui": {"about": "shows x"}}))
    assert bw.load_spec("x") == SPEC_A and bw.load_ui("x") == {"about": "shows x"}
