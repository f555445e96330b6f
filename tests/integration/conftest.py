"""Fixtures of the integration tests: a redis-server with the production ACL, real workers.

Helpers (starting workers, bounded waits, running the CLI) are in itkit.py.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .itkit import (
    REDIS_SERVER,
    USER,
    LocalWorkers,
    RedisServer,
    free_port,
    node_env,
    start_workers,
    stop_workers,
    wait_for,
)


@pytest.fixture(scope="session", autouse=True)
def no_celery_env():
    """Celery reads CELERY_BROKER_URL / CELERY_RESULT_BACKEND from os.environ before its own
    configuration, so the clients these tests build in-process must not see any left there
    (by the caller's shell or the unit tests' fixtures)."""
    mp = pytest.MonkeyPatch()
    for name in list(os.environ):
        if name.startswith(("CELERY_", "TASKFLEET_")):
            mp.delenv(name)
    yield
    mp.undo()


@pytest.fixture(scope="session")
def redis_server(no_celery_env, tmp_path_factory) -> Iterator[RedisServer]:
    if not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    workdir = tmp_path_factory.mktemp("redis")
    port, password, admin_pw = free_port(), secrets.token_hex(12), secrets.token_hex(12)
    log = workdir / "redis.log"
    argv = [
        REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(workdir),
        "--save", "", "--appendonly", "no", "--logfile", str(log),
        # The production ACL: no default user; the app's user gets every command except the
        # @dangerous ones (KEYS, FLUSHALL, CONFIG, DEBUG, ...). Celery 5.7 / kombu 5.7 need none
        # of them: test_security checks ACL LOG for denied commands after the whole suite.
        "--user", "default", "off",
        "--user", USER, "on", f">{password}", "~*", "&*", "+@all", "-@dangerous",
        # Only the tests use this one (ACL LOG is @dangerous).
        "--user", "admin", "on", f">{admin_pw}", "~*", "&*", "+@all",
    ]
    proc = subprocess.Popen(argv, cwd=workdir, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    server = RedisServer(port, password, admin_pw, proc, log)

    def answers() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"redis-server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            return bool(server.admin().ping())
        except Exception:
            return False

    wait_for(answers, 10, "redis-server to answer PING")
    yield server
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@pytest.fixture(scope="session")
def cluster(redis_server, tmp_path_factory) -> Iterator[LocalWorkers]:
    """Two workers (w1, w2) on database 0 with the default settings."""
    tmp = tmp_path_factory.mktemp("cluster")
    env = node_env(tmp, redis_server.url(0))
    c = LocalWorkers(env, start_workers(env, ["w1", "w2"], tmp))
    yield c
    stop_workers(c.workers)
