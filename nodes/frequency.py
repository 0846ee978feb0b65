"""Low/high frequency split of latents and images (paper 1, Sec. 4.2, Fig. 2, Prop. 1).

Paper 1 explains "shape first, then details" with the spectrum: Gaussian noise has a flat O(1/MN) energy
per frequency (Prop. 1), natural images keep most of their energy in the lowest 20 % of the spectrum, so
the low frequencies (the shape) survive the forward noising longest and are the first the sampler
recovers.

**The split.** :func:`split_frequencies` is the pack's one low/high split: a radial mask in normalised
frequency (cycles per pixel, so the Nyquist frequency is 0.5 along both axes whatever the size). The
``threshold`` is the fraction of the spectrum that counts as "low" — "the lowest 20 % parts of spectrum"
of the paper: the low band is the disc |f| <= r centred on DC whose area is ``threshold`` of the
normalised spectrum [-0.5, 0.5]^2 (r = sqrt(threshold / pi) = 0.252 cycles/pixel for 0.2; past
threshold pi/4 the disc is clipped by the square and r comes from inverting the clipped area). On a
discrete M x N grid the low band therefore holds ``threshold`` of the Fourier bins up to rounding. The
mask is point-symmetric, so the low part is a real orthogonal projection: ``low = P x``, ``high = x - low``,
``low + high == x`` to float precision and ``||x||^2 = ||low||^2 + ||high||^2``.

**Nodes.**

* ``FrequencySplit`` / ``FrequencySplitImage`` and ``FrequencyMerge`` / ``FrequencyMergeImage``: the split
  as nodes, and low of one input + high of another.
* ``FrequencySplitPreview``: a MODEL -> MODEL recorder (keyed SAMPLER_SAMPLE wrapper chaining the sampler's
  callback) that works with any sampler using the MODEL (KSampler, GuidanceCutoffKSampler,
  SamplerCustomAdvanced, ...). Live preview: the x0 prediction split low | high, side by side, through
  ComfyUI's latent previewer and progress bar. Per-run statistics are published, when the run ends, to
  the ``PA_FREQ_RECORD`` handle it outputs.
* ``FrequencySplitViewer``: handle + the sampler's LATENT (+ VAE) -> grid (rows x_t, x_t low, x_t high,
  x0, x0 low, x0 high; columns = the recorded steps), plots, JSON numbers and ``suggested_cutoff``.
* ``FrequencyNoisingAnalysis``: the forward process x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps on a user's
  image or latent, with a model's or a named schedule (Fig. 2b/2c, "Add_Noise" side).

**Latent scaling.** Samplers work in the model's own parameterisation: EPS-type models (SD1/SD2/SDXL,
v-prediction too) x_t = x0 + sigma * eps, flow models (SD3/Flux) x_t = (1 - sigma) x0 + sigma * eps. With
a, b the signal and noise coefficients (read from the model's ``model_sampling.noise_scaling``), x_t is
divided by sqrt(a^2 + b^2) before any statistic: the variance-preserving form a' x0 + b' eps with
a'^2 + b'^2 = 1, i.e. exactly the paper's sqrt(abar_t) x0 + sqrt(1 - abar_t) eps for EPS models
(abar = 1 / (1 + sigma^2)), and the VP process of the same signal-to-noise ratio for flow models.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections import deque

import comfy.latent_formats
import comfy.model_management
import comfy.model_sampling
import comfy.utils
import latent_preview
import numpy as np
import torch
from comfy.patcher_extension import WrappersMP
from comfy_api.latest import io, ui
from PIL import Image, ImageDraw

from . import imaging, toolkit

WRAPPER_KEY = f"{toolkit.PACK}.frequency"
STORE = f"{toolkit.PACK}.frequency"
CATEGORY = "prompt_anatomy/frequency"
DEFAULT_THRESHOLD = 0.2
MAX_RUNS_KEPT = 4  # runs a handle remembers (the viewer picks the one that produced its LATENT)

FreqRecord = io.Custom("PA_FREQ_RECORD")

_THRESHOLD_TOOLTIP = ("Fraction of the spectrum that counts as low frequency (paper 1: the lowest 20 %). The low "
                      "band is a disc around DC in normalised frequency (cycles/pixel, Nyquist = 0.5 on both axes) "
                      "covering this fraction of the spectrum's area; 0.2 -> radius 0.252 cycles/pixel. In (0, 1).")


# ----------------------------------------------------------------------------------------------
# pure functions: the split
# ----------------------------------------------------------------------------------------------
def validate_threshold(threshold, name: str = "threshold") -> float:
    try:
        value = float(threshold)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a number in (0, 1), got {threshold!r}.") from e
    if not (math.isfinite(value) and 0.0 < value < 1.0):
        raise ValueError(f"{name} {threshold!r} is outside (0, 1): it is the fraction of the spectrum that counts as "
                         f"low frequency, so 0 would leave nothing low and 1 nothing high. Use e.g. 0.2 (the paper's "
                         f"choice).")
    return value


def disc_area_in_spectrum(r: float) -> float:
    """Area of {|f| <= r} inside the normalised spectrum [-0.5, 0.5]^2 (whose area is 1)."""
    if r <= 0.0:
        return 0.0
    if r <= 0.5:
        return math.pi * r * r
    if r >= math.sqrt(0.5):
        return 1.0
    segment = r * r * math.acos(0.5 / r) - 0.5 * math.sqrt(r * r - 0.25)  # beyond each of the 4 edges
    return math.pi * r * r - 4.0 * segment


@functools.lru_cache(maxsize=256)
def low_radius(threshold: float) -> float:
    """Radius (cycles/pixel) of the low band: the disc covering ``threshold`` of the spectrum's area."""
    threshold = validate_threshold(threshold)
    if threshold <= math.pi / 4:
        return math.sqrt(threshold / math.pi)
    lo, hi = 0.5, math.sqrt(0.5)
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if disc_area_in_spectrum(mid) < threshold:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@functools.lru_cache(maxsize=64)
def _half_mask(h: int, w: int, threshold: float, device: torch.device | None) -> torch.Tensor:
    r0 = low_radius(threshold)
    fy = torch.fft.fftfreq(h, dtype=torch.float64)
    fx = torch.fft.rfftfreq(w, dtype=torch.float64)
    r = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    mask = r <= r0 * (1.0 + 1e-12)
    return mask if device is None else mask.to(device)


def low_frequency_mask(h: int, w: int, threshold: float = DEFAULT_THRESHOLD, device=None,
                       full: bool = False) -> torch.Tensor:
    """Boolean low-band mask over the spectrum of an ``h`` x ``w`` signal, in torch.fft layout (DC at [0, 0]):
    ``[h, w // 2 + 1]`` for rfft2 (default) or ``[h, w]`` for fft2 (``full=True``)."""
    threshold = validate_threshold(threshold)
    if full:
        fy = torch.fft.fftfreq(h, dtype=torch.float64)
        fx = torch.fft.fftfreq(w, dtype=torch.float64)
        mask = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) <= low_radius(threshold) * (1.0 + 1e-12)
        return mask if device is None else mask.to(device)
    return _half_mask(int(h), int(w), threshold, None if device is None else torch.device(device))


def _check_tensor(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}.")
    if x.ndim < 2:
        raise ValueError(f"{name} has shape {tuple(x.shape)}: the split needs at least 2 spatial dimensions "
                         f"(..., H, W).")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}): give a batch with at least one image/latent "
                         f"of non-zero size.")


def _fft_low(x32: torch.Tensor, threshold: float) -> torch.Tensor:
    h, w = x32.shape[-2:]
    spec = torch.fft.rfft2(x32, dim=(-2, -1))
    spec = spec * low_frequency_mask(h, w, threshold, device=spec.device)
    return torch.fft.irfft2(spec, s=(h, w), dim=(-2, -1))


