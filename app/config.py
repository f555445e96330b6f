"""Settings of the Taskfleet Celery app, read from the environment once at start-up.

Every node (worker, client, the Redis host's smoke test) runs the same code and reads the same
variables, so a value that is wrong is caught here, on the node that has it, with one line that
names the variable, the value (passwords masked) and what is allowed -- not later as a Celery
traceback or a task that silently never runs.

Sources, highest priority first:
  1. the process environment (what systemd's EnvironmentFile= or the shell sets);
  2. the env file: $TASKFLEET_ENV_FILE if set (it must exist), else ./.env if present.
python-dotenv loads the file with override=False, so (1) always wins over (2).

`read_settings()` is pure (a mapping in, a Settings out) so it is unit-tested without touching
os.environ; `get_settings()` is the once-per-process entry point app/celery.py and the CLI use.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from dotenv import load_dotenv
from redis.backoff import NoBackoff
from redis.retry import Retry

ENV_FILE_VAR = "TASKFLEET_ENV_FILE"
POOLS = ("prefork", "threads", "solo")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
QUEUE_RE = re.compile(r"^[A-Za-z0-9_.@:-]+$")
REDIS_SCHEMES = ("redis", "rediss")
# prometheus_client's own variable: where each process of a prefork pool writes its counters.
MULTIPROC_DIR_VAR = "PROMETHEUS_MULTIPROC_DIR"
URL_HELP = "redis://[user:password@]host[:port][/db] or rediss://... (Redis only)"
# Redis behind Sentinel (the optional HA tier): one sentinel:// URL per Sentinel, joined by ";"
# as kombu and Celery's result backend read them; the user and password are the Redis ACL
# user's (every Sentinel is asked where the primary is, then the primary is logged into).
SENTINEL_SCHEME = "sentinel"
SENTINEL_TIMEOUT = 1.0  # seconds to connect to, and hear from, one Sentinel
SENTINEL_HELP = ("sentinel://[user:password@]host[:port][/db];sentinel://... "
                 "(one per Sentinel, the Redis user's password)")
# TLS behind Sentinel: sentinel:// has no TLS variant (rediss:// carries its CA in the URL), so
# this variable names the CA file and turns TLS on for the Sentinels and for Redis alike.
TLS_CA_VAR = "TASKFLEET_REDIS_TLS_CA"


class ConfigError(Exception):
    """A missing or malformed setting. str(exc) is the one line shown to the user."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Validated settings; `celery_settings()` turns them into Celery's lowercase names."""

    broker_url: str
    result_backend: str
    worker_pool: str
    worker_concurrency: int
    worker_prefetch_multiplier: int
    worker_max_tasks_per_child: int
    task_time_limit: int
    task_soft_time_limit: float
    visibility_timeout: int
    result_expires: int
    default_queue: str
    connect_timeout: float
    log_level: str
    log_tasks: bool = False  # a line per task received and per task succeeded
    beat_example_seconds: int = 0
    heartbeat_interval: float = 1.0
    dead_after: float = 6.0
    metrics_port: int = 0
    metrics_address: str = "127.0.0.1"
    env_file: str | None = None
    # Set when the URLs are sentinel://: the name the Sentinels monitor, their password.
    sentinel_master: str | None = None
    sentinel_password: str | None = None
    # With Sentinel: a publish counts once this many replicas hold it (Redis WAIT), 0 = at once.
    publish_replicas: int = 0
    publish_replicas_timeout: float = 1.0
    # With Sentinel: the CA file that Redis's and the Sentinels' certificates are verified
    # with (TASKFLEET_REDIS_TLS_CA); set = every connection, to a Sentinel or to Redis, is TLS.
    tls_ca: str | None = None

    @property
    def sentinel(self) -> bool:
        return self.sentinel_master is not None

    @property
    def sentinel_args(self) -> dict[str, str | None]:
        """Keyword arguments of app.connection's clients: empty for plain Redis URLs."""
        if not self.sentinel:
            return {}
        return {"master": self.sentinel_master, "sentinel_password": self.sentinel_password,
                "tls_ca": self.tls_ca}


