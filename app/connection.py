"""Direct Redis access: a fast preflight check and queue depths for the command line, and the
one backoff loop the workers use to wait for Redis on purpose.

Celery and kombu retry a lost broker for a long time (right for workers, wrong for a person at
a prompt), so client commands first PING Redis once with TASKFLEET_CONNECT_TIMEOUT and turn the
redis-py error into one line that says what is wrong and where to fix it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel

from .config import mask_url, sentinel_kwargs, tls_options

# kombu's Redis transport keeps messages of priority > 0 in extra lists named
# queue + SEP + step (kombu.transport.redis: Channel.sep, PRIORITY_STEPS).
PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)
SENTINEL_PORT = 26379
UNACKED_KEY = "unacked"  # hash of delivered, not yet acknowledged messages (Channel.unacked_key)
OWNER_KEY = "unacked_owner"  # hash: delivery tag -> the host:pid that holds it (transport.py)
TAKING_PREFIX = "taskfleet:taking:"  # + queue: messages an idle worker was woken for (transport)
UNACKED_INDEX_KEY = "unacked_index"  # their tags, scored by the last stamp (unacked_index_key)
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)
T = TypeVar("T")


class BrokerError(Exception):
    """Redis cannot be used; str(exc) is one line for the user, never with a password."""


def describe(url: str, master: str | None = None) -> tuple[str, str]:
    """(host:port, user) of a Redis URL, for messages; for a Sentinel list, the master's name
    and the Sentinels' addresses."""
    parts = urlsplit(url.split(";")[0])
    user = unquote(parts.username) if parts.username else "default"
    if master is not None:
        sentinels = ", ".join(f"{h}:{p}" for h, p in sentinel_addresses(url))
        return f"the primary {master!r} (Sentinels {sentinels})", user
    port = parts.port or 6379
    return f"{parts.hostname}:{port}", user


def sentinel_addresses(url: str) -> list[tuple[str, int]]:
    """(host, port) of every Sentinel of a ;-separated sentinel:// list."""
    return [(str(p.hostname), p.port or SENTINEL_PORT)
            for p in map(urlsplit, url.split(";"))]


def client(url: str, timeout: float, master: str | None = None,
           sentinel_password: str | None = None, tls_ca: str | None = None,
           **options: Any) -> redis.Redis:
    """A redis-py client that fails after one attempt within `timeout` seconds; with `master`
    (sentinel:// URLs), a client of the primary the Sentinels name now (redis-py's Sentinel),
    over TLS to the Sentinels and the primary when `tls_ca` names their CA.
    `options`: more redis-py client options (decode_responses, ...)."""
    once = {"socket_connect_timeout": timeout, "socket_timeout": timeout,
            "retry": Retry(NoBackoff(), 0), "retry_on_timeout": False, **options}
    if master is None:
        return redis.Redis.from_url(url, **once)
    first = urlsplit(url.split(";")[0])
    login = {"username": unquote(first.username) if first.username else None,
             "password": unquote(first.password) if first.password else None,
             "db": int(first.path.lstrip("/") or 0)}
    sentinels = Sentinel(sentinel_addresses(url),
                         sentinel_kwargs=sentinel_kwargs(timeout, sentinel_password, tls_ca),
                         **once)
    return sentinels.master_for(master, **login, **tls_options(tls_ca))


def retry_until_back(call: Callable[[], T], patience: float,
                     errors: tuple[type[BaseException], ...] = REDIS_DOWN, *,
                     first: float = 0.2, cap: float = 2.0,
                     on_retry: Callable[[BaseException], object] | None = None) -> T:
    """`call()`, retried while it raises one of `errors` (Redis restarting, unreachable), with
    redis-py's exponential backoff from `first` up to `cap` seconds between tries; after
    `patience` seconds the last error is raised. For waits a worker does on purpose."""
    deadline = time.monotonic() + patience

    def fail(exc: BaseException) -> None:
        if time.monotonic() >= deadline:
            raise exc
        if on_retry is not None:
            on_retry(exc)

    backoff = ExponentialBackoff(cap=cap, base=first / 2)  # sleeps base * 2**failures
    return Retry(backoff, -1, errors).call_with_retry(call, fail)  # type: ignore[arg-type]


def lost_connection(exc: BaseException) -> BaseException | None:
    """The lost or refused connection to Redis behind `exc` (itself or one of its causes), or
    None when `exc` is about something else.

    Through the causes: kombu raises OperationalError from the redis-py error, and Celery's
    result listener RuntimeError ("Retry limit exceeded ...") from it when it cannot reconnect.
    """
    from kombu.exceptions import OperationalError

    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, (*REDIS_DOWN, OperationalError, OSError)):
            return cause
        cause = cause.__cause__
    return None


