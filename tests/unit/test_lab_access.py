"""deploy.lab's cloud-style access: the inventory it writes, /etc/hosts edits, sudo commands.

No host is booted: these are the pure parts, so a mistake in them (an /etc/hosts line of
someone else removed, a command not run as root) fails in seconds instead of in a lab run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.lab import access, inventory
from deploy.lab.util import LabError

HOSTS = {"redis1": {"group": "redis", "ip": "10.9.0.10"},
         "worker1": {"group": "workers", "ip": "10.9.0.11"},
         "spare1": {"group": "spare", "ip": "10.9.0.12"}}


def _render(**kwargs) -> str:
    return inventory.render("t", HOSTS, Path("/k"), Path("/kh"), **kwargs)


def test_inventory_by_default_is_root_and_addresses():
    text = _render()
    assert "redis1 ansible_host=10.9.0.10" in text and "ansible_user=root" in text
    assert "ansible_become" not in text and "spare1" not in text


def test_inventory_with_a_login_user_and_names():
    lines = _render(login_user="admin", names=True).splitlines()
    assert "ansible_host" not in "\n".join(lines)
    assert lines[lines.index("[redis]") + 1] == "redis1"
    assert "ansible_user=admin" in lines and "ansible_become=true" in lines


def test_hosts_file_lines_are_replaced_and_removed_exactly():
    theirs = "127.0.0.1 localhost\n10.1.1.1 redis1-other  # taskfleet-lab:tx\n# note"
    mine = access.host_lines("t", HOSTS)
    added = access.replace_marked(theirs, "t", mine)
    assert added.startswith(theirs + "\n") and added.count("# taskfleet-lab:t\n") == 3
    assert access.replace_marked(added, "t", mine[:1]).count("taskfleet-lab:t\n") == 1
    assert access.replace_marked(added, "t", []) == theirs + "\n"


def test_controller_names_taken_by_another_line_are_refused(tmp_path, monkeypatch):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n10.1.1.1 worker1 # mine\n")
    monkeypatch.setattr(access, "CONTROLLER_HOSTS", hosts)
    with pytest.raises(LabError, match="already names worker1"):
        access.check_controller_names("t", ["redis1", "worker1"])
    access.check_controller_names("t", ["redis1"])


@pytest.mark.parametrize(("cmd", "remote"), [
    ((), ["sudo", "-i"]),
    (("systemctl is-system-running",), ["sudo", "-n", "sh", "-c", "systemctl is-system-running"]),
    (("cat", "/etc/x y"), ["sudo", "-n", "--", "cat", "/etc/x y"]),
])
def test_commands_of_a_login_user_run_through_sudo(cmd, remote):
    assert access.remote_command(cmd) == remote


def test_options_refuse_root_and_a_change_on_a_booted_lab():
    with pytest.raises(LabError, match="login user"):
        access.options("root", False)
    state = {"login_user": "admin"}
    access.check_options("t", state, None, False)  # `up` again without options: as booted
    access.check_options("t", state, "admin", False)
    with pytest.raises(LabError, match="down it first"):
        access.check_options("t", state, "admin", True)
