"""The model card: a README.md for every registered version and every Hugging Face export, written
from the model's lineage (the stages' manifests, its model_config.json and training summary, its
evaluation report and the promotion verdict), never by hand. What is not recorded (a checkpoint has
no evaluation, a bare model directory no data lineage) is said so in the card, not left out silently.
"""

from __future__ import annotations

from pathlib import Path

from llm_core.model_files import MODEL_CONFIG_FILE, SUMMARY_FILE
from llm_core.config import ScratchConfig
from llm_core.files import atomic_path, read_json
from llm_core.layout import CLEANED_SHARDS_DIR, DATASET_DIR, EVALUATION_DIR, MODEL_DIR, RAW_CORPUS_DIR, REPORT_FILE
from llm_core.data.tokenized_dataset import contamination_summary

CARD_FILE = "README.md"

INTENDED_USE = """\
A small decoder-only language model trained from scratch by scratchllm on the corpus above. It continues
text in the style of that corpus: for experiments, teaching, and as a baseline to compare training runs.

Limits: it is a base model (no instruction tuning, no safety tuning), small, and knows only its corpus; it
states falsehoods fluently and may reproduce text of its training data. Its scores are on the corpus's own
validation split and tasks, not on general benchmarks. Do not use it for decisions about people."""


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows])


def data_section(cfg: ScratchConfig) -> list[str]:
    dataset = read_json(cfg.data_path / DATASET_DIR / "manifest.json")
    if not dataset:
        return ["## Data", "", f"Not recorded: no `{DATASET_DIR}` manifest in {cfg.data_path} (the card describes "
                "the data of the profile's data_dir: give the profile this model was trained with).", ""]
    raw = read_json(cfg.data_path / RAW_CORPUS_DIR / "manifest.json").get("shards", [])
    parts = read_json(cfg.data_path / CLEANED_SHARDS_DIR / "manifest.json").get("parts", [])
    sources = sorted({f["uri"] for shard in raw for f in shard.get("files", [])})
    count = {k: sum(p.get(k, 0) for p in parts) for k in ("num_documents_in", "num_kept", "num_exact_duplicates",
                                                           "num_near_duplicates", "num_quarantined")}
    filtered: dict[str, int] = {}
    for p in parts:
        for rule, n in p.get("filtered_by_rule", {}).items():
            filtered[rule] = filtered.get(rule, 0) + n
    split = {s: {k: sum(e[s][k] for e in dataset.get("shards", [])) for k in ("documents", "tokens", "bytes")}
             for s in ("train", "val")}
    c = contamination_summary(dataset) if dataset else {}
    lines = ["## Data", "",
             f"Sources ({len(sources)} file{'s' * (len(sources) != 1)}): " + ", ".join(f"`{s}`" for s in sources[:10])
             + (", ..." if len(sources) > 10 else ""), "",
             _table(["documents read", "kept", "filtered", "exact duplicates", "near duplicates", "quarantined"],
                    [[count["num_documents_in"], count["num_kept"], sum(filtered.values()),
                      count["num_exact_duplicates"], count["num_near_duplicates"], count["num_quarantined"]]]), "",
             "Filtered by rule: " + (", ".join(f"{k} {v}" for k, v in sorted(filtered.items())) or "none") + ". "
             "Thresholds: " + ", ".join(f"{k} {v}" for k, v in cfg.cleaning.model_dump().items()
                                        if k.startswith(("min_", "max_"))) + ".", "",
             f"Split {dataset.get('split', {}).get('unit', 'document')}s (val_fraction {cfg.dataset.val_fraction}, "
             f"seed {cfg.dataset.seed}): "
             f"train {split['train']['documents']:,} documents / {split['train']['tokens']:,} tokens, "
             f"validation {split['val']['documents']:,} documents / {split['val']['tokens']:,} tokens.", ""]
    if c.get("mode") in ("remove", "fail"):
        lines += [f"Decontamination ({c['mode']}, {c['ngram']}-grams of {c['items_checked']} evaluation items): "
                  f"{c['num_contaminated_documents']} training documents shared an n-gram with an item, "
                  f"{c['num_removed']} removed.", ""]
    else:
        lines += ["Decontamination: off (training documents were not checked against the evaluation items).", ""]
    total_tokens = split["train"]["tokens"] + split["val"]["tokens"]
    lines += ["## Tokenizer", "",
              f"Byte-level BPE (Hugging Face `tokenizers`), vocabulary {dataset.get('vocab_size', '?'):,}, "
              f"{(split['train']['bytes'] + split['val']['bytes']) / max(total_tokens, 1):.2f} bytes per token "
              f"on this corpus; `<|endoftext|>` (id {dataset.get('eot_id', 0)}) ends every document.", ""]
    return lines


