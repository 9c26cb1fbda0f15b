"""Small helpers shared by test modules (fixtures live in conftest.py)."""

import json
from pathlib import Path

from llm_core.config import DEFAULT_PROFILE, load_config
from llm_core.data.stages import build_cleaned_shards, build_raw_corpus

QUIET = lambda msg: None  # noqa: E731


def make_config(data_dir: Path, sources: list[Path], **sections):
    """The default profile (explicitly, whatever the environment says) with test overrides."""
    overrides = {"data_dir": str(data_dir), "corpus": {"sources": [str(s) for s in sources]},
                 "cleaning": {"num_workers": 1}}
    for name, values in sections.items():
        overrides[name] = {**overrides.get(name, {}), **values}
    return load_config(DEFAULT_PROFILE, overrides=overrides)


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def build_shards(cfg) -> list[Path]:
    """raw_corpus + cleaned_shards; the cleaned shard files."""
    build_raw_corpus(cfg, QUIET)
    result = build_cleaned_shards(cfg, QUIET)
    return [result.shards_dir / p["name"] for p in result.parts]
