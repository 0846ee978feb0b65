"""The model-family registry: the one place that knows model families.

For every ComfyUI model config class the pack supports, a :class:`Family` says everything a technique needs:
how text enters the denoiser, its text-attention layers (UNet cross-attention found by walking the UNet, DiT
blocks from :class:`BlockKind` entries: where the block list lives, its ``patches_replace["dit"]`` key, where its
attention weights and head count are), the text encoders in the context with their token rules
(:class:`EncoderSpec`), where the pooled vector comes from, the latent layout, whether the model is
guidance-distilled, and the paper presets that apply (only where a paper localized that exact architecture).

Techniques ask :func:`family_of` (a MODEL) or :func:`family_of_clip` (a CLIP) and read the entry; a model the
registry does not know gets one ValueError naming its config class and listing the supported families.
Adding a family = one entry in :data:`FAMILIES` (+ a tiny-model factory in ``scripts/tiny_models.py`` + tests).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch

# how text enters the denoiser
UNET_CROSS = "unet_cross"  # UNet cross-attention (attn2) in every transformer block
DIT_CROSS = "dit_cross"  # DiT blocks with a separate cross-attention over the text context
JOINT = "joint"  # joint attention over [text, image] tokens (MMDiT / double-stream blocks)
SINGLE = "single"  # text and image tokens in one sequence (single-stream blocks)


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """One text encoder of a family's CLIP object and where its tokens land in the conditioning tensor."""

    key: str  # clip.tokenize key: 'l', 'g', 'h', 't5xxl', 'qwen25_7b'
    label: str  # CLIP-L, CLIP-G, OpenCLIP-H, T5-XXL, Qwen2.5-VL
    kind: str  # "clip" ([SOS] ... [EOS] pad, 77 per chunk), "t5" (no [SOS], end token, one chunk), "causal" (a
    #            decoder-only LLM without a chat template: [BOS] ... pad, one chunk) or LLM
    attr: str  # attribute of the CLIP's cond_stage_model holding this encoder (None there: not loaded)
    group: int = 0  # 0: token block at the start (encoders of group 0 share positions, concatenated on channels)
    in_context: bool = True  # False: only its pooled vector is used (Flux's CLIP-L)
    missing_width: int | None = None  # channels the context keeps for it when it is not loaded (SD3 CLIP-L: 768)
    # LLM encoders: the chat template around the prompt, as text the encoder's own tokenizer turns into ids (so a
    # stand-in tokenizer with the same special tokens resolves them too)
    head_end: str = ""  # template text right before the prompt: the template head ends with its tokens
    tail_start: str = ""  # template text right after the prompt: its first token (end of turn) is the [EOS] analogue
    drops_head: bool = False  # the encoder cuts the template head off its output (Qwen-Image)
    no_eos: str = ""  # why no state follows the prompt (the [EOS] constructions have no meaning then)
    cond_key: str | None = None  # its states travel in this conditioning entry, not the context (Hunyuan-DiT's mT5)
    mask_key: str | None = None  # the conditioning entry holding its attention mask (kept from the base prompt)
    token_axis: int = 1  # the token axis of its cond_key entry ((1, layers, tokens, C): 2, HiDream's Llama)
    pad_is_end: bool = False  # no end token: the first pad token after the prompt is the [EOS] (HiDream's Llama-3.1
    #                           pads with <|eot_id|>, the end-of-turn token)


@dataclasses.dataclass(frozen=True)
class BlockKind:
    """One kind of attention block of a DiT, in forward order after the kinds listed before it."""

    name: str  # layer-grammar group name: 'joint', 'double', 'single'
    attr: str  # attribute of diffusion_model holding the block list
    replace: str | None  # patches_replace["dit"] key of these blocks (None: the model offers no block replace)
    weights: tuple[str, ...]  # state-dict prefixes (under diffusion_model.) of the block's attention, "{i}" = index
    heads: str  # attribute path from a block to its head count
    text_call: int | None = None  # blocks whose text attention is one of several attention calls (DiT cross-
    #                               attention): the 0-based ordinal of the call that attends to the text
    #                               (Wan: self-attention 0, cross-attention 1); None: the block's first call
    text_attn: str | None = None  # attribute path from a block to its text attention module (DiT cross-attention)


