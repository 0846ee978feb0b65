"""Benchmark: guidance cutoff on a Wan 2.2-style split run (two experts, two KSamplerAdvanced) vs plain CFG.

Two reduced Wan 2.1/2.2-A14B-architecture models (random weights, WanModel built from ComfyUI's own WAN21_T2V config;
two seeds stand for the high- and the low-noise expert) sample one schedule split in two: the high-noise expert
steps 0..split (return_with_leftover_noise), the low-noise expert split..steps (add_noise off). With the cutoff,
both experts get a GuidanceCutoffPatch with the same cutoff and full_sigmas (BasicScheduler, same scheduler and
steps), so the cutoff lands in the low-noise part. Prints, measured in this one run:
  rows_plain / rows_cutoff  = batch rows that reached the diffusion models over both parts (exact counts, by an
                              APPLY_MODEL wrapper), and the GuidanceCutoffReport's own total (must agree)
  time_ratio                = t_cutoff / t_plain (medians over --repeats rounds, order alternating each round,
                              after one warm-up run of each); time_ratio_in_model: the same from the time spent
                              inside the diffusion models only (APPLY_MODEL wrapper)
  rows_ratio                = rows_cutoff / rows_plain (the time ratio if cost were proportional to rows)
  call_2rows_s / call_1row_s = median time of one model call with 2 rows / 1 row (all runs), and
  ideal_time_ratio          = (cut · t2 + (steps − cut) · t1) / (steps · t2): the ratio those call times predict
  load                      = `uptime` before and after (the machine is shared: read the time ratio with it)

    .venv/bin/python bench/split_cutoff.py [--dim 256] [--layers 4] [--size 16] [--frames 3] [--steps 20]
                                           [--split 10] [--cutoff 0.75] [--repeats 2] [--threads N] [--json]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from common import report, setup

ROWS_KEY = "prompt_anatomy.bench.rows"


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        with open("/proc/loadavg") as f:
            return "loadavg " + f.read().strip()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=256, help="WanModel width (Wan 2.2 A14B: 5120)")
    ap.add_argument("--layers", type=int, default=4, help="WanModel blocks (A14B: 40)")
    ap.add_argument("--size", type=int, default=16, help="latent height and width")
    ap.add_argument("--frames", type=int, default=3, help="latent frames")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--split", type=int, default=10, help="first step of the low-noise expert")
    ap.add_argument("--cutoff", type=float, default=0.75, help="fraction of the whole schedule")
    ap.add_argument("--cfg", type=float, default=3.5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    args = ap.parse_args(argv)
    sys.argv = sys.argv[:1]
    setup()
    import tiny_models
    import torch
    from comfy.patcher_extension import WrappersMP
    from comfy_extras import nodes_custom_sampler, nodes_model_advanced
    from prompt_anatomy.nodes import guidance_cutoff as gc
    from prompt_anatomy.nodes.core import runs as core_runs

    import nodes as comfy_nodes

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = uptime()

    text = tiny_models.make("wan21_t2v")  # its tiny UMT5 encodes the prompts (text_dim matches)

    def expert(seed):
        cfg, model = tiny_models._diffusion("WAN21_T2V", {
            "model_type": "t2v", "patch_size": [1, 2, 2], "text_len": 512, "in_dim": 16, "dim": args.dim,
            "ffn_dim": 4 * args.dim, "freq_dim": 256, "text_dim": tiny_models.T5_SMALL["d_model"], "out_dim": 16,
            "num_heads": max(1, args.dim // 64), "num_layers": args.layers, "window_size": [-1, -1], "qk_norm": True,
            "cross_attn_norm": True, "eps": 1e-6}, seed, None)
        m = tiny_models._patcher(model)
        return nodes_model_advanced.ModelSamplingSD3().patch(m, 8.0)[0]  # Wan 2.2's shift

    high, low = expert(0), expert(1)
    counter = {"rows": 0, "model_s": 0.0, "calls": []}

    def count(executor, x, *a, **kw):
        counter["rows"] += x.shape[0]
        start = time.perf_counter()
        try:
            return executor(x, *a, **kw)
        finally:
            dt = time.perf_counter() - start
            counter["model_s"] += dt
            counter["calls"].append((int(x.shape[0]), dt))

    for m in (high, low):
        m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, ROWS_KEY, count)
    pos, neg = text.encode("a red fox running through snow"), text.encode("blurry, static")
    latent = {"samples": torch.zeros(1, 16, args.frames, args.size, args.size)}
    full = nodes_custom_sampler.BasicScheduler.execute(low, "simple", args.steps, 1.0).args[0]
    ks = comfy_nodes.KSamplerAdvanced()

    def split_run(m_high, m_low):
        counter["rows"], counter["model_s"] = 0, 0.0
        counter["calls"] = calls = []
        start = time.perf_counter()
        (mid,) = ks.sample(m_high, "enable", 0, args.steps, args.cfg, "euler", "simple", pos, neg, latent, 0,
                           args.split, "enable")
        (out,) = ks.sample(m_low, "disable", 0, args.steps, args.cfg, "euler", "simple", pos, neg, mid, args.split,
                           10000, "disable")
        per_call.extend(calls)
        return time.perf_counter() - start, counter["rows"], counter["model_s"], out

    def patched(m):
        return gc.GuidanceCutoffPatch.execute(m, cutoff=args.cutoff, cutoff_unit="fraction", full_sigmas=full).args

    (p_high, r_high), (p_low, r_low) = patched(high), patched(low)
    per_call: list = []
    split_run(high, low)  # warm-up of both kinds (first-call allocations)
    split_run(p_high, p_low)
    times = {"plain": [], "cutoff": []}
    in_model = {"plain": [], "cutoff": []}
    rows = {}
    for i in range(args.repeats):
        order = ("plain", "cutoff") if i % 2 == 0 else ("cutoff", "plain")
        for kind in order:
            t, n, t_model, out = split_run(high, low) if kind == "plain" else split_run(p_high, p_low)
            times[kind].append(t)
            in_model[kind].append(t_model)
            rows[kind] = n
    two = [dt for n, dt in per_call if n == 2]
    one = [dt for n, dt in per_call if n == 1]
    t2, t1 = (statistics.median(two) if two else None), (statistics.median(one) if one else None)
    cut = core_runs.resolve_cutoff_step(args.cutoff, "fraction", full)
    total = gc.GuidanceCutoffReport.execute(r_high, out, r_low).args[0]
    t_plain, t_cut = statistics.median(times["plain"]), statistics.median(times["cutoff"])
    result = {
        "model": f"WanModel dim {args.dim}, {args.layers} blocks, latent 16x{args.frames}x{args.size}x{args.size}",
        "schedule": f"{args.steps} steps euler/simple, split at {args.split}, cutoff {args.cutoff} of the whole "
                    f"schedule (step {cut})",
        "rows_plain": rows["plain"],
        "rows_cutoff": rows["cutoff"],
        "rows_ratio": round(rows["cutoff"] / rows["plain"], 4),
        "report_total": total.splitlines()[0],
        "t_plain_s": round(t_plain, 3),
        "t_cutoff_s": round(t_cut, 3),
        "time_ratio": round(t_cut / t_plain, 4),
        "t_in_model_plain_s": round(statistics.median(in_model["plain"]), 3),
        "t_in_model_cutoff_s": round(statistics.median(in_model["cutoff"]), 3),
        "time_ratio_in_model": round(statistics.median(in_model["cutoff"]) / statistics.median(in_model["plain"]), 4),
        "call_2rows_s": round(statistics.median(two), 4) if two else None,
        "call_1row_s": round(statistics.median(one), 4) if one else None,
        "ideal_time_ratio": round((cut * t2 + (args.steps - cut) * t1) / (args.steps * t2), 4) if two and one else None,
        "times_plain_s": [round(t, 3) for t in times["plain"]],
        "times_cutoff_s": [round(t, 3) for t in times["cutoff"]],
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "load_before": load_before,
        "load_after": uptime(),
    }
    report(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
