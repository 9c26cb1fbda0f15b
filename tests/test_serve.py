"""Serving: `scratchllm serve` runs MLflow's REST scoring server for a registered model, found
through the profile's store from any working directory; bad generation params get a 400 that
names the param, from the server and from the python pyfunc alike; the server also refuses
unknown params (MLflow would drop them) and malformed bodies with a short 400. A chat model takes
{"messages": [...]} and answers what `scratchllm chat` answers, as a chat completion."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings

import mlflow
import psutil
import pytest
from helpers import free_port
from mlflow.exceptions import MlflowException

from llm_core import tracking
from llm_core.chat.chat_model import add_chat_template
from llm_core.registry import versions
from llm_core.config import PROJECT_ROOT
from llm_core.registry.generate import load_generator
from llm_core.registry.requests import MAX_NEW_TOKENS, validated_params
from pipelines.serve import STARTUP_TIMEOUT_SECONDS

# (params, the param the refusal must name)
BAD_PARAMS = [({"max_new_tokens": -5}, "max_new_tokens"), ({"max_new_tokens": 0}, "max_new_tokens"),
              ({"max_new_tokens": MAX_NEW_TOKENS + 1}, "max_new_tokens"), ({"temperature": -0.5}, "temperature"),
              ({"top_k": -1}, "top_k"), ({"seed": 1.5}, "seed")]


@pytest.mark.parametrize("params, name", [*BAD_PARAMS, ({"max_new_tokens": True}, "max_new_tokens"),
                                          ({"temperature": float("nan")}, "temperature"),
                                          ({"max_new_token": 5}, "max_new_token")])
def test_bad_params_are_refused_naming_the_param(params, name):
    with pytest.raises(MlflowException) as refused:
        validated_params(params)
    assert name in refused.value.message and refused.value.get_http_status_code() == 400


def test_good_params_are_filled_in_from_the_defaults():
    assert validated_params({"max_new_tokens": MAX_NEW_TOKENS, "temperature": 0}) == \
        {**versions.DEFAULT_PARAMS, "max_new_tokens": MAX_NEW_TOKENS, "temperature": 0.0}
    assert validated_params(None) == versions.DEFAULT_PARAMS


@pytest.fixture(scope="module")
def served_store(trained, tmp_path_factory):
    """A profile whose data_dir holds an MLflow store with the tiny model registered as `tiny@champion`,
    and as a chat model `tiny-chat@champion` (its tokenizer with the chat template, as chat_model
    registers a fine-tune: serving does not care how well it was fine-tuned)."""
    cfg, result, _ = trained
    tmp_path = tmp_path_factory.mktemp("served")
    store_cfg = cfg.model_copy(update={"data_dir": str(tmp_path / "data")})
    uri = tracking.tracking_uri(store_cfg)  # the profile's own store: what `scratchllm serve` must find
    chat_tokenizer = tmp_path / "chat_tokenizer"
    shutil.copytree(cfg.data_path / "tokenizer", chat_tokenizer)
    add_chat_template(chat_tokenizer)
    for name, tokenizer_dir in (("tiny", cfg.data_path / "tokenizer"), ("tiny-chat", chat_tokenizer)):
        run_id = tracking.start_training_run(store_cfg, uri, tags={versions.KEY_TAG: name})
        versions.register(result.out_dir, tokenizer_dir, tracking_uri=uri, run_id=run_id, name=name,
                          val_bpb=2.0, tags={versions.KEY_TAG: name})
    profile = tmp_path / "profile.yaml"
    profile.write_text(f"data_dir: {store_cfg.data_path}\nregistry: {{model_name: tiny}}\n")
    return profile, uri


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who speaks first?"},
        {"role": "assistant", "content": "ROMEO."}, {"role": "user", "content": "And then?"}]
# (request body, what the 400 must say) for a chat model
BAD_CHATS = [({"messages": CHAT[:3]}, "the last turn is the assistant's"),
             ({"messages": [{"role": "robot", "content": "hi"}]}, "has role 'robot'"),
             ({"messages": [{"role": "user", "content": ""}]}, "empty content"),
             ({"messages": "hi"}, "no messages"),
             ({"inputs": ["ROMEO:"]}, 'a chat model: expected a JSON body {"messages": ['),
             ({"messages": CHAT, "max_new_token": 5}, "unknown param(s) ['max_new_token']"),
             ({"messages": CHAT, "params": {"temperature": -1}}, "temperature")]


def post(url: str, payload: dict | bytes) -> tuple[int, dict]:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_python_predict_refuses_bad_params(served_store):
    _, uri = served_store
    with tracking.using(uri):
        model = mlflow.pyfunc.load_model("models:/tiny@champion")
    with pytest.raises(MlflowException, match="max_new_tokens"):
        model.predict(["ROMEO:"], params={"max_new_tokens": -5})


def test_a_chat_model_answers_a_conversation_in_python_as_scratchllm_chat_does(served_store, trained):
    _, uri = served_store
    cfg, result, _ = trained
    with tracking.using(uri):
        model = mlflow.pyfunc.load_model("models:/tiny-chat@champion")
    assert versions.takes_messages(model.metadata.signature)
    completion = model.predict({"messages": CHAT}, params={"max_new_tokens": 6, "temperature": 0})
    generator = load_generator(result.out_dir, cfg.data_path / "tokenizer")
    expected = "".join(generator.reply(CHAT, max_new_tokens=6))
    choice = completion["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected}
    ids, stops = generator.chat_prompt(CHAT)
    assert completion["usage"]["prompt_tokens"] == len(ids)
    # the tiny model never ends its turn within 6 tokens unless it generated a stop token: say which
    assert choice["finish_reason"] == ("length" if completion["usage"]["completion_tokens"] == 6 else "stop")
    with pytest.raises(MlflowException, match="the last turn is the assistant's"):
        model.predict({"messages": CHAT[:3]})
    with pytest.raises(MlflowException, match=r"missing inputs \['messages'\]"):  # MLflow's signature check
        model.predict(["ROMEO:"])
    named = [{"role": "user", "content": "Who speaks first?", "name": "Ann"}]  # OpenAI's optional name
    assert model.predict({"messages": named}, params={"max_new_tokens": 2})["choices"]


@contextlib.contextmanager
def serving(profile, tmp_path, *args):
    """`scratchllm serve --config PROFILE ARGS...` started from an empty directory without MLflow variables,
    as a newcomer's shell would: yields (its /invocations URL, its log, the directory); then SIGTERM stops it,
    within 10 s and with every process it started."""
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    log = tmp_path / "serve.log"
    with log.open("w") as stderr:
        server = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", "--config", str(profile),
                                   "--port", str(port), *args], cwd=workdir, env=env, stderr=stderr)
    try:
        # `scratchllm serve` prints the URL and a curl example once the server answers: act on that line.
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while not (ready := re.search(r"on (http://\S+/invocations)", log.read_text())):
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        assert ready.group(1) == f"http://127.0.0.1:{port}/invocations" and "curl -s" in log.read_text()
        children = psutil.Process(server.pid).children(recursive=True)
        yield ready.group(1), log, workdir
    finally:
        server.send_signal(signal.SIGTERM)
        started = time.monotonic()
        try:
            server.wait(timeout=20)
        finally:
            if server.poll() is None:
                server.kill()
    assert time.monotonic() - started < 10 and server.returncode == 0
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, [p.cmdline() for p in alive]
    assert list(workdir.iterdir()) == []  # no mlflow.db, no mlruns where it was started


@pytest.mark.slow
def test_serve_answers_from_another_directory_refuses_bad_params_and_stops_on_sigterm(served_store, trained,
                                                                                      tmp_path):
    profile, _ = served_store
    cfg, result, _ = trained
    with serving(profile, tmp_path) as (url, log, _):
        status, body = post(url, {"inputs": ["ROMEO:"], "params": {"max_new_tokens": 8, "temperature": 0}})
        expected = load_generator(result.out_dir, cfg.data_path / "tokenizer").complete(
            "ROMEO:", max_new_tokens=8, temperature=0)
        assert (status, body) == (200, {"predictions": [expected]}) and expected
        for params, name in BAD_PARAMS:
            status, body = post(url, {"inputs": ["ROMEO:"], "params": params})
            assert 400 <= status < 500 and name in body["message"], (params, status, body)
        # A misspelt param is refused, not dropped (MLflow drops what the signature does not declare).
        status, body = post(url, {"inputs": ["hi"], "params": {"max_new_token": 5}})
        assert status == 400 and "unknown param(s) ['max_new_token']; known: [" in body["message"], body
        for malformed in ({"prompt": "hi"}, b"not json", {"inputs": "hi"}, {"inputs": ["hi"], "param": {}}):
            status, body = post(url, malformed)
            assert status == 400 and 'expected a JSON body {"inputs": ["prompt", ...]' in body["message"], body
            assert len(body["message"]) < 200, body  # not MLflow's protocol text
        status, body = post(url, {"messages": CHAT})
        assert status == 400 and body["message"].startswith("not a chat model"), body
        assert "Add type hints" not in log.read_text()  # MLflow's advice, printed when the model loads


@pytest.mark.slow
def test_serve_answers_chat_messages_for_a_chat_model(served_store, trained, tmp_path):
    profile, _ = served_store
    cfg, result, _ = trained
    with serving(profile, tmp_path, "--model", "tiny-chat@champion") as (url, log, _):
        assert '{"messages": [{"role": "user"' in log.read_text()  # the curl example is a chat request
        status, body = post(url, {"messages": CHAT, "max_new_tokens": 6, "temperature": 0})
        expected = "".join(load_generator(result.out_dir, cfg.data_path / "tokenizer").reply(CHAT, max_new_tokens=6))
        assert status == 200 and body["choices"][0]["message"] == {"role": "assistant", "content": expected}, body
        assert body["object"] == "chat.completion" and body["choices"][0]["finish_reason"] in ("stop", "length")
        # the params may also come as in a prompts request, under "params"
        assert post(url, {"messages": CHAT, "params": {"max_new_tokens": 6, "temperature": 0}}) == (status, body)
        for request, reason in BAD_CHATS:
            status, refused = post(url, request)
            assert status == 400 and reason in refused["message"], (request, status, refused)
            assert len(refused["message"]) < 200, refused


def test_logging_the_model_prints_no_mlflow_advice(trained, tmp_path):
    """MLflow advises type hints on predict and an input example whenever the model is logged; ours has
    an explicit signature (it declares the params) on purpose, so the advice is noise for our users."""
    cfg, result, _ = trained
    store = cfg.model_copy(update={"data_dir": str(tmp_path / "data")})
    uri = tracking.tracking_uri(store)
    run_id = tracking.start_training_run(store, uri, tags={versions.KEY_TAG: "a"})
    warnings.onceregistry.clear()  # MLflow shows its type-hint advice once per process: maybe already
    with warnings.catch_warnings(record=True) as caught, tracking.using(uri):
        warnings.simplefilter("always")
        versions.log_pyfunc(result.out_dir, cfg.data_path / "tokenizer", run_id)
    shown = [str(w.message) for w in caught]
    assert not [m for m in shown if "type hints" in m or "input example" in m], shown


def test_serve_refuses_a_model_the_registry_does_not_hold(served_store, capsys):
    from pipelines.cli import main

    profile, _ = served_store
    assert main(["serve", "--config", str(profile), "--model", "tiny@nosuchalias"]) == 2
    assert "no registered model 'tiny@nosuchalias'" in capsys.readouterr().err
    assert main(["serve", "--config", str(profile), "--model", "not a model spec"]) == 2
    assert "expected a registered model NAME@ALIAS" in capsys.readouterr().err


def test_scratchllm_chat_refuses_a_base_model_and_talks_to_a_chat_model(served_store, capsys):
    from pipelines.cli import main

    profile, _ = served_store
    assert main(["chat", "--config", str(profile), "--model", "tiny@champion", "--prompt", "hi"]) == 2
    assert "tiny@champion is not a chat model (its tokenizer has no chat template)" in capsys.readouterr().err
    assert main(["chat", "--config", str(profile), "--model", "tiny-chat@champion", "--prompt", "hi",
                 "--max-new-tokens", "3"]) == 0
