"""The EOSConditioningSwap node: tokenize, encode, construct, and the token table."""

from __future__ import annotations

import uuid

from comfy_api.latest import io, ui

from ..core import LOG, families, hooks, runs
from ..core.errors import InternalError
from ..shared.tokens import Layout, detect_layout, semantic_count, token_positions, token_text
from .construct import (
    CONSTRUCTIONS,
    EOS_SCOPES,
    KV_MODES,
    POOLED_FROM,
    SWAP_CONSTRUCTIONS,
    Construction,
    build_construction,
    pooled_donor,
    range_sigmas,
    repeat_semantic_tokens,
    split_by_range,
    validate_range,
)
from .kv import KV_HOOK_KEY, check_model, make_kv_patch
from .steps import RANGE_UNITS, split_by_steps
from .steps import install as install_step_windows

NODE_ID = "EOSConditioningSwap"


def _span(a: int, b: int) -> str:
    return str(a) if a == b else f"{a}–{b}"


def format_table(layout: Layout, header: list[str], result: Construction, pooled_line: str) -> str:
    """Readable token table: one line per position, runs of identical padding and of chat-template tokens
    collapsed."""
    lines = list(header)
    for part in layout.parts:
        rows = result.provenance.get(part.key, [])
        if not rows:
            continue
        if not part.encoded:
            lines.append(f"\n{part.label} (key '{part.key}'): not in this CLIP ({layout.label} without it); its "
                         f"tokens would occupy positions {rows[0].pos}–{rows[-1].pos}.")
            continue
        if part.channels is None and not part.in_entry:
            eos = [r.pos for r in rows if r.klass == "[EOS]"]
            lines.append(f"\n{part.label} (key '{part.key}'): not in the context, gives the pooled vector only "
                         f"([EOS] at position {eos[0] if eos else '?'}).")
            continue
        where = f"'{part.cond_key}' tokens" if part.in_entry else "context tokens"
        layers = ", every layer" if part.in_entry and part.token_axis != 1 else ""
        lines.append(f"\n{part.label} · key '{part.key}' · {where} {rows[0].pos}–{rows[-1].pos}{layers} · channels "
                     f"{part.channels[0]}–{part.channels[1] - 1}")
        if part.drops_head:
            lines.append("(the encoder cuts the chat template's head off its output: the context starts at the "
                         "prompt)")
        lines.append(f"{'pos':>9}  {'token':<22} {'class':<9} from")
        merged: list[dict] = []  # runs of identical padding rows (same token, source, source step) and of template rows
        for r in rows:
            text = token_text(part, r.token)
            m = merged[-1] if merged else None
            same = m is not None and m["klass"] == r.klass and (m["text"] == text or r.klass == "template")
            if (same and r.klass != "semantic" and m["source"] == r.source and r.pos == m["last"] + 1):
                if r.source_pos is None and m["sp_last"] is None:
                    m["last"] = r.pos
                    continue
                if r.source_pos is not None and m["sp_last"] is not None:
                    step = r.source_pos - m["sp_last"]
                    if step in (0, 1) and m["step"] in (None, step):
                        m.update(last=r.pos, sp_last=r.source_pos, step=step, text_last=text)
                        continue
            merged.append({"first": r.pos, "last": r.pos, "text": text, "klass": r.klass, "source": r.source,
                           "sp_first": r.source_pos, "sp_last": r.source_pos, "step": None, "text_last": text})
        for m in merged:
            first, last, text, klass = m["first"], m["last"], m["text"], m["klass"]
            if klass == "template" and last > first:
                text = f"{text} … {m['text_last']}"
            if m["sp_first"] is None:
                frm = m["source"]
            elif m["step"] == 0:
                frm = f"{m['source']} {m['sp_first']} (×{last - first + 1})"
            else:
                frm = f"{m['source']} {_span(m['sp_first'], m['sp_last'])}"
            if len(text) > 22:
                text = text[:21] + "…"
            lines.append(f"{_span(first, last):>9}  {text:<22} {klass:<9} {frm}")
    lines.append("")
    lines.append(pooled_line)
    for note in result.notes:
        lines.append("note: " + note)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# the node
# ----------------------------------------------------------------------------------------------
def _refuse_text_extras(layout: Layout, conds: list, which: str) -> None:
    """The constructions rebuild the context only: a prompt whose text also reaches the model through another
    conditioning entry (the registry's ``text_extras``: HunyuanImage's ByT5 glyphs of quoted text) is refused."""
    rebuilt = {k for spec in layout.family.encoders for k in (spec.cond_key, spec.mask_key) if k}
    for key, _ in layout.family.text_extras:
        if key not in rebuilt and any(d.get(key) is not None for _, d in conds):
            raise ValueError(f"{which}: on {layout.family.label} the prompt's quoted text is also encoded into "
                             f"'{key}' (glyph tokens next to the prompt), which the [EOS] constructions do not "
                             f"rebuild: a swap would change the {layout.family.encoders[0].label} states and keep the "
                             f"source's glyphs. Remove the quotation marks from both prompts (the words stay in the "
                             f"prompt).")


