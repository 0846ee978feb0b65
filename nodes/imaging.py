"""Small PIL/tensor helpers shared by the nodes that draw IMAGE outputs (plots, grids, captions)."""

from __future__ import annotations

import functools

import torch
from PIL import ImageFont


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
