"""The pack's miniature demo model: an SD1.x-shaped text-to-image model small enough to train on CPU.

:class:`PromptAnatomyDemoLoader` loads ``models/prompt_anatomy_mini/*.safetensors`` (inside the pack, next
to ``nodes/``) and returns a MODEL, a CLIP and a VAE built from ComfyUI's own classes, exactly as core
``CheckpointLoaderSimple`` builds an SD1.5 checkpoint (comfy/sd.py ``load_state_dict_guess_config``), only
with small configs read from the files' metadata:

* MODEL: ``comfy.model_base.BaseModel`` (UNet ``openaimodel.UNetModel``) with the ``SD15`` model config, so
  eps-prediction, SD1.x's linear beta schedule (0.00085 .. 0.012, 1000 steps), the SD15 latent format
  (scale 0.18215) and the family registry sees SD1.x (config SD15); wrapped in a ``ModelPatcher``.
* CLIP: ``comfy.sd.CLIP`` with ``comfy.sd1_clip.SD1Tokenizer`` (the real CLIP BPE, [SOS]/[EOS], 77 tokens
  padded with [EOS]) and ``SD1ClipModel`` (causal ``comfy.clip_model.CLIPTextModel``) with a small
  ``clip_l_model_config``.
* VAE: ``comfy.sd.VAE`` around ComfyUI's Tiny AutoEncoder for SD (``comfy.taesd.taesd.TAESD``, the class
  ComfyUI loads ``taesd_*`` VAE files with), 8x spatial compression and 4 latent channels, so
  EmptyLatentImage sizes work unchanged. (The first demo model used a small ``AutoencoderKL``; at 32 channels
  its GroupNorm(32) layers normalise every channel of every image on its own, which erased the colours of
  this world. TAESD has no normalisation layers.)

The weights are made by ``scripts/train_mini.py`` (see docs/mini_model_card.md). The builder functions are
shared with that script, so training and loading use the same classes and configs.
"""

from __future__ import annotations

import json
from pathlib import Path

import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.utils
import safetensors
import safetensors.torch
import torch
from comfy_api.latest import io

from .core import LOG

NODE_ID = "PromptAnatomyDemoLoader"
PACK_ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = PACK_ROOT / "models" / "prompt_anatomy_mini"
FORMAT = "prompt_anatomy_mini"
FORMAT_VERSION = "1"
COMPONENTS = {"unet": "unet.safetensors", "text_encoder": "text_encoder.safetensors", "vae": "vae.safetensors"}
JUDGE_FILE = "judge.safetensors"
LORA_DIR = MODEL_DIR / "loras"  # the demo LoRA (random, for LoraLoaderTextLayers in the demo workflows)
TRAIN_HINT = ("Restore the shipped files (`git checkout -- models/prompt_anatomy_mini` in the pack's folder) or train "
              "them with `python scripts/train_mini.py` and the shipped model's flags from docs/mini_model_card.md "
              "(under two hours on one CPU core).")

