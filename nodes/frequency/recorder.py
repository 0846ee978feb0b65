"""The sampling recorder of FrequencySplitPreview: per-step low/high statistics, live previews, the record."""

from __future__ import annotations

import dataclasses
import json
import math

import comfy.latent_formats
import comfy.model_management
import comfy.model_sampling
import comfy.utils
import latent_preview
import torch
from comfy.patcher_extension import WrappersMP

from ..core import PACK, families, hooks, records, runs
from ..shared.drawing import COLORS, decode_cells, labelled_grid, line_plot, pil_to_image, side_by_side
from ..shared.spectral import (
    DEFAULT_THRESHOLD,
    low_radius,
    mode_for,
    rms_per_item,
    split_frequencies,
    validate_mode,
    validate_threshold,
)
from .schedules import model_kind, settle_step, signal_noise_coefficients, suggested_cutoff, vp_coefficients

WRAPPER_KEY = f"{PACK}.frequency"
STORE = f"{PACK}.frequency"


# ----------------------------------------------------------------------------------------------
# the recorder
# ----------------------------------------------------------------------------------------------
STAT_NAMES = ("xt_low", "xt_high", "x0_low", "x0_high")


def parse_steps(text: str) -> list[int]:
    """Comma/space separated step indices (negative counts from the end); empty -> []."""
    out = []
    for tok in str(text or "").replace(";", ",").replace(" ", ",").split(","):
        tok = tok.strip()
        if not tok:
            continue
        try:
            out.append(int(tok))
        except ValueError as e:
            raise ValueError(f"grid_steps must be step indices separated by commas (e.g. '0, 5, 10, -1'), got "
                             f"{tok!r} in {text!r}.") from e
    return out


def resolve_grid_steps(explicit: list[int], columns: int, n_steps: int) -> list[int]:
    """Steps (0-based) whose latents are kept: ``explicit`` (negative from the end), or ``columns`` evenly
    spaced steps including the first and the last."""
    if n_steps <= 0:
        return []
    if explicit:
        steps = []
        for s in explicit:
            if not -n_steps <= s < n_steps:
                raise ValueError(f"grid_steps contains step {s} but this sampling run has {n_steps} steps (use 0.."
                                 f"{n_steps - 1}, or negative indices counting from the end).")
            steps.append(s % n_steps)
        return sorted(set(steps))
    cols = max(1, min(int(columns), n_steps))
    if cols == 1:
        return [n_steps - 1]
    return sorted({math.floor(k * (n_steps - 1) / (cols - 1) + 0.5) for k in range(cols)})


@dataclasses.dataclass
class FrequencyRun:
    """What one sampling run leaves behind: per-step statistics and the chosen steps' latents (CPU)."""

    threshold: float
    patch: int  # latent pixels per side packed in a channel (Flux.2: 2); the split ran on the unpacked latent
    n_steps: int
    sigmas: list[float]  # the schedule sampled (n_steps + 1 values)
    kind: str  # "eps" / "flow" / "other"
    model_sampling: str
    sampler: str | None
    signal_coef: list[float]  # a' of x_t at each sigma (n_steps + 1 values, VP form)
    noise_coef: list[float]  # b'
    stats: dict[str, torch.Tensor]  # "<xt|x0>_<low|high>_rms" and "..._change": [n_steps + 1, B] (row N = final)
    grid_steps: list[int]
    grid_latents: dict[int, tuple[torch.Tensor, torch.Tensor]]  # step -> (x_t VP-scaled, x0), model space
    final: torch.Tensor  # the sampler's result, model space
    final_out: torch.Tensor  # the same after process_latent_out (what the sampler node outputs)
    latent_format: object
    reported_steps: int  # steps whose callback fired
    video_split: str = "per_frame"  # how video latents were split ("space_time": 3-D over frames, height, width)

    @property
    def batch(self) -> int:
        return int(self.final.shape[0])


