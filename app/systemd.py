"""The two messages a Taskfleet worker sends to systemd: readiness and watchdog pings.

sd_notify is one datagram on a Unix socket (systemd's sd_notify(3)); no library needed.
Readiness: the worker unit is Type=notify, so `systemctl (re)start` returns once the worker is
connected and consuming (a rolling deploy waits for real readiness). Watchdog: with WatchdogSec=
in the unit, systemd restarts a worker whose event loop stops pinging, such as a main process
stuck after an UnpicklingError (docs/RELIABILITY.md, "Four bugs", 4).
"""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1") to systemd's notify socket, if the service has one."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(state.encode())
    return True


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (a third of WatchdogSec), None if there is no watchdog.

    systemd sets WATCHDOG_USEC for the service's main process, and WATCHDOG_PID to its pid:
    processes that inherit the environment (the pool's children) must not ping for it.
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1e6 / 3


def watchdog_ping() -> bool:
    """One ping, if this process has a watchdog (also used while waiting on purpose)."""
    return watchdog_interval() is not None and notify("WATCHDOG=1")
