"""Redis SIGKILLed while workers consume fast: every published task still runs.

kombu's Redis transport takes a message with BRPOP and only then records it as unacked
(ZADD + HSET). A Redis crash between the two used to lose that message: it was popped (and
the pop is in the AOF), but recorded nowhere. app/transport.py pops and records in one script
(TAKE), so a reply that never arrives loses nothing. This test kills a real redis-server (AOF
on) several times while two workers take hundreds of tasks a second, restarts it on the
same files, and checks the ledger.
"""

from __future__ import annotations

import secrets
import time
from collections import Counter
from pathlib import Path

import pytest

from .itkit import (
    REDIS_SERVER,
    CrashableRedis,
    client_app,
    node_env,
    start_workers,
    stop_workers,
    wait_for,
)

pytestmark = pytest.mark.integration
TASKS, KILLS = 3000, 3


def test_redis_sigkill_during_fast_consumption_loses_nothing(tmp_path):
    if not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    redis = CrashableRedis(tmp_path)
    redis.start()
    env = node_env(tmp_path, redis.url())
    workers = start_workers(env, ["c1", "c2"], tmp_path)
    batch = f"crash-{secrets.token_hex(4)}"
    ledger = f"taskfleet:ledger:{batch}"
    try:
        from app.publish import BatchPublisher

        client = client_app(env)
        with BatchPublisher(client) as pub:
            for n in range(TASKS):
                pub.send(client.signature("app.tasks.mark"), (batch, n), ignore_result=True)
        assert len(pub.accepted) == TASKS
        client.close()
        restarted: list[str] = []

        def supervise() -> None:
            """What systemd's Restart=always does for the deployed workers: kombu 5.7's worker
            sometimes exits on a dropped connection ("Unrecoverable error"); its taken
            messages are in `unacked` and come back once its heartbeats are missed."""
            for i, w in enumerate(workers):
                if not w.alive():
                    try:
                        workers[i] = start_workers(env, [w.name.split("@")[0]], tmp_path)[0]
                    except Exception as exc:  # Redis still coming up: again on the next poll
                        print(f"restart of {w.name} failed, retrying: {exc}")
                        continue
                    restarted.append(w.name)

        def ran_at_least(n: int) -> bool:
            supervise()
            return redis.admin().llen(ledger) >= n

        for k in range(KILLS):  # kill while the workers are busy taking tasks
            wait_for(lambda k=k: ran_at_least((k + 1) * TASKS // (KILLS + 2)), 60,
                     "workers to run tasks", 0.01)
            redis.kill()
            time.sleep(0.5)
            redis.start()

        def all_ran() -> bool:
            return ran_at_least(TASKS) and not redis.admin().hlen("unacked")

        try:
            wait_for(all_ran, 90, "every task to run")
        finally:
            runs = Counter(int(e.split(b"@")[0]) for e in redis.admin().lrange(ledger, 0, -1))
            lost = sorted(set(range(TASKS)) - set(runs))
            dup = sum(1 for c in runs.values() if c > 1)
            print(f"\n{KILLS} Redis SIGKILLs during {TASKS} tasks: {len(lost)} lost, "
                  f"{dup} ran twice; workers restarted after exiting: {restarted}")
        assert not lost, f"accepted but never ran: {lost[:20]}"
    finally:
        stop_workers(workers)
        if redis.proc and redis.proc.poll() is None:
            redis.proc.terminate()
            redis.proc.wait(10)


def test_message_taken_while_the_channel_closes_is_still_recorded(redis_server):
    """kombu can deliver one more message while it closes a channel whose connection is
    already gone (it reads the reply of a BRPOP still in flight); the unacked record must
    still be written, or nothing would ever run that message again."""
    from kombu import Connection
    from kombu.utils.json import loads

    url = redis_server.url(4)
    admin = redis_server.admin(db=4)
    with Connection(url, transport="app.transport:Transport") as conn:
        channel = conn.default_channel
        conn.SimpleQueue("closing").put({"n": 1})
        raw = admin.rpop("closing")  # as BRPOP takes it
        message = channel.Message(loads(raw), channel=channel)
        # The channel's connection is gone: kombu cannot build a client any more.
        saved, channel.connection.client, channel._pool = channel.connection.client, None, None
        try:
            with pytest.raises(AttributeError, match="hostname"):
                channel._create_client()
            channel.qos.append(message, message.delivery_tag)
        finally:
            channel.connection.client = saved
        record = admin.hget("unacked", message.delivery_tag)
        assert record is not None, "the taken message is recorded nowhere: it would be lost"
        assert loads(record)[0]["body"] == message._raw["body"]
        assert admin.zscore("unacked_index", message.delivery_tag) is not None
    # Closing the channel hands the unacknowledged message back to its queue, as kombu does
    # with every message it recorded.
    assert admin.llen("closing") == 1 and admin.hlen("unacked") == 0
