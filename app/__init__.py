"""Taskfleet's shared Celery app: `celery -A app worker` runs it, `python -m app` drives it.

Kept empty on purpose (beyond the version): `python -m app --help` must work without a broker
configured, so the Celery instance is only built when app.celery is imported.
"""

__version__ = "0.1.0"
