"""Tiny text-to-image (and text-to-video) models built from ComfyUI's own classes, for unit tests.

Every family gets a factory that returns a :class:`TinyModel` with a real ``ModelPatcher`` (so every patch
point and sampler is ComfyUI's) and a real ``comfy.sd.CLIP``. Both are built the way ComfyUI builds a
checkpoint's: the family's config class from ``comfy.supported_models`` gets a ``unet_config`` dict (only
dicts: ComfyUI's ``*Params`` dataclasses are never touched, their required fields change between versions),
then ``get_model({})``, with any config field a newer ComfyUI requires filled by that ComfyUI's own model
detection on the tiny model's recorded state-dict shapes (``tiny_model_shapes.json``, ``--write-shapes``);
the text side is the config class's ``clip_target()`` (or the family's ComfyUI text encoder module where the
config class has none) made small through ComfyUI's ``"<name>_model_config"``
model options, behind the tokenizers that ship with ComfyUI or, where the real one ships only inside
checkpoints, a small stand-in of the same kind with the same special-token ids.

===============  ===============  ==============================  ========================================  ==============
family           config class     diffusion model                 text side (encoder; tokenizer)            latent
===============  ===============  ==============================  ========================================  ==============
sd1              SD15             UNetModel ch 32, ctx 64         CLIP-L-like h64; CLIP BPE (shipped)        4 ch, /8
sd2              SD20             UNetModel, linear ST            CLIP-H-like h64 (pads 0); CLIP BPE         4 ch, /8
sdxl             SDXL             UNetModel + ADM                 CLIP-L + CLIP-G h64; CLIP BPE              4 ch, /8
ssd1b            SSD1B            SDXL, middle without attn       as sdxl                                   4 ch, /8
koala_700m       KOALA_700M       SDXL, middle_block None         as sdxl                                   4 ch, /8
sd3              SD3              MMDiT depth 2                   CLIP-L + CLIP-G (T5 zero); CLIP BPE        16 ch, /8
flux             Flux             Flux 1+1 blocks, guidance       T5 d64 + CLIP-L; T5 SPM + CLIP (shipped)   16 ch, /8
pixart_alpha     PixArtAlpha      PixArtMS h96 depth 2, micro     T5 d64; T5 SPM (shipped)                  4 ch, >= 34
pixart_sigma     PixArtSigma      PixArtMS h96 depth 2            T5 d64; T5 SPM (shipped)                  4 ch, >= 34
hunyuan_dit      HunyuanDiT1      HunYuanDiT h64 depth 2          BERT h64 (vocab.txt shipped) + mT5 d64;   4 ch, /8
                                                                  mT5 SPM **stand-in**
auraflow         AuraFlow         MMDiT (aura) dim 64             Pile-T5 d64; Pile-T5 SPM (shipped)         4 ch, /8
chroma           Chroma           Chroma 1+1 blocks               T5 d64; T5 SPM (shipped)                  16 ch, /8
chroma_radiance  ChromaRadiance   Chroma Radiance, NeRF head      T5 d64; T5 SPM (shipped)                  3 ch pixels, /16
flux2            Flux2            Flux.2 1+1 blocks, guidance     Mistral-3 h16 x 31 layers; Tekken         128 ch, /16
                                                                  byte-level BPE **stand-in**
qwen_image       QwenImage        QwenImage DiT 1 layer           Qwen2.5-VL h16 (small vision tower);      16 ch 5-D T=1
                                                                  Qwen2 BPE (shipped)
hidream          HiDream          HiDream 1+1 blocks, 2 experts   CLIP-L + CLIP-G + T5 + Llama-3 h16;       16 ch, /8
                                                                  CLIP, T5, Llama-3 BPE (all shipped)
hunyuan_image21  HunyuanImage21   HunyuanVideo 2-D patches        Qwen2.5-VL h16 + ByT5 d64; Qwen2 BPE,     64 ch, /32
                                  (glyph mapper left out)         ByT5 bytes (shipped)
lumina2          Lumina2          NextDiT dim 64                  Gemma-2 h16; Gemma SPM **stand-in**       16 ch, /8
zimage           ZImage           NextDiT dim 256, Z-Image mod.   Qwen3 h16; Qwen2 BPE (shipped)            16 ch, /8
wan21_t2v        WAN21_T2V        WanModel dim 64, 2 layers       UMT5 d64; UMT5 SPM **stand-in**           16 ch 5-D
wan22_t2v        WAN22_T2V        WanModel dim 64, 2 layers       UMT5 d64; UMT5 SPM **stand-in**           48 ch 5-D, /16
hunyuan_video15  HunyuanVideo15   HunyuanVideo 3-D patches        Qwen2.5-VL h16 + ByT5 d64; Qwen2 BPE,     32 ch 5-D
                                  (glyph mapper left out)         ByT5 bytes (shipped)
===============  ===============  ==============================  ========================================  ==============

Stand-in tokenizers (:func:`spiece_standin`, :func:`tekken_standin`), trained on the fly on a small corpus,
deterministic:

- mT5 (Hunyuan-DiT) and UMT5 (Wan): SentencePiece unigram, 200 pieces, pad 0, eos 1, unk 2, no bos.
- Gemma (Lumina 2): SentencePiece unigram with byte fallback, pad 0, eos 1, bos 2, unk 3 (bos added).
- Tekken (Flux.2): byte-level BPE (``tokenizers``) with Tekken's special tokens at their ids (<unk> 0, <s> 1,
  </s> 2, [INST] 3, [/INST] 4, <pad> 11, [SYSTEM_PROMPT] 17, [/SYSTEM_PROMPT] 18), <s> prepended, pads on
  the left with 11, ComfyUI's Flux.2 chat template. (ComfyUI 0.3.75's own tekken.json loader calls a
  transformers 4 API that transformers 5 removed, so the stand-in goes in as a tokenizer object.)

Construction is deterministic: the global RNG is seeded while ComfyUI builds (some layers draw with
torch.randn), ``torch.empty`` hands out NaN so everything ComfyUI leaves for a checkpoint is caught, and every
parameter plus every still-NaN buffer (SD3 pos_embed, ...) is initialised from a seeded generator; a factory
raises if anything stays non-finite. Pad/register tokens, positional encodings and modulations that ComfyUI
allocates with torch.empty (Lumina / Z-Image, AuraFlow, Wan) are parameters and are initialised with the rest.

Import this module only after ComfyUI is importable (``.comfyui`` on sys.path, ``--cpu`` parsed);
``python scripts/tiny_models.py OUT_DIR`` does that itself and writes each model's diffusion weights as
safetensors (used to check the factories are stable).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_by_path(name: str, path: Path, package_dir: Path | None = None):
    """Import the file ``path`` as module ``name`` (a package when ``package_dir`` is given), once: how the
    tests, benchmarks and scripts load the pack (by file location, as ComfyUI does) without putting the
    checkout on sys.path (its nodes/ would shadow ComfyUI's top-level nodes module)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[str(package_dir)] if package_dir else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def bootstrap_comfy() -> None:
    """Make ``import comfy`` work in a plain Python process (CPU, no CLI args of ours): scripts/comfy_path.py's,
    which honours PROMPT_ANATOMY_COMFYUI."""
    load_by_path("comfy_path", ROOT / "scripts" / "comfy_path.py").bootstrap_comfy()


@dataclasses.dataclass
class TinyModel:
    family: str
    model: object  # comfy.model_patcher.ModelPatcher
    clip: object  # comfy.sd.CLIP
    latent_channels: int
    config_class: str = ""  # name of the comfy.supported_models class the model was built from
    cond_extra: dict = dataclasses.field(default_factory=dict)  # added to every CONDITIONING (e.g. guidance)
    latent_dims: int = 2  # spatial(-temporal) dimensions of the latent: 2 -> (B, C, H, W), 3 -> (B, C, T, H, W)
    min_latent: int = 4  # smallest latent height/width the diffusion model accepts
    latent_multiple: int = 1  # latent height/width must be a multiple of this

    def encode(self, text: str):
        """CLIPTextEncode equivalent: a CONDITIONING list (plus the family's ``cond_extra`` values)."""
        tokens = self.clip.tokenize(text)
        cond = self.clip.encode_from_tokens_scheduled(tokens)
        if self.cond_extra:
            import node_helpers

            cond = node_helpers.conditioning_set_values(cond, dict(self.cond_extra))
        return cond

    def latent_shape(self, batch: int = 1, size: int | None = None, frames: int = 1) -> tuple:
        """Shape of an empty latent of ``batch`` rows, ``size`` x ``size`` latent pixels (clamped to the
        smallest size the model accepts, rounded up to its multiple); video families get ``frames``."""
        s = max(size or self.min_latent, self.min_latent)
        s = -(-s // self.latent_multiple) * self.latent_multiple
        if self.latent_dims == 3:
            return (batch, self.latent_channels, frames, s, s)
        return (batch, self.latent_channels, s, s)

    def empty_latent(self, batch: int = 1, size: int | None = None, frames: int = 1) -> dict:
        import torch

        return {"samples": torch.zeros(self.latent_shape(batch, size, frames))}


# ---------------------------------------------------------------------------------------------------------
# Deterministic construction
# ---------------------------------------------------------------------------------------------------------

_INT_SENTINEL = "uninitialised"


@contextlib.contextmanager
def _construction(seed: int):
    """While ComfyUI builds a module: the global RNG is seeded (some layers draw with torch.randn) and
    ``torch.empty`` returns NaN-filled floats / minimum-value integers, so anything ComfyUI leaves for a
    checkpoint to fill is visible afterwards (and initialised by :func:`_init_module`)."""
    import torch

    orig_empty = torch.empty

    def marked_empty(*args, **kwargs):
        t = orig_empty(*args, **kwargs)
        if t.device.type != "meta" and t.numel():
            if t.is_floating_point():
                t.fill_(float("nan"))
            elif t.dtype not in (torch.bool,) and not t.is_complex():
                t.fill_(torch.iinfo(t.dtype).min)
        return t

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.empty = marked_empty
        try:
            yield
        finally:
            torch.empty = orig_empty


def _init_module(module, seed: int) -> None:
    """Deterministic init: ComfyUI's ops skip weight init, so every parameter is set here, and every buffer
    ComfyUI allocated without values (NaN after :func:`_construction`) too. Raises if anything is left
    non-finite or uninitialised."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if not p.is_floating_point():
                continue
            shape = p.shape
            if p.ndim >= 2:
                fan_in = math.prod(shape[1:]) if shape[0] > 1 or p.ndim > 2 else shape[-1]
                v = torch.randn(shape, generator=g) / math.sqrt(max(fan_in, 1))
            elif name.endswith("weight") or name.endswith("scale"):
                v = 1.0 + 0.1 * torch.randn(shape, generator=g)
            else:
                v = 0.02 * torch.randn(shape, generator=g)
            p.copy_(v.to(p.dtype))
        for name, b in sorted(module.named_buffers(), key=lambda kv: kv[0]):
            if name.endswith("position_ids"):
                b.copy_(torch.arange(b.shape[-1]).expand_as(b))
            elif name.endswith("pos_embed") or (b.is_floating_point() and torch.isnan(b).any()):
                b.copy_((0.02 * torch.randn(b.shape, generator=g)).to(b.dtype))
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.is_floating_point():
                if not torch.isfinite(t).all():
                    raise RuntimeError(f"tiny model tensor {name} is not finite after init")
            elif t.dtype != torch.bool and not t.is_complex() and t.numel() and (t == torch.iinfo(t.dtype).min).any():
                raise RuntimeError(f"tiny model integer tensor {name} was left uninitialised")


def _patcher(model):
    import comfy.model_patcher
    import torch

    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def _diffusion(config_class: str, unet_config: dict, seed: int, dtype):
    """Build the diffusion model the way ComfyUI does for a checkpoint: the family's config class from
    comfy.supported_models with a unet_config dict (the class's own identifying keys + our small sizes),
    then ``get_model``. Returns (config, BaseModel)."""
    import comfy.supported_models
    import torch

    cls = getattr(comfy.supported_models, config_class)
    full = {**_detected_config(config_class), **cls.unet_config, **unet_config}
    cfg = cls(dict(full))
    cfg.unet_config.update(unet_config)  # the family's unet_extra_config must not override the tiny sizes
    cfg.set_inference_dtype(dtype or torch.float32, None)
    with _construction(seed):
        model = cfg.get_model({}, device="cpu")
    _init_module(model.diffusion_model, seed)
    model.diffusion_model.to(dtype or torch.float32)
    return cfg, model


_init_weights = _init_module  # the name other tests and benchmarks use

SHAPES_FILE = Path(__file__).with_name("tiny_model_shapes.json")


@functools.cache
def _shape_table() -> dict:
    return json.loads(SHAPES_FILE.read_text()) if SHAPES_FILE.is_file() else {}


def _detected_config(config_class: str) -> dict:
    """What the running ComfyUI's own model detection reads from the tiny model's state dict (key -> shape,
    recorded in tiny_model_shapes.json; meta tensors, no weights). The factories' sizes override it; it fills
    the fields a newer ComfyUI added to its configs (e.g. 0.8.0's Flux ``txt_ids_dims``, Chroma ``vec_in_dim``)
    with the values it gives an old checkpoint, so the factories need not know them."""
    import comfy.model_detection
    import torch

    shapes = _shape_table().get(config_class)
    if not shapes:
        return {}
    state_dict = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    return dict(comfy.model_detection.detect_unet_config(state_dict, "") or {})


def write_shapes(path: Path = SHAPES_FILE) -> dict:
    """Record every factory's diffusion-model state-dict shapes by config class (run on the pinned ComfyUI)."""
    import comfyui_version

    table = {"comfyui": comfyui_version.__version__}
    for family in FACTORIES:
        tiny = make(family)
        sd = tiny.model.model.diffusion_model.state_dict()
        table[tiny.config_class] = {k: list(v.shape) for k, v in sorted(sd.items())}
    path.write_text(json.dumps(table, separators=(",", ":"), sort_keys=True) + "\n")
    _shape_table.cache_clear()
    return table


def _clip(tokenizer_cls, clip_cls, seed, dtype, model_options_extra=None):
    """A comfy.sd.CLIP from a tokenizer class and a text-encoder class (for tests that build their own)."""
    return _text_encoder(_target(tokenizer_cls, clip_cls), seed, dtype, model_options_extra)


def _text_encoder(target, seed, dtype, te_options: dict | None = None, tokenizer_data: dict | None = None):
    """A comfy.sd.CLIP from a ClipTarget (ComfyUI's tokenizer and text-encoder classes), made small through
    ComfyUI's own model_options ("<name>_model_config" dicts)."""
    import comfy.sd
    import torch

    opts = {"dtype": dtype or torch.float32, "load_device": torch.device("cpu"),
            "offload_device": torch.device("cpu"), "initial_device": torch.device("cpu")}
    opts.update(te_options or {})
    with _construction(seed):
        clip = comfy.sd.CLIP(target=target, tokenizer_data=tokenizer_data or {}, model_options=opts)
    _init_module(clip.cond_stage_model, seed)
    return clip


def _target(tokenizer_cls, te_cls):
    import comfy.supported_models_base

    return comfy.supported_models_base.ClipTarget(tokenizer_cls, te_cls)


def _tiny(family, cfg, model, clip, *, cond_extra=None, min_latent=4, latent_multiple=1) -> TinyModel:
    fmt = cfg.latent_format
    return TinyModel(family, _patcher(model), clip, fmt.latent_channels, config_class=type(cfg).__name__,
                     cond_extra=dict(cond_extra or {}), latent_dims=getattr(fmt, "latent_dimensions", 2),
                     min_latent=min_latent, latent_multiple=latent_multiple)


# ---------------------------------------------------------------------------------------------------------
# Small text-encoder configurations (ComfyUI's "<name>_model_config" overrides)
# ---------------------------------------------------------------------------------------------------------

CLIP_SMALL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 2,
    "num_hidden_layers": 3,
    "projection_dim": 64,
}
T5_SMALL = {"d_model": 64, "d_ff": 128, "d_kv": 32, "num_heads": 2, "num_layers": 2}
# Llama-family decoders (Llama 3, Qwen 2.5 / 3, Gemma 2, Mistral 3): head_dim is fixed by ComfyUI's config
# classes (128 / 256), so one head; the vocabulary is the shipped tokenizer's, hence a narrow hidden size.
LLM_SMALL = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 4, "num_attention_heads": 1,
             "num_key_value_heads": 1}
BERT_SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 2}


# ---------------------------------------------------------------------------------------------------------
# Stand-in tokenizers (where the real one ships only inside checkpoints)
# ---------------------------------------------------------------------------------------------------------

_CORPUS = (
    "a red cat sits on a blue mat. a photo of a dog in the snow. two birds fly over the green sea. "
    "the quick brown fox jumps over the lazy dog. a painting of a house with a yellow door and a tall tree. "
    "an astronaut rides a horse on the moon. a bowl of fruit: apples, pears and oranges on a wooden table. "
    "close-up portrait of an old man with a grey beard, soft light, 35mm film. text \"hello world\" on a sign. "
    "a city street at night, rain, neon lights, reflections. a small boat on a calm lake at sunrise. "
    "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships. "
    "0 1 2 3 4 5 6 7 8 9 , . ; : ! ? ' \" ( ) [ ] { } - _ / \\ @ # $ % ^ & * + = < > | ~ `"
)


@functools.cache
def spiece_standin(kind: str) -> bytes:
    """A SentencePiece model (serialized proto) trained on a tiny corpus, with the special-token ids of
    ``kind``: "umt5" / "mt5" (pad 0, eos 1, unk 2, no bos) or "gemma" (pad 0, eos 1, bos 2, unk 3)."""
    import io

    import sentencepiece as spm

    ids = {"umt5": dict(pad_id=0, eos_id=1, unk_id=2, bos_id=-1, byte_fallback=False, vocab_size=200),
           "mt5": dict(pad_id=0, eos_id=1, unk_id=2, bos_id=-1, byte_fallback=False, vocab_size=200),
           "gemma": dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, byte_fallback=True, vocab_size=480)}[kind]
    sentences = [s.strip() + "." for s in _CORPUS.split(".") if s.strip()] * 4
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=out,
                                   model_type="unigram", character_coverage=1.0,
                                   num_threads=1, minloglevel=2, seed_sentencepiece_size=10000,
                                   hard_vocab_limit=False, **ids)
    return out.getvalue()


