"""`python -m bench`: measure a deployed cluster, kit against the plain setup, in one run.

Controller-only: `app/` is what every node runs, this package is what the controller runs
against them. What the hosts need of it (the baseline worker app, the latency probe) reaches
them through playbooks/bench.yml, for the length of a run.

Two sides run the same work on the same worker hosts, one after the other, in the same run:

* kit      -- the deployed Taskfleet workers (app.celery settings, systemd units) driven the way
              the kit's client does it: one producer connection, publishes pipelined in batches
              (kombu's Producer.batch(): one Redis round trip per batch instead of per task),
              the queue declared once per burst instead of on every publish.
* baseline -- bench.baseline: Celery's defaults, `--pool=solo`, one `.delay()`-style
              `apply_async()` per task (a publish each); both sides read results one by one.

Modules, one concern each:
  cli       options, the run from start to finish, `python -m bench`
  measure   the two sides, worker selection, the timed runs
  machine   CPU used during a run (/proc/stat, Redis, this client), hardware and versions
  remote    Ansible: baseline workers on the hosts, the latency probe on a client, deploy times
  report    the terminal table, markdown, the plot, the docs/PERFORMANCE.md section
  baseline  the plain-Celery app the baseline workers run (shipped to the workers)
  probe     the latency run on a client host (shipped to the clients)

One word per idea here: BenchError (message and hint) is the one error a user can fix; die()
raises it; guarded() turns it into one line `bench: error: ...` and exit status 2.
report.print_table is the one table printer.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn

EXIT_USAGE = 2  # the user's input, configuration or cluster needs fixing


class BenchError(Exception):
    """A problem the user can fix: `message` says what, `hint` says how."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(f"{message} ({hint})" if hint else message)
        self.hint = hint


def die(message: str, hint: str | None = None) -> NoReturn:
    """Stop the command with a user error (printed by guarded(), never as a traceback)."""
    raise BenchError(message, hint)


def guarded(command: Callable[[], int]) -> int:
    """Run a command; a user error, Celery's result timeout or Ctrl-C ends it with one line."""
    from celery.exceptions import TimeoutError as CeleryTimeout

    try:
        return command()
    except BenchError as exc:
        error = exc
    except CeleryTimeout:
        error = BenchError("timed out waiting for task results",
                           "are the workers running? check `python -m app status`")
    except KeyboardInterrupt:
        error = BenchError("interrupted")
    print(f"bench: error: {error}", file=sys.stderr)
    return EXIT_USAGE


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)
