"""The text-layer nodes (paper 2): TextLayerPatch, TextLayerWordSubstitute, LoraLoaderTextLayers and
TextLayerLocalize; the logic is in :mod:`.patch`, :mod:`.words`, :mod:`.lora` and :mod:`.localize`."""

from __future__ import annotations

import comfy.samplers
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..core import LOG
from ..core.layers import GRAMMAR
from .localize import SCORES, localize, render_chart
from .lora import load_text_layer_lora
from .lora_train import LOSS_WEIGHTINGS
from .patch import RANGE_UNITS, ROW_MODES, START_MODES, apply_text_layer_patch
from .train_node import TARGET_MODES
from .train_node import train as train_lora
from .words import encode_text, parse_replacements, substitute_words

LAYERS_TOOLTIP = ("Which attention layers see the edited prompt: " + GRAMMAR + " Paper 2's presets: 'sdxl_paper' "
                  "(output.2.1, output.2.2 = cross-attention layers 55-56 of SDXL's 70), 'sd3_paper' (joint.10 of SD3 "
                  "Medium); on other models use TextLayerLocalize's 'layers' output.")


def _ui(text: str):
    return ui.PreviewText(text)


class TextLayerPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TextLayerPatch",
            display_name="Text Layer Patch",
            category="prompt_anatomy/text_layers",
            description="Edits the text rendered in an image (paper 2): only the few attention layers that write "
                        "the text see the edited prompt, the rest of the model keeps the original prompt, so the "
                        "words on a sign change and the image stays. UNet models (SD1.x/SD2.x/SDXL) get the target's "
                        "keys/values in the selected cross-attention layers; joint-attention DiTs (SD3, Flux.1, Flux.2, "
                        "Chroma, Qwen-Image, AuraFlow, Lumina 2, Z-Image) run the target prompt as one extra batch "
                        "row per image on patched steps and swap its text keys/values into the selected blocks; Wan 2.1 / 2.2 "
                        "text-to-video models get the target's text stream in the selected blocks' cross-attention.",
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (it is cloned; the input stays unchanged)."),
                io.Conditioning.Input("target", tooltip="The edited prompt (e.g. the same prompt with 'HELLO' replaced "
                                                        "by 'WORLD'), encoded with this model's CLIP. The positive "
                                                        "prompt of the sampler is the source."),
                io.String.Input("layers", default="auto", tooltip=LAYERS_TOOLTIP),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="First patched step, as a fraction of the sampling steps (0 = the first step; "
                                       "paper 2 starts at step 4 of 50 for SDXL = 0.08 and 2 of 28 for SD3 ≈ 0.07). "
                                       "1 = never."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Patched steps end here (fraction of the sampling steps; 1 = through the last "
                                       "step)."),
                io.String.Input("heads", default="", optional=True,
                                tooltip="Optional subset of attention heads that see the edited prompt, e.g. '0-3,7' "
                                        "(0-based). Empty = every head."),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Blend of the source (0) and target (1) keys/values in the selected layers."),
                io.Combo.Input("rows", options=list(ROW_MODES), default="positive", optional=True,
                               tooltip="Which batch rows are patched: the positive prompt's only (the negative keeps "
                                       "its own text), or the negative's too. Rows are found by the conditioning's "
                                       "identity, so any batch size works."),
                io.Combo.Input("range_unit", options=list(RANGE_UNITS), default="step_fraction", optional=True,
                               tooltip="Unit of start_percent/end_percent. step_fraction: a fraction of the steps the "
                                       "sampler runs (end 0.5 = the first 10 of 20 steps on any scheduler; with "
                                       "KSamplerAdvanced it counts the steps that sampler runs, not the whole base + "
                                       "refiner run). timestep_percent: ComfyUI's timestep percents, as "
                                       "ConditioningSetTimestepRange and EOS Conditioning Swap's default (sigma-based: "
                                       "end 0.5 covers 10 of 20 steps with 'normal', 7 with 'exponential')."),
                io.Combo.Input("start_mode", options=list(START_MODES), default="start_percent", optional=True,
                               tooltip="start_percent: the patch starts at start_percent. paper: at paper 2's start "
                                       "for this model family from the registry (step 4 of 50 = 0.08 on SDXL, 2 of 28 "
                                       "≈ 0.07 on SD3 Medium); an error names the families that have one."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The patched model."),
                io.String.Output(display_name="report", tooltip="The resolved layers, steps and method."),
            ],
        )

    @classmethod
    def execute(cls, model, target, layers="auto", start_percent=0.0, end_percent=1.0, heads="", strength=1.0,
                rows="positive", range_unit="step_fraction", start_mode="start_percent") -> io.NodeOutput:
        m, report = apply_text_layer_patch(model, target, layers, start_percent, end_percent, heads, strength, rows,
                                           range_unit, start_mode)
        return io.NodeOutput(m, report, ui=_ui(report))


