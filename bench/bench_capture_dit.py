"""Benchmark: CrossAttentionCapture and TextLayerPatch on a full-width, reduced-depth random MMDiT at 1024² (GPU;
CPU with --small).

Model: ComfyUI's own classes, built as scripts/tiny_models.py builds its models (``_diffusion``: the config class
of comfy.supported_models, ``get_model``, every parameter and every buffer torch.empty left initialised from a
seeded generator), at full width and reduced depth:
  flux        Flux.1 width: hidden 3072, 24 heads (head dim 128, axes 16/56/56), mlp 4, --depth double blocks +
              --depth single blocks (default 1 + 1: the two block kinds of Flux cost the same per token),
              context_in_dim 4096 (T5-XXL), vec_in_dim 768 (CLIP-L pooled), guidance embedding
  qwen_image  Qwen-Image width: 24 heads x 128, --depth double-stream (joint) blocks, default 2, joint_attention_dim 3584
Random conditioning: --text-len tokens (default 512) for positive, negative and the TextLayerPatch target
(Flux: + pooled 768 and guidance 3.5); cfg 3.5, so every model call has 2 rows (cond + uncond). Latent
1 x 16 x 128 x 128 (1024² px -> 64 x 64 = 4,096 image tokens after 2 x 2 patches); Qwen-Image's is 5-D (T = 1).
bf16 weights on CUDA, fp32 on the CPU. Euler, --steps steps (default 8).

Capture: plain sampling vs sampling with ``install_capture(model, "all", normalise=--normalise)`` (what the
CrossAttentionCapture node runs), --repeats interleaved rounds after a warm-up of each, medians:
  overhead            = t(capture) / t(plain) - 1                        (target <= 0.15)
  hook_share          = time inside the capture's attention override / t(plain), from one extra captured run
                        with synchronising timers (what the capture itself computes, without run-to-run noise)
  blocks_share        = time inside the transformer blocks / t(plain), from one extra plain run (synchronised
                        forward hooks)
  overhead_vs_block_time = (t(capture) - t(plain)) / time in the blocks; it still holds the per-run costs below,
                        which do not grow with depth or steps, so it overstates a full-depth run
  finish_share        = the record's end-of-run copy to the CPU / t(plain) (once per run, from the timed run)
  tracking_overhead   = t(model with only the pack's run and layer tracking) / t(plain) - 1 (interleaved too)
  bit_identical       = every captured (and later plain) latent equals the first plain one bit for bit
  record_mb           = bytes the finished record keeps (accumulators), MiB
  peak_extra_mb       = the capture's own accounting: accumulators + largest temporaries of one layer, MiB
  cuda_peak_extra_mb  = median max_memory_allocated(capture run) - median of the plain runs (reset before each)
TextLayerPatch (``apply_text_layer_patch``, what the TextLayerPatch node runs) on one block (--patch-layer,
default the first), start 0 / end 0.5 of the steps: every diffusion-model call is timed with a DIFFUSION_MODEL
wrapper (synchronised), and
  patched_step_ratio   = mean time of a call on a patched step / mean plain call time  (3 rows vs 2: ~1.5 expected)
  unpatched_step_ratio = mean time of a call on an unpatched step of the patched run / plain  (~1.0 expected)
  rows_per_call_*      = rows of each call of one run (plain 2; patched 3 in the window, 2 after it)
block_tflop_per_step counts the blocks' matrix FLOPs of one step (2 rows); achieved_tflops = that x steps / t(plain).
Ratios are measured in one run; nothing asserts an absolute time.

    python bench/bench_capture_dit.py [--family flux|qwen_image] [--small] [--steps 8] [--repeats 3]
                                      [--normalise all_keys|text_keys] [--json]
"""

from __future__ import annotations

import argparse
import statistics
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

FULL = {"flux": {"width": 3072, "heads": 24, "context": 4096, "pooled": 768, "depth": 1},
        "qwen_image": {"width": 3072, "heads": 24, "context": 3584, "pooled": None, "depth": 2}}
SMALL = {"flux": {"width": 256, "heads": 2, "context": 256, "pooled": 64},
         "qwen_image": {"width": 256, "heads": 2, "context": 256, "pooled": None}}