def new_record(settings: dict) -> records.RecordHandle:
    """The PA_FREQ_RECORD value: where the recorder publishes finished runs."""
    return records.RecordHandle("frequency", dict(settings), latent_attr="final_out")


class _Recording:
    """Working state of one run (lives in the RunState store)."""

    def __init__(self, settings: dict, sigmas: torch.Tensor, model, sampler_name):
        self.settings = settings
        self.threshold = settings["threshold"]
        self.video_split = settings.get("video_split", "per_frame")
        self.patch = families.latent_patch(getattr(model, "model_config", None))  # Flux.2: split unpacked
        self.sigmas = [float(s) for s in sigmas.detach().float().cpu()]
        self.n_steps = len(self.sigmas) - 1
        self.grid_steps = resolve_grid_steps(settings["grid_steps"], settings["grid_columns"], self.n_steps)
        ms = model.model_sampling
        self.kind = model_kind(ms)
        self.model_sampling_name = " + ".join(b.__name__ for b in type(ms).__bases__) or type(ms).__name__
        self.latent_format = model.latent_format
        self.process_out = model.process_latent_out
        self.sampler = sampler_name
        self.coef = [vp_coefficients(*signal_noise_coefficients(ms, s)) for s in self.sigmas]
        self.x_vp: dict[int, torch.Tensor] = {}
        self.x0: dict[int, torch.Tensor] = {}
        self.rms: dict[str, dict[int, torch.Tensor]] = {k: {} for k in STAT_NAMES}
        self.final: torch.Tensor | None = None

    def record(self, step: int, x0: torch.Tensor | None, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not 0 <= step < self.n_steps or x0 is None or x is None:
            return None
        scale = self.coef[step][2]
        with torch.no_grad():
            x_vp = x.detach().float() * scale
            x0f = x0.detach().float()
            lo, hi = split_frequencies(torch.stack([x_vp, x0f]), self.threshold, self.patch,
                                       mode_for(self.video_split, x.ndim))  # one FFT for both
            xl, xh, ol, oh = lo[0], hi[0], lo[1], hi[1]
            for name, part in (("xt_low", xl), ("xt_high", xh), ("x0_low", ol), ("x0_high", oh)):
                self.rms[name][step] = rms_per_item(part).cpu()
            # every step until the run ends: the relative change to the final needs the final
            self.x_vp[step] = x_vp.to("cpu", torch.float32, copy=True)
            self.x0[step] = x0f.to("cpu", torch.float32, copy=True)
        return ol, oh

    def finish(self) -> FrequencyRun | None:
        if self.final is None:
            return None
        final = self.final
        n, b = self.n_steps, final.shape[0]
        mode = mode_for(self.video_split, final.ndim)
        fl, fh = split_frequencies(final, self.threshold, self.patch, mode)
        stats = {f"{k}_{s}": torch.full((n + 1, b), math.nan) for k in STAT_NAMES for s in ("rms", "change")}
        for k in STAT_NAMES:
            for step, v in self.rms[k].items():
                stats[f"{k}_rms"][step] = v
            stats[f"{k}_rms"][n] = rms_per_item(fl if k.endswith("low") else fh)
            stats[f"{k}_change"][n] = 0.0
        for src, name in ((self.x_vp, "xt"), (self.x0, "x0")):
            if not src:
                continue
            steps = sorted(src)
            low, high = split_frequencies(torch.stack([src[k] for k in steps]), self.threshold, self.patch,
                                          mode)  # [S, B, ...]
            for part, p, ref in (("low", low, fl), ("high", high, fh)):
                d = (p - ref.unsqueeze(0)).reshape(len(steps), b, -1).norm(dim=2)
                r = ref.reshape(1, b, -1).norm(dim=2)
                at_zero = torch.where(d > 0, torch.full_like(d, math.inf), torch.zeros_like(d))
                stats[f"{name}_{part}_change"][steps] = torch.where(r > 0, d / r.clamp_min(1e-30), at_zero)
        grid = {s: (self.x_vp[s], self.x0[s]) for s in self.grid_steps if s in self.x_vp}
        run = FrequencyRun(
            threshold=self.threshold, patch=self.patch, n_steps=n, sigmas=self.sigmas, kind=self.kind,
            model_sampling=self.model_sampling_name, sampler=self.sampler,
            signal_coef=[c[0] for c in self.coef], noise_coef=[c[1] for c in self.coef], stats=stats,
            grid_steps=[s for s in self.grid_steps if s in grid], grid_latents=grid, final=final,
            final_out=self.process_out(final.clone()).float().cpu(), latent_format=self.latent_format,
            reported_steps=len(self.x_vp), video_split=self.video_split)
        self.x_vp, self.x0 = {}, {}  # only the chosen steps stay (in the published run)
        return run


def _make_previewer(guider):
    """ComfyUI's previewer for the guider's model (as latent_preview.prepare_callback makes it), or
    Latent2RGB where the server's previews are off."""
    patcher = getattr(guider, "model_patcher", None)
    device = getattr(patcher, "load_device", comfy.model_management.get_torch_device())
    lf = guider.inner_model.latent_format
    previewer = latent_preview.get_previewer(device, lf)
    if previewer is None and getattr(lf, "latent_rgb_factors", None) is not None:
        previewer = latent_preview.Latent2RGBPreviewer(lf.latent_rgb_factors, lf.latent_rgb_factors_bias,
                                                       lf.latent_rgb_factors_reshape)
    return previewer


def make_recorder_wrapper(handle: records.RecordHandle, settings: dict):
    """The keyed SAMPLER_SAMPLE wrapper: records every step through the sampler's callback (chained; it
    may be None), sends the low | high live preview, publishes the run to ``handle`` when the run ends."""

    def finish(run_state):
        for rec in run_state.peek(STORE) or []:
            result = rec.finish()
            if result is not None:
                handle.publish(result)

    def wrapper(executor, guider, sigmas, extra_args, callback, *args, **kwargs):
        run_state = runs.run_state(extra_args.get("model_options"))
        fn = getattr(executor.class_obj, "sampler_function", None)
        rec = _Recording(settings, sigmas, guider.inner_model, getattr(fn, "__name__", None))
        if run_state is not None:
            if run_state.peek(STORE) is None:
                run_state.on_finish(finish)
            run_state.store(STORE, list).append(rec)
        pbar = comfy.utils.ProgressBar(rec.n_steps) if settings["live_preview"] else None
        # previews only where someone listens (the server's progress hook); the previewer is made once per run
        previewer = _make_previewer(guider) if pbar is not None and pbar.hook is not None else None

        def recording_callback(step, x0, x, total_steps):
            result = None
            if callback is not None:
                result = callback(step, x0, x, total_steps)
            parts = rec.record(int(step), x0, x)
            if previewer is not None and parts is not None:
                low = previewer.decode_latent_to_preview(parts[0])
                high = previewer.decode_latent_to_preview(parts[1])
                pbar.update_absolute(int(step) + 1, total_steps,
                                     ("JPEG", side_by_side(low, high), latent_preview.MAX_PREVIEW_RESOLUTION))
            return result

        samples = executor(guider, sigmas, extra_args, recording_callback, *args, **kwargs)
        rec.final = samples.detach().to("cpu", torch.float32, copy=True)
        if run_state is None:  # not tracked (should not happen: the node installs tracking): publish now
            result = rec.finish()
            if result is not None:
                handle.publish(result)
        return samples

    return wrapper


def apply_recorder(model, threshold: float = DEFAULT_THRESHOLD, grid_columns: int = 6, grid_steps: str = "",
                   live_preview: bool = True, video_split: str = "per_frame"):
    """Clone ``model`` with the recorder installed; returns (patched model, handle)."""
    settings = {"threshold": validate_threshold(threshold), "grid_columns": int(grid_columns),
                "grid_steps": parse_steps(grid_steps), "live_preview": bool(live_preview),
                "video_split": validate_mode(video_split)}
    if settings["grid_columns"] < 1:
        raise ValueError(f"grid_columns must be at least 1, got {grid_columns}.")
    handle = new_record(settings)
    m = model.clone()
    runs.ensure_run_tracking(m)
    hooks.add_keyed_wrapper(m, WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY, make_recorder_wrapper(handle, settings))
    return m, handle


# ----------------------------------------------------------------------------------------------
# viewer helpers
# ----------------------------------------------------------------------------------------------
def run_summary(run: FrequencyRun, index: int, settle_threshold: float, signal: str) -> dict:
    """The numbers of one image of a run (JSON-serialisable)."""
    st = {k: v[:, index].tolist() for k, v in run.stats.items()}
    n = run.n_steps
    key = "x0" if signal == "x0" else "xt"
    cutoff, cut_step = suggested_cutoff(st[f"{key}_low_change"][:n], settle_threshold, signal)
    settle = {f"{k}_{p}": settle_step(st[f"{k}_{p}_change"][:n], settle_threshold)
              for k in ("xt", "x0") for p in ("low", "high")}
    return {
        "steps": list(range(n + 1)),
        "sigma": run.sigmas,
        "model_kind": run.kind,
        "model_sampling": run.model_sampling,
        "sampler": run.sampler,
        "threshold": run.threshold,
        "low_radius_cycles_per_pixel": low_radius(run.threshold),
        "batch_index": index,
        "batch": run.batch,
        "signal_coef": run.signal_coef,  # of x_t at each sigma (the last: the final sigma)
        "noise_coef": run.noise_coef,
        "rms": {k: st[f"{k}_rms"] for k in STAT_NAMES},
        "rel_change": {k: st[f"{k}_change"] for k in STAT_NAMES},
        "settle_threshold": settle_threshold,
        "settle_step": settle,
        "cutoff_signal": signal,
        "suggested_cutoff": cutoff,
        "suggested_cutoff_step": cut_step,
        "reported_steps": run.reported_steps,
        "grid_steps": run.grid_steps,
        "video_split": run.video_split,
    }


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, list):
        return [_clean(x) for x in v]
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    return v


