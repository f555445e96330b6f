"""Unit-test set-up: import the app from the repository root, with a harmless configuration.

The broker URL points at a closed loopback port: unit tests must never need Redis, and a test
that accidentally touches the network fails instead of waiting for a server.
"""

from __future__ import annotations

import pytest

UNIT_BROKER = "redis://taskfleet:unit-secret@127.0.0.1:1/0"


@pytest.fixture(scope="package")
def app_env(tmp_path_factory):
    """Environment for importing app.celery once in this process (settings are read once).

    Package scope: undone when the unit tests end, before other suites run in this process."""
    from app.config import get_settings

    mp = pytest.MonkeyPatch()
    empty = tmp_path_factory.mktemp("env") / "empty.env"
    empty.write_text("")
    mp.setenv("TASKFLEET_ENV_FILE", str(empty))  # never the developer's ./.env
    mp.setenv("CELERY_BROKER_URL", UNIT_BROKER)
    mp.delenv("CELERY_RESULT_BACKEND", raising=False)
    mp.delenv("TASKFLEET_DEFAULT_QUEUE", raising=False)
    get_settings.cache_clear()
    yield
    mp.undo()
