"""Benchmark: CrossAttentionCapture (per-frame maps) on a full-width, reduced-depth random Wan 2.1 14B at 33 frames x
480p (GPU; CPU with --small).

Model: ComfyUI's WAN21_T2V config and WanModel, built as scripts/tiny_models.py's ``_wan`` builds its tiny one
(``_diffusion``: every parameter and every buffer torch.empty left initialised from a seeded generator), at Wan 2.1
14B width: dim 5120, 40 heads (head dim 128), ffn 13824, freq_dim 256, text_dim 4096, text_len 512, patch (1, 2, 2),
qk_norm, cross_attn_norm; --blocks blocks (default 2). Random conditioning: 512 tokens x 4096 (UMT5-XXL width)
for positive and negative; cfg 5, so every model call has 2 rows (cond + uncond). Latent 1 x 16 x 9 x 60 x 104
(33 frames -> 9 latent frames, 480 x 832 px -> 60 x 104; 9 x 30 x 52 = 14,040 video tokens). bf16 weights on
CUDA, fp32 on the CPU. Euler, --steps steps (default 8).

Plain sampling vs sampling with ``install_capture(model, "all")`` (what the CrossAttentionCapture node runs;
Wan: the cross-attention of every block, maps kept per latent frame), --repeats interleaved rounds after a
warm-up of each, medians:
  overhead            = t(capture) / t(plain) - 1                        (target <= 0.15)
  hook_share          = time inside the capture's attention override / t(plain), from one extra captured run
                        with synchronising timers
  blocks_share        = time inside the transformer blocks / t(plain), from one extra plain run (synchronised
                        forward hooks)
  overhead_vs_block_time = (t(capture) - t(plain)) / time in the blocks; it still holds the per-run costs below,
                        which do not grow with depth or steps, so it overstates a full-depth run
  finish_share        = the record's end-of-run copy to the CPU / t(plain) (once per run, from the timed run)
  tracking_overhead   = t(model with only the pack's run and layer tracking) / t(plain) - 1 (interleaved too)
  bit_identical       = every captured (and later plain) latent equals the first plain one bit for bit
  record_mb           = bytes the finished record keeps (per-frame accumulators), MiB
  peak_extra_mb       = the capture's own accounting: accumulators + largest temporaries of one layer, MiB
  cuda_peak_extra_mb  = median max_memory_allocated(capture run) - median of the plain runs (reset before each)
block_tflop_per_step counts the blocks' matrix FLOPs of one step (2 rows); achieved_tflops = that x steps / t(plain).
Ratios are measured in one run; nothing asserts an absolute time.

    python bench/bench_capture_wan.py [--small] [--blocks 2] [--steps 8] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import sys
import time

from common import (
    add_run_arguments,
    announce_build,
    capture_vs_plain,
    cuda_sync,
    device_patcher,
    report,
    run_settings,
)

FULL = {"dim": 5120, "heads": 40, "ffn": 13824, "text_dim": 4096, "text_len": 512, "frames": 9, "h": 60, "w": 104}
SMALL = {"dim": 256, "heads": 2, "ffn": 512, "text_dim": 256, "text_len": 64, "frames": 3, "h": 16, "w": 24}


def build(size: dict, blocks: int, dtype):
    """ModelPatcher (on ComfyUI's device) of a random WAN21_T2V model: tiny_models._wan's config at ``size``."""
    import tiny_models  # scripts/ is on sys.path after setup

    _, model = tiny_models._diffusion("WAN21_T2V", {
        "model_type": "t2v", "patch_size": [1, 2, 2], "text_len": 512, "in_dim": 16, "dim": size["dim"],
        "ffn_dim": size["ffn"], "freq_dim": 256, "text_dim": size["text_dim"], "out_dim": 16,
        "num_heads": size["heads"], "num_layers": blocks, "window_size": [-1, -1], "qk_norm": True,
        "cross_attn_norm": True, "eps": 1e-6,
    }, 0, dtype)
    model.diffusion_model.patch_embedding.float()  # ComfyUI builds it in float32 and feeds it x.float()
    return device_patcher(model)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true",
                    help="CPU check: dim 256, 2 heads, 64 text tokens, latent 3 x 16 x 24, 2 steps")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--frames", type=int, default=None, help="latent frames (default 9 = 33 video frames)")
    ap.add_argument("--latent-hw", type=int, nargs=2, default=None, metavar=("H", "W"),
                    help="latent height and width (default 60 104 = 480 x 832 px; --small 16 24)")
    add_run_arguments(ap)
    args = ap.parse_args(argv)
    sys.argv = sys.argv[:1]
    t_start = time.perf_counter()
    device, cuda, dtype, steps, repeats = run_settings(args)
    import torch

    import nodes as comfy_nodes

    size = SMALL if args.small else FULL
    frames = args.frames or size["frames"]

    t0 = time.perf_counter()
    model = build(size, args.blocks, dtype)
    t_build = time.perf_counter() - t0
    n_params = announce_build("wan21_t2v", model, t_build, dtype, device)

    g = torch.Generator().manual_seed(0)
    pos, neg = ([[torch.randn(1, size["text_len"], size["text_dim"], generator=g), {}]] for _ in range(2))
    h, w = args.latent_hw or (size["h"], size["w"])
    shape = (1, 16, frames, h, w)
    latent = {"samples": torch.zeros(shape)}

    def sample(m):
        (out,) = comfy_nodes.common_ksampler(m, 0, steps, 5.0, "euler", "simple", pos, neg, latent)
        return out["samples"]

    result = {"family": "wan21_t2v", "device": str(device), "gpu": torch.cuda.get_device_name() if cuda else None,
              "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."), "small": args.small,
              "params_m": round(n_params / 1e6, 1), "dim": size["dim"], "heads": size["heads"], "ffn": size["ffn"],
              "blocks": args.blocks, "latent": list(shape),
              "video_tokens": frames * (h // 2) * (w // 2), "text_tokens": size["text_len"],
              "steps": steps, "t_build_s": round(t_build, 1)}
    blocks = list(model.model.diffusion_model.blocks)
    result.update(capture_vs_plain(model, sample, repeats, cuda, label="wan ", blocks=blocks))
    # matrix FLOPs of one step's blocks (2 rows): self-attention q/k/v/o and cross-attention q/o on the N video
    # tokens, cross k/v on the T text tokens, the FFN, and the two attention products
    n, t, d, f = result["video_tokens"], size["text_len"], size["dim"], size["ffn"]
    tflop = 2 * args.blocks * (2 * (6 * d * d * n + 2 * d * d * t + 2 * d * f * n) + 4 * n * n * d + 4 * n * t * d) / 1e12
    result.update({"block_tflop_per_step": round(tflop, 3),
                   "achieved_tflops": round(tflop * steps / result["t_plain_s"], 2)})
    cuda_sync()
    result["t_total_s"] = round(time.perf_counter() - t_start, 1)
    report(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
