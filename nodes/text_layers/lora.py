"""LoraLoaderTextLayers' logic: only the LoRA weights of the selected layers' attention (paper 2, Sec. 5)."""

from __future__ import annotations

import math

import comfy.lora
import comfy.lora_convert

from ..core.layers import layer_label, model_layers, parse_layers, weight_prefixes


def _model_key(key) -> str:
    return key if isinstance(key, str) else key[0]


def load_text_layer_lora(model, lora_sd: dict, layers: str, strength: float = 1.0, name: str = "LoRA"):
    """Clone ``model`` with only the LoRA patches of the selected layers' attention. Returns (model, report)."""
    ml = model_layers(model, "LoraLoaderTextLayers")
    resolved = parse_layers(layers, ml)
    if not resolved:
        return model, (f"LoraLoaderTextLayers · {ml.label} · {name}\nlayers: none selected, so nothing of the LoRA is "
                       f"applied and the model is unchanged. Give the text layers (e.g. 'auto' for SDXL/SD3, or "
                       f"TextLayerLocalize's 'layers' output).")
    if not math.isfinite(strength):
        raise ValueError(f"strength_model must be a finite number, got {strength}.")
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(lora_sd), key_map, log_missing=False)
    if not patches:
        raise ValueError(f"lora_name: no weight of {name} matches this {ml.label} model's diffusion model; it is a "
                         f"LoRA for another model (or for the text encoder only).")
    per_layer = {layer: weight_prefixes(ml, layer) for layer in resolved}
    kept, counts = {}, {}
    for key, patch in patches.items():
        mk = _model_key(key)
        for layer, prefixes in per_layer.items():
            if mk.startswith(prefixes):
                kept[key] = patch
                counts[layer] = counts.get(layer, 0) + 1
                break
    if not kept:
        touched = sorted({".".join(_model_key(k).split(".")[1:3]) for k in patches})
        raise ValueError(f"layers: none of the {len(patches)} weights {name} patches lies in the selected layers "
                         f"({', '.join(map(layer_label, resolved))}); it patches {', '.join(touched[:12])}"
                         f"{' …' if len(touched) > 12 else ''}. Select the layers it was trained on.")
    lines = [f"LoraLoaderTextLayers · {ml.label} · {name}",
             f"kept {len(kept)} of {len(patches)} diffusion-model weights of the LoRA (strength {strength:g}); "
             f"the other {len(patches) - len(kept)} and any text-encoder weights are ignored."]
    for layer in resolved:
        lines.append(f"  {layer_label(layer)} [{ml.index(layer)}]: {counts.get(layer, 0)} weights")
    if any(w.endswith("linear1.") for layer in resolved for w in weight_prefixes(ml, layer)):
        lines.append(f"note: {ml.label}'s single blocks fuse attention and MLP in linear1/linear2, so their MLP part "
                     f"is kept too.")
    if strength == 0:
        lines.append("strength 0: the model is unchanged.")
        return model, "\n".join(lines)
    m = model.clone()
    applied = m.add_patches(kept, strength)
    if len(applied) != len(kept):
        raise ValueError(f"lora_name: {len(kept) - len(applied)} of the kept weights do not fit this model's shapes.")
    return m, "\n".join(lines)