@dataclasses.dataclass(frozen=True)
class Family:
    name: str  # the pack's id: 'sd1', 'sdxl', ...
    label: str  # what users read: 'SD1.x', 'Flux.1'
    configs: tuple[str, ...]  # ComfyUI model config class names (comfy/supported_models.py), matched exactly
    text_entry: tuple[str, ...]  # UNET_CROSS / DIT_CROSS / JOINT / SINGLE, in the order the blocks come
    encoders: tuple[EncoderSpec, ...]  # the text encoders of this family's CLIP, in conditioning order
    clip_match: Callable  # cond_stage_model -> bool: is this CLIP the family's text encoder?
    tokenizer: str  # "module:Class" of the stock tokenizer (token labels when no CLIP is connected)
    pooled: str  # where the pooled vector comes from and what uses it
    latent_format: str  # comfy.latent_formats class name
    context_width: Callable  # ModelPatcher -> channels of the text context the model takes (None: unknown)
    blocks: tuple[BlockKind, ...] = ()  # DiT attention blocks (UNets: walked, see core.layers)
    register_tokens: str | None = None  # diffusion_model attribute (a count or a (1, n, dim) tensor): learned tokens
    #                                     in front of the text stream
    latent_patch: int = 1  # the latent's channels pack latent_patch² pixels (Flux.2: 128 = 32 x 2x2)
    text_pad: int | None = None  # the model left-pads the text stream with zeros to this length (prompt at the end)
    guidance_distilled: bool = False  # guidance is an input of the model (cfg 1 is the normal use)
    cond_extra: tuple = ()  # (key, value) every conditioning of this family carries (Flux: guidance)
    presets: tuple[tuple[str, tuple], ...] = ()  # paper presets: (name, layer keys) for this exact architecture
    auto_preset: str | None = None  # the preset 'auto' resolves to
    preset_note: str = ""  # which architecture the presets were localized on
    preset_arch: Callable | None = None  # (ModelPatcher, n text layers) -> is it that exact architecture?
    preset_start: float | None = None  # the paper's first patched step as a fraction of its sampling steps
    attention_name: str = ""  # what users call its text attention, e.g. "SD3's MMDiT"
    no_attention_hook: str = ""  # why the attention techniques cannot reach this family's text attention (if so)
    no_training: str = ""  # why a LoRA cannot be trained on this family's blocks here (if so)
    patch: tuple[int, ...] | None = None  # the DiT's token patch, (h, w) or (t, h, w); None: diffusion_model.patch_size
    text_embedder: str | None = None  # DIT_CROSS: diffusion_model attribute that maps the encoder's context to the
    #                                   blocks' text stream token by token (Wan: text_embedding)
    stock_tokens: bool = True  # False: the tokenizer ships inside the checkpoint, so token labels need the CLIP
    lead_calls: tuple[str, ...] = ()  # blocks without a block replace (BlockKind.replace None) are found by counting
    #                                   attention calls per forward: diffusion_model attributes of the blocks that
    #                                   each make one call before them (NextDiT: context_refiner, noise_refiner)
    text_multiple: str | None = None  # diffusion_model attribute: the model right-pads the text stream to a multiple
    #                                   of it (Z-Image's learned pad tokens; None there: no padding)
    text_last: bool = False  # the joint sequence is [image, text] (HunyuanImage 2.1, HunyuanVideo 1.5, HiDream)
    text_extras: tuple[tuple[str, str], ...] = ()  # (conditioning key, model input) of per-prompt tokens that join the
    #                                   text stream next to the prompt (Hunyuan's ByT5 glyphs, HiDream's Llama states)
    prompt_last: bool = False  # those extra tokens come before the prompt in the text stream (HunyuanVideo 1.5)
    text_extras_hint: str = ""  # how to make the target's extra tokens match the source's (TextLayerPatch's error)
    text_len: Callable | None = None  # counted DiTs: (forward's arguments by name) -> text tokens of the joint
    #                                   attention (HiDream: T5 + two Llama segments); None: the context's length
    text_front: Callable | None = None  # DiT cross-attention with a block replace: (forward's arguments by name) ->
    #                                   tokens in front of the text in the block's txt (Wan I2V: CLIP-vision tokens)
    block_text_swap: bool = False  # TextLayerPatch swaps the selected blocks' whole text stream (block replace) with
    #                                the target rows', which the model builds itself (Hunyuan-DiT: BERT + mT5 inside)
    no_eos_swap: str = ""  # why EOSConditioningSwap cannot rebuild this family's text input (the model still works)
    text_qk: Callable | None = None  # (text-attention module, x, text, its other arguments) -> (q, k) as (B, H, L, D),
    #                                  through the module's own projections: maps of text attention that runs
    #                                  without transformer_options (core.text_attn proxies; PixArt, Hunyuan-DiT)
    flat_text: bool = False  # the blocks get the whole batch's text as one row (PixArt: (1, B·L, C))
    context_first: bool = False  # the text attention's keys are the context's tokens, then other text (Hunyuan-DiT:
    #                              its mT5 states): maps are over the context's tokens, renormalised over them

    @property
    def proxied(self) -> bool:
        """DiT cross-attention without any block hook: the pack wraps each block's text attention (core.text_attn)."""
        return self.is_dit_cross and bool(self.blocks) and all(k.replace is None for k in self.blocks)

    @property
    def is_unet(self) -> bool:
        return self.text_entry == (UNET_CROSS,)

    @property
    def is_dit_cross(self) -> bool:
        return self.text_entry == (DIT_CROSS,)

    @property
    def context_encoders(self) -> tuple[EncoderSpec, ...]:
        return tuple(e for e in self.encoders if e.in_context)

    def preset(self, name: str) -> tuple | None:
        return dict(self.presets).get(name)


