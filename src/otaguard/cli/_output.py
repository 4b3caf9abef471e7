"""Machine-readable and pipe-safe output of the commands that print data.

Every command that prints data takes ``--json``: one JSON document on stdout (``json.loads``
reads it; nothing else goes to stdout), built from the same library result the human view
prints. Tables are rich tables on a terminal; piped (not a tty) they are plain aligned
columns at full width, so no value is ever cut to fit 80 columns (ADR 0030).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import enum
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = ["add_json_option", "emit_json", "emit_table", "jsonable", "plain_columns"]


def add_json_option(p: argparse.ArgumentParser) -> None:
    """``--json``: the command's data as one JSON document on stdout."""
    p.add_argument(
        "--json",
        action="store_true",
        dest="json",
        help="print the data as one JSON document on stdout (for scripts)",
    )


def jsonable(value: Any) -> Any:  # noqa: PLR0911 - one return per kind
    """``value`` as JSON types: dataclasses as objects, times as ISO 8601 UTC, enums and
    versions as their text, paths as strings, tuples as lists."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            return value.isoformat()
        return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Sequence | set | frozenset) and not isinstance(value, bytes):
        return [jsonable(v) for v in value]
    # Version and other small value types print as what they are (e.g. "1.2.0").
    return str(value)


def emit_json(value: Any) -> None:
    """Write ``value`` as one JSON document to stdout, bypassing rich (no markup, no wrap)."""
    sys.stdout.write(json.dumps(jsonable(value), indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def plain_columns(rows: Sequence[Sequence[str]]) -> list[str]:
    """Plain aligned columns: never truncated, one line per row (greppable, scriptable)."""
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]


def emit_table(
    console: Console, *, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]
) -> None:
    """A rich table on a terminal; piped, a title line and plain full-width columns.

    ``rows`` hold plain text (no rich markup): both views print them unchanged.
    """
    if console.is_terminal:
        table = Table(title=title)
        for col in columns:
            table.add_column(col, overflow="fold")
        for r in rows:
            table.add_row(*(Text(c) for c in r))
        console.print(table, markup=False)
        return
    console.print(title, markup=False, highlight=False, soft_wrap=True)
    header = [c.upper() for c in columns]
    for line in plain_columns([header, *rows]):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
