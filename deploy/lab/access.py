"""How hosts are reached, the cloud way: a login user with sudo instead of root, and names.

`up --login-user admin` gives every host what a Debian cloud image's default user has: an
account with passwordless sudo and the lab's key, while root may not log in over SSH.
`up --names` makes the inventory name the hosts (no ansible_host): each host, and the
controller, resolve the names through /etc/hosts lines that carry the lab's mark, so `down`
removes exactly those and never another line.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from .util import LabError, run

CONTROLLER_HOSTS = Path("/etc/hosts")
_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
SSHD_DROPIN = "etc/ssh/sshd_config.d/10-taskfleet-lab.conf"
SUDOERS_DROPIN = "etc/sudoers.d/90-taskfleet-lab"


def options(login_user: str | None, names: bool) -> dict:
    """What a lab's state records of how its hosts are reached (nothing: root, addresses)."""
    if login_user is not None and (not _USER_RE.match(login_user) or login_user == "root"):
        raise LabError(f"invalid login user {login_user!r}",
                       "use a lowercase account name other than root, e.g. --login-user admin")
    return ({"login_user": login_user} if login_user else {}) | ({"names": True} if names else {})


def check_options(lab: str, state: dict, login_user: str | None, names: bool) -> None:
    """`up` again without the options completes a lab as booted; other options are refused."""
    asked = options(login_user, names)
    if asked and asked != options(state.get("login_user"), bool(state.get("names"))):
        raise LabError(f"lab {lab!r} was booted with other --login-user/--names options",
                       "down it first to change how its hosts are reached")


def mark(lab: str) -> str:
    """The comment that ends every /etc/hosts line the lab writes."""
    return f"# taskfleet-lab:{lab}"


# -- on a host's disk (before it boots, as a cloud-init would) ------------------------------

def _passwd_entry(root: Path, user: str) -> list[str] | None:
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return fields
    return None


def provision_login(root: Path, user: str, authorized_key: str) -> None:
    """The login user with passwordless sudo and the lab's key; root may not log in by SSH.

    Idempotent (runs on every boot). useradd is the image's own, run in a chroot.
    """
    if _passwd_entry(root, user) is None:
        run(["chroot", str(root), "useradd", "--create-home", "--shell", "/bin/bash",
             "--user-group", user])
    fields = _passwd_entry(root, user)
    if fields is None:
        raise LabError(f"useradd made no account {user!r} in {root}")
    uid, gid, home = int(fields[2]), int(fields[3]), root / fields[5].lstrip("/")
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    keys = ssh_dir / "authorized_keys"
    keys.write_text(authorized_key.strip() + "\n")
    keys.chmod(0o600)
    for path in (ssh_dir, keys):
        os.chown(path, uid, gid)
    sudoers = root / SUDOERS_DROPIN
    sudoers.write_text(f"# Written by the Taskfleet lab, as a cloud image's default user.\n"
                       f"{user} ALL=(ALL) NOPASSWD:ALL\n")
    sudoers.chmod(0o440)
    sshd = root / SSHD_DROPIN
    sshd.write_text("# Written by the Taskfleet lab: log in as the default user, then sudo.\n"
                    "PermitRootLogin no\n")
    (root / "root/.ssh/authorized_keys").unlink(missing_ok=True)


def remote_command(cmd: tuple[str, ...]) -> list[str]:
    """ssh's remote command for a login user: the command run as root through sudo, so the
    lab's own commands (and tests) keep working where root cannot log in."""
    if not cmd:
        return ["sudo", "-i"]
    if len(cmd) == 1:
        return ["sudo", "-n", "sh", "-c", cmd[0]]
    return ["sudo", "-n", "--", *cmd]


# -- /etc/hosts ---------------------------------------------------------------------------

def host_lines(lab: str, hosts: dict[str, dict]) -> list[str]:
    return [f"{h['ip']}\t{name}\t{mark(lab)}" for name, h in hosts.items()]


def replace_marked(text: str, lab: str, lines: list[str]) -> str:
    """text with the lab's marked lines replaced by lines; every other line kept as it was."""
    tag = mark(lab)
    kept = [ln for ln in text.splitlines(keepends=True) if not ln.rstrip().endswith(tag)]
    out = "".join(kept)
    if lines:
        if out and not out.endswith("\n"):
            out += "\n"
        out += "".join(f"{ln}\n" for ln in lines)
    return out


def write_host_files(lab: str, merged_roots: list[Path], hosts: dict[str, dict]) -> None:
    """Every running host resolves every lab host's name (its own too, besides 127.0.1.1)."""
    lines = host_lines(lab, hosts)
    for root in merged_roots:
        path = root / "etc/hosts"
        if path.exists():
            path.write_text(replace_marked(path.read_text(), lab, lines))


@contextlib.contextmanager
def _controller_hosts() -> Iterator[TextIO]:
    """/etc/hosts, locked against other labs, rewritten in place (it may be a bind mount)."""
    with open("/run/lock/taskfleet-lab-etc-hosts.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(CONTROLLER_HOSTS, "r+") as f:
            yield f


def _rewrite_controller(lab: str, lines: list[str]) -> None:
    with _controller_hosts() as f:
        text = f.read()
        new = replace_marked(text, lab, lines)
        if new != text:
            f.seek(0)
            f.write(new)
            f.truncate()


def check_controller_names(lab: str, names: list[str]) -> None:
    """Refuse names the controller's /etc/hosts already maps in a line the lab did not write."""
    if not CONTROLLER_HOSTS.exists():
        return
    tag = mark(lab)
    for line in CONTROLLER_HOSTS.read_text().splitlines():
        if line.rstrip().endswith(tag):
            continue
        taken = set(line.split("#", 1)[0].split()[1:]) & set(names)
        if taken:
            raise LabError(f"/etc/hosts already names {', '.join(sorted(taken))}: {line.strip()!r}",
                           "down the lab that wrote it, or boot this lab without --names")


def write_controller(lab: str, hosts: dict[str, dict]) -> None:
    check_controller_names(lab, list(hosts))
    _rewrite_controller(lab, host_lines(lab, hosts))


def remove_controller(lab: str) -> None:
    """Remove the lab's lines from the controller's /etc/hosts (and nothing else)."""
    if CONTROLLER_HOSTS.exists() and mark(lab) in CONTROLLER_HOSTS.read_text():
        _rewrite_controller(lab, [])
