"""The retrain schedule and the new-data sensor, evaluated with Dagster's test contexts against a
real corpus on disk and a real raw_corpus manifest."""

import datetime
import os
import time

import dagster as dg
import pytest
from helpers import write_jsonl

from llm_core.config import AutomationConfig, ConfigError, load_config
from llm_core.data.raw_corpus import build_raw_corpus
from pipelines.automation import new_data_sensor, retrain_schedule
from pipelines.config import ScratchllmResource


def test_schedule_follows_the_profile():
    default = retrain_schedule(AutomationConfig())
    assert (default.cron_schedule, default.default_status) == ("0 3 * * 1", dg.DefaultScheduleStatus.STOPPED)
    on = retrain_schedule(AutomationConfig(retrain_cron="15 4 * * *", retrain_schedule_enabled=True))
    assert (on.cron_schedule, on.default_status) == ("15 4 * * *", dg.DefaultScheduleStatus.RUNNING)
    with dg.build_schedule_context(scheduled_execution_time=datetime.datetime(2026, 11, 30, 4, 15)) as context:
        tick = on.evaluate_tick(context)
    assert len(tick.run_requests) == 1 and on.job_name == "retrain"


def test_a_bad_cron_is_refused_with_the_field_named():
    with pytest.raises(ConfigError, match="automation.retrain_cron"):
        load_config(overrides={"automation": {"retrain_cron": "every monday"}})


def test_definitions_have_the_retrain_job_schedule_and_sensor():
    from pipelines.definitions import defs

    assert defs.resolve_schedule_def("retrain_schedule").job_name == "retrain"
    assert defs.resolve_sensor_def("new_data_sensor").job_name == "retrain"
    retrain = defs.resolve_job_def("retrain")
    assert {k.to_user_string() for k in retrain.asset_layer.executable_asset_keys} >= {
        "raw_corpus", "cleaned_shards", "tokenizer", "tokenized_dataset", "trained_model", "model_evaluation",
        "registered_model"}


def test_sensor_requests_a_retrain_for_new_or_changed_files_only(tmp_path, prose):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl", prose[:10])
    profile = tmp_path / "profile.yaml"
    profile.write_text(f"corpus:\n  sources: [{corpus}]\ncleaning:\n  num_workers: 1\n")
    resource = ScratchllmResource(profile=str(profile), data_dir=str(tmp_path / "data"))
    sensor = new_data_sensor(AutomationConfig(new_data_sensor_enabled=True))
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING

    def evaluate():
        with dg.build_sensor_context(resources={"scratchllm": resource}) as context:
            return sensor(context)

    first = evaluate()  # nothing ingested yet: the whole corpus is new
    assert isinstance(first, dg.RunRequest) and first.tags["scratchllm/changes"].startswith("1 new")
    build_raw_corpus(resource.data_config(), log=lambda m: None)
    assert isinstance(evaluate(), dg.SkipReason)  # ingested, unchanged: nothing to do

    write_jsonl(corpus / "b.jsonl", prose[10:20])
    added = evaluate()
    assert isinstance(added, dg.RunRequest) and added.tags["scratchllm/changes"] == \
        "1 new, 0 changed, 0 removed files"
    assert added.run_key != first.run_key and evaluate().run_key == added.run_key  # one run per state

    build_raw_corpus(resource.data_config(), log=lambda m: None)
    write_jsonl(corpus / "a.jsonl", prose[:11])
    later = time.time() + 5
    os.utime(corpus / "a.jsonl", (later, later))
    changed = evaluate()
    assert isinstance(changed, dg.RunRequest) and changed.tags["scratchllm/changes"] == \
        "0 new, 1 changed, 0 removed files"
