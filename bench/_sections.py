"""Shared by the benchmarks: replacing a benchmark's own delimited section of BENCHMARKS.md (only with --write)."""

from __future__ import annotations


def update_section(text: str, body: str, name: str) -> str:
    """``text`` with the block between ``<!-- name:start -->`` and ``<!-- name:end -->`` replaced by ``body``
    (the block appended at the end if absent)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text and end in text.split(start, 1)[1]:
        before, rest = text.split(start, 1)
        return before + block + rest.split(end, 1)[1]
    return text.rstrip("\n") + ("\n\n" if text.strip() else "") + block + "\n"


def append_row(text: str, name: str, heading: str, row: str) -> str:
    """``text`` with ``row`` added to the end of the table in section ``name`` (created with ``heading`` — a
    title, the command, and the table's header lines — if absent): for benchmarks that keep a history."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start in text and end in text.split(start, 1)[1]:
        before, rest = text.split(start, 1)
        body, after = rest.split(end, 1)
        return before + start + "\n" + body.strip("\n") + "\n" + row.strip() + "\n" + end + after
    return update_section(text, heading.strip() + "\n" + row.strip(), name)
