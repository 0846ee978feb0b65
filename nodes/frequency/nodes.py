"""Low/high frequency split of latents and images (paper 1, Sec. 4.2, Fig. 2, Prop. 1).

Paper 1 explains "shape first, then details" with the spectrum: Gaussian noise has a flat O(1/MN) energy
per frequency (Prop. 1), natural images keep most of their energy in the lowest 20 % of the spectrum, so
the low frequencies (the shape) survive the forward noising longest and are the first the sampler
recovers.

**The split.** :func:`split_frequencies` is the pack's one low/high split: a radial mask in normalised
frequency (cycles per pixel, so the Nyquist frequency is 0.5 along both axes whatever the size). The
``threshold`` is the fraction of the spectrum that counts as "low" — "the lowest 20 % parts of spectrum"
of the paper: the low band is the disc |f| <= r centred on DC whose area is ``threshold`` of the
normalised spectrum [-0.5, 0.5]^2 (r = sqrt(threshold / pi) = 0.252 cycles/pixel for 0.2; past
threshold pi/4 the disc is clipped by the square and r comes from inverting the clipped area). On a
discrete M x N grid the low band therefore holds ``threshold`` of the Fourier bins up to rounding. The
mask is point-symmetric, so the low part is a real orthogonal projection: ``low = P x``, ``high = x - low``,
``low + high == x`` to float precision and ``||x||^2 = ||low||^2 + ||high||^2``.

**Nodes.**

* ``FrequencySplit`` / ``FrequencySplitImage`` and ``FrequencyMerge`` / ``FrequencyMergeImage``: the split
  as nodes, and low of one input + high of another.
* ``FrequencySplitPreview``: a MODEL -> MODEL recorder (keyed SAMPLER_SAMPLE wrapper chaining the sampler's
  callback) that works with any sampler using the MODEL (KSampler, GuidanceCutoffKSampler,
  SamplerCustomAdvanced, ...). Live preview: the x0 prediction split low | high, side by side, through
  ComfyUI's latent previewer and progress bar. Per-run statistics are published, when the run ends, to
  the ``PA_FREQ_RECORD`` handle it outputs.
* ``FrequencySplitViewer``: handle + the sampler's LATENT (+ VAE) -> grid (rows x_t, x_t low, x_t high,
  x0, x0 low, x0 high; columns = the recorded steps), plots, JSON numbers and ``suggested_cutoff``.
* ``FrequencyNoisingAnalysis``: the forward process x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps on a user's
  image or latent, with a model's or a named schedule (Fig. 2b/2c, "Add_Noise" side).

**Latent scaling.** Samplers work in the model's own parameterisation: EPS-type models (SD1/SD2/SDXL,
v-prediction too) x_t = x0 + sigma * eps, flow models (SD3/Flux) x_t = (1 - sigma) x0 + sigma * eps. With
a, b the signal and noise coefficients (read from the model's ``model_sampling.noise_scaling``), x_t is
divided by sqrt(a^2 + b^2) before any statistic: the variance-preserving form a' x0 + b' eps with
a'^2 + b'^2 = 1, i.e. exactly the paper's sqrt(abar_t) x0 + sqrt(1 - abar_t) eps for EPS models
(abar = 1 / (1 + sigma^2)), and the VP process of the same signal-to-noise ratio for flow models.
"""

from __future__ import annotations

import math

import comfy.latent_formats
import comfy.model_management
import comfy.model_sampling
import comfy.utils
import torch
from comfy_api.latest import io, ui

from ..core import families, records
from ..shared import drawing
from ..shared.drawing import (
    COLORS,
    decode_cells,
    labelled_grid,
    line_plot,
    pil_to_image,
)
from ..shared.spectral import (
    DEFAULT_THRESHOLD,
    SPLIT_MODES,
    check_tensor,
    low_radius,
    merge_frequencies,
    mode_for,
    split_frequencies,
    validate_threshold,
)
from .recorder import (
    GRID_OVER,
    apply_recorder,
    run_frames_grid,
    run_grid,
    run_plots,
    run_summary,
    summary_text,
    to_json,
)
from .schedules import CUTOFF_SIGNALS, SCHEDULE_OPTIONS, Schedule, model_schedule, named_schedule, noising_curves

