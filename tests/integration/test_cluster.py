"""A client and workers in separate processes, through a real Redis: our CLI, plain Celery
code and Celery's own command line all reach the same workers."""

from __future__ import annotations

import re
import sys
import textwrap
import time

import pytest

from .itkit import BIN, client_app, node_env, run, run_cli, start_workers, stop_workers, wait_for

pytestmark = pytest.mark.integration
CELERY = str(BIN / "celery")


def test_cli_submit_add_wait_prints_30(cluster):
    proc = run_cli(cluster.env, "submit", "add", "10", "20", "--wait")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "30\n", "")


def test_cli_submit_without_wait_prints_the_task_id(cluster):
    proc = run_cli(cluster.env, "submit", "app.tasks.noop")
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(r"[0-9a-f-]{36}\n", proc.stdout)


def test_cli_whoami_names_a_worker(cluster):
    proc = run_cli(cluster.env, "submit", "whoami", "--wait")
    assert proc.returncode == 0, proc.stderr
    assert any(f'"worker": "{node}"' in proc.stdout for node in cluster.nodes)


def test_plain_celery_code_like_run_task(cluster):
    """The seed's run_task.py: import the task, .delay(), .get() -- in its own process."""
    code = textwrap.dedent("""
        from app.tasks import add
        result = add.delay(10, 20).get(timeout=10)
        assert result == 30, result
        print(result)
    """)
    proc = run([sys.executable, "-c", code], cluster.env)
    assert (proc.returncode, proc.stdout) == (0, "30\n"), proc.stderr


def test_celery_own_cli_call_result_and_inspect(cluster):
    celery = CELERY
    call = run([celery, "-A", "app", "call", "app.tasks.add", "--args", "[10, 20]"], cluster.env)
    assert call.returncode == 0, call.stderr
    task_id = call.stdout.strip()
    result = run([celery, "-A", "app", "result", task_id], cluster.env, timeout=20)
    assert (result.returncode, result.stdout.strip()) == (0, "30"), result.stderr
    # `python -m celery` works the same way as the celery script.
    ping = run([sys.executable, "-m", "celery", "-A", "app", "inspect", "ping", "--timeout", "2"],
               cluster.env)
    assert ping.returncode == 0, ping.stderr
    for node in cluster.nodes:
        assert re.search(rf"->\s+{re.escape(node)}: OK", ping.stdout), ping.stdout