def _unet_context_dim(model) -> int | None:
    cfg = getattr(model.model.model_config, "unet_config", {}) or {}
    width = cfg.get("context_dim")
    return int(width) if width else None


def _module_in_features(*attrs: str) -> Callable:
    """Input width of the first of these diffusion_model modules (dotted paths allowed) that exists."""
    def width(model) -> int | None:
        dm = model.model.diffusion_model
        for attr in attrs:
            mod = functools.reduce(lambda m, a: getattr(m, a, None), attr.split("."), dm)
            if isinstance(mod, torch.nn.Sequential):  # an MLP (Wan), a norm + linear (NextDiT): its first linear
                mod = next((m for m in mod if hasattr(m, "in_features")), None)
            if mod is not None and hasattr(mod, "in_features"):
                return int(mod.in_features)
        return None

    return width


def _sdxl_base(model, n_layers: int) -> bool:
    return config_name(model) == "SDXL" and n_layers == 70


def _sd3_medium(model, n_layers: int) -> bool:
    cfg = getattr(model.model.model_config, "unet_config", {}) or {}
    return n_layers == 24 and not cfg.get("x_block_self_attn_layers")  # SD3.5 Medium has self-attention x-blocks


def _clip_is(cls_name: str, clip_name: str | None = None, exclude: str | None = None) -> Callable:
    """cond_stage_model matcher: an instance of ComfyUI's ``cls_name`` (by class name anywhere in its MRO, so the
    subclasses ComfyUI's loaders make match too), optionally with that SD1ClipModel ``clip_name``; a subclass
    named ``exclude`` is another model's text encoder (HunyuanImage's subclasses Qwen-Image's)."""
    def match(csm) -> bool:
        names = {c.__name__ for c in type(csm).__mro__}
        if cls_name not in names or exclude in names:
            return False
        return clip_name is None or getattr(csm, "clip_name", None) == clip_name

    return match


CLIP_L = EncoderSpec("l", "CLIP-L", "clip", "clip_l")
CLIP_G = EncoderSpec("g", "CLIP-G", "clip", "clip_g")
T5XXL = EncoderSpec("t5xxl", "T5-XXL", "t5", "t5xxl")

# measured on the tiny models: backward fails on Flux, Chroma (Radiance) and Flux.2; SD1/SD2/SDXL/SD3/AuraFlow train
FLUX_NO_TRAINING = ("ComfyUI's Flux-style blocks add to their activations in place (x += ...), which autograd "
                    "cannot differentiate, so training stops in the backward pass.")
FLUX_BLOCKS = (BlockKind("double", "double_blocks", "double_block",
                         ("double_blocks.{i}.img_attn.", "double_blocks.{i}.txt_attn."), "num_heads"),
               # single blocks fuse attention and MLP: linear1 = qkv ‖ mlp_in, linear2 = proj ‖ mlp_out
               BlockKind("single", "single_blocks", "single_block",
                         ("single_blocks.{i}.linear1.", "single_blocks.{i}.linear2.", "single_blocks.{i}.norm."),
                         "num_heads"))

# paper 2, Sec. 4 / App. A.9: SDXL cross-attention layers 55 and 56 of 70 (forward order) = up_blocks.0.attentions.2
# transformer blocks 1 and 2 = ComfyUI ("output", 2) depths 1-2; SD3-medium joint block 10 of 24.
SDXL_PAPER = (("output", 2, 1), ("output", 2, 2))
SD3_PAPER = (("joint", 10),)

PIXART_T5 = dataclasses.replace(T5XXL, attr="t5xxl")  # PixArt's T5 CLIP (also Chroma's): no padding
# PixArt: no block replace and no transformer_options in its blocks; every block's cross_attn (MultiHeadCrossAttention)
# reads the caption through y_embedder (token by token), the batch's rows concatenated into one: (1, B·L, C)
PIXART_BLOCKS = (BlockKind("cross", "blocks", None, ("blocks.{i}.cross_attn.",), "cross_attn.num_heads",
                           text_attn="cross_attn"),)


