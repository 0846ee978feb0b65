#!/usr/bin/env python3
"""Train the pack's miniature text-to-image model (and its judge) from scratch, on CPU, reproducibly.

Stages (each checkpoints as it goes and resumes where it stopped; finished stages are reused):

1. ``data``    the mini world (scripts/mini_world.py): ``n_train`` scenes of the train split (held-out
               combinations never appear) and ``n_judge`` single-object scenes of every combination. With
               ``--sign-rate R`` (the v2 world) a share R of the train scenes shows a sign with a word, and
               ``n_val_signs`` sign scenes feed the OCR gates of the vae and text stages.
2. ``judge``   a small CNN with colour / shape / texture heads, trained on the judge scenes with blur,
               noise and contrast augmentation (the automatic judge of scripts/eval_mini.py).
3. ``vae``     ComfyUI's Tiny AutoEncoder for SD (``comfy.taesd.taesd.TAESD``: 8x compression, 4 latent
               channels, no normalisation layers), initialised so its 40-conv ReLU stack trains from scratch
               (``new_vae``), on whole 64 px images: squared error in YCbCr with the chroma weighted 4x +
               image-gradient L1 + a small pull of every latent channel towards mean 0 / std 1. Afterwards
               TAESD's ``vae_scale`` / ``vae_shift`` are set so the latents have mean 0 and std 1 / 0.18215
               (exact: the decoder sees the same raw latents), and the judge is run on reconstructions of the
               validation images (``vae_metrics``: the ceiling of what the UNet can reach through it). v0's
               ``AutoencoderKL`` at 32 channels lost the colours: its GroupNorm(32) normalises every channel
               of every image on its own. ``--vae-precision bf16`` runs the stage's convs under CPU bf16 autocast
               (weights and loss in fp32; about 3x faster on CPUs with AVX512-BF16); with signs, OCR reads 32
               reconstructed validation signs every ``--ocr-every`` steps (the word gate's progress).
4. ``text``    the causal CLIP text tower (``comfy.sd1_clip.SD1ClipModel``, small config, the real CLIP BPE,
               77 tokens padded with [EOS]) trained CLIP-style, contrastively against a small image tower, and
               then frozen for the UNet stage -- as CLIP is for SD. The contrastive target is the [EOS] state
               (the pooled output) and, in the same loss, one random later [EOS]-padding state: real CLIP sees
               captions of every length, so its [EOS] at every position summarises the prompt; our captions are
               3..10 tokens, so the padding positions are trained explicitly (see docs/mini_model_card.md).
5. ``latents`` the train images encoded with the shipped VAE (through comfy.sd.VAE, as VAEEncode does) and
               every caption encoded with the shipped text encoder (clip.encode_from_tokens, as
               CLIPTextEncode does), both loaded back from their fp16 files. With ``--vae-precision bf16``
               the images are encoded under bf16 autocast too (about 3x faster).
6. ``unet``    ComfyUI's ``UNetModel`` (SD15 model config: eps-prediction, SD1.x linear beta schedule),
               cross-attention at 8x8, 4x4 and the 2x2 middle block, MSE on eps, prompt dropout 10 % (the
               empty prompt, for classifier-free guidance), AdamW with warm-up + cosine decay, EMA weights.
               ``--unet-sign-weight W`` counts the error on the latent cells under a sign's plate 1 + W
               times (the glyphs are a small share of the latent); ``--unet-min-snr GAMMA`` weighs each
               timestep's error by min(SNR, GAMMA) / SNR (Hang et al. 2023: the nearly clean timesteps count
               less, and training converges in fewer steps).
7. ``export``  fp16 safetensors in ``--out`` (default models/prompt_anatomy_mini): unet, text_encoder, vae
               and judge, each with its config and the training record in the metadata.

Reproducibility: every random draw comes from a generator seeded with (seed, stage, step), so a run that
is stopped and resumed gives the same weights as an uninterrupted one, and the same step counts give the
same weights (same torch version and CPU kernels). By default the run fits a time budget (115 minutes,
``--budget-minutes``): before each stage it times a few throw-away steps and sets that stage's step count
from its share of the remaining budget; the resolved step counts are logged and saved in plan.json of the
checkpoint folder and in the weights' metadata (rerun with ``--steps judge=N vae=N text=N unet=N`` to
reproduce them exactly). The UNet stage, the last, also re-plans at each checkpoint: if its recent steps run
slower than the probe's, it shortens itself to fit and squeezes the rest of its cosine into the steps left
(the re-plans are saved beside the step counts; such a run is reproduced by resuming its plan.json, not by
``--steps``). ``--no-budget`` uses the fixed step counts of DEFAULT_PLAN instead.

    .venv/bin/python scripts/train_mini.py                       # fits 115 minutes on this machine
    .venv/bin/python scripts/train_mini.py --no-budget           # the fixed recipe of DEFAULT_PLAN
    .venv/bin/python scripts/train_mini.py --smoke               # a few steps of every stage (.cache/mini_smoke)
    .venv/bin/python scripts/train_mini.py --estimate-from .cache/mini_smoke/ckpt   # time of DEFAULT_PLAN
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOG = logging.getLogger("train_mini")
STAGES = ("data", "judge", "vae", "text", "latents", "unet", "export")
TRAINED_STAGES = ("judge", "vae", "text", "unet")
STAGE_IDS = {name: i for i, name in enumerate(STAGES)}
# share of the remaining budget each trained stage gets; RESERVE covers data, latents, export and probes
BUDGET_SHARES = {"judge": 0.05, "vae": 0.24, "text": 0.07, "unet": 0.64}
BUDGET_RESERVE = 0.07
BUDGET_SAFETY = 0.015  # kept free after the last encoding stage (export, logging)
PACE_TOLERANCE = 0.02  # the last stage re-plans when its steps left would overrun the budget by more than 2 %
DEFAULT_BUDGET_MINUTES = 115.0  # the limit is 2 hours on 2 CPU cores
LATENT_SCALE = 0.18215  # comfy.latent_formats.SD15.scale_factor
IMAGE_TOWER_WIDTHS = (16, 32, 64, 64)  # the contrastive stage's throw-away image encoder


@dataclasses.dataclass
class Plan:
    seed: int = 1234
    world_seed: int = 20250101
    n_train: int = 24000
    n_judge: int = 12000
    n_val: int = 512
    sign_rate: float = 0.0  # share of train scenes with a sign (the v2 world); 0 = v1's world
    n_val_signs: int = 128  # sign scenes for the OCR gates (only when sign_rate > 0)
    judge_steps: int = 1000
    judge_batch: int = 64
    judge_lr: float = 2e-3
    vae_steps: int = 1400
    vae_batch: int = 8  # whole 64 px images
    vae_lr: float = 2e-3
    vae_chroma: float = 4.0  # weight of the Cb / Cr squared error relative to luma (Y)
    vae_latent_reg: float = 0.01  # keeps every latent channel near mean 0, std 1 before standardising
    vae_precision: str = "fp32"  # "bf16": the autoencoder's convs under CPU bf16 autocast (about 3x faster with AVX512-BF16)
    text_steps: int = 800
    text_batch: int = 64
    text_lr: float = 1e-3
    unet_steps: int = 6000
    unet_batch: int = 64
    unet_lr: float = 5e-4
    unet_warmup: int = 200
    unet_sign_weight: float = 0.0  # the loss on latent cells under a sign's plate counts 1 + this (0: v1's plain MSE)
    unet_min_snr: float = 0.0  # min-SNR-gamma loss weight min(SNR, gamma) / SNR per timestep (0: v1's plain MSE)
    ema_decay: float = 0.999
    p_uncond: float = 0.1

    def steps(self, stage: str) -> int:
        return int(getattr(self, f"{stage}_steps"))


DEFAULT_PLAN = Plan()
SMOKE_PLAN = Plan(n_train=512, n_judge=512, n_val=64, n_val_signs=32, judge_steps=12, vae_steps=12, text_steps=12, unet_steps=30,
                  unet_warmup=5)


# ----------------------------------------------------------------------------------------------
# environment: ComfyUI, the pack, the world
# ----------------------------------------------------------------------------------------------
def load_env():
    """(demo_model module, mini_world module): ComfyUI bootstrapped on the CPU, the pack loaded as package
    ``prompt_anatomy`` by file location (as ComfyUI and the unit tests load it)."""
    if str(ROOT / "scripts") not in sys.path:  # scripts/ only: the checkout's nodes/ would shadow ComfyUI's
        sys.path.insert(0, str(ROOT / "scripts"))
    import tiny_models as tiny

    tiny.bootstrap_comfy()
    import comfy.model_management  # noqa: F401

    tiny.load_by_path("prompt_anatomy", ROOT / "__init__.py", ROOT)
    demo = importlib.import_module("prompt_anatomy.nodes.demo_model")
    import mini_world as world

    return demo, world


# ----------------------------------------------------------------------------------------------
# initialisation (ComfyUI's ops skip weight init; training needs PyTorch's)
# ----------------------------------------------------------------------------------------------
def init_operations():
    """comfy.ops.disable_weight_init with PyTorch's own reset_parameters back (zero_module() outputs of the
    UNet stay zero: they are zeroed after construction).

    Each op subclasses ComfyUI's own class and runs ComfyUI's reset_parameters before PyTorch's, so whatever
    ComfyUI sets up there comes along (newer ComfyUI sets ``Embedding.bias = None`` in it, and its model
    patcher reads ``.bias`` of every module with ``comfy_cast_weights``). ComfyUI's reset draws no random
    numbers, so the initial weights are the same as before."""
    import comfy.ops
    import torch

    base = comfy.ops.disable_weight_init

    def with_init(cls, torch_cls):
        def reset_parameters(self):
            cls.reset_parameters(self)  # ComfyUI's: skips init, may add attributes (Embedding.bias = None)
            return torch_cls.reset_parameters(self)

        return type(cls.__name__, (cls,), {"reset_parameters": reset_parameters})

    class InitOps(base):
        Linear = with_init(base.Linear, torch.nn.Linear)
        Conv1d = with_init(base.Conv1d, torch.nn.Conv1d)
        Conv2d = with_init(base.Conv2d, torch.nn.Conv2d)
        Conv3d = with_init(base.Conv3d, torch.nn.Conv3d)
        GroupNorm = with_init(base.GroupNorm, torch.nn.GroupNorm)
        LayerNorm = with_init(base.LayerNorm, torch.nn.LayerNorm)
        Embedding = with_init(base.Embedding, torch.nn.Embedding)

    return InitOps


def attention_override():
    """transformer_options for training: SDPA instead of the CPU default (sub-quadratic attention), same math."""
    import comfy.ldm.modules.attention as attn

    return {"optimized_attention_override": lambda func, *a, **kw: attn.attention_pytorch(*a, **kw)}


def fp16_round_(module) -> None:
    """Round every parameter to fp16 in place: the shipped files are fp16, so later stages see exactly them."""
    import torch

    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())


# ----------------------------------------------------------------------------------------------
# the judge and the contrastive image tower
# ----------------------------------------------------------------------------------------------
def _convnet_cls():
    import torch
    from torch import nn

    class ConvNet(nn.Module):
        """64 x 64 RGB (0..1) -> features: 5 conv layers (4 stride-2), GroupNorm, SiLU, mean+max pooling."""

        def __init__(self, out_dim: int, widths=(32, 64, 128, 128)):
            super().__init__()
            w0, w1, w2, w3 = widths
            layers = []
            for cin, cout, stride in ((3, w0, 2), (w0, w1, 2), (w1, w2, 2), (w2, w3, 1), (w3, w3, 2)):
                layers += [nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU()]
            self.body = nn.Sequential(*layers)
            self.head = nn.Linear(2 * w3, out_dim)
            self.widths = tuple(widths)

        def forward(self, x):
            if x.shape[-1] != 64 or x.shape[-2] != 64:
                x = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False,
                                                    antialias=True)
            h = self.body(x * 2.0 - 1.0)
            return self.head(torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1))

    return ConvNet


def make_judge(world, widths=(32, 64, 128, 128)):
    n = len(world.COLOUR_NAMES) + len(world.SHAPES) + len(world.ALL_TEXTURES)
    return _convnet_cls()(n, widths)


def judge_config(world, widths) -> dict:
    return {"widths": list(widths), "size": world.SIZE, "colour": list(world.COLOUR_NAMES),
            "shape": list(world.SHAPES), "texture": list(world.ALL_TEXTURES)}


def split_logits(logits, config: dict) -> dict:
    nc, ns = len(config["colour"]), len(config["shape"])
    return {"colour": logits[:, :nc], "shape": logits[:, nc:nc + ns], "texture": logits[:, nc + ns:]}


def load_judge(path: Path):
    """(judge module in eval mode, config) from judge.safetensors."""
    import safetensors
    import safetensors.torch

    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    config = json.loads(meta["config"])
    n = len(config["colour"]) + len(config["shape"]) + len(config["texture"])
    judge = _convnet_cls()(n, tuple(config["widths"]))
    judge.load_state_dict({k: v.float() for k, v in safetensors.torch.load_file(str(path)).items()})
    judge.eval()
    for p in judge.parameters():
        p.requires_grad_(False)
    return judge, config


def judge_predict(judge, config: dict, images) -> dict:
    """Class names the judge sees in IMAGE tensors [B, H, W, 3] (0..1): {"colour": [...], "shape": [...],
    "texture": [...]}, plus "<head>_prob" tensors."""
    import torch

    with torch.no_grad():
        x = images.detach().float().cpu().permute(0, 3, 1, 2).clamp(0, 1)
        heads = split_logits(judge(x), config)
    out = {}
    for k, logits in heads.items():
        out[k] = [config[k][i] for i in logits.argmax(1).tolist()]
        out[f"{k}_prob"] = logits.softmax(1)
    return out


# ----------------------------------------------------------------------------------------------
# text encoder forward for training (the same math as comfy.clip_model, without in-place residuals)
# ----------------------------------------------------------------------------------------------
def text_forward(transformer, tokens):
    """Final-layer-norm hidden states [B, L, C] of ``comfy.clip_model.CLIPTextModel`` for token ids [B, L]:
    CLIPTextModel_.forward without its in-place ``x +=`` (which autograd cannot differentiate)."""
    import comfy.ldm.modules.attention as attn
    import torch

    tm = transformer.text_model
    x = tm.embeddings.token_embedding.weight[tokens].float() + tm.embeddings.position_embedding.weight[:tokens.shape[1]].float()
    n = tokens.shape[1]
    mask = torch.full((n, n), -torch.finfo(x.dtype).max, dtype=x.dtype, device=x.device).triu_(1)
    fn = attn.optimized_attention_for_device(x.device, mask=True, small_input=True)
    for layer in tm.encoder.layers:
        x = x + layer.self_attn(layer.layer_norm1(x), mask, fn)
        x = x + layer.mlp(layer.layer_norm2(x))
    return tm.final_layer_norm(x)


def token_ids(clip, text: str) -> list[int]:
    """The 77 token ids CLIPTextEncode feeds the text encoder for ``text`` (first chunk)."""
    return [int(t[0]) for t in clip.tokenize(text)["l"][0]]


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------
def save_component(path: Path, state_dict: dict, config: dict, record: dict | None = None, dtype="fp16") -> None:
    import safetensors.torch
    import torch

    demo, _ = load_env()
    cast = torch.float16 if dtype == "fp16" else torch.float32
    sd = {k: v.detach().to("cpu", cast if v.is_floating_point() else v.dtype).contiguous() for k, v in state_dict.items()}
    meta = {"format": demo.FORMAT, "format_version": demo.FORMAT_VERSION, "config": json.dumps(config, sort_keys=True)}
    if record is not None:
        meta["training"] = json.dumps(record, sort_keys=True, default=str)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    safetensors.torch.save_file(sd, str(tmp), metadata=meta)
    os.replace(tmp, path)


def vae_component_config(demo) -> dict:
    return dict(demo.VAE_CONFIG)


def new_vae(demo, seed: int):
    """ComfyUI's TAESD, initialised to train from scratch without normalisation layers: He-normal convs with
    zero biases, the last conv of every residual Block zeroed (each block starts as the identity, so the
    40-conv ReLU stack neither explodes nor dies), linear-gain init of the two output convs."""
    import torch
    from comfy.taesd.taesd import TAESD, Block

    torch.manual_seed(seed)
    ae = TAESD(latent_channels=int(demo.VAE_CONFIG["latent_channels"]))
    with torch.no_grad():
        for m in ae.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    m.bias.zero_()
        for m in ae.modules():
            if isinstance(m, Block):
                m.conv[-1].weight.zero_()
        for seq in (ae.taesd_encoder, ae.taesd_decoder):
            torch.nn.init.kaiming_normal_(seq[-1].weight, nonlinearity="linear")
    return ae


def new_clip(demo, seed: int):
    import torch

    torch.manual_seed(seed)
    cpu = torch.device("cpu")
    clip = demo.build_clip(demo.CLIP_CONFIG, dtype=torch.float32, operations=init_operations(),
                           device_options={"load_device": cpu, "offload_device": cpu, "initial_device": cpu})
    tm = clip.cond_stage_model.clip_l.transformer
    with torch.no_grad():
        tm.text_model.embeddings.token_embedding.weight.normal_(0.0, 0.02)
        tm.text_model.embeddings.position_embedding.weight.normal_(0.0, 0.01)
    return clip


def new_unet(demo, seed: int):
    import torch

    torch.manual_seed(seed)
    return demo.build_unet(demo.UNET_CONFIG, operations=init_operations())


def export_untrained(out_dir: Path, seed: int = 0, with_judge: bool = True) -> dict[str, Path]:
    """Weight files of a model after 0 training steps (initial weights), in the shipped format: what the
    unit tests load. Returns {component: path}."""
    demo, world = load_env()
    out_dir = Path(out_dir)
    record = {"steps": 0, "seed": seed, "note": "untrained (initial weights)"}
    paths = {}
    unet = new_unet(demo, seed)
    paths["unet"] = out_dir / demo.COMPONENTS["unet"]
    save_component(paths["unet"], unet.diffusion_model.state_dict(), demo.UNET_CONFIG, record)
    clip = new_clip(demo, seed + 1)
    paths["text_encoder"] = out_dir / demo.COMPONENTS["text_encoder"]
    save_component(paths["text_encoder"], clip.cond_stage_model.state_dict(), demo.CLIP_CONFIG, record)
    ae = new_vae(demo, seed + 2)
    paths["vae"] = out_dir / demo.COMPONENTS["vae"]
    save_component(paths["vae"], ae.state_dict(), vae_component_config(demo), record)
    if with_judge:
        import torch

        torch.manual_seed(seed + 3)
        judge = make_judge(world)
        paths["judge"] = out_dir / demo.JUDGE_FILE
        save_component(paths["judge"], judge.state_dict(), judge_config(world, judge.widths), record, dtype="fp32")
    return paths


# ----------------------------------------------------------------------------------------------
# training machinery
# ----------------------------------------------------------------------------------------------
def step_generator(seed: int, stage: str, step: int):
    import torch

    return torch.Generator().manual_seed(seed * 1_000_003 + STAGE_IDS[stage] * 100_000_007 + step)


def cosine_lr(step: int, total: int, base: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


class PacedCosine:
    """cosine_lr over ``planned`` steps for a stage whose length may shrink while it runs. At a re-plan
    ``(at, total)`` the rest of the cosine is squeezed into the steps left, so the learning rate stays continuous
    and still ends at its floor; with no re-plans this is cosine_lr to the bit."""

    def __init__(self, planned: int, base: float, warmup: int, replans=()):
        self.planned, self.base, self.warmup = planned, base, warmup
        self.replans = [(int(a), int(t)) for a, t in replans]

    @property
    def total(self) -> int:
        return self.replans[-1][1] if self.replans else self.planned

    def position(self, step: int) -> float:
        """Where ``step`` falls on the planned schedule (a step count, fractional after a re-plan)."""
        pos, start, total = 0.0, 0, self.planned
        for at, new_total in self.replans:
            if step < at:
                break
            pos = self._advance(pos, start, total, at)
            start, total = at, new_total
        return self._advance(pos, start, total, step)

    def _advance(self, pos: float, start: int, total: int, step: int) -> float:
        if start == 0 and total == self.planned:
            return float(step)
        return pos + (step - start) * (self.planned - pos) / max(1, total - start)

    def replan(self, at: int, total: int) -> None:
        self.replans.append((int(at), int(total)))

    def __call__(self, step: int) -> float:
        return cosine_lr(self.position(step), self.planned, self.base, self.warmup)


def _atomic_save(obj, path: Path) -> None:
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Trainer:
    """Runs the stages with resumable checkpoints under ``ckpt_dir`` and writes the weights to ``out_dir``."""

    def __init__(self, plan: Plan, out_dir: Path, ckpt_dir: Path, budget_minutes: float | None = None,
                 checkpoint_minutes: float = 5.0, log_every: int = 25, probe_steps: int = 2,
                 step_overrides: dict | None = None, ocr_every: int = 0):
        import torch

        self.demo, self.world = load_env()
        self.torch = torch
        self.plan = plan
        self.out_dir = Path(out_dir)
        self.ckpt_dir = Path(ckpt_dir)
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_s = checkpoint_minutes * 60.0
        self.log_every = log_every
        self.probe_steps = probe_steps
        self.step_overrides = dict(step_overrides or {})
        self.ocr_every = ocr_every  # autoencoder stage: OCR the reconstructed signs every N steps (0: at the end)
        self.state_path = self.ckpt_dir / "plan.json"
        self.state = self._load_state(budget_minutes)
        self.t_start = time.time()
        self.elapsed_before = float(self.state.get("elapsed_s", 0.0))
        self.cache: dict = {}

    # ---- persistent run state
    def _load_state(self, budget_minutes):
        if self.state_path.exists():
            state = json.loads(self.state_path.read_text())
            # fields added after a run started keep their defaults (a v1 run resumes as v1)
            if {**dataclasses.asdict(Plan()), **state["plan"]} != dataclasses.asdict(self.plan):
                raise SystemExit(f"{self.ckpt_dir} holds checkpoints of another plan ({state['plan']}); use --fresh "
                                 f"or another --ckpt-dir.")
            if budget_minutes is not None and state.get("budget_minutes") != budget_minutes:
                LOG.info("budget changed from %s to %s minutes for the stages still to plan",
                         state.get("budget_minutes"), budget_minutes)
                state["budget_minutes"] = budget_minutes
            return state
        return {"plan": dataclasses.asdict(self.plan), "budget_minutes": budget_minutes, "steps": {}, "stages": {},
                "elapsed_s": 0.0}

    def _save_state(self) -> None:
        self.state["elapsed_s"] = self.elapsed()
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1, sort_keys=True))
        os.replace(tmp, self.state_path)

    def elapsed(self) -> float:
        return self.elapsed_before + (time.time() - self.t_start)

    def done(self, stage: str) -> bool:
        return bool(self.state["stages"].get(stage, {}).get("done"))

    # ---- step planning
    def plan_steps(self, stage: str, probe_fn) -> int:
        if stage in self.state["steps"]:
            return int(self.state["steps"][stage])
        if stage in self.step_overrides:
            steps = int(self.step_overrides[stage])
            how = "--steps"
        elif self.state.get("budget_minutes") is None:
            steps = self.plan.steps(stage)
            how = "plan"
        else:
            step_s = probe_fn()
            total = self.state["budget_minutes"] * 60.0
            left = [s for s in TRAINED_STAGES if not self.done(s)]
            # the reserve covers the work between the stages (chiefly encoding the latents); once that is done
            # only a small safety margin for the export stays reserved
            reserve = BUDGET_RESERVE if not self.done("latents") else BUDGET_SAFETY
            available = total * (1.0 - reserve) - self.elapsed()
            share = BUDGET_SHARES[stage] / sum(BUDGET_SHARES[s] for s in left)
            steps = max(10, int(available * share / step_s))
            how = f"budget: {available / 60:.1f} min left x share {share:.2f} / {step_s:.3f} s per probed step"
        LOG.info("stage %s: %d steps (%s)", stage, steps, how)
        self.state["steps"][stage] = steps
        self._save_state()
        return steps

    def budgeted(self, stage: str) -> bool:
        """Whether the budget set this stage's steps (not --steps, not the fixed plan)."""
        return self.state.get("budget_minutes") is not None and stage not in self.step_overrides

    def pace(self, stage: str, schedule: PacedCosine, done: int, steps: int, step_s: float) -> int:
        """Shorten the last budgeted stage when its recent steps (``step_s`` each) no longer fit the budget: a
        machine that slows after the probe would otherwise overrun it. Never lengthens; re-plans only when the
        overrun would exceed PACE_TOLERANCE. The re-plan is kept in the run state, so a resumed run follows it."""
        available = self.state["budget_minutes"] * 60.0 * (1.0 - BUDGET_SAFETY) - self.elapsed()
        fit = done + max(1, int(available / step_s))
        if fit >= steps - PACE_TOLERANCE * (steps - done):
            return steps
        schedule.replan(done, fit)
        self.state.setdefault("replans", {}).setdefault(stage, []).append([done, fit])
        LOG.info("stage %s: %d steps instead of %d (at step %d: %.3f s a step lately, %.1f min of budget left)",
                 stage, fit, steps, done, step_s, available / 60)
        return fit

    def probe(self, modules: list, make_opt, step_fn) -> float:
        """Wall seconds of one training step, timed on throw-away copies (the real state is untouched)."""
        copies = [copy.deepcopy(m) for m in modules]
        opt = make_opt(copies)
        times = []
        for k in range(self.probe_steps + 1):
            t0 = time.perf_counter()
            step_fn(copies, opt, self.torch.Generator().manual_seed(10_000 + k), 0)
            times.append(time.perf_counter() - t0)
        del copies, opt
        return sum(times[1:]) / max(1, len(times) - 1)

    # ---- generic resumable loop
    def run_loop(self, stage: str, modules: list, opt, steps: int, lr_fn, step_fn, ema=None, monitor=None,
                 pace=None) -> dict:
        """``step_fn(modules, opt, generator, step) -> {name: float}`` does one optimisation step;
        ``monitor(steps_done) -> {name: float}`` (optional) adds measurements to the log at logging steps;
        ``pace(steps_done, steps, recent_step_s) -> steps`` (optional), asked at each checkpoint, may shorten the
        stage (see ``Trainer.pace``)."""
        torch = self.torch
        path = self.ckpt_dir / f"{stage}.pt"
        start, history = 0, []
        if path.exists():
            ck = torch.load(path, map_location="cpu", weights_only=False)
            for m, sd in zip(modules, ck["modules"], strict=True):
                m.load_state_dict(sd)
            opt.load_state_dict(ck["opt"])
            if ema is not None:
                ema.load_state_dict(ck["ema"])
            start, history = ck["step"], ck["history"]
            LOG.info("stage %s: resumed at step %d of %d", stage, start, steps)
        last_ck = time.time()
        window: dict[str, list[float]] = {}
        wall_steps, cpu_steps = [], []
        stage_t0 = time.time()
        ck_step = start
        s = start - 1
        while s + 1 < steps:
            s += 1
            for g in opt.param_groups:
                g["lr"] = lr_fn(s)
            t0, c0 = time.perf_counter(), time.process_time()
            losses = step_fn(modules, opt, step_generator(self.plan.seed, stage, s), s)
            if ema is not None:
                ema.update(modules[0], s)
            wall_steps.append(time.perf_counter() - t0)
            cpu_steps.append(time.process_time() - c0)
            for k, v in losses.items():
                window.setdefault(k, []).append(v)
            if (s + 1) % self.log_every == 0 or s + 1 == steps:
                means = {k: sum(v) / len(v) for k, v in window.items()}
                recent = wall_steps[-self.log_every:]
                per = sum(recent) / len(recent)
                history.append({"step": s + 1, **means, "step_wall_s": per,
                                "step_cpu_s": sum(cpu_steps[-self.log_every:]) / len(recent)})
                extra = monitor(s + 1) if monitor is not None else {}
                if extra:
                    history[-1].update(extra)
                    LOG.info("%s %5d/%d  %s", stage, s + 1, steps, json.dumps(extra))
                LOG.info("%s %5d/%d  %s  %.3f s/step (cpu %.3f)  elapsed %.1f min  stage eta %.1f min", stage, s + 1,
                         steps, "  ".join(f"{k} {v:.4f}" for k, v in means.items()), per,
                         history[-1]["step_cpu_s"], self.elapsed() / 60, per * (steps - s - 1) / 60)
                window = {}
            if time.time() - last_ck > self.checkpoint_s and s + 1 < steps:
                if pace is not None and s + 1 > ck_step:
                    window_s = wall_steps[-(s + 1 - ck_step):]
                    steps = pace(s + 1, steps, sum(window_s) / len(window_s))
                self._checkpoint(path, modules, opt, ema, s + 1, history)
                last_ck, ck_step = time.time(), s + 1
        self._checkpoint(path, modules, opt, ema, steps, history)
        timed = wall_steps[2:] if len(wall_steps) > 4 else wall_steps
        timed_cpu = cpu_steps[2:] if len(cpu_steps) > 4 else cpu_steps
        return {"steps": steps, "history": history, "resumed_at": start,
                "wall_s_this_session": time.time() - stage_t0,
                "step_wall_s_mean": (sum(timed) / len(timed)) if timed else None,
                "step_cpu_s_mean": (sum(timed_cpu) / len(timed_cpu)) if timed_cpu else None}

    def _checkpoint(self, path, modules, opt, ema, step, history) -> None:
        _atomic_save({"modules": [m.state_dict() for m in modules], "opt": opt.state_dict(),
                      "ema": ema.state_dict() if ema is not None else None, "step": step, "history": history}, path)
        self._save_state()
        LOG.info("checkpoint: %s at step %d", path.name, step)

    def finish_stage(self, stage: str, record: dict) -> None:
        record["done"] = True
        record["elapsed_total_min"] = self.elapsed() / 60
        self.state["stages"][stage] = record
        self._save_state()
        LOG.info("stage %s done (%.1f min elapsed in all)", stage, self.elapsed() / 60)

    # ---- data
    def data(self):
        if "data" in self.cache:
            return self.cache["data"]
        np = __import__("numpy")
        p = self.plan
        path = self.ckpt_dir / "data.npz"
        timing = {}
        if path.exists():
            z = np.load(path, allow_pickle=False)
            train, judge_imgs, val = z["train"], z["judge"], z["val"]
            val_signs = z["val_signs"] if "val_signs" in z.files else np.zeros((0, 64, 64, 3), np.uint8)
        else:
            t0, c0 = time.time(), time.process_time()
            train, _ = self.world.make_dataset(p.n_train, "train", p.world_seed, sign_rate=p.sign_rate)
            judge_imgs, _ = self.world.make_dataset(p.n_judge, "all", p.world_seed, two_object_rate=0.0)
            val, _ = self.world.make_dataset(p.n_val, "all", p.world_seed, start=p.n_judge, two_object_rate=0.0)
            val_signs, _ = self.world.make_dataset(self._n_val_signs(), "all", p.world_seed, start=p.n_judge + p.n_val,
                                                   sign_rate=1.0)
            np.savez(path, train=train, judge=judge_imgs, val=val, val_signs=val_signs)
            timing = {"wall_s": time.time() - t0, "cpu_s": time.process_time() - c0}
            LOG.info("data: %d train, %d judge, %d + %d validation images drawn in %.1f s", len(train),
                     len(judge_imgs), len(val), len(val_signs), timing["wall_s"])
        # scenes are cheap to redraw (no rendering) and deterministic
        train_scenes = [self.world.sample(i, "train", p.world_seed, sign_rate=p.sign_rate) for i in range(p.n_train)]
        judge_scenes = [self.world.sample(i, "all", p.world_seed, 0.0) for i in range(p.n_judge)]
        val_scenes = [self.world.sample(p.n_judge + i, "all", p.world_seed, 0.0) for i in range(p.n_val)]
        sign_scenes = [self.world.sample(p.n_judge + p.n_val + i, "all", p.world_seed, sign_rate=1.0)
                       for i in range(self._n_val_signs())]
        self.cache["data"] = (train, train_scenes, judge_imgs, judge_scenes, val, val_scenes)
        self.cache["val_signs"] = (val_signs, sign_scenes)
        if not self.done("data"):
            self.finish_stage("data", {"n_train": len(train), "n_judge": len(judge_imgs), "n_val": len(val),
                                       "n_val_signs": len(val_signs),
                                       "distinct_train_prompts": len({s.prompt for s in train_scenes}), **timing})
        return self.cache["data"]

    def _n_val_signs(self) -> int:
        return self.plan.n_val_signs if self.plan.sign_rate > 0 else 0

    def val_signs(self):
        """(uint8 images, scenes) of the sign validation scenes (none in the v1 world)."""
        self.data()
        return self.cache["val_signs"]

    def to_float(self, images_uint8, idx=None):
        """uint8 [N, H, W, 3] -> float [N, 3, H, W] in 0..1."""
        torch = self.torch
        a = images_uint8 if idx is None else images_uint8[idx.numpy() if hasattr(idx, "numpy") else idx]
        return torch.from_numpy(a).permute(0, 3, 1, 2).float().div_(255.0)

    # ---- stage: judge
    def stage_judge(self):
        torch, world, p = self.torch, self.world, self.plan
        path = self.ckpt_dir / "judge.safetensors"
        if self.done("judge") and path.exists():
            return path
        _, _, imgs, scenes, val, val_scenes = self.data()
        labels = torch.tensor([s.labels for s in scenes], dtype=torch.long)
        val_labels = torch.tensor([s.labels for s in val_scenes], dtype=torch.long)
        torch.manual_seed(p.seed + 11)
        judge = make_judge(world)
        cfg = judge_config(world, judge.widths)

        def make_opt(mods):
            return torch.optim.AdamW(mods[0].parameters(), lr=p.judge_lr, weight_decay=1e-4)

        def step_fn(mods, opt, g, s):
            net = mods[0]
            idx = torch.randint(0, len(imgs), (p.judge_batch,), generator=g)
            x = degrade(self.to_float(imgs, idx), g)
            heads = split_logits(net(x), cfg)
            losses = {k: torch.nn.functional.cross_entropy(heads[k], labels[idx, i])
                      for i, k in enumerate(("colour", "shape", "texture"))}
            loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return {"loss": float(loss.detach())}

        steps = self.plan_steps("judge", lambda: self.probe([judge], make_opt, step_fn))
        opt = make_opt([judge])
        rec = self.run_loop("judge", [judge], opt, steps, lambda s: cosine_lr(s, steps, p.judge_lr, 50), step_fn)
        judge.eval()
        metrics = {}
        with torch.no_grad():
            x = self.to_float(val)
            for name, xin in (("clean", x), ("degraded", degrade(x, torch.Generator().manual_seed(7)))):
                heads = split_logits(judge(xin), cfg)
                for i, k in enumerate(("colour", "shape", "texture")):
                    metrics[f"val_{name}_{k}_acc"] = float((heads[k].argmax(1) == val_labels[:, i]).float().mean())
        LOG.info("judge validation accuracy: %s", json.dumps({k: round(v, 4) for k, v in metrics.items()}))
        rec["metrics"] = metrics
        save_component(path, judge.state_dict(), cfg, {"steps": steps, **metrics}, dtype="fp32")
        self.finish_stage("judge", rec)
        return path

    # ---- stage: vae
    def stage_vae(self):
        torch, p, demo = self.torch, self.plan, self.demo
        path = self.ckpt_dir / "vae.safetensors"
        if self.done("vae") and path.exists():
            return path
        train, _, _, _, val, _ = self.data()
        judge = load_judge(self.stage_judge())
        ae = new_vae(demo, p.seed + 21)
        params = list(ae.taesd_encoder.parameters()) + list(ae.taesd_decoder.parameters())
        ycbcr = torch.tensor([[0.299, 0.587, 0.114], [-0.1687, -0.3313, 0.5], [0.5, -0.4187, -0.0813]])

        def make_opt(mods):
            return torch.optim.AdamW(params, lr=p.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)

        def step_fn(mods, opt, g, s):
            net = mods[0]
            idx = torch.randint(0, len(train), (p.vae_batch,), generator=g)
            x = self.to_float(train, idx) * 2.0 - 1.0
            flip = torch.rand(p.vae_batch, generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=p.vae_precision == "bf16"):
                z = net.encode(x)
                rec = net.decode(z)
            z, rec = z.float(), rec.float()
            # squared error in YCbCr with the chroma weighted up: with an L1 loss on RGB the objects' colours (a
            # small share of the pixels and of the error) were the last thing learnt and the first thing lost
            err = torch.einsum("ij,bjhw->bihw", ycbcr, rec - x).pow(2)
            mse = err[:, 0].mean() + p.vae_chroma * err[:, 1:].mean()
            grad = ((rec.diff(dim=-1) - x.diff(dim=-1)).abs().mean() + (rec.diff(dim=-2) - x.diff(dim=-2)).abs().mean())
            m, sd = z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3))
            reg = m.pow(2).mean() + sd.clamp(min=1e-6).log().pow(2).mean()
            loss = 4.0 * mse + 0.5 * grad + p.vae_latent_reg * reg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            return {"loss": float(loss.detach()), "l1": float((rec - x).abs().mean().detach())}

        steps = self.plan_steps("vae", lambda: self.probe([ae], make_opt, step_fn))
        opt = make_opt([ae])
        every = self.ocr_every
        rec = self.run_loop("vae", [ae], opt, steps, lambda s: cosine_lr(s, steps, p.vae_lr, 100), step_fn,
                            monitor=lambda s: self._vae_word_metrics(ae, 32) if every and s % every == 0 else {})
        ae.eval()
        stats = standardise_latents_(ae, self.to_float(train[: min(len(train), 2048)]) * 2 - 1)
        fp16_round_(ae)
        rec["metrics"] = {**vae_metrics(ae, self.to_float(val) * 2 - 1, judge),
                          "latent_std_before_standardising": stats["std"],
                          "latent_mean_before_standardising": stats["mean"], **self._vae_word_metrics(ae)}
        with torch.no_grad():
            z = ae.encode(self.to_float(train[:512]) * 2 - 1) * LATENT_SCALE
        rec["metrics"].update({"scaled_latent_std": float(z.std()), "scaled_latent_mean": float(z.mean())})
        LOG.info("vae: %s", json.dumps(rec["metrics"]))
        if rec["metrics"]["judge_colour_acc_on_reconstructions"] < 0.8:
            LOG.warning("vae: the judge recognises the colour of only %.0f %% of the reconstructed validation images: "
                        "the UNet cannot do better than its autoencoder (more vae steps help)",
                        100 * rec["metrics"]["judge_colour_acc_on_reconstructions"])
        save_component(path, ae.state_dict(), vae_component_config(demo), {"steps": steps, **rec["metrics"]})
        self.finish_stage("vae", rec)
        return path

    def _vae_word_metrics(self, ae, limit: int | None = None) -> dict:
        """OCR word accuracy on the drawn sign validation images (the first ``limit``) and on their
        reconstructions (the ceiling of the words the UNet can render through this autoencoder); nothing in the
        v1 world."""
        torch = self.torch
        imgs, scenes = self.val_signs()
        if not scenes:
            return {}
        imgs, scenes = imgs[:limit], scenes[:limit]
        x = self.to_float(imgs)
        with torch.no_grad():
            out = torch.cat([ae.decode(ae.encode(x[i:i + 128] * 2 - 1)) for i in range(0, len(x), 128)])
        words = [s.sign.word for s in scenes]
        drawn = ocr_reads(x.permute(0, 2, 3, 1), words)
        rec = ocr_reads(((out.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1), words)
        return {"ocr_word_acc_drawn": sum(drawn) / len(words), "ocr_word_acc_on_reconstructions": sum(rec) / len(words)}

    # ---- stage: text
    def stage_text(self):
        torch, p, demo, world = self.torch, self.plan, self.demo, self.world
        path = self.ckpt_dir / "text_encoder.safetensors"
        if self.done("text") and path.exists():
            return path
        train, scenes, _, _, val, val_scenes = self.data()
        clip = new_clip(demo, p.seed + 31)
        tm = clip.cond_stage_model.clip_l.transformer
        tm.requires_grad_(True)
        tm.train()
        check_text_forward(clip, ["a red star", "a blue checkered heart and a green circle", ""])
        prompts = sorted({s.prompt for s in scenes})
        pidx = {t: i for i, t in enumerate(prompts)}
        tokens = torch.tensor([token_ids(clip, t) for t in prompts], dtype=torch.long)
        eos = (tokens[:, 1:] == 49407).int().argmax(1) + 1  # first [EOS] (position 0 is [SOS])
        cap = torch.tensor([pidx[s.prompt] for s in scenes], dtype=torch.long)
        cap_attr = prompt_attributes(world, prompts)
        img_attr = scene_attributes(world, scenes)
        torch.manual_seed(p.seed + 32)
        tower = _convnet_cls()(int(demo.CLIP_CONFIG["projection_dim"]), IMAGE_TOWER_WIDTHS)
        scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

        def make_opt(mods):
            params = [q for m in mods for q in m.parameters()]
            return torch.optim.AdamW(params, lr=p.text_lr, weight_decay=0.0)

        holder = torch.nn.ParameterList([scale])

        def step_fn(mods, opt, g, s):
            text, image, sc = mods
            idx = torch.randint(0, len(train), (p.text_batch,), generator=g)
            x = degrade(self.to_float(train, idx), g, strength=0.5)
            iemb = torch.nn.functional.normalize(image(x), dim=-1)
            c = cap[idx]
            h = text_forward(text, tokens[c])
            e = eos[c]
            pad = e + 1 + (torch.rand(len(c), generator=g) * (76 - e).float()).long().clamp(max=75 - e)
            rows = torch.arange(len(c))
            match = match_matrix(cap_attr[c], img_attr[idx])
            logit_scale = sc[0].clamp(max=math.log(100.0)).exp()
            loss = 0.0
            for pos in (e, pad):
                temb = torch.nn.functional.normalize(text.text_projection(h[rows, pos]), dim=-1)
                logits = logit_scale * temb @ iemb.T
                loss = loss + 0.5 * (multi_positive_ce(logits, match) + multi_positive_ce(logits.T, match.T))
            loss = loss / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([q for m in mods for q in m.parameters()], 1.0)
            opt.step()
            return {"loss": float(loss.detach())}

        mods = [tm, tower, holder]
        steps = self.plan_steps("text", lambda: self.probe(mods, make_opt, step_fn))
        opt = make_opt(mods)
        rec = self.run_loop("text", mods, opt, steps, lambda s: cosine_lr(s, steps, p.text_lr, 50), step_fn)
        tm.eval()
        tower.eval()
        fp16_round_(tm)
        rec["metrics"] = text_retrieval_metrics(self, clip, tower, val, val_scenes)
        LOG.info("text: %s", json.dumps(rec["metrics"]))
        save_component(path, clip.cond_stage_model.state_dict(), demo.CLIP_CONFIG, {"steps": steps, **rec["metrics"]})
        self.finish_stage("text", rec)
        return path

    # ---- stage: latents and contexts
    def stage_latents(self, vae_path: Path, text_path: Path):
        torch = self.torch
        path = self.ckpt_dir / "latents.pt"
        if self.done("latents") and path.exists():
            return torch.load(path, map_location="cpu", weights_only=False)
        train, scenes, *_ = self.data()
        t0, c0 = time.time(), time.process_time()
        with torch.no_grad():  # comfy's VAE / CLIP parameters keep requires_grad
            x0 = self._encode_images(vae_path, train)
            t_images, c_images = time.time() - t0, time.process_time() - c0
            prompts, ctx = self._encode_prompts(text_path, [""] + sorted({s.prompt for s in scenes}))
        pidx = {t: i for i, t in enumerate(prompts)}
        data = {"x0": x0, "contexts": ctx, "prompts": prompts,
                "caption": torch.tensor([pidx[s.prompt] for s in scenes], dtype=torch.long)}
        if self.plan.sign_rate > 0:  # [N, 1, 8, 8] share of each latent cell under a sign's plate
            cells = [self.world.sign_cells(s) for s in scenes]
            data["sign_cells"] = torch.stack([torch.from_numpy(c) for c in cells])[:, None]
        _atomic_save(data, path)
        self.finish_stage("latents", {"n": len(x0), "prompts": len(prompts), "encode_images_s": t_images,
                                      "encode_images_cpu_s": c_images,
                                      "encode_prompts_s": time.time() - t0 - t_images,
                                      "encode_prompts_cpu_s": time.process_time() - c0 - c_images,
                                      "x0_std": float(x0.std()), "x0_mean": float(x0.mean())})
        LOG.info("latents: %d images (x0 std %.3f) and %d prompts encoded in %.1f s", len(x0), float(x0.std()),
                 len(prompts), time.time() - t0)
        return data

    def _encode_images(self, vae_path: Path, images):
        """VAEEncode of every image with the shipped VAE, scaled as the model sees it (latent_format.process_in)."""
        torch, demo = self.torch, self.demo
        vae = demo.load_vae(vae_path, torch.float32)
        latent_format = demo.unet_model_config(demo.UNET_CONFIG).latent_format
        # the precision the autoencoder trained in: under bf16 about 3x faster, latents within 1 % of their std
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.plan.vae_precision == "bf16"):
            lat = [vae.encode(torch.from_numpy(images[i:i + 256]).float() / 255.0).float()  # IMAGE [B, H, W, 3]
                   for i in range(0, len(images), 256)]
        return latent_format.process_in(torch.cat(lat)).detach().contiguous()

    def _encode_prompts(self, text_path: Path, prompts: list[str]):
        """CLIPTextEncode of every prompt with the shipped text encoder: [P, 77, C]. Batched through the same
        SDClipModel forward (all token weights are 1, so encode_token_weights adds nothing); the first prompts
        are checked against clip.encode_from_tokens itself."""
        torch = self.torch
        clip = self.demo.load_clip(text_path, torch.float32)
        clip.load_model()
        enc = clip.cond_stage_model.clip_l
        out = []
        for i in range(0, len(prompts), 256):
            toks = [token_ids(clip, p) for p in prompts[i:i + 256]]  # as encode_token_weights hands them over
            out.append(enc(toks)[0].float())
        ctx = torch.cat(out)
        for k in range(min(4, len(prompts))):
            ref = clip.encode_from_tokens(clip.tokenize(prompts[k])).float()[0]
            if not torch.allclose(ref, ctx[k], atol=1e-5, rtol=1e-5):
                raise RuntimeError(f"internal: batched prompt encoding differs from CLIPTextEncode for {prompts[k]!r}")
        return prompts, ctx.detach().contiguous()

    # ---- stage: unet
    def stage_unet(self, data):
        torch, p, demo = self.torch, self.plan, self.demo
        path = self.ckpt_dir / "unet.safetensors"
        if self.done("unet") and path.exists():
            return path
        model = new_unet(demo, p.seed + 41)
        dm = model.diffusion_model
        dm.train()
        ema = EMA(dm, p.ema_decay)
        sigmas = model.model_sampling.sigmas.double()
        abar = (1.0 / (1.0 + sigmas ** 2)).float()
        x0_all, ctx_all, cap = data["x0"], data["contexts"], data["caption"]
        empty = ctx_all[0]
        cells = data.get("sign_cells")
        t_weight = min_snr_weights(abar, p.unet_min_snr) if p.unet_min_snr > 0 else None
        if p.unet_sign_weight > 0 and cells is None:
            raise RuntimeError("internal: unet_sign_weight needs the sign cells of a --sign-rate run's latents")
        to = attention_override()
        n_t = len(abar)

        def make_opt(mods):
            return torch.optim.AdamW(mods[0].parameters(), lr=p.unet_lr, weight_decay=0.0)

        def step_fn(mods, opt, g, s):
            net = mods[0]
            idx = torch.randint(0, len(x0_all), (p.unet_batch,), generator=g)
            t = torch.randint(0, n_t, (p.unet_batch,), generator=g)
            eps = torch.randn(x0_all[idx].shape, generator=g)
            drop = torch.rand(p.unet_batch, generator=g) < p.p_uncond
            ctx = torch.where(drop[:, None, None], empty[None], ctx_all[cap[idx]])
            a = abar[t][:, None, None, None]
            xt = a.sqrt() * x0_all[idx] + (1 - a).sqrt() * eps
            pred = net(xt, t.float(), context=ctx, transformer_options=to)
            if p.unet_sign_weight > 0 or t_weight is not None:
                loss = weighted_eps_loss(pred, eps, cells[idx] if p.unet_sign_weight > 0 else None,
                                         p.unet_sign_weight, None if t_weight is None else t_weight[t])
            else:
                loss = torch.nn.functional.mse_loss(pred, eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            return {"loss": float(loss.detach())}

        planned = self.plan_steps("unet", lambda: self.probe([dm], make_opt, step_fn))
        schedule = PacedCosine(planned, p.unet_lr, p.unet_warmup, self.state.get("replans", {}).get("unet", ()))
        pace = (lambda done, steps, step_s: self.pace("unet", schedule, done, steps, step_s)) \
            if self.budgeted("unet") else None
        opt = make_opt([dm])
        rec = self.run_loop("unet", [dm], opt, schedule.total, schedule, step_fn, ema=ema, pace=pace)
        rec["replans"] = schedule.replans
        save_component(path, ema.shadow.state_dict(), demo.UNET_CONFIG,
                       {"steps": rec["steps"], "planned_steps": planned, "replans": schedule.replans,
                        "ema_decay": p.ema_decay})
        self.finish_stage("unet", rec)
        return path

    # ---- stage: export
    def stage_export(self, paths: dict[str, Path]) -> dict[str, Path]:
        import safetensors

        demo = self.demo
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {"plan": self.state["plan"], "steps": self.state["steps"], "replans": self.state.get("replans", {}),
                  "budget_minutes": self.state.get("budget_minutes"),
                  "elapsed_min": self.elapsed() / 60, "torch": self.torch.__version__,
                  "threads": self.torch.get_num_threads(),
                  "stages": {k: {kk: vv for kk, vv in v.items() if kk != "history"} for k, v in self.state["stages"].items()}}
        names = {**demo.COMPONENTS, "judge": demo.JUDGE_FILE}
        out = {}
        for comp, src in paths.items():
            with safetensors.safe_open(str(src), framework="pt") as f:
                meta = dict(f.metadata() or {})
                sd = {k: f.get_tensor(k) for k in f.keys()}
            meta["training"] = json.dumps({**json.loads(meta.get("training", "{}")), "run": record}, sort_keys=True,
                                          default=str)
            dst = self.out_dir / names[comp]
            import safetensors.torch

            tmp = dst.with_suffix(".tmp")
            safetensors.torch.save_file(sd, str(tmp), metadata=meta)
            os.replace(tmp, dst)
            out[comp] = dst
        (self.out_dir / "training_record.json").write_text(json.dumps(
            {**record, "histories": {k: v.get("history") for k, v in self.state["stages"].items() if v.get("history")}},
            indent=1, sort_keys=True, default=str))
        sizes = {k: v.stat().st_size for k, v in out.items()}
        LOG.info("export: %s (%.2f MB in all)", ", ".join(f"{v.name} {sizes[k] / 1e6:.2f} MB" for k, v in out.items()),
                 sum(sizes.values()) / 1e6)
        self.finish_stage("export", {"files": {k: str(v) for k, v in out.items()}, "bytes": sizes})
        return out

    def run(self) -> dict[str, Path]:
        self.data()
        judge = self.stage_judge()
        vae = self.stage_vae()
        text = self.stage_text()
        data = self.stage_latents(vae, text)
        unet = self.stage_unet(data)
        return self.stage_export({"unet": unet, "text_encoder": text, "vae": vae, "judge": judge})


# ----------------------------------------------------------------------------------------------
# helpers of the stages
# ----------------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of a module's parameters (decay warmed up as min(decay, (1+s)/(10+s)))."""

    def __init__(self, module, decay: float):
        self.decay = decay
        self.shadow = copy.deepcopy(module).eval()
        for q in self.shadow.parameters():
            q.requires_grad_(False)

    def update(self, module, step: int) -> None:
        import torch

        d = min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            shadow, live = list(self.shadow.parameters()), [q.detach() for q in module.parameters()]
            torch._foreach_lerp_(shadow, live, 1.0 - d)

    def state_dict(self):
        return self.shadow.state_dict()

    def load_state_dict(self, sd):
        self.shadow.load_state_dict(sd)


def min_snr_weights(abar, gamma: float):
    """Per-timestep weight min(SNR, gamma) / SNR of an eps-prediction loss (Hang et al. 2023, "Efficient
    Diffusion Training via Min-SNR Weighting Strategy"): the nearly clean timesteps, easy and many, count less."""
    snr = abar / (1.0 - abar)
    return snr.clamp(max=gamma) / snr


def weighted_eps_loss(pred, eps, cells, sign_weight: float, t_weight):
    """Squared eps error, each latent cell under a sign's plate counting 1 + sign_weight (``cells`` [B, 1, H, W]
    is its plate coverage; normalised by the mean cell weight, so the loss keeps MSE's scale) and each sample
    ``t_weight`` [B] (None: 1)."""
    err = (pred - eps) ** 2
    w = None if cells is None else 1.0 + sign_weight * cells
    if w is not None:
        err = w * err
    if t_weight is not None:
        err = t_weight[:, None, None, None] * err
    return err.mean() / (w.mean() if w is not None else 1.0)


def degrade(x, g, strength: float = 1.0):
    """Augmentation for the judge / image tower: per-image Gaussian blur (sigma 0..1.2 px), half-resolution
    resampling, contrast/brightness jitter and pixel noise -- the ways generated images differ from drawn ones."""
    import torch
    import torch.nn.functional as F

    b = x.shape[0]
    sigma = torch.rand(b, generator=g) * 1.2 * strength
    blur = torch.rand(b, generator=g) < 0.7
    r = torch.arange(-2, 3, dtype=torch.float32)
    k = torch.exp(-(r[None] ** 2) / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
    k = torch.where(blur[:, None], k / k.sum(1, keepdim=True), (r == 0).float()[None].expand(b, 5))
    kk = k.repeat_interleave(3, 0)  # [b*3, 5]
    y = x.reshape(1, b * 3, *x.shape[-2:])
    y = F.conv2d(F.pad(y, (2, 2, 0, 0), mode="replicate"), kk[:, None, None, :], groups=b * 3)
    y = F.conv2d(F.pad(y, (0, 0, 2, 2), mode="replicate"), kk[:, None, :, None], groups=b * 3)
    y = y.reshape_as(x)
    half = (torch.rand(b, generator=g) < 0.3 * strength)[:, None, None, None]
    small = F.interpolate(F.interpolate(y, scale_factor=0.5, mode="bilinear", antialias=True, align_corners=False),
                          size=x.shape[-2:], mode="bilinear", align_corners=False)
    y = torch.where(half, small, y)
    c = 1 + (torch.rand(b, 1, 1, 1, generator=g) - 0.5) * 0.3 * strength
    br = (torch.rand(b, 1, 1, 1, generator=g) - 0.5) * 0.1 * strength
    noise = torch.randn(x.shape, generator=g) * torch.rand(b, 1, 1, 1, generator=g) * 0.05 * strength
    return ((y - 0.5) * c + 0.5 + br + noise).clamp(0, 1)


def standardise_latents_(ae, x) -> dict:
    """Set TAESD's ``vae_scale`` / ``vae_shift`` so that the latents ``ae.encode`` gives for ``x`` (what
    VAEEncode returns) have mean 0 and std 1 / LATENT_SCALE, the SD1.x convention, so the UNet sees unit
    variance after the SD15 latent format's scaling; decode(encode(x)) is unchanged (the decoder gets the
    same raw latents back). Returns the raw latents' mean and std."""
    import torch

    with torch.no_grad():
        ae.vae_scale.fill_(1.0)
        ae.vae_shift.fill_(0.0)
        z = torch.cat([ae.encode(x[i:i + 256]) for i in range(0, len(x), 256)]).double()
        m, s = float(z.mean()), float(z.std().clamp(min=1e-6))
        scale = s * LATENT_SCALE
        ae.vae_scale.fill_(scale)
        ae.vae_shift.fill_(-m / scale)
    return {"mean": m, "std": s}


def vae_metrics(ae, x, judge) -> dict:
    """PSNR of decode(encode(x)) and how often the judge sees in the reconstruction what it sees in the
    original (colour / shape / texture): the ceiling of what the UNet can reach through this autoencoder."""
    import torch

    judge_net, config = judge
    with torch.no_grad():
        out = torch.cat([ae.decode(ae.encode(x[i:i + 128])) for i in range(0, len(x), 128)]).clamp(-1, 1)
    mse = float(((out - x) / 2).pow(2).mean())
    seen = judge_predict(judge_net, config, ((out + 1) / 2).permute(0, 2, 3, 1))
    truth = judge_predict(judge_net, config, ((x + 1) / 2).permute(0, 2, 3, 1))
    metrics = {"val_l1": float(((out - x) / 2).abs().mean()), "val_psnr_db": 10 * math.log10(1.0 / max(mse, 1e-12))}
    for head in ("colour", "shape", "texture"):
        same = [a == b for a, b in zip(seen[head], truth[head], strict=True)]
        metrics[f"judge_{head}_acc_on_reconstructions"] = sum(same) / len(x)
    return metrics


def ocr_reads(images, words: list[str]) -> list[bool]:
    """Per image: does RapidOCR (the pack's ``nodes/shared/ocr.py``) read exactly ``word`` (case, punctuation
    and symbols ignored: a star read as '★' next to the sign does not count against it)? ``images``: float
    [N, H, W, 3] in 0..1."""
    ocr = importlib.import_module("prompt_anatomy.nodes.shared.ocr")
    ocr.require("Training and evaluating the sign world")
    return [ocr.exact_match(ocr.text_of(found), word) for found, word in zip(ocr.read(images), words, strict=True)]


def check_text_forward(clip, texts) -> None:
    """text_forward must equal ComfyUI's CLIPTextModel forward (what CLIPTextEncode runs)."""
    import torch

    tm = clip.cond_stage_model.clip_l.transformer
    toks = torch.tensor([token_ids(clip, t) for t in texts], dtype=torch.long)
    with torch.no_grad():
        ours = text_forward(tm, toks)
        ref = tm(toks)[0]
    err = float((ours - ref).abs().max())
    if err > 1e-4:
        raise RuntimeError(f"internal: the training forward of the text encoder differs from ComfyUI's by {err}")


N_ATTRIBUTES = 8  # n_objects, colour0, shape0, texture0, colour1, shape1, sign word, sign plate colour


def prompt_attributes(world, prompts):
    """[P, 8] long: n_objects, colour0, shape0, texture0, colour1, shape1, sign word, plate colour (-1 =
    unnamed, a wildcard; the sign word is -1 = no sign, which must match)."""
    import torch

    rows = []
    for t in prompts:
        parts = world.parse_prompt(t)
        objs = [d for d in parts if "sign" not in d]
        row = [len(objs)] + [-1] * (N_ATTRIBUTES - 1)
        if objs:
            o0 = objs[0]
            row[1] = world.COLOUR_NAMES.index(o0["colour"]) if o0["colour"] else -1
            row[2] = world.SHAPES.index(o0["shape"])
            row[3] = world.ALL_TEXTURES.index(o0["texture"]) if o0["texture"] else -1
        if len(objs) == 2:
            row[4], row[5] = world.COLOUR_NAMES.index(objs[1]["colour"]), world.SHAPES.index(objs[1]["shape"])
        for d in parts:
            if "sign" in d:
                row[6] = world.WORDS.index(d["sign"])
                row[7] = world.COLOUR_NAMES.index(d["colour"]) if d["colour"] else -1
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


def scene_attributes(world, scenes):
    import torch

    rows = []
    for s in scenes:
        o = s.objects
        row = [len(o)] + [-1] * (N_ATTRIBUTES - 1)
        if o:
            row[1:4] = [world.COLOUR_NAMES.index(o[0].colour), world.SHAPES.index(o[0].shape),
                        world.ALL_TEXTURES.index(o[0].texture)]
        if len(o) == 2:
            row[4], row[5] = world.COLOUR_NAMES.index(o[1].colour), world.SHAPES.index(o[1].shape)
        if s.sign is not None:
            row[6], row[7] = world.WORDS.index(s.sign.word), world.COLOUR_NAMES.index(s.sign.colour)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


def match_matrix(cap, img):
    """[B, B] bool: caption i describes image j (named attributes equal; two objects in either order; the
    same sign word, or no sign in either)."""
    c, i = cap[:, None, :], img[None, :, :]
    n_eq = c[..., 0] == i[..., 0]
    single = (c[..., 0] == 1) & ((c[..., 1] < 0) | (c[..., 1] == i[..., 1])) & (c[..., 2] == i[..., 2]) & \
        ((c[..., 3] < 0) | (c[..., 3] == i[..., 3]))
    same = (c[..., 1] == i[..., 1]) & (c[..., 2] == i[..., 2]) & (c[..., 4] == i[..., 4]) & (c[..., 5] == i[..., 5])
    swapped = (c[..., 1] == i[..., 4]) & (c[..., 2] == i[..., 5]) & (c[..., 4] == i[..., 1]) & (c[..., 5] == i[..., 2])
    double = (c[..., 0] == 2) & (same | swapped)
    sign = (c[..., 6] == i[..., 6]) & ((c[..., 7] < 0) | (c[..., 7] == i[..., 7]))
    return n_eq & ((c[..., 0] == 0) | single | double) & sign


def multi_positive_ce(logits, match):
    """Cross-entropy against the uniform distribution over each row's positives."""
    target = match.float() / match.float().sum(1, keepdim=True).clamp(min=1.0)
    return -(target * logits.log_softmax(1)).sum(1).mean()


def text_retrieval_metrics(trainer, clip, tower, val, val_scenes) -> dict:
    """Zero-shot colour / shape classification of validation images by the text tower, through the first
    [EOS] and through padding position 60 (does the padding carry the prompt?)."""
    import torch

    world = trainer.world
    tm = clip.cond_stage_model.clip_l.transformer
    prompts = [world.caption(c, s) for c in world.COLOUR_NAMES for s in world.SHAPES]
    toks = torch.tensor([token_ids(clip, t) for t in prompts], dtype=torch.long)
    eos = (toks[:, 1:] == 49407).int().argmax(1) + 1
    with torch.no_grad():
        h = text_forward(tm, toks)
        iemb = torch.nn.functional.normalize(tower(trainer.to_float(val)), dim=-1)
        out = {}
        for name, pos in (("eos", eos), ("pad60", torch.full_like(eos, 60))):
            temb = torch.nn.functional.normalize(tm.text_projection(h[torch.arange(len(toks)), pos]), dim=-1)
            best = (iemb @ temb.T).argmax(1)
            colour = torch.tensor([world.COLOUR_NAMES.index(prompts[b].split()[1]) for b in best.tolist()])
            shape = torch.tensor([world.SHAPES.index(prompts[b].split()[-1]) for b in best.tolist()])
            truth = torch.tensor([[world.COLOUR_NAMES.index(s.objects[0].colour), world.SHAPES.index(s.objects[0].shape)]
                                  for s in val_scenes])
            out[f"zero_shot_colour_acc_{name}"] = float((colour == truth[:, 0]).float().mean())
            out[f"zero_shot_shape_acc_{name}"] = float((shape == truth[:, 1]).float().mean())
    return {**out, **_zero_shot_words(trainer, clip, tower)}


def _zero_shot_words(trainer, clip, tower) -> dict:
    """Zero-shot word classification of the sign validation images ('a sign that says "WORD"' for every word),
    through the first [EOS] and padding position 60; nothing in the v1 world."""
    import torch

    world = trainer.world
    imgs, scenes = trainer.val_signs()
    if not scenes:
        return {}
    tm = clip.cond_stage_model.clip_l.transformer
    toks = torch.tensor([token_ids(clip, world.sign_caption(w)) for w in world.WORDS], dtype=torch.long)
    eos = (toks[:, 1:] == 49407).int().argmax(1) + 1
    truth = torch.tensor([world.WORDS.index(s.sign.word) for s in scenes])
    out = {}
    with torch.no_grad():
        h = text_forward(tm, toks)
        iemb = torch.nn.functional.normalize(tower(trainer.to_float(imgs)), dim=-1)
        for name, pos in (("eos", eos), ("pad60", torch.full_like(eos, 60))):
            temb = torch.nn.functional.normalize(tm.text_projection(h[torch.arange(len(toks)), pos]), dim=-1)
            out[f"zero_shot_word_acc_{name}"] = float(((iemb @ temb.T).argmax(1) == truth).float().mean())
    return out


# ----------------------------------------------------------------------------------------------
# time estimate from a (smoke) run
# ----------------------------------------------------------------------------------------------
def estimate(state: dict, plan: Plan, threads: int = 2) -> dict:
    """Extrapolate the run time of ``plan`` from the per-step times a finished (smoke) run recorded in its
    plan.json: CPU seconds per step of each trained stage (mean over its steps after the first two) times the
    plan's steps, plus data drawing and encoding scaled per image / prompt; wall time on ``threads`` dedicated
    cores = CPU seconds / threads (what a contention-free run of 2 threads gives when both stay busy; the CPU
    time of a run on a shared machine is itself inflated, so this errs long). The smoke's own wall time per
    step (contended) is extrapolated too, as the pessimistic bound."""
    _, world = load_env()
    st = state["stages"]
    out = {"stages": {}, "threads": threads}
    cpu_total = wall_total = 0.0
    for stage in TRAINED_STAGES:
        rec = st[stage]
        n = plan.steps(stage)
        cpu = rec["step_cpu_s_mean"] * n
        wall = rec["step_wall_s_mean"] * n
        out["stages"][stage] = {"steps": n, "cpu_s_per_step": rec["step_cpu_s_mean"],
                                "wall_s_per_step_measured": rec["step_wall_s_mean"], "cpu_s": cpu}
        cpu_total += cpu
        wall_total += wall
    d = st["data"]
    images = plan.n_train + plan.n_judge + plan.n_val
    per_image = d["cpu_s"] / (d["n_train"] + d["n_judge"] + d["n_val"])
    lat = st["latents"]
    prompts = len({world.sample(i, "train", plan.world_seed).prompt for i in range(plan.n_train)}) + 1
    extra = {"data_cpu_s": per_image * images,
             "encode_images_cpu_s": lat["encode_images_cpu_s"] / lat["n"] * plan.n_train,
             "encode_prompts_cpu_s": lat["encode_prompts_cpu_s"] / lat["prompts"] * prompts, "prompts": prompts}
    out["other"] = extra
    cpu_total += extra["data_cpu_s"] + extra["encode_images_cpu_s"] + extra["encode_prompts_cpu_s"]
    wall_total += (d["wall_s"] / (d["n_train"] + d["n_judge"] + d["n_val"]) * images
                   + lat["encode_images_s"] / lat["n"] * plan.n_train + lat["encode_prompts_s"] / lat["prompts"] * prompts)
    out["cpu_s"] = cpu_total
    out["estimated_wall_min_dedicated"] = cpu_total / threads / 60
    out["extrapolated_wall_min_as_measured"] = wall_total / 60
    return out


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def _native_bf16(torch) -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private helper of torch: assume no
        return False


def parse_steps(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items or []:
        name, _, value = item.partition("=")
        if name not in TRAINED_STAGES or not value.isdigit():
            raise SystemExit(f"--steps takes stage=N with stage one of {', '.join(TRAINED_STAGES)}, got {item!r}")
        out[name] = int(value)
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description="Train the Prompt Anatomy demo model on CPU (see the module docstring).")
    ap.add_argument("--out", type=Path, help="where the weights go (default: models/prompt_anatomy_mini; smoke: "
                                             ".cache/mini_smoke/weights)")
    ap.add_argument("--ckpt-dir", type=Path, help="checkpoints and caches (default .cache/mini_train; smoke: "
                                                  ".cache/mini_smoke/ckpt)")
    ap.add_argument("--budget-minutes", type=float, default=None,
                    help=f"fit the whole run into this wall-clock budget: each stage's steps are set from timed probe "
                         f"steps, and the UNet stage shortens itself if the machine slows later (default "
                         f"{DEFAULT_BUDGET_MINUTES:g}; --smoke uses a budget only when given one)")
    ap.add_argument("--no-budget", action="store_true",
                    help="use the fixed step counts of DEFAULT_PLAN instead of a time budget (bit-reproducible "
                         "anywhere; the time then depends on the machine)")
    ap.add_argument("--smoke", action="store_true", help="a few steps of every stage on 512 images, to check the "
                                                         "pipeline and time the steps; never writes models/")
    ap.add_argument("--steps", nargs="*", default=[], metavar="STAGE=N", help="override step counts, e.g. unet=12000")
    ap.add_argument("--seed", type=int, default=None, help="training seed (default 1234)")
    ap.add_argument("--sign-rate", type=float, default=None,
                    help="share of training scenes that show a sign with a word (the v2 world, e.g. 0.5; default 0: "
                         "v1's world of shapes); needs rapidocr-onnxruntime for the OCR gates")
    ap.add_argument("--vae-precision", choices=("fp32", "bf16"), default=None,
                    help="the autoencoder's compute precision in training and when it encodes the latents (default "
                         "fp32, as v1 was trained); bf16 runs its convs under CPU bf16 autocast, about 3x faster on "
                         "CPUs with AVX512-BF16 / AMX, slower elsewhere")
    ap.add_argument("--ocr-every", type=int, default=1000, metavar="N",
                    help="with --sign-rate: OCR 32 reconstructed validation signs every N autoencoder steps (the "
                         "word gate's progress, a few seconds each; 0: only at the end; default 1000)")
    ap.add_argument("--unet-sign-weight", type=float, default=None, metavar="W",
                    help="with --sign-rate: the UNet's loss on the latent cells under a sign's plate counts 1 + W "
                         "(default 0: every cell alike, as v1)")
    ap.add_argument("--unet-lr", type=float, default=None, metavar="LR",
                    help=f"the UNet's peak learning rate (default {DEFAULT_PLAN.unet_lr:g}, as v1; the v2 world "
                         f"trains at 1.5e-3, see docs/mini_model_card.md)")
    ap.add_argument("--unet-batch", type=int, default=None, metavar="N",
                    help=f"the UNet's batch size (default {DEFAULT_PLAN.unet_batch})")
    ap.add_argument("--unet-min-snr", type=float, default=None, metavar="GAMMA",
                    help="weigh the UNet's loss at each timestep by min(SNR, GAMMA) / SNR (min-SNR weighting, e.g. "
                         "5: the nearly clean timesteps count less; default 0: every timestep alike, as v1)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--checkpoint-minutes", type=float, default=5.0, help="checkpoint interval (default 5)")
    ap.add_argument("--log-every", type=int, default=None, help="log every N steps (default 25; smoke 3)")
    ap.add_argument("--fresh", action="store_true", help="delete the checkpoint folder first")
    ap.add_argument("--estimate-from", type=Path, metavar="CKPT_DIR",
                    help="print the time the default plan (with --steps) would take, extrapolated from the step "
                         "times of the finished run in CKPT_DIR (e.g. .cache/mini_smoke/ckpt), and exit")
    args = ap.parse_args(argv)
    if args.estimate_from is not None:
        logging.basicConfig(level=logging.WARNING)
        plan = dataclasses.replace(DEFAULT_PLAN)
        for k, v in parse_steps(args.steps).items():
            setattr(plan, f"{k}_steps", v)
        est = estimate(json.loads((args.estimate_from / "plan.json").read_text()), plan, args.threads)
        print(json.dumps(est, indent=1))
        print(f"default plan: {est['cpu_s'] / 3600:.2f} CPU hours -> about {est['estimated_wall_min_dedicated']:.0f} min "
              f"on {args.threads} dedicated cores; {est['extrapolated_wall_min_as_measured']:.0f} min at the measured "
              f"(shared-machine) wall time per step")
        return 0

    plan = dataclasses.replace(SMOKE_PLAN if args.smoke else DEFAULT_PLAN)
    if args.seed is not None:
        plan.seed = args.seed
    if args.sign_rate is not None:
        if not 0.0 <= args.sign_rate <= 1.0:
            ap.error(f"--sign-rate must be in 0..1, got {args.sign_rate}")
        plan.sign_rate = args.sign_rate
    if args.vae_precision is not None:
        plan.vae_precision = args.vae_precision
    if args.unet_sign_weight is not None:
        if args.unet_sign_weight < 0 or plan.sign_rate == 0 and args.unet_sign_weight > 0:
            ap.error(f"--unet-sign-weight must be >= 0 and needs --sign-rate > 0, got {args.unet_sign_weight}")
        plan.unet_sign_weight = args.unet_sign_weight
    if args.unet_lr is not None:
        if not 0 < args.unet_lr < 1:
            ap.error(f"--unet-lr must be in (0, 1), e.g. 1.5e-3, got {args.unet_lr}")
        plan.unet_lr = args.unet_lr
    if args.unet_batch is not None:
        if args.unet_batch < 1:
            ap.error(f"--unet-batch must be at least 1, got {args.unet_batch}")
        plan.unet_batch = args.unet_batch
    if args.unet_min_snr is not None:
        if args.unet_min_snr < 0:
            ap.error(f"--unet-min-snr must be >= 0 (0: off), got {args.unet_min_snr}")
        plan.unet_min_snr = args.unet_min_snr
    out = args.out or (ROOT / ".cache" / "mini_smoke" / "weights" if args.smoke else ROOT / "models" / "prompt_anatomy_mini")
    ckpt = args.ckpt_dir or (ROOT / ".cache" / ("mini_smoke/ckpt" if args.smoke else "mini_train"))
    if args.fresh and ckpt.exists():
        shutil.rmtree(ckpt)
    ckpt.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout), logging.FileHandler(ckpt / "train.log")])
    import torch

    torch.set_num_threads(max(1, args.threads))
    if plan.vae_precision == "bf16" and not _native_bf16(torch):
        LOG.warning("--vae-precision bf16: this CPU has no native bf16 (AVX512-BF16 / AMX), so the autoencoder stage "
                    "will be slower than in fp32; drop the option on this machine")
    budget = None if args.no_budget or (args.smoke and args.budget_minutes is None) else \
        (args.budget_minutes or DEFAULT_BUDGET_MINUTES)
    LOG.info("train_mini: plan %s, out %s, checkpoints %s, threads %d, budget %s min", dataclasses.asdict(plan), out,
             ckpt, torch.get_num_threads(), budget)
    trainer = Trainer(plan, out, ckpt, budget, args.checkpoint_minutes,
                      args.log_every or (3 if args.smoke else 25), step_overrides=parse_steps(args.steps),
                      ocr_every=max(0, args.ocr_every))
    if plan.sign_rate > 0:  # fail now, not after the autoencoder stage
        importlib.import_module("prompt_anatomy.nodes.shared.ocr").require("train_mini.py --sign-rate")
    paths = trainer.run()
    LOG.info("done in %.1f min: %s", trainer.elapsed() / 60, ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
