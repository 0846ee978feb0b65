"""Server tier: Cross-Attention Capture + Cross-Attention Map Viewer inside the real ComfyUI (CPU) with the random
full-size SD1.5 checkpoint: the workflow spec, an unchanged image, re-running only the viewer for another token
choice, errors, and the capture next to LoraLoader and every other model patch of the pack."""
from __future__ import annotations

import copy
import io
import json

import harness
import pytest

pytestmark = [pytest.mark.server, pytest.mark.timeout(900)]

CAPTURE, VIEWER = "CrossAttentionCapture", "CrossAttentionMapViewer"
SD15_ATTN2_LAYERS = 16


def spec() -> dict:
    return harness.workflow_spec("attention_maps")


def node_out(entry: dict, node_id: str) -> dict:
    return (entry.get("outputs") or {}).get(node_id) or {}


def summary(entry: dict) -> dict:
    text = node_out(entry, "16").get("text")
    assert text, f"PreviewAny sent no text: {node_out(entry, '16')}"
    return json.loads(text[0])


def pixels(base_url: str, record: dict):
    from PIL import Image

    img = Image.open(io.BytesIO(harness.fetch_image(base_url, record))).convert("RGB")
    return img.size, img.tobytes()


def cached_nodes(entry: dict) -> set[str]:
    out = set()
    for kind, data in (entry.get("status") or {}).get("messages") or []:
        if kind == "execution_cached":
            out.update(str(n) for n in data.get("nodes") or [])
    return out


def test_workflow_spec(base_url, comfy_server, object_info):
    assert CAPTURE in object_info and VIEWER in object_info
    assert object_info[VIEWER]["output_node"] is True
    entry = harness.queue_api_prompt(base_url, spec(), server=comfy_server)
    s = summary(entry)
    assert s["family"] == "sd1" and s["steps"] == 6 and s["matched_latent"] is True and s["image"] == "image"
    assert len(s["layers"]["seen"]) == SD15_ATTN2_LAYERS and not s["layers"]["missing"]
    assert all(v == 6 for v in s["layers"]["seen"].values())  # euler, cfg 7.5: one positive row per layer and step
    assert s["grid"] == [8, 8] and s["context_tokens"] == 77 and s["buckets"] == [[i, i] for i in range(6)]
    texts = [t["text"] for t in s["tokens"]]
    assert texts[:4] == ["[SOS]", "a", "photo", "of"] and "fox" in texts
    n_sem = sum(t["class"] == "semantic" for t in s["tokens"])
    assert [x["class"] for x in s["shown"]] == ["semantic"] * n_sem + ["[EOS]"]
    assert sum(s["class_share"].values()) == pytest.approx(1.0, abs=1e-4)
    for step in range(6):
        assert sum(v[step] for v in s["class_share_per_step"].values()) == pytest.approx(1.0, abs=1e-4)
    # the viewer's own ui: previews, summary text and the token chips of the JS picker
    ui = node_out(entry, "9")
    assert ui.get("images") and ui["text"][0].startswith("SD1.x · 6 steps")
    chips = ui["pa_tokens"]
    assert [c["label"] for c in chips[:3]] == ["[SOS]", "a", "photo"] and chips[-1]["class"] == "padding"
    assert len(node_out(entry, "11")["images"]) == n_sem + 1  # one overlay per shown token
    assert len(node_out(entry, "15")["images"]) == 6  # one animation frame per bucket
    for nid in ("12", "13", "14"):
        assert len(node_out(entry, nid)["images"]) == 1


def test_capture_leaves_the_image_unchanged(base_url, comfy_server):
    prompt = spec()
    prompt["20"] = copy.deepcopy(prompt["7"])
    prompt["20"]["inputs"]["model"] = ["1", 0]  # the same sampler without the capture
    prompt["21"] = {"class_type": "VAEDecode", "inputs": {"samples": ["20", 0], "vae": ["1", 2]}}
    prompt["22"] = {"class_type": "PreviewImage", "inputs": {"images": ["21", 0]}}
    entry = harness.queue_api_prompt(base_url, prompt, server=comfy_server)
    captured = pixels(base_url, node_out(entry, "10")["images"][0])
    plain = pixels(base_url, node_out(entry, "22")["images"][0])
    assert captured[0] == (64, 64) and captured == plain


