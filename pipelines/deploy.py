"""`scratchllm deploy`: a team's foundry on one machine, Dagster and MLflow on PostgreSQL.

    scratchllm deploy up --database postgresql://USER[:PASSWORD]@HOST:PORT/NAME --artifacts DIR --home DIR
                         [--config P] [--dagster-port 3000] [--mlflow-port 5000] [--code-port 4000]
                         [--max-concurrent-runs 2] [--max-concurrent-trainings 1] [--host 127.0.0.1]
    scratchllm deploy status --home DIR
    scratchllm deploy stop --home DIR
    scratchllm deploy upgrade --database URL --home DIR    (after upgrading scratchllm, services stopped)

`up` creates the databases NAME (Dagster: runs, event log, schedules, pools), NAME_mlflow (runs and
registry) and NAME_mlflow_auth (users and permissions) when they are missing, writes HOME/dagster.yaml
(PostgreSQL storage, runs queued by the daemon: at most --max-concurrent-runs at once, and at most
--max-concurrent-trainings trainings through the `training` pool), HOME/workspace.yaml and
HOME/mlflow_auth.ini, and starts a supervisor that starts four services (each in a session of its own,
its log in HOME/service_logs/) and restarts one that dies after it was up:

- the code server (`dagster code-server start`): the code location; runs start from it, with the
  profile of --config and MLflow pointed at the deployment's server;
- the Dagster webserver (the UI, always on 127.0.0.1: it has no login of its own);
- the Dagster daemon: the run queue, schedules, sensors, run monitoring;
- an MLflow tracking server with basic auth (users, an admin, per-experiment and per-model permissions),
  artifacts proxied from --artifacts (clients need no access to that path), bound to --host.

Their process ids go to HOME/deploy.json; `stop` stops the supervisor by its id, which stops the
services (anything left is stopped by its recorded id, and only if it is still the process started).
The database password is written nowhere: the services get it as PGPASSWORD, which libpq reads, and
so does whoever opens the instance (DAGSTER_HOME=HOME). The MLflow
admin's password comes from SCRATCHLLM_ADMIN_PASSWORD (refused when unset); the runs use the admin.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

from llm_core.config import CONFIG_ENV_VAR, ConfigError, find_profile
from llm_core.files import read_json, write_json, write_text
from pipelines.runs import process_is_alive
from pipelines.ui import default_signals, stop, wait_until_up

ADMIN_PASSWORD_ENV = "SCRATCHLLM_ADMIN_PASSWORD"
ADMIN_USER = "admin"
STATE_FILE = "deploy.json"
SERVICES = ("code-server", "webserver", "daemon", "mlflow")
START_TIMEOUT_SECONDS = 180
STOP_TIMEOUT_SECONDS = 20  # what is left of unsupervised services after SIGTERM is killed after this
LOG_DIR = "service_logs"  # not HOME/logs: Dagster's telemetry moves that folder away (to .logs_queue)
MIN_UPTIME_SECONDS = 10  # a service that dies sooner failed to start: not restarted
NAME_PATTERN = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")


class DeployError(Exception):
    """Something a deployment cannot do, said in one line (exit status 2)."""


@dataclasses.dataclass(frozen=True)
class Database:
    """A PostgreSQL server and the base name of the deployment's databases; the password is kept
    apart so that no URL this module writes or passes on carries it."""

    user: str
    host: str
    port: int
    name: str
    password: str | None

    @classmethod
    def parse(cls, url: str) -> "Database":
        parts = urlsplit(url)
        if parts.scheme not in ("postgresql", "postgres"):
            raise DeployError("--database: a PostgreSQL URL, postgresql://USER[:PASSWORD]@HOST:PORT/NAME")
        name = parts.path.lstrip("/")
        if not NAME_PATTERN.match(name):
            raise DeployError(f"--database: the database name must be lower-case letters, digits and _, got {name!r}")
        return cls(user=unquote(parts.username or "postgres"), host=parts.hostname or "127.0.0.1",
                   port=parts.port or 5432, name=name, password=unquote(parts.password) if parts.password else None)

    def url(self, suffix: str = "", driver: str = "postgresql") -> str:
        """The URL of one of the deployment's databases, without the password."""
        return f"{driver}://{self.user}@{self.host}:{self.port}/{self.name}{suffix}"

    def sqlalchemy_url(self, suffix: str) -> str:
        """For MLflow (SQLAlchemy 2.1 takes postgresql:// as psycopg 3; dagster-postgres brings psycopg2)."""
        return self.url(suffix, driver="postgresql+psycopg2")

    def environment(self) -> dict[str, str]:
        return {"PGPASSWORD": self.password} if self.password else {}

    def connect(self, dbname: str):
        import psycopg2

        try:
            return psycopg2.connect(dbname=dbname, user=self.user, host=self.host, port=self.port,
                                    password=self.password, connect_timeout=10)
        except psycopg2.OperationalError as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if self.password:
                detail = detail.replace(self.password, "***")
            raise DeployError(f"cannot connect to PostgreSQL at {self.url()}: {detail}") from None

    def create_databases(self) -> list[str]:
        """NAME, NAME_mlflow and NAME_mlflow_auth, each created when missing; returns those created."""
        created = []
        connection = self.connect("postgres")
        connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
        try:
            with connection.cursor() as cursor:
                for name in self.names():
                    cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                    if cursor.fetchone() is None:
                        cursor.execute(f'CREATE DATABASE "{name}"')  # the name matched NAME_PATTERN
                        created.append(name)
        finally:
            connection.close()
        return created

    def mlflow_schema_problem(self) -> str | None:
        """NAME_mlflow's schema against this MLflow's: a server on an older schema starts and answers
        /health, then fails every request that touches the store, so `up` refuses it first."""
        from mlflow.store.db.utils import _get_latest_schema_revision  # MLflow's own check, minus the engine

        connection = self.connect(f"{self.name}_mlflow")
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT to_regclass('alembic_version')")
                if cursor.fetchone()[0] is None:
                    return None  # a new database: the server creates the tables
                cursor.execute("SELECT version_num FROM alembic_version")
                found = cursor.fetchone()
        finally:
            connection.close()
        expected = _get_latest_schema_revision()
        if found is None or found[0] == expected:
            return None
        return f"the MLflow schema of {self.name}_mlflow is {found[0]}, this MLflow expects {expected}"

    def names(self) -> list[str]:
        return [self.name, f"{self.name}_mlflow", f"{self.name}_mlflow_auth"]


