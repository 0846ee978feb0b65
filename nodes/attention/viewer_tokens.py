"""CrossAttentionMapViewer's token side: the label and class of every context position of the recorded prompt
(from the connected CLIP's tokenizer or the family's stock one, checked against the recorded context
fingerprints), and the ``tokens`` input's items (positions, summed ranges, class words) and picker chips."""

from __future__ import annotations

import dataclasses
import numbers

import torch

from ..core import families
from ..core.errors import InternalError
from ..shared.tokens import (
    EncoderPart,
    Layout,
    context_length,
    detect_layout,
    stock_layout,
    stock_tokenizer,
    token_positions,
    token_text,
)
from .capture import OTHER_LABEL, AttentionRun, context_print

CLASSES = ("template", "[SOS]", "semantic", "[EOS]", "padding")  # template: an LLM encoder's chat-template head
MAX_AUTO_ITEMS = 24
MAX_ITEMS = 64


# ----------------------------------------------------------------------------------------------
# token labels
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TokenInfo:
    pos: int  # position in the recorded context
    text: str  # shown label
    klass: str  # template, [SOS], semantic, [EOS], padding
    chunk: int
    weight: float  # prompt weight the tokenizer gave it
    encoder: str  # CLIP-L, CLIP-G, OpenCLIP-H, T5-XXL


def _display(part: EncoderPart, token, klass: str) -> str:
    if part.kind == families.LLM and isinstance(token, numbers.Integral):  # chat-template tokens read as themselves
        text = token_text(part, token).strip()
        return text or "·"
    if klass != "semantic":
        return {"[SOS]": "[SOS]", "[EOS]": "[EOS]"}.get(klass, "[pad]")
    if not isinstance(token, numbers.Integral):
        return "<emb>"
    text = token_text(part, token)
    text = text.replace("</w>", "").replace("\u2581", " ").strip()
    return text or "·"


def token_table(layout: Layout, tokens: dict) -> list[TokenInfo]:
    """One TokenInfo per context position of a conditioning made from ``tokens`` by ``layout``'s encoders.
    CLIP-L and CLIP-G share positions (SDXL, SD3); the first in-context encoder labels them."""
    positions = token_positions(layout, tokens)
    length = context_length(layout, positions)
    table: list[TokenInfo | None] = [None] * length
    for part in layout.context_parts:
        for chunk in positions[part.key]:
            for i in range(chunk.start, min(chunk.end, length)):
                if table[i] is None:
                    entry = chunk.tokens[i - chunk.start]
                    klass = chunk.klass(i)
                    table[i] = TokenInfo(i, _display(part, entry[0], klass), klass, chunk.index, float(entry[1]),
                                         part.label)
    if any(t is None for t in table):
        raise InternalError("context positions without a token")
    return table  # type: ignore[return-value]


def positions_only(family: families.Family, length: int) -> list[TokenInfo]:
    """A table that names positions only, for encoders whose token rules the registry does not hold yet."""
    label = "+".join(e.label for e in family.context_encoders)
    return [TokenInfo(i, f"#{i}", "semantic", 0, 1.0, label) for i in range(length)]


def prompt_tokens(run: AttentionRun, text: str, clip=None) -> list[TokenInfo]:
    """The token table of ``text`` for the recorded run, checked against the recorded context lengths."""
    family = families.by_name(run.family)
    lengths = sorted(run.sums)
    if clip is None and not family.stock_tokens:  # the tokenizer ships inside the checkpoint: positions only
        if len(lengths) != 1:
            raise ValueError(f"the record holds maps for prompts of {lengths} tokens and {family.label}'s tokenizer "
                             f"ships inside its text encoder checkpoint: connect the CLIP that encoded the prompt "
                             f"(clip input) to label the tokens, or record one prompt length at a time.")
        return positions_only(family, lengths[0])
    if any(e.kind == families.LLM and e.no_eos for e in family.context_encoders):  # no token rules (Gemma-2)
        if len(lengths) != 1:
            raise ValueError(f"the record holds maps for prompts of {lengths} tokens and {family.label}'s token labels "
                             f"are positions only: record one prompt length at a time.")
        return positions_only(family, lengths[0])
    if clip is not None:
        layout = detect_layout(clip, "CrossAttentionMapViewer")
        if layout.family.encoders != family.encoders:
            raise ValueError(f"clip is the {layout.label} text encoder but the record comes from a "
                             f"{family.label} model: connect the CLIP of the sampled model.")
        candidates = [(layout, clip.tokenize(text))]
    else:
        tokens = stock_tokenizer(family).tokenize_with_weights(text)
        candidates = [(stock_layout(family), tokens)]
        first = tuple(e.key for e in family.encoders if e.group == 0)
        if len(first) < len(family.encoders):  # e.g. SD3 without T5: only the first encoders in the context
            candidates.append((stock_layout(family, first), tokens))
    tables = [token_table(layout, toks) for layout, toks in candidates]
    for table in tables:
        if len(table) in run.sums:
            return table
    got = ", ".join(str(len(t)) for t in tables)
    raise ValueError(
        f"text tokenizes to {got} context positions, but the record holds maps for prompts of {lengths} tokens: "
        f"give the text of the conditioning that was recorded (the {run.rows} prompt), and the CLIP that encoded it.")