def test_another_token_choice_reruns_only_the_viewer(base_url, comfy_server):
    first = harness.queue_api_prompt(base_url, spec(), server=comfy_server)
    prompt = spec()
    prompt["9"]["inputs"]["tokens"] = "sos, 2-3"
    second = harness.queue_api_prompt(base_url, prompt, server=comfy_server)
    assert {"6", "7", "8"} <= cached_nodes(second)  # the sampler did not run again
    s = summary(second)
    assert s["matched_latent"] is True and [x["label"] for x in s["shown"]] == ["[SOS] (1)", "2-3 (2)"]
    assert node_out(second, "9")["pa_selected"] == ["sos", "2-3"]
    assert len(node_out(second, "11")["images"]) == 2
    assert s["shown"][0]["mean_weight"] == pytest.approx(summary(first)["tokens"][0]["mean_weight"], rel=1e-6)


def test_viewer_errors_are_reported(base_url, comfy_server):
    prompt = spec()
    prompt["9"]["inputs"]["text"] = ", ".join(["a photo of a red fox"] * 20)  # 2 chunks, the record has 77 tokens
    with pytest.raises(harness.PromptFailed, match="text tokenizes to 154 context positions"):
        harness.queue_api_prompt(base_url, prompt, server=comfy_server, timeout=300)
    prompt = spec()
    prompt["9"]["inputs"]["tokens"] = "1, 99"
    with pytest.raises(harness.PromptFailed, match="outside the prompt's 77 context positions"):
        harness.queue_api_prompt(base_url, prompt, server=comfy_server, timeout=300)


def test_composes_with_lora_and_other_pack_nodes(base_url, comfy_server, object_info):
    """LoraLoader + every model-patch node of the pack, then the capture: it still sees every layer, its maps
    still sum to 1, and the image is the one the same chain gives without the capture."""
    if harness.LORA_NAME not in harness.get_json(base_url, "/models/loras"):
        pytest.skip("random LoRA missing: run scripts/make_sd15_checkpoint.py")
    prompt = spec()
    prompt["30"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                            "lora_name": harness.LORA_NAME,
                                                            "strength_model": 1.0, "strength_clip": 1.0}}
    model, chained = ["30", 0], []
    for i, (name, inputs) in enumerate(harness.model_patch_nodes(object_info, exclude=(CAPTURE,)).items()):
        nid = str(40 + i)
        prompt[nid] = {"class_type": name, "inputs": {k: (model if v is None else v) for k, v in inputs.items()}}
        model = [nid, 0]
        chained.append(name)
    for nid in ("3", "4"):
        prompt[nid]["inputs"]["clip"] = ["30", 1]
    prompt["9"]["inputs"]["clip"] = ["30", 1]
    prompt["6"]["inputs"]["model"] = model
    prompt["20"] = copy.deepcopy(prompt["7"])
    prompt["20"]["inputs"]["model"] = model  # the same chain without the capture
    prompt["21"] = {"class_type": "VAEDecode", "inputs": {"samples": ["20", 0], "vae": ["1", 2]}}
    prompt["22"] = {"class_type": "PreviewImage", "inputs": {"images": ["21", 0]}}
    entry = harness.queue_api_prompt(base_url, prompt, server=comfy_server)
    s = summary(entry)
    assert s["matched_latent"] is True, chained
    assert len(s["layers"]["seen"]) + len(s["layers"]["recomputed_attn2_replace"]) == SD15_ATTN2_LAYERS, chained
    assert sum(s["class_share"].values()) == pytest.approx(1.0, abs=1e-4)
    captured = pixels(base_url, node_out(entry, "10")["images"][0])
    plain = pixels(base_url, node_out(entry, "22")["images"][0])
    assert captured == plain, f"the capture changed the image next to {['LoraLoader'] + chained}"
