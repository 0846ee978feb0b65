"""What a capture run accumulates and publishes: ``MapSums``, the fixed-size running sums of one prompt length's
maps (per layer, per step bucket, per step), and ``AttentionRun``, the finished run on the CPU that the
``PA_ATTENTION_RECORD`` handle keeps for the viewer, with ``context_print``, the fingerprint the viewer uses to
check that its text is the recorded prompt."""

from __future__ import annotations

import dataclasses

import torch

from .probs import resize_maps


class MapSums:
    """Running sums of the maps of one conditioning group (prompts of one token count) for a run."""

    def __init__(self, length: int, extra: bool, batch: int, ref_hw: tuple[int, ...], n_steps: int,
                 n_buckets: int, device):
        self.length = length  # text tokens of the prompt
        self.extra = extra  # one more channel: weight on non-text keys (DiT)
        self.batch = batch
        self.ref_hw = tuple(ref_hw)  # (h, w), or (frames, h, w) for video
        channels = length + (1 if extra else 0)
        self.bucket_sum = torch.zeros(n_buckets, batch, channels, *ref_hw, device=device)
        self.bucket_count = torch.zeros(n_buckets, dtype=torch.int64)
        self.step_sum = torch.zeros(n_steps, batch, channels, device=device)
        self.step_count = torch.zeros(n_steps, dtype=torch.int64)
        self.layer_sum: dict[str, torch.Tensor] = {}
        self.layer_count: dict[str, int] = {}

    @property
    def channels(self) -> int:
        return self.length + (1 if self.extra else 0)

    @property
    def video(self) -> bool:
        return len(self.ref_hw) == 3

    def add(self, layer: str, step: int, bucket: int, maps: torch.Tensor) -> int:
        """Add maps (batch, channels, h, w) — video: (batch, channels, frames, h, w) — of one layer evaluation;
        returns bytes of the temporaries."""
        per_layer = maps.mean(dim=2) if self.video else maps  # video: per-layer sums keep the frame mean
        total = self.layer_sum.get(layer)
        if total is None:
            self.layer_sum[layer] = per_layer.clone()
            self.layer_count[layer] = 1
        else:
            total += per_layer
            self.layer_count[layer] += 1
        self.step_sum[step] += maps.mean(dim=tuple(range(2, maps.ndim)))
        self.step_count[step] += 1
        ref = maps if self.video else resize_maps(maps, self.ref_hw)
        self.bucket_sum[bucket] += ref
        self.bucket_count[bucket] += 1
        return ref.numel() * 4 if ref is not maps else 0

    def to_cpu(self) -> MapSums:
        self.bucket_sum = self.bucket_sum.cpu()
        self.step_sum = self.step_sum.cpu()
        self.layer_sum = {k: v.cpu() for k, v in self.layer_sum.items()}
        return self

    # ---- views used by the viewer and the tests
    def mean(self) -> torch.Tensor:
        """Whole-run mean on the reference grid (batch, channels, H, W); video: (batch, channels, frames, H, W)."""
        n = int(self.bucket_count.sum())
        return self.bucket_sum.sum(0) / max(1, n)

    def bucket_mean(self, j: int) -> torch.Tensor | None:
        n = int(self.bucket_count[j])
        return None if n == 0 else self.bucket_sum[j] / n

    def layer_mean(self, layer: str) -> torch.Tensor:
        return self.layer_sum[layer] / self.layer_count[layer]

    def step_share(self) -> torch.Tensor:
        """Per step, each channel's spatial-mean weight (steps, batch, channels); NaN for steps not seen."""
        counts = self.step_count.to(self.step_sum.dtype).clamp(min=1)[:, None, None]
        out = self.step_sum / counts
        out[self.step_count == 0] = float("nan")
        return out

    def token_share(self) -> torch.Tensor:
        """Whole-run spatial-mean weight of each channel (batch, channels)."""
        return self.step_sum.sum(0) / max(1, int(self.step_count.sum()))


@dataclasses.dataclass
class AttentionRun:
    """What one sampling run leaves in the record (CPU tensors)."""

    family: str
    arch: str
    rows: str
    layers: list[str]  # chosen layer labels
    all_layers: int
    seen: dict[str, int]  # label -> evaluations captured through the attention override
    fallback: dict[str, int]  # label -> evaluations recomputed from to_q / to_k (an attn2 replace was there)
    missing: list[str]  # chosen layers never seen
    skipped: dict[str, int]
    errors: list[str]
    n_steps: int
    buckets: list[tuple[int, int]]
    ref_hw: tuple[int, ...]  # (h, w), or (frames, h, w) for video records
    sums: dict[int, MapSums]  # by text token count
    final: torch.Tensor  # the sampler's output latent (CPU fp32)
    latent_format: object
    sampler: str | None
    peak_bytes: int  # accumulators + the largest temporaries of one layer evaluation
    # text token count -> fingerprints of the captured prompts' contexts (context_print), to check viewer labels
    contexts: dict[int, list[torch.Tensor]] = dataclasses.field(default_factory=dict)
    normalise: str = "all_keys"  # CrossAttentionCapture's normalise: over every key / over the prompt's tokens only

    @property
    def batch(self) -> int:
        return int(self.final.shape[0])

    @property
    def video(self) -> bool:
        return len(self.ref_hw) == 3


PRINT_CHANNELS = 64


def context_print(context: torch.Tensor) -> torch.Tensor:
    """A small fingerprint of a prompt's text context (first batch row, at most PRINT_CHANNELS evenly spaced
    channels, fp32 CPU): a CONDITIONING carries no token ids, so the viewer checks its text by re-encoding it
    and comparing these values position by position."""
    ctx = context[0].detach()
    idx = torch.linspace(0, ctx.shape[-1] - 1, min(ctx.shape[-1], PRINT_CHANNELS)).round().long()
    return ctx[:, idx.to(ctx.device)].to("cpu", torch.float32, copy=True)
