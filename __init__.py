"""Prompt Anatomy: ComfyUI nodes that take the prompt's effect on diffusion apart.

Only ``comfy_entrypoint`` (ComfyUI's V3 API) and ``WEB_DIRECTORY`` are exported; the node modules are
imported when ComfyUI calls the entry point, after torch and comfy are already loaded.
"""

WEB_DIRECTORY = "./js"


async def comfy_entrypoint():
    from .nodes import PromptAnatomyExtension

    return PromptAnatomyExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
