"""EOS conditioning swap (paper 1, Sec. 5 and App. C-G): build conditionings from the [SOS], semantic and
[EOS] token states of two prompts, for every text encoder ComfyUI's SD1.x / SD2.x / SDXL / SD3 / Flux.1 use.

Every position of a text conditioning belongs to one token of the CLIP object's own tokenization
(``clip.tokenize``). Per encoder chunk the positions are classified as

    CLIP (L, G, H): [SOS] at 0, semantic 1..n, the first [EOS] at n+1, padding n+2..76 (77 per chunk)
    T5-XXL:         no [SOS], semantic 0..n-1, the end token at n, padding after it (one chunk)

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
import numbers

import comfy.clip_model
import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
import comfy.sd1_clip
import comfy.sdxl_clip
import comfy.text_encoders.flux
import comfy.text_encoders.sd3_clip
import torch
from comfy_api.latest import io, ui

from . import toolkit

NODE_ID = "EOSConditioningSwap"

SWAP_CONSTRUCTIONS = ("source_sem+target_eos", "target_sem+source_eos", "repeat_sem")
CONSTRUCTIONS = ("source_sem+target_eos", "target_sem+source_eos", "sem+zero", "sem+noise", "zero+eos",
                 "noise+eos", "sos_only", "eos_only", "repeat_sem")
EOS_SCOPES = ("first_eos", "all_eos_and_padding")
POOLED_FROM = ("source", "target")
KV_MODES = ("key_and_value", "key_only", "value_only")

# The step-range boundaries are moved by this many percent (outwards, so the constructed range keeps both
# of its ends, as ConditioningSetTimestepRange's closed ranges do) so that the single sigma where two
# adjacent entries would both be active lies off the usual schedule grids (see split_by_range).
RANGE_NUDGE = 1e-5

# comfy/text_encoders/sd3_clip.py pads CLIP-G by this many channels when the SD3 CLIP has no CLIP-L
SD3_MISSING_CLIP_L_WIDTH = 768

FAMILY_LABELS = {
    "sd1": "SD1.x (CLIP-L)",
    "sd2": "SD2.x (OpenCLIP-H)",
    "sdxl": "SDXL (CLIP-L + CLIP-G)",
    "sd3": "SD3 (CLIP-L + CLIP-G + T5-XXL)",
    "flux": "Flux.1 (CLIP-L + T5-XXL)",
}
POOLED_NOTES = {
    "sd1": "the CLIP-L [EOS] state; SD1.x UNets do not use it",
    "sd2": "the OpenCLIP-H [EOS] state; SD2.x UNets do not use it",
    "sdxl": "the CLIP-G [EOS] state of chunk 1, the UNet's ADM input",
    "sd3": "CLIP-L ‖ CLIP-G [EOS] states of chunk 1, the MMDiT's pooled input",
    "flux": "the CLIP-L [EOS] state of chunk 1, Flux's vector_in",
}


# ----------------------------------------------------------------------------------------------
# encoder layout
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EncoderPart:
    """One text encoder of a CLIP object and where its tokens land in the conditioning tensor."""

    key: str  # clip.tokenize key: 'l', 'g', 'h', 't5xxl'
    label: str  # CLIP-L, CLIP-G, OpenCLIP-H, T5-XXL
    kind: str  # "clip" ([SOS] ... [EOS] pad, 77 per chunk) or "t5" (no [SOS], one chunk)
    channels: tuple[int, int] | None  # channel range in the conditioning; None: not in the context
    group: int  # 0: CLIP token block at the start; 1: T5 tokens appended after group 0
    encoded: bool  # the CLIP object has this encoder (SD3 may come without T5, or without CLIP-L)
    start_token: int | None
    end_token: int
    pad_token: int
    inv_vocab: dict = dataclasses.field(repr=False, compare=False, default_factory=dict)

    @property
    def in_context(self) -> bool:
        return self.encoded and self.channels is not None


@dataclasses.dataclass(frozen=True)
class Layout:
    family: str  # sd1, sd2, sdxl, sd3, flux
    parts: tuple[EncoderPart, ...]

    @property
    def label(self) -> str:
        return FAMILY_LABELS[self.family]

    def part(self, key: str) -> EncoderPart:
        for p in self.parts:
            if p.key == key:
                return p
        raise KeyError(key)

    @property
    def context_parts(self) -> list[EncoderPart]:
        return [p for p in self.parts if p.in_context]


def _clip_width(sub) -> int:
    """Hidden width of a CLIP / T5 encoder module (the channels it contributes to the conditioning)."""
    return int(sub.transformer.get_input_embeddings().weight.shape[-1])


def _sub_tokenizer(clip, key: str):
    tok = clip.tokenizer
    for name in (f"clip_{key}", key):
        sub = getattr(tok, name, None)
        if sub is not None and hasattr(sub, "tokenize_with_weights") and hasattr(sub, "end_token"):
            return sub
    raise ValueError(f"clip: its tokenizer ({type(tok).__name__}) has no sub-tokenizer for key {key!r}.")


def _part(clip, key, label, kind, channels, group, encoded) -> EncoderPart:
    t = _sub_tokenizer(clip, key)
    if t.end_token is None:
        raise ValueError(f"clip: the {label} tokenizer has no end token, so there is no [EOS] to swap.")
    return EncoderPart(key=key, label=label, kind=kind, channels=channels, group=group, encoded=encoded,
                       start_token=t.start_token, end_token=int(t.end_token), pad_token=int(t.pad_token),
                       inv_vocab=getattr(t, "inv_vocab", {}))


def _unsupported_clip(clip, detail: str = "") -> ValueError:
    csm = getattr(clip, "cond_stage_model", None)
    keys = sorted(clip.tokenize("a").keys()) if hasattr(clip, "tokenize") else []
    return ValueError(
        f"clip: this text encoder ({type(csm).__name__}, tokenizer keys {keys}) is not one EOSConditioningSwap "
        f"knows{': ' + detail if detail else ''}. Supported: {', '.join(FAMILY_LABELS.values())}. Load the CLIP "
        f"of one of these model families (checkpoint loader, DualCLIPLoader sdxl/sd3/flux, TripleCLIPLoader).")


def detect_layout(clip) -> Layout:
    """Which encoders the CLIP object has and where each one's tokens and channels sit in its output.
    Widths come from the encoders themselves (never assumed 768 / 1280)."""
    csm = getattr(clip, "cond_stage_model", None)
    if csm is None:
        raise ValueError("clip: expected a CLIP object (from a checkpoint or CLIP loader).")
    if isinstance(csm, comfy.sdxl_clip.SDXLClipModel):
        wl, wg = _clip_width(csm.clip_l), _clip_width(csm.clip_g)
        return Layout("sdxl", (
            _part(clip, "l", "CLIP-L", "clip", (0, wl), 0, True),
            _part(clip, "g", "CLIP-G", "clip", (wl, wl + wg), 0, True)))
    if isinstance(csm, comfy.text_encoders.sd3_clip.SD3ClipModel):
        parts = []
        wl = _clip_width(csm.clip_l) if csm.clip_l is not None else None
        parts.append(_part(clip, "l", "CLIP-L", "clip", (0, wl) if wl else None, 0, csm.clip_l is not None))
        g0 = wl if wl is not None else SD3_MISSING_CLIP_L_WIDTH
        wg = _clip_width(csm.clip_g) if csm.clip_g is not None else None
        parts.append(_part(clip, "g", "CLIP-G", "clip", (g0, g0 + wg) if wg else None, 0, csm.clip_g is not None))
        t5 = csm.t5xxl is not None
        parts.append(_part(clip, "t5xxl", "T5-XXL", "t5", (0, _clip_width(csm.t5xxl)) if t5 else None, 1, t5))
        if not any(p.in_context for p in parts):
            raise _unsupported_clip(clip, "this SD3 CLIP has no text encoder loaded")
        return Layout("sd3", tuple(parts))
    if isinstance(csm, comfy.text_encoders.flux.FluxClipModel):
        return Layout("flux", (
            _part(clip, "t5xxl", "T5-XXL", "t5", (0, _clip_width(csm.t5xxl)), 0, True),
            _part(clip, "l", "CLIP-L", "clip", None, 0, True)))  # CLIP-L: pooled only
    if isinstance(csm, comfy.sd1_clip.SD1ClipModel):
        sub = getattr(csm, csm.clip, None)
        is_clip = sub is not None and isinstance(getattr(sub, "transformer", None), comfy.clip_model.CLIPTextModel)
        if is_clip and csm.clip_name == "l":
            return Layout("sd1", (_part(clip, "l", "CLIP-L", "clip", (0, _clip_width(sub)), 0, True),))
        if is_clip and csm.clip_name == "h":
            return Layout("sd2", (_part(clip, "h", "OpenCLIP-H", "clip", (0, _clip_width(sub)), 0, True),))
        raise _unsupported_clip(clip, f"a single {csm.clip_name!r} encoder")
    raise _unsupported_clip(clip)


# ----------------------------------------------------------------------------------------------
# token positions
# ----------------------------------------------------------------------------------------------
def _entry_size(token) -> int:
    """Positions one tokenizer entry occupies: 1 for a token id, rows of the vector(s) for an embedding."""
    if isinstance(token, numbers.Integral):
        return 1
    if torch.is_tensor(token):
        return max(1, token.numel() // token.shape[-1]) if token.ndim > 0 else 1
    return 1


def _is_id(token, value: int | None) -> bool:
    return value is not None and isinstance(token, numbers.Integral) and int(token) == int(value)


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Positions of one tokenizer chunk, absolute in the conditioning's token axis (end exclusive)."""

    index: int
    start: int
    end: int
    sos: int | None  # [SOS] position (None for T5)
    eos: int  # first end token: the [EOS]
    tokens: tuple  # one (token, weight) entry per position (embedding vectors expanded)

    @property
    def sem(self) -> range:
        return range(self.start if self.sos is None else self.sos + 1, self.eos)

    @property
    def padding(self) -> range:
        return range(self.eos + 1, self.end)

    def slots(self, scope: str) -> range:
        """The [EOS] slots a swap replaces: the first [EOS] only, or it and all padding after it."""
        return range(self.eos, self.eos + 1) if scope == "first_eos" else range(self.eos, self.end)

    def klass(self, pos: int) -> str:
        if pos == self.sos:
            return "[SOS]"
        if pos < self.eos:
            return "semantic"
        return "[EOS]" if pos == self.eos else "padding"


