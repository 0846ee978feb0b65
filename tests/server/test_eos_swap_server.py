"""Server tier: EOSConditioningSwap inside the real ComfyUI (CPU) with the random SD1.5 checkpoint."""
from __future__ import annotations

import copy
import re

import harness
import pytest

pytestmark = [pytest.mark.server, pytest.mark.timeout(900)]

NODE = "EOSConditioningSwap"


def spec() -> dict:
    return harness.workflow_spec("eos_swap")


def node_text(entry: dict, node_id: str) -> str:
    out = (entry.get("outputs") or {}).get(node_id) or {}
    text = out.get("text")
    assert text, f"node {node_id} sent no text to the UI: {out}"
    return text[0] if isinstance(text, list) else text


def node_image(base_url: str, entry: dict, node_id: str) -> bytes:
    images = ((entry.get("outputs") or {}).get(node_id) or {}).get("images") or []
    assert len(images) == 1, f"node {node_id}: {images}"
    return harness.fetch_image(base_url, images[0])


def pixels(png: bytes):
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    return img.size, img.tobytes()


def test_workflow_spec_runs_and_shows_token_table(base_url, comfy_server, object_info):
    assert NODE in object_info, "EOSConditioningSwap is not registered"
    entry = harness.queue_api_prompt(base_url, spec(), server=comfy_server)
    table = node_text(entry, "5")
    # SD1.5: "a red sports car" is 4 CLIP tokens, so A's [EOS] is at 5 and takes B's first [EOS] (B: 3 tokens -> 4)
    assert re.search(r"^\s+5\s+<\|endoftext\|>\s+\[EOS\]\s+B 4$", table, re.M), table
    assert re.search(r"^\s+1\s+a</w>\s+semantic\s+A 1$", table, re.M), table
    imgs = {nid: pixels(node_image(base_url, entry, nid)) for nid in ("13", "14", "15")}
    assert all(size == (64, 64) for size, _ in imgs.values())
    assert imgs["15"][1] != imgs["13"][1], "the swapped conditioning gave the same image as prompt A"


def test_bad_range_is_reported_by_the_server(base_url, comfy_server):
    prompt = {"1": spec()["1"], "5": copy.deepcopy(spec()["5"]),
              "20": {"class_type": "PreviewAny", "inputs": {"source": ["5", 2]}}}
    prompt["5"]["inputs"].update(start_percent=0.8, end_percent=0.2)
    with pytest.raises(harness.PromptFailed, match="start_percent \\(0.8\\) must be below end_percent"):
        harness.queue_api_prompt(base_url, prompt, server=comfy_server, timeout=120)


def test_composes_with_lora_and_other_pack_nodes(base_url, comfy_server, object_info):
    """LoraLoader + every model-patch node of the pack + EOSConditioningSwap value_only in one graph: the token
    table is the one the node gives alone, and the value-only patch still changes the image."""
    if harness.LORA_NAME not in harness.get_json(base_url, "/models/loras"):
        pytest.skip("random LoRA missing: run scripts/make_sd15_checkpoint.py")
    base = spec()
    prompt = {k: base[k] for k in ("1", "2", "4", "6")}
    prompt["30"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                            "lora_name": harness.LORA_NAME,
                                                            "strength_model": 1.0, "strength_clip": 1.0}}
    clip, model = ["30", 1], ["30", 0]
    chained = []
    for i, (name, inputs) in enumerate(harness.model_patch_nodes(object_info, exclude=(NODE,)).items()):
        nid = str(40 + i)
        prompt[nid] = {"class_type": name,
                       "inputs": {k: (model if v is None else v) for k, v in inputs.items()}}
        model = [nid, 0]
        chained.append(name)
    for nid in ("2", "4"):
        prompt[nid] = copy.deepcopy(prompt[nid])
        prompt[nid]["inputs"]["clip"] = clip
    swap = copy.deepcopy(base["5"])
    swap["inputs"].update(clip=clip, model=model, kv="value_only", start_percent=0.0, end_percent=0.6)
    prompt["5"] = swap

    def sampler(nid, m, positive):
        prompt[nid] = {"class_type": "KSampler",
                       "inputs": {**base["7"]["inputs"], "model": m, "positive": positive, "seed": 7}}

    sampler("7", model, ["2", 0])  # plain A through the same LoRA + pack patches
    sampler("9", ["5", 1], ["5", 0])  # A with B's [EOS] in the values only
    for src, dec, prev in (("7", "10", "13"), ("9", "12", "15")):
        prompt[dec] = {"class_type": "VAEDecode", "inputs": {"samples": [src, 0], "vae": ["1", 2]}}
        prompt[prev] = {"class_type": "PreviewImage", "inputs": {"images": [dec, 0]}}
    entry = harness.queue_api_prompt(base_url, prompt, server=comfy_server)
    table = node_text(entry, "5")

    alone = {"1": base["1"], "5": copy.deepcopy(swap),
             "20": {"class_type": "PreviewAny", "inputs": {"source": ["5", 2]}}}
    alone["5"]["inputs"].update(clip=["1", 1])
    alone["5"]["inputs"].pop("model")
    alone["5"]["inputs"]["kv"] = "key_and_value"
    table_alone = node_text(harness.queue_api_prompt(base_url, alone, server=comfy_server, timeout=120), "5")
    assert table.replace("kv value_only", "kv key_and_value") == table_alone, (chained, table, table_alone)
    plain, swapped = (pixels(node_image(base_url, entry, n)) for n in ("13", "15"))
    assert plain[0] == swapped[0] == (64, 64)
    assert swapped[1] != plain[1], f"value_only patch had no effect next to {['LoraLoader'] + chained}"
