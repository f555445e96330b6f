"""The worker's systemd unit template, rendered with Jinja as Ansible does (plain filters only)."""

from __future__ import annotations

import configparser
from pathlib import Path

import jinja2
import pytest

TEMPLATE = (Path(__file__).resolve().parents[2] / "deploy" / "roles" / "celery_worker"
            / "templates" / "taskfleet-worker.service.j2")
DEFAULTS = {
    "ansible_managed": "managed", "celery_worker_node_name": "worker@w1",
    "celery_worker_start_timeout": 60, "celery_worker_stop_timeout": 330,
    "celery_worker_restart_sec": 5, "celery_worker_memory_max": "",
    "celery_worker_concurrency": None, "celery_worker_prefetch_multiplier": 1,
    "celery_worker_max_tasks_per_child": 0, "celery_worker_log_level": "INFO",
    "celery_worker_watchdog_sec": 60, "celery_worker_pool": "prefork",
    "__celery_worker_user": "taskfleet", "__celery_worker_group": "taskfleet",
    "__celery_worker_home": "/srv/tf",
    "__celery_worker_env_file": "/etc/taskfleet/taskfleet.env",
    "__celery_worker_venv_dir": "/opt/taskfleet/venv",
    "__celery_worker_service": "taskfleet-worker",
    "__celery_worker_all_queues": ["celery", "host.w1"],
    "taskfleet_common_monitoring_host": "", "taskfleet_common_worker_metrics_port": 9809,
    "taskfleet_common_address": "10.0.0.11",
}


def service(**overrides: object) -> configparser.SectionProxy:
    # As Ansible's template module: blocks trimmed, no HTML escaping (a unit file, not HTML).
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             trim_blocks=True, autoescape=False)  # noqa: S701
    text = env.from_string(TEMPLATE.read_text()).render({**DEFAULTS, **overrides})
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(text)
    return unit["Service"]


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_watchdog_on_for_pools_with_a_free_event_loop(pool):
    s = service(celery_worker_pool=pool)
    assert s["WatchdogSec"] == "60"
    assert s["TimeoutAbortSec"] == "10"
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main"


def test_no_watchdog_for_solo_or_when_off():
    # The solo pool runs each task inside the event loop: a long task would stop the pings.
    assert "WatchdogSec" not in service(celery_worker_pool="solo")
    assert "WatchdogSec" not in service(celery_worker_watchdog_sec=0)


def test_metrics_only_with_a_monitoring_host():
    """Without a [monitoring] host the unit is as before; with one, the worker serves its
    per-task counters on its private address, counting into a fresh runtime directory."""
    assert "RuntimeDirectory" not in service()
    text = TEMPLATE.read_text()
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True,
                             autoescape=False)  # noqa: S701
    on = env.from_string(text).render({**DEFAULTS, "taskfleet_common_monitoring_host": "m1"})
    assert "RuntimeDirectory=taskfleet-worker\n" in on
    assert "Environment=PROMETHEUS_MULTIPROC_DIR=%t/taskfleet-worker\n" in on
    assert "Environment=TASKFLEET_METRICS_PORT=9809\n" in on
    assert "Environment=TASKFLEET_METRICS_ADDRESS=10.0.0.11\n" in on
