"""redis_write: a task's own Redis write waits out a Redis restart instead of failing."""

from __future__ import annotations

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError


@pytest.fixture
def tasks(app_env, monkeypatch):
    from app import tasks

    monkeypatch.setattr(tasks.time, "sleep", lambda _s: None)  # pure logic: no real waiting
    return tasks


def test_redis_write_retries_connection_loss_then_returns(tasks):
    calls = []

    def write():
        calls.append(1)
        if len(calls) < 3:
            raise RedisConnectionError("Connection refused")
        return "OK"

    assert tasks.redis_write(write) == "OK"
    assert len(calls) == 3


def test_redis_write_gives_up_after_its_patience(tasks):
    calls = []

    def write():
        calls.append(1)
        raise RedisConnectionError("Connection refused")

    with pytest.raises(RedisConnectionError):
        tasks.redis_write(write, patience=0)
    assert len(calls) == 1


def test_redis_write_does_not_retry_other_errors(tasks):
    def write():
        raise ValueError("not a connection problem")

    with pytest.raises(ValueError):
        tasks.redis_write(write)
