"""Where each stage writes under data_dir: one folder per asset, named after it."""

RAW_CORPUS_DIR = "raw_corpus"  # shards/*.parquet + manifest.json
CLEANED_SHARDS_DIR = "cleaned_shards"  # shards/, removed/, cache/ + manifest.json
QUARANTINE_DIR = "quarantine"  # <stage>/*.jsonl and files/: what a stage could not use, with the reason
TOKENIZER_DIR = "tokenizer"  # tokenizer.json + tokenizer_config.json
DATASET_DIR = "tokenized_dataset"  # {train,val}/*.tokens.arrow + manifest.json
MODEL_DIR = "trained_model"  # runs/<training key>/ and LATEST_FILE
LATEST_FILE = "latest.json"  # the last healthy training: what evaluation, registry and export take
EVALUATION_DIR = "model_evaluation"  # <training key>/REPORT_FILE
REPORT_FILE = "report.json"  # a model's final scores (llm_core/evaluation/evaluate.py)
EXPORT_DIR = "hf_export"  # <training key>/: a transformers model directory
REGISTRY_CACHE_DIR = "registry_cache"  # <name>/<version>-<run id>/: registered models downloaded once
SFT_DATASET_DIR = "sft_dataset"  # {train,val}.{tokens,mask}.npy, val_conversations.jsonl, tokenizer/ + manifest.json
CHAT_MODEL_DIR = "chat_model"  # runs/<training key>/ and LATEST_FILE, as trained_model
CHECKPOINTS = "checkpoints"  # inside a run directory: step_N/ (llm_core/training/checkpoint.py)
MODEL_TOKENIZER_SUBDIR = "tokenizer"  # inside a model directory: the tokenizer it was trained with