def to_json(data: dict) -> str:
    """JSON with NaN/inf as null (strict JSON)."""
    return json.dumps(_clean(data), indent=1)


_SERIES = (("x_t low", "xt_low", "low", False), ("x_t high", "xt_high", "high", False),
           ("x0 low", "x0_low", "low2", True), ("x0 high", "x0_high", "high2", True))


def run_plots(summary: dict) -> torch.Tensor:
    steps = summary["steps"]
    norm = line_plot([(lab, steps, summary["rms"][k], COLORS[c], dash) for lab, k, c, dash in _SERIES],
                     title="RMS of the low / high parts per step", xlabel="sampler step (last = final)",
                     ylabel="RMS")
    thr = summary["settle_threshold"]
    vl = [(summary["suggested_cutoff_step"], f"cutoff {summary['suggested_cutoff']:.2f}", COLORS["grey"])]
    change = line_plot([(lab, steps[:-1], summary["rel_change"][k][:-1], COLORS[c], dash)
                        for lab, k, c, dash in _SERIES],
                       title="relative change ||part - final part|| / ||final part||",
                       xlabel="sampler step", ylabel="rel. change (log)", log_y=True,
                       hlines=[(thr, f"threshold {thr:g}", COLORS["grey"])], vlines=vl)
    return pil_to_image([norm, change])


