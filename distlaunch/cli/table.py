"""The one table printer of the CLI: rows of cells as aligned columns."""
from __future__ import annotations

from collections.abc import Sequence


def format_table(rows: Sequence[Sequence[object]], align_right: Sequence[int] = ()) -> str:
    """Rows (the first is the header) as lines of columns two spaces apart; columns in
    ``align_right`` are right-aligned. Ends with a newline; empty for no rows."""
    cells = [[str(cell) for cell in row] for row in rows]
    if not cells:
        return ""
    widths = [max(len(row[i]) for row in cells if i < len(row)) for i in range(max(map(len, cells)))]
    lines = []
    for row in cells:
        parts = [cell.rjust(widths[i]) if i in align_right else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines) + "\n"
