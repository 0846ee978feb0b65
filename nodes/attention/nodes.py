"""The attention nodes: CrossAttentionCapture (records maps while a sampler runs) and CrossAttentionMapViewer
(draws them); the logic is in :mod:`.capture` and :mod:`.viewer`."""

from __future__ import annotations

import json

from comfy_api.latest import io, ui

from ..core import records
from ..shared import drawing
from .capture import DEFAULT_BUCKETS, MAX_BUCKETS, NORMALISE, ROW_ROLES, install_capture
from .viewer import SCALES, render_view

CATEGORY = "prompt_anatomy/attention"
AttentionRecord = io.Custom("PA_ATTENTION_RECORD")
NORMALISE_TIP = ("Joint-attention models (SD3, Flux, Qwen-Image, Lumina 2, ...): all_keys normalises each pixel's weights "
                 "over every key, as the model does, and keeps the weight left for the image keys as the '[image]' "
                 "channel (one more attention pass per captured block); text_keys normalises over the prompt's tokens "
                 "only (no '[image]' channel; about half the cost on Flux at 1024²). UNets and cross-attention models attend "
                 "to the text only: both are the same there.")


# ----------------------------------------------------------------------------------------------
class CrossAttentionCapture(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CrossAttentionCapture",
            display_name="Cross-Attention Capture",
            category=CATEGORY,
            description=(
                "Records the text cross-attention maps (softmax(QKᵀ/√d), averaged over heads) of the chosen layers "
                "while any sampler runs with the returned MODEL — for CrossAttentionMapViewer (paper 1, Fig. 1 and "
                "3). The maps are running sums (whole run + step buckets), so memory does not grow with the steps; "
                "the sampled image is bit-identical to an uncaptured run. UNets (SD1.x, SD2.x, SDXL: cross-attention), "
                "the joint-attention DiTs of the family registry (SD3, Flux.1, Flux.2, Chroma, Qwen-Image, AuraFlow, "
                "and the single-stream Lumina 2 and Z-Image: image queries against the text keys), the "
                "cross-attention of Wan 2.1 / 2.2 models (video queries against the text keys, maps kept per latent "
                "frame) and of PixArt α / Σ and Hunyuan-DiT."),
            inputs=[
                io.Model.Input("model", tooltip="The model to record (cloned; the input stays unchanged). Sample "
                                                "with the MODEL output."),
                io.String.Input("layers", default="all",
                                tooltip="Which attention layers to record: 'all', forward-order indices and ranges "
                                        "('0-3, 8'), group names (UNet: input, middle, output; SD3: joint; Flux: "
                                        "double, single; Wan: cross) or labels like 'output.3.0' (block, block id, depth). The "
                                        "maps are averaged over the chosen layers."),
                io.Combo.Input("rows", options=list(ROW_ROLES), default="positive",
                               tooltip="Whose attention to record: the positive prompt's rows (default) or the "
                                       "negative prompt's. Rows are found by the conditionings' ids, so batch > 1 "
                                       "and any guider work."),
                io.Int.Input("buckets", default=DEFAULT_BUCKETS, min=1, max=MAX_BUCKETS,
                             tooltip="Time slices with their own maps (10 = each tenth of the steps; fewer when "
                                     "the run has fewer steps). Memory is fixed by this, not by the step count."),
                io.Combo.Input("normalise", options=list(NORMALISE), default="all_keys", optional=True,
                               tooltip=NORMALISE_TIP),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The recording model: sample with it."),
                AttentionRecord.Output("record", display_name="record",
                                       tooltip="Handle to the recorded runs: connect to CrossAttentionMapViewer."),
            ],
        )

    @classmethod
    def execute(cls, model, layers="all", rows="positive", buckets=DEFAULT_BUCKETS,
                normalise="all_keys") -> io.NodeOutput:
        m, handle = install_capture(model, layers, rows, int(buckets), normalise)
        return io.NodeOutput(m, handle)


