"""Text layers (paper 2): the few attention layers that decide what text is rendered — patch them with another
prompt, find them on your model, substitute words, and apply a LoRA to them only."""

from .nodes import NODES, LoraLoaderTextLayers, TextLayerLocalize, TextLayerPatch, TextLayerWordSubstitute

__all__ = ["NODES", "LoraLoaderTextLayers", "TextLayerLocalize", "TextLayerPatch", "TextLayerWordSubstitute"]
