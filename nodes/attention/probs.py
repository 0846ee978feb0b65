"""Pure tensor functions of the attention capture: attention probabilities computed explicitly in chunks, folding
of repeated contexts, grids, step buckets and memory accounting."""

from __future__ import annotations

import math
from collections import deque

import torch
import torch.nn.functional as F

from ..core.errors import InternalError

CHUNK_ELEMENTS = 1 << 23  # logits per chunk on the CPU (32 MiB in fp32), queries x keys x heads x rows
GPU_CHUNK_ELEMENTS = 1 << 26  # on an accelerator (256 MiB in fp32): fewer, larger kernels


def heads_first(t: torch.Tensor, heads: int, skip_reshape: bool) -> torch.Tensor:
    """Attention input -> (B, H, L, D): ComfyUI passes (B, L, H*D) (UNet, SD3), (B, L, H, D) (SD3 v) or,
    with skip_reshape, (B, H, L, D) (Flux)."""
    if skip_reshape:
        return t
    if t.ndim == 4:
        return t.transpose(1, 2)
    b, n, hd = t.shape
    return t.reshape(b, n, heads, hd // heads).transpose(1, 2)


def mask_rows(mask: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    if mask is None:
        return None
    m = mask
    if m.ndim == 2:
        m = m[None, None]
    elif m.ndim == 3:
        m = m[:, None]
    if m.shape[0] > 1:
        m = m[rows]
    return m


def attention_probs(q: torch.Tensor, k: torch.Tensor, *, queries: tuple[int, int] | None = None,
                    columns: tuple[int, int] | None = None, other: bool = False, mask: torch.Tensor | None = None,
                    budget: int | None = None, stats: dict | None = None) -> torch.Tensor:
    """Head-averaged softmax(q kᵀ / √d) in fp32, computed in chunks of heads and queries.

    ``q``, ``k``: (B, H, L, D). ``queries``: the query rows to keep (start, stop). ``columns``: the key columns
    to return (start, stop), normalised over *all* keys; with ``other`` one more column holds the weight on
    every key outside ``columns``. ``mask``: the attention mask the backend got (bool: True = attend; float:
    added to the logits), broadcastable to (B, H, Lq, Lk). Returns (B, n_queries, n_columns [+1]). ``budget``:
    logits per chunk (default by device: :data:`CHUNK_ELEMENTS`, :data:`GPU_CHUNK_ELEMENTS`).
    ``stats["transient"]`` gets the largest number of bytes held by the temporaries of one chunk."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    q0, q1 = queries if queries is not None else (0, lq)
    c0, c1 = columns if columns is not None else (0, lk)
    nq, nc = q1 - q0, c1 - c0
    scale = d ** -0.5
    out = torch.zeros(b, nq, nc + (1 if other else 0), device=q.device, dtype=torch.float32)
    kf = k.float()
    budget = budget or (CHUNK_ELEMENTS if q.device.type == "cpu" else GPU_CHUNK_ELEMENTS)
    per_head = b * nq * lk
    if per_head <= budget:
        hc, qc = max(1, min(h, budget // per_head)), nq
    else:
        hc, qc = 1, max(1, budget // max(1, b * lk))
    peak = 0
    for h0 in range(0, h, hc):
        kh = kf[:, h0:h0 + hc].transpose(-1, -2)
        for i0 in range(0, nq, qc):
            i1 = min(nq, i0 + qc)
            logits = torch.matmul(q[:, h0:h0 + hc, q0 + i0:q0 + i1].float(), kh)
            logits.mul_(scale)
            if mask is not None:
                m = mask if mask.shape[-2] == 1 else mask[..., q0 + i0:q0 + i1, :]
                m = m[:, h0:h0 + hc] if m.ndim == 4 and m.shape[1] > 1 else m  # a per-head mask: this chunk's heads
                if m.dtype == torch.bool:
                    logits.masked_fill_(~m, float("-inf"))
                else:
                    logits.add_(m.float())
            p = torch.softmax(logits, dim=-1)
            if mask is not None:
                p.nan_to_num_(0.0)  # a query with every key masked attends to nothing
            out[:, i0:i1, :nc] += p[..., c0:c1].sum(1)
            if other:
                out[:, i0:i1, nc] += p[..., :c0].sum((1, -1)) + p[..., c1:].sum((1, -1))
            peak = max(peak, 2 * logits.numel() * 4)
            del logits, p
    out.div_(h)
    if stats is not None:
        stats["transient"] = max(stats.get("transient", 0), peak + kf.numel() * 4 * (k.dtype != torch.float32)
                                 + out.numel() * 4)
    return out


def joint_text_probs(q: torch.Tensor, k: torch.Tensor, queries: tuple[int, int], columns: tuple[int, int],
                     mask: torch.Tensor | None = None, stats: dict | None = None) -> torch.Tensor:
    """Head-averaged softmax(q kᵀ / √d) of joint attention on the text ``columns`` only, normalised over *all*
    keys, plus one last column with the weight on every other key: (B, n_queries, n_columns + 1), like
    ``attention_probs(..., other=True)`` without the (queries x all keys) probabilities.

    p(column) = softmax over the text columns alone (fp32, exact) x the text's share of the whole softmax, and that
    share is one fused attention call over all keys with a value that is 1 on the text keys and 0 elsewhere (the
    backend's own kernel: fp32 softmax statistics, the output in q's dtype). The image keys' logits are never
    materialised, so on a GPU this costs about one attention pass of the captured rows."""
    b, h, _, d = q.shape
    q0, q1 = queries
    c0, c1 = columns
    nq, nc = q1 - q0, c1 - c0
    qs = q[:, :, q0:q1]
    m = None if mask is None else (mask if mask.shape[-2] == 1 else mask[..., q0:q1, :])
    value = torch.zeros(b, h, k.shape[2], d, device=k.device, dtype=q.dtype)
    value[:, :, c0:c1, 0] = 1
    share = F.scaled_dot_product_attention(qs, k.to(q.dtype), value, attn_mask=m)[..., 0].float()  # (B, H, nq)
    share.nan_to_num_(0.0)  # a query with every key masked attends to nothing
    out = torch.zeros(b, nq, nc + 1, device=q.device, dtype=torch.float32)
    hc = max(1, min(h, CHUNK_ELEMENTS // max(1, b * nq * nc)))
    peak = value.numel() * value.element_size()
    for h0 in range(0, h, hc):
        logits = torch.matmul(qs[:, h0:h0 + hc].float(), k[:, h0:h0 + hc, c0:c1].float().transpose(-1, -2))
        logits.mul_(d ** -0.5)
        if m is not None:
            mc = m[..., c0:c1]
            mc = mc if mc.shape[1] == 1 else mc[:, h0:h0 + hc]
            logits = logits.masked_fill(~mc, float("-inf")) if mc.dtype == torch.bool else logits + mc.float()
        p = torch.softmax(logits, dim=-1).nan_to_num_(0.0)  # a query with every text key masked: no weight
        out[:, :, :nc] += (p * share[:, h0:h0 + hc, :, None]).sum(1)
        peak = max(peak, 2 * logits.numel() * 4)
        del logits, p
    out[:, :, nc] = (1.0 - share).sum(1)
    out.div_(h)
    if stats is not None:
        stats["transient"] = max(stats.get("transient", 0), peak + out.numel() * 4)
    return out


def fold_repeats(p: torch.Tensor, length: int) -> torch.Tensor:
    """(..., m * length) -> (..., length): a context repeated m times (ComfyUI's LCM padding) folded back, the
    repeats of each token summed."""
    total = p.shape[-1]
    if total == length:
        return p
    if total % length:
        raise ValueError(f"internal: a context of {total} tokens is not a repeat of {length} tokens")
    return p.reshape(*p.shape[:-1], total // length, length).sum(-2)


def to_grid(p: torch.Tensor, *dims: int) -> torch.Tensor:
    """(B, h*w, C) query-major probabilities -> maps (B, C, h, w); video: dims (frames, h, w)."""
    b, n, c = p.shape
    if n != math.prod(dims):
        raise InternalError(f"{n} queries do not form a {'x'.join(map(str, dims))} grid")
    return p.transpose(1, 2).reshape(b, c, *dims)


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Maps (B, C, h, w) on another grid: bilinear up, area down. Both are convex combinations of the input
    pixels, so maps that sum to 1 over C at each pixel still do."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    if maps.shape[-2] <= size[0] and maps.shape[-1] <= size[1]:
        return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    return F.interpolate(maps, size=size, mode="area")


def bucket_of(step: int, n_steps: int, n_buckets: int) -> int:
    """Bucket of ``step``: bucket j holds steps [ceil(j n / b), ceil((j + 1) n / b))."""
    return min(n_buckets - 1, max(0, (int(step) * n_buckets) // max(1, n_steps)))


def bucket_ranges(n_steps: int, n_buckets: int) -> list[tuple[int, int]]:
    """(first, last) step of each bucket (inclusive)."""
    out = []
    for j in range(n_buckets):
        steps = [s for s in range(n_steps) if bucket_of(s, n_steps, n_buckets) == j]
        out.append((steps[0], steps[-1]) if steps else (-1, -1))
    return out


def tensor_bytes(obj, _seen=None) -> int:
    """Bytes of every tensor reachable from ``obj`` (attributes, dicts, lists, tuples), each counted once."""
    seen = _seen if _seen is not None else set()
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple, set, deque)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
        return sum(tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


