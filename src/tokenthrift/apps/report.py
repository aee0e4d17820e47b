"""Plain-text tables for the command line and markdown tables for BENCHMARKS.md."""
from __future__ import annotations

from typing import Sequence


def _cell(value) -> str:
    if isinstance(value, float):  # 4 significant digits, no exponent for everyday magnitudes
        return f"{value:.4g}" if 1e-3 <= abs(value) < 1000 or value == 0 else f"{value:.1f}"
    return str(value)


def table(rows: Sequence[dict], columns: Sequence[str] | None = None, markdown: bool = False) -> str:
    """Rows of dicts -> an aligned text table (or a markdown table). Missing cells print as '-'."""
    if not rows:
        return "(no rows)"
    columns = list(columns or dict.fromkeys(k for r in rows for k in r))  # every key, first-seen order
    cells = [[_cell(r.get(c, "-")) for c in columns] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    fmt = lambda row: "  ".join(v.rjust(w) for v, w in zip(row, widths))  # noqa: E731
    return "\n".join([fmt(columns), fmt(["-" * w for w in widths])] + [fmt(row) for row in cells])
