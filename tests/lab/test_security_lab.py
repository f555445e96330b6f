"""Security checks on a deployed lab cluster: the app's Redis user, bad input, the password.

Rows of docs/RELIABILITY.md: `acl`, `pickle` and `password` (security checks), `malformed` (a
scenario). conftest runs this file after test_faults, so the password search also covers the
reconnect errors the faults left in the journals.
"""

from __future__ import annotations

import pickle
import re
import subprocess
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from app.connection import TAKING_PREFIX

from .faultkit import (
    LEDGER_PREFIX,
    MARK,
    SERVICE,
    Fleet,
    Report,
    batch_name,
    host_time,
    journal_since,
    wait_until,
)
from .labkit import LOGIN_USER, REPO

pytestmark = pytest.mark.lab


# --------------------------------------------------------------------------- security: Redis


def redis_cli(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    """redis-cli on redis1 as the app's ACL user; the password goes through stdin, never argv."""
    ip = fleet.cluster.lab.ip("redis1")
    user = unquote(urlsplit(fleet.url).username or "default")
    script = ('read -r REDISCLI_AUTH; export REDISCLI_AUTH; '
              f'exec redis-cli --no-auth-warning -h {ip} --user {user} "$@"')
    return fleet.cluster.lab.ssh("redis1", "bash", "-c", script, "redis-cli", *args,
                                 check=False, input=fleet.password + "\n", timeout=30)


def test_app_acl_user_cannot_run_dangerous_commands(fleet: Fleet, report: Report):
    row = report.check("acl", "App ACL user: FLUSHALL, CONFIG, KEYS refused; default user off",
                       "")
    assert redis_cli(fleet, "PING").stdout.strip() == "PONG"
    refused = {}
    for cmd in (["FLUSHALL"], ["CONFIG", "GET", "requirepass"], ["KEYS", "*"],
                ["FLUSHDB"], ["DEBUG", "SLEEP", "0"], ["ACL", "LIST"]):
        out = redis_cli(fleet, *cmd)
        # DEBUG is also off server-wide (enable-debug-command no): either refusal counts.
        text = out.stdout + out.stderr
        refused[" ".join(cmd[:1])] = "NOPERM" in text or "not allowed" in text
    assert all(refused.values()), refused
    # The default user: without credentials nothing is allowed, and it is switched off in the
    # ACL file (a disabled user cannot authenticate even with the right password).
    ip = fleet.cluster.lab.ip("redis1")
    anon = fleet.cluster.on("redis1", "redis-cli", "-h", ip, "PING")
    assert "NOAUTH" in anon.stdout + anon.stderr, anon.stdout
    acl = fleet.cluster.on("redis1", "sh", "-c",
                           "cat /etc/redis/*.acl 2>/dev/null; grep -h '^user ' /etc/redis/*.conf",
                           check=False).stdout
    default = [line for line in acl.splitlines() if line.startswith("user default ")]
    assert default and " off" in default[0] and "nopass" not in default[0], acl
    row["result"] = "refused: " + ", ".join(refused) + "; `user default off`"
    row["passed"] = True


# --------------------------------------------------------------------------- security: input


def kombu_producer(fleet: Fleet):
    from kombu import Connection

    conn = Connection(fleet.url, transport_options=dict(
        fleet.celery.conf.broker_transport_options))
    return conn



class PickleBomb:
    """Unpickling this calls the worker's own Redis (URL from its environment, so no password
    travels in the message) and writes to a ledger key: proof that the code ran."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __reduce__(self):
        code = ("__import__('redis').Redis.from_url(__import__('os').environ"
                f"['CELERY_BROKER_URL']).rpush('{self.key}', 'executed')")
        return (eval, (code,))


def test_pickle_message_is_not_executed(fleet: Fleet, report: Report, monkeypatch):
    row = report.check("pickle", "A pickle message injected into the queue is not executed", "")
    key = LEDGER_PREFIX + batch_name("pickle")
    bomb = pickle.dumps(PickleBomb(key))
    # Control: the payload is live -- unpickling it here writes to Redis. So the assertion
    # below would fail if a worker unpickled it.
    monkeypatch.setenv("CELERY_BROKER_URL", fleet.url)
    pickle.loads(bomb)  # noqa: S301 -- our own payload, the control of this test
    r = fleet.redis()
    assert r.lrange(key, 0, -1) == ["executed"]
    r.delete(key)
    pids = {w: fleet.cluster.main_pid(w) for w in fleet.workers()}
    since = host_time(fleet.cluster)
    task_id = str(uuid.uuid4())
    with kombu_producer(fleet) as conn:
        conn.Producer().publish(
            PickleBomb(key), serializer="pickle", routing_key=fleet.settings.default_queue,
            exchange="", headers={"task": "app.tasks.add", "id": task_id, "lang": "py",
                                  "root_id": task_id, "parent_id": None, "group": None})
    # A good task behind it runs, so the bad one was taken off the queue first.
    batch = batch_name("after-pickle")
    fleet.submit(batch, range(6))
    tally = fleet.wait_batch(batch, range(6), timeout=30)
    assert not tally.lost, tally.lost
    time.sleep(1)
    assert r.lrange(key, 0, -1) == [], "a worker unpickled the message and ran its code"
    assert {w: fleet.cluster.main_pid(w) for w in fleet.workers()} == pids
    logged = "".join(journal_since(fleet.cluster, w, since, "pickle|ContentDisallowed|untrusted")
                     for w in fleet.workers())
    assert logged, "no worker logged the refused pickle message"
    row["result"] = "refused and dropped (accept_content=['json']); logged: " \
        + logged.strip().splitlines()[0][:120]
    row["passed"] = True


def test_malformed_messages_at_scale_are_dropped(fleet: Fleet, report: Report):
    """1,000 bad messages next to 50 good ones: the good ones run, workers stay up, the bad
    ones are logged and dropped (nothing left in the queue or unacked)."""
    pids = {w: fleet.cluster.main_pid(w) for w in fleet.workers()}
    since = host_time(fleet.cluster)
    batch = batch_name("malformed")
    queue = fleet.settings.default_queue
    start = time.monotonic()
    kinds: Counter[str] = Counter()
    with kombu_producer(fleet) as conn:
        producer = conn.Producer()

        def headers(task: str) -> dict[str, Any]:
            task_id = str(uuid.uuid4())
            return {"task": task, "id": task_id, "lang": "py", "root_id": task_id,
                    "parent_id": None, "group": None, "argsrepr": "", "kwargsrepr": ""}

        for i in range(1000):
            kind = ("bad-json", "unknown-task", "wrong-args", "no-headers")[i % 4]
            if kind == "bad-json":
                producer.publish(b'{"not": json', content_type="application/json",
                                 content_encoding="utf-8", routing_key=queue, exchange="",
                                 headers=headers(MARK))
            elif kind == "unknown-task":
                producer.publish([[1, 2], {}, {}], serializer="json", routing_key=queue,
                                 exchange="", headers=headers("app.tasks.no_such_task"))
            elif kind == "wrong-args":
                producer.publish([[1, 2, 3, 4, 5], {}, {}], serializer="json",
                                 routing_key=queue, exchange="", headers=headers(MARK))
            else:
                producer.publish({"garbage": i}, serializer="json", routing_key=queue,
                                 exchange="")
            kinds[kind] += 1
            if i % 20 == 0:
                n = i // 20
                fleet.send(MARK, [batch, n, 0], producer=producer)
    good = range(50)
    tally = fleet.finish(batch, good, timeout=90)
    r = fleet.redis()

    def unhandled() -> int:
        """Messages still queued, staged for a take, or taken and not yet acked."""
        return r.llen(queue) + r.llen(f"{TAKING_PREFIX}{queue}") + r.hlen("unacked")

    # The last good task is the 981st message: up to 19 bad ones follow it, and the workers may
    # still be acking them when it has run.
    wait_until(lambda: unhandled() == 0, 30)
    seconds = time.monotonic() - start
    left = unhandled()
    after = {w: fleet.cluster.main_pid(w) for w in fleet.workers()}
    logged = Counter[str]()
    for w in fleet.workers():
        text = fleet.cluster.on(w, "sh", "-c", f"journalctl -u {SERVICE} --since '{since}' "
                                "--no-pager -o cat", check=False).stdout
        logged["decode"] += len(re.findall(r"decode|Can't decode|DecodeError", text))
        logged["unregistered"] += text.count("unregistered task")
        logged["TypeError"] += len(re.findall(r"TypeError", text))
        logged["unknown message"] += text.count("unknown message")
    row = report.scenario("malformed", "1,000 malformed messages beside 50 good tasks", tally,
                          bad_messages=dict(kinds), recovery_s=round(seconds, 1),
                          recovery_what="all 1,050 handled",
                          held_by="accept_content json; unknown/undecodable messages are "
                                  "acked and logged; task errors stored as FAILURE",
                          logged=dict(logged), left_in_queue=left)
    assert not tally.lost, f"good tasks lost: {tally.lost}"
    assert after == pids, f"a worker restarted: {pids} -> {after}"
    assert left == 0, (f"{left} messages still queued or unacked; queue {r.llen(queue)}, "
                       f"staged {r.llen(f'{TAKING_PREFIX}{queue}')}, unacked: {fleet.unacked()}")
    assert logged["unregistered"] > 0 and logged["decode"] > 0, dict(logged)
    row["passed"] = True


# --------------------------------------------------------------------------- security: secrets


def test_password_in_no_readable_file_log_output_or_git(fleet: Fleet, report: Report,
                                                        tmp_path: Path):
    """After all the faults above (reconnect errors are logged): the Redis password is in no
    file an unprivileged user can read, in no journal, not in `verify.yml -v`, not in git.
    The deploy logged in as a sudo user (LOGIN_USER): its home and Ansible's temp directories
    (its own and root's) hold no copy at all, not even one only they could read."""
    cluster = fleet.cluster
    row = report.check("password", "Redis password: not in world-readable files, journals, "
                       "playbook output (-v) or git history", "")
    assert f"ansible_user={LOGIN_USER}" in cluster.lab.inventory_path.read_text()
    home = cluster.on("redis1", "getent", "passwd", LOGIN_USER, check=True).stdout.split(":")[5]
    temp = f"{home} /root/.ansible /var/tmp /dev/shm"
    dirs = f"/etc /opt /var /home /root /tmp /run /srv /usr/local {temp}"

    def search(host: str) -> dict[str, Any]:
        # grep as `nobody`: exactly the files any local user could read. Pattern via stdin.
        proc = cluster.lab.ssh(
            host, "sh", "-c", f"runuser -u nobody -- grep -rlsF --devices=skip -f - {dirs}",
            check=False, input=fleet.password + "\n", timeout=120)
        # Exit 2 only means some files were unreadable to nobody (-s hides those messages).
        assert proc.returncode in (0, 1, 2), proc.stderr
        # As root: no copy left in the login user's home or a temp dir, whoever could read it.
        private = cluster.lab.ssh(host, "sh", "-c", f"grep -rlsF --devices=skip -f - {temp}",
                                  check=False, input=fleet.password + "\n", timeout=120)
        assert private.returncode in (0, 1, 2), private.stderr
        journal = cluster.lab.ssh(
            host, "sh", "-c", "f=$(mktemp); cat > \"$f\"; journalctl --no-pager -o cat "
            "| grep -cF -f \"$f\"; rm -f \"$f\"", check=False,
            input=fleet.password + "\n", timeout=120)
        return {"readable_files": proc.stdout.split(), "temp_files": private.stdout.split(),
                "journal_lines": int(journal.stdout.strip() or 0)}

    # The hosts are searched at the same time, and verify.yml runs meanwhile: independent
    # reads, so only the wall time changes. (verify.yml's own log lines are not searched:
    # its output is checked below.)
    hosts = ("redis1", *fleet.workers(), "client1")
    with ThreadPoolExecutor(len(hosts) + 1) as pool:
        verifying = pool.submit(cluster.deploy, "-v", playbook="playbooks/verify.yml")
        found = dict(zip(hosts, pool.map(search, hosts), strict=True))
        verify = verifying.result()
    assert verify.rc == 0, verify.out[-3000:]
    pattern = tmp_path / "pattern"
    pattern.write_text(fleet.password + "\n")
    pattern.chmod(0o600)
    revs = subprocess.run(["git", "rev-list", "--all"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout.split()
    in_git = subprocess.run(["git", "grep", "-lF", "-f", str(pattern), *revs], cwd=REPO,
                            capture_output=True, text=True, check=False).stdout.split()
    leaks = {h: v for h, v in found.items()
             if v["readable_files"] or v["temp_files"] or v["journal_lines"]}
    row["result"] = (f"{len(found)} hosts searched ({dirs}) as nobody, journals, verify.yml -v,"
                     f" {len(revs)} commits: " + ("no leak" if not leaks and not in_git
                                                  and fleet.password not in verify.out
                                                  else "LEAK"))
    assert not leaks, leaks
    assert fleet.password not in verify.out, "password printed by verify.yml -v"
    assert not in_git, in_git
    row["passed"] = True

