"""Booting lab hosts: their disks prepared in parallel, nspawn started, and each one waited
for until SSH answers with systemd up. Functions of a Lab, apart from its bookkeeping; they
use its package-private helpers (_hostdir, _save, _nspawn)."""

from __future__ import annotations

import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from . import host as hostmod
from . import network
from .checks import parse_subnet
from .util import LabError, run

if TYPE_CHECKING:
    from . import Lab

BOOT_TIMEOUT = 90.0
# A host still refusing logins this long after its boot began gets /run/nologin removed (see
# release_logins); a boot takes a few seconds, even with the whole suite running.
NOLOGIN_GRACE = 20.0


def boot_hosts(lab: Lab, state: dict, names: list[str]) -> None:
    """Boot hosts in parallel and wait until each answers SSH with systemd up."""
    if not names:
        return
    subnet = parse_subnet(state["subnet"])
    dns = network.controller_nameserver()
    pubkey = Path(f"{lab.key}.pub").read_text()
    hostmod.raise_inotify_limit()

    def prepare(name: str) -> None:
        h = state["hosts"][name]
        img = Path(h["image"])
        if not img.is_dir():
            raise LabError(f"image {img} of host {name} is gone from the cache",
                           f"python -m deploy.lab --name {lab.name} down, then up")
        hd = lab._hostdir(name)
        # Never two inits on one disk: clear a half-dead earlier boot of this host first.
        hostmod.kill_init(lab.machine(name))
        hostmod.kill_strays(str(hd.upper))
        # A killed host's veth outlives it for a moment (the kernel tears its netns down
        # asynchronously); nspawn would fail with "File exists" on the same name.
        if h.get("veth"):
            network.wait_link_gone(h["veth"])
        hostmod.mount(hd, img)
        hostmod.provision(hd, hostname=name, ip=h["ip"], prefix=subnet.prefixlen,
                          gateway=str(subnet.network_address + 1), dns=dns,
                          authorized_key=pubkey, login_user=state.get("login_user"))

    def boot(name: str) -> None:
        proc = hostmod.spawn(lab._hostdir(name), machine=lab.machine(name),
                             hostname=name, bridge=lab.bridge)
        wait_ready(lab, name, proc=proc)
        init = lab.init_pid(name)
        if init:
            state["hosts"][name]["veth"] = network.veth_of(init)

    with ThreadPoolExecutor(max_workers=min(8, len(names))) as pool:
        for f in [pool.submit(prepare, n) for n in names]:
            f.result()
        write_known_hosts(lab, state)
        for n in names:
            state["hosts"][n]["wanted"] = "running"
        lab._save(state)
        lab.log(f"lab: booting {', '.join(names)}")
        errors = [f.exception() for f in [pool.submit(boot, n) for n in names]]
        lab._save(state)
    for err in errors:
        if err is not None:
            raise err


def write_known_hosts(lab: Lab, state: dict) -> None:
    """Pin every host's SSH keys (read from its disk) for the lab's ssh commands, under its
    address, and under its name too when the inventory names the hosts (--names)."""
    lines = [f"{n + ',' if state.get('names') else ''}{h['ip']} {key}"
             for n, h in state["hosts"].items() for key in hostmod.host_keys(lab._hostdir(n))]
    tmp = lab.known_hosts.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, lab.known_hosts)


def wait_ready(lab: Lab, name: str, timeout: float = BOOT_TIMEOUT,
               proc: subprocess.Popen | None = None) -> None:
    """Until SSH answers and `systemctl is-system-running` is running or degraded."""
    start = time.monotonic()
    deadline = start + timeout
    last = "no answer"
    released = False
    while time.monotonic() < deadline:
        if not released and time.monotonic() - start > NOLOGIN_GRACE:
            released = release_logins(lab, name)
        exited = proc.poll() is not None if proc else lab._nspawn(name) is None
        if exited:
            tail = hostmod.log_tail(lab._hostdir(name))
            code = f" (exit code {proc.returncode})" if proc else ""
            raise LabError(f"host {name} exited while booting{code}; last lines of "
                           f"{lab._hostdir(name).log}:\n{tail}")
        answer = run(lab.ssh_argv(name, "systemctl is-system-running"), check=False,
                     timeout=15)
        last = (answer.stdout.strip() or answer.stderr.strip()
                or "no answer").splitlines()[-1]
        if last in ("running", "degraded"):
            return
        time.sleep(0.3)
    raise LabError(f"host {name} ({lab.ip(name)}) not ready after {timeout:.0f} s "
                   f"(last answer: {last})", f"see {lab._hostdir(name).log}")


def release_logins(lab: Lab, name: str) -> bool:
    """Remove /run/nologin from a host whose boot left it there; True if it was there.

    systemd removes it when the boot reaches multi-user (systemd-user-sessions.service). In
    nspawn on this box's hybrid cgroups a unit's process now and then cannot join its cgroup
    at boot ("Failed to attach to cgroup ... No such file or directory", status=219/CGROUP);
    when that unit is systemd-user-sessions, the host never lets the lab's sudo user log in
    (root's SSH login is off on the shared lab). The host is otherwise up (degraded)."""
    init = lab.init_pid(name)
    if init is None:
        return False
    nologin = Path(f"/proc/{init}/root/run/nologin")
    try:
        nologin.unlink()
    except FileNotFoundError:
        return False
    lab.log(f"lab: {name}: logins still refused {NOLOGIN_GRACE:.0f} s into its boot "
            "(systemd-user-sessions failed?): removed /run/nologin")
    return True