def chunk_positions(part: EncoderPart, chunks: list, offset: int = 0) -> list[Chunk]:
    """Classify every position of ``chunks`` (the ``clip.tokenize`` list of one encoder key) into
    [SOS] / semantic / [EOS] / padding by the tokenizer's own special tokens. The first end token of a
    chunk is its [EOS] (CLIP-L also pads with that id, so position, not id, tells [EOS] from padding)."""
    out = []
    pos = offset
    for ci, chunk in enumerate(chunks):
        expanded = []
        for entry in chunk:
            token = entry[0]
            weight = entry[1] if len(entry) > 1 else 1.0
            n = _entry_size(token)
            if n == 1:
                expanded.append((token, weight))
            else:  # a multi-vector embedding entry: one position per vector
                flat = token.reshape(-1, token.shape[-1])
                expanded.extend((flat[i], weight) for i in range(n))
        start = pos
        sos = None
        first = 0
        if part.start_token is not None:
            if not expanded or not _is_id(expanded[0][0], part.start_token):
                raise ValueError(f"internal: {part.label} chunk {ci + 1} does not start with the [SOS] token.")
            sos, first = start, 1
        eos = next((start + i for i in range(first, len(expanded)) if _is_id(expanded[i][0], part.end_token)), None)
        if eos is None:
            raise ValueError(f"internal: {part.label} chunk {ci + 1} has no end token ({part.end_token}).")
        pos = start + len(expanded)
        out.append(Chunk(ci, start, pos, sos, eos, tuple(expanded)))
    return out


