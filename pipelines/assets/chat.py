"""sft_dataset and chat_model: a registered base model fine-tuned on conversations, judged against its base,
and registered as `<registry.model_name>-chat` with the base version as its parent."""

import dataclasses
import json
from pathlib import Path

import dagster as dg

from llm_core import tracking
from llm_core.chat.sft_dataset import build_sft_dataset
from llm_core.data.chat_template import render
from llm_core.data.tokenizer import load_tokenizer
from llm_core.errors import DataError
from llm_core.files import read_json, write_json
from llm_core.layout import CHAT_MODEL_DIR, MODEL_TOKENIZER_SUBDIR, QUARANTINE_DIR, SFT_DATASET_DIR
from llm_core.training import model_source, training_run
from pipelines.assets.registry import registered_model
from pipelines.assets.training import launch, training_failure
from pipelines.config import ScratchllmResource, run_config_class
from pipelines.failures import user_errors
from pipelines.metadata import markdown_table, uri
from pipelines.resources import MLflowResource

SftConfig = run_config_class("SftConfig", "sft")
REPORT_FILE = "chat_report.json"  # in the fine-tune's run directory: chat.judge's report


def base_model(cfg, tracking_uri: str) -> tuple[str, Path]:
    """("NAME/VERSION", its downloaded directory) of sft.base_model."""
    from llm_core.registry import versions

    spec = cfg.sft.base_model
    if not spec:
        raise DataError("sft.base_model is not set", next_step="name a registered base, e.g. scratchllm@champion")
    try:
        found = versions.find_version(spec, tracking_uri)
    except FileNotFoundError as exc:
        raise DataError(f"sft.base_model {spec!r}: {exc}",
                        next_step="materialize registered_model first (or name another version)") from None
    return f"{found.name}/{found.version}", model_source.model_dir_of(f"{found.name}/{found.version}", cfg)


def masked_preview(tokenizer_dir: Path, sft_dir: Path) -> str:
    """The first held-out conversation as the fine-tune sees it: learned tokens in bold."""
    tokenizer = load_tokenizer(tokenizer_dir)
    messages = json.loads((sft_dir / "val_conversations.jsonl").read_text().splitlines()[0])["messages"]
    rendered = render(tokenizer, messages)
    pieces = [(tokenizer.decode([i], skip_special_tokens=False), m) for i, m in zip(rendered.ids, rendered.mask)]
    return "".join(f"**{text}**" if learned else text.replace("<", "&lt;") for text, learned in pieces)


@dg.asset(group_name="chat", kinds={"pytorch"}, code_version="1", deps=[registered_model], output_required=False)
@user_errors
def sft_dataset(context: dg.AssetExecutionContext, config: SftConfig, scratchllm: ScratchllmResource,
                mlflow: MLflowResource):
    """The conversations of `sft.sources` rendered through the chat template with the tokenizer of
    `sft.base_model`, split by conversation, packed whole into rows of its context, with a mask of the
    tokens the fine-tune learns (the assistant's); bad conversations quarantined with their reason.
    With `sft.sources: []` there is no chat fine-tune: nothing is materialized and chat_model is skipped."""
    cfg = scratchllm.resolve(config)
    if not cfg.sft.sources:
        context.log.info("sft.sources is empty: no chat fine-tune (sft_dataset and chat_model are skipped)")
        return
    base_version, base_dir = base_model(cfg, mlflow.uri(cfg))
    out = cfg.data_path / SFT_DATASET_DIR
    manifest = build_sft_dataset(cfg, base_dir, base_version, out, cfg.data_path / QUARANTINE_DIR / SFT_DATASET_DIR,
                                 log=context.log.info)
    counts, splits = manifest["counts"], manifest["splits"]
    yield dg.MaterializeResult(
        metadata={**uri(out), "base_model": base_version, **{f"conversations_{k}": v for k, v in counts.items()},
                  "splits": markdown_table(["split", "conversations", "rows", "tokens", "learned tokens", "filled"],
                                           [[name, s["conversations"], s["rows"], s["tokens"], s["learned_tokens"],
                                             f"{s['fill']:.0%}"] for name, s in splits.items()]),
                  "masked_example": dg.MetadataValue.md(masked_preview(out / MODEL_TOKENIZER_SUBDIR, out))},
        data_version=dg.DataVersion(training_run.dataset_version(cfg, out)))


@dg.asset(group_name="chat", kinds={"pytorch", "mlflow"}, code_version="1", deps=[sft_dataset], pool="training",
          check_specs=[dg.AssetCheckSpec(
              "training_health", asset="chat_model", blocking=True,
              description="Every loss of the fine-tune is finite and the train loss never stays far above its "
                          "running median; otherwise the chat model is not registered.")])
