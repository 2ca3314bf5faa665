"""The one table `make bench` prints first: each path, ours against the peer.

A module that measures a path (bench/bench.py, bench/streams.py) returns
`Row`s; bench.py prints them together with `render`. Rows are plain data so a
module can build them without importing anything else of the benchmark.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    """One path measured on both sides, or on ours only.

    path: what was measured, e.g. "REST Execute (echo, SQLite)".
    ours, peer: the rate (or time) of this gateway and of the FastAPI peer,
        in the unit the path names (req/s, streams/s, ms); NaN where a side
        was not measured.
    ratio: ours / peer, always (NaN without a peer); for a time (TTFT) the
        goal may be on the difference instead, which `note` or `goal` says.
    p50_ms, p99_ms: our latency percentiles in milliseconds (NaN if none).
    non_2xx: our answers that were not 2xx, plus socket errors (-1 if unknown).
    cpu: CPU per request or stream of each side, free text, e.g.
        "svc 1.21 + envoy 0.30 | uvicorn 0.14 ms".
    goal: the issue's goal for this row in words, e.g. ">=0.5x, p99 <=25 ms,
        0 non-2xx"; "" when the row has none.
    met: True / False against the goal; None when it has no goal or the row
        was skipped.
    note: why a row was skipped, or anything the reader must know.
    """

    path: str
    ours: float
    peer: float = math.nan
    ratio: float = math.nan
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    non_2xx: int = -1
    cpu: str = ""
    goal: str = ""
    met: bool | None = None
    note: str = ""


def skipped(path: str, reason: str, goal: str = "") -> Row:
    """A row that could not be measured here, with the reason printed."""
    return Row(path=path, ours=math.nan, goal=goal, note=f"skipped: {reason}")


def _num(value: float, digits: int = 0) -> str:
    if math.isnan(value):
        return "-"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def _rate(value: float) -> str:
    return _num(value, 0 if math.isnan(value) or abs(value) >= 100 else 2)


def _met(met: bool | None) -> str:
    return {True: "met", False: "NOT met", None: "-"}[met]


COLUMNS = ("path", "ours", "peer", "ratio", "p50 ms", "p99 ms", "non-2xx", "CPU", "goal", "")


def cells(row: Row) -> tuple[str, ...]:
    """The row as printed, one string per column of COLUMNS."""
    return (
        row.path,
        _rate(row.ours),
        _rate(row.peer),
        "-" if math.isnan(row.ratio) else f"{row.ratio:.2f}x",
        _num(row.p50_ms, 2),
        _num(row.p99_ms, 2),
        str(row.non_2xx) if row.non_2xx >= 0 else "-",
        row.cpu or "-",
        row.goal or "-",
        _met(row.met),
    )


def render(rows: Sequence[Row]) -> str:
    """A plain-text table (columns padded to width) with notes below it."""
    table = [COLUMNS, *(cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in table
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {r.path}: {r.note}" for r in rows if r.note]
    return "\n".join(lines + (["notes:", *notes] if notes else []))
