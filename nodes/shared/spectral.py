"""The pack's one spectral split (paper 1, Sec. 4.2, Fig. 2, Prop. 1).

:func:`split_frequencies` is a radial mask in normalised frequency (cycles per pixel, so the Nyquist frequency is
0.5 along both axes whatever the size). The ``threshold`` is the fraction of the spectrum that counts as "low" —
"the lowest 20 % parts of spectrum" of the paper: the low band is the disc |f| <= r centred on DC whose area is
``threshold`` of the normalised spectrum [-0.5, 0.5]^2 (r = sqrt(threshold / pi) = 0.252 cycles/pixel for 0.2;
past threshold pi/4 the disc is clipped by the square and r comes from inverting the clipped area). On a
discrete M x N grid the low band therefore holds ``threshold`` of the Fourier bins up to rounding. The mask is
point-symmetric, so the low part is a real orthogonal projection: ``low = P x``, ``high = x - low``,
``low + high == x`` to float precision and ``||x||^2 = ||low||^2 + ||high||^2``.

**Space and time.** Video latents ``(B, C, T, H, W)`` are split frame by frame by default (``mode`` "per_frame": the
2-D split over H, W of every frame). ``mode`` "space_time" splits them with a 3-D FFT over frames, height and width:
the low band is the ball |f| <= r (f in cycles per frame / pixel, Nyquist 0.5 on every axis) whose volume is
``threshold`` of the normalised spectrum [-0.5, 0.5]^3 (r = (3 threshold / 4 pi)^(1/3) = 0.363 for 0.2; past
threshold pi/6 the ball is clipped by the cube). Still a point-symmetric mask, so again an exact orthogonal split;
a slow change over the frames stays low, flicker from frame to frame goes high.
"""

from __future__ import annotations

import functools
import math

import torch

from ..core.hooks import like

DEFAULT_THRESHOLD = 0.2
SPLIT_MODES = ("per_frame", "space_time")  # how video latents (..., T, H, W) are split; images: always 2-D


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


def _bisect_radius(covered, threshold: float, lo: float, hi: float, iterations: int) -> float:
    """The radius in [lo, hi] whose ``covered(radius)`` share of the spectrum is ``threshold`` (increasing)."""
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if covered(mid) < threshold:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@functools.lru_cache(maxsize=256)
def low_radius(threshold: float) -> float:
    """Radius (cycles/pixel) of the low band: the disc covering ``threshold`` of the spectrum's area."""
    threshold = validate_threshold(threshold)
    if threshold <= math.pi / 4:
        return math.sqrt(threshold / math.pi)
    return _bisect_radius(disc_area_in_spectrum, threshold, 0.5, math.sqrt(0.5), 80)


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


def ball_volume_in_spectrum(r: float) -> float:
    """Volume of {|f| <= r} inside the normalised spectrum [-0.5, 0.5]^3 (whose volume is 1): the slices at height
    z are discs of radius sqrt(r^2 - z^2) clipped by the square (:func:`disc_area_in_spectrum`), integrated over z
    with Simpson's rule (2000 intervals; the integrand is smooth but for kinks where a slice's disc meets the
    square, error < 1e-7 measured against the closed form r <= 0.5)."""
    if r <= 0.0:
        return 0.0
    if r <= 0.5:
        return 4.0 / 3.0 * math.pi * r ** 3
    if r >= math.sqrt(0.75):
        return 1.0
    n = 2000
    zs = [-0.5 + k / n for k in range(n + 1)]
    f = [disc_area_in_spectrum(math.sqrt(max(r * r - z * z, 0.0))) if abs(z) < r else 0.0 for z in zs]
    return (1.0 / (3 * n)) * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))


@functools.lru_cache(maxsize=256)
def low_radius_3d(threshold: float) -> float:
    """Radius (cycles per frame / pixel) of the space-time low band: the ball covering ``threshold`` of the
    spectrum's volume."""
    threshold = validate_threshold(threshold)
    if threshold <= math.pi / 6:
        return (3.0 * threshold / (4.0 * math.pi)) ** (1.0 / 3.0)
    return _bisect_radius(ball_volume_in_spectrum, threshold, 0.5, math.sqrt(0.75), 60)


@functools.lru_cache(maxsize=64)
def _half_mask_3d(t: int, h: int, w: int, threshold: float, device: torch.device | None) -> torch.Tensor:
    ft = torch.fft.fftfreq(t, dtype=torch.float64)
    fy = torch.fft.fftfreq(h, dtype=torch.float64)
    fx = torch.fft.rfftfreq(w, dtype=torch.float64)
    r = torch.sqrt(ft[:, None, None] ** 2 + fy[None, :, None] ** 2 + fx[None, None, :] ** 2)
    mask = r <= low_radius_3d(threshold) * (1.0 + 1e-12)
    return mask if device is None else mask.to(device)


def low_frequency_mask_3d(t: int, h: int, w: int, threshold: float = DEFAULT_THRESHOLD, device=None) -> torch.Tensor:
    """Boolean space-time low-band mask over the rfftn spectrum of a ``t`` x ``h`` x ``w`` signal:
    ``[t, h, w // 2 + 1]``, DC at [0, 0, 0]."""
    threshold = validate_threshold(threshold)
    return _half_mask_3d(int(t), int(h), int(w), threshold, None if device is None else torch.device(device))


def validate_mode(mode: str, name: str = "video_split") -> str:
    if mode not in SPLIT_MODES:
        raise ValueError(f"{name} must be one of {', '.join(SPLIT_MODES)}, got {mode!r}.")
    return mode


