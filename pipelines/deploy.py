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
HOME/mlflow_auth.ini, and starts four services, each in a session of its own with its log in HOME/logs/:

- the code server (`dagster code-server start`): the code location; runs start from it, with the
  profile of --config and MLflow pointed at the deployment's server;
- the Dagster webserver (the UI, always on 127.0.0.1: it has no login of its own);
- the Dagster daemon: the run queue, schedules, sensors, run monitoring;
- an MLflow tracking server with basic auth (users, an admin, per-experiment and per-model permissions),
  artifacts proxied from --artifacts (clients need no access to that path), bound to --host.

Their process ids go to HOME/deploy.json; `stop` stops them by those ids (and only if each is still the
process that was started). The database password is written nowhere: the services get it as
PGPASSWORD, which libpq reads, and so does whoever opens the instance (DAGSTER_HOME=HOME). The MLflow
admin's password comes from SCRATCHLLM_ADMIN_PASSWORD (refused when unset); the runs use the admin.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
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
from pipelines.ui import default_signals, wait_until_up

ADMIN_PASSWORD_ENV = "SCRATCHLLM_ADMIN_PASSWORD"
ADMIN_USER = "admin"
STATE_FILE = "deploy.json"
SERVICES = ("code-server", "webserver", "daemon", "mlflow")
START_TIMEOUT_SECONDS = 180
STOP_TIMEOUT_SECONDS = 20
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
"""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclasses.dataclass
class Plan:
    """What `up` starts: the command and environment of each service."""

    home: Path
    commands: dict[str, list[str]]
    environments: dict[str, dict[str, str]]
    urls: dict[str, str]


def plan(args: argparse.Namespace, db: Database, admin_password: str) -> Plan:
    home, artifacts = Path(args.home).resolve(), Path(args.artifacts).resolve()
    bin_dir = Path(sys.executable).parent
    mlflow_url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.mlflow_port}"
    # What every service sees: the instance, the database password for libpq, no tracking settings of
    # the shell that ran `deploy up`.
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "PG", "DAGSTER_HOME"))}
    base |= {"DAGSTER_HOME": str(home), **db.environment()}
    dagster_env = base | {"MLFLOW_TRACKING_URI": mlflow_url, "MLFLOW_TRACKING_USERNAME": ADMIN_USER,
                          "MLFLOW_TRACKING_PASSWORD": admin_password}
    if args.config:
        dagster_env[CONFIG_ENV_VAR] = args.config
    allowed_hosts = ",".join(sorted({f"{h}:{args.mlflow_port}" for h in ("127.0.0.1", "localhost", args.host)}))
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
                        "--location-name", "scratchllm", "-h", "127.0.0.1", "-p", str(args.code_port),
                        "--use-python-environment-entry-point"],  # runs start with this python, PATH or not
        "webserver": [str(bin_dir / "dagster-webserver"), "-w", workspace, "-h", "127.0.0.1",
                      "-p", str(args.dagster_port)],
        "daemon": [str(bin_dir / "dagster-daemon"), "run", "-w", workspace],
        "mlflow": [str(bin_dir / "mlflow"), "server", "--app-name", "basic-auth", "--host", args.host,
                   "--port", str(args.mlflow_port), "--workers", "1", "--serve-artifacts",
                   "--artifacts-destination", str(artifacts), "--allowed-hosts", allowed_hosts],
    }
    environments = {"code-server": dagster_env, "webserver": dagster_env, "daemon": dagster_env, "mlflow": mlflow_env}
    urls = {"webserver": f"http://127.0.0.1:{args.dagster_port}", "mlflow": mlflow_url}
    return Plan(home, commands, environments, urls)


# ------------------------------------------------------------------------------------------------
# The services' processes


def read_state(home: Path) -> dict:
    return read_json(home / STATE_FILE, {"services": {}})


def alive(entry: dict) -> bool:
    """Is the process of `entry` still the one `up` started (not a later process with its pid)?"""
    import psutil

    try:
        process = psutil.Process(entry["pid"])
        return process.status() != psutil.STATUS_ZOMBIE and abs(process.create_time() - entry["started"]) < 1.0
    except psutil.Error:
        return False


def start_service(name: str, command: list[str], env: dict[str, str], home: Path) -> dict:
    import psutil

    log = home / "logs" / f"{name}.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(command, cwd=home, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=default_signals)
    return {"pid": process.pid, "started": psutil.Process(process.pid).create_time(), "log": str(log),
            "command": command[:3]}


def stop_services(home: Path, names=SERVICES) -> list[str]:
    """SIGTERM to each service's process group, SIGKILL to what is left after a grace period."""
    state = read_state(home)
    running = {name: entry for name, entry in state["services"].items() if name in names and alive(entry)}
    for entry in running.values():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(entry["pid"], signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    while any(alive(e) for e in running.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    for entry in running.values():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(entry["pid"], signal.SIGKILL)  # the group: what a service started dies with it
    for name in running:
        state["services"].pop(name, None)
    write_json(home / STATE_FILE, state)
    return sorted(running)


def log_tail(entry: dict, lines: int = 15) -> str:
    try:
        text = Path(entry["log"]).read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n    ".join(text)


def code_server_up(port: int) -> bool:
    from dagster._grpc.client import DagsterGrpcClient

    with contextlib.suppress(Exception):
        return DagsterGrpcClient(port=port, host="127.0.0.1").ping("up")["echo"] == "up"
    return False


def wait_for(name: str, entry: dict, ready, timeout: float = START_TIMEOUT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(entry):
            tail = log_tail(entry)
            hint = ("\n  the database schema is older than this version: `scratchllm deploy upgrade`"
                    if re.search(r"out-of-date|out of date|migrat", tail, re.IGNORECASE) else "")
            raise DeployError(f"the {name} exited while starting; the end of {entry['log']}:\n    {tail}{hint}")
        if ready():
            return
        time.sleep(0.5)
    raise DeployError(f"the {name} did not answer within {timeout:.0f} s; see {entry['log']}")


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
    home = Path(args.home).resolve()
    running = [name for name, entry in read_state(home)["services"].items() if alive(entry)]
    if running:
        raise DeployError(f"{home} is running already ({', '.join(running)}): `scratchllm deploy stop --home {home}`")
    for name in db.create_databases():
        print(f"scratchllm deploy: created the database {name}", file=sys.stderr)
    (home / "logs").mkdir(parents=True, exist_ok=True)
    Path(args.artifacts).mkdir(parents=True, exist_ok=True)
    write_text(home / "dagster.yaml", instance_settings(db, args.max_concurrent_runs,
                                                              args.max_concurrent_trainings))
    write_text(home / "workspace.yaml", workspace_settings(args.code_port))
    write_text(home / "mlflow_auth.ini", auth_settings(db))
    services = plan(args, db, admin_password)
    state = {"home": str(home), "urls": services.urls, "database": db.url(), "services": {}}

    def record(name: str) -> dict:
        state["services"][name] = start_service(name, services.commands[name], services.environments[name], home)
        write_json(home / STATE_FILE, state)
        return state["services"][name]

    try:
        mlflow, code = record("mlflow"), record("code-server")  # these two start side by side
        wait_for("code server", code, lambda: code_server_up(args.code_port))
        webserver, daemon = record("webserver"), record("daemon")
        wait_for("MLflow server", mlflow, lambda: wait_until_up(services.urls["mlflow"] + "/health", timeout=1))
        wait_for("Dagster webserver", webserver,
                 lambda: wait_until_up(services.urls["webserver"] + "/server_info", timeout=1))
        wait_for("Dagster daemon", daemon, lambda: True, timeout=0.5)
    except (DeployError, KeyboardInterrupt):
        stop_services(home)
        raise
    print(f"scratchllm deploy: up in {home}\n"
          f"  Dagster UI     {services.urls['webserver']}  (127.0.0.1 only: no login; see docs/operations.md)\n"
          f"  MLflow         {services.urls['mlflow']}  (users: admin and whoever the admin adds)\n"
          f"  use it:        DAGSTER_HOME={home} scratchllm run ...  ·  tracking.uri: {services.urls['mlflow']} "
          f"with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD\n"
          f"  stop:          scratchllm deploy stop --home {home}", file=sys.stderr)
    return 0


def status(args: argparse.Namespace) -> int:
    home = Path(args.home).resolve()
    state = read_state(home)
    if not state["services"]:
        print(f"scratchllm deploy: nothing runs from {home}", file=sys.stderr)
        return 1
    urls = state.get("urls", {})
    down = 0
    for name in SERVICES:
        entry = state["services"].get(name)
        up_now = entry is not None and alive(entry)
        down += not up_now
        where = urls.get(name, "")
        print(f"{name:12} {'running' if up_now else 'STOPPED':8} pid {entry['pid'] if entry else '-':<8} {where}")
    return 0 if down == 0 else 1


def stop(args: argparse.Namespace) -> int:
    home = Path(args.home).resolve()
    stopped = stop_services(home)
    print(f"scratchllm deploy: stopped {', '.join(stopped) if stopped else 'nothing (none was running)'}",
          file=sys.stderr)
    return 0


def upgrade(args: argparse.Namespace) -> int:
    """The schemas brought up to this version of Dagster and MLflow (the services stopped first)."""
    db = Database.parse(args.database)
    home = Path(args.home).resolve()
    if any(alive(entry) for entry in read_state(home)["services"].values()):
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
                             ("stop", stop, "stop the services (by their process ids)")):
        command = sub.add_parser(name, help=text)
        command.add_argument("--home", required=True, help=home_help)
        command.set_defaults(func=func)
    migrate = sub.add_parser("upgrade", help="bring the databases' schemas up to this version (services stopped)")
    migrate.add_argument("--database", required=True)
    migrate.add_argument("--home", required=True, help=home_help)
    migrate.set_defaults(func=upgrade)
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except DeployError as exc:
        print(f"scratchllm deploy: {exc}", file=sys.stderr)
        return 2
