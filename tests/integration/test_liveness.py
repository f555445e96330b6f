"""The worker pings systemd's watchdog from its event loop, against a real Redis.

systemd is played by a Unix datagram socket (NOTIFY_SOCKET) and WATCHDOG_USEC, as the unit's
WatchdogSec= sets them: the worker must say READY=1, then ping while idle and while its pool
runs tasks, and stop pinging when its main process stops (systemd would then restart it).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from .itkit import BIN, ROOT, client_app, node_env

pytestmark = pytest.mark.integration
INTERVAL = 0.2  # WatchdogSec 0.6 s: a ping every 0.2 s


def pings(sock: socket.socket, seconds: float) -> list[bytes]:
    got, deadline = [], time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            got.append(sock.recv(256))
        except TimeoutError:
            break
    return got


def test_worker_pings_from_its_loop_and_stops_when_it_hangs(redis_server, tmp_path: Path):
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    env = node_env(tmp_path, redis_server.url(3), NOTIFY_SOCKET=str(path),
                   WATCHDOG_USEC=str(int(INTERVAL * 3 * 1e6)))
    env.pop("WATCHDOG_PID", None)
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(BIN / "celery"), "-A", "app", "worker", "-n", "wd@%h",
                                 "--pool", "prefork", "-c", "2", "-l", "INFO"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    client = client_app(env)
    try:
        # Start-up: READY=1 once consuming (pings may come first: the loop starts before).
        sock.settimeout(30)
        seen = [sock.recv(256)]
        while not seen[-1].startswith(b"READY=1"):
            seen.append(sock.recv(256))
        idle = [m for m in pings(sock, 1.0) if m == b"WATCHDOG=1"]
        assert len(idle) >= 3, idle  # ~5 in a second

        # Both pool processes busy for 1.5 s: the loop, and so the pings, go on.
        results = [client.send_task("app.tasks.sleep", args=[1.5]) for _ in range(2)]
        busy = [m for m in pings(sock, 1.0) if m == b"WATCHDOG=1"]
        assert len(busy) >= 3, busy
        assert all(r.get(timeout=15)["seconds"] == 1.5 for r in results)

        # The main process stops (as a hung one would): no more pings, systemd's cue.
        proc.send_signal(signal.SIGSTOP)
        pings(sock, 0.3)  # a datagram already in flight
        assert pings(sock, 1.0) == []
        proc.send_signal(signal.SIGCONT)
        assert b"WATCHDOG=1" in pings(sock, 1.0)
    finally:
        client.close()
        sock.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