def mode_for(mode: str, ndim: int) -> str:
    """The split a latent of ``ndim`` dimensions gets under the nodes' ``video_split`` setting: "space_time" only
    for video latents (B, C, T, H, W); images (B, C, H, W) have no time axis and are always split in 2-D."""
    return "space_time" if validate_mode(mode) == "space_time" and ndim >= 5 else "per_frame"


def check_tensor(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}.")
    if x.ndim < 2:
        raise ValueError(f"{name} has shape {tuple(x.shape)}: the split needs at least 2 spatial dimensions "
                         f"(..., H, W).")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}): give a batch with at least one image/latent "
                         f"of non-zero size.")


def _fft_low(x32: torch.Tensor, threshold: float, space_time: bool = False) -> torch.Tensor:
    if space_time:
        t, h, w = x32.shape[-3:]
        spec = torch.fft.rfftn(x32, dim=(-3, -2, -1))
        spec = spec * low_frequency_mask_3d(t, h, w, threshold, device=spec.device)
        return torch.fft.irfftn(spec, s=(t, h, w), dim=(-3, -2, -1))
    h, w = x32.shape[-2:]
    spec = torch.fft.rfft2(x32, dim=(-2, -1))
    spec = spec * low_frequency_mask(h, w, threshold, device=spec.device)
    return torch.fft.irfft2(spec, s=(h, w), dim=(-2, -1))


def unpatchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """``[..., C·p·p, H, W]`` latents whose channels pack p×p patches (channel c·p² + i·p + j = pixel (p·y+i, p·x+j) of
    channel c, as Flux.2's VAE packs them) -> ``[..., C, H·p, W·p]``."""
    *lead, c, h, w = x.shape
    n = len(lead)
    x = x.reshape(*lead, c // (patch * patch), patch, patch, h, w)  # [..., C, i, j, y, x]
    x = x.permute(*range(n), n, n + 3, n + 1, n + 4, n + 2)  # [..., C, y, i, x, j]
    return x.reshape(*lead, c // (patch * patch), h * patch, w * patch)


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Inverse of :func:`unpatchify`."""
    *lead, c, h, w = x.shape
    n = len(lead)
    x = x.reshape(*lead, c, h // patch, patch, w // patch, patch)  # [..., C, y, i, x, j]
    x = x.permute(*range(n), n, n + 2, n + 4, n + 1, n + 3)  # [..., C, i, j, y, x]
    return x.reshape(*lead, c * patch * patch, h // patch, w // patch)


def split_frequencies(x: torch.Tensor, threshold: float = DEFAULT_THRESHOLD,
                      patch: int = 1, mode: str = "per_frame") -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``x`` (``[..., H, W]``, any leading dims) into ``(low, high)`` over its last two dimensions.

    ``low`` keeps the Fourier coefficients inside the low band (see :func:`low_frequency_mask`), ``high``
    is ``x - low``, so ``low + high`` reproduces ``x`` to float precision. Computed in float32 on ``x``'s
    device (CPU fallback where the device has no FFT); the parts come back in ``x``'s dtype and device.
    ``patch`` > 1: the channels pack patch×patch latent pixels (Flux.2); the split runs on the unpacked latent, so
    a threshold means the same image-space band as on an unpacked model.
    ``mode`` "space_time": the 3-D split over the last three dimensions (``[..., T, H, W]`` video latents; the
    caller decides that x has a time axis); "per_frame" (default): the 2-D split over the last two."""
    space_time = validate_mode(mode, "mode") == "space_time"
    if patch > 1:
        if space_time:
            raise ValueError("A space-time split of patch-packed latents (Flux.2) is not supported: they have no "
                             "time axis; use video_split 'per_frame'.")
        low, high = split_frequencies(unpatchify(x, patch), threshold)
        return patchify(low, patch), patchify(high, patch)
    check_tensor(x, "x")
    if space_time and x.ndim < 3:
        raise ValueError(f"x has shape {tuple(x.shape)}: a space-time split needs (..., T, H, W).")
    threshold = validate_threshold(threshold)
    x32 = x.float()
    try:
        low = _fft_low(x32, threshold, space_time)
    except RuntimeError:  # e.g. MPS without FFT for some sizes: same maths on the CPU
        low = _fft_low(x32.cpu(), threshold, space_time).to(x32.device)
    high = x32 - low
    return like(low, x), like(high, x)


def merge_frequencies(low_source: torch.Tensor, high_source: torch.Tensor,
                      threshold: float = DEFAULT_THRESHOLD, patch: int = 1, mode: str = "per_frame") -> torch.Tensor:
    """Low part of ``low_source`` plus high part of ``high_source`` (same shapes). Merging the two parts of
    one split gives the input back (the split is a projection)."""
    check_tensor(low_source, "low_source")
    check_tensor(high_source, "high_source")
    if tuple(low_source.shape) != tuple(high_source.shape):
        raise ValueError(f"FrequencyMerge needs inputs of the same shape, got {tuple(low_source.shape)} (low source) "
                         f"and {tuple(high_source.shape)} (high source): resize one of them (LatentUpscale / "
                         f"ImageScale) or repeat the smaller batch (RepeatLatentBatch / RepeatImageBatch).")
    low, _ = split_frequencies(low_source, threshold, patch, mode)
    _, high = split_frequencies(high_source.to(low_source.device), threshold, patch, mode)
    return (low.float() + high.float()).to(low_source.dtype)


def fourier_energy(x: torch.Tensor) -> torch.Tensor:
    """|F(u, v)|^2 per frequency with the paper's normalisation F = (1/MN) sum x e^{-2 pi i (...)}
    (eq. 6), over the last two dims; for i.i.d. N(0, 1) noise its expectation is 1/MN at every (u, v)."""
    check_tensor(x, "x")
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