def token_positions(layout: Layout, tokens: dict) -> dict[str, list[Chunk]]:
    """Chunks (absolute positions in the conditioning) of every encoder of ``layout`` for ``tokens``.

    Group 0 (the CLIP encoders) starts at 0 and is cut to the shortest CLIP part, as SDXL / SD3 do when
    concatenating CLIP-L and CLIP-G; group 1 (SD3's T5) follows it. Encoders the CLIP object lacks are
    still placed as if present (SD3 T5 positions can be read from the tokenizer alone)."""
    missing = [p.key for p in layout.parts if p.key not in tokens]
    if missing:
        raise ValueError(f"tokens have no {missing} entries: they were not made by this CLIP's tokenizer "
                         f"({layout.label}).")
    out = {}
    for p in layout.parts:
        if p.group == 0:
            out[p.key] = chunk_positions(p, tokens[p.key], 0)
    # the CLIP parts concatenated on channels are cut to the shortest (sdxl_clip.py / sd3_clip.py "cut_to")
    joined = [p for p in layout.parts if p.group == 0 and p.in_context]
    cut = min((out[p.key][-1].end for p in joined if out[p.key]), default=0)
    for p in joined:
        out[p.key] = [c for c in out[p.key] if c.start < cut]
    for p in layout.parts:
        if p.group == 1:
            out[p.key] = chunk_positions(p, tokens[p.key], cut)
    return out


