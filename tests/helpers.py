"""Small helpers shared by test modules (fixtures live in conftest.py)."""

import gzip
import json
import os
import random
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm_core.config import DEFAULT_PROFILE, PROJECT_ROOT, ScratchConfig, load_config
from llm_core.data.cleaned_shards import build_cleaned_shards
from llm_core.data.raw_corpus import build_raw_corpus

QUIET = lambda msg: None  # noqa: E731
CI_PROFILE = PROJECT_ROOT / "assets_config" / "ci.yaml"
SUBPROCESS_TIMEOUT = 300


def make_config(data_dir: Path, sources: list[Path], **sections):
    """The default profile (explicitly, whatever the environment says) with test overrides; the
    `make_cfg` fixture is this with data_dir under tmp_path."""
    overrides = {"data_dir": str(data_dir), "corpus": {"sources": [str(s) for s in sources]},
                 "cleaning": {"num_workers": 1}}
    for name, values in sections.items():
        overrides[name] = {**overrides.get(name, {}), **values}
    return load_config(DEFAULT_PROFILE, overrides=overrides)


# ---------------------------------------------------------------------------------------------
# training runs on the ci profile (the `data_dir` fixture builds its dataset)


def config(data_dir: Path, **training) -> ScratchConfig:
    base = {"max_steps": 20, "warmup_steps": 5, "batch_size": 4, "checkpoint_interval": 10,
            "eval_interval": 10, "eval_batches": 5, "log_interval": 10}
    return load_config(CI_PROFILE, {"data_dir": str(data_dir), "training": {**base, **training}})


def build_dataset(cfg: ScratchConfig) -> None:
    """raw_corpus, cleaned_shards, tokenizer (at <data_dir>/tokenizer) and tokenized_dataset of a profile."""
    from llm_core.data import tokenizer as tok
    from llm_core.data.tokenized_dataset import build_tokenized_dataset

    shards = build_shards(cfg)
    tok.train_tokenizer(cfg, shards, cfg.data_path / "tokenizer", log=QUIET)
    tokenizer_dir = cfg.data_path / "tokenizer"
    build_tokenized_dataset(cfg, tok.load_tokenizer(tokenizer_dir), tokenizer_dir, log=QUIET)


def summary(out_dir: Path) -> dict:
    from llm_core.model_files import SUMMARY_FILE

    return json.loads((out_dir / SUMMARY_FILE).read_text())


def losses(history: list[dict], key: str = "train_loss") -> list[float]:
    return [h[key] for h in history if key in h]


