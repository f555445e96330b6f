"""kombu's Redis transport, with every message a worker holds tied to that worker's liveness.

kombu records a delivered message in the `unacked` hash and the `unacked_index` sorted set,
scored with the time it was taken; any worker's sweep hands back the messages older than the
visibility timeout. The score says *when* a message was taken, not whether its holder still
lives: a task running, waiting for its ETA or prefetched for longer than the timeout runs a
second time (celery#2481, #5935, #6236), and a dead worker's tasks wait the whole timeout.

Heartbeats (TASKFLEET_HEARTBEAT_INTERVAL > 0, the default):
- A worker records each message with an owner entry (`unacked_owner`: tag -> host:pid) and
  scores it with Redis's clock, not its own, so hosts' clock skew does not matter.
- Every interval, from the worker's event loop, it re-stamps the scores of the messages its
  open channels hold (ZADD XX: a message acked or handed back meanwhile is not brought back).
  A loop that stops turning (crash, SIGKILL, SIGSTOP, a partition) stops the stamps.
- Every interval, one worker at a time (kombu's sweep lock) hands back each owned message whose
  stamp is older than TASKFLEET_DEAD_AFTER, and each message without an owner (written by a
  worker without heartbeats: an older version during an upgrade) older than the visibility
  timeout, as before. The hand-back is kombu's restore_by_tag transaction (WATCH/MULTI) with
  the stamp checked again inside it: two sweeps can never return one message twice, and a
  message stamped since the sweep looked stays where it is.
So a live worker keeps its messages for as long as it needs them, and a dead one's are back in
their queues within DEAD_AFTER plus one interval. Why re-stamp kombu's own index rather than
keep owner heartbeat keys beside it: kombu's sweep (older workers', and ours for owner-less
records) keeps working unchanged on the same index, and a stamped message never looks old to it.

The solo pool runs a task inside the event loop, so its stamps come from a thread instead.
With TASKFLEET_HEARTBEAT_INTERVAL=0 this is kombu's transport as shipped (for comparison).
SentinelTransport is the same for Redis behind Sentinel (sentinel:// URLs): kombu's
SentinelChannel finds the primary, this module's QoS keeps the heartbeats.

Taking a message (heartbeats on): kombu pops it with BRPOP and records it in a second round
trip, so a message whose BRPOP reply never reached the worker -- Redis killed after the pop,
or the worker dropping a connection with the reply still unread -- was in no list at all. Here
one script (TAKE) pops the message and records it, with its owner, in the same step: whatever
happens to the reply, the message is in `unacked`, and if its holder never delivers it, it is
never stamped and goes back after DEAD_AFTER. An idle worker waits with
`BLMOVE queue taskfleet:taking:<queue> RIGHT LEFT`: like BRPOP, Redis hands each new message to
exactly one waiting worker, but it moves the message into a staging list instead of out of
Redis. TAKE takes from the staging lists first, so the woken worker's next TAKE -- or any
other worker's of that queue, if its reply never arrives -- records and delivers it. BLMOVE
watches one list: the queue of the worker's last message (at first the default queue,
taskfleet_wait_queue), priority 0. A worker of several queues wakes every 0.2 s to look at
the others (every Taskfleet worker also consumes its host queue), one of a single queue every
brpop_timeout (1 s) for its other priorities: there a message for an idle worker may wait
that long. A queue consumed without acks (a client's reply queue) keeps kombu's BRPOP.

Publishing with TASKFLEET_PUBLISH_REPLICAS=N (HA tier): Redis replicates asynchronously, so a
primary that dies right after taking a message may take it along. Each publish of a task (one
task, or one pipeline of a batch) then ends with `WAIT N timeout` on the same connection, and
counts only once N replicas hold it; Sentinel promotes the replica furthest along, which then
has it. Fewer in time raises NotReplicated: the message is on the primary and runs unless the
primary dies before replicating it, and sending it again is safe (every task may run twice).

With kombu's BRPOP (heartbeats off), a record that fails because Redis died after the pop is
retried until Redis is back. A record made while the channel closes is written on a connection
of its own (kombu#582).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable
from queue import Empty
from typing import Any

import redis
from kombu.exceptions import KombuError
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from .connection import OWNER_KEY, TAKING_PREFIX, retry_until_back
from .systemd import watchdog_ping

log = logging.getLogger(__name__)
RECORD_PATIENCE = 60.0  # seconds; Redis under systemd (Restart=always) is back well before
STAMP_CHUNK = 500  # tags per re-stamp call
SWEEP_LIMIT = 1000  # candidates per sweep
MULTI_QUEUE_WAIT = 0.2  # seconds an idle worker of several queues blocks on the first one
# Transport options this transport reads (app/config.py sets them), beside kombu's own.
OPTIONS = ("taskfleet_heartbeat_interval", "taskfleet_dead_after", "taskfleet_heartbeat_thread",
           "taskfleet_wait_queue", "taskfleet_publish_replicas",
           "taskfleet_publish_replicas_timeout")

# KEYS: unacked_index, unacked, unacked_owner. ARGV: tag, record, owner.
RECORD = """
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], t[1] + t[2] / 1000000, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
return 1
"""
# KEYS: unacked_index, unacked, unacked_owner, then the staging list of each of the Q queues
# (taskfleet:taking:<queue>), then the queue lists, highest priority first (the first Q are
# the queues' priority-0 lists, in the same order). ARGV: owner ('' for none), Q.
# Pops the oldest staged message, else the first queued one, and records it as kombu's QoS
# would ([payload, exchange, routing_key] under its delivery tag), stamped by Redis's clock.
# Returns {list, payload, tag} (tag '' if the payload has none: kombu records it then), or nil.
TAKE = """
local q = tonumber(ARGV[2])
local function record(key, payload)
  local ok, message = pcall(cjson.decode, payload)
  local props = ok and type(message) == 'table' and message.properties
  local tag = type(props) == 'table' and props.delivery_tag
  local info = type(props) == 'table' and props.delivery_info
  if type(tag) ~= 'string' or type(info) ~= 'table' or info.exchange == nil
      or info.routing_key == nil then
    return {key, payload, ''}
  end
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[1], t[1] + t[2] / 1000000, tag)
  redis.call('HSET', KEYS[2], tag, '[' .. payload .. ',' .. cjson.encode(info.exchange) ..
             ',' .. cjson.encode(info.routing_key) .. ']')
  if ARGV[1] ~= '' then redis.call('HSET', KEYS[3], tag, ARGV[1]) end
  return {key, payload, tag}
