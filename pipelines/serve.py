"""`scratchllm serve`: a registered model behind MLflow's REST scoring server, in the foreground.

It runs `mlflow models serve -m models:/NAME@ALIAS --env-manager local` (the local environment: no
virtualenv is built, nothing is downloaded) with the profile's tracking and registry URI in the
child's environment, so the model is found whatever the working directory and whatever the shell
exports. The child runs in its own process group with default signal handlers, like the servers of
`scratchllm ui`, and Ctrl-C or SIGTERM stops it and the workers it started.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from llm_core import registry, tracking
from llm_core.config import ScratchConfig
from pipelines.ui import default_signals, interrupt, stop, wait_until_up

STARTUP_TIMEOUT_SECONDS = 180


def check_registered(spec: str, uri: str) -> None:
    """Refuse, before a server starts, a spec that is not `NAME@ALIAS` or `NAME/VERSION` (ValueError)
    or a model the registry does not hold (FileNotFoundError)."""
    if not re.fullmatch(r"[^/@]+(@[^/@]+|/\d+)", spec):
        raise ValueError(f"--model {spec!r}: expected a registered model NAME@ALIAS or NAME/VERSION")
    registry.find_version(spec, uri)


def serve_command(model: str, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "models", "serve", "-m", model, "--env-manager", "local",
            "--host", host, "--port", str(port), "--workers", "1"]


def curl_example(url: str, prompt: str) -> str:
    body = json.dumps({"inputs": [prompt], "params": {"max_new_tokens": 50, "temperature": 0.8, "seed": 0}})
    return f"curl -s {url}/invocations -H 'Content-Type: application/json' -d {shlex.quote(body)}"


def wait_until_serving(server: subprocess.Popen, url: str, timeout: float = STARTUP_TIMEOUT_SECONDS) -> bool:
    """True once the scoring server answers /ping; False if it exits first or the timeout passes."""
    deadline = time.monotonic() + timeout
    while server.poll() is None and time.monotonic() < deadline:
        if wait_until_up(url + "/ping", timeout=1):
            return True
    return False


def run_serve(cfg: ScratchConfig, spec: str | None, host: str, port: int) -> int:
    """Serve `spec` (default: the profile's registered model @champion) until Ctrl-C, SIGTERM or the server exits."""
    spec = (spec or f"{cfg.registry.model_name}@champion").removeprefix("models:/")
    uri = tracking.tracking_uri(cfg)
    try:
        check_registered(spec, uri)
    except (ValueError, FileNotFoundError) as exc:
        print(f"scratchllm serve: {exc}", file=sys.stderr)
        return 2
    # mlflow starts `uvicorn` by name: the venv's bin must be on PATH even when it is not activated.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)])
    env = {**os.environ, "PATH": path, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri}
    model = f"models:/{spec}"
    server = subprocess.Popen(serve_command(model, host, port), env=env, start_new_session=True,
                              preexec_fn=default_signals)
    for sig in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a background job inherits it ignored
        signal.signal(sig, interrupt)
    url = f"http://{host}:{port}"
    try:
        answering = wait_until_serving(server, url)
        if server.poll() is None:
            note = "" if answering else "  (did not answer yet; see its log above)"
            prompt = (cfg.evaluation.prompts or ["Hello"])[0] or "Hello"
            print(f"scratchllm serve: {model} on {url}/invocations{note}  ·  Ctrl-C stops it\n"
                  f"  try: {curl_example(url, prompt)}", file=sys.stderr, flush=True)
        while server.poll() is None:
            time.sleep(0.5)
        print(f"scratchllm serve: the server exited ({server.returncode})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nscratchllm serve: stopping the server", file=sys.stderr)
        return 0
    finally:
        stop({"mlflow": server})
