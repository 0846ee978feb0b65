"""Server tier: the pack inside the real ComfyUI 0.3.75 (CPU), through its HTTP API."""
from __future__ import annotations

import io
import json
import re

import harness
import pytest

pytestmark = [pytest.mark.server, pytest.mark.timeout(600)]

JS_FILES = sorted(p for p in (harness.ROOT / "js").rglob("*.js")) if (harness.ROOT / "js").is_dir() else []
WORKFLOWS = harness.workflow_files()  # what the run tests use ($PROMPT_ANATOMY_WORKFLOWS_DIR may override)
PACK_WORKFLOWS = sorted(harness.WORKFLOWS_DIR.glob("*.json"))  # what the server must serve
# node types a UI-format workflow may contain that exist only in the frontend
FRONTEND_ONLY_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


def _import_failure(server) -> str:
    lines = [ln for ln in server.log_text().splitlines()
             if harness.PACK_NAME in ln or "comfy_entrypoint" in ln]
    return "\n".join(lines[-30:])


def test_pack_nodes_listed(object_info, comfy_server):
    pack = harness.pack_nodes(object_info)
    assert pack, ("no node in /object_info has python_module under "
                  f"{harness.PACK_MODULE_PREFIX!r}; the pack failed to load?\n{_import_failure(comfy_server)}")
    problems = []
    for name, info in sorted(pack.items()):
        if not str(info.get("category", "")).startswith(harness.PACK_CATEGORY_PREFIX):
            problems.append(f"{name}: category {info.get('category')!r} not under {harness.PACK_CATEGORY_PREFIX!r}")
        for section in ("required", "optional"):
            for inp, spec in (info.get("input", {}).get(section) or {}).items():
                opts = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 else {}
                if not (isinstance(opts, dict) and str(opts.get("tooltip", "")).strip()):
                    problems.append(f"{name}: {section} input {inp!r} has no tooltip")
    assert not problems, "\n".join(problems)


def test_pack_imported_without_error(object_info, comfy_server):
    """ComfyUI registers V3 nodes one by one, so a pack whose entry point fails half-way still has
    nodes in /object_info: the server log must show no import failure for the pack."""
    if comfy_server.external:
        pytest.skip("external server: its log is not captured")
    bad = [ln for ln in comfy_server.log_text().splitlines()
           if harness.PACK_NAME in ln and re.search(r"IMPORT FAILED|Error while calling|Cannot import", ln)]
    assert not bad, "the pack failed to load:\n" + "\n".join(bad) + "\n" + _import_failure(comfy_server)


def test_core_nodes_still_present(object_info):
    """Loading the pack must not break core nodes (the pack's nodes/ package vs core nodes.py)."""
    for core in ("CheckpointLoaderSimple", "CLIPTextEncode", "KSampler", "VAEDecode", "LoraLoader", "SaveImage"):
        assert core in object_info, core
    assert len(object_info) > 400


def test_extensions_serve_pack_js(base_url):
    if not JS_FILES:
        pytest.skip("the pack has no js/**/*.js files yet")
    listed = harness.get_json(base_url, "/extensions")
    prefix = f"/extensions/{harness.PACK_NAME}/"
    expected = {prefix + p.relative_to(harness.ROOT / "js").as_posix() for p in JS_FILES}
    missing = expected - set(listed)
    assert not missing, f"GET /extensions does not list {sorted(missing)}; pack entries: " \
                        f"{sorted(x for x in listed if x.startswith(prefix))}"
    for path in sorted(expected):
        status, body, headers = harness.http_request(base_url, path)
        assert status == 200, f"GET {path} -> {status}"
        assert "javascript" in headers.get("Content-Type", ""), (path, headers.get("Content-Type"))
        local = harness.ROOT / "js" / path[len(prefix):]
        assert body == local.read_bytes(), f"{path} differs from {local}"


def test_workflow_templates_list_pack(base_url):
    if not PACK_WORKFLOWS:
        pytest.skip("the pack has no workflows/*.json yet")
    templates = harness.get_json(base_url, "/api/workflow_templates")
    assert harness.PACK_NAME in templates, f"pack missing from /api/workflow_templates: {sorted(templates)}"
    assert sorted(templates[harness.PACK_NAME]) == sorted(p.stem for p in PACK_WORKFLOWS)
    for wf in PACK_WORKFLOWS:
        path = f"/api/workflow_templates/{harness.PACK_NAME}/{wf.name}"
        status, body, _ = harness.http_request(base_url, path)
        assert status == 200, f"GET {path} -> {status}"
        assert json.loads(body) == json.loads(wf.read_text()), path