class TextLayerWordSubstitute(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TextLayerWordSubstitute",
            display_name="Word Substitution (Text Layers)",
            category="prompt_anatomy/text_layers",
            description="Encodes a prompt and a copy of it with words replaced ('word => replacement' per line). Wire "
                        "'source' to the sampler and 'target' to Text Layer Patch: only the text-writing layers see "
                        "the replacement, so an unwanted word on a sign is replaced while mood and content still "
                        "follow the original prompt (paper 2's safety application).",
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP (text encoder) of your model."),
                io.String.Input("text", multiline=True, dynamic_prompts=True,
                                default='a wooden sign that says "HELLO" in a sunny park',
                                tooltip="The prompt as the user wrote it (the source)."),
                io.String.Input("replacements", multiline=True, default="HELLO => WORLD",
                                tooltip="One 'word => replacement' per line. Whole words or phrases, case-insensitive; "
                                        "an ALL-CAPS or Capitalized match gets the replacement in the same case. All "
                                        "rules apply at once ('a => b' and 'b => a' swap). Empty replacement removes "
                                        "the word; lines starting with # are ignored."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="source", tooltip="The original prompt, encoded (the positive)."),
                io.Conditioning.Output(display_name="target", tooltip="The prompt with the replacements, encoded: "
                                                                      "connect to Text Layer Patch's target."),
                io.String.Output(display_name="target_text", tooltip="The prompt with the replacements."),
                io.String.Output(display_name="report", tooltip="Which words were replaced, and how often."),
            ],
        )

    @classmethod
    def execute(cls, clip, text, replacements) -> io.NodeOutput:
        if clip is None:
            raise ValueError("clip: no CLIP connected. Connect the CLIP output of your checkpoint or CLIP loader.")
        rules = parse_replacements(replacements)
        new_text, counts = substitute_words(text, rules)
        if text.strip() and not new_text.strip():
            raise ValueError("replacements: they remove every word of the prompt, so the target prompt is empty and the "
                             "patched layers would see no words. Replace the words instead of removing all of them.")
        lines = []
        for (left, right), n in zip(rules, counts, strict=True):
            lines.append(f"{left!r} => {right!r}: " + (f"replaced {n}×" if n else "not in the prompt"))
        if not rules:
            lines.append("No replacement rules: target = source (Text Layer Patch will change nothing).")
        elif not any(counts):
            lines.append("None of the words occurs in the prompt: target = source (Text Layer Patch will change "
                         "nothing).")
        lines.append(f"target text: {new_text}")
        report = "\n".join(lines)
        source = encode_text(clip, text)
        target = source if new_text == text else encode_text(clip, new_text)
        return io.NodeOutput(source, target, new_text, report, ui=_ui(report))


class LoraLoaderTextLayers(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraLoaderTextLayers",
            display_name="Load LoRA (Text Layers Only)",
            category="prompt_anatomy/text_layers",
            description="Applies a LoRA to the attention of the selected text layers only (paper 2's localized "
                        "fine-tuning: improves text rendering with less damage to the rest of the image); every other "
                        "weight of the LoRA, and its text-encoder part, is ignored. The report says how many weights "
                        "were kept.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model the LoRA is applied to (cloned)."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="The LoRA file (models/loras)."),
                io.Float.Input("strength_model", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="How strongly the kept weights modify the model (may be negative)."),
                io.String.Input("layers", default="", tooltip="The text layers whose attention keeps the LoRA (same "
                                                              "syntax as Text Layer Patch; empty = apply nothing). "
                                                              + LAYERS_TOOLTIP),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the LoRA on the selected layers only."),
                io.String.Output(display_name="report", tooltip="How many LoRA weights were kept, per layer."),
            ],
        )

    @classmethod
    def execute(cls, model, lora_name, strength_model=1.0, layers="") -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        lora = comfy.utils.load_torch_file(path, safe_load=True)
        m, report = load_text_layer_lora(model, lora, layers, strength_model, name=lora_name)
        return io.NodeOutput(m, report, ui=_ui(report))