@user_errors
def chat_model(context: dg.AssetExecutionContext, config: SftConfig, scratchllm: ScratchllmResource,
               mlflow: MLflowResource) -> dg.MaterializeResult:
    """The base fine-tuned on sft_dataset by the same training loop (accelerate launch through Dagster
    Pipes, checkpointed, resumable), the loss on the assistant's tokens only; judged against the base on the
    held-out conversations and the tasks, and registered as `<model_name>-chat` (tag `scratchllm.parent`:
    the base version); `champion` moves to it when its assistant bits per byte are no worse."""
    from llm_core.chat import chat_model as chat
    from llm_core.registry import versions

    cfg = scratchllm.resolve(config)
    sft_dir = cfg.data_path / SFT_DATASET_DIR
    manifest = read_json(sft_dir / "manifest.json")
    if manifest.get("kind") != "sft":
        raise DataError(f"no sft_dataset under {sft_dir}", next_step="materialize sft_dataset first")
    base_version, base_dir = manifest["base_model"], Path(manifest["base_dir"])
    chat_cfg = chat.chat_training_config(cfg, base_dir)
    tracking_uri = mlflow.uri(cfg)
    run = training_run.prepare(chat_cfg, tracking_uri, tags={
        "dagster.run_id": context.run_id, training_run.PARENT_TAG: base_version,
        "scratchllm.stage": "chat"}, dataset_dir=sft_dir, models_dir=CHAT_MODEL_DIR)
    context.log.info(f"fine-tuning {base_version} into {run.out_dir} (MLflow run {run.mlflow_run_id})")
    finished = []
    launch(context, {run.key: (chat_cfg, run)}, slots=1, on_exit=finished.append)
    if failure := training_failure(finished[0], run):
        raise failure
    verdict = training_run.publish_if_healthy(chat_cfg, run, models_dir=CHAT_MODEL_DIR)
    health = dg.AssetCheckResult(check_name="training_health", passed=verdict.passed, metadata={
        "details": verdict.description, **{k: v for k, v in dataclasses.asdict(verdict).items()
                                           if k not in ("passed", "description") and v is not None}})
    if not verdict.passed:
        return dg.MaterializeResult(metadata=uri(run.out_dir), check_results=[health])

    tokenizer_dir = run.out_dir / MODEL_TOKENIZER_SUBDIR
    chat.add_chat_template(tokenizer_dir)
    report, scores = chat.judge(cfg, base_dir, run.out_dir, sft_dir, tokenizer_dir)
    write_json(run.out_dir / REPORT_FILE, report)
    base, tuned = report["base"], report["chat"]
    context.log.info(f"assistant bits/byte {base['assistant_bpb']:.4f} (base) -> {tuned['assistant_bpb']:.4f}; "
                     f"turns ended {base['turns_ended']:.0%} -> {tuned['turns_ended']:.0%}")
    metrics = {"assistant_bpb": tuned["assistant_bpb"], "base_assistant_bpb": base["assistant_bpb"],
               "turns_ended": tuned["turns_ended"], "base_turns_ended": base["turns_ended"]}
    tracking.log_evaluation(tracking_uri, run.mlflow_run_id, metrics, [], files=[run.out_dir / REPORT_FILE])
    name = f"{cfg.registry.model_name}-chat"
    verdict = chat.against_champion(cfg, tracking_uri, name, run.key, scores, sft_dir)
    r = versions.register(run.out_dir, tokenizer_dir, tracking_uri=tracking_uri, run_id=run.mlflow_run_id,
                          name=name, val_bpb=tuned["assistant_bpb"], verdict=verdict,
                          tags={versions.KEY_TAG: run.key, training_run.PARENT_TAG: base_version,
                                "dagster.run_id": context.run_id, "scratchllm.stage": "chat"},
                          card=chat.model_card(cfg, base_version, report))
    context.log.info(f"{r.name} version {r.version}: {r.alias}" + (f" ({verdict.reason})" if verdict else ""))
    return dg.MaterializeResult(
        metadata={**uri(run.out_dir), **metrics, "base_model": base_version, "model_name": r.name,
                  "model_version": int(r.version), "alias": r.alias, "model_uri": f"models:/{r.name}@{r.alias}",
                  "mlflow_run_id": run.mlflow_run_id, "training_key": run.key, **finished[0].reported,
                  **({"promotion": verdict.reason, "promotion_delta_bpb": verdict.delta_bpb} if verdict else {}),
                  "comparison": markdown_table(
                      ["", "base", "chat"],
                      [["assistant bits/byte", f"{base['assistant_bpb']:.4f}", f"{tuned['assistant_bpb']:.4f}"],
                       ["turns ended", f"{base['turns_ended']:.0%}", f"{tuned['turns_ended']:.0%}"],
                       *[[f"{task} acc_norm", f"{base['tasks'][task]:.3f}", f"{tuned['tasks'][task]:.3f}"]
                         for task in base["tasks"]]]),
                  "answers": markdown_table(["user", "assistant"], [[s["prompt"], s["answer"]]
                                                                    for s in report["samples"]])},
        data_version=dg.DataVersion(run.key), check_results=[health])


chat_assets = [sft_dataset, chat_model]
