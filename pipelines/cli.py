"""The `scratchllm` command: run the graph, check a profile, open the UI, export a model.

    scratchllm run [--config P] [--select SEL]   materialize assets (default: all) with progress
    scratchllm check-config [--config P]         validate a profile, check its sources, print the resolved values
    scratchllm ui [--config P]                   Dagster UI on http://127.0.0.1:3000, MLflow UI on :5000
    scratchllm generate --model M --prompt TEXT  stream text from a model (directory, NAME@ALIAS, NAME/VERSION)
    scratchllm chat --model M [--prompt TEXT]    talk to a chat model (multi-turn; /reset, /quit), or answer once
    scratchllm export-hf --out DIR [--model M]   a trained model as a transformers LlamaForCausalLM
    scratchllm serve [--model M] [--port P]      a registered model over REST on http://127.0.0.1:5001
    scratchllm plan [--config P] [--gpus N ...]  memory per GPU and time of a training, by strategy
    scratchllm deploy up|status|stop|upgrade     a team deployment: Dagster and MLflow on PostgreSQL

Every subcommand takes `--config P` alike: a relative P is looked up in the working directory, then
in the project's assets_config/, then in the project; without it, $SCRATCHLLM_CONFIG, else assets_config/default.yaml.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import NoReturn

import yaml

from llm_core.config import CONFIG_ENV_VAR, PROJECT_ROOT, ConfigError, find_profile, load_config
from llm_core.run_lock import DirectoryLock

DEFAULT_DAGSTER_HOME = PROJECT_ROOT / ".dagster_home"
INSTANCE_SETTINGS = """\
# Written by scratchllm on first use. No network at run time: no telemetry either.
telemetry:
  enabled: false
# A launch from the UI starts within a second (Dagster's default looks at the queue every 5 s).
run_coordinator:
  module: dagster._core.run_coordinator
  class: QueuedRunCoordinator
  config:
    dequeue_interval_seconds: 1
# One training at a time: trained_model is in the pool "training" (and every pool defaults to 1).
concurrency:
  pools:
    default_limit: 1