def context_length(layout: Layout, positions: dict[str, list[Chunk]]) -> int:
    """Token count of the conditioning the encoders of ``layout`` produce for these positions."""
    ends = [positions[p.key][-1].end for p in layout.context_parts if positions[p.key]]
    return max(ends) if ends else 0


def semantic_count(layout: Layout, positions: dict[str, list[Chunk]]) -> int:
    return max((sum(len(c.sem) for c in positions[p.key]) for p in layout.parts), default=0)


def repeat_semantic_tokens(layout: Layout, tokens: dict, count: int) -> dict:
    """App. C: the tokens with each chunk's semantic tokens repeated ``count`` times (weights and embedding
    vectors kept), so fewer [EOS]/padding slots remain. CLIP chunks stay 77 long; T5 grows if needed."""
    if count < 1:
        raise ValueError(f"repeat_count must be at least 1, got {count}.")
    out = dict(tokens)
    for p in layout.parts:
        if p.encoded and not p.in_context:
            continue  # Flux's CLIP-L gives only the pooled vector, which comes from the plain prompts
        chunks = []
        for ci, (chunk, pos) in enumerate(zip(tokens[p.key], chunk_positions(p, tokens[p.key]), strict=True)):
            n = len(pos.sem)
            head = [chunk[0]] if pos.sos is not None else []
            sem = list(chunk[len(head):len(head) + n]) if all(_entry_size(e[0]) == 1 for e in chunk) else None
            if sem is None:
                raise ValueError("repeat_sem: multi-vector embedding entries cannot be repeated token by token; "
                                 "use an embedding with one vector per entry or another construction.")
            eos_entry = chunk[len(head) + n]
            body = head + sem * count + [eos_entry]
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


def _check_pair(cond_a: torch.Tensor, cond_b: torch.Tensor | None):
    if cond_a.ndim != 3 or cond_a.shape[0] != 1:
        raise ValueError(f"expected a (1, tokens, channels) conditioning tensor, got {tuple(cond_a.shape)}.")
    if cond_b is not None and cond_b.shape[-1] != cond_a.shape[-1]:
        raise ValueError(
            f"source and target conditionings come from different text encoders ({cond_a.shape[-1]} vs "
            f"{cond_b.shape[-1]} channels): encode both texts with the same CLIP.")