# The shipped configs (train_mini.py writes the config it trained with into each file's metadata, and the
# loader builds from the metadata, so these are only the defaults of a new training run).
UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 8, "in_channels": 4, "out_channels": 4,
    "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None,
    "model_channels": 32, "channel_mult": [1, 2, 4], "num_res_blocks": [1, 1, 1],
    # cross-attention at 8x8 and 4x4 (input and output blocks) and in the middle block (2x2)
    "transformer_depth": [1, 1, 0], "transformer_depth_output": [1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 64, "num_heads": -1, "num_head_channels": 16,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
CLIP_CONFIG = {  # overrides of comfy/sd1_clip_config.json (CLIP ViT-L/14's text tower)
    "hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4, "num_hidden_layers": 4,
    "projection_dim": 64, "hidden_act": "quick_gelu", "max_position_embeddings": 77, "vocab_size": 49408,
    "eos_token_id": 49407,
}
VAE_CONFIG = {"kind": "taesd", "latent_channels": 4}

WEIGHT_DTYPES = {"default": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------
# builders (shared with scripts/train_mini.py)
# ----------------------------------------------------------------------------------------------
def unet_model_config(unet_config: dict) -> comfy.supported_models.SD15:
    """ComfyUI's SD15 model config with the small UNet config (SD15's own num_heads override undone)."""
    cfg = comfy.supported_models.SD15(dict(unet_config))
    cfg.unet_config.update(unet_config)
    return cfg


def build_unet(unet_config: dict, dtype: torch.dtype = torch.float32, manual_cast_dtype=None, device="cpu",
               operations=None):
    """An SD15 ``BaseModel`` (eps-prediction, SD1.x schedule) with the small UNet; weights uninitialised
    unless ``operations`` initialise them (train_mini.py passes initialising ops)."""
    cfg = unet_model_config(unet_config)
    cfg.set_inference_dtype(dtype, manual_cast_dtype)
    cfg.custom_operations = operations
    return cfg.get_model({}, "", device=device)


def clip_target() -> comfy.supported_models_base.ClipTarget:
    return comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)


def build_clip(clip_config: dict, dtype: torch.dtype | None = None, operations=None, device_options: dict | None = None):
    """``comfy.sd.CLIP`` = SD1Tokenizer + SD1ClipModel (CLIP-L layout) with the small text-tower config."""
    opts = {"clip_l_model_config": dict(clip_config)}
    if dtype is not None:
        opts["dtype"] = dtype
    if operations is not None:
        opts["custom_operations"] = operations
    opts.update(device_options or {})
    return comfy.sd.CLIP(target=clip_target(), model_options=opts)


def build_vae(state_dict: dict, config: dict | None = None, device=None, dtype=None):
    """``comfy.sd.VAE`` around ``comfy.taesd.taesd.TAESD`` loaded from ``state_dict`` (ComfyUI recognises a
    TAESD state dict by its ``taesd_decoder.*`` keys, as for the taesd files of core's VAELoader)."""
    config = dict(VAE_CONFIG if config is None else config)
    if config.get("kind") != "taesd" or int(config.get("latent_channels", 0)) != 4:
        raise ValueError(f"{NODE_ID}: unsupported demo VAE config {config}; this pack reads a TAESD autoencoder with "
                         f"4 latent channels. {TRAIN_HINT}")
    return comfy.sd.VAE(sd=state_dict, device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------
def read_component(path: Path) -> tuple[dict, dict, dict]:
    """(state dict, config, metadata) of one weight file; ValueError when it is not one of ours."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} weight file (metadata format {meta.get('format')!r}). "
                         f"{TRAIN_HINT}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format version {meta.get('format_version')!r}, this pack reads "
                         f"{FORMAT_VERSION!r}. Retrain with the pack's scripts/train_mini.py.")
    try:
        config = json.loads(meta["config"])
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: its metadata has no readable 'config'. {TRAIN_HINT}") from e
    return comfy.utils.load_torch_file(str(path), safe_load=True), config, meta


def missing_files(directory: Path) -> list[Path]:
    return [directory / name for name in COMPONENTS.values() if not (directory / name).is_file()]


def check_weights(directory: Path) -> None:
    missing = missing_files(Path(directory))
    if missing:
        raise ValueError(f"{NODE_ID}: the demo model's weights are missing ({', '.join(str(p) for p in missing)}). "
                         f"{TRAIN_HINT}")


def _strict(what: str, missing, unexpected, ignore=()) -> None:
    missing = [k for k in missing if not any(k.endswith(s) for s in ignore)]
    if missing or unexpected:
        raise ValueError(f"{what}: the weight file does not match its config (missing {list(missing)[:5]}, "
                         f"unexpected {list(unexpected)[:5]}). {TRAIN_HINT}")


def load_unet(path: Path, dtype: torch.dtype | None = None):
    sd, config, _ = read_component(path)
    cfg = unet_model_config(config)
    load_device = comfy.model_management.get_torch_device()
    params = sum(v.numel() for v in sd.values())
    if dtype is None:  # as load_state_dict_guess_config picks it for a checkpoint
        dtype = comfy.model_management.unet_dtype(model_params=params, supported_dtypes=list(cfg.supported_inference_dtypes))
    manual_cast = comfy.model_management.unet_manual_cast(dtype, load_device, cfg.supported_inference_dtypes)
    cfg.set_inference_dtype(dtype, manual_cast)
    model = cfg.get_model(sd, "", device=comfy.model_management.unet_inital_load_device(params, dtype))
    m, u = model.diffusion_model.load_state_dict(sd, strict=False)
    _strict(f"{path.name} (UNet)", m, u)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device,
                                            offload_device=comfy.model_management.unet_offload_device())


def load_clip(path: Path, dtype: torch.dtype | None = None):
    sd, config, _ = read_component(path)
    clip = build_clip(config, dtype=dtype)
    m, u = clip.load_sd(sd, full_model=True)
    _strict(f"{path.name} (text encoder)", m, u, ignore=(".logit_scale",))
    return clip


def load_vae(path: Path, dtype: torch.dtype | None = None):
    sd, config, _ = read_component(path)
    if "taesd_decoder.1.weight" not in sd:
        raise ValueError(f"{path.name} (VAE): not a TAESD autoencoder (no 'taesd_decoder.1.weight'); it was made by an "
                         f"older scripts/train_mini.py. {TRAIN_HINT}")
    vae = build_vae(sd, config, dtype=dtype)
    expected = set(vae.first_stage_model.state_dict())  # comfy.sd.VAE loads non-strictly and only logs mismatches
    _strict(f"{path.name} (VAE)", sorted(expected - set(sd)), sorted(set(sd) - expected))
    return vae


def load_demo_model(directory: Path | str | None = None, weight_dtype: str = "default"):
    """(MODEL, CLIP, VAE) of the demo model in ``directory`` (default: the pack's models/prompt_anatomy_mini)."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {weight_dtype!r}.")
    directory = Path(directory) if directory is not None else MODEL_DIR
    check_weights(directory)
    dtype = WEIGHT_DTYPES[weight_dtype]
    model = load_unet(directory / COMPONENTS["unet"], dtype)
    clip = load_clip(directory / COMPONENTS["text_encoder"], dtype)
    vae = load_vae(directory / COMPONENTS["vae"], dtype)
    LOG.info("%s: loaded the demo model from %s (%s)", NODE_ID, directory, weight_dtype)
    return model, clip, vae


def register_demo_loras() -> None:
    """Add the shipped demo LoRA folder to ComfyUI's "loras" search paths (once), so LoraLoader and
    LoraLoaderTextLayers list ``prompt_anatomy_mini_demo_lora.safetensors`` next to the user's own LoRAs."""
    import folder_paths

    if LORA_DIR.is_dir() and str(LORA_DIR) not in folder_paths.get_folder_paths("loras"):
        folder_paths.add_model_folder_path("loras", str(LORA_DIR))


# ----------------------------------------------------------------------------------------------
# node
# ----------------------------------------------------------------------------------------------
class PromptAnatomyDemoLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE_ID,
            display_name="Prompt Anatomy Demo Model",
            category="prompt_anatomy/loaders",
            description="Loads the pack's miniature text-to-image model (SD1.x anatomy: UNet with cross-attention, "
                        "causal CLIP text encoder with [EOS] padding, 8x VAE), trained on CPU on a world of coloured, "
                        "textured shapes and signs that carry a word. Prompts like 'a red star', 'a striped heart', "
                        "'a blue circle and a yellow cross', 'a red star and a sign that says \"CAT\"'; 64x64 images "
                        "(EmptyLatentImage 64x64), 20 steps, cfg 4.",
            inputs=[
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="default",
                               tooltip="Precision the model runs in. default: what ComfyUI picks for a checkpoint on "
                                       "this device (fp32 on CPU); fp32 / fp16 / bf16 force it for all three parts."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The demo UNet (SD1.x type: eps-prediction, SD1 schedule)."),
                io.Clip.Output(display_name="CLIP", tooltip="The demo text encoder (CLIP BPE tokenizer, 77 tokens, [EOS] "
                                                            "padding) for CLIPTextEncode."),
                io.Vae.Output(display_name="VAE", tooltip="The demo autoencoder (ComfyUI's TAESD class: 8x compression, "
                                                          "4 latent channels)."),
            ],
        )

    @classmethod
    def execute(cls, weight_dtype="default") -> io.NodeOutput:
        return io.NodeOutput(*load_demo_model(MODEL_DIR, weight_dtype))


NODES = [PromptAnatomyDemoLoader]
