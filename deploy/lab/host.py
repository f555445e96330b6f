"""One lab host: an overlayfs disk on a cached image, booted by systemd-nspawn.

The host dir holds upper/ (the host's own disk), work/ (overlayfs scratch), merged/ (the
root nspawn boots) and nspawn.log. Processes are found from /proc, not from a pid file, so a
killed CLI or a crashed host never leaves the lab believing something stale.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from . import access
from .util import LabError, run

# Every host's systemd, journald, logind and networkd take inotify instances, and all of them
# count against root on the controller (no user namespace). The kernel default of 128 runs out
# at about 15 hosts, and systemd then dies at boot with "Failed to allocate manager object".
INOTIFY_INSTANCES = Path("/proc/sys/fs/inotify/max_user_instances")
MIN_INOTIFY_INSTANCES = 1024


def raise_inotify_limit() -> None:
    """Raise fs.inotify.max_user_instances to what a few labs of hosts need (never lower it)."""
    if int(INOTIFY_INSTANCES.read_text()) < MIN_INOTIFY_INSTANCES:
        INOTIFY_INSTANCES.write_text(f"{MIN_INOTIFY_INSTANCES}\n")


class HostDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.upper = path / "upper"
        self.work = path / "work"
        self.merged = path / "merged"
        self.log = path / "nspawn.log"


# -- mounts -------------------------------------------------------------------------------

def mountpoints() -> list[str]:
    """Mount points of the controller's mount namespace (octal escapes decoded)."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        raw = line.split()[4]
        points.append(raw.encode().decode("unicode_escape"))
    return points


def is_mounted(path: Path) -> bool:
    return str(path) in mountpoints()


def mount(hd: HostDir, image: Path) -> None:
    for d in (hd.upper, hd.work, hd.merged):
        d.mkdir(parents=True, exist_ok=True)
    if not is_mounted(hd.merged):
        run(["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={image},upperdir={hd.upper},workdir={hd.work}", str(hd.merged)])


def umount_under(root: Path) -> None:
    """Unmount everything at or below root, deepest first (stale runs leave mounts behind)."""
    prefix = str(root).rstrip("/") + "/"
    for point in sorted((p for p in mountpoints() if p.startswith(prefix) or p == str(root)),
                        key=len, reverse=True):
        if run(["umount", point], check=False).returncode != 0:
            run(["umount", "-l", point])  # still busy (a dying process): detach lazily


# -- first-boot files ---------------------------------------------------------------------

def provision(hd: HostDir, *, hostname: str, ip: str, prefix: int, gateway: str,
              dns: str | None, authorized_key: str, login_user: str | None = None) -> None:
    """Write what a cloud-init would: hostname, the key (root's, or the login user's with
    sudo and root login off: access.provision_login), a static address, host keys.

    Runs on every boot (idempotent), so a host always matches the lab's state.
    """
    root = hd.merged
    (root / "etc/hostname").write_text(hostname + "\n")
    hosts = root / "etc/hosts"
    old = hosts.read_text() if hosts.exists() else "127.0.0.1\tlocalhost\n::1\tlocalhost\n"
    lines = [ln for ln in old.splitlines() if not ln.startswith("127.0.1.1")]
    hosts.write_text("\n".join([*lines, f"127.0.1.1\t{hostname}"]) + "\n")
    if login_user:
        access.provision_login(root, login_user, authorized_key)
    else:
        ssh_dir = root / "root/.ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        keys = ssh_dir / "authorized_keys"
        keys.write_text(authorized_key.strip() + "\n")
        keys.chmod(0o600)
    # Sorts before the image's 80-container-host0.network, which would give a 169.254 address.
    network = [
        "[Match]", "Name=host0", "", "[Network]", f"Address={ip}/{prefix}",
        f"Gateway={gateway}", *([f"DNS={dns}"] if dns else []), "",
    ]
    (root / "etc/systemd/network/10-lab.network").write_text("\n".join(network))
    # No systemd-resolved in a minimal Debian: resolv.conf is what glibc reads.
    resolv = root / "etc/resolv.conf"
    if resolv.is_symlink():
        resolv.unlink()
    resolv.write_text(f"nameserver {dns}\n" if dns else "")
    # Each host its own SSH host keys, made before first boot so the lab can pin them.
    if not list((root / "etc/ssh").glob("ssh_host_*_key")):
        run(["ssh-keygen", "-A", "-f", str(root)])


def host_keys(hd: HostDir) -> list[str]:
    """The host's public host keys as 'type base64' strings (read from its own disk)."""
    keys = []
    for pub in sorted((hd.upper / "etc/ssh").glob("ssh_host_*_key.pub")):
        parts = pub.read_text().split()
        keys.append(f"{parts[0]} {parts[1]}")
    return keys


# -- processes ----------------------------------------------------------------------------

def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return None