def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SCRATCHLLM_CONFIG"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def train_command(cfg: ScratchConfig, out_dir: Path) -> list[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    resolved = out_dir.parent / f"{out_dir.name}.config.json"
    resolved.write_text(json.dumps(cfg.model_dump(mode="json")))
    return ["-m", "llm_core.training.train", "--resolved-config", str(resolved), "--out-dir", str(out_dir)]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run to completion in its own process group (ranks included); killed as a group on timeout."""
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd} timed out\n{out[-3000:]}\n{err[-3000:]}")
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode})\n{out[-3000:]}\n{err[-5000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# ---------------------------------------------------------------------------------------------
# data and servers


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def three_sources(sources_dir: Path, prose: list[str]) -> dict:
    """A corpus of 3 real sources of very different sizes, as `corpus` profile values: `plays` (120 KB of
    Shakespeare), `docs` (70 paragraphs of Python's reference docs) and `tiny` (10 more paragraphs and an
    exact copy of one of docs')."""
    sources_dir.mkdir(parents=True, exist_ok=True)
    plays = sources_dir / "plays.txt"
    plays.write_text((PROJECT_ROOT / "data" / "tinyshakespeare.txt").read_text()[:120_000])
    write_jsonl(sources_dir / "docs.jsonl", prose[:70])
    write_jsonl(sources_dir / "tiny.jsonl", prose[70:80] + [prose[3]])
    return {"sources": [{"name": "plays", "paths": [str(plays)]},
                        {"name": "docs", "paths": [str(sources_dir / "docs.jsonl")]},
                        {"name": "tiny", "paths": [str(sources_dir / "tiny.jsonl")]}],
            "pieces_are_documents": [str(plays)], "max_document_bytes": 1024}  # ~120 scenes: some held out


def rows(directory: Path) -> list[dict]:
    """Every row of the parquet files in `directory`, in file order."""
    return [r for p in sorted(directory.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


def build_shards(cfg) -> list[Path]:
    """raw_corpus + cleaned_shards; the cleaned shard files."""
    build_raw_corpus(cfg, QUIET)
    result = build_cleaned_shards(cfg, QUIET)
    return [result.shards_dir / p["name"] for p in result.parts]


def random_unicode(rng: random.Random, n: int) -> list[str]:
    ranges = [(0x00, 0x7F), (0x80, 0x24F), (0x300, 0x36F), (0x370, 0x52F), (0x590, 0x6FF), (0x900, 0x97F),
              (0x2000, 0x206F), (0x3000, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xE000, 0xF8FF),
              (0xFE00, 0xFE0F), (0xFEFF, 0xFFFD), (0x1F300, 0x1FAFF), (0x10000, 0x10FFFF)]
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(1, 40)):
            lo, hi = rng.choice(ranges)
            chars.append(chr(rng.randint(lo, hi)))
        out.append("".join(chars))
    return out


MORE_TRICKY = [
    "👩‍👩‍👧‍👦 👨🏿‍💻 🏳️‍🌈 🇫🇷🇯🇵 ❤️‍🔥", "\u200d\u200c\u200b zero widths \ufeff BOM", "e\u0301 vs \u00e9, Å vs A\u030a",
    "中文字符，标点。日本語のテキスト", "Ελληνικά Русский עברית العربية हिन्दी", "\t\t\tindented\t", " " * 17, "\n" * 9,
    "a\r\nb\r\n\r\nc\r", " \n \n\t\n ", "\u00a0non-breaking\u00a0\u3000ideographic space", "x" * 5000,
    "<|pad|> and <|endoftext|><|endoftext|>", "\x01\x02\x1b[31mescape\x1b[0m", "\U0010ffff\U0001d400 math 𝔸𝕓𝖈",
    "  leading and trailing  ", "'s 're 've 'll don't", "12345 67890 3.14159 1e-9", "\u2028line\u2029para",
]


def free_port() -> int:
    """A TCP port nobody listens on now (for the servers and process groups tests start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, payload: dict | None = None) -> dict:
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def graphql(port: int, query: str, variables: dict | None = None) -> dict:
    """A query to the Dagster webserver's GraphQL API, as the UI sends it."""
    body = get_json(f"http://127.0.0.1:{port}/graphql", {"query": query, "variables": variables or {}})
    assert "errors" not in body, body
    return body["data"]


LAUNCH = """
mutation Launch($params: ExecutionParams!) {
  launchPipelineExecution(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}"""


def launch_assets(port: int, assets: list[str], run_config: dict | None = None, tags: dict | None = None) -> str:
    """Materialize `assets` as the UI's "Materialize" button does (run_config: the launchpad's edits);
    returns the run id. No assetCheckSelection: the UI leaves it out, and an empty list would skip the checks."""
    repository = graphql(port, "{ repositoriesOrError { ... on RepositoryConnection { nodes { name "
                               "location { name } } } } }")["repositoriesOrError"]["nodes"][0]
    launched = graphql(port, LAUNCH, {"params": {
        "selector": {"repositoryLocationName": repository["location"]["name"], "repositoryName": repository["name"],
                     "pipelineName": "__ASSET_JOB", "assetSelection": [{"path": [a]} for a in assets]},
        "runConfigData": run_config or {}, "mode": "default",
        "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in (tags or {}).items()]},
    }})["launchPipelineExecution"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    return launched["run"]["runId"]


def wait_until(condition, *procs: subprocess.Popen, what: str, timeout: float = 300) -> None:
    """Poll `condition()` (a file the code writes, a line it prints, a run's status); fail early if a
    process ends. Every 50 ms at first, backing off to once a second: a GraphQL query costs the servers
    CPU, which they share with the training being waited for (an xdist worker is pinned to its cores)."""
    deadline, pause = time.monotonic() + timeout, 0.05
    while not condition():
        ended = [p for p in procs if p.poll() is not None]
        assert not ended, f"ended before {what}: {[p.args for p in ended]}\n" + "\n".join(
            Path(p.stdout_path).read_text()[-3000:] for p in ended if getattr(p, "stdout_path", None))
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(pause)
        pause = min(1.0, pause * 1.5)


def held_pid(marker: Path) -> int:
    """The pid a hold point wrote (llm_core/faults.py)."""
    return int(marker.read_text().split()[0])


def run_status(port: int, run_id: str) -> str:
    return graphql(port, f'{{ runOrError(runId: "{run_id}") {{ ... on Run {{ status }} }} }}')["runOrError"]["status"]


def run_messages(port: int, run_id: str) -> list[str]:
    """The messages of a run's events: its log lines, as the UI's run page shows them."""
    events = graphql(port, f'{{ logsForRun(runId: "{run_id}", limit: 10000) {{ ... on EventConnection {{ events '
                           f'{{ ... on MessageEvent {{ message }} }} }} }} }}')["logsForRun"]["events"]
    return [e["message"] for e in events if e and e.get("message")]


def terminate_run(port: int, run_id: str) -> None:
    """What the UI's "Terminate" button sends."""
    done = graphql(port, "mutation Terminate($runId: String!) { terminateRun(runId: $runId) { __typename "
                         "... on TerminateRunFailure { message } ... on PythonError { message } } }",
                   {"runId": run_id})["terminateRun"]
    assert done["__typename"] == "TerminateRunSuccess", done


# Source files for the ingest and raw_corpus tests.
DELIM = "\n<|doc|>\n"


def jsonl(records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def write_parquet(path: Path, columns: dict) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def truncated_gzip(tmp_path, docs: list[str], keep: float = 0.6) -> Path:
    data = gzip.compress(DELIM.join(docs).encode(), compresslevel=1)
    path = tmp_path / "trunc.txt.gz"
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def random_docs(n: int, words: int, seed: int = 0) -> list[str]:
    """Poorly compressible documents: `n` docs of `words` random pseudo-words."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 9))) for _ in range(4000)]
    return [f"doc {i}: " + " ".join(rng.choices(vocab, k=words)) for i in range(n)]
