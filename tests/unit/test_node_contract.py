"""Saved workflows keep working: the required inputs of every node are the ones recorded in required_inputs.json.
An API-format prompt saved before an input existed lacks it, and ComfyUI's /prompt validation rejects a prompt that
misses a required input, so an input added to a released node must be optional (with its default); a new node is
added to the file with its required inputs."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import tiny_models

ROOT = Path(__file__).resolve().parents[2]
RECORDED = Path(__file__).with_name("required_inputs.json")


def required_inputs() -> dict[str, list[str]]:
    pack = tiny_models.load_by_path("prompt_anatomy", ROOT / "__init__.py", ROOT)

    async def nodes():
        return await (await pack.comfy_entrypoint()).get_node_list()

    return {cls.GET_SCHEMA().node_id: [i.id for i in cls.GET_SCHEMA().inputs if not getattr(i, "optional", False)]
            for cls in asyncio.run(nodes())}


def test_required_inputs_are_the_released_ones():
    recorded = json.loads(RECORDED.read_text())
    now = required_inputs()
    new_nodes = sorted(set(now) - set(recorded))
    assert not new_nodes, f"new nodes {new_nodes}: add them with their required inputs to {RECORDED.name}"
    for node_id, inputs in recorded.items():
        assert node_id in now, f"{node_id} is gone: node ids are permanent once a workflow saves them"
        added = [i for i in now[node_id] if i not in inputs]
        assert not added, (f"{node_id}: required input(s) {added} added; make them optional=True (saved API prompts "
                           f"lack them)")
        removed = [i for i in inputs if i not in now[node_id]]
        assert not removed, f"{node_id}: required input(s) {removed} removed or made optional: update {RECORDED.name}"
