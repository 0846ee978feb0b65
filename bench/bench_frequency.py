"""Benchmark: the FrequencySplitPreview recorder vs plain KSampler on the full-size random SD1.5 (CPU or GPU).

Default: 256 x 256, batch 1 (cond + uncond = a batch of 2 per model call), 20 steps, euler, cfg 7.5. A no-op
progress hook is installed (as the server does), so the recorder's live preview (split, Latent2RGB of both
parts, side-by-side composite) really runs; KSampler's own preview follows the server default (none).

Runs, in this order: plain, recorder, recorder without live preview, plain. Prints
  overhead            = t(recorder) / mean(t(plain)) - 1                      (target <= 3 %)
  overhead_no_preview = t(recorder, live_preview off) / mean(t(plain)) - 1
  direct_overhead     = (time inside the recorder's callback + its end-of-run work) / mean(t(plain)),
                        measured inside the recorded run itself, so it is not blurred by run-to-run noise
  plain_drift         = t(plain, 2nd) / t(plain, 1st) - 1   (how noisy this machine was)

    .venv/bin/python bench/bench_frequency.py [--size 256] [--steps 20] [--json]
"""

from __future__ import annotations

import argparse
import sys
import time

from common import encode, load_sd15, report, setup, timed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    args = ap.parse_args(argv)
    sys.argv = sys.argv[:1]
    setup()
    import comfy.utils
    import torch
    from comfy.patcher_extension import WrappersMP
    from prompt_anatomy.nodes.frequency import recorder as fq

    import nodes as comfy_nodes

    comfy.utils.set_progress_bar_global_hook(lambda *a, **k: None)  # as on the server: previews are produced
    model, clip, _ = load_sd15()
    pos, neg = encode(clip, "a photo of a red fox in a snowy forest"), encode(clip, "")
    latent = {"samples": torch.zeros(1, 4, args.size // 8, args.size // 8)}

    spent = {"callback": 0.0, "finish": 0.0}

    def timing_wrapper(executor, guider, sigmas, extra_args, callback, *a, **kw):
        # innermost SAMPLER_SAMPLE wrapper: ``callback`` is the recorder's (which chains KSampler's own)
        def timed_callback(*cb_args):
            t0 = time.perf_counter()
            try:
                return callback(*cb_args)
            finally:
                spent["callback"] += time.perf_counter() - t0

        return executor(guider, sigmas, extra_args, timed_callback if callback else None, *a, **kw)

    finish = fq._Recording.finish

    def timed_finish(self):
        t0 = time.perf_counter()
        try:
            return finish(self)
        finally:
            spent["finish"] += time.perf_counter() - t0

    fq._Recording.finish = timed_finish

    def ksampler(m):
        return comfy_nodes.common_ksampler(m, 0, args.steps, 7.5, "euler", "normal", pos, neg, latent)

    rec, handle = fq.apply_recorder(model, live_preview=True)
    rec.add_wrapper_with_key(WrappersMP.SAMPLER_SAMPLE, "bench.timing", timing_wrapper)
    rec_np, _ = fq.apply_recorder(model, live_preview=False)

    comfy_nodes.common_ksampler(model, 0, 2, 7.5, "euler", "normal", pos, neg, latent)  # warm-up (loads weights)
    t_plain1, out_plain = timed(ksampler, model)
    t_rec, out_rec = timed(ksampler, rec)
    t_rec_np, _ = timed(ksampler, rec_np)
    t_plain2, _ = timed(ksampler, model)
    t_plain = 0.5 * (t_plain1 + t_plain2)
    identical = torch.equal(out_plain[0]["samples"], out_rec[0]["samples"])
    res = {
        "size": args.size, "steps": args.steps, "device": str(model.load_device),
        "t_plain_s": round(t_plain, 3), "t_recorder_s": round(t_rec, 3), "t_recorder_no_preview_s": round(t_rec_np, 3),
        "overhead": round(t_rec / t_plain - 1, 4),
        "overhead_no_preview": round(t_rec_np / t_plain - 1, 4),
        "callback_s": round(spent["callback"], 4), "finish_s": round(spent["finish"], 4),
        "direct_overhead": round((spent["callback"] + spent["finish"]) / t_plain, 5),
        "plain_drift": round(t_plain2 / t_plain1 - 1, 4),
        "latent_bit_identical": identical, "runs_recorded": len(handle.runs),
    }
    report(res, args.json)
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
