"""The Dagster side of scratchllm: assets, checks, resources and the `scratchllm` command."""

import warnings

# Dagster's Pipes client calls one of its own preview functions on every launch: not the user's business.
warnings.filterwarnings("ignore", message=r"Function `PipesMessageReader\.expected_writer_count` is currently")
