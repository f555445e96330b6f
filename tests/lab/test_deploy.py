"""`ansible-playbook deploy.yml` on real lab hosts: bad inventories stop before any change, a cold
deploy, tasks from every node, per-host canaries, idempotence, check mode, security, scale-out.

The lab: redis1 (Debian 12), worker1 (Debian 13), worker2 (Debian 12), client1 (Debian 13) and
spare1 (outside the inventory), so every run proves both distributions.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from .labkit import LOGIN_USER, DeployedLab, ansible_playbook, record_timing

pytestmark = pytest.mark.lab


# --------------------------------------------------------------------------- bad inventories


def _groups(hosts_ini: Path) -> tuple[dict[str, list[str]], list[str]]:
    """Split the lab's INI inventory into {group: [host lines]} and the [all:vars] lines."""
    groups: dict[str, list[str]] = {}
    current = None
    for line in hosts_ini.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            groups.setdefault(current, [])
        elif current is not None:
            groups[current].append(line)
    all_vars = groups.pop("all:vars", [])
    return groups, all_vars


def _write_inventory(dest: Path, groups: dict[str, list[str]], all_vars: list[str],
                     host_vars: dict[str, str], src: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    body = []
    for name, lines in groups.items():
        body += [f"[{name}]", *lines, ""]
    body += ["[all:vars]", *all_vars, ""]
    (dest / "hosts.ini").write_text("\n".join(body))
    if (src / "group_vars").is_dir():
        shutil.copytree(src / "group_vars", dest / "group_vars", dirs_exist_ok=True)
    (dest / "host_vars").mkdir(exist_ok=True)
    for host, text in host_vars.items():
        (dest / "host_vars" / f"{host}.yml").write_text(text)
    return dest


BAD_INVENTORIES = {
    # case: (group edit, host_vars, text the error must contain)
    "no redis host": (lambda g: g.update(redis=[]), {}, "redis"),
    "two redis hosts": (lambda g: g.update(redis=g["redis"] + g["workers"][:1]), {}, "redis"),
    "no workers": (lambda g: g.update(workers=[]), {}, "workers"),
    "unknown pool": (None, {"worker1": "celery_worker_pool: gevent-ish\n"}, "celery_worker_pool"),
    "concurrency not an integer": (None, {"worker1": "celery_worker_concurrency: lots\n"},
                                   "celery_worker_concurrency"),
    "concurrency zero": (None, {"worker2": "celery_worker_concurrency: 0\n"},
                         "celery_worker_concurrency"),
    "bad queue name": (None, {"worker1": "celery_worker_queues: ['reports daily!']\n"},
                       "celery_worker_queues"),
    # Ansible would reach this controller instead (Debian maps a box's own name to 127.0.1.1).
    "name resolving only to loopback": (
        lambda g: g.update(workers=[ln.split()[0] + " ansible_host=localhost"
                                    if ln.startswith("worker1 ") else ln for ln in g["workers"]]),
        {}, "worker1: its name localhost resolves only to loopback"),
    # Two problems in one run (each run costs a preflight): every host's problems are reported.
    "dead-after within 3 heartbeats, replicas to wait for without replicas": (
        None, {"worker2": "taskfleet_heartbeat_interval: 2\ntaskfleet_dead_after: 4\n",
               "worker1": "taskfleet_publish_replicas: 1\n"},
        ("taskfleet_dead_after (4) must be at least 3 x",
         "taskfleet_publish_replicas is 1 but the inventory has no [redis_replicas]")),
}


def test_bad_inventory_stops_before_any_change(lab, tmp_path):
    """Each broken inventory fails in the first play with a message naming the problem, and
    leaves the hosts exactly as fresh as they were (nothing of Taskfleet installed)."""
    src = lab.inventory_path.parent
    for case, (edit, host_vars, expected) in BAD_INVENTORIES.items():
        groups, all_vars = _groups(lab.inventory_path)
        if edit:
            edit(groups)
        inv = _write_inventory(tmp_path / case.replace(" ", "-"), groups, all_vars, host_vars, src)
        run = ansible_playbook(inv, "deploy.yml", timeout=300)
        assert run.rc != 0, f"{case}: deploy accepted a bad inventory\n{run.out[-3000:]}"
        # Whitespace as one space: the YAML callback wraps long messages.
        for text in (expected,) if isinstance(expected, str) else expected:
            assert text in " ".join(run.out.split()), \
                f"{case}: error does not name {text!r}\n{run.out[-3000:]}"
        changed = {h: r.get("changed", 0) for h, r in run.recap().items()}
        assert not any(changed.values()), f"{case}: changes were made: {changed}"
    for host in ("redis1", "worker1", "worker2", "client1"):
        probe = lab.ssh(host, "sh", "-c",
                        "test -e /opt/taskfleet || test -e /etc/taskfleet "
                        "|| command -v redis-server || id taskfleet", check=False)
        assert probe.returncode != 0, f"{host} was changed by a failed deploy: {probe.stdout}"


# --------------------------------------------------------------------------- cold deploy


def test_cold_deploy_verifies_every_worker(cluster: DeployedLab):
    """The cluster fixture ran the cold deploy; its last play (verify) checked every worker. Run
    the verification playbook alone too: it must pass on its own."""
    run = cluster.deploy(playbook="playbooks/verify.yml")
    assert run.rc == 0, run.out[-4000:]
    for worker in ("worker1", "worker2"):
        assert worker in run.out


def test_deploy_logs_in_as_a_sudo_user_and_root_cannot(cluster: DeployedLab):
    """The cold deploy ran as the lab's login user through become: root's SSH login is off."""
    inventory = cluster.lab.inventory_path.read_text()
    assert f"ansible_user={LOGIN_USER}" in inventory and "ansible_become=true" in inventory
    for host in ("redis1", "worker1"):
        argv = cluster.lab.ssh_argv(host, "true")
        login = argv.index(f"{LOGIN_USER}@{cluster.lab.ip(host)}")
        as_root = [*argv[:login], f"root@{cluster.lab.ip(host)}", "true"]
        refused = subprocess.run(as_root, capture_output=True, text=True, timeout=30,
                                 check=False)
        assert refused.returncode == 255 and "denied" in refused.stderr, refused.stderr
        sshd = cluster.on(host, "sshd", "-T", check=True).stdout
        assert "permitrootlogin no" in sshd.splitlines(), host


@pytest.mark.parametrize("node", ["controller", "redis1", "worker1", "client1"])
def test_submit_from_every_node(cluster: DeployedLab, node):
    if node == "controller":
        proc = cluster.app("submit", "add", "10", "20", "--wait", "--timeout", "30")
    else:
        proc = cluster.on(node, "taskfleet", "submit", "add", "10", "20", "--wait",
                          "--timeout", "30")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "30"


def test_canary_on_each_host_queue(cluster: DeployedLab):
    """A task pinned to a worker's own host queue runs on that host, on both distributions."""
    for worker in ("worker1", "worker2"):
        proc = cluster.app("submit", "whoami", "--queue", f"host.{worker}", "--wait",
                           "--timeout", "30")
        assert proc.returncode == 0, proc.stderr
        assert worker in proc.stdout, proc.stdout
    versions = {w: cluster.on(w, "cat", "/etc/debian_version", check=True).stdout.split(".")[0]
                for w in ("worker1", "worker2")}
    assert sorted(versions.values()) == ["12", "13"], versions


def test_batch_spreads_over_workers(cluster: DeployedLab):
    # Tasks that take a while (0.3 s): one worker reserves only as many as its pool runs at
    # once (prefetch 1), so the others must take the rest. With instant tasks one worker can
    # run all 40 before another's wait returns, which says nothing about the cluster.
    proc = cluster.app("submit", "sleep", "0.3", "--count", "40", "--wait", "--timeout", "60")
    assert proc.returncode == 0, proc.stderr
    assert "worker1" in proc.stdout and "worker2" in proc.stdout, proc.stdout


def test_status_and_ping(cluster: DeployedLab):
    ping = cluster.app("ping", "--expect", "2")
    assert ping.returncode == 0, ping.stderr
    assert cluster.app("ping", "--expect", "3", "--timeout", "2").returncode != 0
    status = cluster.app("status")
    assert status.returncode == 0, status.stderr
    assert "worker@worker1" in status.stdout and "worker@worker2" in status.stdout


# --------------------------------------------------------------------------- day 2


def test_second_run_changes_nothing(cluster: DeployedLab):
    run = cluster.deploy()
    record_timing("deploy: no-change re-run", run.seconds)
    assert run.rc == 0, run.out[-4000:]
    recap = run.recap()
    print("\n" + run.out.split("PLAY RECAP")[-1].strip())
    assert {"redis1", "worker1", "worker2", "client1"} <= recap.keys(), recap
    changed = {h: r["changed"] for h, r in recap.items() if r.get("changed")}
    assert not changed, f"re-run changed something: {changed}\n{run.out[-6000:]}"


def test_check_mode_on_deployed_cluster(cluster: DeployedLab):
    run = cluster.deploy("--check", "--diff")
    assert run.rc == 0, run.out[-4000:]
    assert not any(r.get("failed") for r in run.recap().values())


# --------------------------------------------------------------------------- security


def test_secrets_are_not_world_readable_and_workers_not_root(cluster: DeployedLab):
    for host in ("redis1", "worker1", "worker2", "client1"):
        st = cluster.on(host, "stat", "-c", "%a %U %G", "/etc/taskfleet/taskfleet.env",
                        check=True).stdout.split()
        assert st[1:] == ["root", "taskfleet"] and int(st[0], 8) & 0o007 == 0, (host, st)
    for worker in ("worker1", "worker2"):
        user = cluster.on(worker, "ps", "-o", "user=", "-p", str(cluster.main_pid(worker)),
                          check=True).stdout.strip()
        assert user == "taskfleet", (worker, user)
    assert (cluster.env_file.stat().st_mode & 0o077) == 0


def test_outsider_cannot_reach_redis(cluster: DeployedLab):
    """spare1 is on the same network but not in the inventory: the firewall drops it."""
    redis_ip = cluster.lab.ip("redis1")
    probe = ("import socket,sys\n"
             "s=socket.socket(); s.settimeout(3)\n"
             f"sys.exit(0 if s.connect_ex(('{redis_ip}', 6379)) == 0 else 1)\n")
    assert cluster.on("spare1", "python3", "-c", probe).returncode == 1
    assert cluster.on("client1", "python3", "-c", probe).returncode == 0


def test_wrong_password_is_refused_clearly(cluster: DeployedLab):
    url = f"redis://taskfleet:not-the-password@{cluster.lab.ip('redis1')}:6379/0"
    proc = cluster.on("client1", "env", f"CELERY_BROKER_URL={url}", f"CELERY_RESULT_BACKEND={url}",
                      "taskfleet", "submit", "add", "1", "2", "--wait", timeout=30)
    assert proc.returncode != 0
    message = proc.stderr.strip()
    assert "password" in message.lower(), message
    assert "not-the-password" not in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- scale out


def test_scale_out_adds_a_worker_without_restarting_others(cluster: DeployedLab):
    before = {w: cluster.main_pid(w) for w in ("worker1", "worker2")}
    cluster.lab.add("worker3", "workers", distro="trixie")
    run = cluster.deploy()
    record_timing("deploy: scale-out (+1 worker)", run.seconds)
    assert run.rc == 0, run.out[-4000:]
    after = {w: cluster.main_pid(w) for w in ("worker1", "worker2")}
    assert after == before, "existing workers were restarted by the scale-out"
    assert cluster.app("ping", "--expect", "3").returncode == 0
    proc = cluster.app("submit", "whoami", "--queue", "host.worker3", "--wait", "--timeout", "30")
    assert proc.returncode == 0 and "worker3" in proc.stdout, proc.stdout + proc.stderr