def _pixart_qk(module, x, text, args) -> tuple:
    """PixArt's MultiHeadCrossAttention: q = q_linear(x) per head, k = the first half of kv_linear(text) per head."""
    b, n_text = text.shape[:2]
    q = module.q_linear(x).view(b, x.shape[1], module.num_heads, module.head_dim)
    k = module.kv_linear(text).view(b, n_text, 2, module.num_heads, module.head_dim)[:, :, 0]
    return q.transpose(1, 2), k.transpose(1, 2)


def _hydit_qk(module, x, text, args) -> tuple:
    """Hunyuan-DiT's CrossAttention (attn2): q = q_norm(q_proj(x)) per head with the image RoPE (its third argument),
    k = k_norm of the first half of kv_proj(text) per head (comfy.ldm.hydit.attn_layers.CrossAttention)."""
    from comfy.ldm.hydit.attn_layers import apply_rotary_emb

    b, n_img, n_text = x.shape[0], x.shape[1], text.shape[1]
    q = module.q_norm(module.q_proj(x).view(b, n_img, module.num_heads, module.head_dim))
    k = module.k_norm(module.kv_proj(text).view(b, n_text, 2, module.num_heads, module.head_dim)[:, :, 0])
    if args and args[0] is not None:
        q = apply_rotary_emb(q, None, args[0])[0]
    return q.transpose(1, 2), k.transpose(1, 2)


WAN_NO_HOOK = {
    "s2v": ("its block replace passes no transformer_options, so the pack cannot tell which block's attention runs "
            "(text-to-video and image-to-video Wan models, VACE and Camera are supported)"),
    "humo": ("its blocks (WanAttentionBlockAudio) add an audio cross-attention the pack does not separate from the text "
             "yet (text-to-video and image-to-video Wan models, VACE and Camera are supported)"),
}
UMT5XXL = EncoderSpec("umt5xxl", "UMT5-XXL", "t5", "umt5xxl")
# Hunyuan-DiT: Chinese BERT states ([CLS] ... [SEP], 77+) in the context, mT5-XL states (256+) and both attention
# masks in other conditioning keys; the model maps mT5 through mlp_t5, fills masked tokens with learned padding and
# concatenates both into the text stream every block's cross-attention (attn2) reads
# Wan: self-attention, then the cross-attention over the text (WanT2VCrossAttention), then the MLP, in every block
WAN_BLOCKS = (BlockKind("cross", "blocks", "double_block", ("blocks.{i}.cross_attn.",), "cross_attn.num_heads",
                        text_call=1, text_attn="cross_attn"),)
# Wan image-to-video (WanI2VCrossAttention): self-attention, then the CLIP-vision tokens (k_img/v_img), then the text;
# the block's txt is [CLIP-vision tokens, text] (model.py: context_img_len)
WAN_I2V_BLOCKS = (dataclasses.replace(WAN_BLOCKS[0], text_call=2),)


def _wan_image_tokens(arguments: dict) -> int:
    """CLIP-vision tokens in front of the text in a Wan image-to-video block's txt (none without a clip_fea)."""
    clip_fea = arguments.get("clip_fea")
    return int(clip_fea.shape[-2]) if clip_fea is not None else 0
# Decoder-only LLM encoders are causal like CLIP: the states after the prompt's last word (the chat template's
# end-of-turn token and the template tokens after it) are the [EOS] analogue. Token ids: research/families.md §8-§14.
LLM = "llm"
# Qwen-Image: 34-token system template head (dropped by QwenImageTEModel) + prompt + <|im_end|> \n <|im_start|>
# assistant \n; Z-Image: <|im_start|> user \n + prompt + the same 5 tokens, nothing dropped
QWEN25 = EncoderSpec("qwen25_7b", "Qwen2.5-VL", LLM, "qwen25_7b", head_end="<|im_start|>user\n",
                     tail_start="<|im_end|>", drops_head=True)
QWEN3 = EncoderSpec("qwen3_4b", "Qwen3", LLM, "qwen3_4b", head_end="<|im_start|>user\n", tail_start="<|im_end|>")
# Flux.2: <s> [SYSTEM_PROMPT] ... [/SYSTEM_PROMPT] [INST] prompt [/INST], nothing after [/INST], nothing dropped
MISTRAL3 = EncoderSpec("mistral3_24b", "Mistral-3", LLM, "mistral3_24b", head_end="[INST]", tail_start="[/INST]")
GEMMA2 = EncoderSpec("gemma2_2b", "Gemma-2", LLM, "gemma2_2b", no_eos=(
    "its tokenizer puts only <bos> before the text and nothing after it (no chat template, no end-of-text token; "
    "CLIPTextEncodeLumina2 only adds a system prompt in front), so no token state follows the prompt's last word "
    "and there is no [EOS] analogue to swap, zero or repeat"))
