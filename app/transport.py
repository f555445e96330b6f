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

A second way to the same loss: when the worker reconnects, kombu closes the old channel and
first reads the reply of a BRPOP still in flight, which can deliver one more message. By then
the channel may have no connection left to build a client from (kombu raises
`AttributeError: 'NoneType' object has no attribute 'hostname'`, the kombu#582 family, and
the worker dies with the message taken). The record is then written with a client of its own,
built from the connection settings the channel had when it opened.

Selected in app/config.py with `broker_transport = "app.transport:Transport"`; everything
else (URL parsing, TLS, BRPOP, acks, restore of unacked messages) is kombu's own code.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps

from .systemd import watchdog_ping

log = logging.getLogger(__name__)
RECORD_PATIENCE = 60.0  # seconds; Redis under systemd (Restart=always) is back well before


def _task_id(message: Any) -> str:
    return message.headers.get("id", "?") if message.headers else "?"


class QoS(kombu_redis.QoS):
    def append(self, message: Any, delivery_tag: Any) -> None:
        errors = self.channel.connection.connection_errors
        deadline = time.monotonic() + RECORD_PATIENCE
        delay = 0.05
        while True:
            try:
                try:
                    super().append(message, delivery_tag)
                except AttributeError:  # the channel's connection is gone (see above)
                    self._append_standalone(message, delivery_tag)
                return
            except errors as exc:
                task = _task_id(message)
                if time.monotonic() >= deadline:
                    log.error("could not record task %s as unacked for %.0f s, dropping it: %s",
                              task, RECORD_PATIENCE, exc)
                    raise
                log.warning("Redis unavailable while taking task %s (%s); retrying in %.2f s",
                            task, exc, delay)
                watchdog_ping()  # waiting on purpose: systemd must not restart us meanwhile
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _append_standalone(self, message: Any, delivery_tag: Any) -> None:
        """kombu's record (ZADD unacked_index + HSET unacked), on a client of our own."""
        delivery = message.delivery_info
        record = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        prefix = self.channel.global_keyprefix or ""  # what kombu's own client would add
        client = redis.Redis(connection_pool=redis.ConnectionPool(**self.channel.record_params))
        try:
            with client.pipeline() as pipe:
                pipe.zadd(prefix + self.unacked_index_key, {delivery_tag: time.time()})
                pipe.hset(prefix + self.unacked_key, delivery_tag, record)
                pipe.execute()
        finally:
            client.close()
        virtual.QoS.append(self, message, delivery_tag)  # kombu's in-memory bookkeeping
        log.warning("recorded task %s as unacked on a separate connection (its channel was "
                    "closing)", _task_id(message))


class Channel(kombu_redis.Channel):
    QoS = QoS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Plain (not event-loop) connection settings, kept while the connection is open.
        self.record_params = self._connparams(asynchronous=False)


class Transport(kombu_redis.Transport):
    Channel = Channel