end
for j = 1, q do
  local payload = redis.call('RPOP', KEYS[3 + j])
  if payload then return record(KEYS[3 + q + j], payload) end
end
for i = 4 + q, #KEYS do
  local payload = redis.call('RPOP', KEYS[i])
  if payload then return record(KEYS[i], payload) end
end
return false
"""
TAKE_SHA = hashlib.sha1(TAKE.encode(), usedforsecurity=False).hexdigest()  # Redis's script id
# KEYS: unacked_index. ARGV: tags. Only tags still recorded are touched (XX).
RESTAMP = """
local t = redis.call('TIME')
local now = t[1] + t[2] / 1000000
for i = 1, #ARGV do redis.call('ZADD', KEYS[1], 'XX', now, ARGV[i]) end
return #ARGV
"""
# KEYS: unacked_index, unacked_owner. ARGV: dead_after, visibility_timeout, limit.
# Returns Redis's time, then tag, owner, tag, owner, ... of the messages to hand back (owner ""
# for a record without one).
SWEEP = """
local t = redis.call('TIME')
local now = t[1] + t[2] / 1000000
local old = redis.call('ZRANGE', KEYS[1], '-inf', now - ARGV[1], 'BYSCORE',
                       'LIMIT', 0, ARGV[3], 'WITHSCORES')
