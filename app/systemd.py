"""The two messages a Taskfleet worker sends to systemd: readiness and watchdog pings.

sd_notify is one datagram on a Unix socket (systemd's sd_notify(3)); no library needed.

**Readiness.** The worker unit is Type=notify: `systemctl (re)start` returns once the worker is
connected to Redis and consuming, so a rolling deploy waits for real readiness, and a worker that
cannot get ready fails its start instead of counting as running.

**Watchdog.** With WatchdogSec= in the unit, systemd restarts a worker that stops pinging. The
worker pings from its own event loop (app/celery.py), so a main process that is alive but no
longer looping, and would sit there forever, gets restarted. The case that made it necessary:
a pool child killed at its hard time limit while the network to Redis was down left a partial
message in the result pipe; the main process failed with "Unrecoverable error: UnpicklingError"
and its shutdown then blocked for good on that pipe, still "active (running)" for systemd, so
Restart= never fired and the host's queue (host.<name>) stalled. tests/lab/test_faults.py
freezes a worker's main process to prove the restart.
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
