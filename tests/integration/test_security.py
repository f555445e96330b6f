"""Workers need no @dangerous Redis command.

This module runs after the others (file order), so the ACL check covers the whole suite. That a
pickle message is refused and never executed is proven on deployed hosts, with a live payload:
tests/lab/test_security_lab.py.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_no_command_was_denied_by_the_acl(cluster, redis_server):
    """`+@all -@dangerous` is enough for workers, clients, Celery's CLI and the kill tests."""
    entries = redis_server.admin().acl_log(count=1000)
    denied = [e for e in entries
              if e.get("username") == "taskfleet" and e.get("reason") != "auth"]
    assert denied == []