local out = {tostring(now)}
for i = 1, #old, 2 do
  local owner = redis.call('HGET', KEYS[2], old[i])
  if owner or tonumber(old[i + 1]) <= now - ARGV[2] then
    out[#out + 1] = old[i]
    out[#out + 1] = owner or ''
  end
end
return out
"""


class NotReplicated(KombuError):
    """Redis took a publish, but fewer replicas than asked confirmed it within the timeout.
    Not a connection error: nothing retries it by itself (the publish did happen)."""

    def __init__(self, confirmed: int, wanted: int, timeout: float) -> None:
        super().__init__(
            f"Redis took the task but {confirmed} of the {wanted} replica(s) that "
            f"TASKFLEET_PUBLISH_REPLICAS asks for confirmed it within {timeout:g} s "
            "(TASKFLEET_PUBLISH_REPLICAS_TIMEOUT): it runs unless the primary fails first; "
            "sending it again is safe")
        self.confirmed, self.wanted = confirmed, wanted


class Replicated:
    """A redis-py pipeline whose execute() ends with WAIT on the pipeline's own connection (WAIT
    counts the writes of its connection): returns the other replies once `replicas` replicas
    hold the writes, raises NotReplicated if fewer do within `timeout` seconds."""

    def __init__(self, pipeline: Any, replicas: int, timeout: float) -> None:
        self.pipeline, self.replicas, self.timeout = pipeline, replicas, timeout

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipeline, name)

    def execute(self, *args: Any, **kwargs: Any) -> list[Any]:
        self.pipeline.execute_command("WAIT", self.replicas, max(1, round(self.timeout * 1000)))
        *replies, confirmed = self.pipeline.execute(*args, **kwargs)
        if int(confirmed) < self.replicas:
            raise NotReplicated(int(confirmed), self.replicas, self.timeout)
        return replies


class _Commands(list[tuple[str, tuple[Any, ...]]]):
    """Collects the Redis commands of one publish (kombu's publish-batch protocol: add())."""

    def add(self, name: str, *args: Any) -> None:
        self.append((name, args))


def _task_id(message: Any) -> str:
    return message.headers.get("id", "?") if message.headers else "?"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class QoS(kombu_redis.QoS):
    @property
    def heartbeats(self) -> bool:
        """True when this worker stamps what it holds (only then may it claim ownership)."""
        return bool(self.channel.connection.heartbeating)

    def append(self, message: Any, delivery_tag: Any) -> None:
        if delivery_tag in self.channel.taken:  # TAKE recorded it already
            self.channel.taken.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)
            return

        def record() -> None:
            try:
                with self.channel.conn_or_acquire() as client:
                    self._record(client, message, delivery_tag)
            except AttributeError:  # the channel's connection is gone (kombu#582)
                self._record_standalone(message, delivery_tag)

        def waiting(exc: BaseException) -> None:
            log.warning("Redis unavailable while taking task %s (%s); retrying",
                        _task_id(message), exc)
            watchdog_ping()  # waiting on purpose: systemd must not restart us meanwhile

        try:
            retry_until_back(record, RECORD_PATIENCE, self.channel.connection.connection_errors,
                             first=0.05, cap=1.0, on_retry=waiting)
        except self.channel.connection.connection_errors as exc:
            log.error("could not record task %s as unacked for %.0f s, dropping it: %s",
                      _task_id(message), RECORD_PATIENCE, exc)
            raise
        virtual.QoS.append(self, message, delivery_tag)  # kombu's in-memory bookkeeping

    def _record(self, client: Any, message: Any, delivery_tag: Any) -> None:
        """kombu's record (unacked_index + unacked); with heartbeats, stamped by Redis's clock
        and with its owner, in one script."""
        delivery = message.delivery_info
        record = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        if not self.heartbeats:
            with client.pipeline() as pipe:
                pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()})
                pipe.hset(self.unacked_key, delivery_tag, record)
                pipe.execute()
            return
        keys = [self.unacked_index_key, self.unacked_key, OWNER_KEY]
        self.channel.connection.script(client, RECORD, keys,
                                       [delivery_tag, record, self.channel.connection.owner])

    def _record_standalone(self, message: Any, delivery_tag: Any) -> None:
        client = self.channel.standalone_client()
        try:
            self._record(client, message, delivery_tag)
        finally:
            client.close()
        log.warning("recorded task %s as unacked on a separate connection (its channel was "
                    "closing)", _task_id(message))

    def ack(self, delivery_tag: Any) -> None:
        try:
            super().ack(delivery_tag)
        except Exception:
            self._let_go(delivery_tag)
            raise

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        try:
            super().reject(delivery_tag, requeue)
        except Exception:
            self._let_go(delivery_tag)
            raise

    def _let_go(self, delivery_tag: Any) -> None:
        """An ack or reject Redis did not take (it was away): the worker is done with the
        message all the same, so it stops holding it. kombu keeps the tag in `_delivered`
        then, and the heartbeats would re-stamp a message nobody runs for as long as the
        worker lives; let go, its record is no longer stamped and goes back to its queue
        after DEAD_AFTER, like a dead worker's (an ack that failed: the task runs again)."""
        self._delivered.pop(delivery_tag, None)
        self._dirty.discard(delivery_tag)

    def _remove_from_indices(self, delivery_tag: Any, pipe: Any = None) -> Any:
        # Used by ack, reject and restore_by_tag (inside its transaction): the owner goes too.
        return super()._remove_from_indices(delivery_tag, pipe).hdel(OWNER_KEY, delivery_tag)

    def restamp(self) -> int:
        """Re-stamp, by Redis's clock, every message this channel holds; returns how many."""
        tags = list(self._delivered)
        with self.channel.conn_or_acquire() as client:
            for start in range(0, len(tags), STAMP_CHUNK):
                self.channel.connection.script(client, RESTAMP, [self.unacked_index_key],
                                               tags[start:start + STAMP_CHUNK])
        return len(tags)

    def restore_visible(self, start: int = 0, num: int | None = 10,
                        interval: int = 10) -> None:
        dead_after = self.channel.connection.dead_after
        if not dead_after:
            return super().restore_visible(start, num, interval)
        returned: list[str] = []
        with self.channel.conn_or_acquire() as client:
            try:
                with kombu_redis.Mutex(client, self.unacked_mutex_key,
                                       self.unacked_mutex_expire):
                    now, *found = self.channel.connection.script(
                        client, SWEEP, [self.unacked_index_key, OWNER_KEY],
                        [dead_after, self.visibility_timeout, SWEEP_LIMIT])
                    for tag, owner in zip(found[::2], found[1::2], strict=True):
                        cutoff = float(now) - (dead_after if owner else self.visibility_timeout)
                        if self._hand_back(client, tag, cutoff):
                            returned.append(_text(owner) or "(no heartbeat)")
            except kombu_redis.MutexHeld:
                return None
        if returned:
            log.warning("returned %d message(s) of silent worker(s) %s to their queues",
                        len(returned), ", ".join(sorted(set(returned))))
        return None

    def _hand_back(self, client: Any, tag: Any, cutoff: float) -> bool:
        """kombu's restore_by_tag, but only if the record is still stamped before `cutoff`
        when the transaction runs: a record re-stamped, or taken again by another worker,
        since the sweep looked stays where it is."""
        def transaction(pipe: Any) -> None:
            score = pipe.zscore(self.unacked_index_key, tag)
            payload = pipe.hget(self.unacked_key, tag)
            pipe.multi()
            if score is not None and score > cutoff:
                return
            self._remove_from_indices(tag, pipe)
            if payload:
                message, exchange, routing_key = loads(bytes_to_str(payload))
                self.channel._do_restore_message(message, exchange, routing_key, pipe)

        return bool(client.transaction(transaction, self.unacked_key, value_from_callable=False))