LABEL_RTOL = 1e-3  # re-encoding on the same device gives the same values; this absorbs dtype round trips


def _mismatch(mine: torch.Tensor, recorded: torch.Tensor, keep: list[int]) -> int | None:
    """The first of the ``keep`` positions where the two fingerprints differ (None: they agree)."""
    if mine.shape != recorded.shape:
        return keep[0] if keep else 0
    tol = LABEL_RTOL * (1.0 + float(recorded[keep].abs().max())) if keep else 0.0
    bad = [i for i in keep if float((mine[i] - recorded[i]).abs().max()) > tol]
    return bad[0] if bad else None


def check_labels(run: AttentionRun, table: list[TokenInfo], text: str, clip=None) -> str:
    """Check that ``text`` is the prompt the capture saw: re-encode it with ``clip`` and compare its [SOS] and
    semantic positions (the ones every [EOS]/padding construction keeps) with the recorded fingerprints. Returns
    a note for the summary ('' when checked); raises ValueError on a different prompt."""
    prints = run.contexts.get(len(table)) or []
    if not prints or table[0].text == "#0":
        return ""
    if clip is None:
        return ("labels checked by token count only: connect the CLIP that encoded the prompt to check them "
                "token by token")
    if all(not bool(p.any()) for p in prints):
        return "the recorded conditioning is all zeros (ConditioningZeroOut): labels checked by token count only"
    mine = context_print(clip.encode_from_tokens(clip.tokenize(text)))
    keep = [t.pos for t in table if t.klass in ("[SOS]", "template", "semantic")]
    firsts = [_mismatch(mine, p, keep) for p in prints]
    if any(f is None for f in firsts):
        return ""
    k = max(firsts)
    causal = all(e.kind in ("clip", families.LLM) for e in families.by_name(run.family).context_encoders)
    where = (f"they differ from position {k} ({table[k].text!r} in this text) on" if causal else
             "they differ (this text encoder reads the whole prompt at every position, so the first differing word "
             "cannot be named)")
    listed = " ".join(f"{t.pos}:{t.text}" for t in table if t.klass != "padding")
    raise ValueError(
        f"text: {text!r} is not the prompt the capture recorded ({run.rows} rows). Both have {len(table)} context "
        f"positions, but {where}. This text's tokens: {listed}. A CONDITIONING carries no token ids, so the recorded "
        f"prompt's words cannot be listed: give the text of the conditioning the capture saw (and the CLIP that "
        f"encoded it). If that conditioning was changed after encoding (e.g. ConditioningAverage, or "
        f"CLIPTextEncodeSDXL with different text_g and text_l), disconnect clip to label the maps by token count only.")


# ----------------------------------------------------------------------------------------------
# token selection
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Item:
    key: str  # what the tokens input says: "5", "8-76", "sos", "eos", "pad", "sem", "img"
    label: str
    channels: tuple[int, ...]
    klass: str


def _item_for_positions(key: str, positions: list[int], table: list[TokenInfo]) -> Item:
    if len(positions) == 1:
        t = table[positions[0]]
        return Item(key, f"{t.pos} {t.text}", (t.pos,), t.klass)
    classes = {table[p].klass for p in positions}
    klass = classes.pop() if len(classes) == 1 else "mixed"
    return Item(key, f"{positions[0]}-{positions[-1]} ({len(positions)})", tuple(positions), klass)


def default_items(table: list[TokenInfo], extra: bool) -> list[Item]:
    """Every semantic token and the first [EOS] of each chunk (at most MAX_AUTO_ITEMS)."""
    keep = [t for t in table if t.klass in ("semantic", "[EOS]")]
    return [_item_for_positions(str(t.pos), [t.pos], table) for t in keep[:MAX_AUTO_ITEMS]]