def instance_settings(db: Database, max_concurrent_runs: int, max_concurrent_trainings: int) -> str:
    """HOME/dagster.yaml: PostgreSQL storage, queued runs, the training pool's limit, run monitoring."""
    password = "      password: {env: PGPASSWORD}\n" if db.password else ""
    return f"""\
# Written by `scratchllm deploy up`. The database password is not here: it comes from PGPASSWORD.
telemetry:
  enabled: false
storage:
  postgres:
    postgres_db:
      username: {db.user}
      hostname: {db.host}
      port: {db.port}
      db_name: {db.name}
      scheme: postgresql+psycopg2   # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3
{password}run_coordinator:
  module: dagster._core.run_coordinator
  class: QueuedRunCoordinator
  config:
    dequeue_interval_seconds: 1   # a launch starts within a second (the default looks every 5 s)
concurrency:
  runs:
    max_concurrent_runs: {max_concurrent_runs}
  pools:
    default_limit: {max_concurrent_trainings}   # trained_model is in the pool "training"
run_monitoring:
  enabled: true
  poll_interval_seconds: 30
"""


def workspace_settings(code_port: int) -> str:
    return f"""\
# Written by `scratchllm deploy up`: the webserver and the daemon load the code location from the code server.
load_from:
  - grpc_server:
      host: 127.0.0.1
      port: {code_port}
      location_name: scratchllm
"""


def auth_settings(db: Database) -> str:
    return f"""\
# Written by `scratchllm deploy up`. The admin's password is not here: it is set on the first start from
# SCRATCHLLM_ADMIN_PASSWORD; change it later through MLflow's update-password API.
[mlflow]
default_permission = READ
database_uri = {db.sqlalchemy_url("_mlflow_auth")}
admin_username = {ADMIN_USER}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
# A password check costs ~130 ms of CPU by design (scrypt), on every request: a training's metric batches
# kept the server busy. Successful checks are cached in the one worker; a password changed or a user
# deleted through the API takes effect at once.
auth_cache_ttl_seconds = 300
"""


