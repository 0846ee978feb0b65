"""The pack's nodes. ``core/`` and ``shared/`` hold the mechanics every technique uses; each technique is one
package (``guidance_cutoff``, ``eos_swap``, ``frequency``, ``attention``, ``text_layers``) exposing a ``NODES`` list,
plus the demo model's loader (``demo_model``)."""

from __future__ import annotations

import importlib

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

# every node module, in the order the node library lists them; imported when ComfyUI asks for the node list
NODE_MODULES = ("demo_model", "guidance_cutoff", "eos_swap", "frequency", "attention", "text_layers")


def all_nodes() -> list[type[io.ComfyNode]]:
    return [node for name in NODE_MODULES for node in importlib.import_module(f".{name}", __name__).NODES]


class PromptAnatomyExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # ComfyUI 0.3.75 calls get_node_list once when it loads the pack (it never calls on_load)
        from .demo_model import register_demo_loras

        register_demo_loras()
        return all_nodes()
