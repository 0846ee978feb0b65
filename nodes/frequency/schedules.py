"""Noising schedules and latent scaling (paper 1, Fig. 2b/2c): the forward process on a signal, per band."""

from __future__ import annotations

import dataclasses
import math

import comfy.latent_formats
import comfy.model_management
import comfy.model_sampling
import comfy.utils
import torch

from ..shared.spectral import (
    DEFAULT_THRESHOLD,
    split_frequencies,
)


# ----------------------------------------------------------------------------------------------
# pure functions: schedules and latent scaling
# ----------------------------------------------------------------------------------------------
def model_kind(model_sampling) -> str:
    if isinstance(model_sampling, comfy.model_sampling.CONST):
        return "flow"
    if isinstance(model_sampling, comfy.model_sampling.EPS):
        return "eps"
    return "other"


def signal_noise_coefficients(model_sampling, sigma: float) -> tuple[float, float]:
    """(a, b) with x_t = a * x0 + b * eps at ``sigma`` in the model's sampling space, read from
    ``model_sampling.noise_scaling`` (EPS-type: a = 1, b = sigma; flow: a = 1 - sigma, b = sigma)."""
    noise_scaling = getattr(model_sampling, "noise_scaling", None)
    if noise_scaling is None:
        return 1.0, float(sigma)
    s = torch.tensor([float(sigma)], dtype=torch.float64)
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    a = float(noise_scaling(s, zero.clone(), one.clone()))
    b = float(noise_scaling(s, one.clone(), zero.clone()))
    return a, b


def vp_coefficients(a: float, b: float) -> tuple[float, float, float]:
    """(a', b', scale): x_t * scale = a' x0 + b' eps with a'^2 + b'^2 = 1 (the paper's sqrt(abar), sqrt(1-abar))."""
    n = math.hypot(a, b)
    if n == 0.0:
        return 1.0, 0.0, 1.0
    return a / n, b / n, 1.0 / n


NAMED_SCHEDULES = ("sd1_scaled_linear", "ddpm_linear", "cosine", "rectified_flow", "sd3_flow_shift3")
SCHEDULE_OPTIONS = ("from_model",) + NAMED_SCHEDULES


@dataclasses.dataclass
class Schedule:
    name: str
    kind: str  # "eps" (variance exploding in the sampler, VP in the paper) or "flow"
    timesteps: list[int]  # index into the model's/named schedule (0 = least noise)
    sigmas: list[float]  # the schedule's own sigma (EPS: sqrt((1-abar)/abar); flow: sigma)
    signal: list[float]  # a' = sqrt(abar_t) (VP form)
    noise: list[float]  # b' = sqrt(1 - abar_t)


def _pick_indices(length: int, points: int) -> list[int]:
    points = max(1, min(int(points), length))
    return sorted({max(0, round((k + 1) * length / points) - 1) for k in range(points)})


def _schedule_from_sigmas(name: str, kind: str, all_sigmas: torch.Tensor, points: int, coef) -> Schedule:
    idx = _pick_indices(len(all_sigmas), points)
    sig, sa, sb = [], [], []
    for i in idx:
        s = float(all_sigmas[i])
        a, b, _ = vp_coefficients(*coef(s))
        sig.append(s)
        sa.append(a)
        sb.append(b)
    return Schedule(name, kind, idx, sig, sa, sb)


def named_schedule(name: str, points: int = 50) -> Schedule:
    """A standard noise schedule, sampled at ``points`` evenly spaced timesteps (the last is the noisiest).

    sd1_scaled_linear: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2 (SD1.x/SD2.x/SDXL);
    ddpm_linear: betas = linspace(1e-4, 0.02, 1000) (DDPM); cosine: Nichol & Dhariwal (s = 0.008);
    rectified_flow: sigma = t / 1000 (SD3/Flux without shift); sd3_flow_shift3: shift 3 (SD3)."""
    from comfy.ldm.modules.diffusionmodules.util import make_beta_schedule

    if name in ("sd1_scaled_linear", "ddpm_linear", "cosine"):
        if name == "sd1_scaled_linear":
            betas = make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.012)
        elif name == "ddpm_linear":
            betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
        else:
            betas = make_beta_schedule("cosine", 1000)
        abar = torch.cumprod(1.0 - torch.as_tensor(betas, dtype=torch.float64), dim=0)
        sigmas = ((1.0 - abar) / abar).sqrt()
        return _schedule_from_sigmas(name, "eps", sigmas, points, lambda s: (1.0, s))
    if name in ("rectified_flow", "sd3_flow_shift3"):
        t = torch.arange(1, 1001, dtype=torch.float64) / 1000.0
        shift = 3.0 if name == "sd3_flow_shift3" else 1.0
        sigmas = shift * t / (1.0 + (shift - 1.0) * t)
        return _schedule_from_sigmas(name, "flow", sigmas, points, lambda s: (1.0 - s, s))
    raise ValueError(f"schedule must be one of {', '.join(SCHEDULE_OPTIONS)}, got {name!r}.")