GRID_ROWS = ("x_t", "x_t low", "x_t high", "x0", "x0 low", "x0 high")


def run_grid(run: FrequencyRun, index: int, vae=None) -> torch.Tensor:
    cols = [(s, *run.grid_latents[s]) for s in run.grid_steps] + [(run.n_steps, run.final, run.final)]
    rows: list[list[torch.Tensor]] = [[] for _ in GRID_ROWS]
    for _s, x_vp, x0 in cols:
        xt, pred = x_vp[index:index + 1], x0[index:index + 1]
        mode = mode_for(run.video_split, xt.ndim)
        for r, cell in enumerate((xt, *split_frequencies(xt, run.threshold, run.patch, mode), pred,
                                  *split_frequencies(pred, run.threshold, run.patch, mode))):
            rows[r].append(cell)
    flat = torch.cat([cell for row in rows for cell in row])  # row-major: rows = GRID_ROWS, columns = steps
    images = decode_cells(flat, vae, run.latent_format)
    col_labels = [f"step {s}\nsigma {run.sigmas[s]:.3g}" for s, _, _ in cols[:-1]]
    col_labels.append(f"final\nsigma {run.sigmas[-1]:.3g}")
    return labelled_grid(images, len(GRID_ROWS), len(cols), GRID_ROWS, col_labels)