CATEGORY = "prompt_anatomy/frequency"
FreqRecord = io.Custom("PA_FREQ_RECORD")

_THRESHOLD_TOOLTIP = ("Fraction of the spectrum that counts as low frequency (paper 1: the lowest 20 %). The low "
                      "band is a disc around DC in normalised frequency (cycles/pixel, Nyquist = 0.5 on both axes) "
                      "covering this fraction of the spectrum's area; 0.2 -> radius 0.252 cycles/pixel. In (0, 1).")

_VIDEO_SPLIT_TOOLTIP = ("How video latents (batch, channels, frames, height, width; Wan, Hunyuan Video) are split. "
                        "per_frame: each frame on its own (2-D FFT over height and width), as before. space_time: "
                        "one 3-D FFT over frames, height and width; the low band is the ball covering threshold of "
                        "the space-time spectrum (0.2 -> radius 0.363 cycles per frame/pixel), so slow motion stays "
                        "low and frame-to-frame flicker goes high. Image latents have no frames: both split them "
                        "the same way.")


def _video_split_input():
    return io.Combo.Input("video_split", options=list(SPLIT_MODES), default="per_frame", optional=True,
                          tooltip=_VIDEO_SPLIT_TOOLTIP)


def _ui(images: torch.Tensor | None, text: str | None, cls=None) -> dict:
    out = {}
    if images is not None:
        out.update(ui.PreviewImage(images, cls=cls).as_dict())
    if text is not None:
        out.update(ui.PreviewText(text).as_dict())
    return out


# ----------------------------------------------------------------------------------------------
# nodes: split / merge
# ----------------------------------------------------------------------------------------------
def _latent_samples(latent, name: str) -> torch.Tensor:
    if not isinstance(latent, dict) or "samples" not in latent:
        raise ValueError(f"{name} must be a LATENT (a dict with 'samples').")
    return latent["samples"]


def _latent_patch(x: torch.Tensor) -> int:
    """Flux.2's 128-channel latents pack 2x2 pixels per channel: split them unpacked (4-D latents only)."""
    return families.latent_patch(channels=int(x.shape[1])) if x.ndim == 4 else 1


def _image_high_preview(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    # the high part is zero-mean: shown around mid grey
    return torch.cat([low.clamp(0, 1), (high + 0.5).clamp(0, 1)], dim=2)


class FrequencySplit(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FrequencySplit",
            display_name="Frequency Split (latent)",
            category=CATEGORY,
            description="Splits a latent into its low- and high-frequency parts with a radial mask in normalised "
                        "frequency (paper 1, Sec. 4.2). Exact: low + high reproduces the input.",
            inputs=[
                io.Latent.Input("samples", tooltip="The latent to split (any channel count; batch > 1 is fine). "
                                                   "Flux.2's 128-channel latents are split unpacked (32 channels at "
                                                   "1/8 of the image)."),
                io.Float.Input("threshold", default=DEFAULT_THRESHOLD, min=0.001, max=0.999, step=0.01,
                               tooltip=_THRESHOLD_TOOLTIP),
                _video_split_input(),
            ],
            outputs=[io.Latent.Output("low", display_name="low", tooltip="Low-frequency part (the shape)."),
                     io.Latent.Output("high", display_name="high",
                                      tooltip="High-frequency part (details, zero mean).")],
        )

    @classmethod
    def execute(cls, samples, threshold=DEFAULT_THRESHOLD, video_split="per_frame") -> io.NodeOutput:
        x = _latent_samples(samples, "samples")
        low, high = split_frequencies(x, threshold, _latent_patch(x), mode_for(video_split, x.ndim))
        lo, hi = samples.copy(), samples.copy()
        lo["samples"], hi["samples"] = low, high
        return io.NodeOutput(lo, hi)


class FrequencySplitImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FrequencySplitImage",
            display_name="Frequency Split (image)",
            category=CATEGORY,
            description="Splits an image into its low- and high-frequency parts (per colour channel, radial mask in "
                        "normalised frequency; paper 1, Sec. 4.2). Exact: low + high reproduces the input. The "
                        "high part is zero-mean; the node's preview shows it around mid grey.",
            inputs=[
                io.Image.Input("image", tooltip="The image(s) to split."),
                io.Float.Input("threshold", default=DEFAULT_THRESHOLD, min=0.001, max=0.999, step=0.01,
                               tooltip=_THRESHOLD_TOOLTIP),
            ],
            outputs=[io.Image.Output("low", display_name="low",
                                     tooltip="Low-frequency part (may leave 0..1 slightly)."),
                     io.Image.Output("high", display_name="high",
                                     tooltip="High-frequency part: zero-mean, add it back with FrequencyMergeImage.")],
        )

    @classmethod
    def execute(cls, image, threshold=DEFAULT_THRESHOLD) -> io.NodeOutput:
        check_tensor(image, "image")
        low, high = split_frequencies(image.movedim(-1, -3), threshold)
        low, high = low.movedim(-3, -1), high.movedim(-3, -1)
        return io.NodeOutput(low, high, ui=_ui(_image_high_preview(low, high), None, cls))


