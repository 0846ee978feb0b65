"""LoRA fine-tuning restricted to chosen layers (paper 2, Staniszewski et al., ICLR 2025, Sec. 5: a LoRA on
only the localized cross-attention layers improves text rendering with less damage than tuning all of them).

Reuse of core training (ComfyUI 0.3.75, ``comfy_extras/nodes_train.py``): ``TrainLoraNode.execute`` puts an
adapter on *every* weight of the model in one inline loop, so it cannot be restricted without copying it.
This module therefore reuses its lower-level pieces unchanged: ``comfy.weight_adapter`` (``LoRAAdapter.
create_train`` -> ``LoraDiff`` installed with ``ModelPatcher.add_weight_wrapper``), the training loop
``TrainSampler`` (random-sigma x0-prediction loss, optimizer steps, loss callback) driven by
``Guider_Basic.sample``, with the node's defaults (AdamW, MSE, LoRA alpha 1.0). Only the choice of weights
differs, and optionally the loss: ``loss_weighting="min_snr"`` weighs each sample's MSE by min(SNR, 5) through a
subclass of TrainSampler whose ``fwd_bwd`` hands the step's sigmas to the loss. Gradient checkpointing is not
used (it patches ``forward`` of the shared modules).

One caption per latent: core's ``fwd_bwd`` puts the batch's captions into the guider as one list of conds, which
ComfyUI's sampling combines, so with a batch of B every latent is denoised under each of the B captions and the
predictions averaged (B x B model rows; the latent learns from a blend of the batch's captions). The subclass
here (``per_caption_sampler``) runs each group of latents that share a conditioning with that conditioning alone:
B rows, each under its own caption. With one conditioning for all latents, or batch 1, it computes what core's does.

What is trained: every weight matrix whose module name starts with one of ``weight_prefixes`` and, when
``targets`` is given, ends with one of the target names. The default targets are the four projections of
an attention layer (``to_q``, ``to_k``, ``to_v``, ``to_out.0``): the paper fine-tunes the localized
cross-attention layers as a whole (the usual diffusers LoRA targets). Pass ``targets=("to_k", "to_v")`` to
train only the text-side projections. Biases, norms and everything else stay frozen.

Keys are ComfyUI's generic LoRA format, ``<module name>.lora_up.weight`` / ``.lora_down.weight`` /
``.alpha`` with module names like ``diffusion_model.output_blocks.4.1.transformer_blocks.0.attn2.to_k``
(as TrainLoraNode writes them), which ``comfy.lora.model_lora_keys_unet`` maps, so core LoraLoader and the
pack's LoraLoaderTextLayers load the file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path

import torch

LOG = logging.getLogger("prompt_anatomy")

ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LORA_SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".alpha")
# "x0": core TrainSampler's plain MSE of the x0 prediction; "min_snr": that MSE weighted per sample by
# min(SNR, MIN_SNR_GAMMA) (Hang et al. 2023). An x0 error is sigma times the eps error, so the plain x0 loss is
# dominated by the noisiest samples, where the layout is set, not the details (the glyphs of a word).
LOSS_WEIGHTINGS = ("x0", "min_snr")
MIN_SNR_GAMMA = 5.0


def select_modules(model_patcher, weight_prefixes: list[str], targets=ATTENTION_TARGETS) -> dict[str, torch.nn.Module]:
    """{module name: module} of the weight matrices to train (ComfyUI ops modules with a 2-D+ weight)."""
    prefixes = _check_prefixes(weight_prefixes)
    chosen = {}
    for name, m in model_patcher.model.named_modules():
        if not hasattr(m, "weight_function") or getattr(m, "weight", None) is None or m.weight.ndim < 2:
            continue
        if name.startswith(prefixes) and (targets is None or any(name.endswith("." + t) for t in targets)):
            chosen[name] = m
    if not chosen:
        raise ValueError(f"weight_prefixes: none of {list(prefixes)} selects a weight of this model "
                         f"(targets {list(targets) if targets else 'all'}). Use diffusion-model module prefixes "
                         "such as 'diffusion_model.output_blocks.4.1.transformer_blocks.0.attn2.'.")
    return chosen


def _check_prefixes(weight_prefixes) -> tuple[str, ...]:
    if isinstance(weight_prefixes, str) or not weight_prefixes:
        raise ValueError("weight_prefixes: give a non-empty list of module prefixes, e.g. "
                         "['diffusion_model.output_blocks.4.1.transformer_blocks.0.attn2.'].")
    return tuple(weight_prefixes)


def lora_keys_outside(lora_sd: dict, prefixes: list[str]) -> list[str]:
    """Keys of ``lora_sd`` that belong to no module under ``prefixes`` (empty when the LoRA is confined)."""
    return sorted(k for k in lora_sd if not k.startswith(tuple(prefixes)))


def _latents_and_conds(latents, positive):
    samples = latents["samples"] if isinstance(latents, dict) else latents
    if samples.ndim != 4:
        raise ValueError(f"latents: expected a LATENT of shape [batch, channels, height, width], got "
                         f"{tuple(samples.shape)}. Connect VAE Encode or a latent batch.")
    n = samples.shape[0]
    if len(positive) == 1 and n > 1:
        positive = positive * n
    elif len(positive) != n:
        raise ValueError(f"positive: {len(positive)} conditionings for {n} latents. Give one conditioning "
                         "(used for every latent) or one per latent.")
    return samples.detach().clone(), positive


def _attach_adapters(mp, modules, rank, alpha, lora_dtype) -> dict[str, torch.nn.Parameter]:
    """One trainable LoraDiff per chosen weight, as core TrainLoraNode creates it; returns its parameters."""
    from comfy.weight_adapter import adapter_maps

    params = {}
    for name, m in modules.items():
        adapter = adapter_maps["LoRA"].create_train(m.weight, rank=rank, alpha=alpha).to(lora_dtype)
        for pname, p in adapter.named_parameters():  # lora_up.weight, lora_down.weight, alpha (frozen)
            params[f"{name}.{pname}"] = p
        mp.add_weight_wrapper(f"{name}.weight", adapter)
    return params


def _copy_weight(weight: torch.Tensor) -> torch.Tensor:
    return weight  # a weight wrapper makes ComfyUI's ops cast a copy, which autograd may save


def _wrap_inference_weights(mp, adapted) -> dict[str, torch.nn.Module]:
    """Weights loaded while ComfyUI executes a prompt are inference tensors, which autograd refuses to save for
    the backward pass through the frozen layers after the adapters. A no-op weight wrapper on each such module
    (the training clone only) makes ComfyUI's ops use normal-tensor copies of weight and bias in every forward."""
    wrapped = {}
    for name, m in mp.model.named_modules():
        weight = getattr(m, "weight", None)
        if name in adapted or not hasattr(m, "weight_function") or not torch.is_tensor(weight):
            continue
        if weight.is_inference():  # norms save their bias for backward too
            for param in ("weight", "bias"):
                if torch.is_tensor(getattr(m, param, None)):
                    mp.add_weight_wrapper(f"{name}.{param}", _copy_weight)
            wrapped[name] = m
    return wrapped


