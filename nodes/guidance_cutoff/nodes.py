"""The guidance-cutoff nodes: GuidanceCutoffKSampler, GuidanceCutoffGuider and GuidanceCutoffPatch (the logic is
in :mod:`.logic`)."""

from __future__ import annotations

import time

import comfy.samplers
from comfy_api.latest import io, ui

import nodes as comfy_nodes  # ComfyUI's top-level nodes.py (our own package is imported relatively)

from ..core import records as core_records
from ..core import runs
from .logic import (
    ADAPTIVE_MODES,
    KEEP_MODES,
    CutoffRun,
    CutoffSettings,
    apply_cutoff,
    format_report,
    format_total,
    newest_schedule,
)

CutoffRecord = io.Custom("PA_CUTOFF_RECORD")
RECORD_KIND = "guidance_cutoff"

_KEEP_TOOLTIP = ("Which prediction to keep after the cutoff. 'negative' is paper 1's eq. 9: only the unconditional "
                 "(negative-prompt) prediction — identical to the paper when the negative prompt is empty. 'positive' "
                 "keeps the positive prediction (cfg 1), what A1111/Forge and most tools do. Both save the same compute.")


_FULL_SIGMAS_TOOLTIP = ("Optional: the whole schedule when sampling is split over several samplers (KSamplerAdvanced "
                        "start_at_step/end_at_step, or SplitSigmas into two SamplerCustomAdvanced; e.g. Wan 2.2's two "
                        "experts): a BasicScheduler with the same model, scheduler and steps (denoise 1.0; steps + 1 for "
                        "uni_pc, uni_pc_bh2, dpm_2, dpm_2_ancestral, which ComfyUI samples that way). A fraction "
                        "or step cutoff then counts steps of the whole schedule and lands on the same step whichever "
                        "sampler runs it. Not needed for cutoff_unit 'sigma', which is the same in every part.")


def cutoff_inputs() -> list:
    return [
        io.Float.Input("cutoff", default=0.6, min=0.0, max=10000.0, step=0.01,
                       tooltip="Where guidance stops: the first step at or after this point, and every later step, runs "
                               "a single branch. Unit set by cutoff_unit. Paper 1 Table 2 (SD1.5, DDIM 50): stopping at 0.6 "
                               "of the steps (a = 20) saved 18.1 % of the time with CLIP score 0.996 of full CFG; at 0.4 "
                               "(a = 30) 27.2 % with 0.971."),
        io.Combo.Input("cutoff_unit", options=list(runs.CUTOFF_UNITS), default="fraction",
                       tooltip="fraction: of the sampling steps (0.6 = the last 40 % run single-branch); step: index of "
                               "the first single-branch step (0-based, 'steps' = never); sigma: the first step whose "
                               "sigma is at or below this value."),
        io.Combo.Input("keep", options=list(KEEP_MODES), default="negative", tooltip=_KEEP_TOOLTIP),
        io.Combo.Input("adaptive", options=list(ADAPTIVE_MODES), default="off",
                       tooltip="off: fixed cutoff. cosine: stop guidance once the positive and negative predictions agree "
                               "(cosine ≥ cosine_threshold). low_frequency: stop once the low-frequency part (the shape) "
                               "of the prediction has stopped changing (relative change < lowfreq_threshold). The fixed "
                               "cutoff stays the latest allowed switch."),
        io.Float.Input("cosine_threshold", default=0.98, min=0.0, max=1.0, step=0.001,
                       tooltip="adaptive=cosine: switch when cosine(positive, negative prediction) ≥ this, in (0, 1]."),
        io.Float.Input("lowfreq_threshold", default=0.02, min=0.0, max=1.0, step=0.001,
                       tooltip="adaptive=low_frequency: switch when the low-frequency part of the prediction changes by "
                               "less than this fraction between steps, in (0, 1]."),
    ]


class GuidanceCutoffKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GuidanceCutoffKSampler",
            display_name="KSampler (Guidance Cutoff)",
            category="prompt_anatomy/guidance",
            description="KSampler that runs classifier-free guidance only for the early steps (paper 1, eq. 9): after "
                        "the cutoff each step evaluates one branch, saving up to ~half the compute of those steps.",
            inputs=[
                io.Model.Input("model", tooltip="The model used for denoising the input latent."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="The random seed used for creating the noise."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="The number of sampling steps."),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale used before the cutoff."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS,
                               tooltip="The sampling algorithm (2nd-order samplers apply the cutoff per step, to both "
                                       "of their model calls)."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS,
                               tooltip="The scheduler controls how noise is removed over the steps."),
                io.Conditioning.Input("positive", tooltip="The conditioning describing what you want in the image."),
                io.Conditioning.Input("negative", tooltip="The conditioning describing what to exclude (empty for the "
                                                          "paper's unconditional branch)."),
                io.Latent.Input("latent_image", tooltip="The latent image to denoise."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="The amount of denoising; cutoff fractions and steps refer to the steps actually "
                                       "run."),
                *cutoff_inputs(),
            ],
            outputs=[
                io.Latent.Output(display_name="LATENT", tooltip="The denoised latent."),
                io.String.Output(display_name="report", tooltip="Model rows run vs plain CFG, where guidance "
                                                                "stopped, and the measured time."),
            ],
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                denoise=1.0, cutoff=0.6, cutoff_unit="fraction", keep="negative", adaptive="off",
                cosine_threshold=0.98, lowfreq_threshold=0.02) -> io.NodeOutput:
        settings = CutoffSettings(cutoff, cutoff_unit, keep, adaptive, cosine_threshold, lowfreq_threshold)
        settings.validate(steps=steps if cutoff_unit == "step" else None)
        records: list[CutoffRun] = []
        m = apply_cutoff(model, settings, on_report=records.append)
        start = time.perf_counter()
        (out,) = comfy_nodes.common_ksampler(m, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                             latent_image, denoise=denoise)
        seconds = time.perf_counter() - start
        batch = latent_image["samples"].shape[0]
        report = format_report(records[-1], settings, seconds, batch) if records else \
            f"No sampling run happened (denoise {denoise} leaves no steps). Sampling time: {seconds:.2f} s."
        return io.NodeOutput(out, report, ui=ui.PreviewText(report))


class GuidanceCutoffGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GuidanceCutoffGuider",
            display_name="Guidance Cutoff Guider",
            category="prompt_anatomy/guidance",
            description="A CFG guider for SamplerCustomAdvanced that stops classifier-free guidance after the cutoff "
                        "(paper 1, eq. 9), evaluating one branch per step afterwards.",
            inputs=[
                io.Model.Input("model", tooltip="The model used for denoising."),
                io.Conditioning.Input("positive", tooltip="The conditioning describing what you want in the image."),
                io.Conditioning.Input("negative", tooltip="The conditioning describing what to exclude."),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale used before the cutoff."),
                *cutoff_inputs(),
                io.Sigmas.Input("full_sigmas", optional=True, tooltip=_FULL_SIGMAS_TOOLTIP),
            ],
            outputs=[io.Guider.Output(tooltip="Plug into SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, cfg, cutoff=0.6, cutoff_unit="fraction", keep="negative",
                adaptive="off", cosine_threshold=0.98, lowfreq_threshold=0.02, full_sigmas=None) -> io.NodeOutput:
        settings = CutoffSettings(cutoff, cutoff_unit, keep, adaptive, cosine_threshold, lowfreq_threshold)
        guider = comfy.samplers.CFGGuider(apply_cutoff(model, settings, full_sigmas=full_sigmas))
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return io.NodeOutput(guider)


class GuidanceCutoffPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GuidanceCutoffPatch",
            display_name="Guidance Cutoff (model patch)",
            category="prompt_anatomy/guidance",
            description="Patches a MODEL so that the stock KSampler (or another pack's sampler) stops classifier-free "
                        "guidance after the cutoff (paper 1, eq. 9). Composes with other wrappers; the report goes "
                        "to the server log and to the record output (GuidanceCutoffReport). For a schedule split "
                        "over two KSamplerAdvanced nodes (Wan 2.2's high- and low-noise experts) connect full_sigmas: "
                        "the cutoff then refers to the whole schedule.",
            inputs=[io.Model.Input("model", tooltip="The model to patch (it is cloned; the input stays unchanged)."),
                    *cutoff_inputs(),
                    io.Sigmas.Input("full_sigmas", optional=True, tooltip=_FULL_SIGMAS_TOOLTIP)],
            outputs=[io.Model.Output(tooltip="The patched model."),
                     CutoffRecord.Output("record", display_name="record",
                                         tooltip="The reports of the runs sampled with the patched model: connect to "
                                                 "GuidanceCutoffReport (add up the two parts of a split run).")],
        )

    @classmethod
    def execute(cls, model, cutoff=0.6, cutoff_unit="fraction", keep="negative", adaptive="off",
                cosine_threshold=0.98, lowfreq_threshold=0.02, full_sigmas=None) -> io.NodeOutput:
        settings = CutoffSettings(cutoff, cutoff_unit, keep, adaptive, cosine_threshold, lowfreq_threshold)
        handle = core_records.RecordHandle(RECORD_KIND, settings)
        return io.NodeOutput(apply_cutoff(model, settings, on_report=handle.publish, full_sigmas=full_sigmas), handle)


class GuidanceCutoffReport(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GuidanceCutoffReport",
            display_name="Guidance Cutoff Report",
            category="prompt_anatomy/guidance",
            description="Adds up what GuidanceCutoffPatch saved over a sampling run split across samplers (e.g. Wan "
                        "2.2's high-noise expert on steps 0..k and the low-noise expert on k..N): model rows "
                        "evaluated vs plain CFG, exact counts, and where guidance stopped in each part.",
            inputs=[
                CutoffRecord.Input("record", tooltip="The record output of a GuidanceCutoffPatch."),
                io.Latent.Input("latent", tooltip="The LATENT of the last sampler of the split run (orders this node "
                                                  "after sampling)."),
                CutoffRecord.Input("record_2", optional=True,
                                   tooltip="The record of a second GuidanceCutoffPatch (the other expert's model), if "
                                           "the parts use different models."),
            ],
            outputs=[io.String.Output(display_name="report",
                                      tooltip="Rows evaluated and saved over all parts, then one line per part.")],
        )

    @classmethod
    def execute(cls, record, latent, record_2=None) -> io.NodeOutput:
        handles = [core_records.RecordHandle.expect(record, RECORD_KIND, "GuidanceCutoffPatch")]
        if record_2 is not None and record_2 is not record:
            handles.append(core_records.RecordHandle.expect(record_2, RECORD_KIND, "GuidanceCutoffPatch"))
        runs_ = newest_schedule([r for h in handles for r in h.runs])
        report = format_total(runs_)
        return io.NodeOutput(report, ui=ui.PreviewText(report))


NODES = [GuidanceCutoffKSampler, GuidanceCutoffGuider, GuidanceCutoffPatch, GuidanceCutoffReport]