def test_recipes_name_real_nodes_and_inputs(object_info):
    """docs/recipes/*.api.json (graphs for models that cannot be made here, e.g. Wan 2.2 A14B) use only node
    classes and inputs this server defines, and combo values it offers (model file names aside)."""
    recipes = sorted((harness.ROOT / "docs" / "recipes").glob("*.api.json"))
    assert recipes
    for path in recipes:
        for node_id, node in json.loads(path.read_text()).items():
            info = object_info.get(node["class_type"])
            assert info, f"{path.name} node {node_id}: no node class {node['class_type']}"
            spec = {**(info["input"].get("required") or {}), **(info["input"].get("optional") or {})}
            for name, value in node["inputs"].items():
                assert name in spec, f"{path.name} node {node_id} ({node['class_type']}): no input {name!r}"
                options = spec[name][0]
                if options == "COMBO":  # the V3 form
                    options = (spec[name][1] if len(spec[name]) > 1 else {}).get("options")
                if isinstance(options, list) and not isinstance(value, list) and not name.endswith("_name"):
                    assert value in options, f"{path.name} node {node_id}: {name}={value!r} not in {options[:8]}"


def test_template_category_label_is_served_in_both_languages(base_url):
    """The frontend names the pack's template group by ``templateWorkflows.category.<folder>`` from /i18n (the
    only template string a pack can set; the cards show file names)."""
    messages = harness.get_json(base_url, "/i18n")
    for lang in ("en", "zh"):
        label = messages[lang]["templateWorkflows"]["category"][harness.PACK_NAME]
        assert label.startswith("Prompt Anatomy"), (lang, label)


@pytest.mark.parametrize("workflow", WORKFLOWS or [pytest.param(None, marks=pytest.mark.skip(
    reason="the pack has no workflows/*.json yet"))], ids=lambda p: p.stem if p else "none")
def test_workflow_node_types_exist(workflow, object_info):
    """Cheap pre-check of what the browser tier runs: every node type of the UI workflow exists."""
    data = json.loads(workflow.read_text())
    assert isinstance(data.get("nodes"), list), f"{workflow.name} is not a UI-format workflow (no 'nodes' list)"
    subgraphs = (data.get("definitions") or {}).get("subgraphs") or []
    sub_ids = {s.get("id") for s in subgraphs}
    nodes = list(data["nodes"]) + [n for s in subgraphs for n in s.get("nodes") or []]
    unknown = sorted({n.get("type") for n in nodes} - set(object_info) - FRONTEND_ONLY_TYPES - sub_ids)
    assert not unknown, f"{workflow.name} uses node types the server does not know: {unknown}"


def test_sd15_prompt_runs(base_url, comfy_server):
    """CheckpointLoaderSimple → CLIPTextEncode ×2 → EmptyLatentImage 64² → KSampler → VAEDecode → SaveImage."""
    assert harness.CHECKPOINT_NAME in harness.get_json(base_url, "/models/checkpoints"), \
        "random SD1.5 checkpoint missing: run scripts/make_sd15_checkpoint.py"
    entry = harness.queue_api_prompt(base_url, harness.sd15_txt2img_prompt(steps=2, save=True), server=comfy_server)
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"]
    images = harness.output_images(entry)
    assert len(images) == 1 and images[0]["type"] == "output", entry["outputs"]
    from PIL import Image

    img = Image.open(io.BytesIO(harness.fetch_image(base_url, images[0])))
    assert img.size == (64, 64)


def test_sd15_with_random_lora_runs(base_url, comfy_server):
    """The random LoRA loads through core LoraLoader with every key applied."""
    assert harness.LORA_NAME in harness.get_json(base_url, "/models/loras"), \
        "random LoRA missing: run scripts/make_sd15_checkpoint.py"
    offset = comfy_server.log_offset()
    prompt = harness.sd15_txt2img_prompt(steps=2, lora_name=harness.LORA_NAME, seed=2)
    entry = harness.queue_api_prompt(base_url, prompt, server=comfy_server)
    assert harness.output_images(entry)
    log = comfy_server.log_since(offset)
    assert "lora key not loaded" not in log.lower(), log[-3000:]


def test_server_survives_failing_prompts(base_url, comfy_server):
    # 1. refused by validation: the error names the bad input
    bad = harness.sd15_txt2img_prompt()
    bad["5"]["inputs"]["sampler_name"] = "no_such_sampler"
    with pytest.raises(harness.PromptRejected) as rejected:
        harness.queue_api_prompt(base_url, bad, server=comfy_server)
    assert "sampler_name" in str(rejected.value)

    # 2. accepted, then fails while executing: the history's execution_error comes back
    harness.upload_input(base_url, "prompt_anatomy_not_an_image.png", b"this is not a png")
    failing = {"1": {"class_type": "LoadImage", "inputs": {"image": "prompt_anatomy_not_an_image.png"}},
               "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    with pytest.raises(harness.PromptFailed) as failed:
        harness.queue_api_prompt(base_url, failing, server=comfy_server, timeout=120)
    assert re.search(r"LoadImage|identify|image", str(failed.value), re.I), str(failed.value)
    assert failed.value.entry.get("status", {}).get("status_str") == "error"

    # 3. the server still answers and still runs prompts
    assert comfy_server.alive()
    assert "KSampler" in harness.get_json(base_url, "/object_info/KSampler")
    ok = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
          "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    assert harness.output_images(harness.queue_api_prompt(base_url, ok, server=comfy_server, timeout=120))
