"""`scratchllm serve`: a registered model behind MLflow's REST scoring server, in the foreground.

It runs the app that `mlflow models serve -m models:/NAME@ALIAS --env-manager local` runs (MLflow's
scoring server under uvicorn, in the local environment: no virtualenv is built, nothing is
downloaded), behind RequestCheck: a body MLflow would answer with its long protocol text, or with
params it would drop silently (a misspelt `max_new_token`), gets a short 400 naming what is wrong.
The profile's tracking and registry URI are in the child's environment, so the model is found
whatever the working directory and whatever the shell exports. The child runs in its own process
group with default signal handlers, like the servers of `scratchllm ui`, and Ctrl-C or SIGTERM
stops it.
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

from llm_core.registry import versions
from llm_core import tracking
from llm_core.config import PROJECT_ROOT, ScratchConfig
from pipelines.ui import default_signals, interrupt, stop, wait_until_up

STARTUP_TIMEOUT_SECONDS = 180
MODEL_URI_ENV = "SCRATCHLLM_SERVE_MODEL"  # models:/NAME@ALIAS, for scoring_app in the server process
EXPECTED_BODY = 'expected a JSON body {"inputs": ["prompt", ...], "params": {...}}'
OTHER_FORMATS = ("text/csv", "application/vnd.apache.parquet")  # MLflow's, carry no params: passed through


def check_registered(spec: str, uri: str) -> None:
    """Refuse, before a server starts, a spec that is not `NAME@ALIAS` or `NAME/VERSION` (ValueError)
    or a model the registry does not hold (FileNotFoundError)."""
    if not re.fullmatch(r"[^/@]+(@[^/@]+|/\d+)", spec):
        raise ValueError(f"--model {spec!r}: expected a registered model NAME@ALIAS or NAME/VERSION")
    versions.find_version(spec, uri)


def serve_command(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "--factory", "pipelines.serve:scoring_app", "--app-dir",
            str(PROJECT_ROOT), "--host", host, "--port", str(port), "--workers", "1"]


def scoring_app():
    """What the server process runs (`uvicorn --factory`): MLflow's scoring app for the model that
    $SCRATCHLLM_SERVE_MODEL names, behind RequestCheck with the params its signature declares."""
    from mlflow.pyfunc import scoring_server

    with versions.without_mlflow_notices():  # loading runs pyfunc_model.py: MLflow's type-hint advice
        model = scoring_server.load_model_with_mlflow_config(os.environ[MODEL_URI_ENV])
    params = model.metadata.get_params_schema()
    return RequestCheck(scoring_server.init(model), [p.name for p in params.params] if params else None)


def mime_type(content_type: str) -> str:
    return content_type.split(";")[0].strip().lower()


def request_problem(content_type: str, body: bytes, known_params: list[str] | None) -> tuple[int, str, str] | None:
    """(HTTP status, MLflow error code, message) refusing an /invocations request, or None to serve it."""
    if mime_type(content_type) != "application/json":
        return 415, "BAD_REQUEST", f"Content-Type {content_type or 'missing'}: {EXPECTED_BODY} " \
                                   "(Content-Type: application/json)"
    try:
        request = json.loads(body)
    except ValueError:  # not JSON, or not UTF-8
        return 400, "BAD_REQUEST", f"the body is not JSON: {EXPECTED_BODY}"
    if not isinstance(request, dict) or "inputs" not in request:
        return 400, "BAD_REQUEST", f'no "inputs" in the body: {EXPECTED_BODY}'
    if unknown := sorted(set(request) - {"inputs", "params"}):
        return 400, "BAD_REQUEST", f"unknown field(s) {unknown}: {EXPECTED_BODY}"
    inputs, params = request["inputs"], request.get("params") or {}
    if not isinstance(inputs, list) or not all(isinstance(prompt, str) for prompt in inputs):
        return 400, "BAD_REQUEST", f'"inputs" must be a list of prompt strings: {EXPECTED_BODY}'
    if not isinstance(params, dict):
        return 400, "BAD_REQUEST", f'"params" must be an object: {EXPECTED_BODY}'
    # MLflow drops the params its signature does not declare before predict could refuse them.
    if known_params is not None and (unknown := sorted(set(params) - set(known_params))):
        return 400, "INVALID_PARAMETER_VALUE", f"unknown param(s) {unknown}; known: {sorted(known_params)}"
    return None


class RequestCheck:
    """ASGI middleware in front of MLflow's scoring app: a JSON request to /invocations that
    request_problem refuses is answered here, as MLflow answers its own errors
    ({"error_code": ..., "message": ...}); everything else goes through unchanged."""

    def __init__(self, app, known_params: list[str] | None):
        self.app, self.known_params = app, known_params

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/invocations":
            return await self.app(scope, receive, send)
        content_type = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
        if mime_type(content_type) in OTHER_FORMATS:
            return await self.app(scope, receive, send)
        body = await read_body(receive)
        problem = request_problem(content_type, body, self.known_params)
        if problem is None:
            return await self.app(scope, replay(body, receive), send)
        status, code, message = problem
        answer = json.dumps({"error_code": code, "message": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(answer))]})
        await send({"type": "http.response.body", "body": answer})


async def read_body(receive) -> bytes:
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)  # absent from http.disconnect: stop there too
    return b"".join(chunks)


def replay(body: bytes, receive):
    """An ASGI `receive` that gives the body read already, then waits as `receive` does (for a disconnect)."""
    given = False

    async def receive_again():
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive_again


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
    model = f"models:/{spec}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri, MODEL_URI_ENV: model}
    server = subprocess.Popen(serve_command(host, port), env=env, start_new_session=True,
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