class FrequencyMerge(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FrequencyMerge",
            display_name="Frequency Merge (latent)",
            category=CATEGORY,
            description="Low-frequency part of one latent + high-frequency part of another (e.g. the shape of one "
                        "generation with the details of another). Merging the two outputs of FrequencySplit gives "
                        "the original back.",
            inputs=[
                io.Latent.Input("low_from", tooltip="Latent whose low-frequency part (shape) is kept."),
                io.Latent.Input("high_from", tooltip="Latent whose high-frequency part (details) is kept; same shape."),
                io.Float.Input("threshold", default=DEFAULT_THRESHOLD, min=0.001, max=0.999, step=0.01,
                               tooltip=_THRESHOLD_TOOLTIP),
                _video_split_input(),
            ],
            outputs=[io.Latent.Output(
                tooltip="low(low_from) + high(high_from); other keys (noise mask) from low_from.")],
        )

    @classmethod
    def execute(cls, low_from, high_from, threshold=DEFAULT_THRESHOLD, video_split="per_frame") -> io.NodeOutput:
        low_x = _latent_samples(low_from, "low_from")
        merged = merge_frequencies(low_x, _latent_samples(high_from, "high_from"), threshold, _latent_patch(low_x),
                                   mode_for(video_split, low_x.ndim))
        out = low_from.copy()
        out["samples"] = merged
        return io.NodeOutput(out)


class FrequencyMergeImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FrequencyMergeImage",
            display_name="Frequency Merge (image)",
            category=CATEGORY,
            description="Low-frequency part of one image + high-frequency part of another (same size). Merging the "
                        "two outputs of FrequencySplitImage gives the original back.",
            inputs=[
                io.Image.Input("low_from", tooltip="Image whose low-frequency part is kept."),
                io.Image.Input("high_from", tooltip="Image whose high-frequency part is kept; same size and batch."),
                io.Float.Input("threshold", default=DEFAULT_THRESHOLD, min=0.001, max=0.999, step=0.01,
                               tooltip=_THRESHOLD_TOOLTIP),
                io.Boolean.Input("clamp", default=False,
                                 tooltip="Clamp the result to 0..1 (off keeps the merge exact; on for "
                                         "saving/display)."),
            ],
            outputs=[io.Image.Output(tooltip="low(low_from) + high(high_from).")],
        )

    @classmethod
    def execute(cls, low_from, high_from, threshold=DEFAULT_THRESHOLD, clamp=False) -> io.NodeOutput:
        check_tensor(low_from, "low_from")
        check_tensor(high_from, "high_from")
        merged = merge_frequencies(low_from.movedim(-1, -3), high_from.movedim(-1, -3), threshold).movedim(-3, -1)
        return io.NodeOutput(merged.clamp(0, 1) if clamp else merged)