def mask_url(url: str) -> str:
    """Return `url` with its password replaced by ***, for messages and logs (each URL of a
    ;-separated Sentinel list too)."""
    if ";" in url:
        return ";".join(mask_url(part) for part in url.split(";"))
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _get(env: Mapping[str, str], name: str) -> str | None:
    """A variable's value, stripped; empty counts as unset (`VAR=` lines in env files)."""
    value = env.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def _bad(name: str, value: str, allowed: str) -> ConfigError:
    return ConfigError(f"invalid {name}={value!r}: {allowed}")


def _redis_url(env: Mapping[str, str], name: str, default: str | None = None) -> str:
    raw = _get(env, name)
    if raw is None:
        if default is None:
            raise ConfigError(f"{name} is not set: set it to {URL_HELP}")
        return default
    if raw.startswith(f"{SENTINEL_SCHEME}:") or ";" in raw:
        return _sentinel_urls(name, raw)
    shown = mask_url(raw)
    try:
        parts = urlsplit(raw)
        _ = parts.port  # raises ValueError for a port that is not 1-65535
    except ValueError:
        raise _bad(name, shown, f"expected {URL_HELP} (port must be 1-65535)") from None
    if parts.scheme not in REDIS_SCHEMES:
        raise _bad(name, shown, f"expected {URL_HELP}")
    if not parts.hostname:
        raise _bad(name, shown, f"no host in the URL; expected {URL_HELP}")
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise _bad(name, shown, f"the database after the last / must be a number; {URL_HELP}")
    return raw


def _sentinel_urls(name: str, raw: str) -> str:
    """A ;-separated list of sentinel:// URLs, at least one, each with a host, one database."""
    shown = mask_url(raw)
    parts = [part.strip() for part in raw.split(";") if part.strip()]
    dbs = set()
    for part in parts:
        try:
            url = urlsplit(part)
            _ = url.port
        except ValueError:
            raise _bad(name, shown, f"expected {SENTINEL_HELP} (port must be 1-65535)") from None
        if url.scheme != SENTINEL_SCHEME:
            raise _bad(name, shown, f"every URL of a Sentinel list is sentinel://; {SENTINEL_HELP}")
        if not url.hostname:
            raise _bad(name, shown, f"a Sentinel URL without a host; expected {SENTINEL_HELP}")
        db = url.path.lstrip("/")
        if db and not db.isdigit():
            raise _bad(name, shown,
                       f"the database after the last / must be a number; {SENTINEL_HELP}")
        dbs.add(db or "0")
    if not parts:
        raise _bad(name, shown, f"no Sentinel in the list; expected {SENTINEL_HELP}")
    if len(dbs) > 1:
        raise _bad(name, shown, "the Sentinel URLs name different databases: use one")
    return ";".join(parts)


def _int(env: Mapping[str, str], name: str, default: int, minimum: int, rule: str) -> int:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _bad(name, raw, f"expected a whole number {rule}") from None
    if value < minimum:
        raise _bad(name, raw, f"expected a whole number {rule}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, zero_ok: str = "") -> float:
    """Seconds > 0 (or >= 0 when `zero_ok` says what 0 means)."""
    raw = _get(env, name)
    if raw is None:
        return default
    rule = f"expected a number of seconds >= 0 ({zero_ok})" if zero_ok \
        else "expected a number of seconds > 0"
    try:
        value = float(raw)
    except ValueError:
        raise _bad(name, raw, rule) from None
    if not (value >= 0 if zero_ok else value > 0) or value == float("inf"):
        raise _bad(name, raw, rule)
    return value


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...],
            normalize: Callable[[str], str] = str.lower) -> str:
    raw = _get(env, name)
    if raw is None:
        return default
    if normalize(raw) not in choices:
        raise _bad(name, raw, f"allowed values are {', '.join(choices)}")
    return normalize(raw)


