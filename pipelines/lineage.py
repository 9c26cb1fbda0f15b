"""Lineage: which data a model came from, as the Dagster instance records it."""

import dagster as dg

UPSTREAM_OF_TRAINING = ("raw_corpus", "cleaned_shards", "tokenizer", "tokenized_dataset")


def data_versions(instance: dg.DagsterInstance, assets=(*UPSTREAM_OF_TRAINING, "trained_model")) -> dict[str, str]:
    """{"data_version.<asset>": version} of each asset's latest materialization: what a model came from."""
    versions = {}
    for name in assets:
        event = instance.get_latest_materialization_event(dg.AssetKey(name))
        if event is not None and event.asset_materialization is not None:
            versions[f"data_version.{name}"] = event.asset_materialization.tags.get("dagster/data_version", "")
    return versions