# ----------------------------------------------------------------------------------------------
# nodes: recorder and viewer
# ----------------------------------------------------------------------------------------------
class FrequencySplitPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FrequencySplitPreview",
            display_name="Frequency Split Preview (recorder)",
            category=CATEGORY,
            description="Watch 'shape first, then details' (paper 1, Fig. 2): patches the MODEL so that any sampler "
                        "using it (KSampler, GuidanceCutoffKSampler, SamplerCustomAdvanced, ...) shows the x0 "
                        "prediction split into low | high frequencies as its live preview, and records per-step "
                        "statistics for FrequencySplitViewer. The sampled latent is unchanged.",
            inputs=[
                io.Model.Input("model", tooltip="The model to record (cloned; the input stays unchanged)."),
                io.Float.Input("threshold", default=DEFAULT_THRESHOLD, min=0.001, max=0.999, step=0.01,
                               tooltip=_THRESHOLD_TOOLTIP),
                io.Int.Input("grid_columns", default=6, min=1, max=64,
                             tooltip="How many steps (evenly spaced, first and last included) keep their latents for "
                                     "the viewer's grid. Only these steps' latents are kept after the run."),
                io.String.Input("grid_steps", default="", multiline=False,
                                tooltip="Optional explicit steps for the grid, e.g. '0, 2, 5, -1' (0-based; negative "
                                        "counts from the end). Empty: grid_columns evenly spaced steps."),
                io.Boolean.Input("live_preview", default=True,
                                 tooltip="Send the low | high split of the x0 prediction as the sampler's live preview "
                                         "(ComfyUI's previewer: TAESD if the server uses it, else Latent2RGB — also "
                                         "when the server's previews are off)."),
                _video_split_input(),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The recording model: sample with it."),
                     FreqRecord.Output("record", display_name="record",
                                       tooltip="Handle to the recorded runs: connect to FrequencySplitViewer.")],
        )

    @classmethod
    def execute(cls, model, threshold=DEFAULT_THRESHOLD, grid_columns=6, grid_steps="",
                live_preview=True, video_split="per_frame") -> io.NodeOutput:
        m, handle = apply_recorder(model, threshold, grid_columns, grid_steps, live_preview, video_split)
        return io.NodeOutput(m, handle)


class FrequencySplitViewer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FrequencySplitViewer",
            display_name="Frequency Split Viewer",
            category=CATEGORY,
            description="Shows what FrequencySplitPreview recorded during sampling (paper 1, Fig. 2a-c): a grid of "
                        "x_t / x0 and their low / high parts over the steps, plots of the parts' norms and of their "
                        "relative change to the final, the numbers as JSON, and suggested_cutoff — the fraction of "
                        "steps after which the low-frequency part (the shape) has settled, for "
                        "GuidanceCutoffKSampler's cutoff.",
            inputs=[
                FreqRecord.Input("record", tooltip="The record output of FrequencySplitPreview."),
                io.Latent.Input("latent", tooltip="The LATENT of the sampler that used the recording model (orders "
                                                  "this node after sampling and picks that run)."),
                io.Vae.Input("vae", optional=True,
                             tooltip="VAE to decode the grid. Without it the grid uses fast approximate colours "
                                     "(Latent2RGB)."),
                io.Int.Input("batch_index", default=0, min=0, max=4095, tooltip="Which image of the batch to show."),
                io.Float.Input("settle_threshold", default=0.1, min=0.0001, max=10.0, step=0.01,
                               tooltip="A part has 'settled' once its relative change to the final stays at or below "
                                       "this for every later step."),
                io.Combo.Input("cutoff_signal", options=list(CUTOFF_SIGNALS), default="x0",
                               tooltip="Which low part decides suggested_cutoff. x0: the model's prediction of the "
                                       "clean latent (the shape it has decided on; cutoff = (settle step + 1) / "
                                       "steps). x_t: the noisy state itself, the paper's curve (settles late, as the "
                                       "remaining noise counts too; cutoff = settle step / steps)."),
                io.Combo.Input("grid_over", options=list(GRID_OVER), default="steps", optional=True,
                               tooltip="steps: grid columns are the recorded steps + final (video latents show their "
                                       "first frame). frames: for video latents (Wan, Hunyuan Video), columns are the "
                                       "latent frames of one step (grid_step), rows the same six parts, split the "
                                       "way the recorder's video_split did."),
                io.Int.Input("grid_step", default=-1, min=-1, max=10000, optional=True,
                             tooltip="grid_over frames: which step's frames to show: -1 = the final latent, else one "
                                     "of the recorder's grid steps (grid_columns / grid_steps)."),
            ],
            outputs=[
                io.Image.Output("grid", display_name="grid",
                                tooltip="Rows x_t, x_t low, x_t high, x0, x0 low, x0 high; columns = recorded "
                                        "steps + final."),
                io.Image.Output("plots", display_name="plots",
                                tooltip="Two plots: RMS of the parts per step; relative change to the final (log)."),
                io.String.Output("stats", display_name="stats_json", tooltip="All numbers as JSON."),
                io.Float.Output("suggested_cutoff", display_name="suggested_cutoff",
                                tooltip="Fraction of the steps that need guidance (cutoff_unit 'fraction' of "
                                        "GuidanceCutoffKSampler)."),
            ],
        )

    @classmethod
    def execute(cls, record, latent, vae=None, batch_index=0, settle_threshold=0.1,
                cutoff_signal="x0", grid_over="steps", grid_step=-1) -> io.NodeOutput:
        records.RecordHandle.expect(record, "frequency", "FrequencySplitPreview")
        if not (math.isfinite(settle_threshold) and settle_threshold > 0):
            raise ValueError(f"settle_threshold must be > 0, got {settle_threshold}: it is a relative change "
                             f"(e.g. 0.1 = within 10 % of the final).")
        if cutoff_signal not in CUTOFF_SIGNALS:
            raise ValueError(f"cutoff_signal must be one of {', '.join(CUTOFF_SIGNALS)}, got {cutoff_signal!r}.")
        if grid_over not in GRID_OVER:
            raise ValueError(f"grid_over must be one of {', '.join(GRID_OVER)}, got {grid_over!r}.")
        samples = latent.get("samples") if isinstance(latent, dict) else None
        run, matched = record.find(samples)
        if run is None:
            raise ValueError("FrequencySplitViewer: the recorder has no finished sampling run yet. Connect the MODEL "
                             "output of FrequencySplitPreview to the sampler whose LATENT feeds this viewer.")
        if not 0 <= batch_index < run.batch:
            raise ValueError(f"batch_index {batch_index} is out of range: the recorded run has {run.batch} image(s) "
                             f"(use 0..{run.batch - 1}).")
        pbar = comfy.utils.ProgressBar(3)  # summary, grid (VAE decodes), plots: about a second on a CPU
        summary = run_summary(run, batch_index, float(settle_threshold), cutoff_signal)
        summary["matched_latent"] = matched
        text = summary_text(summary, matched)
        summary["summary"] = text
        pbar.update(1)
        grid = run_grid(run, batch_index, vae) if grid_over == "steps" else \
            run_frames_grid(run, batch_index, vae, int(grid_step))
        pbar.update(1)
        plots = run_plots(summary)
        pbar.update(1)
        preview = drawing.stack_padded([grid, plots[0:1], plots[1:2]])
        return io.NodeOutput(grid, plots, to_json(summary), float(summary["suggested_cutoff"]),
                             ui=_ui(preview, text, cls))


