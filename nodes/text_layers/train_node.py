"""TextLayerLoraTrain's logic: train a LoRA on the chosen text layers only (paper 2, Sec. 5) with
:mod:`.lora_train` (core's TrainSampler), save it under ComfyUI's loras folder, apply it, plot the loss."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import torch

from ..core import LOG
from ..core.layers import layer_label, model_layers, parse_layers, weight_prefixes
from ..shared.drawing import line_plot, pil_to_image
from .lora import load_text_layer_lora
from .lora_train import ATTENTION_TARGETS, LOSS_WEIGHTINGS, save_lora, train_text_layer_lora

NODE_ID = "TextLayerLoraTrain"
TARGET_MODES = {"q_k_v_out": ATTENTION_TARGETS, "k_v": ("to_k", "to_v")}
NAME_RE = re.compile(r"[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*")


def lora_path(folder: str, name: str) -> tuple[Path, str]:
    """(full path, name relative to the loras folder) of a new file for ``name``: ``name.safetensors``, or with a
    counter ``name_00001.safetensors`` when that exists (never overwrites)."""
    name = (name or "").strip().removesuffix(".safetensors")
    if not NAME_RE.fullmatch(name) or ".." in name.split("/"):
        raise ValueError(f"lora_name: {name!r} is not a usable file name. Use letters, digits, '_', '-', '.' (and '/' "
                         f"for a subfolder of models/loras), e.g. text_layers/my_sign_lora.")
    rel = f"{name}.safetensors"
    n = 0
    while (Path(folder) / rel).exists():
        n += 1
        rel = f"{name}_{n:05d}.safetensors"
    return Path(folder) / rel, rel


def loss_plot(losses: list[float], title: str, loss: str = "x0") -> torch.Tensor:
    xs = list(range(1, len(losses) + 1))
    k = max(1, len(losses) // 8)
    smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
    img = line_plot([("loss", xs, losses, (120, 160, 220), False), (f"mean of {k}", xs, smooth, (230, 120, 20), False)],
                    title=title, xlabel="training step",
                    ylabel="loss (MSE of the x0 prediction" + (", x min(SNR, 5))" if loss == "min_snr" else ")"))
    return pil_to_image([img])


def train(model, latents, positive, layers: str, steps: int, rank: int, learning_rate: float, seed: int,
          lora_name: str, folder: str, targets: str = "q_k_v_out", apply: bool = True, loss: str = "x0"):
    """Everything the node does. Returns (model, saved name, loss plot IMAGE, report, loss per step)."""
    ml = model_layers(model, NODE_ID)
    if ml.family.no_training:
        raise ValueError(f"{NODE_ID} cannot train a LoRA on {ml.label}: {ml.family.no_training} It trains on SD1.x, "
                         f"SD2.x, SDXL, SD3 and AuraFlow; on this model, edit the text layers without training "
                         f"(TextLayerPatch) or load a LoRA trained elsewhere with LoraLoaderTextLayers.")
    resolved = parse_layers(layers, ml)
    if not resolved:
        raise ValueError(f"layers: empty, so there is nothing to train. Give the text layers (e.g. 'auto' on SDXL/SD3, "
                         f"or TextLayerLocalize's 'layers' output); valid: {ml.describe()}.")
    if targets not in TARGET_MODES:
        raise ValueError(f"targets must be one of {', '.join(TARGET_MODES)}, got {targets!r}.")
    if loss not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss must be one of {', '.join(LOSS_WEIGHTINGS)}, got {loss!r}.")
    if not (learning_rate >= 0 and learning_rate < float("inf")):
        raise ValueError(f"learning_rate must be a finite number ≥ 0, got {learning_rate}.")
    path, rel = lora_path(folder, lora_name)  # checked before the training, which takes minutes
    prefixes = [p for layer in resolved for p in weight_prefixes(ml, layer)]
    # UNet cross-attention layers have to_q/to_k/to_v/to_out.0; DiT blocks: every weight under their attention
    target_names = TARGET_MODES[targets] if ml.kind == "unet" else None
    start = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lora_sd, losses = train_text_layer_lora(model, latents, positive, prefixes, steps=steps, rank=rank,
                                            learning_rate=learning_rate, seed=seed, targets=target_names,
                                            loss_weighting=loss)
    seconds = time.perf_counter() - start
    names = [layer_label(layer) for layer in resolved]
    save_lora(lora_sd, path, {"prompt_anatomy.node": NODE_ID, "layers": names, "prefixes": prefixes, "rank": rank,
                              "steps": steps, "learning_rate": learning_rate, "seed": seed, "family": ml.family.name,
                              "targets": targets if ml.kind == "unet" else "all", "loss": loss,
                              "final_loss": losses[-1]})
    LOG.info("%s: saved %s (%d tensors) after %d steps in %.1f s", NODE_ID, path, len(lora_sd), steps, seconds)
    n_weights = sum(1 for k in lora_sd if k.endswith(".lora_up.weight"))
    n_params = sum(v.numel() for k, v in lora_sd.items() if not k.endswith(".alpha"))
    window = max(1, steps // 4)
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    lines = [f"{NODE_ID} · {ml.label} · saved models/loras/{rel}",
             f"layers: {', '.join(f'{n} [{ml.index(layer)}]' for n, layer in zip(names, resolved, strict=True))} of "
             f"{len(ml.layers)} {ml.unit}; {n_weights} weight matrices "
             f"({'/'.join(target_names) if target_names else 'every attention weight of the blocks'}), rank {rank}, "
             f"{n_params} LoRA parameters. Everything else is frozen and absent from the file.",
             f"{steps} steps, learning rate {learning_rate:g}, loss {loss}, seed {seed}, "
             f"{latents['samples'].shape[0]} latents: "
             f"{seconds:.1f} s = {steps / seconds:.2f} steps/s (CPU load {load:.1f} at the start).",
             f"loss: mean of the first {window} steps {first:.4f}, of the last {window} {last:.4f} (the per-step loss "
             f"depends mostly on the random noise level of each step; compare windows, not single steps).",
             f"Load it with LoraLoaderTextLayers (layers {', '.join(names)}) or core LoraLoader (refresh the node list "
             f"to see the new file)."]
    out_model = model
    if apply:
        out_model, applied = load_text_layer_lora(model, lora_sd, ", ".join(names), 1.0, name=rel)
        lines.append("MODEL output: the LoRA applied at strength 1 to these layers (" + applied.splitlines()[1] + ")")
    else:
        lines.append("MODEL output: the input model unchanged (apply_lora off).")
    plot = loss_plot(losses, f"{NODE_ID}: {rel}"[:80], loss)
    return out_model, rel, plot, "\n".join(lines), losses