class Channel(kombu_redis.Channel):
    QoS = QoS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Plain (not event-loop) connection settings, kept while the connection is open.
        self.record_params = self._connparams(asynchronous=False)
        self.taken: set[str] = set()  # tags TAKE recorded, until kombu's QoS.append sees them
        self._no_ack_queues: set[str] = set()
        self._sent: str | None = None  # the command whose reply the poller waits for
        self._take_next = True  # False after a TAKE found nothing: wait (BLMOVE) first
        self._wait_queue = ""  # the queue of the last message taken: where to wait
        self._waited_on = ""  # the queue of the BLMOVE in flight

    def replicated(self, pipeline: Any) -> Any:
        """`pipeline`, made to wait for the replicas if TASKFLEET_PUBLISH_REPLICAS asks."""
        transport = self.connection
        if not transport.publish_replicas:
            return pipeline
        return Replicated(pipeline, transport.publish_replicas, transport.publish_timeout)

    def create_publish_batch(self, max_size: int) -> Any:
        batch = super().create_publish_batch(max_size)
        batch.pipeline = self.replicated(batch.pipeline)
        return batch

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        """kombu's publish; for a task, with replicas to wait for, its commands and WAIT in
        one pipeline. Remote-control replies (a worker's event loop sends them) never wait:
        their client has given up on them long before a failover is over."""
        if not self.connection.publish_replicas or kwargs.get("_publish_batch") is not None \
                or "task" not in (message.get("headers") or {}):
            return super()._put(queue, message, **kwargs)
        commands = _Commands()
        super()._put(queue, message, _publish_batch=commands, **kwargs)
        with self.conn_or_acquire() as client, client.pipeline(transaction=False) as pipe:
            for name, args in commands:
                getattr(pipe, name)(*args)
            self.replicated(pipe).execute()
        return None

    def basic_consume(self, queue: str, *args: Any, **kwargs: Any) -> Any:
        no_ack = kwargs.get("no_ack", args[0] if args else False)
        (self._no_ack_queues.add if no_ack else self._no_ack_queues.discard)(queue)
        return super().basic_consume(queue, *args, **kwargs)

    def _takes(self, queues: list[str]) -> bool:
        """Take with TAKE/BLMOVE (not BRPOP) from these queues?"""
        return bool(self.connection.heartbeat_interval) and not self.global_keyprefix \
            and not self._no_ack_queues.intersection(queues)

    def _brpop_start(self, timeout: float | None = None) -> None:
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues or not self._takes(queues):
            self._sent = None
            return super()._brpop_start(timeout)
        if self._take_next:
            keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps
                    for queue in queues]
            owner = self.connection.owner if self.connection.heartbeating else ""
            command = ["EVALSHA", TAKE_SHA, 3 + len(queues) + len(keys),
                       self.qos.unacked_index_key, self.qos.unacked_key, OWNER_KEY,
                       *(TAKING_PREFIX + queue for queue in queues), *keys, owner, len(queues)]
        else:
            # Block on the queue of the last message taken (at first the default queue, where
            # work arrives); with several queues, wake often enough to look at the others.
            wait = self.brpop_timeout if timeout is None else timeout
            if len(queues) > 1:
                wait = min(wait or MULTI_QUEUE_WAIT, MULTI_QUEUE_WAIT)
            queue = self._wait_queue if self._wait_queue in queues else \
                self.connection.wait_queue if self.connection.wait_queue in queues else queues[0]
            command = ["BLMOVE", queue, TAKING_PREFIX + queue, "RIGHT", "LEFT", wait or 0]
            self._waited_on = queue
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()  # type: ignore[assignment]  # kombu: None
        self._sent = command[0]
        self.client.connection.send_command(*command)

    def _unstage(self, queue: str) -> None:
        """Put a message staged for this channel back at the head of `queue`: its consumer
        was cancelled while the wait was in flight (`celery control cancel_consumer`, a
        drain), so this channel will not take it, and a worker with kombu's BRPOP (an older
        version) never looks at staging lists."""
        with self.conn_or_acquire() as client:
            client.lmove(TAKING_PREFIX + queue, queue, "RIGHT", "RIGHT")

    def _poll_error(self, type: str, **options: Any) -> Any:
        # kombu reads and drops the pending reply; a TAKE's reply carries a message.
        if type == "BRPOP" and self._sent is not None:
            return self._brpop_read(**options)
        return super()._poll_error(type, **options)

    def _brpop_read(self, **options: Any) -> Any:
        sent, self._sent = self._sent, None
        if sent is None:
            return super()._brpop_read(**options)
        try:
            try:
                reply = self.client.parse_response(self.client.connection, sent, **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # reconnects on the next round
                raise
            except redis.exceptions.NoScriptError:  # a restarted Redis: load TAKE again
                with self.conn_or_acquire() as client:
                    client.script_load(TAKE)
                self._take_next = True
                raise Empty() from None
            self._take_next = bool(reply) or sent == "BLMOVE"
            if sent == "BLMOVE" and reply and self._waited_on not in self.active_queues:
                self._unstage(self._waited_on)
            if sent == "BLMOVE" or not reply:
                raise Empty()  # woken (or timed out): TAKE on the next round
            key, item, tag = (bytes_to_str(part) for part in reply)
            if tag:
                self.taken.add(tag)
            queue = key.rsplit(self.sep, 1)[0]
            self._wait_queue = queue
            self._queue_cycle.rotate(queue)
            self.connection._deliver(loads(item), queue)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]  # kombu declares it False
            self._flush_brpop_reauth()

    def standalone_client(self) -> redis.Redis:
        """A client on a pool of its own, for a record made while the channel closes."""
        return redis.Redis(connection_pool=redis.ConnectionPool(**self.record_params))