def render(cfg: ScratchConfig, model_dir: Path, report: dict | None = None, verdict=None,
           title: str | None = None) -> str:
    """The card of the model in model_dir (trained on cfg's data), evaluated in `report`
    (model_evaluation's report.json; None or {} when it was not) and, when registered against a
    champion, judged by `verdict`."""
    model_dir = Path(model_dir)
    saved = read_json(model_dir / MODEL_CONFIG_FILE)
    summary = read_json(model_dir / SUMMARY_FILE)
    args = saved.get("model", {})
    size = f", {summary['num_parameters']:,} parameters" if "num_parameters" in summary else ""
    lines = [f"# {title or cfg.registry.model_name}", "",
             "Trained from scratch by scratchllm. This card is generated from the model's lineage.", ""]
    lines += data_section(cfg)
    lines += ["## Model", "", f"Llama-style decoder{size}.", "",
              _table(["field", "value"], [[k, v] for k, v in args.items()]), ""]
    lines += training_section(saved.get("config", {}).get("training", {}), args, summary)
    lines += evaluation_section(report or {}, verdict)
    lines += ["## Intended use and limits", "", INTENDED_USE, ""]
    return "\n".join(lines)


def training_section(trained: dict, args: dict, summary: dict) -> list[str]:
    """The optimizer and seed (from the model's config) and the compute (from its training summary,
    which only a finished training's directory has)."""
    muon = f", Muon lr {trained.get('muon_learning_rate')}" if trained.get("optimizer") == "muon" else ""
    rows = [["optimizer", f"{trained.get('optimizer')} (lr {trained.get('learning_rate')}{muon}, "
                          f"{trained.get('lr_schedule')} schedule)"]]
    if summary:
        tokens_per_step = trained.get("batch_size", 0) * args.get("block_size", 0) \
            * trained.get("grad_accum_steps", 1) * summary.get("world_size", 1)
        rows += [["steps", f"{summary.get('steps', 0):,} x {tokens_per_step:,} tokens = "
                           f"{summary.get('steps', 0) * tokens_per_step:,} tokens"],
                 ["precision", summary.get("mixed_precision", "?")],
                 ["hardware", summary.get("hardware", "not recorded")],
                 ["training time", f"{summary.get('train_seconds', 0):.0f} s at "
                                   f"{summary.get('tokens_per_second', 0):,.0f} tokens/s"]]
    else:
        rows += [["steps, precision, hardware, time", f"not recorded (no {SUMMARY_FILE}: a checkpoint or a "
                                                      "copied model directory)"]]
    rows += [["seed", trained.get("seed")], ["warm start from", trained.get("init_from") or "random weights"]]
    return ["## Training", "", _table(["", ""], rows), ""] + mixture_section(trained.get("mixture"), summary)


def mixture_section(mixture: dict | None, summary: dict) -> list[str]:
    """The data mixture asked for and the tokens each source gave the training."""
    trained = summary.get("tokens_per_source") or {}
    if not trained and not mixture:
        return []
    total_weight, total_tokens = sum((mixture or {}).values()), sum(trained.values()) or 1
    rows = [[name, f"{(mixture or {}).get(name, 0) / total_weight:.3f}" if mixture else "natural",
             f"{trained.get(name, 0):,}", f"{trained.get(name, 0) / total_tokens:.1%}"]
            for name in dict.fromkeys([*(mixture or {}), *trained])]
    return ["### Data mixture", "", _table(["source", "weight", "tokens trained", "share"], rows), ""]


def evaluation_section(report: dict, verdict=None) -> list[str]:
    lines = ["## Evaluation", ""]
    if "val_bpb" not in report:
        return lines + ["Not evaluated: no `model_evaluation` report for this model (it evaluates the final model "
                        "of a training run; materialize it, then export again).", ""]
    lines += [f"Validation: **{report['val_bpb']:.4f} bits per byte** (loss {report['val_loss']:.4f} nats/token) on "
              f"{report.get('num_val_documents', '?'):,} documents, {report['num_val_tokens']:,} tokens.", ""]
    if len(report.get("per_source", {})) > 1:
        lines += [_table(["source", "bits per byte", "documents"],
                         [[name, f"{s['bpb']:.4f}", s["documents"]] for name, s in report["per_source"].items()]), ""]
    if verdict is not None:
        lines += [f"Against the champion before it, paired over {verdict.num_documents:,} documents: "
                  f"{verdict.delta_bpb:+.4f} bits per byte, {verdict.confidence:.0%} interval "
                  f"[{verdict.low:+.4f}, {verdict.high:+.4f}]; {verdict.reason}.", ""]
    if report.get("tasks"):
        unchecked = set(report.get("unchecked_tasks", []))
        lines += [_table(["task", "items", "acc", "acc_norm", "random", "centered", "decontaminated"],
                         [[t["name"], t["items"], f"{t['acc']:.3f}", f"{t['acc_norm']:.3f}", f"{t['random']:.3f}",
                           f"{t['centered']:+.3f}", "no" if t["name"] in unchecked else "yes"]
                          for t in report["tasks"]]), "", f"CORE (mean centered accuracy): {report['core']:+.3f}", ""]
    return lines


def evaluation_report(cfg: ScratchConfig, model_dir: Path) -> dict:
    """model_evaluation's report of the model in model_dir when it is a training run of cfg's data_dir
    (<data_dir>/trained_model/runs/<training key>) that was evaluated, else {} (a checkpoint, a copy)."""
    model_dir = Path(model_dir)
    if model_dir.parent.name != "runs" or model_dir.parent.parent.name != MODEL_DIR:
        return {}
    return read_json(cfg.data_path / EVALUATION_DIR / model_dir.name / REPORT_FILE)


def write_card(text: str, out_dir: Path) -> Path:
    with atomic_path(Path(out_dir) / CARD_FILE) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(out_dir) / CARD_FILE