# NextDiT (Lumina 2, Z-Image): 2 text refiner blocks, 2 image refiner blocks, then the joint layers on [text, image];
# one attention call each, no block replace: the layers are found by counting calls (core.layers.CallPlan)
NEXTDIT = dict(blocks=(BlockKind("single", "layers", None, ("layers.{i}.attention.",), "attention.n_local_heads"),),
               lead_calls=("context_refiner", "noise_refiner"), text_multiple="pad_tokens_multiple")
# HiDream: T5-XXL states in the context, CLIP-L ‖ CLIP-G pooled, and the states of every Llama-3.1 layer in
# conditioning_llama3 (batch, layers, tokens, 4096). No block replace: one attention call per double then single
# block, each on [image, T5 ‖ last Llama layer ‖ that block's Llama layer], so the text is 128 + 2 x Llama tokens.
def _hidream_text_len(a: dict) -> int | None:
    context, llama = a.get("context"), a.get("encoder_hidden_states_llama3")
    if not (torch.is_tensor(context) and torch.is_tensor(llama)):
        return None
    return int(context.shape[1]) + 2 * int(llama.shape[2])


def _hidream_t5_width(model) -> int | None:
    projections = getattr(model.model.diffusion_model, "caption_projection", None)
    linear = getattr(projections[-1], "linear", None) if projections else None
    return int(linear.in_features) if linear is not None else None


# HunyuanImage 2.1 / HunyuanVideo 1.5: Qwen2.5-VL with Qwen-Image's template rules (the encoder drops the head; the
# prompt ends with <|im_end|>), plus ByT5 glyph states of the prompt's quoted text in conditioning_byt5small
# the image comes first in their joint attention (double blocks flip img/txt; single blocks run on [img, txt])
HUNYUAN = dict(blocks=FLUX_BLOCKS, text_last=True, text_extras=(("conditioning_byt5small", "txt_byt5"),),
               text_extras_hint='quote text of the same length in both prompts (e.g. "HELLO" => "WORLD"), or none',
               no_training=FLUX_NO_TRAINING)

