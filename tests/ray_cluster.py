"""A real 2-node Ray cluster on this one machine, for tests: `RayCluster.start()` ... `.stop()`.

- Loopback only: the head node is 127.0.0.2 and the worker node 127.0.0.3 (never 127.0.0.1: Ray
  rewrites it to the host's external address), two distinct addresses that never leave the machine;
  `non_loopback_connections()` lets a test check that nothing else was used.
- Its own ports (GCS, Ray client server), picked free, and its own short temp dir for every file
  (sessions, sockets, logs), deleted at stop. RAY_AUTH_MODE=disabled: nothing written to ~/.ray.
- Stopped by process id: `ray start --block` stays the parent of its node's daemons, so the cluster
  is those processes, their descendants and anything whose command line names the temp dir. Never
  `ray stop` or a kill by name: other clusters on this machine are left alone.
A driver should `ray.shutdown()` before `stop()` (after it, the shutdown waits ~5 s for the dead GCS).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
# On SIGTERM a node first drains, up to 30 s while a driver holds workers: no use in a test. The
# training workers' gloo connections on the nodes' network interface, loopback here (a real cluster names
# its own: GLOO_SOCKET_IFNAME=eth0); by default gloo takes the address the host name resolves to.
NODE_ENV = {**RAY_ENV, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "GLOO_SOCKET_IFNAME": "lo"}
START_TIMEOUT_S = 90
RAY = str(Path(sys.executable).with_name("ray"))

# A throwaway driver printing the alive nodes, {node id: node ip}, as JSON on its last stdout line.
_NODES_SCRIPT = """
import json, sys, ray
ray.init(address=sys.argv[1], _node_ip_address=sys.argv[2], log_to_driver=False)
print(json.dumps({n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}))
ray.shutdown()
"""


def _free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def _is_local(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    addr = getattr(addr, "ipv4_mapped", None) or addr  # psutil shows some as ::ffff:127.0.0.2
    return addr.is_loopback or addr.is_unspecified


def non_loopback_connections(pids) -> list[str]:
    """Every inet connection of these processes whose local or remote address is not loopback."""
    found = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            name, conns = proc.name(), proc.net_connections(kind="inet")
        except psutil.Error:  # gone meanwhile
            continue
        for c in conns:
            if not _is_local(c.laddr.ip) or (c.raddr and not _is_local(c.raddr.ip)):
                found.append(f"pid {pid} ({name}) {c.status} {c.laddr} -> {c.raddr or '-'}")
    return found


def _signal_all(procs: list[psutil.Process], sig: int) -> None:
    for p in procs:
        try:
            p.send_signal(sig)  # psutil checks that the pid was not reused meanwhile
        except psutil.Error:
            pass


@dataclasses.dataclass
class RayCluster:
    address: str  # "127.0.0.2:PORT", for ray.init(address=..., _node_ip_address=HEAD_IP)
    temp_dir: str
    head_ip: str = HEAD_IP
    worker_ip: str = WORKER_IP
    procs: list[subprocess.Popen] = dataclasses.field(default_factory=list)  # the `ray start --block`s

    @classmethod
    def start(cls, cpus_per_node: int = 1) -> RayCluster:
        # A short temp dir: Ray puts unix sockets in it, and their paths are limited to ~107 characters.
        cluster = cls(f"{HEAD_IP}:{_free_port(HEAD_IP)}", tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        common = ["--num-cpus", str(cpus_per_node), "--temp-dir", cluster.temp_dir, "--disable-usage-stats", "--block"]
        try:
            cluster._ray_start("head", "--head", "--node-ip-address", HEAD_IP, "--port", cluster.address.split(":")[1],
                               "--ray-client-server-port", str(_free_port(HEAD_IP)),  # the default 10001 is shared
                               "--include-dashboard=false", *common)
            cluster._wait_for_nodes(1)
            cluster._ray_start("worker", "--address", cluster.address, "--node-ip-address", WORKER_IP, *common)
            cluster._wait_for_nodes(2)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _ray_start(self, name: str, *args: str) -> None:
        with open(Path(self.temp_dir, f"{name}.log"), "wb") as log:
            self.procs.append(subprocess.Popen([RAY, "start", *args], stdout=log, stderr=subprocess.STDOUT,
                                               env={**os.environ, **NODE_ENV}, start_new_session=True))

    def _wait_for_nodes(self, count: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and all(p.poll() is None for p in self.procs):
            try:
                if len(self.node_ids(timeout=deadline - time.monotonic())) >= count:
                    return
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
            time.sleep(0.5)
        tails = "".join(f"\n--- {log.name}:\n{log.read_text(errors='replace')[-3000:]}"
                        for log in sorted(Path(self.temp_dir).glob("*.log")))
        raise RuntimeError(f"Ray cluster {self.address}: not {count} node(s) alive within {START_TIMEOUT_S} s; "
                           f"`ray start` exit codes {[p.returncode for p in self.procs]} (None: running){tails}")

    def env(self) -> dict[str, str]:
        """Environment variables a driver (or its subprocesses) needs to connect to the cluster."""
        return dict(RAY_ENV)

    def node_ids(self, timeout: float = 60) -> dict[str, str]:
        """The alive nodes, {node id: node ip}, asked by a driver in a subprocess."""
        run = subprocess.run([sys.executable, "-c", _NODES_SCRIPT, self.address, HEAD_IP], capture_output=True,
                             text=True, timeout=max(timeout, 1), env={**os.environ, **RAY_ENV})
        if run.returncode != 0:
            raise RuntimeError(f"listing the nodes failed ({run.returncode}): {run.stderr[-2000:]}")
        return json.loads(run.stdout.strip().splitlines()[-1])

    def _processes(self) -> list[psutil.Process]:
        procs = {}
        for popen in self.procs:
            if popen.poll() is not None:
                continue  # exited and reaped: its pid may already be another process's
            try:
                root = psutil.Process(popen.pid)
                procs.update((p.pid, p) for p in [root, *root.children(recursive=True)])
            except psutil.Error:  # exited meanwhile
                pass
        for p in psutil.process_iter(["cmdline"]):  # daemons that outlived or left their parent
            if p.pid not in procs and any(self.temp_dir in arg for arg in p.info["cmdline"] or ()):
                procs[p.pid] = p
        procs.pop(os.getpid(), None)
        return list(procs.values())

    def pids(self) -> set[int]:
        """Every live process of the cluster."""
        return {p.pid for p in self._processes()}

    def non_loopback_connections(self) -> list[str]:
        return non_loopback_connections(self.pids())

    def stop(self) -> None:
        """SIGTERM the cluster, SIGKILL what is left after ~15 s, delete the temp dir. Idempotent."""
        procs = self._processes()  # all of them up front: a dying parent orphans its children
        # Each `ray start` tears its node down in order (raylet, GCS, the rest) on SIGTERM, in ~2 s;
        # signalling every daemon at once instead left gcs_server and the raylets hanging until SIGKILL.
        _signal_all([p for p in procs if p.pid in {popen.pid for popen in self.procs}], signal.SIGTERM)
        procs = psutil.wait_procs(procs, timeout=10)[1]  # the survivors
        _signal_all(procs, signal.SIGTERM)
        procs = psutil.wait_procs(procs, timeout=5)[1]
        _signal_all(procs, signal.SIGKILL)
        psutil.wait_procs(procs, timeout=5)
        for popen in self.procs:
            popen.poll()  # reap
        shutil.rmtree(self.temp_dir, ignore_errors=True)
