"""The pack's drawing library: line plots, labelled grids, colour maps and overlays, captions, conversions
between IMAGE tensors ([N, H, W, 3] in 0..1) and PIL images, and quick latent previews."""

from __future__ import annotations

import functools
import math
import textwrap

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont


@functools.lru_cache(maxsize=8)
def font(size: int = 13):
    """Pillow's default font at ``size`` px (a fixed bitmap font on Pillow < 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def stack_padded(images: list[torch.Tensor]) -> torch.Tensor:
    """IMAGE tensors [1, H, W, 3] of different sizes -> one batch, padded white at the right and bottom."""
    h = max(int(i.shape[1]) for i in images)
    w = max(int(i.shape[2]) for i in images)
    out = torch.ones(len(images), h, w, 3)
    for k, img in enumerate(images):
        out[k, :img.shape[1], :img.shape[2]] = img[0]
    return out


COLORS = {"low": (31, 119, 180), "high": (214, 39, 40), "low2": (44, 160, 44), "high2": (255, 127, 14),
          "grey": (120, 120, 120)}


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
              hlines=(), vlines=(), message: str = "") -> Image.Image:
    """A line plot drawn with PIL. ``series``: iterable of (label, xs, ys, color, dashed). Points with
    non-finite y (and y <= 0 on a log axis) are skipped. ``hlines``/``vlines``: (value, label, color).
    ``message``: lines written in the plot area (what the plot covers, or why it has no curve)."""
    w, h = size
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    face, small = font(14), font(11)
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
    tw, _ = _text_size(d, title, face)
    d.text(((w - tw) / 2, 8), title, fill=(0, 0, 0), font=face)
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
    per_line = max(20, int(10 * (pw - 16) / max(1, _text_size(d, "abcdefghij", small)[0])))
    lines = [part for m in message.splitlines() for part in textwrap.wrap(m, per_line)]
    for k, line in enumerate(lines):
        xy = (left + 8, top + ph - 16 * (len(lines) - k) - 4)
        tw, th = _text_size(d, line, small)
        d.rectangle([xy[0] - 2, xy[1], xy[0] + tw + 2, xy[1] + th + 4], fill=(255, 255, 255))
        d.text(xy, line, fill=(150, 30, 30), font=small)
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
    face = font(12)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max([_text_size(probe, s, face)[0] for s in row_labels] + [0]) + 2 * gap
    line_h = _text_size(probe, "Ag", face)[1] + 3
    header_h = max([len(s.split("\n")) for s in col_labels] + [1]) * line_h + gap
    # columns at least as wide as their labels (small latents decode to small cells)
    col_w = max([w] + [_text_size(probe, line, face)[0] + gap for s in col_labels for line in s.split("\n")])
    width = label_w + cols * col_w + (cols - 1) * gap + gap
    height = header_h + rows * h + (rows - 1) * gap + gap
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    for c, lab in enumerate(col_labels):
        for k, line in enumerate(lab.split("\n")):
            d.text((label_w + c * (col_w + gap), gap // 2 + k * line_h), line, fill=(0, 0, 0), font=face)
    for r, lab in enumerate(row_labels):
        th = _text_size(d, lab, face)[1]
        d.text((gap, header_h + r * (h + gap) + (h - th) // 2), lab, fill=(0, 0, 0), font=face)
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



def side_by_side(left: Image.Image, right: Image.Image, gap: int = 4) -> Image.Image:
    out = Image.new("RGB", (left.width + gap + right.width, max(left.height, right.height)), (0, 0, 0))
    out.paste(left, (0, 0))
    out.paste(right, (left.width + gap, 0))
    return out




_INFERNO = np.array([[0, 0, 4], [31, 12, 72], [85, 15, 109], [136, 34, 106], [186, 54, 85], [227, 89, 51],
                     [249, 140, 10], [249, 201, 50], [252, 255, 164]], dtype=np.float32) / 255.0


def colormap(values: torch.Tensor) -> torch.Tensor:
    """(..., H, W) in [0, 1] -> (..., H, W, 3) with an inferno-like colour map."""
    x = values.clamp(0, 1).float() * (len(_INFERNO) - 1)
    lo = x.floor().long().clamp(max=len(_INFERNO) - 2)
    frac = (x - lo.float())[..., None]
    lut = torch.from_numpy(_INFERNO)
    return lut[lo] * (1 - frac) + lut[lo + 1] * frac


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) -> (N, H, W) bilinear."""
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def overlay(image: torch.Tensor, values: torch.Tensor, strength: float = 0.75) -> torch.Tensor:
    """Image (H, W, 3) under colour-mapped values (N, H, W) in [0, 1]: opaque where the map is high."""
    a = (strength * values)[..., None]
    return (image[None] * (1 - a) + colormap(values) * a).clamp(0, 1)


def caption(img: torch.Tensor, text: str) -> torch.Tensor:
    """Draw ``text`` on a dark band in the top-left corner of an image (H, W, 3)."""
    pil = Image.fromarray((img.clamp(0, 1).numpy() * 255).astype(np.uint8))
    d = ImageDraw.Draw(pil)
    face = font(max(10, min(16, pil.width // 14)))
    box = d.textbbox((3, 2), text, font=face)
    d.rectangle([0, 0, box[2] + 3, box[3] + 3], fill=(0, 0, 0))
    d.text((3, 2), text, fill=(255, 255, 255), font=face)
    return torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0)


def cell_size(h: int, w: int, lo: int = 128, hi: int = 256) -> tuple[int, int]:
    s = min(max(max(h, w), lo), hi) / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))



def bar_chart(labels: list[str], values: list[float], highlight: list[bool], title: str, footer: str) -> torch.Tensor:
    """Horizontal bar chart (one row per label, highlighted rows orange) as an IMAGE [1, H, W, 3]."""
    face = font()
    row_h, label_w, bar_w, pad = 16, 190, 360, 10
    width = label_w + bar_w + 70 + 2 * pad
    height = 2 * pad + 22 + row_h * len(values) + 18
    img = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    draw.text((pad, pad), title, fill=(20, 20, 20), font=face)
    lo, hi = min(0.0, min(values)), max(0.0, max(values))
    span = (hi - lo) or 1.0
    x0 = pad + label_w + int(round((0 - lo) / span * bar_w))
    top = pad + 22
    for i, (label, value, hot) in enumerate(zip(labels, values, highlight, strict=True)):
        y = top + i * row_h
        draw.text((pad, y + 2), label, fill=(30, 30, 30), font=face)
        x1 = pad + label_w + int(round((value - lo) / span * bar_w))
        colour = (214, 96, 39) if hot else (70, 120, 180)
        draw.rectangle([min(x0, x1), y + 3, max(x0, x1, min(x0, x1) + 1), y + row_h - 3], fill=colour)
        draw.text((pad + label_w + bar_w + 6, y + 2), f"{value:+.3f}", fill=(30, 30, 30), font=face)
    draw.line([x0, top - 2, x0, top + row_h * len(values)], fill=(0, 0, 0), width=1)
    draw.text((pad, height - pad - 10), footer, fill=(90, 90, 90), font=face)
    return pil_to_image([img])


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