# ----------------------------------------------------------------------------------------------
# node: noising analysis
# ----------------------------------------------------------------------------------------------
# by family (the registry's latent format of each); option names are permanent once workflows save them
LATENT_FORMATS = {f.name: getattr(comfy.latent_formats, f.latent_format) for f in families.FAMILIES}
LATENT_FORMAT_OPTIONS = ("from_model",) + tuple(LATENT_FORMATS) + ("as_is",)


def _resolve_latent_format(name: str, model):
    if name == "from_model":
        if model is None:
            return None
        return model.model.latent_format
    if name == "as_is":
        return None
    if name not in LATENT_FORMATS:
        raise ValueError(f"latent_format must be one of {', '.join(LATENT_FORMAT_OPTIONS)}, got {name!r}.")
    return LATENT_FORMATS[name]()


def noising_grid(x0: torch.Tensor, noise: torch.Tensor, schedule: Schedule, columns: int, threshold: float,
                 space: str, vae=None, latent_format=None) -> torch.Tensor:
    """Rows x_t, x_t low, x_t high of the first item; columns = evenly spaced timesteps of ``schedule``."""
    k = len(schedule.timesteps)
    cols = sorted({math.floor(c * (k - 1) / (columns - 1) + 0.5) for c in range(columns)}) if columns > 1 else [k - 1]
    cells = []
    for c in cols:
        xt = schedule.signal[c] * x0[:1].float() + schedule.noise[c] * noise[:1].float()
        lo, hi = split_frequencies(xt, threshold)
        cells.append((xt, lo, hi))
    flat = torch.cat([cells[c][r] for r in range(3) for c in range(len(cols))])
    if space == "pixel":
        images = ((flat + 1.0) / 2.0).clamp(0, 1).movedim(1, -1)
    else:
        images = decode_cells(flat, vae, latent_format)
    labels = [f"t = {schedule.timesteps[c]}\nsqrt(abar) {schedule.signal[c]:.3f}" for c in cols]
    return labelled_grid(images, 3, len(cols), ("x_t", "x_t low", "x_t high"), labels)