class MinSnrMSE:
    """MSE of the x0 prediction, each sample weighted by min(SNR, gamma); ``snr`` [batch] is set before each
    call from the step's sigmas (see ``min_snr_sampler``)."""

    def __init__(self, gamma: float = MIN_SNR_GAMMA):
        self.gamma = gamma
        self.snr: torch.Tensor | None = None

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.snr is None or self.snr.shape[0] != pred.shape[0]:
            raise RuntimeError(f"internal: MinSnrMSE got no SNR for a batch of {pred.shape[0]} (was TrainSampler's "
                               "fwd_bwd renamed?)")
        err = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
        return (self.snr.to(err).clamp(max=self.gamma) * err).mean()


def snr_of_sigmas(model_sampling, sigmas: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio of each sigma as the model mixes latent and noise (``noise_scaling``): 1/sigma^2
    for SD-style eps / v models, ((1 - sigma) / sigma)^2 for flow models."""
    one = torch.ones(sigmas.shape[0], 1, 1, 1, dtype=torch.float64)
    s = sigmas.detach().to(torch.float64)
    signal = model_sampling.noise_scaling(s, torch.zeros_like(one), one, False)
    noise = model_sampling.noise_scaling(s, one, torch.zeros_like(one), False)
    return (signal / noise).pow(2).flatten().float()


def caption_groups(positive: list) -> list[int]:
    """For each latent, the index of the first latent with the same conditioning entry (the same object, as when
    one conditioning is given for every latent)."""
    first: dict[int, int] = {}
    return [first.setdefault(id(c), i) for i, c in enumerate(positive)]


def per_caption_sampler(train_sampler_cls, groups: list[int]):
    """A subclass of core's TrainSampler whose step denoises every latent under its own caption only (see the
    module docstring); ``groups`` from ``caption_groups``."""
    from comfy_extras.nodes_train import make_batch_extra_option_dict

    class PerCaptionTrainSampler(train_sampler_cls):
        def fwd_bwd(self, model_wrap, batch_sigmas, batch_noise, batch_latent, cond, indicies, extra_args,
                    dataset_size, bwd=True):
            ms = model_wrap.inner_model.model_sampling
            xt = ms.noise_scaling(batch_sigmas, batch_noise, batch_latent, False).requires_grad_(True)
            x0 = ms.noise_scaling(torch.zeros_like(batch_sigmas), torch.zeros_like(batch_noise), batch_latent, False)
            batch_sigmas.requires_grad_(True)
            rows: dict[int, list[int]] = {}
            for row, index in enumerate(indicies):
                rows.setdefault(groups[index], []).append(row)
            preds, order = [], []
            with torch.autocast(xt.device.type, dtype=self.training_dtype):
                for key, group in rows.items():
                    model_wrap.conds["positive"] = [cond[key]]
                    args = make_batch_extra_option_dict(extra_args, [indicies[r] for r in group],
                                                        full_size=dataset_size)
                    preds.append(model_wrap(xt[group], batch_sigmas[group], **args))
                    order += group
                x0_pred = torch.cat(preds)[torch.tensor(order, device=xt.device).argsort()]
                loss = self.loss_fn(x0_pred, x0)
            if bwd:
                (loss / self.grad_acc).backward()
            return loss

    return PerCaptionTrainSampler


def min_snr_sampler(train_sampler_cls):
    """A subclass of core's TrainSampler that gives its ``MinSnrMSE`` loss the SNR of every step's sigmas."""

    class MinSnrTrainSampler(train_sampler_cls):
        def fwd_bwd(self, model_wrap, batch_sigmas, *args, **kwargs):
            self.loss_fn.snr = snr_of_sigmas(model_wrap.inner_model.model_sampling, batch_sigmas)
            return super().fwd_bwd(model_wrap, batch_sigmas, *args, **kwargs)

    return MinSnrTrainSampler


def _unload(mp, modules) -> None:
    """Unload the training clone and take its adapters off the shared modules (ComfyUI would only do so at
    the next load), so no trace of training stays on the base model."""
    import comfy.model_management as mm
    import comfy.model_patcher

    for i in reversed(range(len(mm.current_loaded_models))):
        if mm.current_loaded_models[i].model is mp:
            mm.current_loaded_models.pop(i).model_unload()
    for m in modules.values():
        comfy.model_patcher.wipe_lowvram_weight(m)


@contextlib.contextmanager
def _frozen(model: torch.nn.Module):
    """requires_grad off on every base parameter for the run, restored afterwards. Weights loaded while ComfyUI
    executes a prompt are inference tensors, whose flag torch lets change only inside inference mode."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            with torch.inference_mode(p.is_inference()):
                p.requires_grad_(flag)


