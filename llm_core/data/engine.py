"""Where the data stages' per-shard work runs: worker processes on this machine, or Ray tasks on a cluster.

A stage hands `Engine.map` a function and one argument tuple per shard; the engine runs them (here,
or as Ray core tasks spread over the cluster's nodes) and yields (job index, result) as they finish,
logging shards done / total with MB/s. The functions read and write under data_dir, so on a cluster
data_dir must be storage that every node mounts at the same path (checked when the engine starts).

    with data_engine(cfg.engine, log) as engine:
        for i, result in engine.map(clean_part, jobs, what="cleaning parts", sizes=job_bytes, workers=2):
            ...

`engine.kind: local` (default) starts nothing. `engine.kind: ray` imports ray only then, connects to
`engine.address` (auto | host:port | local) and disconnects at the end; with `local` it starts a
private cluster for the stage and stops it. A cluster on a loopback address is on this machine: the
driver then takes the head's address as its own, so no traffic leaves loopback (Ray rewrites
127.0.0.1 to the host's external address, so a private cluster uses 127.0.0.2).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ipaddress
import multiprocessing
import os
import socket
import uuid
from collections import Counter
from typing import Any, Callable, Iterable, Iterator, Sequence

from llm_core.config import EngineConfig
from llm_core.data.progress import Log, Progress
from llm_core.faults import hold_environment

PRIVATE_CLUSTER_IP = "127.0.0.2"
REACH_TIMEOUT_S = 5.0


class EngineError(RuntimeError):
    """The engine cannot run: Ray missing, a cluster that cannot be reached, data_dir not shared."""


Sizes = Sequence[int] | Callable[[Any], int]


class _MapProgress(Progress):
    """Jobs done / total, with MB/s of the jobs' sizes."""

    def __init__(self, log: Log, what: str, total: int, sizes: Sizes):
        super().__init__(log, what, total)
        self.sizes = sizes

    def job_done(self, index: int, result: Any) -> None:
        self.advance(self.sizes(result) if callable(self.sizes) else (self.sizes[index] if self.sizes else 0))


class LocalEngine:
    """Jobs in this process, or in `workers` spawned processes."""

    kind = "local"
    parallelism = 1  # jobs at once unless a map asks for more workers (cleaning does)

    def __init__(self, log: Log = print):
        self.log = log
        self.tasks_per_node: Counter = Counter()

    def map(self, fn: Callable, jobs: Iterable[tuple], *, what: str, total: int, sizes: Sizes = (),
            workers: int = 1) -> Iterator[tuple[int, Any]]:
        """(index, fn(*job)) for each job, as they finish. One worker runs the jobs lazily, in order.
        `sizes`: the bytes of each job, or a function of its result, for the MB/s of the progress lines."""
        progress = _MapProgress(self.log, what, total, sizes)
        if workers <= 1 or total <= 1:
            for i, job in enumerate(jobs):
                result = fn(*job)
                self.tasks_per_node["local"] += 1
                progress.job_done(i, result)
                yield i, result
            return
        # spawn, not fork: the caller (a Dagster step) may hold threads and locks.
        with concurrent.futures.ProcessPoolExecutor(min(workers, total),
                                                    mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(fn, *job): i for i, job in enumerate(jobs)}
            for future in concurrent.futures.as_completed(futures):
                i, result = futures[future], future.result()
                self.tasks_per_node["local"] += 1
                progress.job_done(i, result)
                yield i, result