FAMILIES: tuple[Family, ...] = (
    Family("sd1", "SD1.x", ("SD15", "SD15_instructpix2pix"), (UNET_CROSS,), (CLIP_L,),
           _clip_is("SD1ClipModel", "l"), "comfy.sd1_clip:SD1Tokenizer",
           "the CLIP-L [EOS] state; SD1.x UNets do not use it", "SD15", _unet_context_dim),
    Family("sd2", "SD2.x", ("SD20", "SD21UnclipL", "SD21UnclipH", "SD_X4Upscaler"), (UNET_CROSS,),
           (EncoderSpec("h", "OpenCLIP-H", "clip", "clip_h"),), _clip_is("SD1ClipModel", "h"),
           "comfy.text_encoders.sd2_clip:SD2Tokenizer", "the OpenCLIP-H [EOS] state; SD2.x UNets do not use it",
           "SD15", _unet_context_dim),
    Family("sdxl", "SDXL", ("SDXL", "SDXLRefiner", "SSD1B", "Segmind_Vega", "KOALA_700M", "KOALA_1B",
                            "SDXL_instructpix2pix"), (UNET_CROSS,), (CLIP_L, CLIP_G), _clip_is("SDXLClipModel"),
           "comfy.sdxl_clip:SDXLTokenizer", "the CLIP-G [EOS] state of chunk 1, the UNet's ADM input", "SDXL",
           _unet_context_dim, presets=(("sdxl_paper", SDXL_PAPER),), auto_preset="sdxl_paper",
           preset_note="SDXL base (70 cross-attention layers)", preset_arch=_sdxl_base, preset_start=4 / 50),
    Family("sd3", "SD3", ("SD3",), (JOINT,),
           (dataclasses.replace(CLIP_L, missing_width=768), CLIP_G, dataclasses.replace(T5XXL, group=1)),
           _clip_is("SD3ClipModel"), "comfy.text_encoders.sd3_clip:SD3Tokenizer",
           "CLIP-L ‖ CLIP-G [EOS] states of chunk 1, the MMDiT's pooled input", "SD3",
           _module_in_features("context_embedder"),
           blocks=(BlockKind("joint", "joint_blocks", "double_block",
                             ("joint_blocks.{i}.context_block.attn.", "joint_blocks.{i}.x_block.attn."),
                             "x_block.attn.num_heads"),),
           presets=(("sd3_paper", SD3_PAPER),), auto_preset="sd3_paper", preset_note="SD3 Medium (24 joint blocks)",
           preset_arch=_sd3_medium, preset_start=2 / 28,
           attention_name="SD3's MMDiT", register_tokens="register_length"),
    Family("flux", "Flux.1", ("Flux", "FluxSchnell", "FluxInpaint"), (JOINT, SINGLE),
           (T5XXL, dataclasses.replace(CLIP_L, in_context=False)), _clip_is("FluxClipModel"),
           "comfy.text_encoders.flux:FluxTokenizer", "the CLIP-L [EOS] state of chunk 1, Flux's vector_in", "Flux",
           _module_in_features("txt_in"),
           blocks=FLUX_BLOCKS,
           guidance_distilled=True, cond_extra=(("guidance", 3.5),), attention_name="Flux's double/single blocks",
           no_training=FLUX_NO_TRAINING),
    Family("chroma", "Chroma", ("Chroma",), (JOINT, SINGLE), (PIXART_T5,), _clip_is("PixArtT5XXL"),
           "comfy.text_encoders.pixart_t5:PixArtTokenizer", "none (Chroma takes no pooled vector)", "Flux",
           _module_in_features("txt_in"), blocks=FLUX_BLOCKS, attention_name="Chroma's double/single blocks",
           no_training=FLUX_NO_TRAINING),
    Family("chroma_radiance", "Chroma Radiance", ("ChromaRadiance",), (JOINT, SINGLE), (PIXART_T5,),
           _clip_is("PixArtT5XXL"), "comfy.text_encoders.pixart_t5:PixArtTokenizer",
           "none (Chroma takes no pooled vector)", "ChromaRadiance", _module_in_features("txt_in"), blocks=FLUX_BLOCKS,
           attention_name="Chroma's double/single blocks", no_training=FLUX_NO_TRAINING),
    Family("flux2", "Flux.2", ("Flux2",), (JOINT, SINGLE),
           (MISTRAL3,), _clip_is("Flux2TEModel"),
           "comfy.text_encoders.flux:Flux2Tokenizer", "none (Flux.2 takes no pooled vector)", "Flux2",
           _module_in_features("txt_in"), blocks=FLUX_BLOCKS, guidance_distilled=True, cond_extra=(("guidance", 3.5),),
           text_pad=512, latent_patch=2, stock_tokens=False, attention_name="Flux.2's double/single blocks",
           no_training=FLUX_NO_TRAINING),
    Family("qwen_image", "Qwen-Image", ("QwenImage",), (JOINT,),
           (QWEN25,), _clip_is("QwenImageTEModel", exclude="HunyuanImageTEModel"),
           "comfy.text_encoders.qwen_image:QwenImageTokenizer", "none (Qwen-Image takes no pooled vector)", "Wan21",
           _module_in_features("txt_in"),
           blocks=(BlockKind("double", "transformer_blocks", "double_block", ("transformer_blocks.{i}.attn.",),
                             "attn.heads"),), attention_name="Qwen-Image's joint blocks"),
    *(Family(name, label, (config,), (DIT_CROSS,), (PIXART_T5,), _clip_is("PixArtT5XXL"),
             "comfy.text_encoders.pixart_t5:PixArtTokenizer", "none (PixArt takes no pooled vector)", latent,
             _module_in_features("y_embedder"), blocks=PIXART_BLOCKS, text_embedder="y_embedder.y_proj",
             text_qk=_pixart_qk, flat_text=True, attention_name=f"{label}'s cross-attention blocks")
      for name, label, config, latent in (("pixart_alpha", "PixArt α", "PixArtAlpha", "SD15"),
                                          ("pixart_sigma", "PixArt Σ", "PixArtSigma", "SDXL"))),
    Family("hunyuan_dit", "Hunyuan-DiT", ("HunyuanDiT", "HunyuanDiT1"), (DIT_CROSS,),
           (EncoderSpec("hydit_clip", "Chinese BERT", "clip", "hydit_clip", mask_key="attention_mask"),
            EncoderSpec("mt5xl", "mT5-XL", "t5", "mt5xl", in_context=False, cond_key="conditioning_mt5xl",
                        mask_key="attention_mask_mt5xl")), _clip_is("HyditModel"),
           "comfy.text_encoders.hydit:HyditTokenizer", "none (Hunyuan-DiT pools its mT5 states inside the model)", "SDXL",
           lambda model: int(getattr(model.model.diffusion_model, "text_states_dim", 0)) or None,
           blocks=(BlockKind("cross", "blocks", "double_block", ("blocks.{i}.attn2.",), "attn2.num_heads",
                             text_attn="attn2"),),
           text_extras=(("attention_mask", "text_embedding_mask"), ("conditioning_mt5xl", "encoder_hidden_states_t5"),
                        ("attention_mask_mt5xl", "text_embedding_mask_t5")),
           text_extras_hint="keep both prompts under 77 BERT and 256 mT5 tokens (each is padded to that length)",
           attention_name="Hunyuan-DiT's cross-attention blocks", text_qk=_hydit_qk, context_first=True,
           block_text_swap=True),
    Family("auraflow", "AuraFlow", ("AuraFlow",), (JOINT, SINGLE),
           (EncoderSpec("pile_t5xl", "Pile-T5-XL", "t5", "pile_t5xl"),), _clip_is("AuraT5Model"),
           "comfy.text_encoders.aura_t5:AuraT5Tokenizer", "none (AuraFlow takes no pooled vector)", "SDXL",
           _module_in_features("cond_seq_linear"),
           blocks=(BlockKind("double", "double_layers", "double_block", ("double_layers.{i}.attn.",), "attn.n_heads"),
                   BlockKind("single", "single_layers", "single_block", ("single_layers.{i}.attn.",),
                             "attn.n_heads")),
           register_tokens="register_tokens", attention_name="AuraFlow's double/single blocks"),
    # Wan: UMT5-XXL (its SentencePiece model ships inside the checkpoint), 5-D latents (B, C, T, H, W), patch (1, 2, 2).
    # Wan 2.2 A14B T2V / I2V checkpoints have no img_emb, so ComfyUI loads them as WAN21_T2V.
    *(Family(name, label, configs, (DIT_CROSS,), (UMT5XXL,), _clip_is("WanT5Model"),
             "comfy.text_encoders.wan:WanT5Tokenizer", "none (Wan takes no pooled vector)", latent,
             _module_in_features("text_embedding"), blocks=blocks, patch=(1, 2, 2), text_embedder="text_embedding",
             stock_tokens=False, attention_name=f"{label}'s cross-attention blocks", no_attention_hook=why,
             text_front=front)
      for name, label, configs, latent, blocks, front, why in (
          ("wan21", "Wan 2.1 / 2.2 A14B", ("WAN21_T2V", "WAN21_Vace", "WAN22_Camera"), "Wan21", WAN_BLOCKS, None, ""),
          ("wan22", "Wan 2.2 TI2V-5B", ("WAN22_T2V",), "Wan22", WAN_BLOCKS, None, ""),
          # Wan 2.1 I2V / FLF2V, Fun Control, Wan 2.1 Camera and Wan 2.2 Animate build i2v cross-attention blocks
          ("wan_i2v", "Wan image-to-video", ("WAN21_I2V", "WAN21_FunControl2V", "WAN21_Camera", "WAN22_Animate"),
           "Wan21", WAN_I2V_BLOCKS, _wan_image_tokens, ""),
          ("wan_s2v", "Wan 2.2 S2V", ("WAN22_S2V",), "Wan21", WAN_BLOCKS, None, WAN_NO_HOOK["s2v"]),
          ("wan_humo", "Wan HuMo", ("WAN21_HuMo",), "Wan21", WAN_BLOCKS, None, WAN_NO_HOOK["humo"]))),
    Family("hunyuan_image21", "HunyuanImage 2.1", ("HunyuanImage21",), (JOINT, SINGLE), (QWEN25,),
           _clip_is("HunyuanImageTEModel"), "comfy.text_encoders.hunyuan_image:HunyuanImageTokenizer",
           "none (HunyuanImage 2.1 takes no pooled vector)", "HunyuanImage21", _module_in_features("txt_in.input_embedder"),
           patch=(1, 1), attention_name="HunyuanImage 2.1's double/single blocks", **HUNYUAN),
    # HunyuanVideo 1.5: 5-D latents; its text stream is [CLIP-vision tokens (I2V), ByT5 glyphs, prompt]
    Family("hunyuan_video15", "HunyuanVideo 1.5", ("HunyuanVideo15",), (JOINT, SINGLE), (QWEN25,),
           _clip_is("HunyuanImageTEModel"), "comfy.text_encoders.hunyuan_video:HunyuanVideo15Tokenizer",
           "none (HunyuanVideo 1.5 takes no pooled vector)", "HunyuanVideo15", _module_in_features("txt_in.input_embedder"),
           patch=(1, 1, 1), prompt_last=True, attention_name="HunyuanVideo 1.5's double/single blocks", **HUNYUAN),
    Family("hidream", "HiDream", ("HiDream",), (JOINT, SINGLE),
           (T5XXL, dataclasses.replace(CLIP_L, in_context=False), dataclasses.replace(CLIP_G, in_context=False),
            EncoderSpec("llama", "Llama-3.1", "causal", "llama", in_context=False, cond_key="conditioning_llama3",
                        token_axis=2, pad_is_end=True)),
           _clip_is("HiDreamTEModel"), "comfy.text_encoders.hidream:HiDreamTokenizer",
           "CLIP-L ‖ CLIP-G [EOS] states, HiDream's adaLN input", "Flux", _hidream_t5_width,
           blocks=(BlockKind("double", "double_stream_blocks", None, ("double_stream_blocks.{i}.block.attn1.",),
                             "block.attn1.heads"),
                   BlockKind("single", "single_stream_blocks", None, ("single_stream_blocks.{i}.block.attn1.",),
                             "block.attn1.heads")),
           text_last=True, text_extras=(("conditioning_llama3", "encoder_hidden_states_llama3"),),
           text_extras_hint="keep both prompts under 128 Llama tokens (the Llama states are padded to 128)",
           text_len=_hidream_text_len, attention_name="HiDream's double/single blocks",
           no_training=("the MoE gate of its blocks reads its weight directly instead of through ComfyUI's weight "
                        "patching, so under the server's inference mode autograd cannot train through them.")),
    # Lumina 2 / Z-Image: single-stream NextDiT (text first); Gemma's SentencePiece ships inside its checkpoint
    Family("lumina2", "Lumina 2", ("Lumina2",), (SINGLE,), (GEMMA2,), _clip_is("LuminaModel", "gemma2_2b"),
           "comfy.text_encoders.lumina2:LuminaTokenizer", "none (Lumina 2 takes no pooled vector)", "Flux",
           _module_in_features("cap_embedder"), stock_tokens=False, attention_name="Lumina 2's NextDiT layers",
           **NEXTDIT),
    Family("zimage", "Z-Image", ("ZImage",), (SINGLE,), (QWEN3,), _clip_is("ZImageTEModel"),
           "comfy.text_encoders.z_image:ZImageTokenizer", "none (Z-Image takes no pooled vector)", "Flux",
           _module_in_features("cap_embedder"), attention_name="Z-Image's NextDiT layers", **NEXTDIT),
)