class TextLayerLocalize(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TextLayerLocalize",
            display_name="Text Layer Localize",
            category="prompt_anatomy/text_layers",
            description="Finds the attention layers that write the text in an image (paper 2, Algorithm 1) on your "
                        "model: samples the source prompt once per candidate layer with only that layer fed the target "
                        "prompt, and ranks the candidates. score=latent (default): by how far the image moved toward "
                        "the target's where the text is and how little elsewhere (no extra model). score=ocr: as the "
                        "paper, by reading the decoded images with OCR (needs the VAE, the target words and the "
                        "optional package rapidocr-onnxruntime). Optionally searches the patch's start step too. The "
                        "best layers go straight into Text Layer Patch.",
            inputs=[
                io.Model.Input("model", tooltip="The model to localize (not modified)."),
                io.Conditioning.Input("positive", tooltip="The source prompt, e.g. a sign that says \"HELLO\"."),
                io.Conditioning.Input("target", tooltip="The same prompt with other words, e.g. \"WORLD\"."),
                io.Conditioning.Input("negative", tooltip="The negative prompt."),
                io.Latent.Input("latent_image", tooltip="Size and batch of the test images (small is fine: 64-512 px)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=False,
                             tooltip="The fixed seed of every test image."),
                io.Int.Input("steps", default=6, min=1, max=200,
                             tooltip="Sampling steps per test image (the node samples 2 + candidates images)."),
                io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale of the test images."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, tooltip="The sampler."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, tooltip="The scheduler."),
                io.String.Input("candidates", default="", multiline=True,
                                tooltip="Candidates to test. Empty: every layer of the model alone. Otherwise "
                                        "candidates separated by ';' or new lines, each a layer string (several "
                                        "layers are tested together, e.g. '55,56'); 'each 40-69' tests each of those "
                                        "layers alone; 'pairs 52-57' tests every pair of those layers (at most 16 "
                                        "layers), for models where no single layer changes the text."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="First patched step of each test (fraction of the steps), as in Text Layer "
                                       "Patch."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Patched steps end here (fraction of the steps)."),
                io.Float.Input("region_threshold", default=0.5, min=0.01, max=1.0, step=0.01,
                               tooltip="Where source and target differ by at least this fraction of their largest "
                                       "difference counts as the text region (for the score)."),
                io.Int.Input("top_k", default=1, min=1, max=64,
                             tooltip="How many of the best candidates form the 'layers' output (paper: 2 layers for "
                                     "SDXL, 1 block for SD3)."),
                io.Combo.Input("score", options=list(SCORES), default="latent", optional=True,
                               tooltip="latent: the latent-space score (toward − moved; no OCR, no VAE). ocr: paper 2's "
                                       "Algorithm 1 — decode every image with the VAE and read it with OCR: (word F1 + "
                                       "1 − normalised Levenshtein) / 2 against the target words × background SSIM "
                                       "against the source. Needs vae, target_text and the optional package "
                                       "rapidocr-onnxruntime (the error says how to install it; no silent fallback)."),
                io.Vae.Input("vae", optional=True,
                             tooltip="score=ocr only: the VAE of this model, to decode the test images for OCR."),
                io.String.Input("target_text", default="", optional=True,
                                tooltip="score=ocr only: the words the image should show. The quoted parts are used "
                                        "when there are quotes (so TextLayerWordSubstitute's target_text output can be "
                                        "wired here), else the whole text, e.g. WORLD."),
                io.String.Input("start_search", default="", optional=True,
                                tooltip="Optional start fractions to test, e.g. '0, 0.04, 0.08, 0.12': the best top_k "
                                        "candidates are re-run from each (end at end_percent) and the best start of "
                                        "the best candidate goes to 'best_start'. Empty: no search (best_start = "
                                        "start_percent). Paper 2 starts at 0.08 (SDXL) and ≈0.07 (SD3)."),
            ],
            outputs=[
                io.Image.Output(display_name="chart", tooltip="Bar chart of the scores in forward order (best in "
                                                              "orange)."),
                io.String.Output(display_name="table", tooltip="The ranked table with toward, moved and score."),
                io.String.Output(display_name="layers", tooltip="The best candidates' layers: wire into Text Layer "
                                                                "Patch's 'layers' (convert the widget to an input)."),
                io.Latent.Output(display_name="latents", tooltip="Source, target, then each candidate's result, in "
                                                                 "candidate order (VAE Decode to look at them)."),
                io.Float.Output(display_name="best_start", tooltip="The best start fraction of the start search (or "
                                                                   "start_percent without a search): wire into Text "
                                                                   "Layer Patch's start_percent."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, target, negative, latent_image, seed=0, steps=6, cfg=5.0, sampler_name="euler",
                scheduler="normal", candidates="", start_percent=0.0, end_percent=1.0, region_threshold=0.5,
                top_k=1, score="latent", vae=None, target_text="", start_search="") -> io.NodeOutput:
        details: dict = {}
        scores, src, tgt, patched, table, best, k = localize(
            model, positive, target, negative, latent_image, seed, steps, cfg, sampler_name, scheduler, candidates,
            start_percent, end_percent, region_threshold, top_k, score=score, vae=vae, target_text=target_text,
            start_search=start_search, details=details)
        chart = render_chart(scores, k, f"TextLayerLocalize: {len(scores)} candidates, best: {best}"[:90])
        latents = dict(latent_image)
        latents.pop("noise_mask", None)
        latents.pop("batch_index", None)
        latents["samples"] = torch.cat([src, tgt, *patched], 0)
        out_ui = ui.PreviewImage(chart, cls=cls).as_dict()
        out_ui.update(ui.PreviewText(table).as_dict())
        LOG.info("TextLayerLocalize: best layers %s", best)
        return io.NodeOutput(chart, table, best, latents, details["best_start"], ui=out_ui)


class TextLayerLoraTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TextLayerLoraTrain",
            display_name="Train LoRA (Text Layers Only)",
            category="prompt_anatomy/text_layers",
            description="Trains a LoRA on the selected text layers only (paper 2, Sec. 5: fine-tuning just the "
                        "localized cross-attention layers improves text rendering with less damage to the rest of the "
                        "image). Everything else stays frozen and is absent from the saved file; the base model is not "
                        "changed. Uses ComfyUI's own trainer (TrainSampler). Saves to models/loras, so LoraLoader and "
                        "Load LoRA (Text Layers Only) load it.",
            inputs=[
                io.Model.Input("model", tooltip="The model to train the LoRA for (left unchanged)."),
                io.Latent.Input("latents", tooltip="The training images as a LATENT batch (VAE Encode of images with "
                                                   "the text rendered the way you want)."),
                io.Conditioning.Input("positive", tooltip="Their caption(s): one conditioning for every latent, or one "
                                                          "per latent."),
                io.String.Input("layers", default="auto", tooltip="The text layers to train (everything else frozen). "
                                                                  + LAYERS_TOOLTIP),
                io.Int.Input("steps", default=200, min=1, max=100000,
                             tooltip="Training steps (one latent and one random noise level per step)."),
                io.Int.Input("rank", default=4, min=1, max=256, tooltip="LoRA rank (alpha 1, as core TrainLoraNode)."),
                io.Float.Input("learning_rate", default=1e-3, min=0.0, max=1.0, step=1e-5,
                               tooltip="AdamW learning rate (0 trains nothing: a control run)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=False,
                             tooltip="Seed of the noise, noise levels and batch order (the run is deterministic)."),
                io.String.Input("lora_name", default="text_layers/text_layer_lora",
                                tooltip="File name under models/loras (no extension; '/' for a subfolder). An existing "
                                        "file is never overwritten: a counter is appended."),
                io.Combo.Input("targets", options=list(TARGET_MODES), default="q_k_v_out",
                               tooltip="UNet layers: which projections of each cross-attention layer get a LoRA — all "
                                       "four (q, k, v, out; the paper tunes the layers as a whole) or only the "
                                       "text-side k, v. DiT blocks always train every attention weight of the block."),
                io.Boolean.Input("apply_lora", default=True,
                                 tooltip="On: the MODEL output has the new LoRA applied (strength 1) to these layers. "
                                         "Off: the input model is passed through."),
                io.Combo.Input("loss", options=list(LOSS_WEIGHTINGS), default="x0", optional=True,
                               tooltip="x0: core TrainSampler's loss, the squared error of the denoised image; on SD1.x "
                                       "/ SDXL it is ruled by the noisiest steps, where the layout is set. min_snr: "
                                       "each step weighted by min(SNR, 5), so the moderate noise levels that draw "
                                       "details such as glyphs count too (faster to learn letters, also faster to "
                                       "disturb the words the model knew)."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the LoRA applied (or unchanged)."),
                io.String.Output(display_name="lora_name", tooltip="The saved file, relative to models/loras."),
                io.Image.Output(display_name="loss_plot", tooltip="Loss per step and its running mean."),
                io.String.Output(display_name="report", tooltip="Layers, weights, time, steps/s and the loss."),
            ],
        )

    @classmethod
    def execute(cls, model, latents, positive, layers="auto", steps=200, rank=4, learning_rate=1e-3, seed=0,
                lora_name="text_layers/text_layer_lora", targets="q_k_v_out", apply_lora=True,
                loss="x0") -> io.NodeOutput:
        folder = folder_paths.get_folder_paths("loras")[0]
        m, rel, plot, report, _ = train_lora(model, latents, positive, layers, steps, rank, learning_rate, seed,
                                          lora_name, folder, targets, apply_lora, loss)
        out_ui = ui.PreviewImage(plot, cls=cls).as_dict()
        out_ui.update(ui.PreviewText(report).as_dict())
        return io.NodeOutput(m, rel, plot, report, ui=out_ui)


NODES = [TextLayerPatch, TextLayerWordSubstitute, LoraLoaderTextLayers, TextLayerLocalize, TextLayerLoraTrain]
