"""kombu's Redis transport, with a taken message recorded as unacked even across a Redis crash.

kombu takes a message with BRPOP (the message leaves the queue, and the pop is in Redis's
AOF) and only then records it in the `unacked` hash, a second round trip. If Redis dies
between the two, the record fails, kombu drops the message it holds in memory, and the
restarted Redis has it nowhere: the task is lost although the broker had accepted it.
tests/integration/test_redis_crash.py reproduces it (about one task lost per three SIGKILLs
while workers take hundreds of tasks a second).

Here the record is retried until Redis answers again (systemd restarts it within seconds),
then the worker runs the message as usual. A message whose record could not be written
within RECORD_PATIENCE is still dropped, as before, and logged with its task id.

Selected in app/config.py with `broker_transport = "app.transport:Transport"`; everything
else (URL parsing, TLS, BRPOP, acks, restore of unacked messages) is kombu's own code.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from kombu.transport import redis as kombu_redis

from .systemd import watchdog_ping

log = logging.getLogger(__name__)
RECORD_PATIENCE = 60.0  # seconds; Redis under systemd (Restart=always) is back well before


class QoS(kombu_redis.QoS):
    def append(self, message: Any, delivery_tag: Any) -> None:
        errors = self.channel.connection.connection_errors
        deadline = time.monotonic() + RECORD_PATIENCE
        delay = 0.05
        while True:
            try:
                super().append(message, delivery_tag)
                return
            except errors as exc:
                task = message.headers.get("id", "?") if message.headers else "?"
                if time.monotonic() >= deadline:
                    log.error("could not record task %s as unacked for %.0f s, dropping it: %s",
                              task, RECORD_PATIENCE, exc)
                    raise
                log.warning("Redis unavailable while taking task %s (%s); retrying in %.2f s",
                            task, exc, delay)
                watchdog_ping()  # waiting on purpose: systemd must not restart us meanwhile
                time.sleep(delay)
                delay = min(delay * 2, 1.0)


class Channel(kombu_redis.Channel):
    QoS = QoS


class Transport(kombu_redis.Transport):
    Channel = Channel
