"""Server tier: the text-layer nodes (paper 2) inside the real ComfyUI (CPU) with the random SD1.5 checkpoint
(and the random SDXL one when scripts/make_sdxl_checkpoint.py has written it)."""
from __future__ import annotations

import copy
import io
import re

import harness
import pytest

pytestmark = [pytest.mark.server, pytest.mark.timeout(900)]

MINE = ("TextLayerPatch", "TextLayerWordSubstitute", "LoraLoaderTextLayers", "TextLayerLocalize")


def spec(name: str) -> dict:
    return harness.workflow_spec(name)


def node_text(entry: dict, node_id: str) -> str:
    out = (entry.get("outputs") or {}).get(node_id) or {}
    text = out.get("text")
    assert text, f"node {node_id} sent no text to the UI: {out}"
    return text[0] if isinstance(text, list) else text


def node_images(base_url: str, entry: dict, node_id: str) -> list[tuple[tuple[int, int], bytes]]:
    from PIL import Image

    records = ((entry.get("outputs") or {}).get(node_id) or {}).get("images") or []
    out = []
    for rec in records:
        img = Image.open(io.BytesIO(harness.fetch_image(base_url, rec))).convert("RGB")
        out.append((img.size, img.tobytes()))
    return out


def test_nodes_registered(object_info):
    for name in MINE:
        assert name in object_info, f"{name} is not registered"
        assert object_info[name]["category"] == "prompt_anatomy/text_layers"


def test_text_edit_sd15(base_url, comfy_server):
    if harness.LORA_NAME not in harness.get_json(base_url, "/models/loras"):
        pytest.skip("random LoRA missing: run scripts/make_sd15_checkpoint.py")
    entry = harness.queue_api_prompt(base_url, spec("text_edit_sd15"), server=comfy_server)
    words = node_text(entry, "2")
    assert "'HELLO' => 'WORLD': replaced 1×" in words and 'says "WORLD"' in words
    lora = node_text(entry, "4")
    # the random LoRA patches attn2 to_k/to_v of input 1, input 5, middle and output 11: 8 weights
    assert "kept 4 of 8 diffusion-model weights" in lora, lora
    assert "middle.0.0 [6]: 2 weights" in lora and "output.11.0 [15]: 2 weights" in lora
    report = node_text(entry, "5")
    assert "SD1.x · UNet injection" in report
    assert "layers: middle.0.0 [6], output.11.0 [15] of 16 cross-attention layers." in report, report
    (src,), (edited,), (swapped,) = (node_images(base_url, entry, n) for n in ("13", "14", "15"))
    assert src[0] == edited[0] == swapped[0] == (64, 64)
    assert edited[1] != src[1], "the text-layer patch did not change the image"
    assert edited[1] != swapped[1], "patching two layers gave the same image as swapping the whole prompt"


def test_text_layer_localize_workflow(base_url, comfy_server):
    entry = harness.queue_api_prompt(base_url, spec("text_layer_localize"), server=comfy_server)
    table = node_text(entry, "6")
    rows = [line for line in table.splitlines() if re.match(r"^\s+\d+\s+output\.", line)]
    assert len(rows) == 4, table  # each of layers 12-15 (output.8.0 ... output.11.0)
    assert "4 candidates of 16 cross-attention layers" in table and "paper 2 used OCR" in table
    best = re.search(r"best layers \(top 1\): (\S+)$", table, re.M).group(1)
    assert best in {"output.8.0", "output.9.0", "output.10.0", "output.11.0"}
    assert best in rows[0]
    patch_report = node_text(entry, "10")
    assert f"layers: {best} [" in patch_report  # the localized layers went straight into Text Layer Patch
    (chart,) = node_images(base_url, entry, "6")  # the node's own preview of the chart
    assert chart[0][1] > 60
    assert len(node_images(base_url, entry, "9")) == 6  # source, target, 4 candidates
    assert len(node_images(base_url, entry, "13")) == 1


def test_text_edit_sdxl(base_url, comfy_server):
    not_here = harness.missing_optional_models(base_url, [harness.SDXL_CHECKPOINT_NAME])
    if not_here:
        pytest.skip("; ".join(not_here))
    entry = harness.queue_api_prompt(base_url, spec("text_edit_sdxl"), server=comfy_server, timeout=600)
    report = node_text(entry, "5")
    assert "layers: output.2.1 [55], output.2.2 [56] of 70 cross-attention layers." in report, report
    (src,), (edited,) = (node_images(base_url, entry, n) for n in ("13", "14"))
    assert edited[1] != src[1]


def test_bad_layers_are_reported_by_the_server(base_url, comfy_server):
    base = spec("text_edit_sd15")
    prompt = {k: base[k] for k in ("1", "2")}
    prompt["5"] = copy.deepcopy(base["5"])
    prompt["5"]["inputs"].update(model=["1", 0], layers="auto")
    prompt["20"] = {"class_type": "PreviewAny", "inputs": {"source": ["5", 1]}}
    with pytest.raises(harness.PromptFailed, match=r"'auto' has no preset for SD1\.x"):
        harness.queue_api_prompt(base_url, prompt, server=comfy_server, timeout=120)


def test_composes_with_lora_and_every_other_pack_node(base_url, comfy_server, object_info):
    """Core LoraLoader + every model-patch node of the pack + TextLayerPatch in one graph: the patch reports the
    same layers as alone and still changes the image; a sampler on the chain without it is unaffected."""
    if harness.LORA_NAME not in harness.get_json(base_url, "/models/loras"):
        pytest.skip("random LoRA missing: run scripts/make_sd15_checkpoint.py")
    base = spec("text_edit_sd15")
    prompt = {k: copy.deepcopy(base[k]) for k in ("1", "2", "3", "5", "6", "7", "8", "10", "11", "13", "14")}
    prompt["30"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                            "lora_name": harness.LORA_NAME,
                                                            "strength_model": 1.0, "strength_clip": 1.0}}
    model, chained = ["30", 0], []
    for i, (name, inputs) in enumerate(harness.model_patch_nodes(object_info, exclude=MINE).items()):
        nid = str(40 + i)
        prompt[nid] = {"class_type": name, "inputs": {k: (model if v is None else v) for k, v in inputs.items()}}
        model = [nid, 0]
        chained.append(name)
    for nid in ("2", "3"):
        prompt[nid]["inputs"]["clip"] = ["30", 1]
    prompt["5"]["inputs"]["model"] = model
    prompt["7"]["inputs"]["model"] = model  # the same chain without the text-layer patch
    entry = harness.queue_api_prompt(base_url, prompt, server=comfy_server)
    report = node_text(entry, "5")
    alone = {"1": base["1"], "2": base["2"], "5": copy.deepcopy(base["5"]),
             "20": {"class_type": "PreviewAny", "inputs": {"source": ["5", 1]}}}
    alone["5"]["inputs"]["model"] = ["1", 0]
    assert report == node_text(harness.queue_api_prompt(base_url, alone, server=comfy_server, timeout=120), "5")
    (plain,), (edited,) = (node_images(base_url, entry, n) for n in ("13", "14"))
    assert plain[0] == edited[0] == (64, 64)
    assert edited[1] != plain[1], f"TextLayerPatch had no effect next to {['LoraLoader'] + chained}"
