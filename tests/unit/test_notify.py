"""The worker's systemd readiness message (sd_notify), over a real Unix datagram socket."""

from __future__ import annotations

import contextlib
import socket
import time

import pytest


@pytest.fixture
def notify_socket(tmp_path, monkeypatch, app_env):
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def test_worker_ready_tells_systemd(notify_socket):
    from app import celery

    celery._worker_ready(sender=None)
    assert notify_socket.recv(1024) == b"READY=1\nSTATUS=consuming"


def test_shutdown_tells_systemd(notify_socket):
    from app import celery

    celery._worker_stopping(sender=None)
    assert notify_socket.recv(1024).startswith(b"STOPPING=1\n")


def test_no_notify_socket_sends_nothing(monkeypatch, app_env):
    from app import celery

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert celery.notify_systemd("READY=1") is False


@pytest.mark.parametrize(("usec", "pid", "expected"), [
    ("3000000", None, 1.0),          # WatchdogSec=3: ping every second
    ("3000000", "self", 1.0),        # systemd names this process
    ("3000000", "1", None),          # a pool child that inherited the environment
    ("0", None, None),
    ("", None, None),
    ("junk", None, None),
])
def test_watchdog_interval(monkeypatch, usec, pid, expected):
    import os

    from app.systemd import watchdog_interval

    monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is None:
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
    else:
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)
    assert watchdog_interval() == expected


def test_watchdog_step_pings_from_the_event_loop(notify_socket, monkeypatch):
    """The worker step puts a repeating ping on the worker's event loop (kombu's Hub)."""
    from types import SimpleNamespace

    from kombu.asynchronous import Hub

    from app import celery

    monkeypatch.setenv("WATCHDOG_USEC", "600000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    hub = Hub()
    worker = SimpleNamespace(hub=hub)
    step = celery.SystemdWatchdog(worker)
    step.start(worker)
    try:
        entries = list(hub.timer.queue)
        assert [e.entry.args for e in entries] == [("WATCHDOG=1",)]
        assert hub.scheduler  # the loop computes its next wake-up from the timer
        # Run the loop as the worker does: its timer fires the ping every 0.2 s.
        loop = hub.create_loop()
        deadline = time.monotonic() + 1.5
        pings = 0
        notify_socket.settimeout(0.05)
        while time.monotonic() < deadline and pings < 3:
            next(loop)
            with contextlib.suppress(TimeoutError):
                pings += notify_socket.recv(64) == b"WATCHDOG=1"
        assert pings >= 3
    finally:
        step.stop(worker)
        hub.close()
    assert all(e.entry.canceled for e in entries)


def test_watchdog_step_does_nothing_without_a_watchdog(monkeypatch, app_env):
    from types import SimpleNamespace

    from kombu.asynchronous import Hub

    from app import celery

    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    hub = Hub()
    worker = SimpleNamespace(hub=hub)
    celery.SystemdWatchdog(worker).start(worker)
    assert list(hub.timer.queue) == []
    hub.close()
