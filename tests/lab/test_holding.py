"""Messages held for longer than the visibility timeout, on a small lab of their own.

redis1, worker1 (Debian 12) and worker2 (Debian 13), deployed by deploy.yml with the production
settings except a 10 s visibility timeout. Without heartbeats kombu hands a message out again
once it has been held for that long (celery#6236, #5935); with them the timeout no longer bounds
how long a live worker holds a message, so an ETA task and a task running 3x the timeout each
run exactly once. Rows "eta" and "long" of docs/RELIABILITY.md.

The cold deploy runs over plain SSH (ANSIBLE_STRATEGY=linear, the fallback without Mitogen).

The inventory names its hosts (lab --names: no ansible_host; /etc/hosts resolves them, and
each host its own name to 127.0.1.1 too), so this deploy also proves that the Redis firewall
holds the hosts' addresses, never their names.
"""

from __future__ import annotations

import ipaddress
import json
import os
import time
from collections.abc import Iterator

import pytest

from .faultkit import MARK, Fleet, Report, batch_name, wait_until
from .labkit import DeployedLab, new_lab, record_timing

pytestmark = pytest.mark.lab
HOLD_LAB = os.environ.get("TASKFLEET_TEST_HOLD_LAB", "cihold")
HOLD_SUBNET = os.environ.get("TASKFLEET_TEST_HOLD_SUBNET", "10.84.0.0/24")
VISIBILITY = 10


@pytest.fixture(scope="module")
def hold_fleet(report: Report) -> Iterator[Fleet]:
    lab = new_lab(HOLD_LAB, HOLD_SUBNET)
    try:
        start = time.monotonic()
        lab.up(redis=1, workers=2, distros=("bookworm", "trixie"), names=True)
        group_vars = lab.inventory_path.parent / "group_vars"
        group_vars.mkdir(exist_ok=True)
        (group_vars / "all.yml").write_text(
            "# Written by tests/lab/test_holding.py: production settings, a short timeout.\n"
            f"taskfleet_visibility_timeout: {VISIBILITY}\n")
        cluster = DeployedLab(lab)
        # Over plain SSH, Ansible's own linear strategy: the fallback when Mitogen is missing
        # (deploy/plugins/strategy). The later tier-alone run uses Mitogen and must find
        # nothing to change.
        run = cluster.deploy(env={"ANSIBLE_STRATEGY": "linear"})
        record_timing("hold lab: up + cold deploy (3 hosts)", time.monotonic() - start)
        assert run.rc == 0, cluster.explain(run)
        assert "strategy plugins not included in ansible.builtin" not in run.out, run.out[-3000:]
        fleet = Fleet(cluster)
        assert wait_until(lambda: len(fleet.answering()) >= 2, 30), fleet.answering()
        with report.timed():
            yield fleet
        report.save(cluster)  # while the lab stands: the session may end after it is gone
    finally:
        if not os.environ.get("TASKFLEET_KEEP_LAB"):
            lab.down()


def test_eta_and_long_tasks_beyond_the_visibility_timeout(hold_fleet: Fleet, report: Report):
    fleet = hold_fleet
    vt = fleet.settings.visibility_timeout
    assert vt == VISIBILITY and fleet.settings.task_time_limit > 3 * vt
    eta, long = batch_name("eta"), batch_name("long")
    sent = time.time()
    eta_numbers = list(range(4))
    for n in eta_numbers:
        fleet.send(MARK, [eta, n, 0], countdown=3 * vt)
    long_numbers = fleet.submit(long, range(2), seconds=3 * vt)
    eta_tally = fleet.finish(eta, eta_numbers, timeout=3 * vt + 60)
    long_tally = fleet.finish(long, long_numbers, timeout=3 * vt + 60)
    early = [n for n in eta_numbers if (t := eta_tally.first_run(n)) and t < sent + 3 * vt]
    eta_row = report.scenario(
        "eta", f"ETA task {3 * vt} s away, 3x the visibility timeout ({vt} s)", eta_tally,
        recovery_s=None, recovery_what="no fault: held, then run once at its ETA",
        held_by="heartbeats re-stamp every held message; the timeout covers only messages "
                "without an owner", early=early)
    long_row = report.scenario(
        "long", f"Task running {3 * vt} s, 3x the visibility timeout ({vt} s)", long_tally,
        recovery_s=None, recovery_what="no fault: run once",
        held_by="heartbeats; the visibility timeout no longer has to exceed the hard limit")
    assert not eta_tally.lost and not long_tally.lost, (eta_tally.lost, long_tally.lost)
    assert not early, f"ETA tasks ran before their ETA: {early}"
    assert eta_tally.duplicated == {}, eta_tally.duplicated
    assert long_tally.duplicated == {}, long_tally.duplicated
    eta_row["passed"] = long_row["passed"] = True


def _elements(nft_json: str) -> set[str]:
    """The addresses of an nft set (`nft -j list set`), ranges and prefixes expanded."""
    found: set[str] = set()
    for item in json.loads(nft_json)["nftables"]:
        for elem in item.get("set", {}).get("elem", []):
            if isinstance(elem, str):
                found.add(elem)
            elif "range" in elem:
                low, high = (ipaddress.ip_address(a) for a in elem["range"])
                found |= {str(low + i) for i in range(int(high) - int(low) + 1)}
            else:
                net = ipaddress.ip_network(f"{elem['prefix']['addr']}/{elem['prefix']['len']}")
                found |= {str(a) for a in net}
    return found


def test_redis_firewall_admits_exactly_the_inventory_addresses(hold_fleet: Fleet):
    """With hosts named, not addressed, the firewall on redis1 admits exactly the inventory's
    addresses and the controller's (the lab's gateway, as redis1 sees the SSH connection)."""
    lab = hold_fleet.cluster.lab
    assert "ansible_host" not in lab.inventory_path.read_text()
    # The trap of issue 17 is there: redis1 resolves its own name to loopback too.
    own = lab.ssh("redis1", "getent", "ahosts", "redis1", check=True).stdout.split()
    assert "127.0.1.1" in own and lab.ip("redis1") in own, own
    inventory = {lab.ip(h) for h in lab.hosts() if h not in lab.hosts("spare")}
    gateway = str(ipaddress.ip_network(HOLD_SUBNET)[1])
    v4 = lab.ssh("redis1", "nft", "-j", "list", "set", "inet", "taskfleet", "redis_clients_v4",
                 check=True).stdout
    v6 = lab.ssh("redis1", "nft", "-j", "list", "set", "inet", "taskfleet", "redis_clients_v6",
                 check=True).stdout
    assert _elements(v4) == inventory | {gateway}, (_elements(v4), inventory)
    assert _elements(v6) == set(), v6
    bind = lab.ssh("redis1", "grep", "^bind ", "/etc/redis/redis.conf", check=True).stdout
    assert bind.split() == ["bind", "127.0.0.1", "-::1", lab.ip("redis1")], bind


def test_tier_playbook_runs_alone_on_named_hosts(hold_fleet: Fleet):
    """The Redis tier alone (no preflight before it) resolves the named hosts' addresses by
    itself, and finds nothing to change: over Mitogen, after a cold deploy over plain SSH."""
    run = hold_fleet.cluster.deploy(playbook="playbooks/redis.yml")
    assert run.rc == 0, run.out[-4000:]
    changed = {h: r.get("changed", 0) for h, r in run.recap().items()}
    assert not any(changed.values()), changed
