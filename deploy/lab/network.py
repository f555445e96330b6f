"""The lab's private network: one bridge per lab, NAT to Debian's archive, veth lookup."""

from __future__ import annotations

import ipaddress
import itertools
import json
import shlex
import time
from pathlib import Path

from .util import LabError, run


def bridge_name(lab: str) -> str:
    name = f"tf-{lab}"
    if len(name) > 15:  # IFNAMSIZ - 1
        raise LabError(f"lab name {lab!r} is too long for a bridge name ({name} > 15 chars)",
                       "use a lab name of at most 12 characters")
    return name


def nat_comment(lab: str) -> str:
    return f"taskfleet-lab:{lab}"


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def wait_link_gone(name: str, timeout: float = 3.0) -> None:
    """Wait for a dying link to vanish; delete it if it lingers."""
    deadline = time.monotonic() + timeout
    while link_exists(name) and time.monotonic() < deadline:
        time.sleep(0.05)
    if link_exists(name):
        run(["ip", "link", "delete", name], check=False)


def controller_nameserver() -> str | None:
    """The first nameserver of the controller; hosts resolve through it via NAT."""
    try:
        for line in Path("/etc/resolv.conf").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                addr = ipaddress.ip_address(parts[1].split("%")[0])
                if not addr.is_loopback:  # a loopback stub is unreachable from a host
                    return str(addr)
    except (OSError, ValueError):
        pass
    return None


def check_subnet_free(subnet: ipaddress.IPv4Network, bridge: str) -> None:
    """Refuse a subnet that overlaps a route the controller already has (except our bridge)."""
    routes = json.loads(run(["ip", "-j", "route"]).stdout or "[]")
    for route in routes:
        dst = route.get("dst")
        if not dst or dst == "default" or route.get("dev") == bridge:
            continue
        try:
            net = ipaddress.ip_network(dst, strict=False)
        except ValueError:
            continue
        if net.version == 4 and net.overlaps(subnet):
            raise LabError(f"subnet {subnet} collides with the controller's route {dst} "
                           f"dev {route.get('dev')}",
                           "pick a free one with --subnet, e.g. --subnet 10.79.0.0/24")


def ensure_bridge(bridge: str, gateway: str, prefix: int) -> None:
    """Create (or repair a leftover) bridge with the gateway address, and bring it up."""
    if not link_exists(bridge):
        run(["ip", "link", "add", bridge, "type", "bridge"])
    addrs = json.loads(run(["ip", "-j", "addr", "show", "dev", bridge]).stdout or "[]")
    have = {(a["local"], a["prefixlen"]) for i in addrs for a in i.get("addr_info", [])
            if a.get("family") == "inet"}
    if (gateway, prefix) not in have:
        run(["ip", "addr", "add", f"{gateway}/{prefix}", "dev", bridge])
    run(["ip", "link", "set", bridge, "up"])


def delete_bridge(bridge: str) -> None:
    if link_exists(bridge):
        run(["ip", "link", "delete", bridge])


def _nat_rule(lab: str, subnet: str, bridge: str) -> list[str]:
    return ["POSTROUTING", "-s", subnet, "!", "-o", bridge, "-j", "MASQUERADE",
            "-m", "comment", "--comment", nat_comment(lab)]


def ensure_nat(lab: str, subnet: str, bridge: str) -> None:
    """Hosts reach Debian's archive through the controller: forward + masquerade."""
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
    rule = _nat_rule(lab, subnet, bridge)
    if run(["iptables", "-w", "-t", "nat", "-C", *rule], check=False).returncode != 0:
        run(["iptables", "-w", "-t", "nat", "-A", *rule])


def nat_rules(lab: str) -> list[list[str]]:
    """The lab's NAT rules as split `iptables -S` lines (found by their comment)."""
    out = run(["iptables", "-w", "-t", "nat", "-S", "POSTROUTING"]).stdout
    tag = nat_comment(lab)
    rules = []
    for line in out.splitlines():
        argv = shlex.split(line)
        if argv[:1] == ["-A"] and any(a == "--comment" and b == tag
                                      for a, b in itertools.pairwise(argv)):
            rules.append(argv)
    return rules


def delete_nat(lab: str) -> None:
    """Delete every rule carrying the lab's comment (also ones from another subnet)."""
    for argv in nat_rules(lab):
        run(["iptables", "-w", "-t", "nat", "-D", *argv[1:]])


def bridge_ports(bridge: str) -> list[dict]:
    """Links enslaved to the bridge (the hosts' veths), as `ip -j link` dicts."""
    if not link_exists(bridge):
        return []
    return json.loads(run(["ip", "-j", "link", "show", "master", bridge]).stdout or "[]")


def veth_of(init_pid: int) -> str:
    """The controller-side veth of a running host.

    nspawn names it vb-<machine>, shortened (with a hash on this systemd) past 15 chars;
    rather than re-deriving that rule, ask the host's network namespace: host0's link_index
    is the ifindex of its peer in the controller's namespace.
    """
    out = run(["nsenter", "-t", str(init_pid), "-n", "ip", "-j", "link", "show", "host0"])
    ifindex = json.loads(out.stdout)[0]["link_index"]
    for link in json.loads(run(["ip", "-j", "link", "show"]).stdout or "[]"):
        if link.get("ifindex") == ifindex:
            return link["ifname"]
    raise LabError(f"no controller link with ifindex {ifindex} (host veth vanished?)")