def default_soft_limit(hard: int) -> float:
    """Soft limit leaving the task time to clean up: 30 s, or 10 % for limits under 300 s."""
    soft = max(hard - 30, hard * 0.9)
    return int(soft) if soft == int(soft) else round(soft, 1)


def read_settings(env: Mapping[str, str]) -> Settings:
    """Validate the TASKFLEET_* and CELERY_* variables; raise ConfigError at the first bad one."""
    broker = _redis_url(env, "CELERY_BROKER_URL")
    backend = _redis_url(env, "CELERY_RESULT_BACKEND", default=broker)
    sentinel_master = _sentinel_master(env, broker, backend)
    pool = _choice(env, "TASKFLEET_WORKER_POOL", "prefork", POOLS)
    concurrency = _int(env, "TASKFLEET_WORKER_CONCURRENCY", os.cpu_count() or 1, 1, ">= 1")
    prefetch = _int(env, "TASKFLEET_WORKER_PREFETCH_MULTIPLIER", 1, 1, ">= 1")
    max_tasks = _int(env, "TASKFLEET_WORKER_MAX_TASKS_PER_CHILD", 0, 0, ">= 0 (0 = unlimited)")
    hard = _int(env, "TASKFLEET_TASK_TIME_LIMIT", 300, 1, "of seconds > 0")

    soft_raw = _get(env, "TASKFLEET_TASK_SOFT_TIME_LIMIT")
    soft: float
    if soft_raw is None:
        soft = default_soft_limit(hard)
    else:
        rule = f"of seconds > 0 and < TASKFLEET_TASK_TIME_LIMIT ({hard})"
        soft = _int(env, "TASKFLEET_TASK_SOFT_TIME_LIMIT", 0, 1, rule)
        if soft >= hard:
            raise _bad("TASKFLEET_TASK_SOFT_TIME_LIMIT", soft_raw,
                       f"expected a whole number {rule}")

    beat = _float(env, "TASKFLEET_HEARTBEAT_INTERVAL", 1.0,
                  "0 = off: kombu's visibility timeout alone decides")
    dead_after = _float(env, "TASKFLEET_DEAD_AFTER", max(6.0, 6 * beat))
    if beat and dead_after < 3 * beat:
        raise _bad("TASKFLEET_DEAD_AFTER", f"{dead_after:g}",
                   f"must be at least 3 x TASKFLEET_HEARTBEAT_INTERVAL ({3 * beat:g} s), so a "
                   "worker that misses one heartbeat is not taken for dead")
    vt = _int(env, "TASKFLEET_VISIBILITY_TIMEOUT", 3600, 1, "of seconds > 0")
    if not beat and vt <= hard:
        # Without heartbeats Redis has no real acknowledgements: a message unacked for longer
        # than this is given to another worker, so a task still running would run twice.
        raise _bad("TASKFLEET_VISIBILITY_TIMEOUT", str(vt),
                   f"must be greater than TASKFLEET_TASK_TIME_LIMIT ({hard}) when "
                   "TASKFLEET_HEARTBEAT_INTERVAL=0, or Redis hands a task that is still running "
                   "to a second worker")
    expires = _int(env, "TASKFLEET_RESULT_EXPIRES", 86400, 1, "of seconds > 0")

    queue = _get(env, "TASKFLEET_DEFAULT_QUEUE") or "celery"
    if not QUEUE_RE.match(queue):
        raise _bad("TASKFLEET_DEFAULT_QUEUE", queue,
                   "queue names use only letters, digits and _ . @ : -")
    timeout = _float(env, "TASKFLEET_CONNECT_TIMEOUT", 5.0)
    level = _choice(env, "TASKFLEET_LOG_LEVEL", "INFO", LOG_LEVELS, normalize=str.upper)
    log_tasks = _choice(env, "TASKFLEET_LOG_TASKS", "no", ("yes", "no")) == "yes"
    beat_example = _int(env, "TASKFLEET_BEAT_EXAMPLE_SECONDS", 0, 0, ">= 0 (0 = off)")
    metrics_port = _int(env, "TASKFLEET_METRICS_PORT", 0, 0, "from 1 to 65535 (0 = off)")
    if metrics_port > 65535:
        raise _bad("TASKFLEET_METRICS_PORT", str(metrics_port),
                   "expected a whole number from 1 to 65535 (0 = off)")
    if metrics_port and _get(env, MULTIPROC_DIR_VAR) is None:
        # The pool's processes count into files of this directory (prometheus_client's
        # multiprocess mode); the worker's main process adds them up when scraped.
        raise ConfigError(f"TASKFLEET_METRICS_PORT={metrics_port} needs {MULTIPROC_DIR_VAR}: "
                          "set it to an empty directory the worker may write (the unit's "
                          "RuntimeDirectory)")
    replicas = _publish_replicas(env, sentinel_master)
    tls_ca = _tls_ca(env, sentinel_master)
    return Settings(
        broker_url=broker, result_backend=backend, worker_pool=pool,
        worker_concurrency=concurrency, worker_prefetch_multiplier=prefetch,
        worker_max_tasks_per_child=max_tasks, task_time_limit=hard, task_soft_time_limit=soft,
        visibility_timeout=vt, result_expires=expires, default_queue=queue,
        connect_timeout=timeout, log_level=level, log_tasks=log_tasks,
        beat_example_seconds=beat_example,
        heartbeat_interval=beat, dead_after=dead_after, metrics_port=metrics_port,
        metrics_address=_get(env, "TASKFLEET_METRICS_ADDRESS") or "127.0.0.1",
        sentinel_master=sentinel_master,
        sentinel_password=_get(env, "TASKFLEET_SENTINEL_PASSWORD") if sentinel_master else None,
        publish_replicas=replicas,
        publish_replicas_timeout=_float(env, "TASKFLEET_PUBLISH_REPLICAS_TIMEOUT", 1.0),
        tls_ca=tls_ca,
    )


