"""`taskfleet exporter`: the cluster's queues and workers as Prometheus metrics, read from Redis.

Flower's metrics and celery-exporter count task events, which Taskfleet keeps off, and neither
sees what kombu's Redis transport keeps beside the queue lists. This reads it directly, once
per scrape, in one pipelined round trip (Redis's clock for every age):
- each queue's list and its priority sub-lists (LLEN): the messages waiting;
- the message at the tail of each (LINDEX -1: the next to be taken, the oldest waiting) and its
  publish time, stamped in its headers by the app (app/metrics.py, SENT_HEADER). A message
  without the stamp (sent by another app) is aged from when this exporter first saw it there;
- `unacked_owner` (tag -> host:pid) and `unacked_index` (tag -> last heartbeat stamp): the
  messages each worker holds and how long ago it last stamped them (app/transport.py).
A worker that holds nothing has no stamps to read: that it is up is told by its own metrics
endpoint (app/metrics.py), which Prometheus scrapes on each worker host.

Runs as the systemd service taskfleet-exporter on the Redis host (role monitoring), with the
app's settings and a Redis ACL user of its own that may only read
(TASKFLEET_EXPORTER_REDIS_USER/_PASSWORD replace the user of the broker URL).

With the HA tier (sentinel:// URLs) one runs on every Redis host, each reading its own Redis
(`--redis ADDRESS:PORT`): a replica holds the same queues, so only the exporter whose Redis the
Sentinels name as the primary reports queues and workers, and after a failover the new
primary's takes over by itself. Each reports taskfleet_redis_primary (1 or 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

from . import cli
from .connection import OWNER_KEY, UNACKED_INDEX_KEY, client, queue_keys, scrub
from .metrics import SENT_HEADER

USER_VAR, PASSWORD_VAR = "TASKFLEET_EXPORTER_REDIS_USER", "TASKFLEET_EXPORTER_REDIS_PASSWORD"
NO_OWNER = "(no heartbeat)"  # messages recorded by a worker without heartbeats


def exporter_url(url: str, environ: dict[str, str] | os._Environ[str] = os.environ) -> str:
    """The broker URL with the exporter's own Redis user, when USER_VAR and PASSWORD_VAR are set."""
    user, password = environ.get(USER_VAR, ""), environ.get(PASSWORD_VAR, "")
    if not user and not password:
        return url
    if not (user and password):
        cli.die(f"set both {USER_VAR} and {PASSWORD_VAR}, or neither (then the app's user "
                "reads Redis)")
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{quote(user, safe='')}:"
                                            f"{quote(password, safe='')}@{host}"))


def local_redis(s: Any, address: str) -> tuple[str, Callable[[], bool]]:
    """The URL of the Redis at `address` (HOST:PORT), with the broker URLs' user (or the
    exporter's own) and database, and a check: do the Sentinels name it the primary now?
    With TASKFLEET_REDIS_TLS_CA, a rediss:// URL verified with that CA, and the Sentinels
    asked over TLS (then ADDRESS must be one the Redis certificate names)."""
    from redis.sentinel import Sentinel

    from .config import sentinel_kwargs
    from .connection import sentinel_addresses

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        cli.die(f"--redis {address!r}: expected ADDRESS:PORT, e.g. 10.0.5.10:6379")
    first = urlsplit(s.broker_url.split(";")[0])
    netloc = first.netloc.rpartition("@")[0]
    shown = f"[{host}]" if ":" in host.strip("[]") else host
    query = urlencode({"ssl_cert_reqs": "required", "ssl_ca_certs": s.tls_ca}) if s.tls_ca else ""
    url = exporter_url(urlunsplit(("rediss" if s.tls_ca else "redis",
                                   f"{netloc}@{shown}:{port}" if netloc else f"{shown}:{port}",
                                   first.path or "/0", query, "")))
    sentinels = Sentinel(sentinel_addresses(s.broker_url),
                         sentinel_kwargs=sentinel_kwargs(s.connect_timeout, s.sentinel_password,
                                                         s.tls_ca))
    me = (host.strip("[]"), int(port))

    def is_primary() -> bool:
        ip, found_port = sentinels.discover_master(s.sentinel_master)
        return (str(ip), int(found_port)) == me

    return url, is_primary