class SentinelChannel(kombu_redis.SentinelChannel, Channel):
    """kombu's Sentinel channel (the primary found through Sentinel, found again after a
    failover) with this module's QoS: the same heartbeats, owners and sweep. The MRO puts
    kombu's Sentinel pool logic before Channel, and Channel before kombu's Redis channel."""

    def _get_pool(self, asynchronous: bool = False) -> Any:
        """kombu's, but a lost connection stays a connection error: when the primary dies,
        Celery releases the connection and the channel's close (which hands back what it
        holds) asks for a new pool after the transport has dropped its client -- kombu's
        Sentinel channel then fails with an AttributeError that stops the worker. Raised as
        a connection error, Celery ignores it and reconnects; what the channel held stays
        recorded in Redis with its owner, and the sweep hands it back (dead after)."""
        if self.connection.client is None:
            raise redis.ConnectionError("the broker connection is closed")
        return super()._get_pool(asynchronous)

    def _receive_one(self, c: Any) -> Any:
        """kombu's, reading only what has arrived. kombu calls this when the pub/sub socket is
        readable and reads with redis-py's block=True, which redis-py 8 does with no timeout;
        when the socket was readable because the connection broke (the old primary cut off,
        kombu dropping the stale connection), redis-py reconnects -- to the new primary -- inside
        that read and then waits for the next broadcast for ever, on the worker's event loop
        (seen in the lab: stuck until systemd's watchdog killed the worker)."""
        read = c.parse_response
        c.parse_response = functools.partial(read, block=False)
        try:
            return super()._receive_one(c)
        finally:
            del c.parse_response

    def standalone_client(self) -> redis.Redis:
        """The primary, asked of the Sentinels again (kombu's own pool logic); the channel's
        Sentinel manager, which kombu closes with the channel, is left as it was."""
        manager = getattr(self, "_sentinel_manager", None)
        try:
            return redis.Redis(connection_pool=self._sentinel_managed_pool(asynchronous=False))
        finally:
            self._sentinel_manager = manager


