"""EOS conditioning swap (paper 1, Sec. 5 and App. C-G): build conditionings from the [SOS], semantic and
[EOS] token states of two prompts, for every text encoder the family registry gives token rules (CLIP, T5 and
the chat-template LLMs of Qwen-Image, Z-Image and Flux.2).

Every position of a text conditioning belongs to one token of the CLIP object's own tokenization
(``clip.tokenize``). Per encoder chunk the positions are classified as

    CLIP (L, G, H): [SOS] at 0, semantic 1..n, the first [EOS] at n+1, padding n+2..76 (77 per chunk)
    T5-XXL:         no [SOS], semantic 0..n-1, the end token at n, padding after it (one chunk)
    LLM:            chat-template head ("template", kept everywhere), the prompt, then the template tail: its
                    end-of-turn token is the [EOS], the tail tokens after it the "padding" (one chunk)

and the constructions splice these position ranges between the encodings of source A and target B
(both made with ``clip.encode_from_tokens_scheduled``, so prompt weights, embeddings, clip skip and LoRA
keep working for every kept position, and kept positions are bit-identical to the plain encoding).
Where they sit in the conditioning tensor (see :func:`detect_layout`):

    SD1.x   CLIP-L tokens [0:77k], all channels; pads with [EOS] (49407)
    SD2.x   OpenCLIP-H tokens [0:77k], all channels; pads with 0
    SDXL    CLIP-L channels [0:wL] ‖ CLIP-G channels [wL:wL+wG], tokens [0:77k]; L pads with [EOS], G with 0;
            pooled = CLIP-G [EOS] state (ADM input)
    SD3     CLIP-L ‖ CLIP-G as SDXL on tokens [0:77k], zero channels up to 4096, then T5 tokens appended
            ([77k:77k+max(77, n+1)], all channels); pooled = CLIP-L ‖ CLIP-G [EOS] states
    Flux.1  context = T5 tokens only ([0:max(256, n+1)]); CLIP-L gives only the pooled vector
    Qwen-Image  Qwen2.5-VL: prompt [0:n], <|im_end|> at n, \n <|im_start|> assistant \n at n+1..n+4 (the 34-token
            system-template head is cut off by the encoder)
    Z-Image     Qwen3: <|im_start|> user \n at 0..2, prompt [3:3+n], <|im_end|> at 3+n, the 4 tail tokens after it
    Flux.2  Mistral-3: <s> [SYSTEM_PROMPT] ... [INST] head, prompt, [/INST] last (no tail after it); channels are
            layers 10 ‖ 20 ‖ 30

Alignment: the k-th [EOS]/padding slot of the result is the donor's k-th slot of the same chunk; when the
donor has fewer slots, the remaining slots repeat the donor's last slot. Chunk c of the result takes the
donor's chunk min(c, donor_chunks - 1); donor chunks beyond the result's count are not used.

The step range becomes timestep-ranged conditioning entries (``start_percent``/``end_percent``, as core
ConditioningSetTimestepRange), so exactly one entry is active at every step: no extra model evaluation.
Key-only / value-only substitution (App. G) is an ``attn2_patch`` on UNet models that hands the
cross-attention keys (or values) the constructed context while the other sees the unswapped one.
"""


from __future__ import annotations

import dataclasses
import math

import torch

from ..core import families, hooks
from ..shared.tokens import Layout, chunk_positions, context_length, entry_size, llm_bounds

SWAP_CONSTRUCTIONS = ("source_sem+target_eos", "target_sem+source_eos", "repeat_sem")
CONSTRUCTIONS = ("source_sem+target_eos", "target_sem+source_eos", "sem+zero", "sem+noise", "zero+eos",
                 "noise+eos", "sos_only", "eos_only", "repeat_sem")
