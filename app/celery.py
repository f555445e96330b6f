"""The Celery instance, like Celery's examples/next-steps/proj/celery.py.

`celery -A app worker` finds it here (Celery looks for `app.celery:app`). Settings come from
app.config, which validates the environment once; a bad value stops the process with one line
and exit code 2 instead of a traceback from deep inside Celery or the worker's retry loop.
"""

from __future__ import annotations

import os
import sys

from celery import Celery

from .config import ConfigError, celery_settings, get_settings

try:
    settings = get_settings()
except ConfigError as exc:
    print(f"taskfleet: configuration error: {exc}", file=sys.stderr)
    raise SystemExit(2) from None

# `celery worker` takes its log level from -l or, through click's auto env vars, from
# CELERY_WORKER_LOGLEVEL; default that to TASKFLEET_LOG_LEVEL so one variable drives both.
# This module is imported by `celery -A app` before the worker's own options are parsed.
os.environ.setdefault("CELERY_WORKER_LOGLEVEL", settings.log_level)

app = Celery("app", include=["app.tasks"])
app.config_from_object(celery_settings(settings))