class RayEngine:
    """Jobs as Ray core tasks, spread over the nodes of the connected cluster."""

    kind = "ray"

    def __init__(self, cfg: EngineConfig, log: Log = print):
        import ray

        self.ray, self.cfg, self.log = ray, cfg, log
        self.node_ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
        self.tasks_per_node: Counter = Counter()  # node ip -> tasks run there
        self.parallelism = max(1, int(ray.cluster_resources().get("CPU", 1) // cfg.cpus_per_task))
        options = {"num_cpus": cfg.cpus_per_task, "max_retries": cfg.max_task_retries, "retry_exceptions": False,
                   "scheduling_strategy": "SPREAD"}  # shards over every node, even when one could take them all
        if cfg.memory_per_task_gb:
            options["memory"] = int(cfg.memory_per_task_gb * 2**30)
        self._task = ray.remote(_run_task).options(**options)

    def map(self, fn: Callable, jobs: Iterable[tuple], *, what: str, total: int, sizes: Sizes = (),
            workers: int = 1) -> Iterator[tuple[int, Any]]:
        """As LocalEngine.map; `workers` is the cluster's business here."""
        progress = _MapProgress(self.log, what, total, sizes)
        env = _task_environment(self.cfg)
        pending = {self._task.remote(fn, job, env): i for i, job in enumerate(jobs)}
        while pending:  # what finished within a second, up to 64 at a time (one wait per task is quadratic)
            ready, _ = self.ray.wait(list(pending), num_returns=min(len(pending), 64), timeout=1.0)
            for ref in ready:
                i = pending.pop(ref)
                node_id, result = self.ray.get(ref)
                self.tasks_per_node[self.node_ips.get(node_id, node_id)] += 1
                progress.job_done(i, result)
                yield i, result


Engine = LocalEngine | RayEngine


@contextlib.contextmanager
def data_engine(cfg: EngineConfig, log: Log = print, data_dir: os.PathLike | None = None) -> Iterator[Engine]:
    """The engine of `cfg`, ready to map; a Ray connection (or private cluster) lasts for the block.
    With `data_dir`, every Ray node must see it (the stages' files are read and written there)."""
    if cfg.kind == "local":
        yield LocalEngine(log)
        return
    with ray_connection(cfg, log):
        yield _started(RayEngine(cfg, log), data_dir)


@contextlib.contextmanager
def ray_connection(cfg: EngineConfig, log: Log = print) -> Iterator[Any]:
    """The `ray` module, connected to `engine.address` for the block (a private cluster with `local`,
    stopped at the end). A connection the caller made already (a benchmark, a notebook) is left open."""
    ray = _import_ray()
    if ray.is_initialized():
        yield ray
        return
    _connect(ray, cfg, log)
    try:
        yield ray
    finally:
        ray.shutdown()  # with address local, this also stops the private cluster


def _started(engine: RayEngine, data_dir: os.PathLike | None) -> RayEngine:
    if data_dir is not None:
        check_shared_directory(engine.ray, data_dir)
    cpus = engine.ray.cluster_resources().get("CPU", 0)
    engine.log(f"engine: Ray, {len(engine.node_ips)} nodes ({', '.join(sorted(engine.node_ips.values()))}), "
               f"{cpus:g} CPUs" + (", data_dir visible on every node" if data_dir is not None else ""))
    return engine


def _import_ray():
    try:
        import ray
    except ImportError:
        raise EngineError("engine.kind: ray needs Ray on this machine: pip install 'scratchllm[ray]' "
                          "(or set engine.kind: local)") from None
    return ray


def _connect(ray, cfg: EngineConfig, log: Log) -> None:
    common = {"logging_level": "WARNING", "log_to_driver": False, "configure_logging": True}
    if cfg.address == "local":
        # A private cluster on loopback: no token written under $HOME, no usage report sent.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        log(f"engine: starting a private Ray cluster on {PRIVATE_CLUSTER_IP} (engine.address: local)")
        ray.init(num_cpus=cfg.local_num_cpus, include_dashboard=False, _node_ip_address=PRIVATE_CLUSTER_IP, **common)
        return
    node_ip = None
    if cfg.address != "auto":
        host, port = cfg.address.rsplit(":", 1)
        try:  # Ray itself retries an unreachable address for minutes
            socket.create_connection((host, int(port)), timeout=REACH_TIMEOUT_S).close()
        except OSError as exc:
            raise EngineError(f"cannot reach the Ray cluster at {cfg.address} (engine.address): {exc}. "
                              f"Start it with `ray start --head --port {port}` or fix the address.") from None
        node_ip = host if _is_loopback(host) else None
    try:
        ray.init(address=cfg.address, _node_ip_address=node_ip, **common)
    except (ConnectionError, RuntimeError) as exc:
        raise EngineError(f"cannot connect to the Ray cluster at {cfg.address} (engine.address): {exc}") from None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_shared_directory(ray, directory: os.PathLike) -> dict[str, str]:
    """Node id -> ip of every alive node, after checking that each one reads a file written here under
    `directory` (the stages' shards live there). Raises EngineError naming the nodes that cannot."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    token = uuid.uuid4().hex
    probe = os.path.join(os.fspath(directory), f".engine-check-{token}")
    os.makedirs(directory, exist_ok=True)
    with open(probe, "w") as fh:
        fh.write(token)
    try:
        read = ray.remote(_read_text)
        seen = ray.get([read.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                        .remote(probe) for node in nodes])
    finally:
        os.unlink(probe)
    blind = [ip for (node, ip), text in zip(nodes.items(), seen) if text != token]
    if blind:
        raise EngineError(f"data_dir {directory} is not visible from Ray node(s) {', '.join(blind)}: with "
                          f"engine.kind: ray, data_dir must be on storage every node mounts at the same path")
    return nodes


def _read_text(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return None


def _task_environment(cfg: EngineConfig) -> dict[str, str]:
    """Variables a task sets before it runs: its thread budget (tokenizers would take every core of
    the node; Ray sets OMP_NUM_THREADS itself), and the fault-injection hooks of llm_core/faults.py
    when a test set them."""
    env = {"RAYON_NUM_THREADS": str(max(1, int(cfg.cpus_per_task)))}
    return {**env, **hold_environment()}


def _run_task(fn: Callable, job: tuple, env: dict[str, str]) -> tuple[str, Any]:
    """A Ray task: fn(*job) in a worker, with the node it ran on (tests check that every node worked)."""
    import ray

    os.environ.update(env)
    return ray.get_runtime_context().get_node_id(), fn(*job)