def _tls_ca(env: Mapping[str, str], sentinel_master: str | None) -> str | None:
    """TASKFLEET_REDIS_TLS_CA: TLS to the Sentinels and to Redis behind them, verified with this
    CA file. Only with sentinel:// URLs: a rediss:// URL says TLS and names its CA itself."""
    ca = _get(env, TLS_CA_VAR)
    if ca is None:
        return None
    if sentinel_master is None:
        raise ConfigError(f"{TLS_CA_VAR} is for the HA tier's sentinel:// URLs: with one Redis "
                          "host, use rediss://...?ssl_cert_reqs=required&ssl_ca_certs=<CA file> "
                          f"and unset {TLS_CA_VAR}")
    if not Path(ca).is_file():
        raise _bad(TLS_CA_VAR, ca, "no such file: point it at the CA certificate (PEM) that "
                   "signed the certificates of Redis and the Sentinels")
    return ca


def tls_options(ca: str | None) -> dict[str, Any]:
    """redis-py's TLS options for a server certificate of this CA (verified, host name too);
    empty without a CA (plain TCP)."""
    if ca is None:
        return {}
    return {"ssl": True, "ssl_cert_reqs": "required", "ssl_ca_certs": ca}


def _publish_replicas(env: Mapping[str, str], sentinel_master: str | None) -> int:
    """TASKFLEET_PUBLISH_REPLICAS: only with the Sentinel URLs of the HA tier, whose primary has
    replicas to wait for (a lone Redis has none: every publish would time out)."""
    replicas = _int(env, "TASKFLEET_PUBLISH_REPLICAS", 0, 0, ">= 0 (0 = do not wait)")
    if replicas and sentinel_master is None:
        raise ConfigError(f"TASKFLEET_PUBLISH_REPLICAS={replicas} needs the HA tier's "
                          "sentinel:// URLs (a single Redis host has no replica to wait for): "
                          "set it to 0, or list replicas in [redis_replicas] and deploy")
    return replicas


