"""GuidanceCutoffKSampler in one graph with core LoraLoader and every other node of the pack (issue 3, "Composition
and devices"): CheckpointLoaderSimple -> LoraLoader -> every MODEL -> MODEL patch node of the pack -> the sampler
with cutoff 0.5, EOSConditioningSwap building its positive prompt, the recorders' viewers reading its LATENT. Each
node must still do what it does alone: the sampler evaluates the rows it promises (the same report as the sampler
alone on the bare checkpoint), the other nodes give the reports they give alone and their viewers match this run.

The LoRA is the small random one scripts/make_sd15_checkpoint.py writes next to the random checkpoint (93 KB, rank
4, made by scripts/setup.sh like the checkpoint), as in the pack's other composition tests: the server's model
folders live in the ComfyUI tree, which tests never write into."""

from __future__ import annotations

import json
import re

import harness
import pytest

pytestmark = [pytest.mark.server, pytest.mark.timeout(900)]

SAMPLER = "GuidanceCutoffKSampler"
OWN = ("GuidanceCutoffKSampler", "GuidanceCutoffGuider", "GuidanceCutoffPatch")  # this technique's nodes
# texts used by no other test: the server is shared by the session, and ComfyUI reports no UI output for a node
# whose result it reuses from an earlier prompt (the token table would then be missing)
SOURCE, TARGET, NEGATIVE = "a red sports car by a lake at noon", "a white horse by a lake at noon", "blurry"
STEPS, CUTOFF = 4, 0.5
ROWS = 2 * 2 + 2 * 1  # euler, 4 steps, cutoff 0.5, batch 1: steps 0-1 with both branches, steps 2-3 with one
# patch nodes with required inputs harness.model_patch_nodes cannot fill generically (a CONDITIONING; a widget whose
# default does not fit SD1.x): filled here. "cond:<text>" is a CLIPTextEncode of <text> on the LoRA's CLIP.
EXPLICIT = {"TextLayerPatch": {"target": f"cond:{TARGET}", "layers": "middle.0.0, output.11.0"}}
# MODEL -> MODEL nodes that are not sampling-time patches, with the reason they stay out of the chain
NOT_CHAINED = {"TextLayerLoraTrain": "a trainer: it writes a LoRA file and applies it the way LoraLoaderTextLayers "
                                    "(chained here) does; its own tests train and check the file"}
# viewers of the recorders' second output ("record"): (viewer, its other inputs, index of its JSON output)
VIEWERS = {
    "FrequencySplitPreview": ("FrequencySplitViewer", {}, 2),
    "CrossAttentionCapture": ("CrossAttentionMapViewer", {"text": SOURCE, "clip": ["2", 1]}, 6),
}


def node_out(entry: dict, node_id: str) -> dict:
    return (entry.get("outputs") or {}).get(node_id) or {}


def node_text(entry: dict, node_id: str) -> str:
    return "\n".join(node_out(entry, node_id).get("text") or [])


def without_time(report: str) -> str:
    return "\n".join(line for line in report.splitlines() if not line.startswith("Sampling time:"))


def defaults(object_info: dict, name: str) -> dict:
    """Widget defaults of every required and optional widget input of ``name``."""
    inputs = object_info[name]["input"]
    out = {}
    for group in ("required", "optional"):
        for key, entry in (inputs.get(group) or {}).items():
            if isinstance(entry[0], list) or entry[0] in harness.WIDGET_TYPES:
                out[key] = harness.widget_default(entry)
    return out


def patch_chain(object_info: dict) -> dict[str, dict]:
    """Every MODEL -> MODEL node of the pack but this technique's, with its inputs (MODEL = None)."""
    chain = harness.model_patch_nodes(object_info, exclude=OWN + tuple(NOT_CHAINED))
    for name, extra in EXPLICIT.items():
        if name in harness.pack_nodes(object_info):
            chain[name] = {**defaults(object_info, name), "model": None, **extra}
    patches = {name for name, info in harness.pack_nodes(object_info).items()
               if (info.get("output") or [None])[0] == "MODEL"
               and "model" in (info["input"].get("required") or {}) and name not in OWN and name not in NOT_CHAINED}
    assert patches <= set(chain), (f"pack patch nodes {sorted(patches - set(chain))} need inputs this test cannot fill "
                                   f"generically: add them to EXPLICIT")
    return dict(sorted(chain.items()))


def sampler_node(object_info: dict, model, positive, negative) -> dict:
    inputs = {**defaults(object_info, SAMPLER), "model": model, "positive": positive, "negative": negative,
              "latent_image": ["6", 0], "seed": 7, "steps": STEPS, "cfg": 7.0, "sampler_name": "euler",
              "scheduler": "normal", "denoise": 1.0, "cutoff": CUTOFF, "cutoff_unit": "fraction"}
    return {"class_type": SAMPLER, "inputs": inputs}


def base_prompt(clip) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": harness.CHECKPOINT_NAME}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": clip}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }


def add_patch(prompt: dict, nid: str, name: str, inputs: dict, model, clip) -> None:
    filled = {}
    for key, value in inputs.items():
        if value is None:
            value = model
        elif isinstance(value, str) and value.startswith("cond:"):
            enc = f"{nid}0"
            prompt[enc] = {"class_type": "CLIPTextEncode", "inputs": {"text": value[5:], "clip": clip}}
            value = [enc, 0]
        filled[key] = value
    prompt[nid] = {"class_type": name, "inputs": filled}


