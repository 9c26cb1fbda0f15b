"""The Dagster side of scratchllm: assets, checks, resources and the `scratchllm` command."""
