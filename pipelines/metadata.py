"""Small helpers that turn stage results into Dagster metadata a person wants to read."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import dagster as dg

from llm_core.config import EngineConfig

MLFLOW_UI_URL = "http://127.0.0.1:5000"  # where `scratchllm ui` serves the MLflow UI by default
PNG_COLORS = 32  # a line plot needs few: ~8 KB instead of ~32 KB in every materialization event


def uri(path: Path) -> dict:
    return {"dagster/uri": dg.MetadataValue.path(str(path))}


def markdown_table(header: list[str], rows: list[list], max_cell: int = 200) -> dg.MetadataValue:
    def cell(value) -> str:
        text = str(value).replace("|", "\\|").replace("\n", " ⏎ ")
        return text if len(text) <= max_cell else text[: max_cell - 1] + "…"

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return dg.MetadataValue.md("\n".join(lines) if rows else "_(none)_")


def engine_metadata(engine: EngineConfig, tasks_per_node: dict[str, int]) -> dict:
    """Which engine ran a data stage, and how many of its tasks ran on each node."""
    where = "local" if engine.kind == "local" else f"ray @ {engine.address}"
    return {"engine": where, "tasks_per_node": markdown_table(["node", "tasks"], sorted(tasks_per_node.items()))}


def per_source_metadata(sources: dict[str, dict], columns: dict[str, str]) -> dict:
    """A stage's counts per corpus source: a table to read (`per_source`, columns: header -> count key)
    and every count as JSON (`per_source_counts`)."""
    rows = [[name, *(counts.get(key, 0) for key in columns.values())] for name, counts in sources.items()]
    return {"per_source": markdown_table(["source", *columns], rows),
            "per_source_counts": dg.MetadataValue.json(sources)}


def check_result(passed: bool, details: str) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=passed, metadata={"details": details}, severity=dg.AssetCheckSeverity.ERROR)


def png_data_uri(path: Path) -> str:
    """The PNG at `path` as a data: URI, quantized to PNG_COLORS colours (it travels in the event log)."""
    from PIL import Image

    with Image.open(path) as image:
        small = image.convert("RGB").quantize(PNG_COLORS)
    buffer = io.BytesIO()
    small.save(buffer, "PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def loss_curve_plot(png: Path, experiment_id: str, run_id: str) -> dg.MetadataValue:
    """The loss curve inline (a browser cannot load a local file path) and a link to its MLflow run page."""
    run_page = f"{MLFLOW_UI_URL}/#/experiments/{experiment_id}/runs/{run_id}"
    return dg.MetadataValue.md(f"![loss curve]({png_data_uri(png)})\n\n"
                               f"[MLflow run {run_id}]({run_page}) (the MLflow UI of `scratchllm ui`)")
