"""`scratchllm ui`: the Dagster UI and the MLflow UI together, stopped together.

Both servers run as child processes, each in its own process group so that stopping one stops
everything it started (dagster dev starts a webserver, a daemon and code servers). Each child gets
default signal handlers: a server started from a script can inherit SIG_IGN and then ignore
Ctrl-C. The MLflow server runs with lean settings, as measured here (one worker,
no job execution: ~4 s to start and ~0.5 GB instead of 18 s and 2.6 GB).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request

from llm_core import tracking
from llm_core.config import PROJECT_ROOT, ScratchConfig

STOP_TIMEOUT_SECONDS = 15


def server_commands(cfg: ScratchConfig, host: str, dagster_port: int, mlflow_port: int) -> dict[str, list[str]]:
    """dagster dev, and an MLflow server on the profile's store (none when the profile names a server)."""
    uri = tracking.tracking_uri(cfg)
    commands = {"dagster": [sys.executable, "-m", "dagster", "dev", "-w", str(PROJECT_ROOT / "workspace.yaml"),
                            "-h", host, "-p", str(dagster_port)]}
    if not tracking.is_server(uri):
        commands["mlflow"] = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
                              "--default-artifact-root", tracking.artifact_location(cfg), "--host", host,
                              "--port", str(mlflow_port), "--workers", "1"]
    return commands


def default_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def start(commands: dict[str, list[str]]) -> dict[str, subprocess.Popen]:
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return {name: subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, start_new_session=True,
                                   preexec_fn=default_signals)
            for name, command in commands.items()}


def stop(processes: dict[str, subprocess.Popen]) -> None:
    """SIGTERM to each process group, then SIGKILL to whatever is left after a grace period."""
    for proc in processes.values():
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    for proc in processes.values():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # children that outlived their parent, too
        proc.wait()


def interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (or kill -INT) stops the servers the same way Ctrl-C does


def wait_until_up(url: str, timeout: float = 120) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            time.sleep(0.5)
    return False


def run_ui(cfg: ScratchConfig, host: str, dagster_port: int, mlflow_port: int) -> int:
    """Start both servers, print where they are, and stop both on Ctrl-C, SIGTERM, or when one exits."""
    cfg.data_path.mkdir(parents=True, exist_ok=True)
    processes = start(server_commands(cfg, host, dagster_port, mlflow_port))
    for sig in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a background job inherits it ignored
        signal.signal(sig, interrupt)
    uri = tracking.tracking_uri(cfg)
    urls = {"dagster": f"http://{host}:{dagster_port}",
            "mlflow": uri.rstrip("/") if tracking.is_server(uri) else f"http://{host}:{mlflow_port}"}
    try:
        for name, health in (("mlflow", "/health"), ("dagster", "/server_info")):
            if name not in processes:
                print(f"MLflow UI: {urls[name]} (the profile's tracking server)", file=sys.stderr, flush=True)
                continue
            up = wait_until_up(urls[name] + health) if processes[name].poll() is None else False
            print(f"{'Dagster' if name == 'dagster' else 'MLflow'} UI: {urls[name]}"
                  + ("" if up else "  (did not answer yet; see its log above)"), file=sys.stderr, flush=True)
        # The MLflow UI opens on its GenAI pages; the training runs are one link away.
        experiment = tracking.experiment_id(uri, tracking.artifact_location(cfg))
        print(f"MLflow training runs: {urls['mlflow']}/#/experiments/{experiment}/runs  ·  "
              f"models: {urls['mlflow']}/#/models  ·  Ctrl-C stops {'both' if len(processes) > 1 else 'it'}",
              file=sys.stderr, flush=True)
        while all(p.poll() is None for p in processes.values()):
            time.sleep(0.5)
        exited = next(name for name, p in processes.items() if p.poll() is not None)
        print(f"scratchllm ui: the {exited} server exited ({processes[exited].returncode}); stopping the other",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nscratchllm ui: stopping both servers", file=sys.stderr)
        return 0
    finally:
        stop(processes)
