"""Workers run JSON only, and need no @dangerous Redis command.

This module runs after the others (file order), so the ACL check covers the whole suite.
"""

from __future__ import annotations

import uuid

import pytest

from .itkit import client_app, wait_for

pytestmark = pytest.mark.integration


def test_pickle_message_is_refused_not_executed(cluster, redis_server):
    """A pickle body (which could run any code on unpickling) never reaches a task."""
    from kombu import Connection

    refusal = "Refusing to deserialize untrusted content of type pickle"

    def refusals() -> int:
        return sum(w.log_text().count(refusal) for w in cluster.workers)

    before = refusals()
    client = client_app(cluster.env)
    task_id = str(uuid.uuid4())
    # A genuine protocol-2 Celery message for app.tasks.add(4242, 1), serialized with pickle.
    headers, properties, body, _ = client.amqp.as_task_v2(task_id, "app.tasks.add",
                                                          args=(4242, 1))
    with Connection(redis_server.url(0)) as conn:
        conn.Producer().publish(body, exchange="", routing_key="celery", serializer="pickle",
                                headers=headers, **properties)

    wait_for(lambda: refusals() > before, 15, "a worker to log that it refused the message")
    # The same task as JSON runs fine, and afterwards there is still no result for the pickle one.
    assert client.send_task("app.tasks.add", args=(4242, 1)).get(timeout=10) == 4243
    assert redis_server.admin().exists(f"celery-task-meta-{task_id}") == 0
    assert client.AsyncResult(task_id).state == "PENDING"
    assert not any(f"Task app.tasks.add[{task_id}] succeeded" in w.log_text()
                   for w in cluster.workers)
    client.close()


def test_no_command_was_denied_by_the_acl(cluster, redis_server):
    """`+@all -@dangerous` is enough for workers, clients, Celery's CLI and the kill tests."""
    entries = redis_server.admin().acl_log(count=1000)
    denied = [e for e in entries
              if e.get("username") == "taskfleet" and e.get("reason") != "auth"]
    assert denied == []
