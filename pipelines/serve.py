"""`scratchllm serve`: a registered model behind MLflow's REST scoring server, in the foreground.

It runs the app that `mlflow models serve -m models:/NAME@ALIAS --env-manager local` runs (MLflow's
scoring server under uvicorn, in the local environment: no virtualenv is built, nothing is
downloaded), behind RequestCheck: a body MLflow would answer with its long protocol text, or with
params it would drop silently (a misspelt `max_new_token`), gets a short 400 naming what is wrong.
A base model takes {"inputs": ["prompt", ...], "params": {...}} and answers {"predictions": [...]}; a
chat model (`<model_name>-chat`) takes {"messages": [...], "max_new_tokens": ..., ...} as OpenAI's and
MLflow's chat requests do and answers a chat completion ({"choices": [{"message": ...}], ...}).
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

from mlflow.exceptions import MlflowException

from llm_core import tracking
from llm_core.data.chat_template import conversation_problem
from llm_core.registry import versions
from llm_core.registry.requests import CHAT_INPUT, validated_params
from llm_core.config import PROJECT_ROOT, ScratchConfig
from pipelines.ui import default_signals, interrupt, stop, wait_until_up

STARTUP_TIMEOUT_SECONDS = 180
MODEL_URI_ENV = "SCRATCHLLM_SERVE_MODEL"  # models:/NAME@ALIAS, for scoring_app in the server process
EXPECTED_BODY = 'expected a JSON body {"inputs": ["prompt", ...], "params": {...}}'
EXPECTED_CHAT_BODY = 'expected a JSON body {"messages": [{"role": "user", "content": ...}], "max_new_tokens": ...}'
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
    return RequestCheck(scoring_server.init(model), [p.name for p in params.params] if params else None,
                        chat=versions.takes_messages(model.metadata.signature))


def mime_type(content_type: str) -> str:
    return content_type.split(";")[0].strip().lower()


def prompts_problem(request: dict) -> str | None:
    """Why a base model's request is not {"inputs": ["prompt", ...], "params": {...}}, or None."""
    if CHAT_INPUT in request:
        return f"not a chat model (its tokenizer has no chat template): {EXPECTED_BODY}; " \
               f"a chat fine-tune (<model_name>-chat) answers {{\"{CHAT_INPUT}\": [...]}}"
    if "inputs" not in request:
        return f'no "inputs" in the body: {EXPECTED_BODY}'
    if unknown := sorted(set(request) - {"inputs", "params"}):
        return f"unknown field(s) {unknown}: {EXPECTED_BODY}"
    if not isinstance(request["inputs"], list) or not all(isinstance(prompt, str) for prompt in request["inputs"]):
        return f'"inputs" must be a list of prompt strings: {EXPECTED_BODY}'
    return None


def chat_problem(request: dict) -> str | None:
    """Why a chat model's request is not {"messages": [...], PARAM: value, ...}, or None."""
    if CHAT_INPUT not in request:
        return f"a chat model: {EXPECTED_CHAT_BODY}"
    if problem := conversation_problem(request[CHAT_INPUT], prompt=True):
        return f"{CHAT_INPUT}: {problem}"
    return None


def chat_body(request: dict) -> dict:
    """The chat request as MLflow's scoring server reads it: the params beside the messages, where its
    chat format looks for them (they may come in "params" too, as in a prompts request)."""
    return {**(request.get("params") or {}), **{k: v for k, v in request.items() if k != "params"}}


def checked_request(content_type: str, body: bytes, known_params: list[str] | None,
                    chat: bool = False) -> tuple[tuple[int, str, str] | None, bytes]:
    """(problem, body): the (HTTP status, MLflow error code, message) refusing an /invocations request, or
    None and the body to pass on to MLflow's scoring app."""
    expected = EXPECTED_CHAT_BODY if chat else EXPECTED_BODY
    if mime_type(content_type) != "application/json":
        return (415, "BAD_REQUEST", f"Content-Type {content_type or 'missing'}: {expected} "
                                    "(Content-Type: application/json)"), body
    try:
        request = json.loads(body)
    except ValueError:  # not JSON, or not UTF-8
        return (400, "BAD_REQUEST", f"the body is not JSON: {expected}"), body
    if not isinstance(request, dict):
        return (400, "BAD_REQUEST", f"the body is not a JSON object: {expected}"), body
    if not isinstance(request.get("params") or {}, dict):
        return (400, "BAD_REQUEST", f'"params" must be an object: {expected}'), body
    if problem := (chat_problem if chat else prompts_problem)(request):
        return (400, "BAD_REQUEST", problem), body
    if chat:
        request = chat_body(request)
        body = json.dumps(request).encode()
    params = {k: v for k, v in request.items() if k != CHAT_INPUT} if chat else request.get("params") or {}
    # MLflow drops the params its signature does not declare before predict could refuse them.
    if known_params is not None and (unknown := sorted(set(params) - set(known_params))):
        return (400, "INVALID_PARAMETER_VALUE", f"unknown param(s) {unknown}; known: {sorted(known_params)}"), body
    try:  # checked here too: MLflow's answer to predict's refusal would quote the whole request
        validated_params(params)
    except MlflowException as exc:
        return (400, "INVALID_PARAMETER_VALUE", exc.message), body
    return None, body


class RequestCheck:
    """ASGI middleware in front of MLflow's scoring app: a JSON request to /invocations that
    checked_request refuses is answered here, as MLflow answers its own errors
    ({"error_code": ..., "message": ...}); everything else goes through (a chat request with its params
    moved beside the messages)."""

    def __init__(self, app, known_params: list[str] | None, chat: bool = False):
        self.app, self.known_params, self.chat = app, known_params, chat

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/invocations":
            return await self.app(scope, receive, send)
        content_type = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
        if mime_type(content_type) in OTHER_FORMATS and not self.chat:
            return await self.app(scope, receive, send)
        problem, body = checked_request(content_type, await read_body(receive), self.known_params, self.chat)
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


def is_chat_model(spec: str, uri: str) -> bool:
    """Whether the registered version `spec` answers conversations (its signature: pyfunc_model.py)."""
    from mlflow.models import get_model_info

    with tracking.using(uri), versions.without_mlflow_notices():
        return versions.takes_messages(get_model_info(f"models:/{spec}").signature)


def curl_example(url: str, prompt: str, chat: bool = False) -> str:
    if chat:
        body = json.dumps({CHAT_INPUT: [{"role": "user", "content": prompt}], "max_new_tokens": 50,
                           "temperature": 0})
    else:
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
        chat = is_chat_model(spec, uri)
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
            prompt = "Who speaks first?" if chat else (cfg.evaluation.prompts or ["Hello"])[0] or "Hello"
            print(f"scratchllm serve: {model} on {url}/invocations{note}  ·  Ctrl-C stops it\n"
                  f"  try: {curl_example(url, prompt, chat)}", file=sys.stderr, flush=True)
        while server.poll() is None:
            time.sleep(0.5)
        print(f"scratchllm serve: the server exited ({server.returncode})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nscratchllm serve: stopping the server", file=sys.stderr)
        return 0
    finally:
        stop({"mlflow": server})