def _positions_checked(layout: Layout, tokens: dict, which: str, text: str) -> dict:
    pos = token_positions(layout, tokens)
    if not text.strip() or semantic_count(layout, pos) == 0:
        raise ValueError(f"{which} is empty (no tokens between [SOS] / the chat template and [EOS]): the "
                         f"constructions need its semantic and [EOS] tokens. Type a prompt into {which}.")
    return pos


def swap_conditioning(clip, source_text: str, target_text: str, construction: str = "source_sem+target_eos",
                      eos_scope: str = "all_eos_and_padding", pooled: str = "follow_eos", start_percent: float = 0.0,
                      end_percent: float = 1.0, kv: str = "key_and_value", seed: int = 0, repeat_count: int = 2,
                      model=None, range_unit: str = "timestep_percent"):
    """Everything the node does: returns (conditioning, model or None, token table)."""
    if construction not in CONSTRUCTIONS:
        raise ValueError(f"construction must be one of {', '.join(CONSTRUCTIONS)}, got {construction!r}.")
    if eos_scope not in EOS_SCOPES:
        raise ValueError(f"eos_scope must be one of {', '.join(EOS_SCOPES)}, got {eos_scope!r}.")
    if pooled not in POOLED_FROM:
        raise ValueError(f"pooled must be one of {', '.join(POOLED_FROM)}, got {pooled!r}.")
    if kv not in KV_MODES:
        raise ValueError(f"kv must be one of {', '.join(KV_MODES)}, got {kv!r}.")
    validate_range(start_percent, end_percent)
    if range_unit not in RANGE_UNITS:
        raise ValueError(f"range_unit must be one of {', '.join(RANGE_UNITS)}, got {range_unit!r}.")
    by_steps = range_unit == "step_fraction" and (start_percent > 0.0 or end_percent < 1.0)
    if by_steps and model is None:
        raise ValueError("range_unit=step_fraction: a fraction of the sampler's steps is known only while sampling, "
                         "so the MODEL input is needed (it is patched to pick the entry of each step). Connect the "
                         "MODEL and sample with the node's MODEL output, or use range_unit=timestep_percent.")
    if kv != "key_and_value" and model is None:
        raise ValueError(f"kv={kv} patches the model's cross-attention: connect the MODEL input (and sample with "
                         f"the MODEL output), or use kv=key_and_value.")
    layout = detect_layout(clip, NODE_ID)
    if layout.family.no_eos_swap:
        raise ValueError(f"clip: {NODE_ID} does not support {layout.family.label}'s text encoders: "
                         f"{layout.family.no_eos_swap}. Use the CLIP of another model family for this node.")
    donor = pooled_donor(construction, pooled)
    uses_b = construction in SWAP_CONSTRUCTIONS or donor == "B"

    tokens_a = clip.tokenize(source_text)
    pos_a = _positions_checked(layout, tokens_a, "source_text", source_text)
    tokens_b = pos_b = None
    if uses_b:
        tokens_b = clip.tokenize(target_text)
        pos_b = _positions_checked(layout, tokens_b, "target_text", target_text)
    conds_a = clip.encode_from_tokens_scheduled(tokens_a)
    conds_b = clip.encode_from_tokens_scheduled(tokens_b) if uses_b else None
    _refuse_text_extras(layout, conds_a, "source_text")
    _refuse_text_extras(layout, conds_b or [], "target_text")
    if model is not None:
        check_model(layout, model, kv, conds_a[0][0].shape[-1])

    base_a, pos_base, label = conds_a, pos_a, "A"
    if construction == "repeat_sem":
        tokens_r = repeat_semantic_tokens(layout, tokens_a, repeat_count)
        pos_base = token_positions(layout, tokens_r)
        base_a = clip.encode_from_tokens_scheduled(tokens_r)
        label = f"A×{repeat_count}"
    if conds_b is not None and len(conds_b) != len(conds_a) or len(base_a) != len(conds_a):
        raise InternalError("source and target encodings have different CLIP hook schedules")

    constructed, pairs, result = [], [], None
    for i, (_, da) in enumerate(conds_a):
        cb, db = (conds_b[i] if conds_b else (None, None))
        cbase = base_a[i][0]
        dbase = base_a[i][1] if construction == "repeat_sem" else da
        result = build_construction(layout, construction, eos_scope, cbase, pos_base, cb, pos_b, seed, label,
                                    dbase, db)
        if construction == "target_sem+source_eos":
            layout_cond, d = cb, dict(db)
        else:
            layout_cond, d = cbase, dict(dbase)
        d.update(result.entries)  # encoders whose states are an entry of their own (the masks stay the base's)
        d["pooled_output"] = (db if donor == "B" else da).get("pooled_output")
        if kv == "key_and_value":
            constructed.append([result.context, d])
        else:  # the entry carries the unswapped context; the attention patch swaps keys or values
            constructed.append([layout_cond, d])
            pairs.append((layout_cond, result.context))
    plain = [[c, dict(d)] for c, d in conds_a]
    conditioning = split_by_steps(constructed, plain, start_percent, end_percent) if by_steps else \
        split_by_range(constructed, plain, start_percent, end_percent)

    out_model = model
    if kv != "key_and_value" or by_steps:
        out_model = model.clone()
        runs.ensure_run_tracking(out_model)
    if by_steps:
        install_step_windows(out_model)
    if kv != "key_and_value":
        if by_steps:
            sig_start, sig_end, window = float("inf"), 0.0, (start_percent, end_percent)
        else:
            ms = model.get_model_object("model_sampling")
            (sig_start, sig_end), window = range_sigmas(ms, start_percent, end_percent), None
        key = f"{KV_HOOK_KEY}.{uuid.uuid4().hex}"  # each swap's patch only acts on rows carrying its own context
        hooks.set_attn2_patches(out_model, key, make_kv_patch(kv, pairs, sig_start, sig_end, window))

    header = [
        f"EOS Conditioning Swap · {layout.label}",
        f"construction {construction}" + (f" (×{repeat_count})" if construction == "repeat_sem" else "")
        + f" · eos_scope {eos_scope} · pooled {pooled} · kv {kv}",
        f"steps: constructed conditioning from {start_percent:.3f} to {end_percent:.3f} "
        + ("of the sampler's steps (step_fraction)" if range_unit == "step_fraction" else
           "of ComfyUI's timestep range (timestep_percent: sigma-based, the step count depends on the scheduler)")
        + (", plain source outside" if (start_percent > 0 or end_percent < 1) else " (every step)"),
        f"A (source): {source_text!r}",
        f"B (target): {target_text!r}" + ("" if uses_b else " (not used by this construction)"),
        f"result laid out on {result.base}'s tokens; classes: " + (
            "template (chat template before the prompt) semantic [EOS] (end-of-turn token after the prompt) "
            "padding (the template tokens after it)" if any(p.kind == families.LLM for p in layout.parts)
            else "[SOS] semantic [EOS] padding") + "; from: A B zero noise",
    ]
    why = " (follow_eos: the prompt that supplies the [EOS] slots)" if pooled == "follow_eos" else ""
    pooled_line = f"pooled_output: {donor}'s{why} ({layout.family.pooled})"
    if constructed[-1][1].get("pooled_output") is None:  # T5 / LLM-only families: nothing to choose
        pooled_line = f"pooled_output: {layout.family.pooled}"
    masked = [f"{spec.label} ('{spec.mask_key}')" for spec in layout.family.encoders if spec.mask_key]
    if masked and eos_scope == "all_eos_and_padding":
        result.notes.append(f"{layout.family.label} masks the padding of {' and '.join(masked)}: of the [EOS] and "
                            f"padding slots only the [EOS] reaches the model (the masks stay the base prompt's).")
    table = format_table(layout, header, result, pooled_line)
    LOG.debug("EOSConditioningSwap: %s", header[1])
    return conditioning, out_model, table