def noising_plots(curves: dict, schedule_name: str) -> torch.Tensor:
    t = curves["timesteps"]
    norm = line_plot([("sqrt(abar) x0 low", t, curves["signal_low"], COLORS["low"], False),
                      ("sqrt(abar) x0 high", t, curves["signal_high"], COLORS["high"], False),
                      ("sqrt(1-abar) eps low", t, curves["noise_low"], COLORS["low2"], True),
                      ("sqrt(1-abar) eps high", t, curves["noise_high"], COLORS["high2"], True)],
                     title=f"forward noising, RMS of the parts ({schedule_name})", xlabel="timestep t",
                     ylabel="RMS (log)", log_y=True)
    change = line_plot([("low: ||x_t - x0|| / ||x0||", t, curves["rel_change_low"], COLORS["low"], False),
                        ("high: ||x_t - x0|| / ||x0||", t, curves["rel_change_high"], COLORS["high"], False)],
                       title="forward noising, relative change of the parts", xlabel="timestep t",
                       ylabel="rel. change (log)", log_y=True)
    return pil_to_image([norm, change])


def noising_text(curves: dict, space: str) -> str:
    lo, hi = curves["noise_exceeds_signal_low_at"], curves["noise_exceeds_signal_high_at"]
    last = curves["timesteps"][-1]

    def at(v):
        return f"t = {v}" if v is not None else f"never (up to t = {last})"

    return "\n".join([
        f"{space} space, schedule {curves['schedule']}, low band = lowest {curves['threshold']:.0%} of the spectrum.",
        f"x0 energy in the low band: {curves['x0_low_energy_fraction']:.1%}; RMS x0 low {curves['x0_low_rms']:.4g}, "
        f"x0 high {curves['x0_high_rms']:.4g}; noise RMS low {curves['eps_low_rms']:.4g}, "
        f"high {curves['eps_high_rms']:.4g}.",
        f"Noise outweighs the signal in the high band from {at(hi)}, in the low band from {at(lo)}.",
        f"Relative change at the last timestep: low {curves['rel_change_low'][-1]:.3g}, high "
        f"{curves['rel_change_high'][-1]:.3g}.",
    ])