def scrub(text: str, url: str) -> str:
    """Remove the URL's password (each one of a Sentinel list) from an error text, should a
    library have echoed it."""
    for part in url.split(";"):
        password = urlsplit(part).password
        if password:
            text = text.replace(password, "***").replace(unquote(password), "***")
    return text


def one_line(exc: BaseException, *urls: str) -> str:
    """An error for a one-line message: its text (or its type's name) on one line, with the
    password of each URL scrubbed."""
    text = " ".join((str(exc) or type(exc).__name__).split())
    for url in urls:
        text = scrub(text, url)
    return text


def sentinel_errors(url: str, timeout: float, password: str | None, tls_ca: str | None) -> str:
    """Why the Sentinels named no primary, each different reason once: asked again, one PING
    each (redis-py's MasterNotFoundError keeps only the errors' class names, hiding a refused
    certificate or password behind "ConnectionError")."""
    reasons = []
    for host, port in sentinel_addresses(url):
        try:
            redis.Redis(host, port, **sentinel_kwargs(timeout, password, tls_ca)).ping()
        except redis.RedisError as exc:
            reasons.append(f"{host}:{port}: {one_line(exc, url)}")
        else:
            reasons.append(f"{host}:{port}: answers, but names no such primary")
    return "; ".join(reasons)[:400]


def check(url: str, variable: str, timeout: float, master: str | None = None,
          sentinel_password: str | None = None, tls_ca: str | None = None) -> None:
    """PING the Redis of `url` once; raise BrokerError with a clear cause and fix."""
    where, user = describe(url, master)
    try:
        client(url, timeout, master, sentinel_password, tls_ca).ping()
    except MasterNotFoundError:
        # Every Sentinel was asked: none answered (down, firewall, wrong password, TLS) or none
        # knows the name.
        why = sentinel_errors(url, timeout, sentinel_password, tls_ca)
        raise BrokerError(
            f"no Sentinel named the primary {master!r} ({why}): check "
            f"{variable}, TASKFLEET_SENTINEL_MASTER, TASKFLEET_SENTINEL_PASSWORD, "
            f"TASKFLEET_REDIS_TLS_CA ({'set' if tls_ca else 'unset'}: TLS "
            f"{'on' if tls_ca else 'off'}) and the firewall") from None
    except redis.AuthenticationError:
        if urlsplit(url).password is None:
            raise BrokerError(
                f"Redis at {where} requires a password: put user:password@ in {variable}"
            ) from None
        raise BrokerError(
            f"Redis at {where} refused the password for user {user!r}: "
            f"check the user and password in {variable}") from None
    except redis.exceptions.NoPermissionError:
        raise BrokerError(
            f"Redis at {where} denied user {user!r} the PING command (ACL): "
            f"give the user the commands Celery needs, or fix the user in {variable}") from None
    except redis.TimeoutError:
        raise BrokerError(
            f"no answer from Redis at {where} within {timeout:g} s: check {variable} and the "
            "firewall (TASKFLEET_CONNECT_TIMEOUT sets this limit)") from None
    except redis.ConnectionError as exc:
        reason = scrub(str(exc), url).rstrip(".")
        raise BrokerError(
            f"cannot reach Redis at {where} ({reason}): check {variable} and the firewall"
        ) from None
    except redis.RedisError as exc:
        raise BrokerError(
            f"Redis at {where} ({mask_url(url)}) answered PING with an error: "
            f"{scrub(str(exc), url)}") from None


def queue_keys(queues: list[str]) -> list[tuple[str, str]]:
    """(queue, Redis list) for each queue's list, its priority sub-lists and its staging list
    (where a message waits, for a moment, between an idle worker's wake-up and its take)."""
    return [(q, q if step == 0 else f"{q}{PRIORITY_SEP}{step}")
            for q in queues for step in PRIORITY_STEPS] + [(q, TAKING_PREFIX + q) for q in queues]


def queue_depths(url: str, queues: list[str], timeout: float,
                 **sentinel: str | None) -> dict[str, int]:
    """Messages waiting in each queue, all priority sub-queues included (one round trip)."""
    keys = queue_keys(queues)
    with client(url, timeout, **sentinel).pipeline(transaction=False) as pipe:
        for _, key in keys:
            pipe.llen(key)
        sizes = pipe.execute()
    depths = dict.fromkeys(queues, 0)
    for (queue, _), size in zip(keys, sizes, strict=True):
        depths[queue] += int(size)
    return depths


def unacked_count(url: str, timeout: float, **sentinel: str | None) -> int:
    """Messages delivered to workers and not yet acknowledged (running or reserved)."""
    return int(client(url, timeout, **sentinel).hlen(UNACKED_KEY))