def composed_prompt(object_info: dict) -> tuple[dict, dict[str, str]]:
    """The whole pack in one graph; returns it and {patch node id: class}."""
    prompt = base_prompt(["2", 1])
    prompt["2"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                          "lora_name": harness.LORA_NAME, "strength_model": 0.8,
                                                          "strength_clip": 0.8}}
    prompt["3"] = {"class_type": "EOSConditioningSwap",
                   "inputs": {**defaults(object_info, "EOSConditioningSwap"), "clip": ["2", 1],
                              "source_text": SOURCE, "target_text": TARGET}}
    model, chained = ["2", 0], {}
    for i, (name, inputs) in enumerate(patch_chain(object_info).items()):
        nid = str(40 + i)
        add_patch(prompt, nid, name, inputs, model, ["2", 1])
        model, chained[nid] = [nid, 0], name
    prompt["20"] = sampler_node(object_info, model, ["3", 0], ["4", 0])
    prompt["21"] = {"class_type": "VAEDecode", "inputs": {"samples": ["20", 0], "vae": ["1", 2]}}
    prompt["22"] = {"class_type": "PreviewImage", "inputs": {"images": ["21", 0]}}
    for nid, name in chained.items():
        if name in VIEWERS:
            viewer, extra, json_out = VIEWERS[name]
            prompt[f"{nid}1"] = {"class_type": viewer, "inputs": {**defaults(object_info, viewer), **extra,
                                                                  "record": [nid, 1], "latent": ["20", 0]}}
            prompt[f"{nid}2"] = {"class_type": "PreviewAny", "inputs": {"source": [f"{nid}1", json_out]}}
    return prompt, chained


def alone_prompt(object_info: dict) -> dict:
    """Each node alone on the bare checkpoint: the sampler on plain prompts, the patch nodes and the EOS swap
    side by side (not chained)."""
    prompt = base_prompt(["1", 1])
    prompt["2"] = {"class_type": "CLIPTextEncode", "inputs": {"text": SOURCE, "clip": ["1", 1]}}
    prompt["3"] = {"class_type": "EOSConditioningSwap",
                   "inputs": {**defaults(object_info, "EOSConditioningSwap"), "clip": ["1", 1],
                              "source_text": SOURCE, "target_text": TARGET}}
    prompt["20"] = sampler_node(object_info, ["1", 0], ["2", 0], ["4", 0])
    shown = ["3", "20"]
    for i, (name, inputs) in enumerate(patch_chain(object_info).items()):
        add_patch(prompt, str(40 + i), name, inputs, ["1", 0], ["1", 1])
        shown.append(str(40 + i))
    # a node runs when something takes its text (a recorder alone has nothing to show before a sampler ran)
    for nid in shown:
        outputs = object_info[prompt[nid]["class_type"]]["output"]
        for index in [i for i, kind in enumerate(outputs) if kind == "STRING"][:1]:
            prompt[f"{nid}9"] = {"class_type": "PreviewAny", "inputs": {"source": [nid, index]}}
    return prompt


@pytest.fixture(scope="module")
def runs(base_url, comfy_server, object_info):
    assert harness.LORA_NAME in harness.get_json(base_url, "/models/loras"), \
        "random LoRA missing: run scripts/make_sd15_checkpoint.py"
    prompt, chained = composed_prompt(object_info)
    composed = harness.queue_api_prompt(base_url, prompt, server=comfy_server)
    alone = harness.queue_api_prompt(base_url, alone_prompt(object_info), server=comfy_server)
    return composed, alone, chained


def test_the_graph_holds_every_patch_node_of_the_pack(runs):
    _, _, chained = runs
    assert "TextLayerPatch" in chained.values() and "FrequencySplitPreview" in chained.values(), chained
    assert not set(chained.values()) & set(OWN)


def test_sampler_evaluates_the_rows_it_promises_alone(runs):
    composed, alone, chained = runs
    report = node_text(composed, "20")
    assert re.search(rf"^Model rows evaluated: {ROWS} \(plain CFG: {2 * STEPS}; 25\.0 % fewer\)\.$", report, re.M), \
        (report, chained)
    assert f"Guidance stopped at step {round(CUTOFF * STEPS)} of {STEPS}" in report
    assert without_time(report) == without_time(node_text(alone, "20")), chained
    assert len(node_out(composed, "22")["images"]) == 1


def test_other_nodes_give_what_they_give_alone(runs):
    composed, alone, chained = runs
    table = node_text(composed, "3")
    assert table and table == node_text(alone, "3")  # EOSConditioningSwap: the same token table
    for nid, name in chained.items():  # the patch nodes: the same reports (e.g. TextLayerPatch's layers)
        assert node_out(composed, nid) == node_out(alone, nid), name
    assert node_text(composed, next(n for n, c in chained.items() if c == "TextLayerPatch")).strip()


def test_recorders_recorded_this_run(runs):
    composed, _, chained = runs
    viewed = [(nid, name) for nid, name in chained.items() if name in VIEWERS]
    assert {name for _, name in viewed} == set(VIEWERS), chained
    guided = round(CUTOFF * STEPS)  # steps with a positive row (keep=negative drops it after the cutoff)
    for nid, name in viewed:
        stats = json.loads(node_text(composed, f"{nid}2"))
        assert stats["matched_latent"] is True, name  # the viewer found the run that made the sampler's LATENT
        if name == "FrequencySplitPreview":  # every step recorded, whatever ran inside it
            assert stats["reported_steps"] == STEPS and stats["steps"] == list(range(STEPS + 1))
        else:  # the capture's positive rows: every layer on each step that still evaluates one
            assert stats["steps"] == STEPS and not stats["layers"]["missing"]
            assert set(stats["layers"]["seen"].values()) == {guided}, stats["layers"]
            assert sum(stats["class_share"].values()) == pytest.approx(1.0, abs=1e-4)