def build_construction(layout: Layout, construction: str, eos_scope: str,
                       cond_a: torch.Tensor, pos_a: dict, cond_b: torch.Tensor | None = None,
                       pos_b: dict | None = None, seed: int = 0, base_label: str = "A") -> Construction:
    """The constructed context for ``construction`` (see CONSTRUCTIONS). ``cond_a``/``pos_a`` is the source
    (for repeat_sem: the re-encoded repeated source, labelled ``base_label``), ``cond_b``/``pos_b`` the
    target. Only the positions the construction names change; every other value is copied bit for bit."""
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

    if construction == "target_sem+source_eos":
        base, base_pos, donor, donor_pos, base_name, donor_name = cond_b, pos_b, cond_a, pos_a, "B", "A"
    else:
        base, base_pos, donor, donor_pos, base_name, donor_name = cond_a, pos_a, cond_b, pos_b, base_label, "B"
    if construction == "sos_only":
        t5 = [p.label for p in layout.context_parts if p.kind == "t5"]
        if t5:
            raise ValueError(f"construction sos_only needs a [SOS] token at every position, but {layout.label} "
                             f"puts {t5[0]} tokens in the context and T5 has no [SOS]. Use eos_only, or for SD3 a "
                             f"CLIP loaded without T5 (CLIP-L + CLIP-G).")

    out = base.clone()
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
                if part.in_context and len(chunk.slots(eos_scope)) > len(dslots):
                    notes.append(f"{part.label} chunk {chunk.index + 1}: {donor_name} has {len(dslots)} [EOS]/padding "
                                 f"slots for {len(chunk.slots(eos_scope))}; the last "
                                 f"{len(chunk.slots(eos_scope)) - len(dslots)} repeat its last slot.")
                n_base = len(base_pos[part.key])
                if part.in_context and chunk.index == n_base - 1 and len(dchunks) > n_base:
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
            elif construction == "eos_only":
                targets = [i for i in range(chunk.start, chunk.end) if i not in (chunk.sos, chunk.eos)]
                for i in targets:
                    src[i] = (base_name, chunk.eos)
                    shown[i] = chunk.tokens[chunk.eos - chunk.start]
                    klass[i] = "[EOS]"
            if fill:
                for i in targets:
                    src[i] = (fill, None)

            if part.in_context and targets:
                c0, c1 = part.channels
                idx = torch.tensor(targets, dtype=torch.long, device=out.device)
                if fill == "zero":
                    out[0, idx, c0:c1] = 0
                elif fill == "noise":
                    noise = torch.randn((len(targets), c1 - c0), generator=gen, dtype=torch.float32)
                    out[0, idx, c0:c1] = toolkit.like(noise, out)
                else:
                    sources = torch.tensor([src[i][1] for i in targets], dtype=torch.long, device=out.device)
                    from_t = donor if swap else base
                    out[0, idx, c0:c1] = from_t[0, sources, c0:c1].to(out.dtype)
            for i in range(chunk.start, chunk.end):
                rows.append(Provenance(i, shown[i][0], klass[i], src[i][0], src[i][1]))
        prov[part.key] = rows
    return Construction(out, prov, base_name, notes)


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


# ----------------------------------------------------------------------------------------------
# key-only / value-only (UNet cross-attention)
# ----------------------------------------------------------------------------------------------
def is_unet(model) -> bool:
    return isinstance(getattr(model.model, "diffusion_model", None), openaimodel.UNetModel)


def model_family(model) -> str | None:
    """sd1 / sd2 / sdxl / sd3 / flux for the model families this node knows, else None."""
    fam = toolkit.model_family(model)
    return fam if fam in toolkit.FAMILIES else None