"""


def prepare_environment(profile: str | None) -> None:
    """Choose the profile and the Dagster instance before any Dagster code is imported."""
    if profile:
        try:
            os.environ[CONFIG_ENV_VAR] = str(find_profile(profile))
        except ConfigError as exc:
            refuse(exc)
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(DEFAULT_DAGSTER_HOME)))
    home.mkdir(parents=True, exist_ok=True)
    settings = home / "dagster.yaml"
    if not settings.exists():
        settings.write_text(INSTANCE_SETTINGS)


def load_profile(profile: str | None = None):
    """The validated config of a profile (else $SCRATCHLLM_CONFIG, else the default); a bad one
    is refused before any work starts, naming the fields (exit status 2)."""
    try:
        return load_config(profile)
    except ConfigError as exc:
        refuse(exc)


def refuse(exc: ConfigError) -> NoReturn:
    """A profile that cannot be used: one line naming why, exit status 2, before any work."""
    print(f"scratchllm: {exc}", file=sys.stderr)
    raise SystemExit(2)


def cmd_check_config(args: argparse.Namespace) -> int:
    from llm_core.data.sources import source_problems

    cfg = load_profile(args.config or args.profile)
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    problems = source_problems(cfg.corpus)
    if problems:
        print("# invalid: " + "\n# invalid: ".join(problems), file=sys.stderr)
        return 2
    print(f"# valid; every source gives files; data_dir resolves to {cfg.data_path}", file=sys.stderr)
    return 0


def parse_selection(select: str, asset_graph) -> set:
    """Asset keys of `--select`: Dagster's selection syntax, or a comma list of such items
    ('raw_corpus,cleaned_shards', '+tokenizer,hf_export'), as `dagster asset materialize` takes."""
    import dagster as dg

    keys = set()
    for item in (part.strip() for part in select.split(",")):
        if not item:
            raise ValueError("an empty item in the comma list")
        keys |= dg.AssetSelection.from_string(item).resolve(asset_graph)
    return keys


def profile_flag(profile: str | None) -> str:
    """` --config P` for the hints printed after a command that was given a profile."""
    return f" --config {shlex.quote(profile)}" if profile else ""


def cmd_run(args: argparse.Namespace) -> int:
    prepare_environment(args.config)
    cfg = load_profile()
    import dagster as dg

    from pipelines import runs
    from pipelines.definitions import defs
    from pipelines.failures import step_cause

    warnings.filterwarnings("ignore", category=dg.BetaWarning)

    try:
        keys = parse_selection(args.select, defs.resolve_asset_graph())
    except Exception as exc:  # dagster raises several kinds for a bad selection string
        print(f"--select {args.select!r}: {exc}", file=sys.stderr)
        return 2
    print(f"scratchllm: materializing {', '.join(sorted(k.to_user_string() for k in keys))}\n"
          f"  profile {os.environ.get(CONFIG_ENV_VAR, 'default')}, data in {cfg.data_path}, "
          f"DAGSTER_HOME={os.environ['DAGSTER_HOME']}", file=sys.stderr)
    # Two first runs at once would both create the instance's sqlite tables (and fail): one at a time.
    with DirectoryLock(Path(os.environ["DAGSTER_HOME"]), {"creating": "the Dagster instance"}):
        instance = dg.DagsterInstance.get()
        instance.get_runs(limit=1)
    for line in runs.fail_dead_runs(instance):
        print(f"scratchllm: {line}", file=sys.stderr)
    if dg.AssetKey("trained_model") in keys and (holders := runs.pool_holders(instance, "training")):
        print(f"scratchllm: the `training` pool (one training at a time) is held by {', '.join(holders)}; "
              f"training waits for it (Ctrl-C stops waiting)", file=sys.stderr)
    result = runs.execute_stoppably(
        defs.resolve_job_def("materialize_everything"), instance, asset_selection=list(keys),
        run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}})
    if result is None:  # stopped by Ctrl-C/SIGTERM; a run stuck waiting cannot be joined: leave now
        sys.stderr.flush()
        os._exit(130)
    for check in result.get_asset_check_evaluations():
        outcome = "passed" if check.passed else "FAILED" if check.severity == dg.AssetCheckSeverity.ERROR else "warning"
        print(f"  check {check.asset_check_key.to_user_string()}: {outcome}"
              f" {check.metadata.get('details').value if 'details' in check.metadata else ''}", file=sys.stderr)
    profile = os.environ[CONFIG_ENV_VAR] if args.config else None  # absolute: `make ui` runs in the project
    ui_hint = f"make ui CONFIG={shlex.quote(profile)}` or `scratchllm ui{profile_flag(profile)}" \
        if profile else "make ui"
    if not result.success:
        failures = [e for e in result.all_events if e.is_step_failure]
        causes = "".join(f"\n  {e.step_key}: " + "\n    ".join(step_cause(e)) for e in failures)
        print(f"scratchllm: run {result.run_id} FAILED at {', '.join(e.step_key for e in failures) or 'a check'}"
              f"{causes}\nthe full trace is in the log above and in the Dagster UI (`{ui_hint}`)", file=sys.stderr)
        return 1
    print(f"scratchllm: run {result.run_id} succeeded. Outputs under {cfg.data_path}; browse them with "
          f"`{ui_hint}` (Dagster http://127.0.0.1:3000, MLflow http://127.0.0.1:5000).", file=sys.stderr)
    for event in result.get_asset_materialization_events():
        if event.asset_key == dg.AssetKey("registered_model"):
            m = {k: v.value for k, v in event.step_materialization_data.materialization.metadata.items()}
            prompt = next((p for p in cfg.evaluation.prompts if p), "")
            print(f"scratchllm: registered {m['model_name']} version {m['model_version']} "
                  f"({m['val_bpb']:.3f} bits/byte) as `{m['alias']}`; try: scratchllm generate --model "
                  f"{m['model_name']}@{m['alias']} --prompt {shlex.quote(prompt)}{profile_flag(profile)}",
                  file=sys.stderr)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    prepare_environment(args.config)
    cfg = load_profile()
    from pipelines.ui import run_ui

    return run_ui(cfg, args.host, args.port, args.mlflow_port)


def cmd_serve(args: argparse.Namespace) -> int:
    from pipelines.serve import run_serve

    return run_serve(load_profile(args.config), args.model, args.host, args.port)


def resolve_model_dir(spec: str | None, cfg) -> Path:
    """The model directory `--model` names (llm_core/training/model_source.py), or (no --model) the latest
    trained_model of the profile's data_dir."""
    from llm_core.model_files import latest_model
    from llm_core.training.model_source import model_dir_of

    return Path(latest_model(cfg)["path"]) if spec is None else model_dir_of(spec, cfg)