def build(family: str, size: dict, depth: int, dtype):
    """(ModelPatcher on ComfyUI's device, unet_config) of a random model of ``family`` (tiny_models._diffusion)."""
    import tiny_models  # scripts/ is on sys.path after setup

    if family == "flux":
        unet = dict(tiny_models.FLUX_UNET, hidden_size=size["width"], num_heads=size["heads"], depth=depth,
                    depth_single_blocks=depth, context_in_dim=size["context"], vec_in_dim=size["pooled"],
                    axes_dim=[16, 56, 56], theta=10000, mlp_ratio=4.0, qkv_bias=True, guidance_embed=True)
        config = "Flux"
    else:
        unet = {"patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": depth,
                "attention_head_dim": size["width"] // size["heads"], "num_attention_heads": size["heads"],
                "joint_attention_dim": size["context"], "axes_dims_rope": [16, 56, 56]}
        config = "QwenImage"
    _, model = tiny_models._diffusion(config, unet, 0, dtype)
    return device_patcher(model), unet


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=sorted(FULL), default="flux")
    ap.add_argument("--small", action="store_true",
                    help="CPU check: width 256, 2 heads, 64 text tokens, latent 32 x 32 (256 tokens), 2 steps")
    ap.add_argument("--depth", type=int, default=None,
                    help="flux: double = single blocks (default 1); qwen_image: double-stream blocks (default 2)")
    ap.add_argument("--latent", type=int, default=None, help="latent side (default 128 = 1024 px; --small 32)")
    ap.add_argument("--text-len", type=int, default=None, help="text tokens (default 512; --small 64)")
    ap.add_argument("--patch-layer", default=None, help="TextLayerPatch layer (default double.0)")
    ap.add_argument("--skip-patch", action="store_true", help="capture only")
    ap.add_argument("--normalise", choices=("all_keys", "text_keys"), default="all_keys",
                    help="the capture's normalise input (default all_keys: the '[image]' channel, one more attention "
                         "pass per block; text_keys: over the prompt's tokens only)")
    add_run_arguments(ap)
    args = ap.parse_args(argv)
    sys.argv = sys.argv[:1]
    t_start = time.perf_counter()
    device, cuda, dtype, steps, repeats = run_settings(args)
    import torch
    from comfy.patcher_extension import WrappersMP
    from prompt_anatomy.nodes.text_layers import patch as tl

    import nodes as comfy_nodes

    size = (SMALL if args.small else FULL)[args.family]
    depth = args.depth or FULL[args.family]["depth"]
    side = args.latent or (32 if args.small else 128)
    text_len = args.text_len or (64 if args.small else 512)

    t0 = time.perf_counter()
    model, unet = build(args.family, size, depth, dtype)
    t_build = time.perf_counter() - t0
    n_params = announce_build(args.family, model, t_build, dtype, device)

    g = torch.Generator().manual_seed(0)

    def cond():
        extra = {}
        if size["pooled"]:
            extra = {"pooled_output": torch.randn(1, size["pooled"], generator=g), "guidance": 3.5}
        return [[torch.randn(1, text_len, size["context"], generator=g), extra]]

    pos, neg, tgt = cond(), cond(), cond()
    shape = (1, 16, 1, side, side) if args.family == "qwen_image" else (1, 16, side, side)
    latent = {"samples": torch.zeros(shape)}

    def sample(m):
        (out,) = comfy_nodes.common_ksampler(m, 0, steps, 3.5, "euler", "simple", pos, neg, latent)
        return out["samples"]

    result = {"family": args.family, "device": str(device), "gpu": torch.cuda.get_device_name() if cuda else None,
              "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."), "small": args.small,
              "params_m": round(n_params / 1e6, 1), "width": size["width"], "heads": size["heads"],
              "blocks": f"{depth} double + {depth} single" if args.family == "flux" else f"{depth} double-stream",
              "latent": list(shape), "image_tokens": (side // 2) ** 2, "text_tokens": text_len, "steps": steps,
              "t_build_s": round(t_build, 1)}
    dm = model.model.diffusion_model
    blocks = ([*dm.double_blocks, *dm.single_blocks] if args.family == "flux" else list(dm.transformer_blocks))
    result["normalise"] = args.normalise
    result.update(capture_vs_plain(model, sample, repeats, cuda, label=f"{args.family} ", blocks=blocks,
                                   normalise=args.normalise))
    # matrix FLOPs of one step's blocks (2 rows): each block is 12 d^2 weights per token (Flux double = single,
    # Qwen-Image alike) plus 4 L^2 d for the joint attention over L = image + text tokens
    seq, d = (side // 2) ** 2 + text_len, size["width"]
    tflop = 2 * len(blocks) * (2 * 12 * d * d * seq + 4 * seq * seq * d) / 1e12
    result.update({"block_tflop_per_step": round(tflop, 3),
                   "achieved_tflops": round(tflop * steps / result["t_plain_s"], 2)})

    if not args.skip_patch:
        layer = args.patch_layer or "double.0"
        calls: list[tuple[str, int, float]] = []

        def timed_model(tag):
            def wrapper(executor, x, *a, **kw):
                cuda_sync()
                start = time.perf_counter()
                out = executor(x, *a, **kw)
                cuda_sync()
                calls.append((tag, int(x.shape[0]), time.perf_counter() - start))
                return out
            return wrapper

        plain = model.clone()
        plain.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "bench.step_time", timed_model("plain"))
        patched, _ = tl.apply_text_layer_patch(model, tgt, layer, start_percent=0.0, end_percent=0.5)
        patched = patched.clone()
        patched.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "bench.step_time", timed_model("patched"))
        sample(plain)  # warm-up of each (the patched run's 3-row calls allocate anew)
        sample(patched)
        calls.clear()
        rows: dict[str, list[int]] = {}
        for r in range(repeats):
            for tag, m in ((("plain", plain), ("patched", patched)) if r % 2 == 0 else
                           (("patched", patched), ("plain", plain))):
                n0 = len(calls)
                sample(m)
                rows.setdefault(tag, [c[1] for c in calls[n0:]])
        t_plain = [c[2] for c in calls if c[0] == "plain"]
        t_in = [c[2] for c in calls if c[0] == "patched" and c[1] > 2]
        t_out = [c[2] for c in calls if c[0] == "patched" and c[1] <= 2]
        base = statistics.fmean(t_plain)
        result.update({
            "patch_layer": layer, "patch_window": [0.0, 0.5],
            "rows_per_call_plain": rows["plain"], "rows_per_call_patched": rows["patched"],
            "t_plain_call_ms": round(base * 1e3, 2),
            "patched_step_ratio": round(statistics.fmean(t_in) / base, 4) if t_in else None,
            "unpatched_step_ratio": round(statistics.fmean(t_out) / base, 4) if t_out else None,
        })
    cuda_sync()
    result["t_total_s"] = round(time.perf_counter() - t_start, 1)
    report(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