class CrossAttentionMapViewer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CrossAttentionMapViewer",
            display_name="Cross-Attention Map Viewer",
            category=CATEGORY,
            is_output_node=True,
            description=(
                "Shows what Cross-Attention Capture recorded (paper 1, Fig. 1, 3, 12): per-token heat maps and overlays "
                "(whole-run mean), the share of [SOS] / semantic / [EOS] / padding per step, the maps per step bucket "
                "(early to late, also as an animation batch) and the shape convergence F1_t / F1_last between Canny "
                "edges of the maps and of the final image. Pick tokens by clicking them in the node after a run. Video "
                "records (Wan): maps per latent frame — time_slices is a grid of (token, frame) rows x step buckets, "
                "video_frames one image per latent frame."),
            inputs=[
                AttentionRecord.Input("record", tooltip="The record output of Cross-Attention Capture."),
                io.String.Input("text", multiline=True, dynamic_prompts=False, default="",
                                tooltip="The text of the recorded prompt (the positive one unless the capture records "
                                        "negative rows), to label the tokens. Share one text node with the "
                                        "CLIPTextEncode."),
                io.Latent.Input("latent", optional=True,
                                tooltip="The LATENT of the sampler that used the capture MODEL: runs this node after "
                                        "sampling and picks that run."),
                io.Image.Input("image", optional=True,
                               tooltip="The decoded image, for the overlays and the Canny edges (video: the decoded "
                                       "frames). Without it the latent's approximate colours are used."),
                io.Clip.Input("clip", optional=True,
                              tooltip="The CLIP that encoded the prompt (exact tokens, embeddings, weights): the text "
                                      "is re-encoded and must match the recorded prompt token by token (an error says "
                                      "where it differs). Without it the stock tokenizer of the model family is used "
                                      "and only the token count is checked; Wan's UMT5 tokenizer ships inside its text "
                                      "encoder, so without the CLIP Wan tokens are labelled by position only."),
                io.String.Input("tokens", default="auto",
                                tooltip="Which maps to show: context positions ('1, 2, 5'), ranges summed into one map "
                                        "('8-76'), class words sos / eos / sem / pad, img (SD3/Flux: weight on image "
                                        "keys), or auto (every semantic token + the first [EOS] of each chunk). Click "
                                        "the token chips in the node to edit it."),
                io.Int.Input("batch_index", default=0, min=0, max=4095, tooltip="Which image of the batch to show."),
                io.Combo.Input("scale", options=list(SCALES), default="per_map",
                               tooltip="Colour scale of the heat maps: per_map stretches each map to its own min-max "
                                       "(shapes); shared uses one scale for all shown maps (compare strengths)."),
                io.Int.Input("edge_tolerance", default=2, min=0, max=32,
                             tooltip="Shape convergence: Canny edge pixels of map and image count as matched within "
                                     "this many pixels (on images resized to 128 px on the long side)."),
            ],
            outputs=[
                io.Image.Output("heatmaps", display_name="heatmaps",
                                tooltip="Labelled grid: each chosen token's mean map (row 1) and overlay (row 2), with "
                                        "its mean share of the attention."),
                io.Image.Output("overlays", display_name="overlays",
                                tooltip="One overlay per chosen token at image size."),
                io.Image.Output("class_shares", display_name="class_shares",
                                tooltip="Plot: share of [SOS] / semantic / [EOS] / padding (/ [image]) per step."),
                io.Image.Output("time_slices", display_name="time_slices",
                                tooltip="Grid: tokens x step buckets (early to late), one colour scale per token. Video "
                                        "records: (token, latent frame) rows x step buckets."),
                io.Image.Output("animation", display_name="animation",
                                tooltip="One frame per step bucket (all chosen tokens), for an animated preview."),
                io.Image.Output("convergence", display_name="convergence",
                                tooltip="Plot: F1_t / F1_last of the Canny edges of the maps vs the final image."),
                io.String.Output("summary", display_name="summary_json", tooltip="All numbers as JSON."),
                io.Image.Output("video_frames", display_name="video_frames",
                                tooltip="Video records (Wan): one image per latent frame, the chosen tokens' whole-run "
                                        "maps on that frame over the decoded frame (an animation of the maps over the "
                                        "video). Image records: the heat-map grid once."),
            ],
        )

    @classmethod
    def execute(cls, record, text, latent=None, image=None, clip=None, tokens="auto", batch_index=0,
                scale="per_map", edge_tolerance=2) -> io.NodeOutput:
        records.RecordHandle.expect(record, "attention", "Cross-Attention Capture")
        samples = latent.get("samples") if isinstance(latent, dict) else None
        run, matched = record.find(samples)
        if run is None:
            raise ValueError("Cross-Attention Map Viewer: the capture has no finished sampling run yet. Connect the MODEL "
                             "output of Cross-Attention Capture to the sampler whose LATENT (or decoded IMAGE) feeds "
                             "this viewer.")
        if not run.sums:
            raise ValueError(f"the recorded run has no maps: no {run.rows} rows reached the chosen layers "
                             f"({'; '.join(f'{v}× {k}' for k, v in run.skipped.items()) or 'no attention seen'}). "
                             f"Check that the capture's MODEL is the one sampled and that the {run.rows} prompt is used.")
        if latent is None and image is None:
            matched = False
        view = render_view(run, matched, text, clip=clip, image=image, tokens=tokens, batch_index=int(batch_index),
                           scale=scale, edge_tolerance=int(edge_tolerance))
        preview = drawing.stack_padded([view.heatmaps, view.class_plot, view.convergence])
        ui_out = ui.PreviewImage(preview, cls=cls).as_dict()
        ui_out["text"] = (view.text,)
        ui_out["pa_tokens"] = view.chips
        ui_out["pa_selected"] = [it.key for it in view.items]
        return io.NodeOutput(view.heatmaps, view.overlays, view.class_plot, view.time_slices, view.animation,
                             view.convergence, json.dumps(view.summary, indent=1), view.video_frames, ui=ui_out)


NODES = [CrossAttentionCapture, CrossAttentionMapViewer]
