"""What a request to the team deployment's MLflow server costs, with and without its password-check cache.

    python benchmarks/tracking_server.py [--requests 40] [--repeats 3]

Starts `mlflow server --app-name basic-auth` as `scratchllm deploy` does (one worker, job execution off,
the deployment's own mlflow_auth.ini, basic auth as the admin), on SQLite stores in a temporary folder
instead of PostgreSQL, once with `auth_cache_ttl_seconds = 0` (MLflow's default) and once with the
deployment's 300, and times what a
training sends most: `runs/log-batch` of one metric, as the admin. Prints the median over the repeats of
the milliseconds per request and the server's CPU milliseconds per request (its whole process tree).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipelines.deploy import ADMIN_USER, auth_settings  # noqa: E402

ADMIN_PASSWORD = "Benchmark-Secret-31415"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SqliteStores:
    """What the deployment's auth settings ask of its PostgreSQL Database, as SQLite files."""

    def __init__(self, root: Path):
        self.root = root

    def sqlalchemy_url(self, suffix: str) -> str:
        return f"sqlite:///{self.root / suffix.strip('_')}.db"


def start_server(root: Path, cache_seconds: int) -> tuple[subprocess.Popen, str]:
    """The deployment's own mlflow_auth.ini (pipelines/deploy.py), with the cache's TTL set to cache_seconds."""
    settings = re.sub(r"auth_cache_ttl_seconds = \d+", f"auth_cache_ttl_seconds = {cache_seconds}",
                      auth_settings(SqliteStores(root)))
    assert f"auth_cache_ttl_seconds = {cache_seconds}" in settings
    (root / "auth.ini").write_text(settings)
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"), "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": os.urandom(16).hex()}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                               "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return server, f"http://127.0.0.1:{port}/api/2.0/mlflow"


def request(url: str, payload: dict) -> dict:
    auth = "Basic " + base64.b64encode(f"{ADMIN_USER}:{ADMIN_PASSWORD}".encode()).decode()
    sent = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                  headers={"Content-Type": "application/json", "Authorization": auth})
    with urllib.request.urlopen(sent, timeout=60) as response:
        return json.loads(response.read())


def server_cpu_seconds(server: subprocess.Popen) -> float:
    tree = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
    return sum(p.cpu_times().user + p.cpu_times().system for p in tree)


def measure(cache_seconds: int, requests: int, repeats: int) -> tuple[float, float]:
    """(ms per request, server CPU ms per request), medians over the repeats."""
    with tempfile.TemporaryDirectory(prefix="tracking-bench-") as folder:
        server, api = start_server(Path(folder), cache_seconds)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    request(f"{api}/experiments/search", {"max_results": 1})
                    break
                except OSError:
                    assert time.monotonic() < deadline and server.poll() is None, "the MLflow server did not start"
                    time.sleep(0.5)
            run_id = request(f"{api}/runs/create", {"experiment_id": "0"})["run"]["info"]["run_id"]
            walls, cpus = [], []
            for _ in range(repeats):
                cpu, start = server_cpu_seconds(server), time.perf_counter()
                for step in range(requests):
                    request(f"{api}/runs/log-batch", {"run_id": run_id, "metrics": [
                        {"key": "train_loss", "value": 1.0, "timestamp": 0, "step": step}]})
                walls.append((time.perf_counter() - start) / requests * 1000)
                cpus.append((server_cpu_seconds(server) - cpu) / requests * 1000)
            return statistics.median(walls), statistics.median(cpus)
        finally:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    a = parser.parse_args()
    print(f"{a.requests} runs/log-batch requests as the admin, median of {a.repeats}\n")
    print("| auth_cache_ttl_seconds | ms per request | server CPU ms per request |")
    print("|---|---|---|")
    for cache_seconds in (0, 300):
        wall, cpu = measure(cache_seconds, a.requests, a.repeats)
        print(f"| {cache_seconds}{' (MLflow default)' if not cache_seconds else ' (scratchllm deploy)'} "
              f"| {wall:.1f} | {cpu:.1f} |")


if __name__ == "__main__":
    main()