SPIECE_VOCAB = 512  # embedding rows for the SentencePiece stand-ins (>= their vocab size)

TEKKEN_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                   "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
                   "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                   "[TOOL_CONTENT]"]
TEKKEN_VOCAB = 512


@functools.cache
def tekken_standin():
    """A byte-level BPE ``tokenizers.Tokenizer`` like Mistral's Tekken: the same special tokens at the same
    ids (<unk> 0, <s> 1, </s> 2, [INST] 3, [/INST] 4, <pad> 11, [SYSTEM_PROMPT] 17, [/SYSTEM_PROMPT] 18),
    byte-level pieces after them, merges trained on a tiny corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TEKKEN_VOCAB, special_tokens=TEKKEN_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([s + "." for s in _CORPUS.split(".")] * 4, trainer=trainer)
    return tok


def _tekken_tokenizer_classes():
    """Flux.2's tokenizer classes with the Tekken stand-in in place of the checkpoint's tekken.json (ComfyUI
    0.3.75's Mistral3Tokenizer converts tekken.json with a transformers API that transformers 5 removed)."""
    import comfy.sd1_clip as sd1_clip
    import comfy.text_encoders.flux as flux_te

    class TekkenStandInTokenizer(sd1_clip.SDTokenizer):
        # the arguments of comfy.text_encoders.flux.Mistral3Tokenizer, with the stand-in tokenizer object
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            super().__init__("", pad_with_end=False, embedding_size=5120, embedding_key="mistral3_24b",
                             tokenizer_class=flux_te.MistralTokenizerClass, has_end_token=False,
                             pad_to_max_length=False, pad_token=11, max_length=99999999, min_length=1, pad_left=True,
                             tokenizer_args={"tokenizer_object": tekken_standin(), "legacy": False,
                                             # transformers 4 added <s> by default; 5 needs asking
                                             "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                             "add_bos_token": True},
                             tokenizer_data=tokenizer_data)

    class Flux2StandInTokenizer(flux_te.Flux2Tokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            sd1_clip.SD1Tokenizer.__init__(self, embedding_directory=embedding_directory, tokenizer_data=tokenizer_data,
                                           name="mistral3_24b", tokenizer=TekkenStandInTokenizer)
            self.llama_template = FLUX2_TEMPLATE

    return Flux2StandInTokenizer


FLUX2_TEMPLATE = ("[SYSTEM_PROMPT]You are an AI that reasons about image descriptions. You give structured responses "
                  "focusing on object relationships, object\nattribution and actions without speculation."
                  "[/SYSTEM_PROMPT][INST]{}[/INST]")


@contextlib.contextmanager
def _small_qwen_vision():
    """Qwen2.5-VL's text encoder always builds its vision tower at full size (~0.7 B parameters, hidden 1280,
    32 layers); text-only tests never run it, so it is built with small sizes here."""
    import comfy.text_encoders.qwen_vl as qwen_vl

    orig = qwen_vl.Qwen2VLVisionTransformer

    def small(**kwargs):
        return orig(**{**kwargs, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "num_layers": 1})

    qwen_vl.Qwen2VLVisionTransformer = small
    try:
        yield
    finally:
        qwen_vl.Qwen2VLVisionTransformer = orig


# ---------------------------------------------------------------------------------------------------------
# Factories
# ---------------------------------------------------------------------------------------------------------

UNET_BASE = {
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth": [1, 1],
    "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1, 1, 1],
    "use_linear_in_transformer": False,
    "context_dim": 64,
    "num_heads": 2,
    "num_head_channels": -1,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
    "adm_in_channels": None,
}

SDXL_UNET = dict(UNET_BASE, context_dim=128, adm_in_channels=64 + 6 * 256, num_classes="sequential",
                 use_linear_in_transformer=True, num_heads=-1, num_head_channels=16, transformer_depth=[1, 2],
                 transformer_depth_output=[1, 1, 2, 2])


def _sdxl_te(cfg, seed, dtype):
    return _text_encoder(cfg.clip_target(), seed + 1, dtype,
                         {"clip_l_model_config": CLIP_SMALL, "clip_g_model_config": CLIP_SMALL})


def make_sd1(seed: int = 0, dtype=None) -> TinyModel:
    bootstrap_comfy()
    cfg, model = _diffusion("SD15", UNET_BASE, seed, dtype)
    clip = _text_encoder(cfg.clip_target(), seed + 1, dtype, {"clip_l_model_config": CLIP_SMALL})
    return _tiny("sd1", cfg, model, clip)


def make_sd2(seed: int = 0, dtype=None) -> TinyModel:
    bootstrap_comfy()
    cfg, model = _diffusion("SD20", dict(UNET_BASE, use_linear_in_transformer=True, num_heads=-1, num_head_channels=16),
                            seed, dtype)
    clip = _text_encoder(cfg.clip_target(), seed + 1, dtype, {"clip_h_model_config": CLIP_SMALL})
    return _tiny("sd2", cfg, model, clip)


def make_sdxl(seed: int = 0, dtype=None) -> TinyModel:
    bootstrap_comfy()
    cfg, model = _diffusion("SDXL", SDXL_UNET, seed, dtype)
    return _tiny("sdxl", cfg, model, _sdxl_te(cfg, seed, dtype))


def make_ssd1b(seed: int = 0, dtype=None) -> TinyModel:
    """SSD-1B: SDXL with pruned blocks; its middle block keeps its resnets but no transformer."""
    bootstrap_comfy()
    cfg, model = _diffusion("SSD1B", dict(SDXL_UNET, transformer_depth_middle=-1, transformer_depth_output=[1, 0, 2, 1]),
                            seed, dtype)
    return _tiny("ssd1b", cfg, model, _sdxl_te(cfg, seed, dtype))


def make_koala_700m(seed: int = 0, dtype=None) -> TinyModel:
    """KOALA-700M: SDXL without a middle block (``middle_block`` is None)."""
    bootstrap_comfy()
    cfg, model = _diffusion("KOALA_700M", dict(SDXL_UNET, transformer_depth_middle=-2), seed, dtype)
    return _tiny("koala_700m", cfg, model, _sdxl_te(cfg, seed, dtype))


def make_sd3(seed: int = 0, dtype=None) -> TinyModel:
    bootstrap_comfy()
    import comfy.text_encoders.sd3_clip as sd3_clip

    cfg, model = _diffusion("SD3", {
        "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "adm_in_channels": 128,
        "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
        "num_patches": 1024, "pos_embed_max_size": 32, "x_block_self_attn_layers": [],
        "pos_embed_scaling_factor": None,
    }, seed, dtype)
    # SD3's checkpoint decides which encoders exist; the tiny one has CLIP-L and CLIP-G (T5 zero-padded)
    te = sd3_clip.sd3_clip(clip_l=True, clip_g=True, t5=False)
    clip = _text_encoder(_target(sd3_clip.SD3Tokenizer, te), seed + 1, dtype,
                 {"clip_l_model_config": CLIP_SMALL, "clip_g_model_config": CLIP_SMALL})
    return _tiny("sd3", cfg, model, clip, min_latent=2, latent_multiple=2)


FLUX_UNET = {
    "in_channels": 16, "out_channels": 16, "vec_in_dim": 64, "context_in_dim": 64,
    "hidden_size": 128, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
    "axes_dim": [16, 24, 24], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
}


def make_flux(seed: int = 0, dtype=None) -> TinyModel:
    bootstrap_comfy()
    cfg, model = _diffusion("Flux", FLUX_UNET, seed, dtype)
    clip = _text_encoder(cfg.clip_target(), seed + 1, dtype, {"clip_l_model_config": CLIP_SMALL, "t5xxl_model_config": T5_SMALL})
    return _tiny("flux", cfg, model, clip, cond_extra={"guidance": 3.5}, min_latent=2, latent_multiple=2)


def _pixart(family, config_class, seed, dtype, *, micro_condition, max_length):
    cfg, model = _diffusion(config_class, {
        "input_size": 16, "patch_size": 2, "in_channels": 4, "depth": 2, "num_heads": 2,
        "hidden_size": 96,  # a multiple of 3: micro-conditioning adds 2 size + 1 aspect embeddings of hidden / 3
        "caption_channels": T5_SMALL["d_model"], "pe_interpolation": 1.0, "model_max_length": max_length,
        "micro_condition": micro_condition,
    }, seed, dtype)
    clip = _text_encoder(cfg.clip_target(), seed + 1, dtype, {"t5xxl_model_config": T5_SMALL})
    # forward_orig's base size is round(mean latent side / 64) * 64: zero (a division by zero) below 33
    return _tiny(family, cfg, model, clip, min_latent=34, latent_multiple=2)


def make_pixart_alpha(seed: int = 0, dtype=None) -> TinyModel:
    bootstrap_comfy()
    return _pixart("pixart_alpha", "PixArtAlpha", seed, dtype, micro_condition=True, max_length=120)


def make_pixart_sigma(seed: int = 0, dtype=None) -> TinyModel:
    bootstrap_comfy()
    return _pixart("pixart_sigma", "PixArtSigma", seed, dtype, micro_condition=False, max_length=300)


def make_hunyuan_dit(seed: int = 0, dtype=None) -> TinyModel:
    """Hunyuan-DiT 1.2: Chinese-RoBERTa-like BERT (shipped vocab.txt) + mT5 (SentencePiece stand-in)."""
    bootstrap_comfy()
    cfg, model = _diffusion("HunyuanDiT1", {
        "input_size": 16, "patch_size": 2, "in_channels": 4, "hidden_size": 64, "depth": 2, "num_heads": 2,
        "mlp_ratio": 4.0, "text_states_dim": BERT_SMALL["hidden_size"], "text_states_dim_t5": T5_SMALL["d_model"],
        "text_len": 77, "text_len_t5": 256, "size_cond": False, "use_style_cond": False,
    }, seed, dtype)
    clip = _text_encoder(cfg.clip_target(), seed + 1, dtype,
                 {"hydit_clip_model_config": BERT_SMALL, "mt5xl_model_config": dict(T5_SMALL, vocab_size=SPIECE_VOCAB)},
                 tokenizer_data={"mt5xl.spiece_model": spiece_standin("mt5")})
    return _tiny("hunyuan_dit", cfg, model, clip, min_latent=2, latent_multiple=2)


def make_auraflow(seed: int = 0, dtype=None) -> TinyModel:
    bootstrap_comfy()
    cfg, model = _diffusion("AuraFlow", {
        "in_channels": 4, "out_channels": 4, "patch_size": 2, "dim": 64, "n_layers": 2, "n_double_layers": 1,
        "n_heads": 2, "global_conddim": 64, "cond_seq_dim": T5_SMALL["d_model"], "max_seq": 256,
    }, seed, dtype)
    clip = _text_encoder(cfg.clip_target(), seed + 1, dtype, {"pile_t5xl_model_config": T5_SMALL})
    return _tiny("auraflow", cfg, model, clip, min_latent=2, latent_multiple=2)


CHROMA_UNET = {
    "in_channels": 64, "out_channels": 64, "context_in_dim": T5_SMALL["d_model"], "hidden_size": 64,
    "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "axes_dim": [8, 12, 12],
    "theta": 10000, "patch_size": 2, "qkv_bias": True, "in_dim": 64, "out_dim": 64, "hidden_dim": 64, "n_layers": 1,
}


def make_chroma(seed: int = 0, dtype=None) -> TinyModel:
    bootstrap_comfy()
    cfg, model = _diffusion("Chroma", CHROMA_UNET, seed, dtype)
    clip = _text_encoder(cfg.clip_target(), seed + 1, dtype, {"t5xxl_model_config": T5_SMALL})
    return _tiny("chroma", cfg, model, clip, min_latent=2, latent_multiple=2)


def make_chroma_radiance(seed: int = 0, dtype=None) -> TinyModel:
    """Chroma Radiance: pixel space (3 channels, 16x16 patches decoded by a small NeRF-style head)."""
    bootstrap_comfy()
    cfg, model = _diffusion("ChromaRadiance", dict(
        CHROMA_UNET, in_channels=3, out_channels=3, patch_size=16, nerf_hidden_size=16, nerf_mlp_ratio=2, nerf_depth=1,
        nerf_max_freqs=4, nerf_tile_size=0, nerf_final_head_type="linear", nerf_embedder_dtype=None,
    ), seed, dtype)
    clip = _text_encoder(cfg.clip_target(), seed + 1, dtype, {"t5xxl_model_config": T5_SMALL})
    return _tiny("chroma_radiance", cfg, model, clip, min_latent=16, latent_multiple=16)


def make_flux2(seed: int = 0, dtype=None) -> TinyModel:
    """Flux.2: Mistral-3 text encoder (hidden states of layers 10, 20, 30 stacked, so 31 small layers) behind a
    Tekken-like stand-in tokenizer."""
    bootstrap_comfy()
    import comfy.text_encoders.flux as flux_te

    cfg, model = _diffusion("Flux2", {
        "in_channels": 128, "out_channels": 128, "vec_in_dim": None, "context_in_dim": 3 * LLM_SMALL["hidden_size"],
        "hidden_size": 64, "mlp_ratio": 3.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
        "axes_dim": [8, 8, 8, 8], "theta": 2000, "patch_size": 1, "qkv_bias": False, "guidance_embed": True,
        "global_modulation": True, "mlp_silu_act": True, "ops_bias": False, "default_ref_method": "index",
        "ref_index_scale": 10.0,
    }, seed, dtype)
    clip = _text_encoder(_target(_tekken_tokenizer_classes(), flux_te.flux2_te()), seed + 1, dtype,
                 {"mistral3_24b_model_config": dict(LLM_SMALL, num_hidden_layers=31, vocab_size=TEKKEN_VOCAB)})
    return _tiny("flux2", cfg, model, clip, cond_extra={"guidance": 4.0}, min_latent=2)


def _qwen_te_options():
    return {"qwen25_7b_model_config": dict(LLM_SMALL)}


def make_qwen_image(seed: int = 0, dtype=None) -> TinyModel:
    bootstrap_comfy()
    cfg, model = _diffusion("QwenImage", {
        "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 1, "attention_head_dim": 32,
        "num_attention_heads": 2, "joint_attention_dim": LLM_SMALL["hidden_size"], "axes_dims_rope": [8, 12, 12],
    }, seed, dtype)
    with _small_qwen_vision():
        clip = _text_encoder(cfg.clip_target(), seed + 1, dtype, _qwen_te_options())
    return _tiny("qwen_image", cfg, model, clip, min_latent=2, latent_multiple=2)


def make_hidream(seed: int = 0, dtype=None) -> TinyModel:
    """HiDream-I1: CLIP-L + CLIP-G (pooled), T5 + Llama 3 (hidden states of every layer) for context."""
    bootstrap_comfy()
    import comfy.text_encoders.hidream as hidream_te

    cfg, model = _diffusion("HiDream", {
        "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 1, "num_single_layers": 1,
        "attention_head_dim": 32, "num_attention_heads": 2,
        "caption_channels": [T5_SMALL["d_model"], LLM_SMALL["hidden_size"]], "text_emb_dim": 2 * CLIP_SMALL["projection_dim"],
        "num_routed_experts": 2, "num_activated_experts": 1, "axes_dims_rope": [8, 12, 12], "max_resolution": [32, 32],
        "llama_layers": [1, 3],  # one Llama layer per block (1 double + 1 single)
    }, seed, dtype)
    clip = _text_encoder(_target(hidream_te.HiDreamTokenizer, hidream_te.HiDreamTEModel), seed + 1, dtype,
                 {"clip_l_model_config": CLIP_SMALL, "clip_g_model_config": CLIP_SMALL, "t5xxl_model_config": T5_SMALL,
                  "llama_model_config": dict(LLM_SMALL)})
    return _tiny("hidream", cfg, model, clip, min_latent=2, latent_multiple=2)


def _hunyuan_unet(**kw):
    base = {
        "in_channels": 64, "out_channels": 64, "vec_in_dim": None, "context_in_dim": LLM_SMALL["hidden_size"],
        "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
        "axes_dim": [16, 16], "theta": 256, "patch_size": [1, 1], "qkv_bias": True, "guidance_embed": False,
        # the glyph branch's ByT5 mapper is fixed at 1472 -> 2048 -> 2048 (7.3 M parameters): left out of the
        # tiny diffusion model (ComfyUI skips it when "byt5" is False); the text side keeps a small ByT5
        "byt5": False, "meanflow": False, "use_cond_type_embedding": False, "vision_in_dim": None,
    }
    base.update(kw)
    return base


# ByT5 is built by ComfyUI's Hunyuan text encoders without a model name, so its config override is "_model_config"
BYT5_OPTIONS = {"_model_config": dict(T5_SMALL, vocab_size=384)}


def make_hunyuan_image21(seed: int = 0, dtype=None) -> TinyModel:
    bootstrap_comfy()
    cfg, model = _diffusion("HunyuanImage21", _hunyuan_unet(), seed, dtype)
    with _small_qwen_vision():
        clip = _text_encoder(cfg.clip_target(), seed + 1, dtype, {**_qwen_te_options(), **BYT5_OPTIONS})
    return _tiny("hunyuan_image21", cfg, model, clip)


def make_hunyuan_video15(seed: int = 0, dtype=None) -> TinyModel:
    bootstrap_comfy()
    cfg, model = _diffusion("HunyuanVideo15", _hunyuan_unet(
        in_channels=65, out_channels=32, axes_dim=[8, 12, 12], patch_size=[1, 1, 1], use_cond_type_embedding=True,
        vision_in_dim=32), seed, dtype)
    with _small_qwen_vision():
        clip = _text_encoder(cfg.clip_target(), seed + 1, dtype, {**_qwen_te_options(), **BYT5_OPTIONS})
    return _tiny("hunyuan_video15", cfg, model, clip)


def _lumina_unet(**kw):
    base = {
        "patch_size": 2, "in_channels": 16, "dim": 64, "n_layers": 2, "n_refiner_layers": 2, "n_heads": 2,
        "n_kv_heads": 2, "multiple_of": 16, "ffn_dim_multiplier": 4.0, "qk_norm": True,
        "cap_feat_dim": LLM_SMALL["hidden_size"], "axes_dims": [8, 12, 12], "axes_lens": [300, 512, 512],
        "rope_theta": 10000.0,
    }
    base.update(kw)
    return base


def make_lumina2(seed: int = 0, dtype=None) -> TinyModel:
    """Lumina Image 2.0: Gemma-2 text encoder behind a Gemma-like SentencePiece stand-in."""
    bootstrap_comfy()
    cfg, model = _diffusion("Lumina2", _lumina_unet(), seed, dtype)
    clip = _text_encoder(cfg.clip_target(), seed + 1, dtype, {"gemma2_2b_model_config": dict(LLM_SMALL, vocab_size=SPIECE_VOCAB)},
                 tokenizer_data={"spiece_model": spiece_standin("gemma")})
    return _tiny("lumina2", cfg, model, clip, min_latent=2, latent_multiple=2)


def make_zimage(seed: int = 0, dtype=None) -> TinyModel:
    """Z-Image: NextDiT with Z-Image modulation (its adaLN width is fixed at 256, so dim 256) and pad tokens."""
    bootstrap_comfy()
    cfg, model = _diffusion("ZImage", _lumina_unet(
        dim=256, n_heads=2, n_kv_heads=2, ffn_dim_multiplier=8.0 / 3.0, multiple_of=16, axes_dims=[32, 48, 48],
        axes_lens=[1536, 512, 512], rope_theta=256.0, z_image_modulation=True, time_scale=1000.0,
        pad_tokens_multiple=32), seed, dtype)
    clip = _text_encoder(cfg.clip_target(), seed + 1, dtype, {"qwen3_4b_model_config": dict(LLM_SMALL)})
    return _tiny("zimage", cfg, model, clip, min_latent=2, latent_multiple=2)


def _wan(family, config_class, channels, seed, dtype, *, model_type="t2v", in_dim=None, cond_extra=None):
    cfg, model = _diffusion(config_class, {
        "model_type": model_type, "patch_size": [1, 2, 2], "text_len": 512, "in_dim": in_dim or channels, "dim": 64,
        "ffn_dim": 128, "freq_dim": 256, "text_dim": T5_SMALL["d_model"], "out_dim": channels, "num_heads": 2,
        "num_layers": 2, "window_size": [-1, -1], "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6,
    }, seed, dtype)
    clip = _text_encoder(cfg.clip_target(), seed + 1, dtype, {"umt5xxl_model_config": dict(T5_SMALL, vocab_size=SPIECE_VOCAB)},
                 tokenizer_data={"spiece_model": spiece_standin("umt5")})
    return _tiny(family, cfg, model, clip, cond_extra=cond_extra, min_latent=2, latent_multiple=2)


def make_wan21_t2v(seed: int = 0, dtype=None) -> TinyModel:
    bootstrap_comfy()
    return _wan("wan21_t2v", "WAN21_T2V", 16, seed, dtype)


def make_wan22_t2v(seed: int = 0, dtype=None) -> TinyModel:
    bootstrap_comfy()
    return _wan("wan22_t2v", "WAN22_T2V", 48, seed, dtype)


WAN_CLIP_VISION_TOKENS = 5  # CLIP-vision tokens of the tiny I2V conditioning (a real CLIP-H image gives 257)


def make_wan21_i2v(seed: int = 0, dtype=None) -> TinyModel:
    """Wan 2.1 image-to-video (i2v cross-attention: CLIP-vision tokens in front of the text, attended in a second
    call); every conditioning carries a random CLIP-vision output, as WanImageToVideo's does."""
    bootstrap_comfy()
    import comfy.clip_vision
    import torch

    vision = comfy.clip_vision.Output()
    vision.penultimate_hidden_states = torch.randn(
        1, WAN_CLIP_VISION_TOKENS, 1280, generator=torch.Generator().manual_seed(seed + 2))
    return _wan("wan21_i2v", "WAN21_I2V", 16, seed, dtype, model_type="i2v", in_dim=36,
                cond_extra={"clip_vision_output": vision})


FACTORIES = {
    "sd1": make_sd1, "sd2": make_sd2, "sdxl": make_sdxl, "sd3": make_sd3, "flux": make_flux,
    "ssd1b": make_ssd1b, "koala_700m": make_koala_700m, "pixart_alpha": make_pixart_alpha,
    "pixart_sigma": make_pixart_sigma, "hunyuan_dit": make_hunyuan_dit, "auraflow": make_auraflow,
    "chroma": make_chroma, "chroma_radiance": make_chroma_radiance, "flux2": make_flux2,
    "qwen_image": make_qwen_image, "hidream": make_hidream, "hunyuan_image21": make_hunyuan_image21,
    "lumina2": make_lumina2, "zimage": make_zimage, "wan21_t2v": make_wan21_t2v, "wan22_t2v": make_wan22_t2v,
    "wan21_i2v": make_wan21_i2v,
    "hunyuan_video15": make_hunyuan_video15,
}


def make(family: str, seed: int = 0, dtype=None) -> TinyModel:
    try:
        factory = FACTORIES[family]
    except KeyError:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {sorted(FACTORIES)}") from None
    return factory(seed=seed, dtype=dtype)


def main(argv: list[str]) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="[tiny_models] %(message)s")
    if argv[:1] == ["--write-shapes"]:
        bootstrap_comfy()
        table = write_shapes()
        logging.info("%d config classes -> %s", len(table) - 1, SHAPES_FILE)
        return 0
    out_dir = Path(argv[0]) if argv else ROOT / ".models" / "tiny"
    bootstrap_comfy()
    import safetensors.torch

    out_dir.mkdir(parents=True, exist_ok=True)
    for family in FACTORIES:
        tiny = make(family)
        sd = {k: v.contiguous() for k, v in tiny.model.model.diffusion_model.state_dict().items()}
        path = out_dir / f"tiny_{family}.safetensors"
        safetensors.torch.save_file(sd, str(path))
        n = sum(v.numel() for v in sd.values())
        logging.info("%s: %d parameters -> %s", family, n, path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
