"""The llm_core config sections as Dagster run config, so the Dagster UI shows (and lets you edit,
per run) exactly the values of the active profile. One source of truth: the classes are generated
from the pydantic models in llm_core.config, with the profile's values as defaults; validation
happens once, in llm_core, when an asset starts."""

from __future__ import annotations

import typing

import dagster as dg
import pydantic

from llm_core.config import (
    CONFIG_ENV_VAR,
    DEFAULT_PROFILE,
    ScratchConfig,
    active_profile_path,
    changed_values,
    deep_merge,
    load_config,
    profile_values,
    validate_config,
)
from llm_core.run_lock import DirectoryLock
from pipelines.runs import fail_dead_runs

# The profile the code location was loaded with ($SCRATCHLLM_CONFIG, else default.yaml).
# An invalid profile stops the code location from loading, with the offending fields named.
ACTIVE_PROFILE = active_profile_path() or DEFAULT_PROFILE
ACTIVE_CONFIG = load_config(ACTIVE_PROFILE)


def dagster_config_class(values: pydantic.BaseModel, name: str) -> type[dg.Config]:
    """A dagster.Config class mirroring the pydantic model of `values`, defaulting to `values`."""
    fields = {}
    for field_name, info in type(values).model_fields.items():
        value = getattr(values, field_name)
        if isinstance(value, pydantic.BaseModel):
            nested = dagster_config_class(value, name + field_name.title())
            fields[field_name] = (nested, pydantic.Field(default_factory=nested, description=info.description))
        elif _is_model_list(info.annotation):  # e.g. evaluation.tasks: a list of {name, path} maps
            fields[field_name] = (list[dict[str, str]], pydantic.Field(
                default=[v.model_dump() for v in value], description=info.description))
        elif _is_mixed_union(info.annotation):  # e.g. corpus.sources: paths or {name, paths} maps
            default = [v.model_dump() if isinstance(v, pydantic.BaseModel) else v for v in value] \
                if isinstance(value, list) else value
            fields[field_name] = (typing.Any, pydantic.Field(default=default, description=info.description))
        else:
            fields[field_name] = (info.annotation, pydantic.Field(default=value, description=info.description))
    doc = (type(values).__doc__ or "").strip()
    return pydantic.create_model(name, __base__=dg.Config, __doc__=doc or None, **fields)


def _is_model_list(annotation) -> bool:
    args = typing.get_args(annotation)
    return typing.get_origin(annotation) is list and bool(args) and isinstance(args[0], type) and \
        issubclass(args[0], pydantic.BaseModel)


def _is_mixed_union(annotation) -> bool:
    """A union of several types besides None (or a list of one), which Dagster's config types cannot say:
    shown as any value, validated by llm_core when the asset starts."""
    if typing.get_origin(annotation) is list:
        annotation = typing.get_args(annotation)[0]
    return len([a for a in typing.get_args(annotation) if a is not type(None)]) > 1 and \
        typing.get_origin(annotation) is not dict


def run_config_class(name: str, *sections: str) -> type[dg.Config]:
    """Run config of an asset: the named top-level sections of the profile."""
    fields = {}
    for section in sections:
        section_class = dagster_config_class(getattr(ACTIVE_CONFIG, section), f"{name}{section.title()}")
        fields[section] = (section_class, pydantic.Field(default_factory=section_class))
    return pydantic.create_model(name, __base__=dg.Config, **fields)


class ScratchllmResource(dg.ConfigurableResource):
    """The active profile and data directory, shared by every asset of the code location.

    One snapshot of the profile per run: the YAML is read once when the run starts, and an asset's
    config is that snapshot plus what was edited in the run config (the values that differ from the
    defaults the code location showed). So editing a profile while `dagster dev` runs never gives
    a run the old `training` values and the new `dataset` values: a run started after the edit
    uses the new profile throughout (the launchpad shows it after "Reload definitions").

    A run holds its data directory for its whole duration (llm_core/run_lock.py): a second run on
    the same data_dir waits until the first one ends. Before that, runs whose process died are
    marked failed so that they do not keep the `training` pool (pipelines/runs.py)."""

    profile: str = pydantic.Field(default=str(ACTIVE_PROFILE), description=f"YAML profile (${CONFIG_ENV_VAR}).")
    data_dir: str = pydantic.Field(default=ACTIVE_CONFIG.data_dir, description="Where every stage writes.")
    _snapshot: tuple[dict, str] | None = pydantic.PrivateAttr(default=None)
    _lock: DirectoryLock | None = pydantic.PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._snapshot = profile_values(self.profile)  # the run's one reading of the profile
        if context.dagster_run is None:  # a sensor or a schedule only reads
            return
        for line in fail_dead_runs(context.instance):
            context.log.warning(line)
        self._lock = DirectoryLock(self.data_config().data_path, {"run": context.run_id})
        self._lock.acquire(log=context.log.info)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._lock is not None:
            self._lock.release()

    def _config(self, edits: dict) -> ScratchConfig:
        if self._snapshot is None:  # used outside a run's lifecycle (direct invocation in tests)
            self._snapshot = profile_values(self.profile)
        raw, origin = self._snapshot
        if self.data_dir != ACTIVE_CONFIG.data_dir:
            edits = {**edits, "data_dir": self.data_dir}
        return validate_config(deep_merge(raw, edits), origin)

    def resolve(self, run_config: dg.Config) -> ScratchConfig:
        """The run's profile snapshot with this asset's run config edits and data_dir, validated
        (raises ConfigError naming the fields)."""
        values = run_config.model_dump()
        return self._config(changed_values(values, ACTIVE_CONFIG.model_dump(mode="json", include=set(values))))

    def data_config(self) -> ScratchConfig:
        """The run's profile snapshot with its data_dir: what asset checks need to find the outputs."""
        return self._config({})