def cmd_generate(args: argparse.Namespace) -> int:
    from llm_core.registry.generate import load_generator
    from llm_core.training.model_source import tokenizer_dir_of

    try:
        cfg = load_config(args.config)
        model_dir = resolve_model_dir(args.model, cfg)
        generator = load_generator(model_dir, tokenizer_dir_of(model_dir, cfg))
    except (OSError, ValueError) as exc:  # no such directory or version, a bad profile (ConfigError)
        print(f"scratchllm generate: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(args.prompt)
    for piece in generator.stream(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k, seed=args.seed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Multi-turn chat with a chat fine-tune (`<model_name>-chat`): each answer streams until the model ends
    its turn; `/reset` forgets the conversation, `/quit` (or end of input) leaves. With --prompt: one answer."""
    from llm_core.data.tokenizer import chat_template_of
    from llm_core.registry.generate import load_generator
    from llm_core.training.model_source import tokenizer_dir_of

    try:
        cfg = load_config(args.config)
        spec = args.model or f"{cfg.registry.model_name}-chat@champion"
        model_dir = resolve_model_dir(spec, cfg)
        tokenizer_dir = tokenizer_dir_of(model_dir, cfg)
        generator = load_generator(model_dir, tokenizer_dir)
    except (OSError, ValueError) as exc:
        print(f"scratchllm chat: {exc}", file=sys.stderr)
        return 2
    if chat_template_of(tokenizer_dir) is None:  # what chat_model gives every fine-tune it registers
        print(f"scratchllm chat: {spec} is not a chat model (its tokenizer has no chat template); fine-tune one "
              f"with `scratchllm run --select sft_dataset,chat_model`", file=sys.stderr)
        return 2
    options = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "seed": args.seed}

    def answer(messages: list[dict]) -> str:
        pieces = []
        for piece in generator.reply(messages, **options):
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return "".join(pieces)

    if args.prompt is not None:
        answer([{"role": "user", "content": args.prompt}])
        return 0
    interactive = sys.stdin.isatty()
    print(f"chatting with {spec}; /reset starts over, /quit leaves", file=sys.stderr)
    messages: list[dict] = []
    while True:
        try:
            line = input("you> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            return 0
        if line.strip() in ("/quit", "/exit"):
            return 0
        if line.strip() == "/reset":
            messages = []
            print("(conversation reset)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        if interactive:
            sys.stdout.write("assistant> ")
        messages.append({"role": "assistant", "content": answer(messages) or " "})


def cmd_export_hf(args: argparse.Namespace) -> int:
    from llm_core.registry.export import export_hf
    from llm_core.training.model_source import tokenizer_dir_of

    try:
        cfg = load_config(args.config)
        model_dir = resolve_model_dir(args.model, cfg)
        tokenizer_dir = Path(args.tokenizer).expanduser() if args.tokenizer else tokenizer_dir_of(model_dir, cfg)
        # cfg: the model card (README.md), from the profile's lineage, as the hf_export asset writes it
        out = export_hf(model_dir, tokenizer_dir, Path(args.out).expanduser(), overwrite=args.overwrite, cfg=cfg)
    except (OSError, ValueError) as exc:  # missing/existing files, a bad profile (ConfigError), bad inputs
        print(f"scratchllm export-hf: {exc}", file=sys.stderr)
        return 2
    print(f"scratchllm: exported {model_dir} to {out} (its model card: README.md); load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})", file=sys.stderr)
    return 0


CONFIG_HELP = (f"YAML profile, deep-merged over default.yaml; a relative path is looked up in the working directory, "
               f"then in the project's assets_config/, then in the project "
               f"(default: ${CONFIG_ENV_VAR}, else default.yaml)")
MODEL_HELP = ("a model directory (trained_model/runs/<key>, or one of its checkpoints/step_N), or a registered "
              "model NAME@ALIAS (e.g. scratchllm@champion) or NAME/VERSION; default: the latest trained_model")


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # library notices, not the user's business
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plan"]:  # its own flags, see llm_core/experiments/plan.py
        from llm_core.experiments import plan

        return plan.main(argv[1:])
    if argv[:1] == ["deploy"]:  # a team deployment: pipelines/deploy.py
        from pipelines import deploy

        return deploy.main(argv[1:])
    parser = argparse.ArgumentParser(prog="scratchllm", description="An LLM foundry as a Dagster asset graph.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="materialize assets (default: the whole graph)")
    run.add_argument("--config", help=CONFIG_HELP)
    run.add_argument("--select", default="*", help="Dagster asset selection, e.g. 'cleaned_shards' or '+tokenizer'")
    run.set_defaults(func=cmd_run)
    check = sub.add_parser("check-config", help="validate a profile, check that its sources give files, "
                                                 "print the resolved config")
    check.add_argument("--config", help=CONFIG_HELP)
    check.add_argument("profile", nargs="?", help="the profile, as --config (kept for older scripts)")
    check.set_defaults(func=cmd_check_config)
    ui = sub.add_parser("ui", help="start the Dagster UI and the MLflow UI (Ctrl-C stops both)")
    ui.add_argument("--config", help="YAML profile the UI's runs default to")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=3000, help="Dagster UI port")
    ui.add_argument("--mlflow-port", type=int, default=5000, help="MLflow UI port")
    ui.set_defaults(func=cmd_ui)
    export = sub.add_parser("export-hf", help="export a trained model and its tokenizer for Hugging Face transformers")
    export.add_argument("--model", help=MODEL_HELP)
    export.add_argument("--out", required=True, help="the directory to write (a transformers model directory)")
    export.add_argument("--tokenizer", help="tokenizer directory (default: the model's, else <data_dir>/tokenizer)")
    export.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out")
    export.add_argument("--config", help="YAML profile whose data_dir the defaults come from")
    export.set_defaults(func=cmd_export_hf)
    generate = sub.add_parser("generate", help="stream text from a trained or registered model")
    generate.add_argument("--model", help=MODEL_HELP)
    generate.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    generate.add_argument("--max-new-tokens", type=int, default=200)
    generate.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    generate.add_argument("--top-k", type=int, default=None)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--config", help="YAML profile whose data_dir and MLflow store the defaults come from")
    generate.set_defaults(func=cmd_generate)
    chat = sub.add_parser("chat", help="talk to a chat fine-tune (multi-turn, streaming; /reset, /quit)")
    chat.add_argument("--model", help="a chat model: NAME@ALIAS, NAME/VERSION or a directory "
                                      "(default: <registry.model_name>-chat@champion)")
    chat.add_argument("--prompt", default=None, help="answer this one message and exit")
    chat.add_argument("--max-new-tokens", type=int, default=200)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    chat.add_argument("--seed", type=int, default=0)
    chat.add_argument("--config", help="YAML profile whose data_dir and MLflow store the defaults come from")
    chat.set_defaults(func=cmd_chat)
    serve = sub.add_parser("serve", help="serve a registered model over REST (mlflow models serve; Ctrl-C stops it)")
    serve.add_argument("--model", help="registered NAME@ALIAS or NAME/VERSION "
                                       "(default: <registry.model_name>@champion)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=5001, help="port (5000 is the MLflow UI of `scratchllm ui`)")
    serve.add_argument("--config", help="YAML profile whose MLflow store holds the model")
    serve.set_defaults(func=cmd_serve)
    sub.add_parser("plan", help="memory per GPU and time of a training, by sharding strategy (plan --help)")
    sub.add_parser("deploy", help="a team deployment on PostgreSQL: up | status | stop | upgrade (deploy --help)")
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