EOS_SCOPES = ("first_eos", "all_eos_and_padding")
POOLED_FROM = ("follow_eos", "source", "target")
# which prompt supplies the [EOS] slots of each construction ("B": target, "A": source; sem+zero/sem+noise have no
# prompt's [EOS], so their pooled vector stays A's, the only prompt they read)
EOS_DONOR = {"source_sem+target_eos": "B", "repeat_sem": "B", "target_sem+source_eos": "A", "sem+zero": "A",
             "sem+noise": "A", "zero+eos": "A", "noise+eos": "A", "sos_only": "A", "eos_only": "A"}


def pooled_donor(construction: str, pooled: str) -> str:
    """'A' or 'B': the prompt whose pooled vector the result carries. follow_eos: the prompt that supplies the
    [EOS] slots (the pooled vector *is* an [EOS] state, so the ADM/vector input then agrees with the context)."""
    if pooled == "follow_eos":
        return EOS_DONOR[construction]
    return "B" if pooled == "target" else "A"
KV_MODES = ("key_and_value", "key_only", "value_only")

# The step-range boundaries are moved by this many percent (outwards, so the constructed range keeps both
# of its ends, as ConditioningSetTimestepRange's closed ranges do) so that the single sigma where two
# adjacent entries would both be active lies off the usual schedule grids (see split_by_range).
RANGE_NUDGE = 1e-5



