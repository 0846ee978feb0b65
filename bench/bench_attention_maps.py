"""Benchmark: Cross-Attention Capture of all cross-attention layers vs plain KSampler on the full-size random SD1.5
(CPU or GPU).

Default: 256 x 256, batch 1 (cond + uncond = a batch of 2 per model call), 20 steps, euler, cfg 7.5, all 16
cross-attention layers, 10 step buckets. Runs, in this order: plain, capture, plain (--plain-runs 1: no second
plain run). Prints
  overhead         = t(capture) / mean(t(plain)) - 1                          (target <= 15 %)
  direct_overhead  = time spent inside the capture's hooks / mean(t(plain)), measured inside the captured run
                     itself, so it is not blurred by run-to-run noise
  plain_drift      = t(plain, 2nd) / t(plain, 1st) - 1   (how noisy this machine was)
  bit_identical    = the captured latent equals the plain one bit for bit
  record_mb        = float32 bytes the finished run keeps (accumulators), MiB
  peak_extra_mb    = accumulators + the largest temporaries of one layer evaluation (tensor-size accounting), MiB
  rss_growth_mb    = growth of the process's peak RSS during the captured run (CPU; 0 when the plain runs already
                     peaked higher), MiB
  cuda_peak_extra_mb = max_memory_allocated(capture) - max_memory_allocated(plain) (GPU only)
  viewer_s         = one CrossAttentionMapViewer render (auto tokens, with the decoded-size image)

    .venv/bin/python bench/bench_attention_maps.py [--size 256] [--steps 20] [--plain-runs 2] [--json]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

from common import encode, load_sd15, report, setup, timed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--plain-runs", type=int, choices=(1, 2), default=2,
                    help="plain runs around the captured one (1: skip the second, no plain_drift)")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    args = ap.parse_args(argv)
    sys.argv = sys.argv[:1]
    setup()
    import comfy.model_management as mm
    import torch
    from prompt_anatomy.nodes.attention import capture as cap
    from prompt_anatomy.nodes.attention import probs
    from prompt_anatomy.nodes.attention import viewer as am

    import nodes as comfy_nodes

    text = "a photo of a red fox in a snowy forest"
    model, clip, _ = load_sd15()
    pos, neg = encode(clip, text), encode(clip, "")
    latent = {"samples": torch.zeros(1, 4, args.size // 8, args.size // 8)}
    cuda = torch.cuda.is_available() and mm.get_torch_device().type == "cuda"

    spent = [0.0]
    for name in ("unet_override", "attn2_in", "attn2_out"):
        original = getattr(cap.CaptureRun, name)

        def timed_hook(self, *a, _original=original, **kw):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            try:
                return _original(self, *a, **kw)
            finally:
                if cuda:
                    torch.cuda.synchronize()
                spent[0] += time.perf_counter() - t0

        setattr(cap.CaptureRun, name, timed_hook)

    def ksampler(m):
        if cuda:
            torch.cuda.synchronize()
        out = comfy_nodes.common_ksampler(m, 0, args.steps, 7.5, "euler", "normal", pos, neg, latent)[0]["samples"]
        if cuda:
            torch.cuda.synchronize()
        return out

    captured, handle = cap.install_capture(model, "all", "positive", 10)
    comfy_nodes.common_ksampler(model, 0, 1, 7.5, "euler", "normal", pos, neg, latent)  # warm-up (loads weights)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t_plain1, out_plain = timed(ksampler, model)
    cuda_plain = torch.cuda.max_memory_allocated() if cuda else 0
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t_cap, out_cap = timed(ksampler, captured)
    cuda_cap = torch.cuda.max_memory_allocated() if cuda else 0
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hook_s = spent[0]
    print(f"# plain {t_plain1:.1f} s, capture {t_cap:.1f} s (hooks {hook_s:.1f} s)", file=sys.stderr, flush=True)
    t_plain2, _ = timed(ksampler, model) if args.plain_runs == 2 else (t_plain1, None)
    run = handle.runs[-1]

    image = torch.rand(1, args.size, args.size, 3, generator=torch.Generator().manual_seed(0))
    t_view, _ = timed(am.render_view, run, True, text, clip=clip, image=image)

    plain = (t_plain1 + t_plain2) / 2
    result = {
        "device": str(mm.get_torch_device()), "size": args.size, "steps": args.steps,
        "layers": len(run.seen) + len(run.fallback), "t_plain_s": round(plain, 2), "t_capture_s": round(t_cap, 2),
        "overhead": round(t_cap / plain - 1, 4), "direct_overhead": round(hook_s / plain, 4),
        "plain_drift": round(t_plain2 / t_plain1 - 1, 4) if args.plain_runs == 2 else None,
        "bit_identical": bool(torch.equal(out_plain, out_cap)),
        "record_mb": round(probs.tensor_bytes(run.sums) / 2 ** 20, 2), "peak_extra_mb": round(run.peak_bytes / 2 ** 20, 2),
        "rss_growth_mb": round(max(0, rss_after - rss_before) / 1024, 1),
        "cuda_peak_extra_mb": round((cuda_cap - cuda_plain) / 2 ** 20, 2) if cuda else None,
        "viewer_s": round(t_view, 2),
    }
    report(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
