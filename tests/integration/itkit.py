"""Helpers of the integration tests: a real redis-server, real workers, bounded waits.

Everything runs on loopback: redis-server (the Debian package) on a free port in a temp dir,
workers as `celery -A app worker` subprocesses started from the repository root with the same
environment variables a deployed node gets. Every wait is bounded. Fixtures are in conftest.py;
this module has a name of its own on sys.path (every test directory has a conftest.py).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
USER = "taskfleet"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check, timeout: float, what: str, interval: float = 0.1):
    """Poll `check()` until it returns a truthy value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@dataclass
class RedisServer:
    port: int
    password: str
    admin_password: str
    proc: subprocess.Popen
    log: Path

    def url(self, db: int = 0, user: str = USER, password: str | None = None) -> str:
        return f"redis://{user}:{password or self.password}@127.0.0.1:{self.port}/{db}"

    def admin(self, db: int = 0):
        """A client as the admin user, for the tests' own look-ups (ACL LOG, keys)."""
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, db=db, username="admin",
                           password=self.admin_password, socket_timeout=5)


class CrashableRedis:
    """A redis-server with AOF on, as deployed (`appendfsync always`: every write is on disk
    before Redis answers it), that can be SIGKILLed and restarted."""

    def __init__(self, workdir: Path, fsync: str = "always") -> None:
        self.dir, self.port, self.fsync = workdir, free_port(), fsync
        self.password, self.admin_pw = secrets.token_hex(12), secrets.token_hex(12)
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        argv = [REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(self.port),
                "--dir", str(self.dir), "--save", "", "--appendonly", "yes",
                "--appendfsync", self.fsync, "--logfile", str(self.dir / "redis.log"),
                "--user", "default", "off", "resetkeys", "resetchannels", "~*", "&*", "+@all",
                "--user", USER, "on", f">{self.password}", "~*", "&*", "+@all", "-@dangerous",
                "--user", "admin", "on", f">{self.admin_pw}", "~*", "&*", "+@all"]
        self.proc = subprocess.Popen(argv, cwd=self.dir, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)
        wait_for(self.answers, 15, "redis-server to answer PING")

    def answers(self) -> bool:
        try:
            return bool(self.admin().ping())
        except Exception:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def admin(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, username="admin",
                           password=self.admin_pw, socket_timeout=5)

    def url(self) -> str:
        return f"redis://{USER}:{self.password}@127.0.0.1:{self.port}/0"


def base_env(tmp: Path) -> dict[str, str]:
    """The environment of this process without any Celery/Taskfleet setting, plus an empty
    env file so a developer's ./.env never leaks into a test."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "TASKFLEET_"))}
    empty = tmp / "empty.env"
    empty.write_text("")
    env.update(TASKFLEET_ENV_FILE=str(empty), PYTHONUNBUFFERED="1")
    return env


def node_env(tmp: Path, url: str, **settings: str) -> dict[str, str]:
    return {**base_env(tmp), "CELERY_BROKER_URL": url, **settings}


def client_app(env: dict[str, str]):
    """A Celery app configured from `env` exactly as app/celery.py would be, built in this
    process without touching its os.environ (app.config.get_settings caches per process)."""
    from celery import Celery

    from app.config import celery_settings, read_settings

    client = Celery("tests")
    client.config_from_object(celery_settings(read_settings(env)))
    return client


def run(argv: list[str], env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def run_cli(env: dict[str, str], *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """`python -m app ARGS` from the repository root."""
    return run([sys.executable, "-m", "app", *args], env, timeout)


@dataclass
class Worker:
    name: str  # node name, e.g. w1@myhost
    proc: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill_all(self) -> None:
        """SIGKILL the main process and its pool children (a power cut, for the queue)."""
        with_pgid(self.pid, signal.SIGKILL)
        self.proc.wait(10)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def with_pgid(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


@dataclass
class LocalWorkers:
    """`celery worker` processes started on this machine from the repository, and their env."""

    env: dict[str, str]
    workers: list[Worker] = field(default_factory=list)

    @property
    def nodes(self) -> list[str]:
        return [w.name for w in self.workers]

    def worker(self, node: str) -> Worker:
        return next(w for w in self.workers if w.name == node)


def start_workers(env: dict[str, str], names: list[str], logdir: Path,
                  timeout: float = 45) -> list[Worker]:
    """Start `celery -A app worker` per name, all at once; return when each answers a ping."""
    host = socket.gethostname()
    workers = []
    for name in names:
        log = logdir / f"{name}.log"
        argv = [str(BIN / "celery"), "-A", "app", "worker", "-n", f"{name}@%h",
                "--pool", "prefork", "-c", "2", "-l", "INFO"]
        with log.open("w") as out:
            # Own session: teardown and the kill tests signal the worker with its children.
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        workers.append(Worker(f"{name}@{host}", proc, log))
    client = client_app(env)
    pending = {w.name for w in workers}

    def all_answer() -> bool:
        for w in workers:
            if not w.alive():
                pytest.fail(f"worker {w.name} exited with {w.proc.returncode}:\n"
                            f"{w.log_text()[-3000:]}")
        replies = client.control.ping(destination=sorted(pending), timeout=0.5) or []
        pending.difference_update(node for reply in replies for node in reply)
        return not pending

    try:
        wait_for(all_answer, timeout, f"workers {sorted(pending)} to answer inspect ping", 0.2)
    except BaseException:
        stop_workers(workers)
        raise
    finally:
        client.close()
    return workers


def stop_workers(workers: list[Worker], timeout: float = 15) -> None:
    """Warm shutdown (SIGTERM) for all, then SIGKILL whatever is left after `timeout`."""
    for w in workers:
        if w.alive():  # the main process only: it lets running tasks finish and ack
            w.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for w in workers:
        with contextlib.suppress(subprocess.TimeoutExpired):
            w.proc.wait(max(0.1, deadline - time.monotonic()))
        with_pgid(w.pid, signal.SIGKILL)  # also reaps stray pool children
        if w.alive():
            w.proc.wait(5)