def repeat_semantic_tokens(layout: Layout, tokens: dict, count: int) -> dict:
    """App. C: the tokens with each chunk's semantic tokens repeated ``count`` times (weights and embedding
    vectors kept), so fewer [EOS]/padding slots remain. CLIP chunks stay 77 long; T5 grows if needed; an LLM
    chunk keeps its whole chat template (head and tail) around the repeated prompt."""
    if count < 1:
        raise ValueError(f"repeat_count must be at least 1, got {count}.")
    out = dict(tokens)
    for p in layout.parts:
        if p.encoded and not p.written:
            continue  # Flux's CLIP-L gives only the pooled vector, which comes from the plain prompts
        chunks = []
        for ci, (chunk, pos) in enumerate(zip(tokens[p.key], chunk_positions(p, tokens[p.key]), strict=True)):
            if not all(entry_size(e[0]) == 1 for e in chunk):
                raise ValueError("repeat_sem: multi-vector embedding entries cannot be repeated token by token; "
                                 "use an embedding with one vector per entry or another construction.")
            n = len(pos.sem)
            if p.kind == families.LLM:  # token-list indices (an encoder that drops the head still gets it)
                first, tail = llm_bounds(p, chunk)
                head, sem, rest = list(chunk[:first]), list(chunk[first:tail]), list(chunk[tail:])
            else:
                head = [chunk[0]] if pos.sos is not None else []
                sem, rest = list(chunk[len(head):len(head) + n]), [chunk[len(head) + n]]
            body = head + sem * count + rest
            length = len(chunk)
            if p.kind == "clip" and len(body) > length:
                most = max(1, (length - len(head) - 1) // max(n, 1))
                raise ValueError(
                    f"repeat_count {count} is too large for {p.label} chunk {ci + 1}: {n} semantic tokens × {count} "
                    f"plus [SOS] and [EOS] exceed its {length} positions. Use at most {most} for this source_text.")
            pad = (p.pad_token, 1.0) if len(chunk[0]) == 2 else (p.pad_token, 1.0, 0)
            body += [pad] * max(0, length - len(body))
            chunks.append(body)
        out[p.key] = chunks
    return out




# ----------------------------------------------------------------------------------------------
# constructions (pure tensor functions)
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Provenance:
    """What one position of the constructed context holds."""

    pos: int
    token: object  # the token shown for this position
    klass: str  # what the position holds: [SOS], semantic, [EOS], padding (class at its source position)
    source: str  # A, B, A×n, zero, noise
    source_pos: int | None  # position in the source's own encoding (None for zero / noise)


@dataclasses.dataclass
class Construction:
    context: torch.Tensor  # (1, T, C)
    provenance: dict[str, list[Provenance]]  # per encoder key, one entry per position of that encoder
    base: str  # "A", "B" or "A×n": whose tokens the result is laid out on
    notes: list[str]
    entries: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # rebuilt entries of their own
    #                                                       (EncoderPart.cond_key -> (1, T, C); Hunyuan-DiT's mT5)


def _entry_tensors(layout: Layout, entries: dict | None, positions: dict | None, who: str) -> dict:
    """The conditioning entries of the encoders with a ``cond_key`` (Hunyuan-DiT's mT5), checked against their
    tokenization."""
    out = {}
    for part in layout.parts:
        if not part.in_entry or positions is None:
            continue
        t = (entries or {}).get(part.cond_key)
        want = positions[part.key][-1].end if positions[part.key] else 0
        axis = part.token_axis
        if not isinstance(t, torch.Tensor) or t.ndim <= axis or t.shape[0] != 1 or t.shape[axis] != want:
            got = "none" if not isinstance(t, torch.Tensor) else "x".join(map(str, t.shape))
            raise ValueError(f"the {who} conditioning's '{part.cond_key}' ({part.label} states) is {got}, but its "
                             f"tokenization gives {want} tokens on axis {axis}: it was not encoded by this CLIP "
                             f"({layout.label}).")
        out[part.cond_key] = t.movedim(axis, 1)  # (1, tokens, ...): a view, so writes reach the entry
    return out


def _check_pair(cond_a: torch.Tensor, cond_b: torch.Tensor | None):
    if cond_a.ndim != 3 or cond_a.shape[0] != 1:
        raise ValueError(f"expected a (1, tokens, channels) conditioning tensor, got {tuple(cond_a.shape)}.")
    if cond_b is not None and cond_b.shape[-1] != cond_a.shape[-1]:
        raise ValueError(
            f"source and target conditionings come from different text encoders ({cond_a.shape[-1]} vs "
            f"{cond_b.shape[-1]} channels): encode both texts with the same CLIP.")


def build_construction(layout: Layout, construction: str, eos_scope: str,
                       cond_a: torch.Tensor, pos_a: dict, cond_b: torch.Tensor | None = None,
                       pos_b: dict | None = None, seed: int = 0, base_label: str = "A",
                       entries_a: dict | None = None, entries_b: dict | None = None) -> Construction:
    """The constructed context for ``construction`` (see CONSTRUCTIONS). ``cond_a``/``pos_a`` is the source
    (for repeat_sem: the re-encoded repeated source, labelled ``base_label``), ``cond_b``/``pos_b`` the
    target; ``entries_a``/``entries_b`` their conditioning dicts when an encoder's states are an entry of their own
    (``EncoderPart.cond_key``), rebuilt the same way. Only the positions the construction names change; every other
    value is copied bit for bit."""
    if construction not in CONSTRUCTIONS:
        raise ValueError(f"construction must be one of {', '.join(CONSTRUCTIONS)}, got {construction!r}.")
    if eos_scope not in EOS_SCOPES:
        raise ValueError(f"eos_scope must be one of {', '.join(EOS_SCOPES)}, got {eos_scope!r}.")
    swap = construction in SWAP_CONSTRUCTIONS
    if swap and (cond_b is None or pos_b is None):
        raise ValueError(f"construction {construction} needs the target encoding.")
    _check_pair(cond_a, cond_b if swap else None)
    for cond, pos, who in ((cond_a, pos_a, "source"), (cond_b, pos_b, "target")):
        if cond is None:
            continue
        want = context_length(layout, pos)
        if cond.shape[1] != want:
            raise ValueError(f"the {who} conditioning has {cond.shape[1]} tokens but its tokenization gives {want}: "
                             f"it was not encoded by this CLIP ({layout.label}).")

    ent_a = _entry_tensors(layout, entries_a, pos_a, "source")
    ent_b = _entry_tensors(layout, entries_b, pos_b if swap else None, "target")
    if construction == "target_sem+source_eos":
        base, base_pos, donor, donor_pos, base_name, donor_name = cond_b, pos_b, cond_a, pos_a, "B", "A"
        base_ent, donor_ent = ent_b, ent_a
    else:
        base, base_pos, donor, donor_pos, base_name, donor_name = cond_a, pos_a, cond_b, pos_b, base_label, "B"
        base_ent, donor_ent = ent_a, ent_b
    if construction == "sos_only":
        no_sos = next((p for p in layout.context_parts if p.start_token is None), None)
        if no_sos is not None:
            why = ("T5 has no [SOS]. Use eos_only, or for SD3 a CLIP loaded without T5 (CLIP-L + CLIP-G)."
                   if no_sos.kind == "t5" else
                   f"{no_sos.label}, a decoder-only LLM, has no [SOS]: the prompt follows its chat template, whose "
                   f"states are the same for every prompt. Use eos_only.")
            raise ValueError(f"construction sos_only needs a [SOS] token at every position, but {layout.label} "
                             f"puts {no_sos.label} tokens in the context and {why}")

    out = base.clone()
    out_ent = {k: v.clone() for k, v in base_ent.items()}
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    notes: list[str] = []
    prov: dict[str, list[Provenance]] = {}
    for part in layout.parts:
        rows: list[Provenance] = []
        for chunk in base_pos[part.key]:
            src = {i: (base_name, i) for i in range(chunk.start, chunk.end)}
            shown = {i: chunk.tokens[i - chunk.start] for i in range(chunk.start, chunk.end)}
            klass = {i: chunk.klass(i) for i in range(chunk.start, chunk.end)}
            targets: list[int] = []
            fill = None  # "zero" / "noise"
            if swap:
                dchunks = donor_pos[part.key]
                dchunk = dchunks[min(chunk.index, len(dchunks) - 1)]
                dslots = list(range(dchunk.eos, dchunk.end))
                for k, i in enumerate(chunk.slots(eos_scope)):
                    j = dslots[min(k, len(dslots) - 1)]
                    src[i] = (donor_name, j)
                    shown[i] = dchunk.tokens[j - dchunk.start]
                    klass[i] = dchunk.klass(j)
                    targets.append(i)
                if part.written and len(chunk.slots(eos_scope)) > len(dslots):
                    notes.append(f"{part.label} chunk {chunk.index + 1}: {donor_name} has {len(dslots)} [EOS]/padding "
                                 f"slots for {len(chunk.slots(eos_scope))}; the last "
                                 f"{len(chunk.slots(eos_scope)) - len(dslots)} repeat its last slot.")
                n_base = len(base_pos[part.key])
                if part.written and chunk.index == n_base - 1 and len(dchunks) > n_base:
                    notes.append(f"{part.label}: {donor_name} has {len(dchunks)} chunks, the result "
                                 f"{len(base_pos[part.key])}; {donor_name}'s extra chunks are not used.")
            elif construction in ("sem+zero", "sem+noise"):
                targets = list(chunk.slots(eos_scope))
                fill = construction.split("+")[1]
            elif construction in ("zero+eos", "noise+eos"):
                targets = list(chunk.sem)
                fill = construction.split("+")[0]
            elif construction == "sos_only":
                targets = [i for i in range(chunk.start, chunk.end) if i != chunk.sos]
                for i in targets:
                    src[i] = (base_name, chunk.sos)
                    shown[i] = chunk.tokens[0]
                    klass[i] = "[SOS]"
            elif construction == "eos_only":  # [SOS] / the LLM template head stay, the rest is A's first [EOS]
                targets = [i for i in range(chunk.sem.start, chunk.end) if i != chunk.eos]
                for i in targets:
                    src[i] = (base_name, chunk.eos)
                    shown[i] = chunk.tokens[chunk.eos - chunk.start]
                    klass[i] = "[EOS]"
            if fill:
                for i in targets:
                    src[i] = (fill, None)

            if part.written and targets:
                if part.in_entry:
                    dest, from_t = out_ent[part.cond_key], (donor_ent if swap else base_ent).get(part.cond_key)
                else:
                    dest, from_t = out, donor if swap else base
                _write(dest, targets, part.channels, fill, gen, from_t, [src[i][1] for i in targets])
            for i in range(chunk.start, chunk.end):
                rows.append(Provenance(i, shown[i][0], klass[i], src[i][0], src[i][1]))
        prov[part.key] = rows
    entries = {p.cond_key: out_ent[p.cond_key].movedim(1, p.token_axis) for p in layout.parts if p.in_entry}
    return Construction(out, prov, base_name, notes, entries)


def _write(dest: torch.Tensor, targets: list[int], channels: tuple[int, int], fill: str | None, gen,
           from_t: torch.Tensor | None, sources: list) -> None:
    """Set the ``targets`` positions of ``dest`` (1, T, ..., C) on ``channels``: zeros, seeded noise, or the
    ``sources`` positions of ``from_t``."""
    c0, c1 = channels
    idx = torch.tensor(targets, dtype=torch.long, device=dest.device)
    if fill == "zero":
        dest[0, idx, ..., c0:c1] = 0
    elif fill == "noise":
        shape = (len(targets), *dest.shape[2:-1], c1 - c0)
        dest[0, idx, ..., c0:c1] = hooks.like(torch.randn(shape, generator=gen, dtype=torch.float32), dest)
    else:
        src = torch.tensor(sources, dtype=torch.long, device=dest.device)
        dest[0, idx, ..., c0:c1] = from_t[0, src, ..., c0:c1].to(dest.dtype)


def split_by_range(constructed: list, plain: list, start: float, end: float) -> list:
    """Timestep-ranged CONDITIONING: ``constructed`` entries inside [start, end] of sampling, ``plain``
    entries before and after (as ConditioningSetTimestepRange, so inactive entries cost nothing).

    Adjacent ranges share one boundary value; it is moved by RANGE_NUDGE outwards of the constructed range,
    so the sigma where both entries would be active is not a grid point of the usual schedules (where the
    user's own percent often lands exactly). The constructed entries keep both of their ends."""
    validate_range(start, end)
    if start <= 0.0 and end >= 1.0:
        return [[c, dict(d)] for c, d in constructed]
    s = max(0.0, start - RANGE_NUDGE) if start > 0.0 else 0.0
    e = min(1.0, end + RANGE_NUDGE) if end < 1.0 else 1.0
    out = []
    if start > 0.0:
        out += [[c, {**d, "start_percent": 0.0, "end_percent": s}] for c, d in plain]
    out += [[c, {**d, "start_percent": s, "end_percent": e}] for c, d in constructed]
    if end < 1.0:
        out += [[c, {**d, "start_percent": e, "end_percent": 1.0}] for c, d in plain]
    return out


def validate_range(start: float, end: float) -> None:
    for name, v in (("start_percent", start), ("end_percent", end)):
        if not (math.isfinite(v) and 0.0 <= v <= 1.0):
            raise ValueError(f"{name} must be between 0 and 1 (a fraction of sampling), got {v}.")
    if start >= end:
        raise ValueError(f"start_percent ({start}) must be below end_percent ({end}): the constructed conditioning is "
                         f"used from start_percent to end_percent of sampling, so this range is empty. Swap the "
                         f"two values, or use 0 and 1 for every step.")


def range_sigmas(model_sampling, start: float, end: float) -> tuple[float, float]:
    """(sigma_start, sigma_end) of the constructed range, with the same nudged percents as split_by_range:
    a model call at sigma s is inside the range iff sigma_end <= s <= sigma_start (as samplers.py checks
    timestep_start / timestep_end)."""
    s = max(0.0, start - RANGE_NUDGE) if start > 0.0 else 0.0
    e = min(1.0, end + RANGE_NUDGE) if end < 1.0 else 1.0
    return float(model_sampling.percent_to_sigma(s)), float(model_sampling.percent_to_sigma(e))