def parse_items(spec: str, table: list[TokenInfo], extra: bool) -> list[Item]:
    """Items of the ``tokens`` input: comma-separated context positions ("5"), ranges summed into one map
    ("8-76"), or the class words sos, eos, sem, pad (all positions of that class, summed) and img (SD3 / Flux:
    the weight on the image keys). Empty or "auto": every semantic token and the first [EOS] of each chunk."""
    text = (spec or "").strip().lower()
    if text in ("", "auto"):
        return default_items(table, extra)
    n = len(table)
    words = {"sos": "[SOS]", "eos": "[EOS]", "sem": "semantic", "pad": "padding"}
    items: list[Item] = []
    seen = set()
    for raw in text.replace(";", ",").split(","):
        key = raw.strip()
        if not key or key in seen:
            continue
        seen.add(key)
        if key in words:
            positions = [t.pos for t in table if t.klass == words[key]]
            if not positions:
                raise ValueError(f"tokens: this prompt has no {words[key]} positions (item {key!r}); remove it.")
            items.append(Item(key, f"{words[key]} ({len(positions)})", tuple(positions), words[key]))
            continue
        if key in ("img", "image"):
            if not extra:
                raise ValueError("tokens: 'img' (weight on the image keys) exists only for SD3 / Flux records, whose "
                                 "joint attention also attends to image tokens; remove it for this UNet model.")
            items.append(Item(key, OTHER_LABEL, (n,), OTHER_LABEL))
            continue
        try:
            a, _, b = key.partition("-")
            lo, hi = int(a), int(b if b else a)
        except ValueError:
            raise ValueError(f"tokens: {key!r} is not a token. Use context positions (e.g. '1, 2, 5'), ranges summed "
                             f"into one map ('8-76'), 'sos', 'eos', 'sem', 'pad'{', img' if extra else ''} or 'auto'.") \
                from None
        if lo > hi or lo < 0 or hi >= n:
            raise ValueError(f"tokens: {key!r} is outside the prompt's {n} context positions (0-{n - 1}). See the token "
                             f"list in the summary or pick the tokens in the node.")
        items.append(_item_for_positions(key, list(range(lo, hi + 1)), table))
    if not items:
        return default_items(table, extra)
    if len(items) > MAX_ITEMS:
        raise ValueError(f"tokens: {len(items)} maps asked for; at most {MAX_ITEMS} fit in one grid. Sum ranges ('8-76') "
                         f"or pick fewer.")
    return items


def picker_chips(table: list[TokenInfo], extra: bool, selected: list[Item]) -> list[dict]:
    """What the JS token picker shows: one chip per non-padding position, one per chunk for its padding, and
    [image] for SD3 / Flux. ``item`` is the text the chip adds to the tokens input; ``selected``: shown in this
    run; ``auto``: part of the automatic choice."""
    chosen = {it.key for it in selected}
    auto = {it.key for it in default_items(table, extra)}
    chips = []
    pad_runs: dict[int, list[int]] = {}
    for t in table:
        if t.klass == "padding":
            pad_runs.setdefault(t.chunk, []).append(t.pos)
            continue
        chips.append({"item": str(t.pos), "label": t.text, "class": t.klass, "chunk": t.chunk,
                      "weight": round(t.weight, 3), "selected": str(t.pos) in chosen, "auto": str(t.pos) in auto})
    for chunk, positions in pad_runs.items():
        key = f"{positions[0]}-{positions[-1]}" if len(positions) > 1 else str(positions[0])
        chips.append({"item": key, "label": f"[pad]×{len(positions)}", "class": "padding", "chunk": chunk,
                      "weight": 1.0, "selected": key in chosen, "auto": False})
    if extra:
        chips.append({"item": "img", "label": OTHER_LABEL, "class": OTHER_LABEL, "chunk": -1, "weight": 1.0,
                      "selected": "img" in chosen, "auto": False})
    order = {c["item"]: i for i, c in enumerate(chips)}
    chips.sort(key=lambda c: (int(c["item"].split("-")[0]) if c["item"][0].isdigit() else 1 << 30, order[c["item"]]))
    return chips


def item_maps(maps: torch.Tensor, items: list[Item]) -> torch.Tensor:
    """(channels, h, w) -> (items, h, w): each item's channels summed."""
    return torch.stack([maps[list(it.channels)].sum(0) for it in items])
