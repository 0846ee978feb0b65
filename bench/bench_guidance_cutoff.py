"""Benchmark: GuidanceCutoffKSampler vs KSampler on the full-size random SD1.5 (CPU or GPU).

Default: 256 x 256, 20 steps, euler, cfg 7.5, cutoff fraction 0.6 (8 of 20 steps single-pass). Prints
  ideal_saving      = single-pass steps × (t_batch2 − t_batch1) / (steps × t_batch2), from the measured
                      per-step times of plain CFG (batch 2) and of cfg 1 (batch 1) in this run
  measured_saving   = 1 − t_cutoff / t_plain
  saving_vs_ideal   = measured_saving / ideal_saving         (target ≥ 0.97)
  overhead_no_cut   = t(GuidanceCutoffKSampler, cutoff beyond the last step) / t_plain − 1   (target ≤ 1 %)
Runs are interleaved over --repeats rounds and the median of each is used.

    .venv/bin/python bench/bench_guidance_cutoff.py [--size 256] [--steps 20] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from common import encode, load_sd15, setup, timed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cutoff", type=float, default=0.6)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    args = ap.parse_args(argv)
    sys.argv = sys.argv[:1]
    setup()
    import torch
    from prompt_anatomy.nodes import guidance_cutoff as gc

    import nodes as comfy_nodes

    model, clip, _ = load_sd15()
    pos, neg = encode(clip, "a photo of a red cube on a wooden table"), encode(clip, "")
    latent = {"samples": torch.zeros(1, 4, args.size // 8, args.size // 8)}

    def ksampler(cfg):
        return comfy_nodes.common_ksampler(model, 0, args.steps, cfg, "euler", "normal", pos, neg, latent)

    def cutoff(c):
        return gc.GuidanceCutoffKSampler.execute(model, 0, args.steps, 7.5, "euler", "normal", pos, neg, latent,
                                                 1.0, cutoff=c)

    ksampler(7.5)  # warm-up: loads weights, first-call allocations
    runs = {"plain": [], "cfg1": [], "cutoff": [], "no_cut": []}
    for _ in range(args.repeats):
        runs["plain"].append(timed(ksampler, 7.5)[0])
        runs["cfg1"].append(timed(ksampler, 1.0)[0])
        runs["cutoff"].append(timed(cutoff, args.cutoff)[0])
        runs["no_cut"].append(timed(cutoff, 1.0)[0])
    t = {k: statistics.median(v) for k, v in runs.items()}
    single = args.steps - gc.toolkit.resolve_cutoff_step(args.cutoff, "fraction", torch.zeros(args.steps + 1))
    t2, t1 = t["plain"] / args.steps, t["cfg1"] / args.steps
    ideal = single * (t2 - t1) / (args.steps * t2)
    measured = 1.0 - t["cutoff"] / t["plain"]
    result = {
        "device": str(model.load_device), "size": args.size, "steps": args.steps, "single_pass_steps": single,
        "t_step_batch2_s": round(t2, 4), "t_step_batch1_s": round(t1, 4),
        "ideal_saving": round(ideal, 4), "measured_saving": round(measured, 4),
        "saving_vs_ideal": round(measured / ideal, 4) if ideal > 0 else None,
        "overhead_no_cut": round(t["no_cut"] / t["plain"] - 1.0, 4), "repeats": args.repeats,
        "threads": torch.get_num_threads(), "runs_s": {k: [round(x, 2) for x in v] for k, v in runs.items()},
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>20}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
