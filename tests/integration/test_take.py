"""How a worker takes a message (app/transport.py, TAKE): the pop and the record are one step.

The gap it closes: kombu pops with BRPOP and records the message in a second round trip, so a
message whose BRPOP reply never reaches the worker is in no list at all -- Redis killed just
after the pop, or the worker dropping a connection with the reply unread. Here the reply is
dropped on purpose, the same way, with both transports.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.utils.json import loads

from app.config import celery_settings, read_settings
from app.transport import TAKE

from .itkit import REDIS_SERVER, RedisServer, wait_for

pytestmark = pytest.mark.integration
TRANSPORT = "app.transport:Transport"
DB = 7  # a database of its own on the session's Redis


@pytest.fixture
def broker(redis_server: RedisServer) -> Iterator[RedisServer]:
    if not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    redis_server.admin(DB).flushdb()
    yield redis_server


def options(url: str, **env: str) -> dict:
    """The transport options a deployed worker has (heartbeats on unless env says otherwise)."""
    settings = read_settings({"CELERY_BROKER_URL": url, **env})
    return celery_settings(settings)["broker_transport_options"]


def publish(url: str, queue: str, bodies: list[dict], priority: int | None = None) -> None:
    with Connection(url) as conn:
        q = Queue(queue, Exchange(queue), queue)
        producer = Producer(conn)
        for body in bodies:
            producer.publish(body, exchange=q.exchange, routing_key=queue, declare=[q],
                             serializer="json", priority=priority)


def take_and_drop_the_reply(url: str, queue: str, transport_options: dict,
                            idle: bool = False) -> str:
    """Send one take for `queue` (idle: the wait of a worker that found nothing), then drop
    the connection without reading the reply; return the owner this connection records."""
    with Connection(url, transport=TRANSPORT, transport_options=transport_options) as conn:
        channel = conn.default_channel
        # A worker loads TAKE on its first NOSCRIPT reply; here that reply would be dropped.
        channel.client.script_load(TAKE)
        conn.transport.heartbeating = True  # as once a worker's event loop runs
        channel._take_next = not idle
        channel.basic_consume(queue, no_ack=False, callback=lambda m: None, consumer_tag="t")
        conn.transport.cycle._register_BRPOP(channel)  # what kombu's poller does: sends it
        time.sleep(0.2)  # Redis has run the command and written its reply
        channel.client.connection.disconnect()
        return conn.transport.owner


def test_a_take_whose_reply_never_arrives_is_recorded_and_comes_back(broker: RedisServer):
    url, admin = broker.url(DB), broker.admin(DB)
    publish(url, "takeq", [{"n": n} for n in range(3)])
    owner = take_and_drop_the_reply(url, "takeq", options(url))

    # The message left the queue and is recorded as held, with its owner, exactly as kombu
    # records a message it delivers: [payload, exchange, routing_key].
    assert admin.llen("takeq") == 2
    tags = [t.decode() for t in admin.hkeys("unacked")]
    assert len(tags) == 1, tags
    payload, exchange, routing_key = loads(admin.hget("unacked", tags[0]))
    assert payload["properties"]["delivery_tag"] == tags[0]
    assert (exchange, routing_key) == ("takeq", "takeq")
    assert admin.hget("unacked_owner", tags[0]).decode() == owner
    assert admin.zscore("unacked_index", tags[0]) is not None

    # Nobody stamps it (its holder never delivered it): a sweep hands it back after
    # TASKFLEET_DEAD_AFTER (the production default).
    dead_after = read_settings({"CELERY_BROKER_URL": url}).dead_after
    with Connection(url, transport=TRANSPORT, transport_options=options(url)) as conn:
        qos = conn.default_channel.qos

        def returned() -> bool:
            qos.restore_visible()
            return admin.llen("takeq") == 3

        wait_for(returned, dead_after + 10, "the dropped take to be handed back", 0.5)
    assert admin.hlen("unacked") == 0 and admin.hlen("unacked_owner") == 0


def test_an_idle_workers_wake_up_whose_reply_never_arrives_is_taken_by_the_next(
        broker: RedisServer):
    """An idle worker waits with BLMOVE into the queue's staging list; if that reply never
    arrives, the next take of any worker of the queue takes the staged message first."""
    url, admin = broker.url(DB), broker.admin(DB)
    publish(url, "idleq", [{"n": n} for n in range(3)])
    take_and_drop_the_reply(url, "idleq", options(url), idle=True)
    assert admin.llen("idleq") == 2 and admin.llen("taskfleet:taking:idleq") == 1
    got: list[int] = []
    with Connection(url, transport=TRANSPORT, transport_options=options(url)) as conn:
        conn.transport.heartbeating = True

        def on_message(body: dict, message) -> None:
            got.append(body["n"])
            message.ack()

        with Consumer(conn, [Queue("idleq", Exchange("idleq"), "idleq")],
                      callbacks=[on_message], accept=["json"]):
            deadline = time.monotonic() + 20
            while len(got) < 3 and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=1)
    assert got == [0, 1, 2], "each message once, oldest (the staged one) first"
    assert admin.llen("taskfleet:taking:idleq") == 0 and admin.hlen("unacked") == 0


def test_with_kombus_brpop_the_same_dropped_reply_loses_the_message(broker: RedisServer):
    """The gap itself, with heartbeats off (kombu's transport as shipped): nothing anywhere
    holds the popped message."""
    url, admin = broker.url(DB), broker.admin(DB)
    publish(url, "brpopq", [{"n": n} for n in range(3)])
    take_and_drop_the_reply(url, "brpopq", options(url, TASKFLEET_HEARTBEAT_INTERVAL="0"))
    assert admin.llen("brpopq") == 2
    assert admin.hlen("unacked") == 0, "kombu records a message only once it has read it"


def test_every_queue_and_priority_is_consumed_and_acked(broker: RedisServer):
    """A worker's consumer: two queues, messages of several priorities, and a queue it
    consumes without acks (as a client's reply queue) -- everything arrives once; what was
    acked leaves no record."""
    url, admin = broker.url(DB), broker.admin(DB)
    publish(url, "first", [{"q": "first", "n": n} for n in range(5)])
    publish(url, "second", [{"q": "second", "n": n} for n in range(5)], priority=5)
    publish(url, "second", [{"q": "second", "n": n} for n in range(5, 8)], priority=9)
    publish(url, "noack", [{"q": "noack", "n": n} for n in range(3)])
    got: list[tuple[str, int]] = []
    takes_before = evalsha_calls(admin)

    def on_message(body: dict, message) -> None:
        got.append((body["q"], body["n"]))
        if body["q"] != "noack":
            message.ack()

    with Connection(url, transport=TRANSPORT, transport_options=options(url)) as conn:
        conn.transport.heartbeating = True
        queues = [Queue(q, Exchange(q), q) for q in ("first", "second")]
        with Consumer(conn, queues, callbacks=[on_message], accept=["json"]), \
                Consumer(conn.channel(), [Queue("noack", Exchange("noack"), "noack")],
                         callbacks=[on_message], accept=["json"], no_ack=True):
            deadline = time.monotonic() + 30
            while len(got) < 16 and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=1)
    assert sorted(got) == sorted([("first", n) for n in range(5)]
                                 + [("second", n) for n in range(8)]
                                 + [("noack", n) for n in range(3)])
    assert admin.hlen("unacked") == 0 and admin.zcard("unacked_index") == 0
    assert evalsha_calls(admin) - takes_before >= 13, "the acked queues were read with TAKE"


def evalsha_calls(admin) -> int:
    return admin.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
