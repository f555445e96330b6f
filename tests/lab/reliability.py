"""Render docs/RELIABILITY.md from the last fault-suite run (.cache/reliability.json).

tests/lab/test_faults.py calls save() and render() when its module ends, so `make test`
refreshes the page. By hand: `.venv/bin/python -m tests.lab.reliability` re-renders the page
from the stored results.
"""

from __future__ import annotations

import json
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / ".cache" / "reliability.json"
PAGE = REPO / "docs" / "RELIABILITY.md"

# Table order; a scenario missing from the last run keeps its previous row (marked stale).
SCENARIOS = ["crash", "hang", "redis-kill", "partition", "rolling", "scale-in", "redis-reboot",
             "malformed"]
CHECKS = ["acl", "password", "pickle"]


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("celery", "kombu", "redis", "ansible-core"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "?"
    return out


def save(scenarios: dict[str, dict], security: dict[str, dict], settings: dict[str, Any],
         path: Path = RESULTS) -> dict:
    """Merge this run's rows into the results file (rows of tests not run are kept, marked
    with the run they came from)."""
    now = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    old = json.loads(path.read_text()) if path.exists() else {}
    data = {"run": now, "versions": _versions(), "settings": settings,
            "scenarios": old.get("scenarios", {}), "security": old.get("security", {})}
    for key, row in scenarios.items():
        data["scenarios"][key] = row | {"run": now}
    for key, row in security.items():
        data["security"][key] = row | {"run": now}
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return data


def _num(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value}{unit}"


def _ordered(rows: dict[str, dict], order: list[str]) -> list[tuple[str, dict]]:
    keys = [k for k in order if k in rows] + sorted(k for k in rows if k not in order)
    return [(k, rows[k]) for k in keys]


def _details(key: str, row: dict) -> str:
    """One line of scenario-specific facts from the stored row."""
    facts = []
    if "bound_s" in row:
        facts.append(f"bound {row['bound_s']} s")
    if row.get("hosts"):
        facts.append("ran on " + ", ".join(f"{h} {n}" for h, n in row["hosts"].items()))
    if key == "redis-kill":
        facts.append(f"Redis back after {row.get('redis_back_s')} s")
        facts.append(f"workers consuming again after {row.get('workers_resumed_s')} s")
        facts.append(f"whole batch done {row.get('batch_done_s')} s after the kill")
        facts.append(f"{row.get('failed_submissions', 0)} submissions refused during the outage")
        cli = row.get("cli") or {}
        facts.append(f"CLI `submit --count {cli.get('count', '?')}`: {cli.get('accepted')} "
                     f"accepted, {cli.get('ran')} ran, exit {cli.get('exit')}")
        if row.get("workers_restarted"):
            facts.append(f"restarted by systemd: {row['workers_restarted']}")
    if key == "partition":
        facts.append(f"worker1's held tasks ran elsewhere after {row.get('held_elsewhere_s')} s")
        facts.append("worker1 process restarted" if row.get("restarted")
                     else "same worker process (no restart)")
    if key == "hang":
        facts.append(f"WatchdogSec {row.get('watchdog')}, fired after "
                     f"{row.get('watchdog_fired_s')} s")
        facts.append("the hung process's Python stack is in the journal"
                     if row.get("stack_in_journal") else "no Python stack in the journal")
    if key == "rolling":
        facts.append(f"overlapping restarts: {row.get('restarts_overlap') or 'none'}")
        facts.append(f"fewest workers answering a ping during the deploy: "
                     f"{row.get('min_workers_answering')}")
        facts.append(f"new code answered on every worker: {row.get('new_code')}")
    if key == "scale-in":
        facts.append(f"service after the drain: {row.get('service_after')}")
        facts.append(f"messages left in host.worker3: {row.get('host_queue_left')}")
        facts.append(f"firewall still admits worker3: {row.get('firewall_admits')}")
    if key == "redis-reboot":
        facts.append(f"Redis back after {row.get('redis_back_s')} s; "
                     f"{row.get('queued_survived')}/10 pinned tasks survived")
    if key == "malformed":
        facts.append(f"bad messages {row.get('bad_messages')}; logged {row.get('logged')}; "
                     f"left in queue {row.get('left_in_queue')}")
    if row.get("lost_numbers"):
        facts.append(f"lost numbers {row['lost_numbers']}")
    if row.get("duplicated_numbers"):
        facts.append(f"duplicated {row['duplicated_numbers']} (number: runs)")
    return "; ".join(str(f) for f in facts)


def markdown(data: dict) -> str:
    s = data.get("settings", {})
    v = data.get("versions", {})
    lines = [
        "# Reliability",
        "",
        "<!-- Generated by tests/lab/reliability.py from .cache/reliability.json; do not edit."
        " -->",
        "",
        "What happens to tasks when parts of a Taskfleet cluster fail, measured by the fault "
        "suite (`tests/lab/test_faults.py`, part of `make test`) on a lab cluster deployed by "
        "`ansible-playbook deploy.yml`: redis1, three workers (Debian 12 and 13), client1.",
        "",
        f"Last run: {data.get('run')} — celery {v.get('celery')}, kombu {v.get('kombu')}, "
        f"redis-py {v.get('redis')}, ansible-core {v.get('ansible-core')}; suite time "
        f"{s.get('suite_seconds')} s. Lab settings (short, so recovery fits in CI): hard time "
        f"limit {s.get('task_time_limit')} s, soft {s.get('task_soft_time_limit')} s, "
        f"visibility timeout {s.get('visibility_timeout')} s, prefetch multiplier "
        f"{s.get('worker_prefetch_multiplier')}.",
        "",
        "Every scenario submits a numbered batch of `app.tasks.mark` tasks. Each run of `mark` "
        "appends `<n>@<host>@<time>` to the Redis list `taskfleet:ledger:<batch>`, so **lost** "
        "counts numbers that never ran and **duplicated** counts numbers that ran more than "
        "once (both are reported, never hidden).",
        "",
        "## Faults",
        "",
        "| Scenario | Tasks submitted | Lost | Duplicated | Time to recover | What made it hold "
        "| Result |",
        "|---|---:|---:|---:|---|---|---|",
    ]
    for key, row in _ordered(data.get("scenarios", {}), SCENARIOS):
        stale = "" if row.get("run") == data.get("run") else f" (run {row.get('run')})"
        rec = _num(row.get("recovery_s"), " s")
        if row.get("recovery_what"):
            rec += f" ({row['recovery_what']})"
        lines.append(
            f"| {row.get('title', key)} | {_num(row.get('submitted'))} | {_num(row.get('lost'))}"
            f" | {_num(row.get('duplicated'))} | {rec} | {row.get('held_by', '')} | "
            f"{'pass' if row.get('passed') else '**FAIL**'}{stale} |")
    lines += ["", "Details of the last run:", ""]
    for key, row in _ordered(data.get("scenarios", {}), SCENARIOS):
        lines.append(f"- **{key}**: {_details(key, row)}")
    lines += [
        "",
        "## Security checks",
        "",
        "| Check | Result | Pass |",
        "|---|---|---|",
    ]
    for key, row in _ordered(data.get("security", {}), CHECKS):
        lines.append(f"| {row.get('title', key)} | {row.get('result', '')} | "
                     f"{'pass' if row.get('passed') else '**FAIL**'} |")
    lines += ["", GUIDANCE.format(vt=s.get("visibility_timeout"),
                                   sweep=s.get("unacked_restore_interval", "?"),
                                   watchdog=s.get("watchdog_sec", "?")), "",
              *production_table(s)]
    return "\n".join(lines).rstrip() + "\n"


GUIDANCE = """\
## How each guarantee works

- **A worker host dies** (power loss, kernel panic, SIGKILL). Tasks are acknowledged only after
  they ran (`task_acks_late`), so the messages the dead worker held stay in Redis' `unacked`
  hash. After the **visibility timeout** any live worker's periodic sweep (kombu
  `restore_visible`, every `unacked_restore_interval` = timeout / 10, throttle 1) puts them back
  in their queue. Time to recover is therefore *visibility timeout + sweep interval + the task's
  own run time*: {vt} s + {sweep} s + 2 s in the lab. The sweep's lock key expires after 30 s
  (kombu's default is 300 s: a Redis restart in the middle of a sweep can leave it behind,
  kept in the AOF, and hold every sweep back for 5 minutes; two tasks of the Redis-reboot
  scenario still missing at the end of its window once point to it). A worker that is only
  *stopped* (deploy, scale-in, `systemctl stop`) requeues what it holds at once: its warm
  shutdown closes the channel, which restores its unacked messages.
- **Redis dies** (`SIGKILL`, OOM kill). systemd restarts it (`Restart=always`); the append-only
  file (`appendonly yes`, `appendfsync everysec`) replays every write that reached the kernel,
  so a process crash loses nothing a client saw accepted (a power loss of the Redis host can
  lose the last second). Workers notice the dead connection (`socket_timeout`, `socket_keepalive`,
  `health_check_interval` 10 s, kombu 5.7's BRPOP health check) and reconnect by themselves
  (`broker_connection_retry`); running tasks are cancelled on connection loss
  (`worker_cancel_long_running_tasks_on_connection_loss`) and run again after the visibility
  timeout. Celery's old "worker stops consuming after a Redis restart" bugs (celery#8091,
  celery#9054, fixed by kombu#2007 in kombu 5.4) are checked on the pinned versions on every run.
- **A worker that hangs** (alive, but its main process no longer loops) would hold its host's
  queue forever: systemd sees it running, so `Restart=` never fires. The worker pings
  systemd's watchdog from its event loop (`app/systemd.py`, a worker bootstep in
  `app/celery.py`); the unit's `WatchdogSec` (`celery_worker_watchdog_sec`, 60 s; {watchdog} in
  the lab) aborts and restarts a worker that stops pinging, and what it held runs again
  after the visibility timeout. The fault suite freezes a worker with `SIGSTOP` to prove it.
- **Four bugs found here, and what holds against them.** (1) Redis 7.0/8.0 replay MULTI/EXEC
  from the AOF as the `default` user and re-check its ACL (redis#14541, valkey#3983): with
  `user default off -@all` every transaction — kombu's unacked bookkeeping, results, the
  ledger — vanished on restart and accepted tasks were lost. The role now writes
  `user default off ~* &* +@all`: nobody can log in as `default`, the replay keeps everything.
  (2) kombu 5.7 sometimes crashes the worker's main process while closing the dead connection
  (`Unrecoverable error: AttributeError: 'NoneType' object has no attribute 'hostname'`, the
  kombu#582 family); the worker unit's `Restart=always` (`celery_worker_restart_sec`, 5 s)
  brings it back, so the worker consumes again within seconds without anyone acting. The
  table's redis-kill details list the workers systemd restarted. (3) kombu takes a message
  with BRPOP and records it as unacked in a second round trip; when Redis died between the two
  the record failed, kombu dropped the message it held, and the restarted Redis had it nowhere
  (about one task per three SIGKILLs under fast consumption). `app/transport.py` (kombu's Redis
  transport with that record retried until Redis is back, `broker_transport` in app/config.py)
  closes it; `tests/integration/test_redis_crash.py` kills a real Redis three times during
  3,000 tasks and finds none lost (it found one lost per run without the fix). The same
  loss had a second door, seen once in the lab's Redis-kill scenario ("1418 accepted, 1417
  ran", two workers restarted): while a worker reconnects, kombu closes the old channel and
  first reads a BRPOP reply still in flight, which can deliver one more message when the
  channel has no connection left to record it with (the `AttributeError` of (2)). That record
  is now written on a connection of its own (`test_redis_crash.py` reproduces the state with a
  real Redis). (4) A pool
  child killed at its hard time limit while the worker was cut off from Redis left a partial
  message in the pool's result pipe; the main process died with `Unrecoverable error:
  UnpicklingError` and its shutdown then blocked for good reading that pipe, still "running"
  for systemd (the partition scenario caught it: worker1 never consumed again). The watchdog
  above restarts such a worker.
- **Clients** see a refused publish as an error: `taskfleet submit --count N` prints
  `submitted k/N` and `N-k submissions failed` with the first error, and exits 1.
- **Network partition** of a worker: its connection is dropped by the socket timeout and health
  checks, it retries until the network is back (a worker still cut off after `WatchdogSec` is
  restarted by systemd and waits for Redis as it starts); what it held runs elsewhere after the
  visibility timeout.
- **Rolling update**: the worker play runs with `serial: 1`; each worker gets TERM (warm
  shutdown: finish running tasks, requeue reserved ones) with a stop timeout longer than the
  hard time limit, so no task is killed mid-run and at least two workers always consume.
- **Scale in**: `playbooks/remove-worker.yml` stops the worker's consumers, lets it finish and
  stops the service; removing it from the inventory and deploying again closes the firewall.
- **Bad input**: only JSON is accepted (`accept_content = ["json"]`); pickle and undecodable
  messages, unknown task names and headerless messages are logged by the worker and dropped
  (acknowledged); a task called with wrong arguments fails with `TypeError`, stored as its
  result. None of them stops a worker.

## Recommended production values
"""

# (setting and role variable, lab value, production value, why)
PRODUCTION = [
    ("`taskfleet_task_time_limit` (hard limit)", "{hard} s", "longest task x 2, e.g. 300 s",
     "The pool kills a task past it, so it bounds how long a message can be held."),
    ("`taskfleet_task_soft_time_limit`", "{soft} s", "hard - 30 s",
     "The task gets `SoftTimeLimitExceeded` first and can clean up."),
    ("`taskfleet_visibility_timeout`", "{vt} s", "3600 s, always > the hard limit",
     "Redis has no real acks: a message unacked for longer is handed out again, so a value "
     "below the longest task runs it twice *while it still runs*. It is also how long the "
     "tasks of a crashed worker wait: the price of a high value. The app refuses a value at "
     "or below the hard limit."),
    ("worker prefetch multiplier", "1", "1",
     "A crashed worker strands at most one message per process; idle workers never starve."),
    ("`health_check_interval`, `socket_timeout`, `socket_keepalive` (app/config.py)",
     "10 s, 5 s, on", "same",
     "Dead TCP connections (Redis restart, partition, NAT timeout) are noticed in seconds."),
    ("Redis `appendonly` / `appendfsync`", "yes / everysec", "yes / everysec",
     "Queued tasks survive a Redis restart or reboot; `always` if losing the last second on "
     "a power cut matters more than throughput."),
    ("Redis `maxmemory-policy`", "noeviction", "noeviction",
     "Eviction would silently delete queues."),
    ("Redis unit `Restart=`", "always", "always", "A killed Redis is back within seconds."),
    ("`celery_worker_watchdog_sec` (unit `WatchdogSec`)", "{watchdog}", "60 s",
     "A worker whose event loop stops is restarted; a Redis outage longer than this restarts "
     "workers too (they wait for Redis as they start)."),
    ("Worker unit `TimeoutStopSec`", "> hard limit", "> hard limit",
     "A warm shutdown is never cut short by SIGKILL."),
]


def production_table(settings: dict[str, Any]) -> list[str]:
    values = {"hard": settings.get("task_time_limit"), "soft": settings.get("task_soft_time_limit"),
              "vt": settings.get("visibility_timeout"), "watchdog": settings.get("watchdog_sec")}
    lines = ["| Setting (role variable) | Lab | Production | Why |", "|---|---|---|---|"]
    for name, lab, prod, why in PRODUCTION:
        lines.append(f"| {name} | {lab.format(**values)} | {prod} | {why} |")
    return lines


def render(results: Path = RESULTS, page: Path = PAGE) -> Path:
    page.parent.mkdir(exist_ok=True)
    page.write_text(markdown(json.loads(results.read_text())))
    return page


if __name__ == "__main__":
    print(render())
