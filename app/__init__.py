"""Taskfleet's shared Celery app: `celery -A app worker` runs it, `python -m app` drives it.

Only what a node runs lives here (the role copies app/*.py to every host); controller tools
such as the benchmark have their own package. Kept empty on purpose (beyond the version):
`python -m app --help` must work without a broker configured, so the Celery instance is only
built when app.celery is imported.

One word per idea: cli.UserError (message, hint, exit code) is the one error a user can fix,
cli.die() raises it and cli.main() prints it as one line `taskfleet: error: ...`. The lower
modules signal in their own terms and cli turns that into a UserError at its edge:
config.ConfigError (a bad setting) and connection.BrokerError (Redis unusable);
publish.PublishFailed is not a user error but the count of tasks a failed batch left
uncertain. status.print_table is the one table printer. The command line is cli.py (helpers,
parser, main), submit.py (`submit`) and status.py (`status`, `ping`, `config`).
"""

__version__ = "0.1.0"
