"""The monitoring tier on a small lab of its own: redis1 doubling as the monitoring host, and
worker1. Deployed by deploy.yml with a [monitoring] group (its own inventory file beside the
lab's hosts.ini) and short alert timings (group_vars, below), then:
every target up; tasks queued for a stopped worker's host queue show as that queue's depth,
and the oldest age grows (the queue-depth graph is screenshotted for docs/MONITORING.md); a
crashed worker host raises TaskfleetWorkerDown within the documented time and it clears after
`lab start`; the exporters' ports answer the monitoring host only; promtool's unit tests of the
alert rules pass on the monitoring host; bad input is refused before any change; a rerun of
the tier changes nothing; emptying the group removes the tier.
TASKFLEET_TEST_MON_LAB / TASKFLEET_TEST_MON_SUBNET choose another lab.
"""

from __future__ import annotations

import os
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator

import pytest

from ..integration.itkit import wait_for
from .labkit import REPO, DeployedLab, new_lab, record_timing
from .operatekit import screenshot

pytestmark = pytest.mark.lab
MON_LAB = os.environ.get("TASKFLEET_TEST_MON_LAB", "cimon")
MON_SUBNET = os.environ.get("TASKFLEET_TEST_MON_SUBNET", "10.86.0.0/24")
# Scrapes and rule evaluations every 2 s, a worker down for 6 s fires: TaskfleetWorkerDown is
# documented to fire within scrape interval + for + evaluation interval (+ the scrape's own
# timeout, capped at the interval) = 12 s after the crash; the test allows 20 s.
SCRAPE, WORKER_DOWN_FOR = 2, 6
ALERT_BOUND = 20
GROUP_VARS = f"""\
# Written by tests/lab/test_monitoring.py: the monitoring tier with short timings.
monitoring_scrape_interval: {SCRAPE}s
monitoring_evaluation_interval: {SCRAPE}s
monitoring_alert_worker_down_for: {WORKER_DOWN_FOR}s
monitoring_alert_target_down_for: {WORKER_DOWN_FOR}s
"""
PROMETHEUS = 9090


@pytest.fixture(scope="module")
def mon() -> Iterator[DeployedLab]:
    lab = new_lab(MON_LAB, MON_SUBNET)
    start = time.monotonic()
    try:
        lab.up(redis=1, workers=1)
        inventory = lab.inventory_path.parent
        (inventory / "group_vars").mkdir(exist_ok=True)
        (inventory / "group_vars" / "all.yml").write_text(GROUP_VARS)
        (inventory / "monitoring.ini").write_text(
            "# Written by tests/lab/test_monitoring.py\n[monitoring]\nredis1\n")
        cluster = DeployedLab(lab)
        run = cluster.deploy()
        record_timing("monitoring lab: up + cold deploy (2 hosts)", time.monotonic() - start)
        assert run.rc == 0, cluster.explain(run)
        yield cluster
    finally:
        record_timing("monitoring lab: whole module", time.monotonic() - start)
        if not os.environ.get("TASKFLEET_KEEP_LAB"):
            lab.down()


def api(cluster: DeployedLab, path: str, **params: str):
    """GET the API of the Prometheus on redis1 (the lab's monitoring host)."""
    return cluster.prometheus("redis1", path, **params)


def value(cluster: DeployedLab, expr: str) -> float | None:
    result = api(cluster, "query", query=expr)["result"]
    return float(result[0]["value"][1]) if result else None


def firing(cluster: DeployedLab, name: str) -> list[dict]:
    return [a for a in api(cluster, "alerts")["alerts"]
            if a["labels"]["alertname"] == name and a["state"] == "firing"]


def connects(cluster: DeployedLab, host: str, port: int) -> bool:
    probe = ("import socket,sys\ns=socket.socket(); s.settimeout(1)\n"
             f"sys.exit(0 if s.connect_ex(('{cluster.lab.ip('redis1')}', {port})) == 0 else 1)\n")
    return cluster.on(host, "python3", "-c", probe, timeout=20).returncode == 0


def test_every_target_is_up(mon: DeployedLab):
    expected = {("node", "redis1"), ("node", "worker1"), ("prometheus", "redis1"),
                ("redis", "redis1"), ("taskfleet", "redis1"), ("taskfleet_worker", "worker1")}

    def all_up():
        targets = api(mon, "targets")["activeTargets"]
        found = {(t["labels"]["job"], t["labels"]["host"]): t["health"] for t in targets}
        return found if set(found) == expected and set(found.values()) == {"up"} else None

    wait_for(all_up, 30, "every target up", 0.5)
    assert value(mon, 'redis_up{host="redis1"}') == 1  # its ACL user may do what it needs
    assert value(mon, "taskfleet_redis_up") == 1