class Transport(kombu_redis.Transport):
    Channel = Channel

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        options = client.transport_options
        self.heartbeat_interval = float(options.get("taskfleet_heartbeat_interval") or 0)
        self.dead_after = float(options.get("taskfleet_dead_after") or 0) \
            if self.heartbeat_interval else 0.0
        self.beat_in_thread = bool(options.get("taskfleet_heartbeat_thread"))
        self.wait_queue = str(options.get("taskfleet_wait_queue") or "")
        self.publish_replicas = int(options.get("taskfleet_publish_replicas") or 0)
        self.publish_timeout = float(options.get("taskfleet_publish_replicas_timeout") or 1.0)
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.heartbeating = False  # set once stamps run; records before that have no owner
        self._scripts: dict[str, Any] = {}
        self._beat_timer: Any = None
        self._beat_stop = threading.Event()

    def script(self, client: Any, source: str, keys: list[str], args: Iterable[Any]) -> Any:
        """Run a Lua script with redis-py's Script: EVALSHA, loaded again after a restart."""
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = client.register_script(source)
        return script(keys=keys, args=list(args), client=client)

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        super().register_with_event_loop(connection, loop)
        if not self.heartbeat_interval or self.heartbeating:
            return
        self.heartbeating = True
        if self.beat_in_thread:
            threading.Thread(target=self._beat_thread, name="taskfleet-heartbeat",
                             daemon=True).start()
        else:
            self._beat_timer = loop.call_repeatedly(self.heartbeat_interval, self.beat)

    def beat(self) -> None:
        """Re-stamp what every open channel holds; never raises (it runs on the event loop)."""
        for channel in list(self.channels):
            if channel.closed or channel.qos is None or not channel.qos._delivered:
                continue
            try:
                channel.qos.restamp()
            except Exception as exc:  # Redis away: the next beat tries again
                log.debug("heartbeat failed: %s", exc)

    def _beat_thread(self) -> None:
        while not self._beat_stop.wait(self.heartbeat_interval):
            self.beat()

    def close_connection(self, connection: Any) -> None:
        self._beat_stop.set()
        if self._beat_timer is not None:
            self._beat_timer.cancel()
            self._beat_timer = None
        super().close_connection(connection)


class SentinelTransport(Transport):
    """The same transport for sentinel:// URLs (kombu's SentinelTransport, with heartbeats).

    The heartbeats run in a thread here, not on the event loop: a re-stamp that needs a new
    connection asks the Sentinels for the primary first, and while the primary is cut off that
    lookup can block for as long as the partition lasts; on the loop it froze the whole worker
    until the watchdog restarted it (lab, ha-primary-partition). The watchdog still guards the
    loop itself.
    """

    Channel = SentinelChannel
    default_port = kombu_redis.SentinelTransport.default_port  # type: ignore[assignment]

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self.beat_in_thread = True