def model_context_width(model) -> int | None:
    dm = getattr(model.model, "diffusion_model", None)
    if isinstance(dm, openaimodel.UNetModel):
        cfg = getattr(model.model, "model_config", None)
        width = (getattr(cfg, "unet_config", {}) or {}).get("context_dim")
        return int(width) if width else None
    for attr in ("txt_in", "context_embedder"):
        mod = getattr(dm, attr, None)
        if mod is not None and hasattr(mod, "in_features"):
            return int(mod.in_features)
    return None


def check_model(layout: Layout, model, kv: str, channels: int) -> None:
    """Raise ValueError when ``model`` cannot take this CLIP's conditioning, or cannot do ``kv``."""
    fam = model_family(model)
    mname = FAMILY_LABELS.get(fam, type(model.model).__name__).split(" (")[0]
    if fam is not None and fam != layout.family:
        raise ValueError(f"model is {mname} but clip is the {layout.label} text encoder: their conditioning does not "
                         f"fit. Connect the CLIP and MODEL of the same checkpoint / model family.")
    width = model_context_width(model)
    if width is not None and width != channels:
        raise ValueError(f"model expects {width}-channel text context but clip ({layout.label}) gives {channels} "
                         f"channels: connect the CLIP and MODEL of the same model family.")
    if kv != "key_and_value" and not is_unet(model):
        why = {"sd3": "SD3's MMDiT", "flux": "Flux's double/single blocks"}.get(fam, f"{mname}'s transformer")
        raise ValueError(
            f"kv={kv} needs a UNet model (SD1.x, SD2.x, SDXL) with separate cross-attention: {why} attend jointly over "
            f"text and image tokens and transform the text stream in every block, so there is no single text context "
            f"whose keys and values could be split. Use kv=key_and_value with this model.")


