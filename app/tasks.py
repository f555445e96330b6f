"""Example tasks. Names stay app.tasks.<function>.

Every task here is a pure function of its arguments (no writes anywhere), so it is safe to run
twice -- which late acknowledgement on Redis can do after a worker dies (a task is redelivered
when its worker is lost mid-run). Real tasks must be idempotent for the same reason.
The one exception is `mark`, a test/ops helper that records every run on purpose.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

from .celery import app
from .connection import retry_until_back

T = TypeVar("T")

# How long a task waits for Redis to come back before its own Redis write fails the task.
# A task that fails on a write during a Redis restart is still acknowledged (late ack acks
# failures too), so without this wait its write would be lost although the task ran.
REDIS_WRITE_PATIENCE = 60.0


def redis_write(write: Callable[[], T], patience: float = REDIS_WRITE_PATIENCE) -> T:
    """Run `write` (a Redis command or pipeline), retrying on connection loss with backoff
    (0.2 s doubling to 2 s) for up to `patience` seconds. A write that reached Redis just
    before the connection broke may be applied twice: use it for writes that tolerate that."""
    return retry_until_back(write, patience)

# `mark` appends to Redis lists under this prefix; each list expires a day after its last run.
LEDGER_PREFIX = "taskfleet:ledger:"
LEDGER_TTL = 86400


@app.task
def add(x: Any, y: Any) -> Any:
    """Return x + y. Pure: safe to run twice."""
    return x + y


@app.task
def sleep(seconds: float) -> dict[str, Any]:
    """I/O-bound stand-in: wait `seconds`, return them with the host. Safe to run twice."""
    time.sleep(float(seconds))
    return {"seconds": seconds, "host": socket.gethostname()}


@app.task
def cpu(n: int) -> int:
    """CPU-bound work: count the primes below `n` by trial division. Pure: safe to run twice."""
    n = int(n)
    count = 0
    for k in range(2, n):
        d = 2
        while d * d <= k:
            if k % d == 0:
                break
            d += 1
        else:
            count += 1
    return count


@app.task
def noop() -> None:
    """Do nothing (measures pure queueing overhead). Safe to run twice."""


@app.task(bind=True)
def whoami(self: Any) -> dict[str, str]:
    """Return this machine's hostname and the worker's node name. Safe to run twice."""
    return {"host": socket.gethostname(), "worker": str(self.request.hostname)}


@app.task
def mark(batch: str, n: int, seconds: float = 0) -> int:
    """Test/ops helper: wait `seconds`, then record this run in the Redis list
    taskfleet:ledger:<batch> as "<n>@<host>@<unix time>" and return n.

    Not idempotent on purpose -- every run is recorded, which is the point: submit numbers
    0..N-1, break something, then the ledger shows numbers that never ran (lost) and numbers
    that ran more than once (duplicated). The fault suite (tests/lab/test_faults.py) uses it;
    so can an operator rehearsing a failure. Running it twice is harmless (one more entry).
    """
    time.sleep(float(seconds))
    key = f"{LEDGER_PREFIX}{batch}"
    entry = f"{int(n)}@{socket.gethostname()}@{time.time():.3f}"
    # The result backend's redis-py client: same Redis, same ACL user, no extra connection pool.
    # MULTI: the entry and its expiry together; retried through a Redis restart.
    redis_write(lambda: app.backend.client.pipeline().rpush(key, entry)
                .expire(key, LEDGER_TTL).execute())
    return int(n)


BEAT_TICKS_KEY = "taskfleet:beat:ticks"


@app.task(bind=True, ignore_result=True)
def beat_tick(self: Any) -> None:
    """The example periodic task (TASKFLEET_BEAT_EXAMPLE_SECONDS): append one JSON record of
    this run -- when, which node sent it (beat's host, in the message's origin) and which worker
    ran it -- to the Redis list taskfleet:beat:ticks (last 1000 kept), so duplicates show."""
    record = {"at": time.time(), "id": self.request.id, "origin": self.request.origin,
              "worker": self.request.hostname}
    client = self.app.backend.client  # the result backend's Redis connection (TLS and all)
    redis_write(lambda: client.pipeline().rpush(BEAT_TICKS_KEY, json.dumps(record))
                .ltrim(BEAT_TICKS_KEY, -1000, -1).execute())
