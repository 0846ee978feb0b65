"""Benchmark: GuidanceCutoffKSampler vs KSampler on the full-size random SD1.5 (CPU or GPU).

Default: 256 x 256, 20 steps, euler, cfg 7.5, cutoff fraction 0.6 (8 of 20 steps single-pass). Prints
  ideal_saving      = single-pass steps × (t_batch2 − t_batch1) / (steps × t_batch2), from the measured
                      per-step times of plain CFG (batch 2) and of cfg 1 (batch 1) in this run
  measured_saving   = 1 − t_cutoff / t_plain
  saving_vs_ideal   = measured_saving / ideal_saving         (target ≥ 0.97)
  overhead_no_cut   = t(GuidanceCutoffKSampler, cutoff beyond the last step) / t_plain − 1   (target ≤ 1 %)
Whole-run times are the medians over --repeats rounds; the order of the four runs rotates every round so
slow drift of the machine does not always fall on the same run.

Where the time goes, measured in the same runs: every diffusion-model call is timed by an APPLY_MODEL
wrapper (key below) on the model all four runs share, so
  model_s / outside_s  = time inside the diffusion model / everything else (sampler, wrappers, cloning,
                         loading, report) per run; outside_s of the cutoff runs vs plain is the pack's own cost
  step_s               = median time of a model call with 2 rows and with 1 row in each kind of run; the
                         cutoff run's two-row steps should cost what plain's do, its one-row steps what cfg 1's do
  saving_vs_ideal_model = the same ratio computed from the time inside the model only
  *_best               = the two target ratios from the fastest run of each kind (noise on a shared CPU only
                         ever adds time, so best-of-N is the other usual estimator besides the median)

    .venv/bin/python bench/bench_guidance_cutoff.py [--size 256] [--steps 20] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from common import encode, load_sd15, report, setup, timed

TIMING_KEY = "prompt_anatomy.bench.model_timing"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cutoff", type=float, default=0.6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    args = ap.parse_args(argv)
    sys.argv = sys.argv[:1]
    setup()
    import torch
    from comfy.patcher_extension import WrappersMP
    from prompt_anatomy.nodes import guidance_cutoff as gc
    from prompt_anatomy.nodes.core import runs as core_runs

    import nodes as comfy_nodes

    if args.threads:
        torch.set_num_threads(args.threads)
    base, clip, _ = load_sd15()
    calls: list[tuple[int, float]] = []

    def model_timing(executor, x, *a, **kw):
        start = time.perf_counter()
        out = executor(x, *a, **kw)
        calls.append((int(x.shape[0]), time.perf_counter() - start))
        return out

    model = base.clone()
    model.add_wrapper_with_key(WrappersMP.APPLY_MODEL, TIMING_KEY, model_timing)
    pos, neg = encode(clip, "a photo of a red cube on a wooden table"), encode(clip, "")
    latent = {"samples": torch.zeros(1, 4, args.size // 8, args.size // 8)}

    def ksampler(cfg):
        return comfy_nodes.common_ksampler(model, 0, args.steps, cfg, "euler", "normal", pos, neg, latent)

    def cutoff(c):
        return gc.GuidanceCutoffKSampler.execute(model, 0, args.steps, 7.5, "euler", "normal", pos, neg, latent,
                                                 1.0, cutoff=c)

    kinds = {"plain": (ksampler, 7.5), "cfg1": (ksampler, 1.0), "cutoff": (cutoff, args.cutoff),
             "no_cut": (cutoff, 1.0)}
    ksampler(7.5)  # warm-up: loads weights, first-call allocations
    cutoff(args.cutoff)
    runs = {k: [] for k in kinds}
    model_s = {k: [] for k in kinds}
    step_s = {k: {1: [], 2: []} for k in kinds}
    order = list(kinds)
    for r in range(args.repeats):
        for name in order[r % 4:] + order[:r % 4]:
            fn, arg = kinds[name]
            calls.clear()
            runs[name].append(timed(fn, arg)[0])
            model_s[name].append(sum(d for _, d in calls))
            for rows, d in calls:
                step_s[name].setdefault(rows, []).append(d)
    med = statistics.median
    t = {k: med(v) for k, v in runs.items()}
    m = {k: med(v) for k, v in model_s.items()}
    single = args.steps - core_runs.resolve_cutoff_step(args.cutoff, "fraction", torch.zeros(args.steps + 1))

    def saving_ratio(times):
        t2, t1 = times["plain"] / args.steps, times["cfg1"] / args.steps
        ideal = single * (t2 - t1) / (args.steps * t2)
        measured = 1.0 - times["cutoff"] / times["plain"]
        return ideal, measured, (measured / ideal if ideal > 0 else None)

    ideal, measured, ratio = saving_ratio(t)
    _, _, ratio_model = saving_ratio(m)
    best = {k: min(v) for k, v in runs.items()}
    _, _, ratio_best = saving_ratio(best)
    result = {
        "device": str(base.load_device), "threads": torch.get_num_threads(), "size": args.size,
        "steps": args.steps, "single_pass_steps": single, "repeats": args.repeats,
        "t_step_batch2_s": round(t["plain"] / args.steps, 4), "t_step_batch1_s": round(t["cfg1"] / args.steps, 4),
        "ideal_saving": round(ideal, 4), "measured_saving": round(measured, 4),
        "saving_vs_ideal": round(ratio, 4) if ratio is not None else None,
        "overhead_no_cut": round(t["no_cut"] / t["plain"] - 1.0, 4),
        "saving_vs_ideal_model": round(ratio_model, 4) if ratio_model is not None else None,
        "overhead_no_cut_model": round(m["no_cut"] / m["plain"] - 1.0, 4),
        "saving_vs_ideal_best": round(ratio_best, 4) if ratio_best is not None else None,
        "overhead_no_cut_best": round(best["no_cut"] / best["plain"] - 1.0, 4),
        "outside_s": {k: round(t[k] - m[k], 3) for k in kinds},
        "step_s": {k: {f"rows{r}": round(med(v), 3) for r, v in sorted(d.items()) if v} for k, d in step_s.items()},
        "runs_s": {k: [round(x, 2) for x in v] for k, v in runs.items()},
    }
    report(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
