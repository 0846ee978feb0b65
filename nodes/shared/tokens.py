"""Token layout of a text conditioning: which encoder's token sits at which position and channels, and which
positions are [SOS], semantic, [EOS] or padding — by the CLIP object's own tokenizer and the family registry's
encoder rules (``core.families.EncoderSpec``).

Per encoder chunk the positions are classified as

    CLIP (L, G, H): [SOS] at 0, semantic 1..n, the first [EOS] at n+1, padding n+2..76 (77 per chunk)
    T5-XXL:         no [SOS], semantic 0..n-1, the end token at n, padding after it (one chunk)

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
    kind: str  # "clip" ([SOS] ... [EOS] pad, 77 per chunk) or "t5" (no [SOS], one chunk)
    channels: tuple[int, int] | None  # channel range in the conditioning; None: not in the context
    group: int  # 0: token block at the start; 1: tokens appended after group 0
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
    """Hidden width of a CLIP / T5 encoder module (the channels it contributes to the conditioning)."""
    return int(sub.transformer.get_input_embeddings().weight.shape[-1])


def sub_tokenizer(tokenizer, key: str):
    for name in (f"clip_{key}", key):
        sub = getattr(tokenizer, name, None)
        if sub is not None and hasattr(sub, "tokenize_with_weights") and hasattr(sub, "end_token"):
            return sub
    raise ValueError(f"clip: its tokenizer ({type(tokenizer).__name__}) has no sub-tokenizer for key {key!r}.")


def _part(tokenizer, spec: families.EncoderSpec, channels, encoded: bool) -> EncoderPart:
    t = sub_tokenizer(tokenizer, spec.key)
    if t.end_token is None:
        raise ValueError(f"clip: the {spec.label} tokenizer has no end token, so there is no [EOS] to swap.")
    return EncoderPart(key=spec.key, label=spec.label, kind=spec.kind, channels=channels, group=spec.group,
                       encoded=encoded, start_token=t.start_token, end_token=int(t.end_token),
                       pad_token=int(t.pad_token), inv_vocab=getattr(t, "inv_vocab", {}))


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
    llm = [e.label for e in family.encoders if e.kind == families.LLM]
    if llm:
        raise ValueError(f"clip: {what} does not support {family.label}'s {llm[0]} text encoder yet: it is a decoder-only "
                         f"LLM behind a chat template, and the family registry does not define its [EOS]-analogue "
                         f"positions (the end-of-turn tokens after the prompt) yet. Use an SD1.x / SD2.x / SDXL / SD3 / "
                         f"Flux.1 / Chroma / AuraFlow model for this node.")
    parts, offset = [], 0
    for spec in family.encoders:
        sub = getattr(csm, spec.attr, None)
        width = _clip_width(sub) if sub is not None else spec.missing_width
        channels = None
        if spec.in_context and sub is not None:
            channels = (offset, offset + width) if spec.group == 0 else (0, width)
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
            n = entry_size(token)
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
                raise InternalError(f"{part.label} chunk {ci + 1} does not start with the [SOS] token")
            sos, first = start, 1
        eos = next((start + i for i in range(first, len(expanded)) if _is_id(expanded[i][0], part.end_token)), None)
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
        return part.inv_vocab.get(int(token), str(int(token)))
    return "<embedding>"