class ClusterCollector:
    """A prometheus_client collector: reads Redis when scraped, never in between."""

    def __init__(self, url: str, queues: list[str], timeout: float, dead_after: float,
                 is_primary: Callable[[], bool] | None = None) -> None:
        self.url, self.queues, self.timeout, self.dead_after = url, queues, timeout, dead_after
        self.is_primary = is_primary  # HA tier: does this exporter's Redis hold the queues?
        self.first_seen: dict[str, float] = {}  # delivery tag -> Redis time, unstamped messages
        self.lock = threading.Lock()  # scrapes may come in parallel; first_seen is shared

    def read(self) -> dict[str, Any]:
        """One round trip: Redis's time, each queue's lengths and tails, the unacked records."""
        keys = queue_keys(self.queues)
        with client(self.url, self.timeout).pipeline(transaction=False) as pipe:
            pipe.time()
            for _, key in keys:
                pipe.llen(key)
                pipe.lindex(key, -1)
            pipe.hgetall(OWNER_KEY)
            pipe.zrange(UNACKED_INDEX_KEY, 0, -1, withscores=True)
            now_pair, *rest = pipe.execute()
        owners, stamps = rest[-2], rest[-1]
        now = now_pair[0] + now_pair[1] / 1e6
        depth: Counter[str] = Counter()
        oldest: dict[str, float] = dict.fromkeys(self.queues, 0.0)
        seen: set[str] = set()
        with self.lock:
            for (queue, _), size, tail in zip(keys, rest[0:-2:2], rest[1:-2:2], strict=True):
                depth[queue] += int(size)
                if tail is not None:
                    age = self._age(tail, now, seen)
                    oldest[queue] = max(oldest[queue], age)
            for tag in set(self.first_seen) - seen:  # taken, or no longer at a tail
                del self.first_seen[tag]
        return {"now": now, "depth": depth, "oldest": oldest,
                "owners": {k.decode(): v.decode() for k, v in owners.items()},
                "stamps": {k.decode(): float(v) for k, v in stamps}}

    def _age(self, raw: bytes, now: float, seen: set[str]) -> float:
        try:
            message = json.loads(raw)
            sent = (message.get("headers") or {}).get(SENT_HEADER)
            if isinstance(sent, int | float):
                return max(0.0, now - float(sent))
            tag = str(message["properties"]["delivery_tag"])
        except (ValueError, KeyError, TypeError, AttributeError):
            tag = str(hash(raw))
        seen.add(tag)
        return now - self.first_seen.setdefault(tag, now)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily("taskfleet_redis_up", "1 if the last read of Redis worked")
        started = time.monotonic()
        try:
            state = self.read()
            primary = self.is_primary() if self.is_primary is not None else True
        except Exception as exc:  # Redis away, an ACL refusal: say so, keep serving
            print(f"taskfleet exporter: cannot read Redis: {scrub(str(exc), self.url)}",
                  file=sys.stderr, flush=True)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        if self.is_primary is not None:
            role = GaugeMetricFamily(
                "taskfleet_redis_primary", "1 if the Sentinels name this exporter's Redis as the "
                "primary: only then does it report queues and workers (HA tier)")
            role.add_metric([], 1 if primary else 0)
            yield role
            if not primary:
                return
        depth = GaugeMetricFamily("taskfleet_queue_messages",
                                  "Messages waiting in a queue, priority sub-queues included",
                                  labels=["queue"])
        oldest = GaugeMetricFamily("taskfleet_queue_oldest_message_age_seconds",
                                   "Age of the oldest message waiting in a queue (0: empty)",
                                   labels=["queue"])
        for queue in self.queues:
            depth.add_metric([queue], state["depth"][queue])
            oldest.add_metric([queue], round(state["oldest"][queue], 3))
        yield depth
        yield oldest
        held: Counter[str] = Counter()
        last: dict[str, float] = {}
        for tag, stamp in state["stamps"].items():
            owner = state["owners"].get(tag) or NO_OWNER
            held[owner] += 1
            last[owner] = max(last.get(owner, 0.0), stamp)
        in_flight = GaugeMetricFamily(
            "taskfleet_worker_messages_in_flight",
            "Messages a worker holds (running, reserved, waiting for their ETA), per host:pid",
            labels=["worker", "host"])
        age = GaugeMetricFamily(
            "taskfleet_worker_heartbeat_age_seconds",
            "Seconds since a worker holding messages last stamped them (its heartbeat)",
            labels=["worker", "host"])
        alive = GaugeMetricFamily(
            "taskfleet_worker_alive",
            "1 if a worker holding messages stamped them within the dead-after time",
            labels=["worker", "host"])
        for owner in sorted(held):
            labels = [owner, owner.rpartition(":")[0] or owner]
            in_flight.add_metric(labels, held[owner])
            if owner != NO_OWNER:
                seconds = max(0.0, state["now"] - last[owner])
                age.add_metric(labels, round(seconds, 3))
                alive.add_metric(labels, 1 if seconds <= self.dead_after else 0)
        yield in_flight
        yield age
        yield alive
        took = GaugeMetricFamily("taskfleet_exporter_read_seconds",
                                 "Time the last read of Redis took")
        took.add_metric([], time.monotonic() - started)
        yield took


