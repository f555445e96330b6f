"""The worker's systemd readiness message (sd_notify), over a real Unix datagram socket."""

from __future__ import annotations

import socket

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