def test_batch_spreads_over_both_workers(cluster):
    proc = run_cli(cluster.env, "submit", "sleep", "0.1", "--count", "40", "--wait",
                   "--timeout", "30", timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert re.search(r"submitted 40/40 tasks to queue 'celery' in [\d.]+ s \(\d+ tasks/s\)", out)
    assert re.search(r"done 40, failed 0, no result 0 in [\d.]+ s \(\d+ tasks/s\)", out)
    counts = {node: int(n) for node, n in re.findall(r"^  (\S+)\s+(\d+)$", out, re.M)}
    assert set(counts) == set(cluster.nodes), out
    assert sum(counts.values()) == 40 and min(counts.values()) > 0
    print(f"\nbatch of 40 sleep(0.1): {counts}")


def test_batch_reports_failed_tasks(cluster):
    proc = run_cli(cluster.env, "submit", "add", "1", '"x"', "--count", "3", "--wait")
    assert proc.returncode == 1
    assert "done 0, failed 3, no result 0" in proc.stdout


def test_status_lists_both_workers_and_queue(cluster):
    proc = run_cli(cluster.env, "status", "--timeout", "1")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["NODE", "HOST", "POOL", "CONC", "ACTIVE", "PROCESSED"]
    for node in cluster.nodes:
        row = next(line.split() for line in lines if line.startswith(node + " "))
        assert row[1] == node.split("@")[1] and row[2:4] == ["prefork", "2"]
        assert row[4].isdigit() and row[5].isdigit()
    assert any(line.split() == ["celery", "0"] for line in lines), proc.stdout


@pytest.mark.parametrize("count,batch", [(3, 100), (250, 100), (7, 1)])
def test_status_counts_waiting_messages_in_a_queue_nobody_consumes(cluster, redis_server,
                                                                    count, batch):
    """Every task of a burst reaches Redis: full batches, the last partial one, unbatched."""
    env = {**cluster.env, "TASKFLEET_DEFAULT_QUEUE": "parked"}
    sent = run_cli(env, "submit", "noop", "--count", str(count), "--batch", str(batch))
    assert sent.returncode == 0, sent.stderr
    assert f"submitted {count}/{count} tasks" in sent.stdout
    try:
        proc = run_cli(env, "status", "--timeout", "1")
        assert any(line.split() == ["parked", str(count)] for line in proc.stdout.splitlines()), \
            proc.stdout
    finally:
        redis_server.admin().delete("parked")


def test_ping_expect(cluster):
    ok = run_cli(cluster.env, "ping", "--expect", "2")
    assert ok.returncode == 0, ok.stderr
    for node in cluster.nodes:
        assert f"{node}: pong" in ok.stdout
    assert "2 worker(s) answered" in ok.stdout
    short = run_cli(cluster.env, "ping", "--expect", "3", "--timeout", "1")
    assert short.returncode == 1
    assert short.stderr == ("taskfleet: error: only 2 of the 3 expected workers answered "
                            "within 1 s\n")


def test_ping_named_workers_returns_once_all_answered(cluster):
    start = time.monotonic()
    ok = run_cli(cluster.env, "ping", *(f"--node={n}" for n in cluster.nodes), "--timeout", "20")
    elapsed = time.monotonic() - start
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines() == [f"{n}: pong" for n in sorted(cluster.nodes)] + \
        ["2 worker(s) answered"]
    assert elapsed < 15, f"waited {elapsed:.1f} s although both workers had answered"
    missing = run_cli(cluster.env, "ping", f"--node={cluster.nodes[0]}", "--node=gone@nowhere",
                      "--timeout", "1")
    assert missing.returncode == 1
    assert missing.stderr == ("taskfleet: error: no answer within 1 s from gone@nowhere: on "
                              "its host, systemctl status taskfleet-worker\n")


def test_ping_with_canaries_names_who_ran_each(cluster):
    """verify.yml's one controller command: pings and canaries in one process."""
    queue = cluster.env.get("TASKFLEET_DEFAULT_QUEUE", "celery")
    ok = run_cli(cluster.env, "ping", *(f"--node={n}" for n in cluster.nodes),
                 "--canary", queue, "--timeout", "20")
    assert ok.returncode == 0, ok.stderr
    answered = [line for line in ok.stdout.splitlines() if line.startswith(f"{queue}: ")]
    assert len(answered) == 1, ok.stdout
    node = answered[0].split(" answered by ")[1].split(" on ")[0]
    assert node in cluster.nodes, ok.stdout
    silent = run_cli(cluster.env, "ping", f"--node={cluster.nodes[0]}", "--canary", queue,
                     "--canary", "nobody-listens", "--timeout", "2")
    assert silent.returncode == 1
    assert f"{queue}: answered by " in silent.stdout
    assert silent.stderr == ("taskfleet: error: the canary on queue nobody-listens did not come "
                             "back within 2 s: is its worker consuming it?\n")


def test_a_worker_logs_no_line_per_task_unless_asked(cluster, redis_server, tmp_path):
    """By default neither "Task ... received" nor "... succeeded in" is logged (two lines per
    task, at every rate), a failure still is; TASKFLEET_LOG_TASKS=yes brings both back."""
    client = client_app(cluster.env)
    try:
        good = client.send_task("app.tasks.add", (10, 20))
        bad = client.send_task("app.tasks.add", (1, "x"))
        assert good.get(timeout=20) == 30
        bad.get(timeout=20, propagate=False)
    finally:
        client.close()

    def logs() -> str:
        return "".join(w.log_text() for w in cluster.workers)
    wait_for(lambda: f"app.tasks.add[{bad.id}] raised unexpected: TypeError" in logs(), 10,
             "the failure to be logged")
    assert good.id not in logs() and f"app.tasks.add[{bad.id}] received" not in logs()

    env = node_env(tmp_path, redis_server.url(6), TASKFLEET_LOG_TASKS="yes")
    [worker] = start_workers(env, ["lines"], tmp_path)
    client = client_app(env)
    try:
        good = client.send_task("app.tasks.add", (10, 20))
        assert good.get(timeout=20) == 30
        wait_for(lambda: f"app.tasks.add[{good.id}] succeeded in" in worker.log_text(), 10,
                 "the success line")
        assert f"Task app.tasks.add[{good.id}] received" in worker.log_text()
    finally:
        client.close()
        stop_workers([worker])