def train_text_layer_lora(model_patcher, latents, positive, weight_prefixes: list[str], *, steps: int = 40,
                          rank: int = 4, alpha: float = 1.0, learning_rate: float = 1e-3, seed: int = 0,
                          batch_size: int = 1, targets=ATTENTION_TARGETS, training_dtype=torch.float32,
                          lora_dtype=torch.float32, loss_weighting: str = "x0") -> tuple[dict[str, torch.Tensor], list[float]]:
    """Train a LoRA on the chosen layers of ``model_patcher`` (a MODEL; never changed) with core's trainer.

    ``latents``: LATENT dict (or tensor) of training images; ``positive``: CONDITIONING, one entry for all
    latents or one per latent. Each step draws ``batch_size`` latents and a random sigma, and minimises the
    MSE of the x0 prediction (``TrainSampler``), weighted per sample by min(SNR, 5) when ``loss_weighting`` is
    "min_snr" (see LOSS_WEIGHTINGS). Deterministic for a given ``seed``; the global RNG is left
    as it was. Returns ``(lora_sd, loss_history)``: LoRA tensors (keys only under ``weight_prefixes``) and
    the loss of every step."""
    import comfy.model_management
    import comfy_extras.nodes_custom_sampler as ncs
    from comfy_extras.nodes_train import TrainSampler

    if steps < 1 or rank < 1 or batch_size < 1:
        raise ValueError(f"steps, rank and batch_size must be at least 1 (got {steps}, {rank}, {batch_size}).")
    if loss_weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss_weighting: {loss_weighting!r} is not one of {', '.join(LOSS_WEIGHTINGS)}.")
    with torch.inference_mode(False), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        samples, positive = _latents_and_conds(latents, positive)
        mp = model_patcher.clone()
        mp.set_model_compute_dtype(training_dtype)
        modules = select_modules(mp, weight_prefixes, targets)
        params = _attach_adapters(mp, modules, rank, alpha, lora_dtype)
        wrapped = _wrap_inference_weights(mp, modules)
        trainable = [p for p in params.values() if p.requires_grad]
        losses: list[float] = []
        sampler_cls = per_caption_sampler(TrainSampler, caption_groups(positive))
        sampler_cls, loss_fn = (sampler_cls, torch.nn.MSELoss()) if loss_weighting == "x0" else \
            (min_snr_sampler(sampler_cls), MinSnrMSE())
        sampler = sampler_cls(loss_fn, torch.optim.AdamW(trainable, lr=learning_rate),
                               loss_callback=losses.append, batch_size=min(batch_size, samples.shape[0]),
                               total_steps=steps, seed=seed, training_dtype=training_dtype)
        guider = ncs.Guider_Basic(mp)
        guider.set_conds(positive)
        try:
            with _frozen(mp.model), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*autocast.*")  # CPU autocast has no float32 mode
                comfy.model_management.load_models_gpu([mp], memory_required=1e20, force_full_load=True)
                samples = samples.to(training_dtype)
                noise = ncs.Noise_RandomNoise(seed)
                # TrainSampler reads the dataset size from sigmas (one dummy "sigma" per latent), as core does
                guider.sample(noise.generate_noise({"samples": samples}), samples, sampler,
                              torch.arange(samples.shape[0]), seed=seed)
        finally:
            _unload(mp, {**modules, **wrapped})
    LOG.info("text-layer LoRA: %d weights under %d prefixes, %d steps, loss %.4f -> %.4f", len(modules),
             len(weight_prefixes), steps, losses[0], losses[-1])
    return {k: p.detach().to(lora_dtype).clone() for k, p in params.items()}, losses


def save_lora(lora_sd: dict, path: str | Path, metadata: dict | None = None) -> Path:
    """Write ``lora_sd`` as safetensors; ``metadata`` values are stored as strings (JSON for non-strings)."""
    import safetensors.torch

    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in lora_sd.items()}, str(path), metadata=meta)
    return path
