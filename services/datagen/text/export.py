"""JSON Lines output for text rows."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .synthesizer import TextRow

__all__ = ["row_to_json", "write_jsonl"]


def row_to_json(row: TextRow) -> str:
    # Keys keep the order of TextRow.to_dict, and text stays readable UTF-8
    # ("café", "bouclé") rather than \u escapes; together with the seeded
    # generator that makes the file byte-identical for a given seed.
    return json.dumps(row.to_dict(), ensure_ascii=False)


def write_jsonl(rows: Iterable[TextRow], path: str | Path) -> int:
    """Write one JSON object per line; return how many rows were written.

    ``"-"`` writes to stdout. A file is written beside its target and renamed
    into place, so a failed run (for example an exhausted catalog) never
    leaves a truncated file that looks like a finished one.
    """
    if str(path) == "-":
        count = 0
        for row in rows:
            sys.stdout.write(row_to_json(row) + "\n")
            count += 1
        return count

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as out:
            count = 0
            for row in rows:
                out.write(row_to_json(row) + "\n")
                count += 1
        os.replace(temp_name, target)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return count