GRID_OVER = ("steps", "frames")


def run_frames_grid(run: FrequencyRun, index: int, vae=None, step: int = -1) -> torch.Tensor:
    """Grid over the frames of a video run: rows :data:`GRID_ROWS`, one column per latent frame, at recorded step
    ``step`` (-1: the final latent). The parts are split on the whole clip, as the recorder split it (per frame or
    space-time), then shown frame by frame."""
    if run.final.ndim != 5:
        raise ValueError(f"grid_over 'frames' needs a video latent (batch, channels, frames, height, width); this run "
                         f"sampled {tuple(run.final.shape)}: use grid_over 'steps'.")
    if step in (-1, run.n_steps):
        xt, pred, head = run.final, run.final, "final"
    elif step in run.grid_latents:
        (xt, pred), head = run.grid_latents[step], f"step {step}"
    else:
        raise ValueError(f"grid_step {step} was not recorded: use -1 (the final latent) or one of the recorder's grid "
                         f"steps {run.grid_steps} (set them with grid_columns / grid_steps of FrequencySplitPreview).")
    xt, pred = xt[index:index + 1], pred[index:index + 1]
    mode = mode_for(run.video_split, xt.ndim)
    parts = (xt, *split_frequencies(xt, run.threshold, run.patch, mode), pred,
             *split_frequencies(pred, run.threshold, run.patch, mode))
    frames = int(xt.shape[2])
    flat = torch.cat([p[:, :, f:f + 1] for p in parts for f in range(frames)])  # row-major, one-frame latents
    images = decode_cells(flat, vae, run.latent_format)
    col_labels = [f"frame {f}\n{head}" for f in range(frames)]
    return labelled_grid(images, len(GRID_ROWS), frames, GRID_ROWS, col_labels)


def summary_text(summary: dict, matched: bool) -> str:
    n = summary["batch"]
    s = summary["settle_step"]
    thr = summary["settle_threshold"]
    kind = {"eps": "EPS-type model: x_t shown as x_t / sqrt(1 + sigma^2)",
            "flow": "flow model: x_t shown as x_t / sqrt((1 - sigma)^2 + sigma^2)"}.get(
        summary["model_kind"], "x_t shown in variance-preserving form")
    steps = len(summary["steps"]) - 1
    lines = [
        f"{steps} steps ({summary['sampler'] or 'sampler'}), image {summary['batch_index']} of {n}; {kind}.",
        f"Low band: lowest {summary['threshold']:.0%} of the spectrum (radius "
        f"{summary['low_radius_cycles_per_pixel']:.3f} cycles/pixel).",
        f"Within {thr:g} of the final (relative change), from step: x0 low {s['x0_low']}, x0 high {s['x0_high']}, "
        f"x_t low {s['xt_low']}, x_t high {s['xt_high']} (of {steps}).",
        f"suggested_cutoff = {summary['suggested_cutoff']:.3f} (signal {summary['cutoff_signal']}: guidance for the "
        f"first {summary['suggested_cutoff_step']} of {steps} steps).",
    ]
    if not matched:
        lines.append("Note: no recorded run produced exactly this LATENT; showing the newest run of the recorder.")
    return "\n".join(lines)