def split_frequencies(x: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``x`` (``[..., H, W]``, any leading dims) into ``(low, high)`` over its last two dimensions.

    ``low`` keeps the Fourier coefficients inside the low band (see :func:`low_frequency_mask`), ``high``
    is ``x - low``, so ``low + high`` reproduces ``x`` to float precision. Computed in float32 on ``x``'s
    device (CPU fallback where the device has no FFT); the parts come back in ``x``'s dtype and device."""
    _check_tensor(x, "x")
    threshold = validate_threshold(threshold)
    x32 = x.float()
    try:
        low = _fft_low(x32, threshold)
    except RuntimeError:  # e.g. MPS without FFT for some sizes: same maths on the CPU
        low = _fft_low(x32.cpu(), threshold).to(x32.device)
    high = x32 - low
    return toolkit.like(low, x), toolkit.like(high, x)


def merge_frequencies(low_source: torch.Tensor, high_source: torch.Tensor,
                      threshold: float = DEFAULT_THRESHOLD) -> torch.Tensor:
    """Low part of ``low_source`` plus high part of ``high_source`` (same shapes). Merging the two parts of
    one split gives the input back (the split is a projection)."""
    _check_tensor(low_source, "low_source")
    _check_tensor(high_source, "high_source")
    if tuple(low_source.shape) != tuple(high_source.shape):
        raise ValueError(f"FrequencyMerge needs inputs of the same shape, got {tuple(low_source.shape)} (low source) "
                         f"and {tuple(high_source.shape)} (high source): resize one of them (LatentUpscale / "
                         f"ImageScale) or repeat the smaller batch (RepeatLatentBatch / RepeatImageBatch).")
    low, _ = split_frequencies(low_source, threshold)
    _, high = split_frequencies(high_source.to(low_source.device), threshold)
    return (low.float() + high.float()).to(low_source.dtype)


def fourier_energy(x: torch.Tensor) -> torch.Tensor:
    """|F(u, v)|^2 per frequency with the paper's normalisation F = (1/MN) sum x e^{-2 pi i (...)}
    (eq. 6), over the last two dims; for i.i.d. N(0, 1) noise its expectation is 1/MN at every (u, v)."""
    _check_tensor(x, "x")
    h, w = x.shape[-2:]
    spec = torch.fft.fft2(x.float(), dim=(-2, -1)) / (h * w)
    return spec.real ** 2 + spec.imag ** 2


def rms_per_item(x: torch.Tensor) -> torch.Tensor:
    """Root mean square of each batch item (``||x_i|| / sqrt(n)``), float32."""
    flat = x.reshape(x.shape[0], -1).float()
    return flat.norm(dim=1) / math.sqrt(max(flat.shape[1], 1))


def relative_change(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per item ``||x - ref|| / ||ref||`` (float32; inf where ref is all zeros and x is not)."""
    d = (x.float() - ref.float()).reshape(x.shape[0], -1).norm(dim=1)
    r = ref.float().reshape(ref.shape[0], -1).norm(dim=1)
    at_zero = torch.where(d > 0, torch.full_like(d, math.inf), torch.zeros_like(d))
    return torch.where(r > 0, d / r.clamp_min(1e-30), at_zero)


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
COLORS = {"low": (31, 119, 180), "high": (214, 39, 40), "low2": (44, 160, 44), "high2": (255, 127, 14),
          "grey": (120, 120, 120)}


_font = imaging.font


def _text_size(draw, text, font) -> tuple[int, int]:
    box = draw.textbbox((0, 0), text, font=font)
    return box[2] - box[0], box[3] - box[1]


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, v = [], first
    while v <= hi + 1e-9 * step:
        ticks.append(round(v, 12))
        v += step
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.0e}"
    return f"{v:g}"


def line_plot(series, *, title: str, xlabel: str, ylabel: str, log_y: bool = False, size=(640, 420),
              hlines=(), vlines=()) -> Image.Image:
    """A line plot drawn with PIL. ``series``: iterable of (label, xs, ys, color, dashed). Points with
    non-finite y (and y <= 0 on a log axis) are skipped. ``hlines``/``vlines``: (value, label, color)."""
    w, h = size
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    font, small = _font(14), _font(11)
    left, right, top, bottom = 64, 16, 34, 46
    series = [(lab, list(xs), [float(y) if y is not None else math.nan for y in ys], col, dash)
              for lab, xs, ys, col, dash in series]

    def ok(y):
        return math.isfinite(y) and (y > 0 or not log_y)

    xs_all = [x for _, xs, ys, _, _ in series for x, y in zip(xs, ys, strict=False) if ok(y)]
    ys_all = [y for _, xs, ys, _, _ in series for y in ys if ok(y)]
    ys_all += [v for v, _, _ in hlines if ok(v)]
    x_lo, x_hi = (min(xs_all), max(xs_all)) if xs_all else (0.0, 1.0)
    if x_hi == x_lo:
        x_hi = x_lo + 1.0
    if ys_all:
        y_lo, y_hi = min(ys_all), max(ys_all)
    else:
        y_lo, y_hi = (0.1, 1.0) if log_y else (0.0, 1.0)
    if log_y:
        y_lo, y_hi = math.log10(y_lo), math.log10(y_hi)
        y_lo, y_hi = math.floor(y_lo), math.ceil(y_hi)
        if y_hi == y_lo:
            y_hi += 1
    else:
        y_lo = min(y_lo, 0.0)
        if y_hi == y_lo:
            y_hi = y_lo + 1.0
        y_hi += 0.05 * (y_hi - y_lo)
    pw, ph = w - left - right, h - top - bottom

    def px(x):
        return left + (x - x_lo) / (x_hi - x_lo) * pw

    def py(y):
        v = math.log10(y) if log_y else y
        return top + ph - (v - y_lo) / (y_hi - y_lo) * ph

    # axes, ticks, grid
    d.rectangle([left, top, left + pw, top + ph], outline=(0, 0, 0))
    yt = [10.0 ** e for e in range(int(y_lo), int(y_hi) + 1)] if log_y else _nice_ticks(y_lo, y_hi)
    for v in yt:
        y = py(v)
        if top - 1 <= y <= top + ph + 1:
            d.line([left, y, left + pw, y], fill=(230, 230, 230))
            tw, th = _text_size(d, _fmt(v), small)
            d.text((left - 6 - tw, y - th / 2 - 2), _fmt(v), fill=(0, 0, 0), font=small)
    for v in _nice_ticks(x_lo, x_hi, 8):
        x = px(v)
        d.line([x, top + ph, x, top + ph + 4], fill=(0, 0, 0))
        tw, _ = _text_size(d, _fmt(v), small)
        d.text((x - tw / 2, top + ph + 6), _fmt(v), fill=(0, 0, 0), font=small)
    tw, _ = _text_size(d, title, font)
    d.text(((w - tw) / 2, 8), title, fill=(0, 0, 0), font=font)
    tw, _ = _text_size(d, xlabel, small)
    d.text((left + (pw - tw) / 2, h - 18), xlabel, fill=(0, 0, 0), font=small)
    d.text((4, 8), ylabel, fill=(0, 0, 0), font=small)
    for v, lab, col in hlines:
        if ok(v):
            y = py(v)
            for x0 in range(left, left + pw, 8):
                d.line([x0, y, min(x0 + 4, left + pw), y], fill=col, width=1)
            d.text((left + 4, y - 14), lab, fill=col, font=small)
    for v, lab, col in vlines:
        if x_lo <= v <= x_hi:
            x = px(v)
            for y0 in range(top, top + ph, 8):
                d.line([x, y0, x, min(y0 + 4, top + ph)], fill=col, width=1)
            d.text((x + 3, top + 3), lab, fill=col, font=small)
    # curves
    for _lab, xs, ys, col, dash in series:
        pts = [(px(x), py(y)) for x, y in zip(xs, ys, strict=False) if ok(y)]
        for (xa, ya), (xb, yb) in zip(pts, pts[1:], strict=False):
            if dash:
                n = max(1, int(math.hypot(xb - xa, yb - ya) // 6))
                for k in range(0, n, 2):
                    t0, t1 = k / n, min(1.0, (k + 1) / n)
                    d.line([xa + (xb - xa) * t0, ya + (yb - ya) * t0, xa + (xb - xa) * t1, ya + (yb - ya) * t1],
                           fill=col, width=2)
            else:
                d.line([xa, ya, xb, yb], fill=col, width=2)
        for x, y in pts:
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=col)
    # legend, in the corner that covers the fewest data points
    if series:
        sizes = [_text_size(d, lab, small) for lab, *_ in series]
        row_h = max(th for _, th in sizes) + 6
        box_w, box_h = max(tw for tw, _ in sizes) + 36, row_h * len(series) + 4
        all_pts = [(px(x), py(y)) for _, xs, ys, _, _ in series for x, y in zip(xs, ys, strict=False) if ok(y)]
        corners = [(left + pw - box_w - 4, top + 4), (left + 4, top + 4),
                   (left + pw - box_w - 4, top + ph - box_h - 4), (left + 4, top + ph - box_h - 4)]
        bx, by = min(corners, key=lambda c: sum(c[0] - 3 <= x <= c[0] + box_w + 3 and c[1] - 3 <= y <= c[1] + box_h + 3
                                                for x, y in all_pts))
        d.rectangle([bx, by, bx + box_w, by + box_h], fill=(255, 255, 255), outline=(200, 200, 200))
        for k, (lab, _xs, _ys, col, dash) in enumerate(series):
            ly = by + 3 + k * row_h
            d.line([bx + 6, ly + row_h / 2, bx + 26, ly + row_h / 2], fill=col, width=3 if not dash else 1)
            d.text((bx + 30, ly + 1), lab, fill=(0, 0, 0), font=small)
    return img


def pil_to_image(pils: list[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> ComfyUI IMAGE [B, H, W, 3] in 0..1."""
    arrays = [np.asarray(p.convert("RGB"), dtype=np.float32) / 255.0 for p in pils]
    return torch.from_numpy(np.stack(arrays))


def image_to_pil(img: torch.Tensor) -> Image.Image:
    return Image.fromarray(np.clip(255.0 * img.detach().float().cpu().numpy(), 0, 255).astype(np.uint8))


GRID_CELL_MAX = 256  # px: larger cells are downscaled in grids (a 1024 px photo would make a 6000 px grid)


def labelled_grid(cells: torch.Tensor, rows: int, cols: int, row_labels, col_labels, gap: int = 4,
                  max_cell: int = GRID_CELL_MAX) -> torch.Tensor:
    """Cells ``[rows * cols, h, w, 3]`` (row-major) -> one IMAGE ``[1, H, W, 3]`` with row/column labels."""
    h, w = int(cells.shape[1]), int(cells.shape[2])
    if max(h, w) > max_cell:
        scale = max_cell / max(h, w)
        h, w = max(1, round(h * scale)), max(1, round(w * scale))
        cells = torch.nn.functional.interpolate(cells.movedim(-1, 1).float(), size=(h, w), mode="area").movedim(1, -1)
    font = _font(12)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max([_text_size(probe, s, font)[0] for s in row_labels] + [0]) + 2 * gap
    line_h = _text_size(probe, "Ag", font)[1] + 3
    header_h = max([len(s.split("\n")) for s in col_labels] + [1]) * line_h + gap
    # columns at least as wide as their labels (small latents decode to small cells)
    col_w = max([w] + [_text_size(probe, line, font)[0] + gap for s in col_labels for line in s.split("\n")])
    width = label_w + cols * col_w + (cols - 1) * gap + gap
    height = header_h + rows * h + (rows - 1) * gap + gap
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    for c, lab in enumerate(col_labels):
        for k, line in enumerate(lab.split("\n")):
            d.text((label_w + c * (col_w + gap), gap // 2 + k * line_h), line, fill=(0, 0, 0), font=font)
    for r, lab in enumerate(row_labels):
        th = _text_size(d, lab, font)[1]
        d.text((gap, header_h + r * (h + gap) + (h - th) // 2), lab, fill=(0, 0, 0), font=font)
        for c in range(cols):
            canvas.paste(image_to_pil(cells[r * cols + c]), (label_w + c * (col_w + gap), header_h + r * (h + gap)))
    return pil_to_image([canvas])


def latent_to_rgb(latents: torch.Tensor, latent_format=None, min_side: int = 64) -> torch.Tensor:
    """Fast approximate colours of model-space latents ``[N, C, h, w]`` -> ``[N, H, W, 3]`` (the
    previewer's Latent2RGB factors where the format has them, else channels 0-2), upscaled (nearest) so the
    short side is at least ``min_side``."""
    x = latents.float().cpu()
    if x.ndim == 5:  # video latents [N, C, T, h, w]: the first frame
        x = x[:, :, 0]
    factors = getattr(latent_format, "latent_rgb_factors", None) if latent_format is not None else None
    if factors is not None and len(factors) == x.shape[1]:
        f = torch.tensor(factors, dtype=torch.float32)  # [C, 3]
        bias = getattr(latent_format, "latent_rgb_factors_bias", None)
        rgb = torch.einsum("nchw,cr->nrhw", x, f)
        if bias is not None:
            rgb = rgb + torch.tensor(bias, dtype=torch.float32)[None, :, None, None]
    else:
        rgb = x[:, :3] if x.shape[1] >= 3 else x[:, :1].expand(-1, 3, -1, -1)
    rgb = ((rgb + 1.0) / 2.0).clamp(0.0, 1.0)
    scale = max(1, math.ceil(min_side / max(1, min(rgb.shape[-2:]))))
    if scale > 1:
        rgb = torch.nn.functional.interpolate(rgb, scale_factor=scale, mode="nearest")
    return rgb.movedim(1, -1)


def decode_cells(latents: torch.Tensor, vae, latent_format) -> torch.Tensor:
    """Model-space latents ``[N, C, h, w]`` -> images ``[N, H, W, 3]``: with the VAE (each latent converted
    by the format's process_out first) or, without one, by :func:`latent_to_rgb`."""
    if vae is None:
        return latent_to_rgb(latents, latent_format)
    out = latent_format.process_out(latents.float()) if latent_format is not None else latents.float()
    with torch.no_grad():
        images = vae.decode(out)
    if images.ndim == 5:  # video VAEs: [B, T, H, W, 3]
        images = images.reshape(-1, *images.shape[-3:])
    return images[..., :3].float().cpu().clamp(0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# the recorder
# ----------------------------------------------------------------------------------------------
STAT_NAMES = ("xt_low", "xt_high", "x0_low", "x0_high")


def parse_steps(text: str) -> list[int]:
    """Comma/space separated step indices (negative counts from the end); empty -> []."""
    out = []
    for tok in str(text or "").replace(";", ",").replace(" ", ",").split(","):
        tok = tok.strip()
        if not tok:
            continue
        try:
            out.append(int(tok))
        except ValueError as e:
            raise ValueError(f"grid_steps must be step indices separated by commas (e.g. '0, 5, 10, -1'), got "
                             f"{tok!r} in {text!r}.") from e
    return out


def resolve_grid_steps(explicit: list[int], columns: int, n_steps: int) -> list[int]:
    """Steps (0-based) whose latents are kept: ``explicit`` (negative from the end), or ``columns`` evenly
    spaced steps including the first and the last."""
    if n_steps <= 0:
        return []
    if explicit:
        steps = []
        for s in explicit:
            if not -n_steps <= s < n_steps:
                raise ValueError(f"grid_steps contains step {s} but this sampling run has {n_steps} steps (use 0.."
                                 f"{n_steps - 1}, or negative indices counting from the end).")
            steps.append(s % n_steps)
        return sorted(set(steps))
    cols = max(1, min(int(columns), n_steps))
    if cols == 1:
        return [n_steps - 1]
    return sorted({math.floor(k * (n_steps - 1) / (cols - 1) + 0.5) for k in range(cols)})


@dataclasses.dataclass
class FrequencyRun:
    """What one sampling run leaves behind: per-step statistics and the chosen steps' latents (CPU)."""

    threshold: float
    n_steps: int
    sigmas: list[float]  # the schedule sampled (n_steps + 1 values)
    kind: str  # "eps" / "flow" / "other"
    model_sampling: str
    sampler: str | None
    signal_coef: list[float]  # a' of x_t at each sigma (n_steps + 1 values, VP form)
    noise_coef: list[float]  # b'
    stats: dict[str, torch.Tensor]  # "<xt|x0>_<low|high>_rms" and "..._change": [n_steps + 1, B] (row N = final)
    grid_steps: list[int]
    grid_latents: dict[int, tuple[torch.Tensor, torch.Tensor]]  # step -> (x_t VP-scaled, x0), model space
    final: torch.Tensor  # the sampler's result, model space
    final_out: torch.Tensor  # the same after process_latent_out (what the sampler node outputs)
    latent_format: object
    reported_steps: int  # steps whose callback fired

    @property
    def batch(self) -> int:
        return int(self.final.shape[0])


class FrequencyRecordHandle:
    """The PA_FREQ_RECORD value: where the recorder publishes finished runs (the last few)."""

    def __init__(self, settings: dict):
        self.settings = dict(settings)
        self.runs: deque[FrequencyRun] = deque(maxlen=MAX_RUNS_KEPT)

    def publish(self, run: FrequencyRun) -> None:
        self.runs.append(run)

    def find(self, samples: torch.Tensor | None) -> tuple[FrequencyRun | None, bool]:
        """The newest run whose output equals ``samples`` (True), else the newest run (False)."""
        if samples is not None:
            for run in reversed(self.runs):
                out = run.final_out
                if tuple(out.shape) == tuple(samples.shape) and torch.allclose(
                        out, samples.detach().float().cpu(), rtol=1e-4, atol=1e-4):
                    return run, True
        return (self.runs[-1] if self.runs else None), False

    def __repr__(self) -> str:
        return f"FrequencyRecordHandle({len(self.runs)} runs)"


class _Recording:
    """Working state of one run (lives in the RunState store)."""

    def __init__(self, settings: dict, sigmas: torch.Tensor, model, sampler_name):
        self.settings = settings
        self.threshold = settings["threshold"]
        self.sigmas = [float(s) for s in sigmas.detach().float().cpu()]
        self.n_steps = len(self.sigmas) - 1
        self.grid_steps = resolve_grid_steps(settings["grid_steps"], settings["grid_columns"], self.n_steps)
        ms = model.model_sampling
        self.kind = model_kind(ms)
        self.model_sampling_name = " + ".join(b.__name__ for b in type(ms).__bases__) or type(ms).__name__
        self.latent_format = model.latent_format
        self.process_out = model.process_latent_out
        self.sampler = sampler_name
        self.coef = [vp_coefficients(*signal_noise_coefficients(ms, s)) for s in self.sigmas]
        self.x_vp: dict[int, torch.Tensor] = {}
        self.x0: dict[int, torch.Tensor] = {}
        self.rms: dict[str, dict[int, torch.Tensor]] = {k: {} for k in STAT_NAMES}
        self.final: torch.Tensor | None = None

    def record(self, step: int, x0: torch.Tensor | None, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not 0 <= step < self.n_steps or x0 is None or x is None:
            return None
        scale = self.coef[step][2]
        with torch.no_grad():
            x_vp = x.detach().float() * scale
            x0f = x0.detach().float()
            lo, hi = split_frequencies(torch.stack([x_vp, x0f]), self.threshold)  # one FFT for both
            xl, xh, ol, oh = lo[0], hi[0], lo[1], hi[1]
            for name, part in (("xt_low", xl), ("xt_high", xh), ("x0_low", ol), ("x0_high", oh)):
                self.rms[name][step] = rms_per_item(part).cpu()
            # every step until the run ends: the relative change to the final needs the final
            self.x_vp[step] = x_vp.to("cpu", torch.float32, copy=True)
            self.x0[step] = x0f.to("cpu", torch.float32, copy=True)
        return ol, oh

    def finish(self) -> FrequencyRun | None:
        if self.final is None:
            return None
        final = self.final
        n, b = self.n_steps, final.shape[0]
        fl, fh = split_frequencies(final, self.threshold)
        stats = {f"{k}_{s}": torch.full((n + 1, b), math.nan) for k in STAT_NAMES for s in ("rms", "change")}
        for k in STAT_NAMES:
            for step, v in self.rms[k].items():
                stats[f"{k}_rms"][step] = v
            stats[f"{k}_rms"][n] = rms_per_item(fl if k.endswith("low") else fh)
            stats[f"{k}_change"][n] = 0.0
        for src, name in ((self.x_vp, "xt"), (self.x0, "x0")):
            if not src:
                continue
            steps = sorted(src)
            low, high = split_frequencies(torch.stack([src[k] for k in steps]), self.threshold)  # [S, B, ...]
            for part, p, ref in (("low", low, fl), ("high", high, fh)):
                d = (p - ref.unsqueeze(0)).reshape(len(steps), b, -1).norm(dim=2)
                r = ref.reshape(1, b, -1).norm(dim=2)
                at_zero = torch.where(d > 0, torch.full_like(d, math.inf), torch.zeros_like(d))
                stats[f"{name}_{part}_change"][steps] = torch.where(r > 0, d / r.clamp_min(1e-30), at_zero)
        grid = {s: (self.x_vp[s], self.x0[s]) for s in self.grid_steps if s in self.x_vp}
        run = FrequencyRun(
            threshold=self.threshold, n_steps=n, sigmas=self.sigmas, kind=self.kind,
            model_sampling=self.model_sampling_name, sampler=self.sampler,
            signal_coef=[c[0] for c in self.coef], noise_coef=[c[1] for c in self.coef], stats=stats,
            grid_steps=[s for s in self.grid_steps if s in grid], grid_latents=grid, final=final,
            final_out=self.process_out(final.clone()).float().cpu(), latent_format=self.latent_format,
            reported_steps=len(self.x_vp))
        self.x_vp, self.x0 = {}, {}  # only the chosen steps stay (in the published run)
        return run


def _make_previewer(guider):
    """ComfyUI's previewer for the guider's model (as latent_preview.prepare_callback makes it), or
    Latent2RGB where the server's previews are off."""
    patcher = getattr(guider, "model_patcher", None)
    device = getattr(patcher, "load_device", comfy.model_management.get_torch_device())
    lf = guider.inner_model.latent_format
    previewer = latent_preview.get_previewer(device, lf)
    if previewer is None and getattr(lf, "latent_rgb_factors", None) is not None:
        previewer = latent_preview.Latent2RGBPreviewer(lf.latent_rgb_factors, lf.latent_rgb_factors_bias,
                                                       lf.latent_rgb_factors_reshape)
    return previewer


def side_by_side(left: Image.Image, right: Image.Image, gap: int = 4) -> Image.Image:
    out = Image.new("RGB", (left.width + gap + right.width, max(left.height, right.height)), (0, 0, 0))
    out.paste(left, (0, 0))
    out.paste(right, (left.width + gap, 0))
    return out


def make_recorder_wrapper(handle: FrequencyRecordHandle, settings: dict):
    """The keyed SAMPLER_SAMPLE wrapper: records every step through the sampler's callback (chained; it
    may be None), sends the low | high live preview, publishes the run to ``handle`` when the run ends."""

    def finish(run_state):
        for rec in run_state.peek(STORE) or []:
            result = rec.finish()
            if result is not None:
                handle.publish(result)

    def wrapper(executor, guider, sigmas, extra_args, callback, *args, **kwargs):
        run_state = toolkit.run_state(extra_args.get("model_options"))
        fn = getattr(executor.class_obj, "sampler_function", None)
        rec = _Recording(settings, sigmas, guider.inner_model, getattr(fn, "__name__", None))
        if run_state is not None:
            if run_state.peek(STORE) is None:
                run_state.on_finish(finish)
            run_state.store(STORE, list).append(rec)
        pbar = comfy.utils.ProgressBar(rec.n_steps) if settings["live_preview"] else None
        # previews only where someone listens (the server's progress hook); the previewer is made once per run
        previewer = _make_previewer(guider) if pbar is not None and pbar.hook is not None else None

        def recording_callback(step, x0, x, total_steps):
            result = None
            if callback is not None:
                result = callback(step, x0, x, total_steps)
            parts = rec.record(int(step), x0, x)
            if previewer is not None and parts is not None:
                low = previewer.decode_latent_to_preview(parts[0])
                high = previewer.decode_latent_to_preview(parts[1])
                pbar.update_absolute(int(step) + 1, total_steps,
                                     ("JPEG", side_by_side(low, high), latent_preview.MAX_PREVIEW_RESOLUTION))
            return result

        samples = executor(guider, sigmas, extra_args, recording_callback, *args, **kwargs)
        rec.final = samples.detach().to("cpu", torch.float32, copy=True)
        if run_state is None:  # not tracked (should not happen: the node installs tracking): publish now
            result = rec.finish()
            if result is not None:
                handle.publish(result)
        return samples

    return wrapper


def apply_recorder(model, threshold: float = DEFAULT_THRESHOLD, grid_columns: int = 6, grid_steps: str = "",
                   live_preview: bool = True):
    """Clone ``model`` with the recorder installed; returns (patched model, handle)."""
    settings = {"threshold": validate_threshold(threshold), "grid_columns": int(grid_columns),
                "grid_steps": parse_steps(grid_steps), "live_preview": bool(live_preview)}
    if settings["grid_columns"] < 1:
        raise ValueError(f"grid_columns must be at least 1, got {grid_columns}.")
    handle = FrequencyRecordHandle(settings)
    m = model.clone()
    toolkit.ensure_run_tracking(m)
    toolkit.add_keyed_wrapper(m, WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY, make_recorder_wrapper(handle, settings))
    return m, handle


# ----------------------------------------------------------------------------------------------
# viewer helpers
# ----------------------------------------------------------------------------------------------
def run_summary(run: FrequencyRun, index: int, settle_threshold: float, signal: str) -> dict:
    """The numbers of one image of a run (JSON-serialisable)."""
    st = {k: v[:, index].tolist() for k, v in run.stats.items()}
    n = run.n_steps
    key = "x0" if signal == "x0" else "xt"
    cutoff, cut_step = suggested_cutoff(st[f"{key}_low_change"][:n], settle_threshold, signal)
    settle = {f"{k}_{p}": settle_step(st[f"{k}_{p}_change"][:n], settle_threshold)
              for k in ("xt", "x0") for p in ("low", "high")}
    return {
        "steps": list(range(n + 1)),
        "sigma": run.sigmas,
        "model_kind": run.kind,
        "model_sampling": run.model_sampling,
        "sampler": run.sampler,
        "threshold": run.threshold,
        "low_radius_cycles_per_pixel": low_radius(run.threshold),
        "batch_index": index,
        "batch": run.batch,
        "signal_coef": run.signal_coef,  # of x_t at each sigma (the last: the final sigma)
        "noise_coef": run.noise_coef,
        "rms": {k: st[f"{k}_rms"] for k in STAT_NAMES},
        "rel_change": {k: st[f"{k}_change"] for k in STAT_NAMES},
        "settle_threshold": settle_threshold,
        "settle_step": settle,
        "cutoff_signal": signal,
        "suggested_cutoff": cutoff,
        "suggested_cutoff_step": cut_step,
        "reported_steps": run.reported_steps,
        "grid_steps": run.grid_steps,
    }


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, list):
        return [_clean(x) for x in v]
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    return v


def to_json(data: dict) -> str:
    """JSON with NaN/inf as null (strict JSON)."""
    return json.dumps(_clean(data), indent=1)


_SERIES = (("x_t low", "xt_low", "low", False), ("x_t high", "xt_high", "high", False),
           ("x0 low", "x0_low", "low2", True), ("x0 high", "x0_high", "high2", True))


def run_plots(summary: dict) -> torch.Tensor:
    steps = summary["steps"]
    norm = line_plot([(lab, steps, summary["rms"][k], COLORS[c], dash) for lab, k, c, dash in _SERIES],
                     title="RMS of the low / high parts per step", xlabel="sampler step (last = final)",
                     ylabel="RMS")
    thr = summary["settle_threshold"]
    vl = [(summary["suggested_cutoff_step"], f"cutoff {summary['suggested_cutoff']:.2f}", COLORS["grey"])]
    change = line_plot([(lab, steps[:-1], summary["rel_change"][k][:-1], COLORS[c], dash)
                        for lab, k, c, dash in _SERIES],
                       title="relative change ||part - final part|| / ||final part||",
                       xlabel="sampler step", ylabel="rel. change (log)", log_y=True,
                       hlines=[(thr, f"threshold {thr:g}", COLORS["grey"])], vlines=vl)
    return pil_to_image([norm, change])


GRID_ROWS = ("x_t", "x_t low", "x_t high", "x0", "x0 low", "x0 high")


def run_grid(run: FrequencyRun, index: int, vae=None) -> torch.Tensor:
    cols = [(s, *run.grid_latents[s]) for s in run.grid_steps] + [(run.n_steps, run.final, run.final)]
    rows: list[list[torch.Tensor]] = [[] for _ in GRID_ROWS]
    for _s, x_vp, x0 in cols:
        xt, pred = x_vp[index:index + 1], x0[index:index + 1]
        for r, cell in enumerate((xt, *split_frequencies(xt, run.threshold), pred,
                                  *split_frequencies(pred, run.threshold))):
            rows[r].append(cell)
    flat = torch.cat([cell for row in rows for cell in row])  # row-major: rows = GRID_ROWS, columns = steps
    images = decode_cells(flat, vae, run.latent_format)
    col_labels = [f"step {s}\nsigma {run.sigmas[s]:.3g}" for s, _, _ in cols[:-1]]
    col_labels.append(f"final\nsigma {run.sigmas[-1]:.3g}")
    return labelled_grid(images, len(GRID_ROWS), len(cols), GRID_ROWS, col_labels)


def summary_text(summary: dict, matched: bool) -> str:
    n = summary["batch"]
    s = summary["settle_step"]
    thr = summary["settle_threshold"]
    kind = {"eps": "EPS-type model: x_t shown as x_t / sqrt(1 + sigma^2)",
            "flow": "flow model: x_t shown as x_t / sqrt((1 - sigma)^2 + sigma^2)"}.get(
        summary["model_kind"], "x_t shown in variance-preserving form")
    steps = len(summary["steps"]) - 1
    lines = [
        f"{steps} steps ({summary['sampler'] or 'sampler'}), image {summary['batch_index']} of {n}; {kind}.",
        f"Low band: lowest {summary['threshold']:.0%} of the spectrum (radius "
        f"{summary['low_radius_cycles_per_pixel']:.3f} cycles/pixel).",
        f"Within {thr:g} of the final (relative change), from step: x0 low {s['x0_low']}, x0 high {s['x0_high']}, "
        f"x_t low {s['xt_low']}, x_t high {s['xt_high']} (of {steps}).",
        f"suggested_cutoff = {summary['suggested_cutoff']:.3f} (signal {summary['cutoff_signal']}: guidance for the "
        f"first {summary['suggested_cutoff_step']} of {steps} steps).",
    ]
    if not matched:
        lines.append("Note: no recorded run produced exactly this LATENT; showing the newest run of the recorder.")
    return "\n".join(lines)


def _ui(images: torch.Tensor | None, text: str | None, cls=None) -> dict:
    out = {}
    if images is not None:
        out.update(ui.PreviewImage(images, cls=cls).as_dict())
    if text is not None:
        out.update(ui.PreviewText(text).as_dict())
    return out


# ----------------------------------------------------------------------------------------------
# nodes: split / merge
# ----------------------------------------------------------------------------------------------
def _latent_samples(latent, name: str) -> torch.Tensor:
    if not isinstance(latent, dict) or "samples" not in latent:
        raise ValueError(f"{name} must be a LATENT (a dict with 'samples').")
    return latent["samples"]


def _image_high_preview(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    # the high part is zero-mean: shown around mid grey
    return torch.cat([low.clamp(0, 1), (high + 0.5).clamp(0, 1)], dim=2)


class FrequencySplit(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FrequencySplit",
            display_name="Frequency Split (latent)",
            category=CATEGORY,
            description="Splits a latent into its low- and high-frequency parts with a radial mask in normalised "
                        "frequency (paper 1, Sec. 4.2). Exact: low + high reproduces the input.",
            inputs=[
                io.Latent.Input("samples", tooltip="The latent to split (any channel count; batch > 1 is fine)."),
                io.Float.Input("threshold", default=DEFAULT_THRESHOLD, min=0.001, max=0.999, step=0.01,
                               tooltip=_THRESHOLD_TOOLTIP),
            ],
            outputs=[io.Latent.Output("low", display_name="low", tooltip="Low-frequency part (the shape)."),
                     io.Latent.Output("high", display_name="high",
                                      tooltip="High-frequency part (details, zero mean).")],
        )

    @classmethod
    def execute(cls, samples, threshold=DEFAULT_THRESHOLD) -> io.NodeOutput:
        x = _latent_samples(samples, "samples")
        low, high = split_frequencies(x, threshold)
        lo, hi = samples.copy(), samples.copy()
        lo["samples"], hi["samples"] = low, high
        return io.NodeOutput(lo, hi)


class FrequencySplitImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FrequencySplitImage",
            display_name="Frequency Split (image)",
            category=CATEGORY,
            description="Splits an image into its low- and high-frequency parts (per colour channel, radial mask in "
                        "normalised frequency; paper 1, Sec. 4.2). Exact: low + high reproduces the input. The "
                        "high part is zero-mean; the node's preview shows it around mid grey.",
            inputs=[
                io.Image.Input("image", tooltip="The image(s) to split."),
                io.Float.Input("threshold", default=DEFAULT_THRESHOLD, min=0.001, max=0.999, step=0.01,
                               tooltip=_THRESHOLD_TOOLTIP),
            ],
            outputs=[io.Image.Output("low", display_name="low",
                                     tooltip="Low-frequency part (may leave 0..1 slightly)."),
                     io.Image.Output("high", display_name="high",
                                     tooltip="High-frequency part: zero-mean, add it back with FrequencyMergeImage.")],
        )

    @classmethod
    def execute(cls, image, threshold=DEFAULT_THRESHOLD) -> io.NodeOutput:
        _check_tensor(image, "image")
        low, high = split_frequencies(image.movedim(-1, -3), threshold)
        low, high = low.movedim(-3, -1), high.movedim(-3, -1)
        return io.NodeOutput(low, high, ui=_ui(_image_high_preview(low, high), None, cls))


class FrequencyMerge(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FrequencyMerge",
            display_name="Frequency Merge (latent)",
            category=CATEGORY,
            description="Low-frequency part of one latent + high-frequency part of another (e.g. the shape of one "
                        "generation with the details of another). Merging the two outputs of FrequencySplit gives "
                        "the original back.",
            inputs=[
                io.Latent.Input("low_from", tooltip="Latent whose low-frequency part (shape) is kept."),
                io.Latent.Input("high_from", tooltip="Latent whose high-frequency part (details) is kept; same shape."),
                io.Float.Input("threshold", default=DEFAULT_THRESHOLD, min=0.001, max=0.999, step=0.01,
                               tooltip=_THRESHOLD_TOOLTIP),
            ],
            outputs=[io.Latent.Output(
                tooltip="low(low_from) + high(high_from); other keys (noise mask) from low_from.")],
        )

    @classmethod
    def execute(cls, low_from, high_from, threshold=DEFAULT_THRESHOLD) -> io.NodeOutput:
        merged = merge_frequencies(_latent_samples(low_from, "low_from"), _latent_samples(high_from, "high_from"),
                                   threshold)
        out = low_from.copy()
        out["samples"] = merged
        return io.NodeOutput(out)


class FrequencyMergeImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FrequencyMergeImage",
            display_name="Frequency Merge (image)",
            category=CATEGORY,
            description="Low-frequency part of one image + high-frequency part of another (same size). Merging the "
                        "two outputs of FrequencySplitImage gives the original back.",
            inputs=[
                io.Image.Input("low_from", tooltip="Image whose low-frequency part is kept."),
                io.Image.Input("high_from", tooltip="Image whose high-frequency part is kept; same size and batch."),
                io.Float.Input("threshold", default=DEFAULT_THRESHOLD, min=0.001, max=0.999, step=0.01,
                               tooltip=_THRESHOLD_TOOLTIP),
                io.Boolean.Input("clamp", default=False,
                                 tooltip="Clamp the result to 0..1 (off keeps the merge exact; on for "
                                         "saving/display)."),
            ],
            outputs=[io.Image.Output(tooltip="low(low_from) + high(high_from).")],
        )

    @classmethod
    def execute(cls, low_from, high_from, threshold=DEFAULT_THRESHOLD, clamp=False) -> io.NodeOutput:
        _check_tensor(low_from, "low_from")
        _check_tensor(high_from, "high_from")
        merged = merge_frequencies(low_from.movedim(-1, -3), high_from.movedim(-1, -3), threshold).movedim(-3, -1)
        return io.NodeOutput(merged.clamp(0, 1) if clamp else merged)


# ----------------------------------------------------------------------------------------------
# nodes: recorder and viewer
# ----------------------------------------------------------------------------------------------
class FrequencySplitPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FrequencySplitPreview",
            display_name="Frequency Split Preview (recorder)",
            category=CATEGORY,
            description="Watch 'shape first, then details' (paper 1, Fig. 2): patches the MODEL so that any sampler "
                        "using it (KSampler, GuidanceCutoffKSampler, SamplerCustomAdvanced, ...) shows the x0 "
                        "prediction split into low | high frequencies as its live preview, and records per-step "
                        "statistics for FrequencySplitViewer. The sampled latent is unchanged.",
            inputs=[
                io.Model.Input("model", tooltip="The model to record (cloned; the input stays unchanged)."),
                io.Float.Input("threshold", default=DEFAULT_THRESHOLD, min=0.001, max=0.999, step=0.01,
                               tooltip=_THRESHOLD_TOOLTIP),
                io.Int.Input("grid_columns", default=6, min=1, max=64,
                             tooltip="How many steps (evenly spaced, first and last included) keep their latents for "
                                     "the viewer's grid. Only these steps' latents are kept after the run."),
                io.String.Input("grid_steps", default="", multiline=False,
                                tooltip="Optional explicit steps for the grid, e.g. '0, 2, 5, -1' (0-based; negative "
                                        "counts from the end). Empty: grid_columns evenly spaced steps."),
                io.Boolean.Input("live_preview", default=True,
                                 tooltip="Send the low | high split of the x0 prediction as the sampler's live preview "
                                         "(ComfyUI's previewer: TAESD if the server uses it, else Latent2RGB — also "
                                         "when the server's previews are off)."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The recording model: sample with it."),
                     FreqRecord.Output("record", display_name="record",
                                       tooltip="Handle to the recorded runs: connect to FrequencySplitViewer.")],
        )

    @classmethod
    def execute(cls, model, threshold=DEFAULT_THRESHOLD, grid_columns=6, grid_steps="",
                live_preview=True) -> io.NodeOutput:
        m, handle = apply_recorder(model, threshold, grid_columns, grid_steps, live_preview)
        return io.NodeOutput(m, handle)


class FrequencySplitViewer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FrequencySplitViewer",
            display_name="Frequency Split Viewer",
            category=CATEGORY,
            description="Shows what FrequencySplitPreview recorded during sampling (paper 1, Fig. 2a-c): a grid of "
                        "x_t / x0 and their low / high parts over the steps, plots of the parts' norms and of their "
                        "relative change to the final, the numbers as JSON, and suggested_cutoff — the fraction of "
                        "steps after which the low-frequency part (the shape) has settled, for "
                        "GuidanceCutoffKSampler's cutoff.",
            inputs=[
                FreqRecord.Input("record", tooltip="The record output of FrequencySplitPreview."),
                io.Latent.Input("latent", tooltip="The LATENT of the sampler that used the recording model (orders "
                                                  "this node after sampling and picks that run)."),
                io.Vae.Input("vae", optional=True,
                             tooltip="VAE to decode the grid. Without it the grid uses fast approximate colours "
                                     "(Latent2RGB)."),
                io.Int.Input("batch_index", default=0, min=0, max=4095, tooltip="Which image of the batch to show."),
                io.Float.Input("settle_threshold", default=0.1, min=0.0001, max=10.0, step=0.01,
                               tooltip="A part has 'settled' once its relative change to the final stays at or below "
                                       "this for every later step."),
                io.Combo.Input("cutoff_signal", options=list(CUTOFF_SIGNALS), default="x0",
                               tooltip="Which low part decides suggested_cutoff. x0: the model's prediction of the "
                                       "clean latent (the shape it has decided on; cutoff = (settle step + 1) / "
                                       "steps). x_t: the noisy state itself, the paper's curve (settles late, as the "
                                       "remaining noise counts too; cutoff = settle step / steps)."),
            ],
            outputs=[
                io.Image.Output("grid", display_name="grid",
                                tooltip="Rows x_t, x_t low, x_t high, x0, x0 low, x0 high; columns = recorded "
                                        "steps + final."),
                io.Image.Output("plots", display_name="plots",
                                tooltip="Two plots: RMS of the parts per step; relative change to the final (log)."),
                io.String.Output("stats", display_name="stats_json", tooltip="All numbers as JSON."),
                io.Float.Output("suggested_cutoff", display_name="suggested_cutoff",
                                tooltip="Fraction of the steps that need guidance (cutoff_unit 'fraction' of "
                                        "GuidanceCutoffKSampler)."),
            ],
        )

    @classmethod
    def execute(cls, record, latent, vae=None, batch_index=0, settle_threshold=0.1,
                cutoff_signal="x0") -> io.NodeOutput:
        if not isinstance(record, FrequencyRecordHandle):
            raise ValueError("record must be the record output of a FrequencySplitPreview node.")
        if not (math.isfinite(settle_threshold) and settle_threshold > 0):
            raise ValueError(f"settle_threshold must be > 0, got {settle_threshold}: it is a relative change "
                             f"(e.g. 0.1 = within 10 % of the final).")
        if cutoff_signal not in CUTOFF_SIGNALS:
            raise ValueError(f"cutoff_signal must be one of {', '.join(CUTOFF_SIGNALS)}, got {cutoff_signal!r}.")
        samples = latent.get("samples") if isinstance(latent, dict) else None
        run, matched = record.find(samples)
        if run is None:
            raise ValueError("FrequencySplitViewer: the recorder has no finished sampling run yet. Connect the MODEL "
                             "output of FrequencySplitPreview to the sampler whose LATENT feeds this viewer.")
        if not 0 <= batch_index < run.batch:
            raise ValueError(f"batch_index {batch_index} is out of range: the recorded run has {run.batch} image(s) "
                             f"(use 0..{run.batch - 1}).")
        summary = run_summary(run, batch_index, float(settle_threshold), cutoff_signal)
        summary["matched_latent"] = matched
        text = summary_text(summary, matched)
        summary["summary"] = text
        grid = run_grid(run, batch_index, vae)
        plots = run_plots(summary)
        preview = imaging.stack_padded([grid, plots[0:1], plots[1:2]])
        return io.NodeOutput(grid, plots, to_json(summary), float(summary["suggested_cutoff"]),
                             ui=_ui(preview, text, cls))


# ----------------------------------------------------------------------------------------------
# node: noising analysis
# ----------------------------------------------------------------------------------------------
LATENT_FORMATS = {"sd1": comfy.latent_formats.SD15, "sdxl": comfy.latent_formats.SDXL,
                  "sd3": comfy.latent_formats.SD3, "flux": comfy.latent_formats.Flux}
LATENT_FORMAT_OPTIONS = ("from_model",) + tuple(LATENT_FORMATS) + ("as_is",)


def _resolve_latent_format(name: str, model):
    if name == "from_model":
        if model is None:
            return None
        return model.model.latent_format
    if name == "as_is":
        return None
    if name not in LATENT_FORMATS:
        raise ValueError(f"latent_format must be one of {', '.join(LATENT_FORMAT_OPTIONS)}, got {name!r}.")
    return LATENT_FORMATS[name]()


def noising_grid(x0: torch.Tensor, noise: torch.Tensor, schedule: Schedule, columns: int, threshold: float,
                 space: str, vae=None, latent_format=None) -> torch.Tensor:
    """Rows x_t, x_t low, x_t high of the first item; columns = evenly spaced timesteps of ``schedule``."""
    k = len(schedule.timesteps)
    cols = sorted({math.floor(c * (k - 1) / (columns - 1) + 0.5) for c in range(columns)}) if columns > 1 else [k - 1]
    cells = []
    for c in cols:
        xt = schedule.signal[c] * x0[:1].float() + schedule.noise[c] * noise[:1].float()
        lo, hi = split_frequencies(xt, threshold)
        cells.append((xt, lo, hi))
    flat = torch.cat([cells[c][r] for r in range(3) for c in range(len(cols))])
    if space == "pixel":
        images = ((flat + 1.0) / 2.0).clamp(0, 1).movedim(1, -1)
    else:
        images = decode_cells(flat, vae, latent_format)
    labels = [f"t = {schedule.timesteps[c]}\nsqrt(abar) {schedule.signal[c]:.3f}" for c in cols]
    return labelled_grid(images, 3, len(cols), ("x_t", "x_t low", "x_t high"), labels)


def noising_plots(curves: dict, schedule_name: str) -> torch.Tensor:
    t = curves["timesteps"]
    norm = line_plot([("sqrt(abar) x0 low", t, curves["signal_low"], COLORS["low"], False),
                      ("sqrt(abar) x0 high", t, curves["signal_high"], COLORS["high"], False),
                      ("sqrt(1-abar) eps low", t, curves["noise_low"], COLORS["low2"], True),
                      ("sqrt(1-abar) eps high", t, curves["noise_high"], COLORS["high2"], True)],
                     title=f"forward noising, RMS of the parts ({schedule_name})", xlabel="timestep t",
                     ylabel="RMS (log)", log_y=True)
    change = line_plot([("low: ||x_t - x0|| / ||x0||", t, curves["rel_change_low"], COLORS["low"], False),
                        ("high: ||x_t - x0|| / ||x0||", t, curves["rel_change_high"], COLORS["high"], False)],
                       title="forward noising, relative change of the parts", xlabel="timestep t",
                       ylabel="rel. change (log)", log_y=True)
    return pil_to_image([norm, change])


def noising_text(curves: dict, space: str) -> str:
    lo, hi = curves["noise_exceeds_signal_low_at"], curves["noise_exceeds_signal_high_at"]
    last = curves["timesteps"][-1]

    def at(v):
        return f"t = {v}" if v is not None else f"never (up to t = {last})"

    return "\n".join([
        f"{space} space, schedule {curves['schedule']}, low band = lowest {curves['threshold']:.0%} of the spectrum.",
        f"x0 energy in the low band: {curves['x0_low_energy_fraction']:.1%}; RMS x0 low {curves['x0_low_rms']:.4g}, "
        f"x0 high {curves['x0_high_rms']:.4g}; noise RMS low {curves['eps_low_rms']:.4g}, "
        f"high {curves['eps_high_rms']:.4g}.",
        f"Noise outweighs the signal in the high band from {at(hi)}, in the low band from {at(lo)}.",
        f"Relative change at the last timestep: low {curves['rel_change_low'][-1]:.3g}, high "
        f"{curves['rel_change_high'][-1]:.3g}.",
    ])


class FrequencyNoisingAnalysis(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FrequencyNoisingAnalysis",
            display_name="Frequency Noising Analysis",
            category=CATEGORY,
            description="Simulates the forward process x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps on your image or "
                        "latent and plots paper 1's Fig. 2b/2c ('Add_Noise'): the norms of the low/high parts of the "
                        "signal and of the noise, and the relative change of each part — high frequencies drown "
                        "early, low frequencies (the shape) survive until the end. No sampling needed.",
            inputs=[
                io.Image.Input("image", optional=True,
                               tooltip="An image (e.g. a photo). Analysed in pixel space (scaled to -1..1), or in the "
                                       "latent space of the VAE if one is connected (the paper's setting)."),
                io.Latent.Input("latent", optional=True,
                                tooltip="A latent instead of an image (exactly one of the two)."),
                io.Vae.Input("vae", optional=True,
                             tooltip="With an image: encode it to this VAE's latent space first. With a latent: decode "
                                     "the grid (else approximate colours)."),
                io.Model.Input("model", optional=True,
                               tooltip="Source of the noise schedule (schedule 'from_model') and of the latent scaling "
                                       "(latent_format 'from_model')."),
                io.Combo.Input("schedule", options=list(SCHEDULE_OPTIONS), default="sd1_scaled_linear",
                               tooltip="from_model: the connected MODEL's schedule. sd1_scaled_linear: betas "
                                       "linspace(sqrt(0.00085), sqrt(0.012), 1000)^2 (SD1/SD2/SDXL). ddpm_linear: "
                                       "linspace(1e-4, 0.02, 1000). cosine: Nichol & Dhariwal. rectified_flow: "
                                       "x_t = (1-t) x0 + t eps. sd3_flow_shift3: SD3's shifted flow. Flow schedules "
                                       "are shown in variance-preserving form (same signal-to-noise ratio)."),
                io.Combo.Input("latent_format", options=list(LATENT_FORMAT_OPTIONS), default="from_model",
                               tooltip="How a latent (or the VAE encoding of the image) is scaled into the diffusion "
                                       "model's space before noising (SD1 multiplies by 0.18215, ...). from_model uses "
                                       "the connected MODEL; as_is uses the latent unchanged."),
                io.Float.Input("threshold", default=DEFAULT_THRESHOLD, min=0.001, max=0.999, step=0.01,
                               tooltip=_THRESHOLD_TOOLTIP),
                io.Int.Input("points", default=50, min=2, max=1000,
                             tooltip="Timesteps evaluated, evenly spaced over the schedule (50 = the paper's 50 DDIM "
                                     "steps, t = 20, 40, ..., 1000)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=False,
                             tooltip="Seed of the Gaussian noise eps."),
                io.Int.Input("grid_columns", default=6, min=1, max=20,
                             tooltip="Timesteps shown in the grid (evenly spaced, first and last included)."),
            ],
            outputs=[
                io.Image.Output("grid", display_name="grid", tooltip="Rows x_t, x_t low, x_t high over timesteps."),
                io.Image.Output("plots", display_name="plots",
                                tooltip="Two plots: RMS of signal/noise parts; relative change of the parts."),
                io.String.Output("stats", display_name="stats_json", tooltip="All numbers as JSON."),
            ],
        )

    @classmethod
    def execute(cls, image=None, latent=None, vae=None, model=None, schedule="sd1_scaled_linear",
                latent_format="from_model", threshold=DEFAULT_THRESHOLD, points=50, seed=0,
                grid_columns=6) -> io.NodeOutput:
        threshold = validate_threshold(threshold)
        if (image is None) == (latent is None):
            raise ValueError("FrequencyNoisingAnalysis needs exactly one of image or latent: connect an IMAGE (e.g. "
                             "LoadImage) or a LATENT, not " + ("both." if image is not None else "neither."))
        if schedule == "from_model":
            if model is None:
                raise ValueError("schedule 'from_model' needs the model input: connect a MODEL or pick a named "
                                 "schedule (e.g. sd1_scaled_linear).")
            sched = model_schedule(model.get_model_object("model_sampling"), points)
        else:
            sched = named_schedule(schedule, points)
        space = "pixel" if image is not None and vae is None else "latent"
        fmt = None
        if space == "latent":
            if latent_format == "from_model" and model is None:
                raise ValueError("latent_format 'from_model' needs the model input to scale the latent into the "
                                 "diffusion model's space: connect the MODEL or pick sd1/sdxl/sd3/flux/as_is.")
            fmt = _resolve_latent_format(latent_format, model)
        if image is not None:
            _check_tensor(image, "image")
            if space == "pixel":
                x0 = image[..., :3].movedim(-1, 1).float() * 2.0 - 1.0
            else:
                with torch.no_grad():
                    x0 = vae.encode(image[..., :3]).detach().float().cpu()
        else:
            x0 = _latent_samples(latent, "latent").float().cpu()
            _check_tensor(x0, "latent")
        if fmt is not None:
            x0 = fmt.process_in(x0)
        gen = torch.Generator(device="cpu").manual_seed(int(seed) & 0xFFFFFFFFFFFFFFFF)
        noise = torch.randn(x0.shape, generator=gen, dtype=torch.float32)
        curves = noising_curves(x0, noise, sched, threshold)
        curves.update({"schedule": sched.name, "schedule_kind": sched.kind, "space": space, "threshold": threshold,
                       "low_radius_cycles_per_pixel": low_radius(threshold), "shape": list(x0.shape),
                       "seed": int(seed)})
        text = noising_text(curves, space)
        curves["summary"] = text
        grid = noising_grid(x0, noise, sched, int(grid_columns), threshold, space, vae, fmt)
        plots = noising_plots(curves, sched.name)
        preview = imaging.stack_padded([grid, plots[0:1], plots[1:2]])
        return io.NodeOutput(grid, plots, to_json(curves), ui=_ui(preview, text, cls))


NODES = [FrequencySplitPreview, FrequencySplitViewer, FrequencySplit, FrequencySplitImage, FrequencyMerge,
         FrequencyMergeImage, FrequencyNoisingAnalysis]