def model_schedule(model_sampling, points: int = 50) -> Schedule:
    """The noise schedule of a model (``model.get_model_object("model_sampling")``), VP-normalised."""
    sigmas = getattr(model_sampling, "sigmas", None)
    if sigmas is None or len(sigmas) == 0:
        raise ValueError("the model's model_sampling has no sigma table, so its schedule cannot be read: pick a named "
                         "schedule instead of from_model.")
    name = " + ".join(b.__name__ for b in type(model_sampling).__bases__) or type(model_sampling).__name__
    return _schedule_from_sigmas(f"from_model ({name})", model_kind(model_sampling),
                                 sigmas.detach().cpu().double(), points,
                                 lambda s: signal_noise_coefficients(model_sampling, s))


def noising_curves(x0: torch.Tensor, noise: torch.Tensor, schedule: Schedule,
                   threshold: float = DEFAULT_THRESHOLD) -> dict:
    """Paper 1 Fig. 2b/2c ("Add_Noise"): for x_t = a' x0 + b' eps at every timestep of ``schedule``, the RMS
    of a' x0_low, a' x0_high, b' eps_low, b' eps_high and the relative changes ||x_t^p - x0^p|| / ||x0^p||,
    averaged over the batch. Exact, from the parts' norms and inner products (no x_t is materialised)."""
    if tuple(x0.shape) != tuple(noise.shape):
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from x0 shape {tuple(x0.shape)}.")
    x0l, x0h = split_frequencies(x0.detach().float(), threshold)
    el, eh = split_frequencies(noise.detach().float(), threshold)
    n = x0[0].numel()
    out = {"timesteps": list(schedule.timesteps), "sigma": list(schedule.sigmas),
           "signal_coef": list(schedule.signal), "noise_coef": list(schedule.noise)}
    for part, xp, ep in (("low", x0l, el), ("high", x0h, eh)):
        xx = xp.reshape(xp.shape[0], -1).double().pow(2).sum(1)
        ee = ep.reshape(ep.shape[0], -1).double().pow(2).sum(1)
        xe = (xp.reshape(xp.shape[0], -1).double() * ep.reshape(ep.shape[0], -1).double()).sum(1)
        sig, noi, chg = [], [], []
        for a, b in zip(schedule.signal, schedule.noise, strict=True):
            sig.append(float((a * xx.sqrt() / math.sqrt(n)).mean()))
            noi.append(float((b * ee.sqrt() / math.sqrt(n)).mean()))
            d2 = ((a - 1.0) ** 2 * xx + b * b * ee + 2.0 * (a - 1.0) * b * xe).clamp_min(0.0)
            chg.append(float((d2.sqrt() / xx.sqrt().clamp_min(1e-30)).mean()))
        out[f"signal_{part}"] = sig
        out[f"noise_{part}"] = noi
        out[f"rel_change_{part}"] = chg
        out[f"x0_{part}_rms"] = float((xx.sqrt() / math.sqrt(n)).mean())
        out[f"eps_{part}_rms"] = float((ee.sqrt() / math.sqrt(n)).mean())
        # first timestep where the noise of this band outweighs the signal of this band
        cross = next((t for t, s, e in zip(schedule.timesteps, sig, noi, strict=True) if e > s), None)
        out[f"noise_exceeds_signal_{part}_at"] = cross
    total = float(x0l.double().pow(2).sum() + x0h.double().pow(2).sum())
    out["x0_low_energy_fraction"] = float(x0l.double().pow(2).sum()) / total if total > 0 else float("nan")
    return out


def settle_step(changes, threshold: float) -> int:
    """First step s such that every ``changes[k]`` for k >= s is <= ``threshold`` (``len(changes)`` if the
    last value is above it). NaN (a step the sampler did not report) counts as not settled."""
    s = len(changes)
    for k in range(len(changes) - 1, -1, -1):
        v = changes[k]
        if v is None or not (v <= threshold):
            break
        s = k
    return s


CUTOFF_SIGNALS = ("x0", "x_t")


def suggested_cutoff(changes, threshold: float, signal: str = "x0") -> tuple[float, int]:
    """(fraction, first step without guidance) from per-step relative changes of the low part of the
    recorded steps 0..N-1 (the final, N, has change 0 by definition).

    x_t: x_t at step s is the state *before* step s, so if it has settled from s on, steps s.. need no
    guidance: cutoff s / N. x0: the prediction of step s already used step s's guidance, so: (s + 1) / N."""
    n = len(changes)
    if n == 0:
        return 1.0, 0
    if signal not in CUTOFF_SIGNALS:
        raise ValueError(f"cutoff_signal must be one of {', '.join(CUTOFF_SIGNALS)}, got {signal!r}.")
    s = settle_step(changes, threshold)
    step = s if signal == "x_t" else min(n, s + 1)
    return step / n, step


# ----------------------------------------------------------------------------------------------
# drawing (PIL only)
# ----------------------------------------------------------------------------------------------
