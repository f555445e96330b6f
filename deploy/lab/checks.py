"""What the lab checks before it changes anything: this machine (Linux, root, the tools) and
the subnet asked for."""

from __future__ import annotations

import ipaddress
import os
import shutil
import sys

from .util import LabError

# apt package that provides each tool the lab runs on the controller.
TOOLS = {
    "systemd-nspawn": "systemd-container", "debootstrap": "debootstrap",
    "iptables": "iptables", "ip": "iproute2", "ssh": "openssh-client",
    "ssh-keygen": "openssh-client", "nsenter": "util-linux", "mount": "mount",
}


def parse_subnet(text: str) -> ipaddress.IPv4Network:
    try:
        subnet = ipaddress.IPv4Network(text, strict=False)
    except ValueError as exc:
        raise LabError(f"invalid subnet {text!r}", "e.g. --subnet 10.78.0.0/24") from exc
    if subnet.prefixlen > 26:
        raise LabError(f"subnet {subnet} is too small", "use a /26 or larger, e.g. /24")
    return subnet


def preflight() -> None:
    """Root, Linux and the controller tools; one line naming what is missing and the fix."""
    if not sys.platform.startswith("linux"):
        raise LabError("the lab needs Linux (systemd-nspawn, overlayfs, bridges)",
                       "run it on a Debian/Ubuntu box")
    if os.geteuid() != 0:
        raise LabError("the lab needs root (mounts, bridges, iptables, nspawn)",
                       "run it with sudo or as root")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pkgs = " ".join(dict.fromkeys(TOOLS[t] for t in missing))
        raise LabError(f"missing {', '.join(missing)}", f"install with: apt-get install -y {pkgs}")
