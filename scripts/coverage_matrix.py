"""Write the README's coverage matrix (family x node) from the coverage test's results.

    .venv/bin/python -m pytest tests/unit/test_coverage.py   # writes tests/_artifacts/coverage.json
    python3 scripts/coverage_matrix.py                         # rewrites the README section between the markers
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- coverage:begin -->", "<!-- coverage:end -->"


def _reason(message: str) -> str:
    """The why of a refusal: after the "X does not support ... (Model):" head, before the list of what is supported."""
    why = message.split("): ", 1)[-1] if "): " in message else message.split(": ", 1)[-1]
    for tail in (" Supported", " Use ", " Load the CLIP"):
        why = why.split(tail)[0]
    return why.strip()


def matrix(data: dict) -> str:
    nodes = data["nodes"]
    lines = ["| family (config) | " + " | ".join(nodes) + " |", "|---|" + "---|" * len(nodes)]
    for family, row in data["families"].items():
        cells = ["✅" if row[n]["status"] == "works" else "✗" for n in nodes]
        lines.append(f"| {family} ({row['config']}) | " + " | ".join(cells) + " |")
    reasons = sorted({_reason(r["reason"]) for row in data["families"].values() for n, r in row.items()
                      if n != "config" and r["status"] == "refused"})
    lines += ["", "✗ = refused with a ValueError; the reasons given:"] + [f"- {r}" for r in reasons]
    return "\n".join(lines)


def main() -> int:
    data = json.loads((ROOT / "tests" / "_artifacts" / "coverage.json").read_text())
    readme = ROOT / "README.md"
    text = readme.read_text()
    a, b = text.index(BEGIN) + len(BEGIN), text.index(END)
    readme.write_text(text[:a] + "\n" + matrix(data) + "\n" + text[b:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
