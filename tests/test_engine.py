"""The data engine (llm_core/data/engine.py) without a cluster: the `engine` section is validated like every
section, never changes what a model was made with, the local engine maps with progress lines, and a
Ray address that nobody listens on fails at once, naming it. The real 2-node cluster is in
test_ray_engine.py."""

import time

import pytest
from helpers import free_port

from llm_core.config import ConfigError, load_config
from llm_core.data.engine import EngineError, LocalEngine, data_engine


@pytest.mark.parametrize("engine, field", [({"kind": "spark"}, "engine.kind"),
                                           ({"address": "headnode"}, "engine.address"),
                                           ({"address": "10.0.0.5:http"}, "engine.address"),
                                           ({"cpus_per_task": 0}, "engine.cpus_per_task"),
                                           ({"workers": 4}, "engine.workers")])
def test_bad_engine_values_are_refused_naming_the_field(engine, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(overrides={"engine": engine})


def test_data_dir_is_a_local_path_or_a_shared_mount_not_a_url():
    with pytest.raises(ConfigError, match="data_dir: .*must be a local path .*every node mounts"):
        load_config(overrides={"data_dir": "s3://bucket/run"})


def test_the_engine_is_not_part_of_what_a_model_was_made_with():
    local = load_config()
    ray = load_config(overrides={"engine": {"kind": "ray", "address": "10.0.0.5:6379"}})
    assert local.config_hash() == ray.config_hash()
    assert local.config_hash() != load_config(overrides={"dedup": {"threshold": 0.7}}).config_hash()


def square(x: int) -> int:
    return x * x


@pytest.mark.parametrize("workers", [1, 2])
def test_the_local_engine_maps_every_job_and_reports_progress(workers):
    lines = []
    engine = LocalEngine(lines.append)
    results = dict(engine.map(square, [(i,) for i in range(5)], what="squares", total=5, sizes=[10**6] * 5,
                              workers=workers))
    assert results == {i: i * i for i in range(5)}
    assert engine.tasks_per_node == {"local": 5}
    assert lines[-1].startswith("squares: 5/5, 5.0 MB, ") and lines[-1].endswith(" MB/s")


def test_an_unreachable_ray_address_fails_at_once_naming_it():
    pytest.importorskip("ray")
    address = f"127.0.0.2:{free_port()}"  # nobody listens there
    cfg = load_config(overrides={"engine": {"kind": "ray", "address": address}}).engine
    start = time.monotonic()
    with pytest.raises(EngineError, match=f"cannot reach the Ray cluster at {address} \\(engine.address\\)"):
        with data_engine(cfg, print):
            pass
    assert time.monotonic() - start < 30  # Ray alone retries such an address for minutes