def test_exporters_answer_the_monitoring_host_only(mon: DeployedLab):
    """worker1 (an inventory host, not the monitoring host) is refused every exporter port of
    redis1, and Prometheus's; redis1 itself (loopback aside, by its own address) gets them."""
    for port in (9100, 9121, 9808, PROMETHEUS):
        assert not connects(mon, "worker1", port), port
    assert connects(mon, "redis1", 9808)
    conf = mon.on("redis1", "cat", "/etc/prometheus/prometheus.yml", check=True).stdout
    password = (mon.inventory / ".secrets" / "redis_exporter_password").read_text().strip()
    assert password not in conf and "password" not in conf.lower()


def test_queue_of_a_stopped_worker_shows_depth_and_a_growing_age(mon: DeployedLab):
    mon.on("worker1", "systemctl", "stop", "taskfleet-worker", check=True)
    try:
        sent = mon.app("submit", "whoami", "--count", "5", "--queue", "host.worker1")
        assert sent.returncode == 0, sent.stderr
        depth = 'taskfleet_queue_messages{queue="host.worker1"}'
        age = 'taskfleet_queue_oldest_message_age_seconds{queue="host.worker1"}'
        wait_for(lambda: value(mon, depth) == 5, 20, "a depth of 5 in Prometheus", 0.5)
        first = wait_for(lambda: value(mon, age), 10, "an age", 0.5)
        time.sleep(3 * SCRAPE)
        later = value(mon, age)
        assert later is not None and later >= first + 2 * SCRAPE, (first, later)
        sent = mon.app("submit", "whoami", "--count", "10", "--queue", "host.worker1")
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: value(mon, depth) == 15, 20, "a depth of 15", 0.5)
        time.sleep(2 * SCRAPE)
        graph = urllib.parse.urlencode({"g0.expr": "taskfleet_queue_messages", "g0.tab": "0",
                                        "g0.range_input": "1m"})
        screenshot(f"http://{mon.lab.ip('redis1')}:{PROMETHEUS}/classic/graph?{graph}",
                   REPO / "docs" / "monitoring-queue-depth.png")
    finally:
        mon.on("worker1", "systemctl", "start", "taskfleet-worker", check=True)
    wait_for(lambda: value(mon, depth) == 0, 30, "the queue drained by the restarted worker", 0.5)
    succeeded = 'sum(taskfleet_tasks_succeeded_total{task="app.tasks.whoami"})'
    # An empty queue is not yet 15 results counted: a task may still run, and Prometheus reads
    # the counters only every SCRAPE s. Wait for all 15 (the last reading in the failure).
    seen: list[float | None] = [None]

    def counted() -> bool:
        seen[0] = value(mon, succeeded)
        return seen[0] is not None and seen[0] >= 15
    try:
        wait_for(counted, 20, "the worker's success counter to reach 15", 0.5)
    except pytest.fail.Exception as exc:
        pytest.fail(f"{exc}: last {seen[0]}")


def test_a_crashed_worker_host_raises_the_alert_and_it_clears(mon: DeployedLab):
    # The worker the test above stopped fired it too; it clears once the worker answers again.
    wait_for(lambda: not firing(mon, "TaskfleetWorkerDown"), 30, "no worker-down alert", 0.5)
    crashed = time.monotonic()
    mon.lab.crash("worker1")
    try:
        alerts = wait_for(lambda: firing(mon, "TaskfleetWorkerDown"), ALERT_BOUND + 10,
                      "TaskfleetWorkerDown firing", interval=0.5)
        took = time.monotonic() - crashed
        print(f"\n[monitoring] TaskfleetWorkerDown fired {took:.1f} s after the crash")
        assert took <= ALERT_BOUND, took
        assert alerts[0]["labels"]["host"] == "worker1", alerts
    finally:
        mon.lab.start("worker1")
    wait_for(lambda: not firing(mon, "TaskfleetWorkerDown"), 60, "the alert to clear", 0.5)