class Exporter:
    """Serve the cluster's metrics over HTTP for Prometheus."""

    @staticmethod
    def add_parser(subparsers: Any) -> None:
        p = subparsers.add_parser(
            "exporter", help="serve queue and worker metrics for Prometheus",
            description="Serve Prometheus metrics read from Redis at each scrape: queue depths "
                        "(priority sub-queues included), the oldest waiting message's age, "
                        "messages in flight and heartbeat age per worker. --once prints them.")
        p.add_argument("--address", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1)")
        p.add_argument("--port", type=cli.positive(int), default=9808,
                       help="port to listen on (default 9808)")
        p.add_argument("--queue", metavar="NAME", type=cli.queue_name, action="append",
                       default=[], help="a queue to watch (repeatable); the default queue is "
                                        "always watched")
        p.add_argument("--redis", metavar="ADDRESS:PORT",
                       help="with sentinel:// URLs (HA tier): read this Redis server, the one "
                            "on this host, and report queues and workers only while the "
                            "Sentinels name it the primary")
        p.add_argument("--once", action="store_true",
                       help="print the metrics once and exit (1 if Redis cannot be read)")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from prometheus_client import CollectorRegistry, generate_latest, start_http_server

        s = cli.settings()
        is_primary = None
        if s.sentinel:
            if not args.redis:
                cli.die("with sentinel:// URLs, --redis ADDRESS:PORT names the Redis to read "
                        "(the one on this host)")
            url, is_primary = local_redis(s, args.redis)
            s = dataclasses.replace(s, sentinel_master=None, sentinel_password=None, tls_ca=None)
        elif args.redis:
            cli.die("--redis is for the HA tier (sentinel:// URLs); without it the exporter "
                    "reads the broker URL's Redis")
        else:
            url = exporter_url(s.broker_url)
        cli.check_redis(dataclasses.replace(s, broker_url=url))
        queues = sorted({s.default_queue, *args.queue})
        collector = ClusterCollector(url, queues, s.connect_timeout, s.dead_after, is_primary)
        registry = CollectorRegistry()
        registry.register(collector)
        if args.once:
            text = generate_latest(registry).decode()
            print(text, end="")
            return 0 if "taskfleet_redis_up 1.0" in text else cli.EXIT_FAIL
        start_http_server(args.port, args.address, registry=registry)
        print(f"taskfleet exporter on http://{args.address}:{args.port}/metrics, "
              f"queues {', '.join(queues)}", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        stop.wait()
        return 0