def make_kv_patch(kv: str, pairs: list[tuple[torch.Tensor, torch.Tensor]], sigma_start: float, sigma_end: float):
    """attn2_patch giving the cross-attention keys (key_only) or values (value_only) the constructed context
    on the positive rows that carry ``base`` (their context starts with it; LCM repeats are matched), inside
    [sigma_end, sigma_start]; the other projection keeps seeing ``base``. ``pairs``: (base, constructed)."""
    if kv not in ("key_only", "value_only"):
        raise ValueError(f"internal: kv patch for {kv!r}")
    cache: dict = {}

    def cast(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        key = (id(t), ref.device, ref.dtype)
        if key not in cache:
            cache[key] = toolkit.like(t[0], ref)
        return cache[key]

    def patch(n, context, value, extra_options):
        sig = extra_options.get("sigmas")
        if sig is None or context is None:
            return n, context, value
        s = float(sig.reshape(-1)[0])
        if s > sigma_start or s < sigma_end:
            return n, context, value
        mask = toolkit.row_mask(extra_options, context.shape[0])
        new = None
        for r in torch.nonzero(mask).reshape(-1).tolist():
            row = context[r]
            for base, cons in pairs:
                length = base.shape[1]
                if row.shape[0] % length or not torch.equal(row[:length], cast(base, row)):
                    continue
                if new is None:
                    new = (context if kv == "key_only" else value).clone()
                new[r] = cast(cons, row).repeat(row.shape[0] // length, 1)
                break
        if new is None:
            return n, context, value
        return (n, new, value) if kv == "key_only" else (n, context, new)

    return patch


# ----------------------------------------------------------------------------------------------
# token table
# ----------------------------------------------------------------------------------------------
def token_text(part: EncoderPart, token) -> str:
    if isinstance(token, numbers.Integral):
        return part.inv_vocab.get(int(token), str(int(token)))
    return "<embedding>"


def _span(a: int, b: int) -> str:
    return str(a) if a == b else f"{a}–{b}"


def format_table(layout: Layout, header: list[str], result: Construction, pooled_line: str) -> str:
    """Readable token table: one line per position, runs of identical padding collapsed."""
    lines = list(header)
    for part in layout.parts:
        rows = result.provenance.get(part.key, [])
        if not rows:
            continue
        if not part.encoded:
            lines.append(f"\n{part.label} (key '{part.key}'): not in this CLIP ({layout.label} without it); its "
                         f"tokens would occupy positions {rows[0].pos}–{rows[-1].pos}.")
            continue
        if part.channels is None:
            eos = [r.pos for r in rows if r.klass == "[EOS]"]
            lines.append(f"\n{part.label} (key '{part.key}'): not in the context, gives the pooled vector only "
                         f"([EOS] at position {eos[0] if eos else '?'}).")
            continue
        lines.append(f"\n{part.label} · key '{part.key}' · context tokens {rows[0].pos}–{rows[-1].pos} · channels "
                     f"{part.channels[0]}–{part.channels[1] - 1}")
        lines.append(f"{'pos':>9}  {'token':<22} {'class':<9} from")
        merged: list[dict] = []  # runs of identical padding rows (same token, source, source step)
        for r in rows:
            text = token_text(part, r.token)
            m = merged[-1] if merged else None
            if (m is not None and r.klass != "semantic" and m["klass"] == r.klass and m["text"] == text
                    and m["source"] == r.source and r.pos == m["last"] + 1):
                if r.source_pos is None and m["sp_last"] is None:
                    m["last"] = r.pos
                    continue
                if r.source_pos is not None and m["sp_last"] is not None:
                    step = r.source_pos - m["sp_last"]
                    if step in (0, 1) and m["step"] in (None, step):
                        m.update(last=r.pos, sp_last=r.source_pos, step=step)
                        continue
            merged.append({"first": r.pos, "last": r.pos, "text": text, "klass": r.klass, "source": r.source,
                           "sp_first": r.source_pos, "sp_last": r.source_pos, "step": None})
        for m in merged:
            first, last, text, klass = m["first"], m["last"], m["text"], m["klass"]
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
def _positions_checked(layout: Layout, tokens: dict, which: str, text: str) -> dict:
    pos = token_positions(layout, tokens)
    if not text.strip() or semantic_count(layout, pos) == 0:
        raise ValueError(f"{which} is empty (no tokens between [SOS] and [EOS]): the constructions need its semantic "
                         f"and [EOS] tokens. Type a prompt into {which}.")
    return pos


def swap_conditioning(clip, source_text: str, target_text: str, construction: str = "source_sem+target_eos",
                      eos_scope: str = "all_eos_and_padding", pooled: str = "source", start_percent: float = 0.0,
                      end_percent: float = 1.0, kv: str = "key_and_value", seed: int = 0, repeat_count: int = 2,
                      model=None):
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
    if kv != "key_and_value" and model is None:
        raise ValueError(f"kv={kv} patches the model's cross-attention: connect the MODEL input (and sample with "
                         f"the MODEL output), or use kv=key_and_value.")
    layout = detect_layout(clip)
    uses_b = construction in SWAP_CONSTRUCTIONS or pooled == "target"

    tokens_a = clip.tokenize(source_text)
    pos_a = _positions_checked(layout, tokens_a, "source_text", source_text)
    tokens_b = pos_b = None
    if uses_b:
        tokens_b = clip.tokenize(target_text)
        pos_b = _positions_checked(layout, tokens_b, "target_text", target_text)
    conds_a = clip.encode_from_tokens_scheduled(tokens_a)
    conds_b = clip.encode_from_tokens_scheduled(tokens_b) if uses_b else None
    if model is not None:
        check_model(layout, model, kv, conds_a[0][0].shape[-1])

    base_a, pos_base, label = conds_a, pos_a, "A"
    if construction == "repeat_sem":
        tokens_r = repeat_semantic_tokens(layout, tokens_a, repeat_count)
        pos_base = token_positions(layout, tokens_r)
        base_a = clip.encode_from_tokens_scheduled(tokens_r)
        label = f"A×{repeat_count}"
    if conds_b is not None and len(conds_b) != len(conds_a) or len(base_a) != len(conds_a):
        raise ValueError("internal: source and target encodings have different CLIP hook schedules.")

    constructed, pairs, result = [], [], None
    for i, (_, da) in enumerate(conds_a):
        cb, db = (conds_b[i] if conds_b else (None, None))
        cbase = base_a[i][0]
        result = build_construction(layout, construction, eos_scope, cbase, pos_base, cb, pos_b, seed, label)
        if construction == "target_sem+source_eos":
            layout_cond, d = cb, dict(db)
        else:
            layout_cond, d = cbase, dict(base_a[i][1] if construction == "repeat_sem" else da)
        d["pooled_output"] = (db if pooled == "target" else da).get("pooled_output")
        if kv == "key_and_value":
            constructed.append([result.context, d])
        else:  # the entry carries the unswapped context; the attention patch swaps keys or values
            constructed.append([layout_cond, d])
            pairs.append((layout_cond, result.context))
    conditioning = split_by_range(constructed, [[c, dict(d)] for c, d in conds_a], start_percent, end_percent)

    out_model = model
    if kv != "key_and_value":
        ms = model.get_model_object("model_sampling")
        sig_start, sig_end = range_sigmas(ms, start_percent, end_percent)
        out_model = model.clone()
        toolkit.ensure_run_tracking(out_model)
        out_model.set_model_attn2_patch(make_kv_patch(kv, pairs, sig_start, sig_end))

    header = [
        f"EOS Conditioning Swap · {layout.label}",
        f"construction {construction}" + (f" (×{repeat_count})" if construction == "repeat_sem" else "")
        + f" · eos_scope {eos_scope} · pooled {pooled} · kv {kv}",
        f"steps: constructed conditioning from {start_percent:.3f} to {end_percent:.3f} of sampling"
        + (", plain source outside" if (start_percent > 0 or end_percent < 1) else " (every step)"),
        f"A (source): {source_text!r}",
        f"B (target): {target_text!r}" + ("" if uses_b else " (not used by this construction)"),
        f"result laid out on {result.base}'s tokens; classes: [SOS] semantic [EOS] padding; from: A B zero noise",
    ]
    pooled_line = f"pooled_output: {'B' if pooled == 'target' else 'A'}'s ({POOLED_NOTES[layout.family]})"
    table = format_table(layout, header, result, pooled_line)
    toolkit.LOG.debug("EOSConditioningSwap: %s", header[1])
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
                "attributes. Token positions come from the CLIP's own tokenizer for SD1.x, SD2.x, SDXL, SD3 and "
                "Flux; a token table shows what each position holds."),
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
                io.Combo.Input("pooled", options=list(POOLED_FROM), default="source",
                               tooltip="Pooled vector (the [EOS] state of CLIP-L/CLIP-G; used by SDXL, SD3 and Flux, "
                               "ignored by SD1.x/SD2.x) from the source or the target prompt."),
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
                               tooltip="Optional. Needed for kv key_only / value_only (patched and returned); "
                               "otherwise passed through unchanged, after checking it matches the CLIP."),
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
                eos_scope="all_eos_and_padding", pooled="source", start_percent=0.0, end_percent=1.0,
                kv="key_and_value", seed=0, model=None) -> io.NodeOutput:
        if clip is None:
            raise ValueError("clip: no CLIP connected. Connect the CLIP output of your checkpoint or CLIP loader.")
        conditioning, out_model, table = swap_conditioning(
            clip, source_text, target_text, construction=construction, eos_scope=eos_scope, pooled=pooled,
            start_percent=start_percent, end_percent=end_percent, kv=kv, seed=seed, repeat_count=repeat_count,
            model=model)
        return io.NodeOutput(conditioning, out_model, table, ui=ui.PreviewText(table))


NODES = [EOSConditioningSwap]
