"""`python -m deploy.lab [--name NAME] [--subnet CIDR] COMMAND`: a thin layer over Lab."""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import Lab, image
from .checks import preflight
from .image import DISTROS
from .inventory import ALL_GROUPS
from .util import LabError, die


def _distros(value: str) -> list[str]:
    names = [d.strip() for d in value.split(",") if d.strip()]
    for d in names:
        if d not in DISTROS:
            raise argparse.ArgumentTypeError(f"unknown distro {d!r} (use {', '.join(DISTROS)})")
    return names


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deploy.lab",
                                description="Real Debian hosts (systemd-nspawn) on this box.")
    p.add_argument("--name", default=os.environ.get("TASKFLEET_LAB", "lab"),
                   help="which lab (default: $TASKFLEET_LAB or 'lab')")
    p.add_argument("--subnet", help="the lab's IPv4 subnet, set on first up "
                   "(default 10.77.0.0/24)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="boot the hosts (idempotent) and write the inventory")
    up.add_argument("--redis", type=int, default=1)
    up.add_argument("--replicas", type=int, default=0,
                    help="Redis replicas (group redis_replicas: the HA tier, with Sentinels)")
    up.add_argument("--workers", type=int, default=2)
    up.add_argument("--clients", type=int, default=0)
    up.add_argument("--spare", type=int, default=0, help="booted, not in the inventory")
    up.add_argument("--distros", type=_distros, default=["bookworm"],
                    help="comma list, round-robin over hosts (bookworm,trixie)")
    up.add_argument("--login-user", metavar="USER",
                    help="log in as USER (passwordless sudo) instead of root, whose SSH login "
                         "is turned off, as on a cloud image; inventory: ansible_become=true")
    up.add_argument("--names", action="store_true",
                    help="the inventory names the hosts (no ansible_host): /etc/hosts entries "
                         "on every host and on this controller, removed at down")

    add = sub.add_parser("add", help="boot one more host")
    add.add_argument("host")
    add.add_argument("--group", required=True, choices=ALL_GROUPS)
    add.add_argument("--distro", choices=list(DISTROS))

    st = sub.add_parser("status", help="hosts with group, distro, IP and state")
    st.add_argument("--json", action="store_true")

    ssh = sub.add_parser("ssh", help="shell, or run a command, on a host")
    ssh.add_argument("host")
    ssh.add_argument("cmd", nargs=argparse.REMAINDER)

    for name, text in [("crash", "SIGKILL the host's init"), ("start", "boot it again"),
                       ("stop", "clean poweroff"), ("partition", "cut its network"),
                       ("heal", "restore its network")]:
        sub.add_parser(name, help=text).add_argument("host")
    sub.add_parser("down", help="stop all hosts, remove everything the lab made")
    images = sub.add_parser("images", help="build (or check) the cached base images only")
    images.add_argument("--distros", type=_distros, default=list(DISTROS))
    return p


def print_table(rows: list[dict]) -> None:
    if not rows:
        print("no hosts")
        return
    fmt = "{:<12} {:<8} {:<9} {:<15} {}"
    print(fmt.format("HOST", "GROUP", "DISTRO", "IP", "STATE"))
    for r in rows:
        print(fmt.format(r["name"], r["group"], r["distro"], r["ip"], r["state"]))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        preflight()
        lab = Lab(args.name, subnet=args.subnet)
        cmd = args.command
        if cmd == "up":
            print_table(lab.up(redis=args.redis, workers=args.workers, clients=args.clients,
                                spare=args.spare, distros=args.distros,
                                login_user=args.login_user, names=args.names,
                                replicas=args.replicas))
        elif cmd == "add":
            print_table([lab.add(args.host, args.group, args.distro)])
        elif cmd == "status":
            rows = lab.status()
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                print_table(rows)
        elif cmd == "ssh":
            if lab.init_pid(args.host) is None and args.host in lab.hosts():
                die(f"host {args.host} is not running",
                    f"start it: python -m deploy.lab --name {lab.name} start {args.host}")
            argv_ = lab.ssh_argv(args.host, *args.cmd, tty=not args.cmd and sys.stdin.isatty())
            sys.stdout.flush()
            os.execvp(argv_[0], argv_)  # noqa: S606 -- exit code of the remote command passes through
        elif cmd == "down":
            lab.down()
        elif cmd == "images":
            for distro, seconds in image.ensure_images(args.distros).items():
                built = f"built in {seconds:.0f} s" if seconds is not None else "cached"
                print(f"{distro:<10} {built:<16} {image.image_dir(distro)}")
        else:
            getattr(lab, cmd)(args.host)
    except LabError as exc:
        error = exc
    except OSError as exc:  # e.g. a file the lab needs vanished: still one line, no traceback
        error = LabError(str(exc))
    except KeyboardInterrupt:
        error = LabError("interrupted")
    else:
        return 0
    print(f"lab: error: {error}", file=sys.stderr)
    return 1