_extra: list[Family] = []  # families registered at run time (another pack's model, or a test's)


def all_families() -> tuple[Family, ...]:
    return FAMILIES + tuple(_extra)


def register(family: Family) -> None:
    """Add a family at run time; its config class names and pack name must be new."""
    taken = {f.name for f in all_families()} | {c for f in all_families() for c in f.configs}
    clash = ({family.name} | set(family.configs)) & taken
    if clash:
        raise ValueError(f"family {family.name!r}: {', '.join(sorted(clash))} already registered.")
    _extra.append(family)


def unregister(name: str) -> None:
    _extra[:] = [f for f in _extra if f.name != name]


def supported_labels() -> str:
    return ", ".join(f.label for f in all_families())


def config_name(model) -> str:
    """The ComfyUI model config class name of a MODEL (ModelPatcher)."""
    return type(model.model.model_config).__name__


def by_name(name: str) -> Family:
    return next(f for f in all_families() if f.name == name)


def unsupported(name: str, what: str, why: str = "") -> ValueError:
    why = why or "the model-family registry does not know it, so the pack cannot tell where its text enters."
    return ValueError(f"{what} does not support this model ({name}): {why} Supported model families: "
                      f"{supported_labels()}.")


def lookup(model) -> Family | None:
    """The registry entry of a MODEL, or None for a config class the registry does not know."""
    name = config_name(model)
    return next((f for f in all_families() if name in f.configs), None)


