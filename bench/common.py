"""Shared set-up for the benchmarks: ComfyUI in-process on CPU, the pack loaded as ``prompt_anatomy``,
the full-size random SD1.5 checkpoint, and a timer. Benchmarks print ratios measured in one run."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / ".comfyui" / "models" / "checkpoints" / "prompt_anatomy_random_sd15.safetensors"


def setup():
    """Import ComfyUI (CPU) and the pack; returns the pack module."""
    if str(ROOT / "scripts") not in sys.path:  # scripts/ only: the checkout's nodes/ would shadow ComfyUI's
        sys.path.insert(0, str(ROOT / "scripts"))
    import tiny_models

    tiny_models.bootstrap_comfy()
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    return tiny_models.load_by_path("prompt_anatomy", ROOT / "__init__.py", ROOT)


def load_sd15():
    """(model, clip, vae) of the random SD1.5 checkpoint (scripts/make_sd15_checkpoint.py writes it)."""
    if not CHECKPOINT.exists():
        raise SystemExit(f"{CHECKPOINT} is missing: run `.venv/bin/python scripts/make_sd15_checkpoint.py` first.")
    import comfy.sd

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(CHECKPOINT), output_vae=True, output_clip=True)
    return model, clip, vae


def encode(clip, text: str):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def report(result: dict, as_json: bool) -> None:
    """Every benchmark's tail: one JSON line, or one aligned "name: value" line per figure."""
    if as_json:
        print(json.dumps(result))
        return
    width = max(len(k) for k in result)
    for k, v in result.items():
        print(f"{k:>{width}}: {v}")


# ---------------------------------------------------------------------------------------------------------
# GPU-capable set-up and the plain-vs-capture timing shared by bench_capture_dit.py and bench_capture_wan.py
# ---------------------------------------------------------------------------------------------------------

def setup_device(force_cpu: bool = False):
    """Like setup(), but ComfyUI runs on its default device (the GPU when there is one) unless ``force_cpu``:
    setup() always parses ``--cpu``. ComfyUI is found the way setup() finds it (scripts/comfy_path.py:
    $PROMPT_ANATOMY_COMFYUI, else .comfyui/). Returns (pack module, torch device)."""
    if "comfy.cli_args" not in sys.modules:
        if str(ROOT / "scripts") not in sys.path:
            sys.path.insert(0, str(ROOT / "scripts"))
        import tiny_models
        import torch

        tree = str(tiny_models.load_by_path("comfy_path", ROOT / "scripts" / "comfy_path.py").comfy_dir())
        if tree not in sys.path:
            sys.path.insert(0, tree)
        cpu = force_cpu or not torch.cuda.is_available()
        saved = sys.argv
        sys.argv = [saved[0] if saved else "python", *(["--cpu"] if cpu else [])]
        try:
            import comfy.options

            comfy.options.enable_args_parsing()
            import comfy.cli_args  # noqa: F401  (parses the arguments now)
            import comfy.model_management  # noqa: F401
        finally:
            sys.argv = saved
    pack = setup()
    import comfy.model_management as mm

    return pack, mm.get_torch_device()