@dataclasses.dataclass
class Plan:
    """What the supervisor starts: the command and environment of each service."""

    commands: dict[str, list[str]]
    environments: dict[str, dict[str, str]]
    urls: dict[str, str]


def plan(settings: dict, db: Database, admin_password: str) -> Plan:
    home, port = Path(settings["home"]), settings["ports"]
    bin_dir = Path(sys.executable).parent
    host = settings["host"]
    mlflow_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port['mlflow']}"
    # What every service sees: the instance, the database password for libpq, no tracking settings of
    # the shell that ran `deploy up`.
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("MLFLOW_TRACKING_", "PG", "DAGSTER_HOME", ADMIN_PASSWORD_ENV))}
    base |= {"DAGSTER_HOME": str(home), **db.environment()}
    dagster_env = base | {"MLFLOW_TRACKING_URI": mlflow_url, "MLFLOW_TRACKING_USERNAME": ADMIN_USER,
                          "MLFLOW_TRACKING_PASSWORD": admin_password}
    if settings["config"]:
        dagster_env[CONFIG_ENV_VAR] = settings["config"]
    allowed_hosts = ",".join(sorted({f"{h}:{port['mlflow']}" for h in ("127.0.0.1", "localhost", host)}))
    mlflow_env = base | {
        "MLFLOW_BACKEND_STORE_URI": db.sqlalchemy_url("_mlflow"),  # from the environment: not in the process list
        "MLFLOW_AUTH_CONFIG_PATH": str(home / "mlflow_auth.ini"),
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,  # used on the first start only
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    workspace = str(home / "workspace.yaml")
    commands = {
        "code-server": [str(bin_dir / "dagster"), "code-server", "start", "-m", "pipelines.definitions",
                        "--location-name", "scratchllm", "-h", "127.0.0.1", "-p", str(port["code"]),
                        "--use-python-environment-entry-point"],  # runs start with this python, PATH or not
        "webserver": [str(bin_dir / "dagster-webserver"), "-w", workspace, "-h", "127.0.0.1",
                      "-p", str(port["dagster"])],
        "daemon": [str(bin_dir / "dagster-daemon"), "run", "-w", workspace],
        "mlflow": [str(bin_dir / "mlflow"), "server", "--app-name", "basic-auth", "--host", host,
                   "--port", str(port["mlflow"]), "--workers", "1", "--serve-artifacts",
                   "--artifacts-destination", settings["artifacts"], "--allowed-hosts", allowed_hosts],
    }
    environments = {"code-server": dagster_env, "webserver": dagster_env, "daemon": dagster_env, "mlflow": mlflow_env}
    urls = {"webserver": f"http://127.0.0.1:{port['dagster']}", "mlflow": mlflow_url}
    return Plan(commands, environments, urls)


# ------------------------------------------------------------------------------------------------
# The supervisor: starts the services, restarts one that dies, stops them all on SIGTERM


def read_state(home: Path) -> dict:
    return read_json(home / STATE_FILE, {"services": {}})


def running(home: Path) -> list[str]:
    """What still runs from `home`: the supervisor and the services (also those it left when killed -9)."""
    state = read_state(home)
    return [name for name, entry in [("supervisor", state.get("supervisor")), *state["services"].items()]
            if alive(entry)]


def alive(entry: dict | None) -> bool:
    """Is the process of `entry` still the one that was started (not a later process with its pid)?"""
    return bool(entry) and process_is_alive(entry["pid"], entry["started"])


def code_server_up(port: int) -> bool:
    from dagster._grpc.client import DagsterGrpcClient

    with contextlib.suppress(Exception):
        return DagsterGrpcClient(port=port, host="127.0.0.1").ping("up")["echo"] == "up"
    return False


def supervise(home: Path) -> int:
    """Run the services until SIGTERM. A service that dies after MIN_UPTIME_SECONDS is restarted (the
    daemon after a kill -9, the MLflow server after the OOM killer); one that dies sooner failed to
    start (a bad port, an old schema) and stays down, marked failed, for `up` and `status` to report."""
    import psutil

    state = read_state(home)
    db = dataclasses.replace(Database.parse(state["database"]), password=os.environ.get("PGPASSWORD"))
    services = plan(state["settings"], db, os.environ.get(ADMIN_PASSWORD_ENV, ""))
    stopping = False

    def request_stop(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    processes: dict[str, subprocess.Popen] = {}
    state["supervisor"] = {"pid": os.getpid(), "started": psutil.Process().create_time()}

    def launch(name: str) -> None:
        log = home / LOG_DIR / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        with open(log, "ab") as out:
            processes[name] = subprocess.Popen(services.commands[name], cwd=home, env=services.environments[name],
                                               stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                               start_new_session=True, preexec_fn=default_signals)
        pid, before = processes[name].pid, state["services"].get(name, {})
        state["services"][name] = {"pid": pid, "started": psutil.Process(pid).create_time(), "log": str(log),
                                   "state": "running", "restarts": before.get("restarts", -1) + 1}
        write_json(home / STATE_FILE, state)

    launch("mlflow")
    launch("code-server")
    deadline = time.monotonic() + START_TIMEOUT_SECONDS  # the webserver and daemon load the code location
    while (not stopping and processes["code-server"].poll() is None and time.monotonic() < deadline
           and not code_server_up(state["settings"]["ports"]["code"])):
        time.sleep(0.5)
    if not stopping:
        launch("webserver")
        launch("daemon")
    while not stopping:
        for name, process in processes.items():
            entry = state["services"][name]
            if process.poll() is None or entry["state"] == "failed":
                continue
            ran = time.time() - entry["started"]
            if ran < MIN_UPTIME_SECONDS:
                entry["state"] = "failed"
                print(f"{name} exited ({process.returncode}) {ran:.0f} s after its start: not restarted", flush=True)
                write_json(home / STATE_FILE, state)
            else:
                print(f"{name} exited ({process.returncode}) after {ran:.0f} s: restarting it", flush=True)
                launch(name)
        time.sleep(0.5)

    stop(processes)  # each service's process group: SIGTERM, then SIGKILL after a grace period
    state["services"], state["supervisor"] = {}, None
    write_json(home / STATE_FILE, state)
    return 0


def log_tail(path: str, lines: int = 15) -> str:
    try:
        return "\n    ".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_until_serving(home: Path, settings: dict, urls: dict[str, str], supervisor: subprocess.Popen) -> None:
    """Until every service answers; a DeployError naming the one that failed, with its log's end."""
    checks = {"mlflow": lambda: wait_until_up(urls["mlflow"] + "/health", timeout=1),
              "code-server": lambda: code_server_up(settings["ports"]["code"]),
              "webserver": lambda: wait_until_up(urls["webserver"] + "/server_info", timeout=1),
              "daemon": lambda: True}
    ready: set[str] = set()
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while ready != set(SERVICES):
        state = read_state(home)
        for name, entry in state["services"].items():
            if entry["state"] == "failed" or (not alive(entry) and name not in ready):
                tail = log_tail(entry["log"])
                hint = ("\n  the database schema is older than this version: `scratchllm deploy upgrade`"
                        if re.search(r"out-of-date|out of date|migrat", tail, re.IGNORECASE) else "")
                raise DeployError(f"the {name} exited while starting; the end of {entry['log']}:\n    {tail}{hint}")
            if name not in ready and checks[name]():
                ready.add(name)
        if supervisor.poll() is not None:
            raise DeployError(f"the supervisor exited; see {home / LOG_DIR / 'supervisor.log'}:\n    "
                              + log_tail(str(home / LOG_DIR / "supervisor.log")))
        if time.monotonic() > deadline:
            raise DeployError(f"not every service answered within {START_TIMEOUT_SECONDS} s "
                              f"(waiting for {', '.join(sorted(set(SERVICES) - ready))}); see {home / LOG_DIR}")
        time.sleep(0.5)


# ------------------------------------------------------------------------------------------------
# The subcommands


def up(args: argparse.Namespace) -> int:
    admin_password = os.environ.get(ADMIN_PASSWORD_ENV)
    if not admin_password:
        raise DeployError(f"set {ADMIN_PASSWORD_ENV}: the password of the MLflow server's admin "
                          f"(`{ADMIN_USER}`), set on its first start")
    if len(admin_password) < 12:  # MLflow refuses shorter ones, after the databases were made
        raise DeployError(f"{ADMIN_PASSWORD_ENV}: at least 12 characters (MLflow's rule for the admin's password)")
    if args.config:
        try:
            args.config = str(find_profile(args.config))
        except ConfigError as exc:
            raise DeployError(str(exc)) from None
    db = Database.parse(args.database)
    if db.password is None and os.environ.get("PGPASSWORD"):
        db = dataclasses.replace(db, password=os.environ["PGPASSWORD"])
    home = Path(args.home).resolve()
    if left := running(home):
        raise DeployError(f"{home} is running already ({', '.join(left)}): "
                          f"`scratchllm deploy stop --home {home}` first")
    for name in db.create_databases():
        print(f"scratchllm deploy: created the database {name}", file=sys.stderr)
    if problem := db.mlflow_schema_problem():
        raise DeployError(f"{problem}: back the databases up (pg_dump), then `scratchllm deploy upgrade "
                          f"--database {db.url()} --home {home}` and `up` again")
    (home / LOG_DIR).mkdir(parents=True, exist_ok=True)
    Path(args.artifacts).mkdir(parents=True, exist_ok=True)
    write_text(home / "dagster.yaml", instance_settings(db, args.max_concurrent_runs, args.max_concurrent_trainings))
    write_text(home / "workspace.yaml", workspace_settings(args.code_port))
    write_text(home / "mlflow_auth.ini", auth_settings(db))
    settings = {"home": str(home), "artifacts": str(Path(args.artifacts).resolve()), "config": args.config,
                "host": args.host, "ports": {"dagster": args.dagster_port, "mlflow": args.mlflow_port,
                                             "code": args.code_port}}
    urls = plan(settings, db, admin_password).urls
    write_json(home / STATE_FILE, {"settings": settings, "urls": urls, "database": db.url(), "services": {}})
    # The secrets reach the supervisor (and through it the services) in its environment only.
    env = {**os.environ, ADMIN_PASSWORD_ENV: admin_password, **db.environment()}
    with open(home / LOG_DIR / "supervisor.log", "ab") as out:
        supervisor = subprocess.Popen([sys.executable, "-m", "pipelines.deploy", "supervise", "--home", str(home)],
                                      cwd=home, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=default_signals)
    try:
        wait_until_serving(home, settings, urls, supervisor)
    except (DeployError, KeyboardInterrupt):
        supervisor.terminate()  # it stops what it started
        with contextlib.suppress(subprocess.TimeoutExpired):
            supervisor.wait(timeout=STOP_TIMEOUT_SECONDS + 5)
        stop_deployment(home)
        raise
    print(f"scratchllm deploy: up in {home}\n"
          f"  Dagster UI     {urls['webserver']}  (127.0.0.1 only: no login; see docs/operations.md)\n"
          f"  MLflow         {urls['mlflow']}  (users: admin and whoever the admin adds)\n"
          f"  use it:        DAGSTER_HOME={home} scratchllm run ...  ·  tracking.uri: {urls['mlflow']} "
          f"with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD\n"
          f"  stop:          scratchllm deploy stop --home {home}", file=sys.stderr)
    return 0


def stop_deployment(home: Path) -> list[str]:
    """SIGTERM to the supervisor, which stops every service; whatever is left after a grace period
    (the supervisor itself killed -9, say) is stopped by its recorded process id."""
    state = read_state(home)
    names = sorted(name for name, entry in state["services"].items() if alive(entry))
    supervisor = state.get("supervisor")
    if alive(supervisor):
        os.kill(supervisor["pid"], signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS + 5
        while alive(supervisor) and time.monotonic() < deadline:
            time.sleep(0.2)
    state = read_state(home)
    left = [entry for entry in state["services"].values() if alive(entry)]
    if left:  # unsupervised: each service and what it started, gracefully first, as the supervisor would
        import psutil

        family = []
        for entry in left:
            with contextlib.suppress(psutil.Error):
                service = psutil.Process(entry["pid"])
                family += [service, *service.children(recursive=True)]  # some start sessions of their own
        for process in family:
            with contextlib.suppress(psutil.Error):
                process.terminate()
        _, still = psutil.wait_procs(family, timeout=STOP_TIMEOUT_SECONDS)
        for process in still:
            with contextlib.suppress(psutil.Error):
                process.kill()
    state["services"], state["supervisor"] = {}, None
    write_json(home / STATE_FILE, state)
    return names


def status(args: argparse.Namespace) -> int:
    home = Path(args.home).resolve()
    state = read_state(home)
    if not running(home):
        print(f"scratchllm deploy: nothing runs from {home}", file=sys.stderr)
        return 1
    urls = state.get("urls", {})
    supervised = alive(state.get("supervisor"))
    down = 0 if supervised else 1
    if not supervised:
        print("supervisor   STOPPED  (a service that dies is not restarted: `deploy stop`, then `deploy up`)")
    for name in SERVICES:
        entry = state["services"].get(name)
        now = "running" if alive(entry) else "FAILED" if entry and entry["state"] == "failed" else "STOPPED"
        down += now != "running"
        restarts = f"restarted {entry['restarts']}x" if entry and entry["restarts"] else ""
        print(f"{name:12} {now:8} pid {entry['pid'] if entry else '-':<8} {urls.get(name, ''):24} {restarts}")
    return 0 if down == 0 else 1


def stop_command(args: argparse.Namespace) -> int:
    stopped = stop_deployment(Path(args.home).resolve())
    print(f"scratchllm deploy: stopped {', '.join(stopped) if stopped else 'nothing (none was running)'}",
          file=sys.stderr)
    return 0


def upgrade(args: argparse.Namespace) -> int:
    """The schemas brought up to this version of Dagster and MLflow (the services stopped first)."""
    db = Database.parse(args.database)
    home = Path(args.home).resolve()
    if running(home):
        raise DeployError(f"stop the services first: `scratchllm deploy stop --home {home}`")
    env = {**os.environ, "DAGSTER_HOME": str(home), **db.environment()}
    bin_dir = Path(sys.executable).parent
    for command in ([str(bin_dir / "dagster"), "instance", "migrate"],
                    [str(bin_dir / "mlflow"), "db", "upgrade", db.sqlalchemy_url("_mlflow")]):
        done = subprocess.run(command, env=env)
        if done.returncode != 0:
            raise DeployError(f"{' '.join(command[:3])} failed ({done.returncode}); see its output above")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scratchllm deploy", description="A team deployment: Dagster and MLflow on "
                                                                      "PostgreSQL, runs queued, MLflow with users.")
    sub = p.add_subparsers(dest="command", required=True)
    home_help = "the deployment's directory (DAGSTER_HOME: dagster.yaml, logs, process ids)"
    start = sub.add_parser("up", help="write the settings and start the services")
    start.add_argument("--database", required=True, help="postgresql://USER[:PASSWORD]@HOST:PORT/NAME")
    start.add_argument("--artifacts", required=True, help="where the MLflow server keeps artifacts (shared path)")
    start.add_argument("--home", required=True, help=home_help)
    start.add_argument("--config", help="the profile the deployment's runs use (default: default.yaml)")
    start.add_argument("--dagster-port", type=int, default=3000)
    start.add_argument("--mlflow-port", type=int, default=5000)
    start.add_argument("--code-port", type=int, default=4000)
    start.add_argument("--host", default="127.0.0.1", help="the MLflow server's address (basic auth always on)")
    start.add_argument("--max-concurrent-runs", type=int, default=2)
    start.add_argument("--max-concurrent-trainings", type=int, default=1)
    start.set_defaults(func=up)
    for name, func, text in (("status", status, "the services and whether each runs"),
                             ("stop", stop_command, "stop the services (by their process ids)")):
        command = sub.add_parser(name, help=text)
        command.add_argument("--home", required=True, help=home_help)
        command.set_defaults(func=func)
    migrate = sub.add_parser("upgrade", help="bring the databases' schemas up to this version (services stopped)")
    migrate.add_argument("--database", required=True)
    migrate.add_argument("--home", required=True, help=home_help)
    migrate.set_defaults(func=upgrade)
    supervisor = sub.add_parser("supervise", help=argparse.SUPPRESS)  # started by `up`
    supervisor.add_argument("--home", required=True)
    supervisor.set_defaults(func=lambda args: supervise(Path(args.home)))
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "max_concurrent_runs", 1) < 1 or getattr(args, "max_concurrent_trainings", 1) < 1:
        print("scratchllm deploy: --max-concurrent-runs and --max-concurrent-trainings: at least 1", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except DeployError as exc:
        print(f"scratchllm deploy: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