def _sentinel_master(env: Mapping[str, str], broker: str, backend: str) -> str | None:
    """TASKFLEET_SENTINEL_MASTER: required with sentinel:// URLs, which both URLs must then be
    (one Redis, one failover); None for plain Redis URLs."""
    kinds = {url.startswith(f"{SENTINEL_SCHEME}:") for url in (broker, backend)}
    if kinds == {False}:
        return None
    if len(kinds) == 2:
        raise ConfigError("CELERY_BROKER_URL and CELERY_RESULT_BACKEND mix sentinel:// and "
                          "redis:// URLs: use Sentinel URLs for both, or for neither")
    master = _get(env, "TASKFLEET_SENTINEL_MASTER")
    if master is None:
        raise ConfigError("TASKFLEET_SENTINEL_MASTER is not set: with sentinel:// URLs, name the "
                          "master the Sentinels monitor (`sentinel monitor <name> ...`)")
    if not QUEUE_RE.match(master):
        raise _bad("TASKFLEET_SENTINEL_MASTER", master,
                   "a Sentinel master name uses only letters, digits and _ . @ : -")
    return master


def restore_interval(s: Settings) -> float:
    """Seconds between a worker's sweeps for messages whose worker died (kombu restore_visible).

    With heartbeats, every heartbeat interval: a dead worker's messages are back within
    TASKFLEET_DEAD_AFTER plus one interval. Without, kombu 5.7 sweeps every
    unacked_restore_interval (10 s) x unacked_restore_throttle (10) = ~100 s by default; we
    sweep every 1/10 of the visibility timeout (1..100 s) with throttle 1.
    """
    if s.heartbeat_interval:
        return s.heartbeat_interval
    return max(1, min(100, s.visibility_timeout // 10))


def celery_settings(s: Settings) -> dict[str, Any]:
    """Lowercase Celery settings (Celery 5.7 / kombu 5.7 names) for one validated Settings."""
    # Both transports get the same socket options: connect fast, never block forever on a
    # half-open TCP connection (socket_timeout), keepalive + periodic PING to notice a dead peer.
    sockets: dict[str, Any] = {
        "socket_connect_timeout": s.connect_timeout,
        "socket_timeout": max(s.connect_timeout, 5.0),  # > kombu's 1 s BRPOP timeout
        "socket_keepalive": True,
        "health_check_interval": 10,
    }
    settings: dict[str, Any] = {
        "broker_url": s.broker_url,
        # kombu's Redis transport, with the messages a worker holds tied to its heartbeats, and
        # a message taken just as Redis dies recorded once Redis is back (app/transport.py);
        # its Sentinel variant (the same, with the primary found through Sentinel) for the
        # sentinel:// URLs of the HA tier.
        "broker_transport": "app.transport:SentinelTransport" if s.sentinel
        else "app.transport:Transport",
        "result_backend": s.result_backend,
        # JSON only: a pickle message could run arbitrary code in the worker.
        "accept_content": ["json"],
        "task_serializer": "json",
        "result_serializer": "json",
        "result_accept_content": ["json"],
        # Nothing lost: ack only after the task ran, and if the process running it dies
        # (OOM kill, SIGKILL) put the message back instead of acking it as failed.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # With late acks a worker that lost Redis cannot ack anymore: stop those tasks, the
        # message is redelivered (Celery's default from 6.0; setting it also silences a warning).
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        # Reserve one message per process: a busy worker does not sit on tasks an idle one
        # could run, and fewer messages wait to be handed back (dead-after) if it dies.
        "worker_prefetch_multiplier": s.worker_prefetch_multiplier,
        "broker_transport_options": {
            # With heartbeats this only applies to messages recorded without one (by a worker
            # of an older version during an upgrade); see app/transport.py.
            "visibility_timeout": s.visibility_timeout,
            "taskfleet_heartbeat_interval": s.heartbeat_interval,
            "taskfleet_dead_after": s.dead_after,
            # The solo pool runs tasks inside the event loop: heartbeats from a thread.
            "taskfleet_heartbeat_thread": s.worker_pool == "solo",
            # An idle worker blocks on this queue (app/transport.py); work arrives there.
            "taskfleet_wait_queue": s.default_queue,
            # Publishes wait for this many replicas to hold them (Redis WAIT; app/transport.py).
            "taskfleet_publish_replicas": s.publish_replicas,
            "taskfleet_publish_replicas_timeout": s.publish_replicas_timeout,
            "unacked_restore_interval": restore_interval(s),
            "unacked_restore_throttle": 1,
            # The sweep holds a lock key (SET NX with this expiry) for a few milliseconds. kombu's
            # 300 s default means a worker cut off mid-sweep -- Redis stopped or rebooted --
            # leaves a lock (kept in the AOF) that stops every sweep for 5 minutes: the tasks
            # of a dead worker then wait that long. A shorter one is safe: each restore is a
            # WATCH/MULTI transaction that skips a message another worker already restored
            # (and, with heartbeats, one stamped again since the sweep looked).
            "unacked_mutex_expire": max(5, 2 * s.heartbeat_interval) if s.heartbeat_interval
            else min(30, s.visibility_timeout),
            **sockets,
        },
        # Celery's Redis guide sets the timeout for the result backend too; same value.
        "result_backend_transport_options": {"visibility_timeout": s.visibility_timeout},
        # The Redis result backend reads these redis_* settings for its own connections.
        "redis_socket_connect_timeout": s.connect_timeout,
        "redis_socket_timeout": sockets["socket_timeout"],
        "redis_socket_keepalive": True,
        "redis_backend_health_check_interval": sockets["health_check_interval"],
        # A result store that fails while Redis is away waits for it (Celery's default: no
        # retry limit) instead of turning a task that ran into a BackendStoreError FAILURE;
        # the pool's hard time limit bounds the wait as it bounds the task. Backoff 10 ms
        # doubling to 1 s, so the store follows Redis's return within a second.
        "result_backend_always_retry": True,
        "result_backend_max_sleep_between_retries_ms": 1000,
        # Workers keep retrying while Redis comes up (start order between hosts does not matter).
        "broker_connection_retry_on_startup": True,
        "result_expires": s.result_expires,
        # Results carry the worker node name ("worker" in the meta): the CLI's batch summary
        # counts tasks per worker from it; args/kwargs/queue are stored too, for debugging.
        "result_extended": True,
        # No per-task monitoring traffic by default: a task event is a PUBLISH (and JSON
        # encoding) per state change, the STARTED state a SET + PUBLISH per task, all on the
        # path of every task. Flower switches worker events on at run time when it runs (its
        # enable_events option), so the dashboard still works where it is deployed. A task
        # that wants a STARTED state says so itself: @app.task(track_started=True).
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "task_track_started": False,
        "worker_pool": s.worker_pool,
        "worker_concurrency": s.worker_concurrency,
        # Celery reads None as unlimited; 0 is our documented spelling of it.
        "worker_max_tasks_per_child": s.worker_max_tasks_per_child or None,
        "task_time_limit": s.task_time_limit,
        "task_soft_time_limit": s.task_soft_time_limit,
        "task_default_queue": s.default_queue,
        # Periodic tasks, sent by `celery beat` on the one host of the `beat` group.
        "beat_schedule": beat_schedule(s),
    }
    if s.sentinel:
        options = sentinel_options(s)
        settings["broker_transport_options"].update(options)
        settings["result_backend_transport_options"].update(options)
        # A demoted primary answers READONLY, which kombu raises as a channel error: retry it
        # like a lost connection, so the consumer reconnects through Sentinel to the new
        # primary instead of stopping (celery#7946).
        settings["broker_channel_error_retry"] = True
        if s.tls_ca:
            # TLS to the primary, certificate verified: kombu's Sentinel channel and Celery's
            # Sentinel backend then connect with their SentinelManagedSSLConnection (the
            # Sentinels themselves: sentinel_kwargs). Celery wants the constant here.
            verified = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": s.tls_ca}
            settings["broker_use_ssl"] = verified
            settings["redis_backend_use_ssl"] = dict(verified)
    return settings


class SentinelLogin(Mapping[str, Any]):
    """redis-py's `sentinel_kwargs` (a mapping it unpacks into each Sentinel's client), shown
    without its password. They are transport options, and a worker sends its transport options
    in every `inspect stats` reply, JSON-encoded by kombu, which calls __json__: a plain dict
    would put the Sentinels' password in the replies, and the Retry object made them fail."""

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs

    def __getitem__(self, key: str) -> Any:
        return self._kwargs[key]

    def __iter__(self) -> Any:
        return iter(self._kwargs)

    def __len__(self) -> int:
        return len(self._kwargs)

    def __json__(self) -> dict[str, Any]:
        return {k: "***" if k == "password" else v if isinstance(v, int | float | str)
                else repr(v) for k, v in self._kwargs.items()}

    def __repr__(self) -> str:
        return f"SentinelLogin({self.__json__()!r})"


def sentinel_kwargs(timeout: float, password: str | None,
                    tls_ca: str | None = None) -> SentinelLogin:
    """How a redis-py Sentinel manager reaches and logs into each Sentinel (their own password;
    the URLs carry Redis's): `timeout` to connect and to hear back, and one try. redis-py's
    client retries 10 times with backoff by default, so one cut-off Sentinel (the first in the
    list: every new connection asks them in order) cost 11 to 20 s per connection;
    discover_master goes on to the next Sentinel by itself. With `tls_ca`, over TLS."""
    kwargs: dict[str, Any] = {"socket_connect_timeout": timeout, "socket_timeout": timeout,
                              "retry": Retry(NoBackoff(), 0), **tls_options(tls_ca)}
    if password:
        kwargs["password"] = password
    return SentinelLogin(**kwargs)


def sentinel_options(s: Settings) -> dict[str, Any]:
    """Transport options of kombu's and Celery's Sentinel clients: the master's name, and how
    to reach and log into the Sentinels."""
    # A Sentinel answers from memory in milliseconds. Each new connection to the primary asks
    # them in turn, on the worker's event loop (heartbeats included): one that is cut off must
    # cost at most a second, not TASKFLEET_CONNECT_TIMEOUT, or the lab's partitioned primary
    # (and its Sentinel) froze the worker until systemd's watchdog restarted it.
    ask = min(s.connect_timeout, SENTINEL_TIMEOUT)
    return {"master_name": s.sentinel_master,
            "sentinel_kwargs": sentinel_kwargs(ask, s.sentinel_password, s.tls_ca)}


def beat_schedule(s: Settings) -> dict[str, Any]:
    """The periodic tasks (Celery's beat_schedule format): add your own entries here.

    The example entry (off unless TASKFLEET_BEAT_EXAMPLE_SECONDS > 0) runs app.tasks.beat_tick,
    which records each of its runs, so a deploy can prove each period ran exactly once.
    """
    schedule: dict[str, Any] = {}
    if s.beat_example_seconds:
        schedule["example-tick"] = {
            "task": "app.tasks.beat_tick",
            "schedule": float(s.beat_example_seconds),
        }
    return schedule


def load_env_file(environ: Mapping[str, str] | None = None) -> Path | None:
    """Load the env file into os.environ (real environment wins). Returns the file used."""
    env = os.environ if environ is None else environ
    explicit = _get(env, ENV_FILE_VAR)
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(
                f"{ENV_FILE_VAR}={explicit!r} does not exist or is not a file: "
                "point it at the env file or unset it (./.env is used when present)")
    else:
        path = Path(".env")
        if not path.is_file():
            return None
    try:
        load_dotenv(path, override=False)
    except OSError as exc:
        raise ConfigError(f"cannot read env file {str(path)!r}: {exc.strerror}") from None
    return path


@functools.cache
def get_settings() -> Settings:
    """Read the environment once per process: load the env file, then validate."""
    path = load_env_file()
    return dataclasses.replace(read_settings(os.environ), env_file=str(path) if path else None)
