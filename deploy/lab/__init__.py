"""The local lab: real Debian hosts (systemd-nspawn) on one Linux box, for deploy tests.

Python API (the CLI in cli.py is a thin layer over it):

    lab = Lab("labtest", subnet="10.78.0.0/24")
    lab.up(redis=1, workers=2, clients=0, spare=1, distros=("bookworm", "trixie"))
    lab.up(login_user="admin", names=True)  # the cloud way: sudo user, hosts by name
    lab.ssh("worker1", "hostname").stdout
    lab.crash("worker1"); lab.start("worker1"); lab.partition("redis1"); lab.heal("redis1")
    lab.down()

Each lab has its own state dir /var/lib/taskfleet-lab/<name>/ (state.json, SSH key pair,
known_hosts, host dirs), bridge tf-<name>, subnet, NAT rule and inventory/<name>/hosts.ini.

One word per idea: util.LabError (message, hint) is the one error a user can fix, util.die()
raises it, cli.main() prints it as one line `lab: error: ...` (exit 1); util.run() is the one
subprocess helper; cli.print_table the one table printer.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import access, boot, image, inventory, network
from . import host as hostmod
from .boot import BOOT_TIMEOUT
from .checks import parse_subnet, preflight
from .util import LabError, run

__all__ = ["Lab", "LabError"]

STATE_ROOT = Path("/var/lib/taskfleet-lab")
DEFAULT_NAME = "lab"
DEFAULT_SUBNET = "10.77.0.0/24"
FIRST_HOST = 10  # host addresses start at .10 of the subnet; .1 is the bridge (gateway)
GROUP_PREFIX = {"redis": "redis", "redis_replicas": "replica", "workers": "worker",
                "clients": "client", "spare": "spare"}
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,11}$")
_HOST_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Lab:
    def __init__(self, name: str | None = None, subnet: str | None = None, log=_stderr) -> None:
        name = name or os.environ.get("TASKFLEET_LAB") or DEFAULT_NAME
        if not _NAME_RE.match(name):
            raise LabError(f"invalid lab name {name!r}",
                           "use 1-12 lowercase letters, digits or '-'")
        self.name = name
        self._subnet_arg = subnet
        self.log = log
        self.state_dir = STATE_ROOT / name
        self.bridge = network.bridge_name(name)
        self.inventory_dir = inventory.inventory_dir(name)
        self.inventory_path = self.inventory_dir / "hosts.ini"
        self.key = self.state_dir / "ssh" / "id_ed25519"
        self.known_hosts = self.state_dir / "ssh" / "known_hosts"
        self.timings: dict[str, object] = {}

    # -- state ----------------------------------------------------------------------------

    @property
    def _state_file(self) -> Path:
        return self.state_dir / "state.json"

    def _load(self) -> dict | None:
        try:
            state = json.loads(self._state_file.read_text())
            if isinstance(state, dict) and "subnet" in state and "hosts" in state:
                return state
        except (OSError, ValueError):
            pass
        return None

    def _require(self) -> dict:
        state = self._load()
        if state is None:
            raise LabError(f"lab {self.name!r} is not up",
                           f"run: python -m deploy.lab --name {self.name} up")
        return state

    def _save(self, state: dict) -> None:
        tmp = self._state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, self._state_file)

    def _host(self, state: dict, name: str) -> dict:
        if name not in state["hosts"]:
            raise LabError(f"no host {name!r} in lab {self.name!r}",
                           f"hosts: {', '.join(state['hosts']) or 'none'}")
        return state["hosts"][name]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One command at a time per lab (two terminals running `up` must not race)."""
        # In /run (tmpfs): a lock file is not something `down` has to clean up.
        with open(f"/run/lock/taskfleet-lab-{self.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def machine(self, name: str) -> str:
        """nspawn machine name: unique across labs."""
        return f"{self.name}-{name}"

    def _hostdir(self, name: str) -> hostmod.HostDir:
        return hostmod.HostDir(self.state_dir / "hosts" / name)

    # -- queries ----------------------------------------------------------------------------

    def _nspawn(self, name: str) -> int | None:
        return hostmod.find_nspawn(self.machine(name))

    def init_pid(self, name: str) -> int | None:
        """Controller-side PID of the host's init, or None if it is not running."""
        pid = self._nspawn(name)
        return hostmod.init_pid(pid) if pid else None

    def _running_init(self, name: str) -> int:
        self._host(self._require(), name)
        pid = self.init_pid(name)
        if pid is None:
            raise LabError(f"host {name!r} is not running",
                           f"start it: python -m deploy.lab --name {self.name} start {name}")
        return pid

    def _state_of(self, name: str, h: dict) -> str:
        init = self.init_pid(name)
        if init is None:
            return "stopped" if h.get("wanted") == "stopped" else "crashed"
        try:
            veth = network.veth_of(init)
            flags = int(Path(f"/sys/class/net/{veth}/flags").read_text(), 16)
        except (LabError, OSError, ValueError):
            return "running"  # still booting its network: not a partition
        return "running" if flags & 1 else "partitioned"

    def status(self) -> list[dict]:
        state = self._load()
        if state is None:
            return []
        return [{"name": n, "group": h["group"], "distro": h["distro"], "ip": h["ip"],
                 "state": self._state_of(n, h), "machine": self.machine(n),
                 "init_pid": self.init_pid(n)}
                for n, h in state["hosts"].items()]

    def ip(self, name: str) -> str:
        return self._host(self._require(), name)["ip"]

    def hosts(self, group: str | None = None) -> list[str]:
        state = self._load() or {"hosts": {}}
        return [n for n, h in state["hosts"].items() if group in (None, h["group"])]

    # -- commands in hosts ------------------------------------------------------------------

    def ssh_argv(self, name: str, *cmd: str, tty: bool = False) -> list[str]:
        """ssh argv for a host: the lab's key, pinned host keys, no user ssh config.

        One cmd argument is a shell command line (as with ssh); several are quoted as argv.
        """
        argv = ["ssh", "-F", "/dev/null", "-i", str(self.key),
                "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
                "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR"]
        if tty:
            argv.append("-t")
        user = self._require().get("login_user")
        argv.append(f"{user or 'root'}@{self.ip(name)}")
        if user:  # root cannot log in: the command runs through the login user's sudo
            cmd = (shlex.join(access.remote_command(cmd)),)
        if len(cmd) == 1:
            argv.append(cmd[0])
        elif cmd:
            argv.append(shlex.join(cmd))
        return argv

    def ssh(self, name: str, *cmd: str, check: bool = True, timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        return run(self.ssh_argv(name, *cmd), check=check, timeout=timeout, input=input)

    def nsenter(self, name: str, *cmd: str, check: bool = True, timeout: float = 60,
                input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run argv inside the host's namespaces, without SSH (works while partitioned)."""
        pid = self._running_init(name)
        return run(["nsenter", "-t", str(pid), "-a", *cmd], check=check, timeout=timeout,
                   input=input)

    # -- up / add ---------------------------------------------------------------------------

    def _clean_leftovers(self) -> None:
        """A state dir without a readable state.json is what a killed run leaves: clear it."""
        if self.state_dir.exists() and self._load() is None:
            self.log(f"lab: removing leftovers of an earlier {self.name!r} run")
            self._teardown()

    def _new_state(self) -> dict:
        subnet = parse_subnet(self._subnet_arg or DEFAULT_SUBNET)
        return {"name": self.name, "subnet": str(subnet), "hosts": {}}

    def _next_ip(self, state: dict) -> str:
        subnet = parse_subnet(state["subnet"])
        used = {h["ip"] for h in state["hosts"].values()}
        for addr in list(subnet.hosts())[FIRST_HOST - 1:]:
            if str(addr) not in used:
                return str(addr)
        raise LabError(f"subnet {subnet} is full", "down the lab and use a larger --subnet")

    def _plan(self, state: dict, name: str, group: str, distro: str) -> None:
        if not _HOST_RE.match(name):
            raise LabError(f"invalid host name {name!r}",
                           "use lowercase letters, digits and '-', starting with a letter")
        if group not in GROUP_PREFIX:
            raise LabError(f"unknown group {group!r}", f"use one of: {', '.join(GROUP_PREFIX)}")
        image.check_distro(distro)
        state["hosts"][name] = {"group": group, "ip": self._next_ip(state), "distro": distro,
                                "image": str(image.image_dir(distro)), "wanted": "running"}

    def _prepare_net(self, state: dict) -> None:
        subnet = parse_subnet(state["subnet"])
        network.check_subnet_free(subnet, self.bridge)
        network.ensure_bridge(self.bridge, str(subnet.network_address + 1), subnet.prefixlen)
        network.ensure_nat(self.name, state["subnet"], self.bridge)

    def _ensure_key(self) -> None:
        self.key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.key.exists():
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                 f"taskfleet-lab-{self.name}", "-f", str(self.key)])
        self.key.chmod(0o600)

    def _write_inventory(self, state: dict) -> None:
        """hosts.ini; with --names also every host's and the controller's /etc/hosts lines."""
        if state.get("names"):
            access.write_host_files(self.name, [self._hostdir(n).merged for n in state["hosts"]
                                                if self.init_pid(n)], state["hosts"])
            access.write_controller(self.name, state["hosts"])
        inventory.write(self.name, state["hosts"], self.key, self.known_hosts,
                        login_user=state.get("login_user"), names=bool(state.get("names")))

    def wait_ready(self, name: str, timeout: float = BOOT_TIMEOUT,
                   proc: subprocess.Popen | None = None) -> None:
        """Until SSH answers and `systemctl is-system-running` is running or degraded."""
        boot.wait_ready(self, name, timeout, proc)

    def up(self, redis: int = 1, workers: int = 2, clients: int = 0, spare: int = 0,
           distros: Iterable[str] = ("bookworm",), login_user: str | None = None,
           names: bool = False, replicas: int = 0) -> list[dict]:
        """Boot (or complete) the lab; idempotent: running hosts are left alone. login_user:
        log in as that sudo user, root login off; names: the inventory names the hosts;
        replicas: hosts of the [redis_replicas] group (the Redis HA tier), replica1..N."""
        preflight()
        distros = list(distros) or [image.DEFAULT_DISTRO]
        for d in distros:
            image.check_distro(d)
        counts = {"redis": redis, "redis_replicas": replicas, "workers": workers,
                  "clients": clients, "spare": spare}
        if any(c < 0 for c in counts.values()):
            raise LabError("host counts must not be negative")
        start = time.monotonic()
        with self._locked():
            self._clean_leftovers()
            state = self._load()
            if state is None:
                state = self._new_state() | access.options(login_user, names)
            access.check_options(self.name, state, login_user, names)
            if self._subnet_arg and parse_subnet(self._subnet_arg) \
                    != parse_subnet(state["subnet"]):
                raise LabError(f"lab {self.name!r} already uses subnet {state['subnet']}",
                               "down it first to change the subnet")
            # Refuse a colliding subnet before creating anything.
            network.check_subnet_free(parse_subnet(state["subnet"]), self.bridge)
            (self.state_dir / "hosts").mkdir(parents=True, exist_ok=True)
            for group, count in counts.items():
                for i in range(1, count + 1):
                    name = f"{GROUP_PREFIX[group]}{i}"
                    if name not in state["hosts"]:
                        distro = distros[len(state["hosts"]) % len(distros)]
                        self._plan(state, name, group, distro)
            if state.get("names"):
                access.check_controller_names(self.name, list(state["hosts"]))
            self._prepare_net(state)
            self._ensure_key()
            self._save(state)
            todo = [n for n in state["hosts"] if self.init_pid(n) is None]
            t0 = time.monotonic()
            built = image.ensure_images([state["hosts"][n]["distro"] for n in todo], self.log)
            self.timings["image_build"] = {d: s for d, s in built.items() if s is not None}
            t1 = time.monotonic()
            boot.boot_hosts(self, state, todo)
            self._write_inventory(state)
            self.timings.update(images=round(t1 - t0, 1), boot=round(time.monotonic() - t1, 1),
                                up=round(time.monotonic() - start, 1), booted=todo)
        self.log(f"lab: {self.name} up: {len(state['hosts'])} hosts "
                 f"({len(todo)} booted) in {time.monotonic() - start:.1f} s; "
                 f"inventory {self.inventory_path}")
        return self.status()

    def add(self, name: str, group: str, distro: str | None = None) -> dict:
        """Boot one more host; it joins the inventory unless its group is 'spare'."""
        preflight()
        with self._locked():
            state = self._require()
            if name in state["hosts"]:
                raise LabError(f"host {name!r} already exists in lab {self.name!r}",
                               "pick another name")
            self._plan(state, name, group, distro or image.DEFAULT_DISTRO)
            if state.get("names"):
                access.check_controller_names(self.name, [name])
            image.ensure_images([state["hosts"][name]["distro"]], self.log)
            self._prepare_net(state)
            self._save(state)
            try:
                boot.boot_hosts(self, state, [name])
            finally:
                self._write_inventory(state)
        return next(s for s in self.status() if s["name"] == name)

    # -- faults -----------------------------------------------------------------------------

    def crash(self, name: str) -> None:
        """SIGKILL the host's init: all its processes die at once; its disk stays."""
        self._running_init(name)
        hostmod.kill_init(self.machine(name))

    def start(self, name: str) -> None:
        """Boot a stopped or crashed host again, with its disk as it was."""
        preflight()
        with self._locked():
            state = self._require()
            self._host(state, name)
            if self.init_pid(name) is not None:
                return
            self._prepare_net(state)
            boot.boot_hosts(self, state, [name])

    def stop(self, name: str) -> None:
        """Clean poweroff from inside the host; waits for it to exit."""
        with self._locked():
            state = self._require()
            self._host(state, name)["wanted"] = "stopped"
            self._save(state)
            hostmod.poweroff(self.machine(name))

    def _set_link(self, name: str, updown: str) -> None:
        veth = network.veth_of(self._running_init(name))
        run(["ip", "link", "set", veth, updown])

    def partition(self, name: str) -> None:
        """Cut the host off the network (its veth down on the controller side)."""
        self._set_link(name, "down")

    def heal(self, name: str) -> None:
        self._set_link(name, "up")

    # -- down -------------------------------------------------------------------------------

    def _teardown(self) -> None:
        """Remove everything of this lab, whether or not state.json survived."""
        prefix = str(self.state_dir / "hosts") + "/"
        machines = {self.machine(n) for n in self.hosts()}
        with contextlib.suppress(OSError):  # host dirs survive a lost state.json
            machines |= {self.machine(d.name) for d in (self.state_dir / "hosts").iterdir()}
        machines |= set(hostmod.nspawn_under(prefix))
        with ThreadPoolExecutor(max_workers=max(1, min(8, len(machines)))) as pool:
            for f in [pool.submit(hostmod.kill_init, m) for m in machines]:
                f.result()
        hostmod.kill_strays(prefix)
        hostmod.umount_under(self.state_dir)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        # nspawn leaves an empty propagation dir per machine when /run is not a tmpfs.
        for m in machines:
            with contextlib.suppress(OSError):
                Path("/run/systemd/nspawn/propagate", m).rmdir()
        for port in network.bridge_ports(self.bridge):  # normally gone with their hosts
            run(["ip", "link", "delete", port["ifname"]], check=False)
        network.delete_bridge(self.bridge)
        network.delete_nat(self.name)
        access.remove_controller(self.name)
        shutil.rmtree(self.inventory_dir, ignore_errors=True)

    def down(self) -> None:
        """Stop every host and remove all the lab made (the image cache stays)."""
        preflight()
        with self._locked():
            self._teardown()
            with contextlib.suppress(OSError):
                Path(f"/run/lock/taskfleet-lab-{self.name}.lock").unlink()
        self.log(f"lab: {self.name} is down")