class EOSConditioningSwap(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE_ID,
            display_name="EOS Conditioning Swap",
            category="prompt_anatomy/conditioning",
            description=(
                "Builds a conditioning from the token states of two prompts (paper 'Towards Understanding the "
                "Working Mechanism of Text-to-Image Diffusion Model', Sec. 5): e.g. [SOS] + the semantic tokens of "
                "the source + the [EOS] tokens of the target draws the target's object with some of the source's "
                "attributes. Token positions come from the CLIP's own tokenizer for SD1.x, SD2.x, SDXL, SD3, "
                "Flux, Wan and the chat-template LLM encoders of Qwen-Image, Z-Image and Flux.2 (the end-of-turn "
                "token after the prompt is their [EOS]); a token table shows what each position holds."),
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP (text encoder) of your model; its own tokenizer gives the "
                              "token positions."),
                io.String.Input("source_text", multiline=True, dynamic_prompts=True, default="a red sports car",
                                tooltip="Prompt A (source): its semantic tokens are kept; outside the step range the "
                                "plain source conditioning is used."),
                io.String.Input("target_text", multiline=True, dynamic_prompts=True, default="a white horse",
                                tooltip="Prompt B (target): gives the [EOS] tokens in source_sem+target_eos and "
                                "repeat_sem, the semantic tokens in target_sem+source_eos. Unused by the other "
                                "constructions unless pooled = target."),
                io.Combo.Input("construction", options=list(CONSTRUCTIONS), default="source_sem+target_eos",
                               tooltip="source_sem+target_eos: [SOS]+A's semantic tokens+B's [EOS] (paper Table 1). "
                               "target_sem+source_eos: the reverse. sem+zero / sem+noise: A with its [EOS] slots "
                               "zeroed / replaced by Gaussian noise; zero+eos / noise+eos: A with its semantic "
                               "tokens zeroed / noised (App. F). sos_only: every position = A's [SOS]; eos_only: "
                               "[SOS] + A's first [EOS] everywhere else (App. E). repeat_sem: A's semantic tokens "
                               "repeated repeat_count times, then B's [EOS] (App. C)."),
                io.Int.Input("repeat_count", default=2, min=1, max=75,
                             tooltip="repeat_sem only: how many times A's semantic tokens are written before the "
                             "[EOS] (more copies leave fewer [EOS]/padding slots)."),
                io.Combo.Input("eos_scope", options=list(EOS_SCOPES), default="all_eos_and_padding",
                               tooltip="Which slots count as [EOS] for the swap, zero and noise constructions: the "
                               "first [EOS] only, or it and every padding slot after it (SD1.x pads with [EOS]; "
                               "CLIP-G / OpenCLIP-H / T5 pad with token 0)."),
                io.Combo.Input("pooled", options=list(POOLED_FROM), default="follow_eos",
                               tooltip="Pooled vector (the [EOS] state of CLIP-L/CLIP-G; used by SDXL, SD3 and Flux, "
                               "ignored by SD1.x/SD2.x). follow_eos (default of new nodes): from the prompt that "
                               "supplies the [EOS] slots (B for source_sem+target_eos and repeat_sem, A otherwise), so "
                               "the ADM/vector input agrees with the context. source / target: always A / always B "
                               "(workflows saved before follow_eos existed keep their 'source')."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Start of the sampling range (0 = first step) where the constructed "
                               "conditioning is used; the plain source conditioning is used outside it."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="End of that range (1 = last step). Must be above start_percent. The ranges "
                               "are timestep-ranged entries: no extra model evaluations."),
                io.Combo.Input("kv", options=list(KV_MODES), default="key_and_value",
                               tooltip="key_and_value: the conditioning itself is constructed. key_only / value_only "
                               "(App. G): only the cross-attention keys (or values) see the construction, the other "
                               "sees the unswapped prompt; needs the MODEL input and a UNet model (SD1.x/SD2.x/SDXL)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the Gaussian noise of sem+noise and noise+eos."),
                io.Model.Input("model", optional=True,
                               tooltip="Optional. Needed for kv key_only / value_only and for range_unit "
                               "step_fraction (patched and returned); otherwise passed through unchanged, after "
                               "checking it matches the CLIP."),
                io.Combo.Input("range_unit", options=list(RANGE_UNITS), default="timestep_percent", optional=True,
                               tooltip="Unit of start_percent/end_percent. timestep_percent: ComfyUI's timestep "
                               "percents (as ConditioningSetTimestepRange; sigma-based, so on 20 steps end 0.5 covers "
                               "10 steps with 'normal' but 7 with 'exponential'). step_fraction: a fraction of the "
                               "steps the sampler runs, as Text Layer Patch and the guidance cutoff (end 0.5 = the "
                               "first 10 of 20 on any scheduler; needs the MODEL input). With KSamplerAdvanced a "
                               "fraction counts the steps that sampler runs, not the whole base + refiner run."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="conditioning",
                                       tooltip="The constructed conditioning (timestep-ranged entries when the step "
                                       "range is not 0-1). Use it as the positive prompt."),
                io.Model.Output(display_name="model", tooltip="The MODEL: patched for key_only / value_only, else "
                                "the input unchanged (nothing when no MODEL is connected)."),
                io.String.Output(display_name="token_table", tooltip="Each position's token, class and source."),
            ],
        )

    @classmethod
    def execute(cls, clip, source_text, target_text, construction="source_sem+target_eos", repeat_count=2,
                eos_scope="all_eos_and_padding", pooled="follow_eos", start_percent=0.0, end_percent=1.0,
                kv="key_and_value", seed=0, model=None, range_unit="timestep_percent") -> io.NodeOutput:
        if clip is None:
            raise ValueError("clip: no CLIP connected. Connect the CLIP output of your checkpoint or CLIP loader.")
        conditioning, out_model, table = swap_conditioning(
            clip, source_text, target_text, construction=construction, eos_scope=eos_scope, pooled=pooled,
            start_percent=start_percent, end_percent=end_percent, kv=kv, seed=seed, repeat_count=repeat_count,
            model=model, range_unit=range_unit)
        return io.NodeOutput(conditioning, out_model, table, ui=ui.PreviewText(table))


NODES = [EOSConditioningSwap]
