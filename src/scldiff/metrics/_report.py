"""Plain markdown tables (no extra dependency)."""

from __future__ import annotations

import pandas as pd


def to_markdown(frame: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub-flavoured markdown table of ``frame`` with numbers rounded to ``digits``."""
    columns = [" ".join(str(c) for c in col) if isinstance(col, tuple) else str(col)
               for col in frame.columns]

    def cell(value) -> str:
        if isinstance(value, float):
            return "" if pd.isna(value) else f"{value:.{digits}f}"
        return str(value)

    lines = ["| " + " | ".join([str(frame.index.name or "")] + columns) + " |",
             "|" + "---|" * (len(columns) + 1)]
    for index, row in frame.iterrows():
        lines.append("| " + " | ".join([str(index)] + [cell(v) for v in row]) + " |")
    return "\n".join(lines) + "\n"