def family_of(model, what: str) -> Family:
    """The registry entry of a MODEL; ValueError naming the model and the supported families otherwise.
    ``what`` names the node asking (it starts the message)."""
    family = lookup(model)
    if family is None:
        raise unsupported(config_name(model), what)
    return family


def latent_patch(model_config=None, channels: int | None = None) -> int:
    """How many latent pixels per side a latent channel packs: from the model config's family (a BaseModel's
    ``model_config``), else from a channel count that only one family's latent has (a LATENT without its model)."""
    name = type(model_config).__name__ if model_config is not None else None
    family = next((f for f in all_families() if name in f.configs), None)
    if family is not None:
        return family.latent_patch
    import comfy.latent_formats

    packed = {f.latent_patch for f in all_families()
              if f.latent_patch > 1 and getattr(comfy.latent_formats, f.latent_format)().latent_channels == channels}
    return packed.pop() if len(packed) == 1 else 1


def clip_families(clip) -> list[Family]:
    """Every family whose text encoder this CLIP is (PixArt and Chroma share one T5)."""
    csm = getattr(clip, "cond_stage_model", None)
    return [f for f in tuple(_extra) + FAMILIES if csm is not None and f.clip_match(csm)]


def lookup_clip(clip) -> Family | None:
    csm = getattr(clip, "cond_stage_model", None)
    # families registered at run time first: they may refine a built-in text encoder (a subclass of it)
    return next((f for f in tuple(_extra) + FAMILIES if csm is not None and f.clip_match(csm)), None)
