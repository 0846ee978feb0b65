"""Frequency split nodes on the real server with the full-size random SD1.5 checkpoint: the two workflow
specs (frequency_split, noising_analysis), the recorder leaving the sampled image unchanged, and clear errors."""

from __future__ import annotations

import copy
import io
import json
import re
import uuid

import harness
import pytest

EXAMPLE_IMAGE = harness.COMFY_DIR / "input" / "example.png"


def spec(name: str) -> dict:
    return harness.workflow_spec(name)


def node_out(entry: dict, node_id: str) -> dict:
    return (entry.get("outputs") or {}).get(node_id) or {}


def node_text(entry: dict, node_id: str) -> str:
    return "\n".join(node_out(entry, node_id).get("text") or [])


def image_size(base_url: str, record: dict) -> tuple[int, int]:
    from PIL import Image

    return Image.open(io.BytesIO(harness.fetch_image(base_url, record))).size


def upload_image(base_url: str, name: str, data: bytes) -> None:
    """POST /upload/image (multipart), so LoadImage finds ``name`` in the server's input folder."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + \
        (f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"overwrite\"\r\n\r\ntrue\r\n"
         f"--{boundary}--\r\n").encode()
    status, resp, _ = harness.http_request(base_url, "/upload/image", data=body, method="POST",
                                           headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200, resp[:500]


@pytest.fixture(scope="module")
def example_image(base_url):
    """The workflow's photo: ComfyUI's own input/example.png (the server's input folder is a temp dir)."""
    if EXAMPLE_IMAGE.is_file():
        data = EXAMPLE_IMAGE.read_bytes()
    else:  # a synthetic picture with the same name
        from PIL import Image, ImageDraw

        img = Image.new("RGB", (256, 256), (90, 140, 220))
        d = ImageDraw.Draw(img)
        d.ellipse([60, 40, 200, 180], fill=(240, 200, 40))
        d.rectangle([0, 190, 256, 256], fill=(60, 170, 60))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        data = buf.getvalue()
    upload_image(base_url, "example.png", data)
    return "example.png"


def pixels(base_url, record) -> bytes:
    """Decoded pixel data of an output image."""
    from PIL import Image

    return Image.open(io.BytesIO(harness.fetch_image(base_url, record))).convert("RGB").tobytes()


def test_frequency_split_workflow(base_url):
    entry = harness.queue_api_prompt(base_url, spec("frequency_split"))
    stats = json.loads(node_text(entry, "23"))
    # 6 steps of euler: 7 points (the last is the final latent), 4 evenly spaced grid steps
    assert stats["steps"] == list(range(7)) and stats["grid_steps"] == [0, 2, 3, 5]
    assert stats["matched_latent"] is True and stats["model_kind"] == "eps"
    assert stats["sampler"] == "sample_euler" and stats["reported_steps"] == 6
    assert all(v == 0 for v in (stats["rel_change"][k][-1] for k in stats["rel_change"]))
    cutoff, k = stats["suggested_cutoff"], stats["suggested_cutoff_step"]
    assert 0 < cutoff <= 1 and cutoff == pytest.approx(k / 6)
    # the viewer shows its summary in the node, and the GuidanceCutoffKSampler fed by suggested_cutoff used it:
    # k steps with both branches, 6 - k with one (batch 1) -> 6 + k rows
    assert f"suggested_cutoff = {cutoff:.3f}" in node_text(entry, "7")
    report = node_text(entry, "24")
    assert re.search(rf"Model rows evaluated: {6 + k} \(", report), report
    # grid: 6 rows of 64 px VAE decodes + labels; plots: 2 images 640 x 420; split and merge decodes 64 x 64
    (grid,) = node_out(entry, "8")["images"]
    w, h = image_size(base_url, grid)
    assert h > 6 * 64 and w > 5 * 64
    plots = node_out(entry, "9")["images"]
    assert len(plots) == 2 and all(image_size(base_url, p) == (640, 420) for p in plots)
    for node in ("13", "14", "18", "19", "22"):
        (img,) = node_out(entry, node)["images"]
        assert image_size(base_url, img) == (64, 64)


def test_recorder_leaves_the_sampled_image_unchanged(base_url):
    full = spec("frequency_split")
    keep = ("1", "2", "3", "4", "6", "11", "13")
    plain = {k: copy.deepcopy(v) for k, v in full.items() if k in keep}
    plain["6"]["inputs"]["model"] = ["1", 0]  # same graph without the recorder
    with_rec = {k: copy.deepcopy(v) for k, v in full.items() if k in keep + ("5",)}
    a = harness.queue_api_prompt(base_url, plain)
    b = harness.queue_api_prompt(base_url, with_rec)
    (ia,), (ib,) = node_out(a, "13")["images"], node_out(b, "13")["images"]
    assert pixels(base_url, ia) == pixels(base_url, ib)  # PNG bytes differ: the prompt is in the metadata


def test_noising_analysis_workflow(base_url, example_image):
    entry = harness.queue_api_prompt(base_url, spec("noising_analysis"))
    stats = json.loads(node_text(entry, "6"))
    assert stats["space"] == "pixel" and stats["shape"] == [1, 3, 256, 256] and len(stats["timesteps"]) == 50
    assert stats["schedule"] == "sd1_scaled_linear" and stats["timesteps"][-1] == 999
    # the paper's Fig. 2b on a photo: noise swamps the high band long before the low band
    hi, lo = stats["noise_exceeds_signal_high_at"], stats["noise_exceeds_signal_low_at"]
    assert hi is not None and (lo is None or lo > hi)
    assert all(hc > lc for hc, lc in zip(stats["rel_change_high"], stats["rel_change_low"], strict=True))
    assert "Noise outweighs the signal in the high band" in node_text(entry, "3")
    (grid,) = node_out(entry, "4")["images"]
    w, h = image_size(base_url, grid)
    assert h > 3 * 256 and w > 6 * 256
    assert len(node_out(entry, "5")["images"]) == 2
    # the latent-space branch: the model's schedule, SD1 scaling, the VAE's decodes in the grid
    assert len(node_out(entry, "11")["images"]) == 2 and len(node_out(entry, "10")["images"]) == 1
    text = node_text(entry, "9")
    assert text.startswith("latent space, schedule from_model")
    assert [image_size(base_url, i) for i in node_out(entry, "13")["images"] + node_out(entry, "14")["images"]] \
        == [(256, 256), (256, 256)]


@pytest.mark.parametrize("edit,message", [
    ({"5": {"grid_steps": "0, x"}}, "grid_steps must be step indices"),
    ({"5": {"grid_steps": "0, 9"}}, "grid_steps contains step 9 but this sampling run has 6 steps"),
])
def test_bad_input_is_a_clear_error_and_server_keeps_serving(base_url, edit, message):
    prompt = spec("frequency_split")
    for node, inputs in edit.items():
        prompt[node]["inputs"].update(inputs)
    with pytest.raises((harness.PromptFailed, harness.PromptRejected), match=message):
        harness.queue_api_prompt(base_url, prompt)
    entry = harness.queue_api_prompt(base_url, harness.sd15_txt2img_prompt(steps=1))
    assert harness.output_images(entry)


def test_noising_analysis_needs_one_input(base_url):
    prompt = {"1": {"class_type": "FrequencyNoisingAnalysis", "inputs": {
        "schedule": "sd1_scaled_linear", "latent_format": "from_model", "threshold": 0.2, "points": 10, "seed": 0,
        "grid_columns": 2}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    with pytest.raises(harness.PromptFailed, match="exactly one of image or latent"):
        harness.queue_api_prompt(base_url, prompt)


def composed_prompt(with_recorder: bool) -> dict:
    """The recorder in one graph with core LoraLoader and the pack's other nodes (EOSConditioningSwap for the
    positive prompt, GuidanceCutoffPatch on the model), sampled by the stock KSampler."""
    p = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": harness.CHECKPOINT_NAME}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                     "lora_name": harness.LORA_NAME, "strength_model": 0.8,
                                                     "strength_clip": 0.8}},
        "3": {"class_type": "EOSConditioningSwap", "inputs": {
            "clip": ["2", 1], "source_text": "a red sports car", "target_text": "a white horse",
            "construction": "source_sem+target_eos", "repeat_count": 2, "eos_scope": "all_eos_and_padding",
            "pooled": "source", "start_percent": 0.0, "end_percent": 1.0, "kv": "key_and_value", "seed": 0}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 1]}},
        "5": {"class_type": "GuidanceCutoffPatch", "inputs": {
            "model": ["2", 0], "cutoff": 0.5, "cutoff_unit": "fraction", "keep": "negative", "adaptive": "off",
            "cosine_threshold": 0.98, "lowfreq_threshold": 0.02}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["5", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["6", 0], "seed": 7,
            "steps": 4, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "10": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}},
    }
    if with_recorder:
        p["7"] = {"class_type": "FrequencySplitPreview", "inputs": {
            "model": ["5", 0], "threshold": 0.2, "grid_columns": 2, "grid_steps": "", "live_preview": True}}
        p["8"]["inputs"]["model"] = ["7", 0]
        p["11"] = {"class_type": "FrequencySplitViewer", "inputs": {
            "record": ["7", 1], "latent": ["8", 0], "batch_index": 0, "settle_threshold": 0.1,
            "cutoff_signal": "x0"}}
        p["12"] = {"class_type": "PreviewAny", "inputs": {"source": ["11", 2]}}
    return p


def test_recorder_composes_with_lora_and_the_pack(base_url):
    assert harness.LORA_NAME in harness.get_json(base_url, "/models/loras"), \
        "random LoRA missing: run scripts/make_sd15_checkpoint.py"
    plain = harness.queue_api_prompt(base_url, composed_prompt(False))
    rec = harness.queue_api_prompt(base_url, composed_prompt(True))
    # the recorder changes nothing in the composed graph: the decoded image is byte-identical
    (a,), (b,) = node_out(plain, "10")["images"], node_out(rec, "10")["images"]
    assert pixels(base_url, a) == pixels(base_url, b)
    # and it recorded that very run (4 steps, matched to the KSampler's LATENT), grid without VAE (Latent2RGB)
    stats = json.loads(node_text(rec, "12"))
    assert stats["matched_latent"] is True and stats["reported_steps"] == 4 and stats["grid_steps"] == [0, 3]
    assert len(node_out(rec, "11")["images"]) == 3  # grid + 2 plots in the node's preview