def find_nspawn(machine: str) -> int | None:
    """PID of the live systemd-nspawn running machine (zombies have no cmdline: skipped)."""
    want = f"--machine={machine}"
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        cmdline = _read(f"/proc/{entry}/cmdline")
        if not cmdline:
            continue
        argv = cmdline.split("\0")
        if argv and argv[0].endswith("systemd-nspawn") and want in argv:
            return int(entry)
    return None


def init_pid(nspawn_pid: int) -> int | None:
    """The host's init: the child of the nspawn process (nspawn is a child subreaper)."""
    children = _read(f"/proc/{nspawn_pid}/task/{nspawn_pid}/children")
    for pid in (children or "").split():
        stat = _read(f"/proc/{pid}/stat")
        if stat and stat.rsplit(")", 1)[1].split()[0] != "Z":
            return int(pid)
    return None


def pidns_members(pid: int) -> list[int]:
    """Every controller-side PID in the same PID namespace as pid (the host's processes)."""
    try:
        ns = os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return []
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") == ns:
                    members.append(int(entry))
            except OSError:
                continue
    return members


def spawn(hd: HostDir, *, machine: str, hostname: str, bridge: str) -> subprocess.Popen:
    """Boot the host detached: own session, stdin /dev/null, console to nspawn.log.

    It survives the CLI exiting. --register=no --keep-unit: there is no machined / systemd
    PID 1 on the controller to register with.
    """
    argv = ["systemd-nspawn", "-D", str(hd.merged), "--boot", "--register=no", "--keep-unit",
            f"--network-bridge={bridge}", f"--machine={machine}", f"--hostname={hostname}",
            "--resolv-conf=off", "--link-journal=no", "--timezone=off"]
    with open(hd.log, "ab") as log:
        log.write(f"\n=== boot {time.strftime('%F %T')}: {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
    return proc


def log_tail(hd: HostDir, lines: int = 6) -> str:
    text = _read(str(hd.log)) or ""
    return "\n".join(text.strip().splitlines()[-lines:])


def wait_gone(machine: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if find_nspawn(machine) is None:
            return True
        time.sleep(0.1)
    return False


def kill_init(machine: str) -> None:
    """Hard crash: SIGKILL the host's init; the kernel then kills every process in it.

    (Killing only nspawn would leave the host running.)
    """
    pid = find_nspawn(machine)
    if pid is None:
        return
    init = init_pid(pid)
    if init is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(init, signal.SIGKILL)
    if not wait_gone(machine, 15):
        os.kill(pid, signal.SIGKILL)
        if not wait_gone(machine, 5):
            raise LabError(f"host {machine} did not exit after SIGKILL")


def poweroff(machine: str, timeout: float = 30) -> None:
    """Clean shutdown from inside (systemd stops units in order), then wait for exit."""
    pid = find_nspawn(machine)
    if pid is None:
        return
    init = init_pid(pid)
    if init is not None:
        run(["nsenter", "-t", str(init), "-a", "systemctl", "poweroff"], check=False, timeout=15)
    if not wait_gone(machine, timeout):
        kill_init(machine)


def nspawn_under(prefix: str) -> list[str]:
    """Machine names of live nspawn processes booting a directory under prefix."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        argv = (_read(f"/proc/{entry}/cmdline") or "").split("\0")
        if not argv[0].endswith("systemd-nspawn") or "-D" not in argv[:-1]:
            continue
        if argv[argv.index("-D") + 1].startswith(prefix):
            found += [a.split("=", 1)[1] for a in argv if a.startswith("--machine=")]
    return found


def stray_inits(upper_prefix: str) -> list[int]:
    """Inits of hosts whose upper dir lies under upper_prefix, with or without their nspawn.

    Catches the case where nspawn alone was SIGKILLed and the host runs on, orphaned.
    Recognised by what they are, not by a pid file: PID 1 of their own namespace, with a root
    overlay whose upperdir lies under upper_prefix.
    """
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        status = _read(f"/proc/{entry}/status") or ""
        nspid = next((ln.split()[1:] for ln in status.splitlines() if ln.startswith("NSpid:")),
                     [])
        if len(nspid) < 2 or nspid[-1] != "1":
            continue
        for line in (_read(f"/proc/{entry}/mountinfo") or "").splitlines():
            fields = line.split()
            if len(fields) > 4 and fields[4] == "/":
                opts = dict(o.split("=", 1) for o in fields[-1].split(",") if "=" in o)
                if opts.get("upperdir", "").startswith(upper_prefix):
                    found.append(int(entry))
                break
    return found


def kill_strays(upper_prefix: str) -> None:
    pids = stray_inits(upper_prefix)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if Path(f"/proc/{p}").exists() and
                (_read(f"/proc/{p}/stat") or ")  Z").rsplit(")", 1)[1].split()[0] != "Z"]
        time.sleep(0.05)