def device_patcher(model):
    """A ModelPatcher that samples on ComfyUI's device (tiny_models._patcher keeps everything on the CPU)."""
    import comfy.model_management as mm
    import comfy.model_patcher

    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def cuda_sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def capture_vs_plain(model, sample, repeats: int, cuda: bool, layers: str = "all", label: str = "",
                     blocks=None, normalise: str = "all_keys") -> dict:
    """Plain sampling vs sampling with CrossAttentionCapture (``install_capture``, what the node's execute calls)
    on ``layers`` with its ``normalise`` setting, ``repeats`` interleaved rounds (order alternating) after one
    warm-up of each, medians.
    ``sample(model)`` runs the sampler and returns the latent (CPU). A captured run outside the medians times the
    capture's own work with synchronising timers around its attention overrides (hook_share); with ``blocks``
    (the diffusion model's transformer blocks) a plain run outside the medians times the blocks the same way
    (blocks_share), and overhead_vs_block_time = (t(capture) - t(plain)) / time in the blocks (a reduced-depth
    model's embedders, head and sampler loop dilute ``overhead``; the per-run costs below inflate this one). The
    same timed run gives finish_share (the record's end-of-run copy
    to the CPU), and a third model carrying only the run and layer tracking gives tracking_overhead."""
    import statistics

    import torch
    from prompt_anatomy.nodes.attention import capture as cap
    from prompt_anatomy.nodes.attention import probs
    from prompt_anatomy.nodes.core import layers as core_layers
    from prompt_anatomy.nodes.core import runs as core_runs

    captured, handle = cap.install_capture(model, layers, "positive", 10, normalise)
    tracked = model.clone()  # what the capture installs besides its own hooks: run and layer tracking
    core_runs.ensure_run_tracking(tracked)
    core_layers.ensure_layer_tracking(tracked, core_layers.model_layers(tracked, "bench"))
    models = {"plain": model, "capture": captured, "tracking": tracked}

    def run(name):
        cuda_sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = sample(models[name])
        cuda_sync()
        return time.perf_counter() - start, out, (torch.cuda.max_memory_allocated() if cuda else 0)

    for name in models:  # warm-up: loads the weights, first-call allocations and kernel choices
        run(name)
    times: dict[str, list] = {name: [] for name in models}
    peaks: dict[str, list] = {name: [] for name in models}
    outs: dict[str, list] = {name: [] for name in models}
    for r in range(repeats):
        for name in (("plain", "capture", "tracking") if r % 2 == 0 else ("tracking", "capture", "plain")):
            dt, out, peak = run(name)
            times[name].append(dt)
            peaks[name].append(peak)
            outs[name].append(out)
            print(f"# {label}{name}: {dt:.3f} s", file=sys.stderr, flush=True)
    rec = handle.runs[-1]

    spent = {"dit_override": 0.0, "cross_override": 0.0, "finish": 0.0}
    originals = {name: getattr(cap.CaptureRun, name) for name in spent}

    def timed_hook(original):
        def hook(self, *a, **kw):
            cuda_sync()
            t0 = time.perf_counter()
            try:
                return original(self, *a, **kw)
            finally:
                cuda_sync()
                spent[original.__name__] += time.perf_counter() - t0
        return hook

    for name, original in originals.items():
        setattr(cap.CaptureRun, name, timed_hook(original))
    try:
        t_hooked, _, _ = run("capture")
    finally:
        for name, original in originals.items():
            setattr(cap.CaptureRun, name, original)

    blocks_share = None
    if blocks:
        spent_blocks, starts = [0.0], []

        def pre(_module, _args):
            cuda_sync()
            starts.append(time.perf_counter())

        def post(_module, _args, _out):
            cuda_sync()
            spent_blocks[0] += time.perf_counter() - starts.pop()

        handles = [h for b in blocks for h in (b.register_forward_pre_hook(pre), b.register_forward_hook(post))]
        try:
            t_blocks_run, _, _ = run("plain")
        finally:
            for h in handles:
                h.remove()
        blocks_share = spent_blocks[0] / t_blocks_run

    t = {k: statistics.median(v) for k, v in times.items()}
    ref = outs["plain"][0]
    return {
        "repeats": repeats, "layers_captured": len(rec.seen), "captured_calls": sum(rec.seen.values()),
        "capture_errors": rec.errors, "capture_skipped": rec.skipped,
        "t_plain_s": round(t["plain"], 4), "t_capture_s": round(t["capture"], 4),
        "overhead": round(t["capture"] / t["plain"] - 1, 4),
        "overhead_best_of_n": round(min(times["capture"]) / min(times["plain"]) - 1, 4),
        "target_overhead": 0.15,
        "blocks_share": round(blocks_share, 4) if blocks_share else None,
        "overhead_vs_block_time": round((t["capture"] - t["plain"]) / (t["plain"] * blocks_share), 4)
        if blocks_share else None,
        "hook_share": round((spent["dit_override"] + spent["cross_override"]) / t["plain"], 4),
        "finish_share": round(spent["finish"] / t["plain"], 4), "t_hooked_run_s": round(t_hooked, 4),
        "tracking_overhead": round(t["tracking"] / t["plain"] - 1, 4),
        "bit_identical": all(torch.equal(ref, o) for o in outs["plain"][1:] + outs["capture"] + outs["tracking"]),
        "latent_finite": bool(torch.isfinite(ref).all()),
        "record_mb": round(probs.tensor_bytes(rec.sums) / 2 ** 20, 2),
        "peak_extra_mb": round(rec.peak_bytes / 2 ** 20, 2),
        "cuda_peak_plain_mb": round(statistics.median(peaks["plain"]) / 2 ** 20, 1) if cuda else None,
        "cuda_peak_extra_mb": round((statistics.median(peaks["capture"]) - statistics.median(peaks["plain"]))
                                    / 2 ** 20, 1) if cuda else None,
    }


def add_run_arguments(ap) -> None:
    """The GPU benchmarks' shared flags: --steps, --repeats, --cpu, --json."""
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default 8; --small 2)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 3; --small 1)")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of a table")


def run_settings(args):
    """(device, cuda, dtype, steps, repeats) of a GPU benchmark after ``add_run_arguments``: ComfyUI set up on its
    device (the CPU with --cpu), bf16 on CUDA at full size, else fp32; 8 steps and 3 repeats (--small: 2 and 1)."""
    import torch

    _, device = setup_device(force_cpu=args.cpu)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda and not args.small else torch.float32
    return (device, cuda, dtype, args.steps or (2 if args.small else 8), args.repeats or (1 if args.small else 3))


def announce_build(label: str, model, seconds: float, dtype, device) -> int:
    """Print what was built (to stderr); returns the diffusion model's parameter count."""
    n_params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    print(f"# built {label} in {seconds:.1f} s: {n_params / 1e6:.0f} M parameters, {dtype}, {device}",
          file=sys.stderr, flush=True)
    return n_params
