"""Small helpers that turn stage results into Dagster metadata a person wants to read."""

from __future__ import annotations

from pathlib import Path

import dagster as dg


def uri(path: Path) -> dict:
    return {"dagster/uri": dg.MetadataValue.path(str(path))}


def markdown_table(header: list[str], rows: list[list], max_cell: int = 200) -> dg.MetadataValue:
    def cell(value) -> str:
        text = str(value).replace("|", "\\|").replace("\n", " ⏎ ")
        return text if len(text) <= max_cell else text[: max_cell - 1] + "…"

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return dg.MetadataValue.md("\n".join(lines) if rows else "_(none)_")


def check_result(passed: bool, details: str) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=passed, metadata={"details": details}, severity=dg.AssetCheckSeverity.ERROR)