def test_alert_rules_pass_promtool_unit_tests(mon: DeployedLab):
    """promtool's own rule tests, on the monitoring host, against the deployed rules file."""
    mon.lab.ssh("redis1", "tee", "/tmp/taskfleet-rules-test.yml", input=RULE_TESTS)
    proc = mon.on("redis1", "promtool", "test", "rules", "/tmp/taskfleet-rules-test.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout, proc.stdout


def test_bad_monitoring_input_is_refused_before_any_change(mon: DeployedLab):
    ini = mon.inventory / "monitoring.ini"
    group_vars = mon.inventory / "group_vars" / "all.yml"
    good_ini, good_vars = ini.read_text(), group_vars.read_text()
    cases = [
        (good_ini + "worker1\n", good_vars,
         "Group [monitoring] must hold at most one host, it holds redis1, worker1"),
        (good_ini, good_vars + "monitoring_alert_queue_age_for: 5 minutes\n",
         "monitoring_alert_queue_age_for (5 minutes) must be Prometheus durations"),
    ]
    try:
        for ini_text, vars_text, message in cases:
            ini.write_text(ini_text)
            group_vars.write_text(vars_text)
            run = mon.deploy()
            assert run.rc != 0 and message in run.out, run.out[-3000:]
            changed = {h: r.get("changed", 0) for h, r in run.recap().items() if r.get("changed")}
            assert not changed, changed
    finally:
        ini.write_text(good_ini)
        group_vars.write_text(good_vars)


def test_redeploy_changes_nothing(mon: DeployedLab):
    """The whole deploy.yml again with the tier on: nothing changes on any host (the
    exporters, the workers' metrics port, the ACL user, the firewall tables), and the tier's
    own playbook alone neither."""
    run = mon.deploy()
    record_timing("monitoring lab: no-change rerun of deploy.yml", run.seconds)
    assert run.rc == 0, mon.explain(run)
    changed = {h: r.get("changed", 0) for h, r in run.recap().items()}
    assert changed and not any(changed.values()), changed
    run = mon.deploy(playbook="playbooks/monitoring.yml")
    assert run.rc == 0, mon.explain(run)
    changed = {h: r.get("changed", 0) for h, r in run.recap().items()}
    assert changed and not any(changed.values()), changed


def test_emptying_the_group_removes_the_tier(mon: DeployedLab):
    (mon.inventory / "monitoring.ini").unlink()
    run = mon.deploy()
    record_timing("monitoring lab: tier removed", run.seconds)
    assert run.rc == 0, run.out[-4000:]
    for host in ("redis1", "worker1"):
        pkgs = mon.on(host, "dpkg-query", "-W", "-f=${Package} ${db:Status-Abbrev}\n",
                      "prometheus*").stdout
        assert " ii" not in pkgs, (host, pkgs)
        tables = mon.on(host, "nft", "list", "tables", check=True).stdout
        assert "taskfleet_monitoring" not in tables, (host, tables)
    unit = mon.on("worker1", "cat", "/etc/systemd/system/taskfleet-worker.service").stdout
    assert "TASKFLEET_METRICS_PORT" not in unit and "RuntimeDirectory" not in unit
    acl = mon.on("redis1", "cat", "/etc/redis/users.acl", check=True).stdout
    assert "exporter" not in acl, acl
    assert not connects(mon, "redis1", PROMETHEUS)


# promtool's unit tests of the deployed rules at this module's thresholds: an alert is pending
# before its `for`, firing after it, and the annotations are rendered as documented.
RULE_TESTS = f"""\
rule_files: [/etc/prometheus/taskfleet-rules.yml]
evaluation_interval: {SCRAPE}s
tests:
  - interval: {SCRAPE}s
    input_series:
      - series: 'up{{job="taskfleet_worker",host="worker1",instance="w:9809"}}'
        values: '1 1 0 0 0 0 0 0 0 0'
      - series: 'redis_memory_max_bytes{{host="redis1"}}'
        values: '100x400'
      - series: 'redis_memory_used_bytes{{host="redis1"}}'
        values: '95x400'
      - series: 'taskfleet_queue_oldest_message_age_seconds{{queue="celery"}}'
        values: '400x100'
      - series: 'taskfleet_redis_primary{{host="redis1"}}'
        values: '1 1 0x100'
      - series: 'taskfleet_redis_primary{{host="replica1"}}'
        values: '0x100'
    alert_rule_test:
      - eval_time: 6s
        alertname: TaskfleetWorkerDown
        exp_alerts: []
      - eval_time: 16s
        alertname: TaskfleetWorkerDown
        exp_alerts:
          - exp_labels: {{severity: critical, job: taskfleet_worker, host: worker1,
                         instance: "w:9809"}}
            exp_annotations:
              summary: "Taskfleet worker on worker1 is down"
              description: >-
                Its metrics endpoint w:9809 has not answered for {WORKER_DOWN_FOR}s: host down,
                or systemctl status taskfleet-worker there.
      - eval_time: 4m
        alertname: RedisMemoryNearLimit
        exp_alerts: []
      - eval_time: 6m
        alertname: RedisMemoryNearLimit
        exp_alerts:
          - exp_labels: {{severity: critical, host: redis1}}
            exp_annotations:
              summary: "Redis uses 95% of maxmemory"
              description: >-
                With noeviction a full Redis refuses new tasks: drain queues, or raise
                redis_maxmemory.
      - eval_time: 6s
        alertname: TaskfleetNoRedisPrimary
        exp_alerts: []
      - eval_time: 16s
        alertname: TaskfleetNoRedisPrimary
        exp_alerts:
          - exp_labels: {{severity: critical}}
            exp_annotations:
              summary: "No Redis host is the primary, as far as the Taskfleet exporters can tell"
              description: >-
                No exporter's Redis is the primary the Sentinels name: redis-cli -p 26379
                sentinel master taskfleet on a Redis host, and journalctl -u taskfleet-exporter
                there.
      - eval_time: 3m
        alertname: TaskfleetQueueOldMessage
        exp_alerts:
          - exp_labels: {{severity: warning, queue: celery}}
            exp_annotations:
              summary: "Queue celery: a message waits for 6m 40s"
              description: >-
                The oldest waiting message is older than 300 s: no worker consumes the queue,
                or too few.
"""
