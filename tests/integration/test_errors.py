"""Every mistake a user can make gives one clear line and a non-zero exit, fast."""

from __future__ import annotations

import socket
import time

import pytest

from .itkit import free_port, node_env, run_cli

pytestmark = pytest.mark.integration
LIMIT = 15  # seconds: no retry loop may hide behind an error


def check(env, args, code, message):
    start = time.monotonic()
    proc = run_cli(env, *args, timeout=LIMIT + 5)
    took = time.monotonic() - start
    assert proc.returncode == code, proc.stderr
    assert proc.stderr == f"taskfleet: error: {message}\n"
    assert "Traceback" not in proc.stdout + proc.stderr
    assert took < LIMIT, f"took {took:.1f} s"
    return proc


@pytest.mark.parametrize(("args", "message"), [
    (("submit", "nope", "1"),
     "unknown task 'nope'; known tasks: add, beat_tick, cpu, mark, noop, sleep, whoami"),
    (("submit", "add", "10"),
     "wrong arguments for add: missing a required argument: 'y'; usage: add(x, y)"),
    (("submit", "add", "1", "2", "--kwargs", "{not json"),
     "--kwargs is not valid JSON (Expecting property name enclosed in double quotes at "
     """character 1): pass an object, e.g. --kwargs '{"seconds": 2}'"""),
])
def test_bad_input(cluster, args, message):
    check(cluster.env, args, 2, message)


def test_broker_unreachable(redis_server, tmp_path):

    port = free_port()  # nothing listens there: connection refused
    env = node_env(tmp_path, f"redis://taskfleet:pw-not-shown@127.0.0.1:{port}/0")
    for args in (("submit", "add", "10", "20", "--wait"), ("status",)):
        proc = check(env, args, 1,
                     f"cannot reach Redis at 127.0.0.1:{port} (Error 111 connecting to "
                     f"127.0.0.1:{port}. Connection refused): check CELERY_BROKER_URL and the "
                     "firewall")
        assert "pw-not-shown" not in proc.stdout + proc.stderr


def test_broker_that_never_answers(tmp_path):
    """A port that accepts TCP but never replies (a hung server or a middlebox): the CLI gives
    up after TASKFLEET_CONNECT_TIMEOUT instead of waiting forever."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshake; nobody ever reads or writes
        port = silent.getsockname()[1]
        env = node_env(tmp_path, f"redis://taskfleet:pw@127.0.0.1:{port}/0",
                       TASKFLEET_CONNECT_TIMEOUT="1")
        check(env, ("ping",), 1,
              f"no answer from Redis at 127.0.0.1:{port} within 1 s: check CELERY_BROKER_URL "
              "and the firewall (TASKFLEET_CONNECT_TIMEOUT sets this limit)")


def test_result_backend_unreachable_with_wait(redis_server, tmp_path):

    port = free_port()
    env = node_env(tmp_path, redis_server.url(0),
                   CELERY_RESULT_BACKEND=f"redis://127.0.0.1:{port}/0")
    check(env, ("submit", "add", "1", "2", "--wait"), 1,
          f"cannot reach Redis at 127.0.0.1:{port} (Error 111 connecting to 127.0.0.1:{port}. "
          "Connection refused): check CELERY_RESULT_BACKEND and the firewall")


def test_wrong_password(redis_server, tmp_path):

    env = node_env(tmp_path, redis_server.url(0, password="wrong-secret"))
    proc = check(env, ("submit", "add", "10", "20", "--wait"), 1,
                 f"Redis at 127.0.0.1:{redis_server.port} refused the password for user "
                 "'taskfleet': check the user and password in CELERY_BROKER_URL")
    assert "wrong-secret" not in proc.stdout + proc.stderr


def test_no_password(redis_server, tmp_path):

    env = node_env(tmp_path, f"redis://127.0.0.1:{redis_server.port}/0")
    check(env, ("ping",), 1,
          f"Redis at 127.0.0.1:{redis_server.port} requires a password: put user:password@ "
          "in CELERY_BROKER_URL")


def test_acl_denied(redis_server, tmp_path):
    """A user that may log in but not run commands (a wrong ACL on the Redis host)."""

    admin = redis_server.admin()
    admin.acl_setuser("locked", enabled=True, passwords=["+locked-pw"], commands=["-@all"])
    try:
        env = node_env(tmp_path, f"redis://locked:locked-pw@127.0.0.1:{redis_server.port}/0")
        check(env, ("ping",), 1,
              f"Redis at 127.0.0.1:{redis_server.port} denied user 'locked' the PING command "
              "(ACL): give the user the commands Celery needs, or fix the user in "
              "CELERY_BROKER_URL")
    finally:
        admin.acl_deluser("locked")


def test_config_error(redis_server, tmp_path):

    env = node_env(tmp_path, redis_server.url(0), TASKFLEET_HEARTBEAT_INTERVAL="2",
                   TASKFLEET_DEAD_AFTER="5")
    check(env, ("submit", "add", "1", "2"), 2,
          "configuration: invalid TASKFLEET_DEAD_AFTER='5': must be at least 3 x "
          "TASKFLEET_HEARTBEAT_INTERVAL (6 s), so a worker that misses one heartbeat is not "
          "taken for dead")


def test_wait_timeout_when_no_worker_consumes(cluster, redis_server):
    env = {**cluster.env, "TASKFLEET_DEFAULT_QUEUE": "nobody-listens"}
    try:
        proc = run_cli(env, "submit", "add", "1", "2", "--wait", "--timeout", "1")
        assert proc.returncode == 1
        assert proc.stderr.startswith("taskfleet: error: no result for task ")
        assert proc.stderr.endswith(" after 1 s: are workers running and consuming queue "
                                    "'nobody-listens'? (python -m app ping)\n")
    finally:
        redis_server.admin().delete("nobody-listens")
