"""TextLayerWordSubstitute's logic: 'word => replacement' rules applied to a prompt (paper 2's toxic-text
application: only the text layers see the replacement)."""

from __future__ import annotations

import re


def parse_replacements(text: str) -> list[tuple[str, str]]:
    """'word => replacement' per line; blank lines and lines starting with '#' are skipped."""
    rules, seen = [], {}
    for number, line in enumerate((text or "").splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.count("=>") != 1:
            raise ValueError(f"replacements line {number} ({stripped!r}): write exactly one 'word => replacement' "
                             f"per line (an empty replacement removes the word).")
        left, right = (part.strip() for part in stripped.split("=>"))
        if not left:
            raise ValueError(f"replacements line {number} ({stripped!r}): the word before '=>' is empty.")
        key = " ".join(left.lower().split())
        if key in seen:
            raise ValueError(f"replacements line {number} ({stripped!r}): {left!r} is already replaced on line "
                             f"{seen[key]}; keep one rule per word.")
        seen[key] = number
        rules.append((left, right))
    return rules


def _match_case(found: str, replacement: str) -> str:
    letters = [c for c in found if c.isalpha()]
    if len(letters) > 1 and all(c.isupper() for c in letters):
        return replacement.upper()
    if letters and found[0].isupper() and all(c.islower() for c in letters[1:]):
        return replacement[:1].upper() + replacement[1:]
    return replacement


def substitute_words(text: str, rules: list[tuple[str, str]]) -> tuple[str, list[int]]:
    """Replace whole words/phrases (case-insensitive, all rules at once: 'a => b' and 'b => a' swap) and return
    the new text and the number of replacements per rule. The replacement follows the found word's case when
    that is ALL CAPS or Capitalized."""
    if not rules:
        return text, []
    keys = [" ".join(left.lower().split()) for left, _ in rules]
    patterns = sorted(((k, i) for i, k in enumerate(keys)), key=lambda ki: -len(ki[0]))
    alternation = "|".join(r"\s+".join(re.escape(w) for w in k.split()) for k, _ in patterns)
    regex = re.compile(rf"(?<!\w)(?:{alternation})(?!\w)", re.IGNORECASE)
    counts = [0] * len(rules)
    lookup = dict(zip(keys, range(len(rules)), strict=True))

    def repl(m):
        i = lookup[" ".join(m.group(0).lower().split())]
        counts[i] += 1
        return _match_case(m.group(0), rules[i][1])

    return regex.sub(repl, text), counts


def encode_text(clip, text: str):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


