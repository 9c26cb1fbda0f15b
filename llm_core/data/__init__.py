"""The data stages: raw_corpus, cleaned_shards, tokenizer and tokenized_dataset, the engine their
per-shard work runs on, the train/validation split, decontamination and the items of evaluation tasks."""