class FrequencyNoisingAnalysis(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FrequencyNoisingAnalysis",
            display_name="Frequency Noising Analysis",
            category=CATEGORY,
            description="Simulates the forward process x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps on your image or "
                        "latent and plots paper 1's Fig. 2b/2c ('Add_Noise'): the norms of the low/high parts of the "
                        "signal and of the noise, and the relative change of each part — high frequencies drown "
                        "early, low frequencies (the shape) survive until the end. No sampling needed.",
            inputs=[
                io.Image.Input("image", optional=True,
                               tooltip="An image (e.g. a photo). Analysed in pixel space (scaled to -1..1), or in the "
                                       "latent space of the VAE if one is connected (the paper's setting)."),
                io.Latent.Input("latent", optional=True,
                                tooltip="A latent instead of an image (exactly one of the two)."),
                io.Vae.Input("vae", optional=True,
                             tooltip="With an image: encode it to this VAE's latent space first. With a latent: decode "
                                     "the grid (else approximate colours)."),
                io.Model.Input("model", optional=True,
                               tooltip="Source of the noise schedule (schedule 'from_model') and of the latent scaling "
                                       "(latent_format 'from_model')."),
                io.Combo.Input("schedule", options=list(SCHEDULE_OPTIONS), default="sd1_scaled_linear",
                               tooltip="from_model: the connected MODEL's schedule. sd1_scaled_linear: betas "
                                       "linspace(sqrt(0.00085), sqrt(0.012), 1000)^2 (SD1/SD2/SDXL). ddpm_linear: "
                                       "linspace(1e-4, 0.02, 1000). cosine: Nichol & Dhariwal. rectified_flow: "
                                       "x_t = (1-t) x0 + t eps. sd3_flow_shift3: SD3's shifted flow. Flow schedules "
                                       "are shown in variance-preserving form (same signal-to-noise ratio)."),
                io.Combo.Input("latent_format", options=list(LATENT_FORMAT_OPTIONS), default="from_model",
                               tooltip="How a latent (or the VAE encoding of the image) is scaled into the diffusion "
                                       "model's space before noising (SD1 multiplies by 0.18215, ...). from_model uses "
                                       "the connected MODEL; as_is uses the latent unchanged."),
                io.Float.Input("threshold", default=DEFAULT_THRESHOLD, min=0.001, max=0.999, step=0.01,
                               tooltip=_THRESHOLD_TOOLTIP),
                io.Int.Input("points", default=50, min=2, max=1000,
                             tooltip="Timesteps evaluated, evenly spaced over the schedule (50 = the paper's 50 DDIM "
                                     "steps, t = 20, 40, ..., 1000)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=False,
                             tooltip="Seed of the Gaussian noise eps."),
                io.Int.Input("grid_columns", default=6, min=1, max=20,
                             tooltip="Timesteps shown in the grid (evenly spaced, first and last included)."),
            ],
            outputs=[
                io.Image.Output("grid", display_name="grid", tooltip="Rows x_t, x_t low, x_t high over timesteps."),
                io.Image.Output("plots", display_name="plots",
                                tooltip="Two plots: RMS of signal/noise parts; relative change of the parts."),
                io.String.Output("stats", display_name="stats_json", tooltip="All numbers as JSON."),
            ],
        )

    @classmethod
    def execute(cls, image=None, latent=None, vae=None, model=None, schedule="sd1_scaled_linear",
                latent_format="from_model", threshold=DEFAULT_THRESHOLD, points=50, seed=0,
                grid_columns=6) -> io.NodeOutput:
        threshold = validate_threshold(threshold)
        if (image is None) == (latent is None):
            raise ValueError("FrequencyNoisingAnalysis needs exactly one of image or latent: connect an IMAGE (e.g. "
                             "LoadImage) or a LATENT, not " + ("both." if image is not None else "neither."))
        if schedule == "from_model":
            if model is None:
                raise ValueError("schedule 'from_model' needs the model input: connect a MODEL or pick a named "
                                 "schedule (e.g. sd1_scaled_linear).")
            sched = model_schedule(model.get_model_object("model_sampling"), points)
        else:
            sched = named_schedule(schedule, points)
        space = "pixel" if image is not None and vae is None else "latent"
        fmt = None
        if space == "latent":
            if latent_format == "from_model" and model is None:
                raise ValueError("latent_format 'from_model' needs the model input to scale the latent into the "
                                 "diffusion model's space: connect the MODEL or pick sd1/sdxl/sd3/flux/as_is.")
            fmt = _resolve_latent_format(latent_format, model)
        if image is not None:
            check_tensor(image, "image")
            if space == "pixel":
                x0 = image[..., :3].movedim(-1, 1).float() * 2.0 - 1.0
            else:
                with torch.no_grad():
                    x0 = vae.encode(image[..., :3]).detach().float().cpu()
        else:
            x0 = _latent_samples(latent, "latent").float().cpu()
            check_tensor(x0, "latent")
        if fmt is not None:
            x0 = fmt.process_in(x0)
        gen = torch.Generator(device="cpu").manual_seed(int(seed) & 0xFFFFFFFFFFFFFFFF)
        noise = torch.randn(x0.shape, generator=gen, dtype=torch.float32)
        curves = noising_curves(x0, noise, sched, threshold)
        curves.update({"schedule": sched.name, "schedule_kind": sched.kind, "space": space, "threshold": threshold,
                       "low_radius_cycles_per_pixel": low_radius(threshold), "shape": list(x0.shape),
                       "seed": int(seed)})
        text = noising_text(curves, space)
        curves["summary"] = text
        grid = noising_grid(x0, noise, sched, int(grid_columns), threshold, space, vae, fmt)
        plots = noising_plots(curves, sched.name)
        preview = drawing.stack_padded([grid, plots[0:1], plots[1:2]])
        return io.NodeOutput(grid, plots, to_json(curves), ui=_ui(preview, text, cls))


NODES = [FrequencySplitPreview, FrequencySplitViewer, FrequencySplit, FrequencySplitImage, FrequencyMerge,
         FrequencyMergeImage, FrequencyNoisingAnalysis]

