"""Token layout of a text conditioning: which encoder's token sits at which position and channels, and which
positions are [SOS], semantic, [EOS] or padding — by the CLIP object's own tokenizer and the family registry's
encoder rules (``core.families.EncoderSpec``).

Per encoder chunk the positions are classified as

    CLIP (L, G, H): [SOS] at 0, semantic 1..n, the first [EOS] at n+1, padding n+2..76 (77 per chunk)
    T5-XXL:         no [SOS], semantic 0..n-1, the end token at n, padding after it (one chunk)
    LLM:            chat-template head (class "template", kept by every construction; cut off by encoders that
                    drop it), the prompt, then the template tail: its first token (end of turn) is the [EOS]
                    analogue, the tail tokens after it are "padding" (one chunk; markers from EncoderSpec)

Encoders of group 0 share positions and are concatenated on channels (SDXL / SD3 CLIP-L ‖ CLIP-G), cut to the
shortest; group 1 (SD3's T5) is appended after them.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import numbers

import torch

from ..core import families
from ..core.errors import InternalError


@dataclasses.dataclass(frozen=True)
class EncoderPart:
    """One text encoder of a CLIP object and where its tokens land in the conditioning tensor."""

    key: str  # clip.tokenize key: 'l', 'g', 'h', 't5xxl'
    label: str  # CLIP-L, CLIP-G, OpenCLIP-H, T5-XXL
    kind: str  # "clip" ([SOS] ... [EOS] pad, 77 per chunk), "t5" (no [SOS], one chunk) or families.LLM
    channels: tuple[int, int] | None  # channel range in the conditioning; None: not in the context
    group: int  # 0: token block at the start; 1: tokens appended after group 0
    encoded: bool  # the CLIP object has this encoder (SD3 may come without T5, or without CLIP-L)
    start_token: int | None  # None for T5 and LLM encoders (an LLM's <s> / <bos> belongs to the template head)
    end_token: int | None  # None for LLM encoders (the tail marker ends the prompt)
    pad_token: int
    head_ids: tuple[int, ...] = ()  # LLM: token ids of EncoderSpec.head_end
    tail_ids: tuple[int, ...] = ()  # LLM: token ids of EncoderSpec.tail_start
    drops_head: bool = False  # LLM: the encoder cuts the template head off its output
    cond_key: str | None = None  # its states are this conditioning entry, not the context (Hunyuan-DiT's mT5)
    token_axis: int = 1  # the token axis of that entry
    inv_vocab: dict = dataclasses.field(repr=False, compare=False, default_factory=dict)

    @property
    def in_context(self) -> bool:
        return self.encoded and self.channels is not None and self.cond_key is None

    @property
    def in_entry(self) -> bool:
        """Its states are a conditioning entry of their own (``cond_key``), which the constructions rebuild too."""
        return self.encoded and self.channels is not None and self.cond_key is not None

    @property
    def written(self) -> bool:
        """The constructions write its states: in the context or in its own entry (not a pooled-only encoder)."""
        return self.encoded and self.channels is not None


@dataclasses.dataclass(frozen=True)
class Layout:
    family: families.Family
    parts: tuple[EncoderPart, ...]
    families_label: str = ""  # every family this text encoder serves, e.g. "PixArt α/Σ / Chroma"

    @property
    def label(self) -> str:
        names = [e.label for e in sorted(self.family.encoders, key=lambda e: e.kind != "clip")]
        return f"{self.families_label or self.family.label} ({' + '.join(names)})"

    def part(self, key: str) -> EncoderPart:
        for p in self.parts:
            if p.key == key:
                return p
        raise KeyError(key)

    @property
    def context_parts(self) -> list[EncoderPart]:
        return [p for p in self.parts if p.in_context]


def _clip_width(sub) -> int:
    """Channels a CLIP / T5 / LLM encoder module contributes to the conditioning: its hidden width, times the
    number of layers it concatenates (Flux.2's Mistral: layers 10, 20, 30)."""
    width = int(sub.transformer.get_input_embeddings().weight.shape[-1])
    return width * len(sub.layer) if isinstance(getattr(sub, "layer", None), (list, tuple)) else width


def sub_tokenizer(tokenizer, key: str):
    for name in (f"clip_{key}", key):
        sub = getattr(tokenizer, name, None)
        if sub is not None and hasattr(sub, "tokenize_with_weights") and hasattr(sub, "end_token"):
            return sub
    raise ValueError(f"clip: its tokenizer ({type(tokenizer).__name__}) has no sub-tokenizer for key {key!r}.")


def _marker_ids(t, spec: families.EncoderSpec, text: str) -> tuple[int, ...]:
    """Token ids of a chat-template marker, by the encoder's own tokenizer (no <s> / <bos> added)."""
    ids = tuple(int(i) for i in t.tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise InternalError(f"{spec.label}: template marker {text!r} tokenizes to nothing")
    return ids


def _part(tokenizer, spec: families.EncoderSpec, channels, encoded: bool) -> EncoderPart:
    t = sub_tokenizer(tokenizer, spec.key)
    if spec.kind == families.LLM:
        return EncoderPart(key=spec.key, label=spec.label, kind=spec.kind, channels=channels, group=spec.group,
                           encoded=encoded, start_token=None, end_token=None, pad_token=int(t.pad_token),
                           head_ids=_marker_ids(t, spec, spec.head_end), tail_ids=_marker_ids(t, spec, spec.tail_start),
                           drops_head=spec.drops_head, inv_vocab=getattr(t, "inv_vocab", {}))
    end = t.pad_token if spec.pad_is_end else t.end_token
    if end is None:
        raise ValueError(f"clip: the {spec.label} tokenizer has no end token, so there is no [EOS] to swap.")
    return EncoderPart(key=spec.key, label=spec.label, kind=spec.kind, channels=channels, group=spec.group,
                       encoded=encoded, start_token=t.start_token, end_token=int(end), pad_token=int(t.pad_token),
                       cond_key=spec.cond_key, token_axis=spec.token_axis, inv_vocab=getattr(t, "inv_vocab", {}))


def unsupported_clip(clip, what: str, detail: str = "") -> ValueError:
    csm = getattr(clip, "cond_stage_model", None)
    keys = sorted(clip.tokenize("a").keys()) if hasattr(clip, "tokenize") else []
    return ValueError(
        f"clip: this text encoder ({type(csm).__name__}, tokenizer keys {keys}) is not one {what} knows"
        f"{': ' + detail if detail else ''}. Supported: {families.supported_labels()}. Load the CLIP of one of these "
        f"model families (checkpoint loader, DualCLIPLoader sdxl/sd3/flux, TripleCLIPLoader).")


def detect_layout(clip, what: str = "Prompt Anatomy") -> Layout:
    """Which encoders the CLIP object has and where each one's tokens and channels sit in its output.
    Widths come from the encoders themselves (never assumed 768 / 1280). ``what``: the node asking."""
    csm = getattr(clip, "cond_stage_model", None)
    if csm is None:
        raise ValueError("clip: expected a CLIP object (from a checkpoint or CLIP loader).")
    family = families.lookup_clip(clip)
    if family is None:
        raise unsupported_clip(clip, what)
    no_eos = next((e for e in family.encoders if e.no_eos), None)
    if no_eos is not None:
        raise ValueError(f"clip: {what} does not support {family.label}'s {no_eos.label} text encoder: {no_eos.no_eos}. "
                         f"Use a model whose text encoder ends the prompt with a token (CLIP, T5, or a chat-template "
                         f"LLM: Qwen-Image, Z-Image, Flux.2); on {family.label}, mix two prompts with core "
                         f"ConditioningAverage / ConditioningConcat instead.")
    parts, offset = [], 0
    for spec in family.encoders:
        sub = getattr(csm, spec.attr, None)
        width = _clip_width(sub) if sub is not None else spec.missing_width
        channels = None
        if spec.in_context and sub is not None:
            channels = (offset, offset + width) if spec.group == 0 else (0, width)
        elif spec.cond_key and sub is not None:  # an entry of its own: all of its channels
            channels = (0, width)
        if spec.in_context and spec.group == 0:
            offset += width or 0
        parts.append(_part(clip.tokenizer, spec, channels, sub is not None))
    if not any(p.in_context for p in parts):
        raise unsupported_clip(clip, what, f"this {family.label} CLIP has no text encoder loaded")
    return Layout(family, tuple(parts), " / ".join(f.label for f in families.clip_families(clip)))


@functools.lru_cache(maxsize=16)
def stock_tokenizer(family: families.Family):
    """The tokenizer ComfyUI uses for ``family`` (no embeddings directory)."""
    module, _, cls = family.tokenizer.partition(":")
    return getattr(importlib.import_module(module), cls)(embedding_directory=None, tokenizer_data={})


def stock_layout(family: families.Family, loaded: tuple[str, ...] | None = None) -> Layout:
    """A Layout of ``family``'s stock tokenizer (positions only: every in-context encoder gets channels (0, 1)).
    ``loaded``: the encoder keys the CLIP has (default all)."""
    tok = stock_tokenizer(family)
    parts = []
    for spec in family.encoders:
        encoded = loaded is None or spec.key in loaded
        parts.append(_part(tok, spec, (0, 1) if spec.in_context else None, encoded))
    return Layout(family, tuple(parts))


def entry_size(token) -> int:
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
    sos: int | None  # [SOS] position (None for T5 and LLM encoders)
    eos: int  # first end token: the [EOS] (LLM: the end-of-turn token after the prompt)
    tokens: tuple  # one (token, weight) entry per position (embedding vectors expanded)
    head: int = 0  # LLM: chat-template positions at the chunk's start (kept by every construction)

    @property
    def sem(self) -> range:
        return range(self.start + self.head if self.sos is None else self.sos + 1, self.eos)

    @property
    def padding(self) -> range:
        return range(self.eos + 1, self.end)

    def slots(self, scope: str) -> range:
        """The [EOS] slots a swap replaces: the first [EOS] only, or it and all padding after it."""
        return range(self.eos, self.eos + 1) if scope == "first_eos" else range(self.eos, self.end)

    def klass(self, pos: int) -> str:
        if pos == self.sos:
            return "[SOS]"
        if pos < self.start + self.head:
            return "template"
        if pos < self.eos:
            return "semantic"
        return "[EOS]" if pos == self.eos else "padding"


def _find(ids: list, marker: tuple, last: bool = False) -> int | None:
    """Index of the first (or last) occurrence of the id sequence ``marker`` in ``ids``."""
    hits = [i for i in range(len(ids) - len(marker) + 1) if tuple(ids[i:i + len(marker)]) == marker]
    return (hits[-1] if last else hits[0]) if hits else None


def llm_bounds(part: EncoderPart, entries) -> tuple[int, int]:
    """(first prompt index, first tail index) in one LLM chunk's token entries: the prompt follows the first
    template-head marker, the tail starts at the last tail marker (the prompt may contain either text)."""
    ids = [int(e[0]) if isinstance(e[0], numbers.Integral) else None for e in entries]
    head, tail = _find(ids, part.head_ids), _find(ids, part.tail_ids, last=True)
    if head is None or tail is None or tail < head + len(part.head_ids):
        raise ValueError(f"text: the {part.label} tokens do not hold the chat template around the prompt (its head "
                         f"ends with ids {list(part.head_ids)}, its tail starts with ids {list(part.tail_ids)}), so the "
                         f"prompt's end cannot be found. Write the prompt without chat-template tokens (a text starting "
                         f"with <|im_start|> makes Qwen-Image's tokenizer skip its template).")
    return head + len(part.head_ids), tail


def chunk_positions(part: EncoderPart, chunks: list, offset: int = 0) -> list[Chunk]:
    """Classify every position of ``chunks`` (the ``clip.tokenize`` list of one encoder key) into
    [SOS] / semantic / [EOS] / padding (LLM: template / semantic / [EOS] / padding) by the tokenizer's own
    special tokens. The first end token of a chunk is its [EOS] (CLIP-L also pads with that id, so position,
    not id, tells [EOS] from padding); an LLM's is the first token of its chat-template tail."""
    out = []
    pos = offset
    for ci, chunk in enumerate(chunks):
        expanded = []
        for entry in chunk:
            token = entry[0]
            weight = entry[1] if len(entry) > 1 else 1.0
            n = entry_size(token)
            if n == 1:
                expanded.append((token, weight))
            else:  # a multi-vector embedding entry: one position per vector
                flat = token.reshape(-1, token.shape[-1])
                expanded.extend((flat[i], weight) for i in range(n))
        start = pos
        if part.kind == families.LLM:
            first, tail = llm_bounds(part, expanded)
            if part.drops_head:  # the context starts at the prompt
                expanded, first, tail = expanded[first:], 0, tail - first
            pos = start + len(expanded)
            out.append(Chunk(ci, start, pos, None, start + tail, tuple(expanded), head=first))
            continue
        sos = None
        first = 0
        if part.start_token is not None:
            if not expanded or not _is_id(expanded[0][0], part.start_token):
                raise InternalError(f"{part.label} chunk {ci + 1} does not start with the [SOS] token")
            sos, first = start, 1
        eos = next((start + i for i in range(first, len(expanded)) if _is_id(expanded[i][0], part.end_token)), None)
        if eos is None and part.end_token == part.pad_token:  # the [EOS] is the first pad: a prompt may leave none
            raise ValueError(f"text: the prompt fills all {len(expanded)} {part.label} positions, so no pad token "
                             f"(the [EOS] of this encoder) follows it. Shorten the prompt to fewer than "
                             f"{len(expanded) - first} {part.label} tokens.")
        if eos is None:
            raise InternalError(f"{part.label} chunk {ci + 1} has no end token ({part.end_token})")
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



def token_text(part: EncoderPart, token) -> str:
    if isinstance(token, numbers.Integral):
        text = part.inv_vocab.get(int(token), str(int(token)))
        # byte-level BPE pieces (Qwen, Tekken): Ċ is a newline, Ġ a leading space
        return text.replace("Ċ", "\\n").replace("Ġ", " ") if part.kind == families.LLM else text
    return "<embedding>"

