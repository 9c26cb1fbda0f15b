"""Automation: the `retrain` job, its schedule, and a sensor that retrains when the corpus changes.

Both start runs of the whole graph. That refreshes only what a change affects: raw_corpus and
cleaned_shards rebuild just the shards whose files changed (they are content-addressed), the
tokenizer and dataset are re-encoded only when their input changed, and training resumes or
starts by its training key. One training runs at a time (pool "training", limit 1).

Both are off by default and turned on in the profile (`automation:`) or in the Dagster UI.
The `dead_run_sweeper` sensor is always on: it marks failed the runs whose process died (see
pipelines/runs.py), so that a killed training never keeps the `training` pool from the next one.
"""

import dagster as dg

from llm_core.config import AutomationConfig
from llm_core.data.sources import source_changes
from pipelines.config import ACTIVE_CONFIG, ScratchllmResource
from pipelines.runs import fail_dead_runs

retrain = dg.define_asset_job(
    "retrain", selection=dg.AssetSelection.all(),
    description="Refresh the corpus, tokenizer and dataset where their inputs changed, train, evaluate and "
                "register the model (`champion` moves only if it is better beyond noise), then fine-tune the "
                "champion to chat (reused when the champion did not change).",
)


def status(enabled: bool) -> dg.DefaultScheduleStatus:
    return dg.DefaultScheduleStatus.RUNNING if enabled else dg.DefaultScheduleStatus.STOPPED


def retrain_schedule(automation: AutomationConfig) -> dg.ScheduleDefinition:
    """`retrain` on `automation.retrain_cron` (UTC), running from the start if the profile says so."""
    return dg.ScheduleDefinition(
        name="retrain_schedule", job=retrain, cron_schedule=automation.retrain_cron, execution_timezone="UTC",
        default_status=status(automation.retrain_schedule_enabled),
        description="Retrain the whole graph on a schedule (automation.retrain_cron).")


def new_data_sensor(automation: AutomationConfig) -> dg.SensorDefinition:
    """A sensor that compares corpus.sources with what raw_corpus last ingested and requests a
    `retrain` run when files were added, changed or removed (once per state of the sources)."""

    @dg.sensor(name="new_data_sensor", job=retrain, minimum_interval_seconds=automation.new_data_interval_seconds,
               default_status=dg.DefaultSensorStatus(status(automation.new_data_sensor_enabled).value),
               description="Retrain when files in corpus.sources are new or changed.")
    def sensor(context: dg.SensorEvaluationContext, scratchllm: ScratchllmResource):
        changes, sources_version = source_changes(scratchllm.data_config())
        if not changes:
            return dg.SkipReason("corpus.sources match what raw_corpus last ingested")
        context.log.info(f"corpus.sources changed: {changes.summary()}")
        # run_key: one run per state of the sources, however often the sensor looks.
        return dg.RunRequest(run_key=sources_version, tags={"scratchllm/trigger": "new_data",
                                                            "scratchllm/changes": changes.summary()})

    return sensor


@dg.sensor(name="dead_run_sweeper", minimum_interval_seconds=10, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Marks failed the runs whose process died (kill -9, out of memory, a reboot) and frees "
                       "their pool slots, so that the next training does not wait for them forever.")
def dead_run_sweeper(context: dg.SensorEvaluationContext):
    lines = fail_dead_runs(context.instance)
    for line in lines:
        context.log.warning(line)
    return dg.SkipReason("; ".join(lines) or "every in-progress run has a live process")


schedules = [retrain_schedule(ACTIVE_CONFIG.automation)]
sensors = [new_data_sensor(ACTIVE_CONFIG.automation), dead_run_sweeper]
