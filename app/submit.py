"""`submit`: send a task, or a batch of them, and optionally wait for the results.

It shares cli.py's helpers with the other commands (settings, the Redis preflight, one-line
errors) and calls them through the module, as status.py does.

Redis restarting under a running `submit` (systemd brings a killed redis-server back from its
AOF within seconds) does not end it: RideOut waits for Redis to answer again, up to
OUTAGE_PATIENCE seconds of continuous outage (and never past --timeout while waiting for
results), then publishing and waiting go on where they were.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import redis

from . import cli
from .connection import REDIS_DOWN, client, lost_connection, one_line, retry_until_back
from .publish import BATCH

if TYPE_CHECKING:
    from celery import Celery, Task


class Progress:
    """A plain progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.last = label, total, 0.0
        self.enabled = total > 1 and sys.stderr.isatty()

    def update(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < 0.1 and done < self.total):
            return
        self.last = now
        filled = 30 * done // self.total
        bar = "#" * filled + "." * (30 - filled)
        sys.stderr.write(f"\r{self.label} [{bar}] {done}/{self.total}")
        if done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    def close(self, done: int) -> None:
        if self.enabled and done < self.total:
            sys.stderr.write("\n")


# Seconds of continuous Redis outage `submit` waits through before it gives up.
OUTAGE_PATIENCE = 30.0


def release(results: list[Any]) -> None:
    """Stop listening for results we will not wait for any longer.

    The Redis result backend subscribes to each task's result channel when it is sent; left
    alone, AsyncResult.__del__ unsubscribes during interpreter shutdown and prints a traceback.
    With Redis away the unsubscribe fails and is skipped: the connection it was for is gone.
    """
    for result in results:
        try:
            result.backend.remove_pending_result(result)
        except Exception as exc:
            if lost_connection(exc) is None:
                raise


class RideOut:
    """Waits for Redis to come back after a Redis operation of the command failed.

    wait() PINGs every Redis the command uses (broker, result backend) with backoff (0.2 s
    doubling to 1 s) until all answer -- at once when Redis never went away -- and then
    reconnects Celery's result listener: it reads the results stored in the meantime and
    subscribes to the pending ones again. The first failed PING of an outage prints one line
    on stderr; after `patience` seconds of outage (or at `deadline`) wait() gives up.
    """

    def __init__(self, app: Celery, patience: float = OUTAGE_PATIENCE) -> None:
        s = cli.settings()
        self.app, self.patience, self.timeout = app, patience, s.connect_timeout
        self.urls = list(dict.fromkeys((s.broker_url, s.result_backend)))
        self.sentinel = s.sentinel_args  # the HA tier: each URL is a list of Sentinels
        self.gave_up = ""  # why the last wait() gave up, one line

    def reason(self, exc: BaseException) -> str:
        """The error, one line, no password."""
        return one_line(exc, *self.urls).rstrip(".")

    def wait(self, exc: BaseException, deadline: float | None = None) -> bool:
        """After `exc` (a failed Redis operation): True once Redis answers and results can be
        received again; False after the bound (`gave_up` then says why)."""
        start, self.gave_up = time.monotonic(), ""
        if deadline is not None and start >= deadline:
            self.gave_up = f"Redis failed ({self.reason(lost_connection(exc) or exc)})"
            return False
        bound = max(0.0, self.patience if deadline is None else
                    min(self.patience, deadline - start))
        announced = False

        def announce(error: BaseException) -> None:
            nonlocal announced
            if not announced:
                announced = True
                print(f"{cli.PROG}: Redis unavailable ({self.reason(error)}); retrying for up "
                      f"to {bound:.0f} s", file=sys.stderr)

        try:
            retry_until_back(self._back, bound, cap=1.0, on_retry=announce)
        except REDIS_DOWN as last:
            self.gave_up = f"Redis unavailable for {bound:.0f} s ({self.reason(last)})"
            return False
        return True

    def _back(self) -> None:
        for url in self.urls:
            conn = client(url, self.timeout, **self.sentinel)
            try:
                conn.ping()
            finally:
                conn.close()
        # Celery's Redis result listener (celery.backends.redis.ResultConsumer): a new pub/sub
        # connection, the ready results of every subscribed task read, and subscribed again.
        reconnect = getattr(self.app.backend.result_consumer, "_reconnect_pubsub", None)
        if reconnect is None:
            return
        try:
            reconnect()
        except Exception as exc:
            # Redis went away again meanwhile; Celery wraps that in a RuntimeError ("Retry
            # limit exceeded") when its own single reconnect fails: wait again.
            cause = lost_connection(exc)
            if cause is None:
                raise
            raise redis.ConnectionError(str(cause)) from exc


def failure_text(task_id: str, meta: dict[str, Any]) -> str:
    """One line naming a failed task and its exception, from its result meta."""
    exc = meta.get("result")
    text = f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) \
        else f"{meta.get('status')}: {exc}"
    return f"task {task_id}: " + " ".join(text.split())[:300]


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:.0f} tasks/s" if seconds > 0 else "- tasks/s"


# ---------------------------------------------------------------- submit

class Submit:
    """Send a task (or N copies) and optionally wait for the results."""

    @staticmethod
    def add_parser(subparsers: Any) -> None:
        p = subparsers.add_parser(
            "submit", help="send a task to the workers",
            description="Send TASK with ARGS to the workers. ARGS are JSON values when they "
                        "parse (10 is a number, [1,2] a list), plain strings otherwise.",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog="examples:\n  python -m app submit add 10 20 --wait\n"
                   "  python -m app submit sleep 1 --count 100 --wait\n"
                   "  python -m app submit sleep --kwargs '{\"seconds\": 2}' --queue slow")
        p.add_argument("task", metavar="TASK", help="task name: add or app.tasks.add")
        p.add_argument("args", metavar="ARGS", nargs="*", help="positional arguments")
        p.add_argument("--kwargs", metavar="JSON", help="keyword arguments as a JSON object")
        p.add_argument("--queue", metavar="Q", type=cli.queue_name,
                       help="queue to send to (default: TASKFLEET_DEFAULT_QUEUE)")
        p.add_argument("--count", metavar="N", type=cli.positive(int), default=1,
                       help="send N copies on one connection (default 1)")
        p.add_argument("--batch", metavar="B", type=cli.positive(int), default=BATCH,
                       help=f"with --count: tasks per Redis round trip (default {BATCH}; "
                            "1 = each task confirmed by Redis before the next is sent)")
        p.add_argument("--wait", action="store_true",
                       help="wait for the result(s); with --count print a summary")
        p.add_argument("--timeout", metavar="S", type=cli.positive(float), default=60.0,
                       help="seconds to wait for results with --wait (default 60)")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        app = cli.celery_app()
        task = cli.resolve_task(app, args.task)
        call_args = [cli.parse_arg(a) for a in args.args]
        call_kwargs = cli.parse_kwargs(args.kwargs)
        cli.check_signature(task, call_args, call_kwargs)
        s = cli.settings()
        cli.check_redis(s, backend=args.wait)
        queue = args.queue or s.default_queue
        if args.count == 1:
            return Submit.one(app, task, call_args, call_kwargs, queue, args)
        return Submit.many(app, task, call_args, call_kwargs, queue, args)

    @staticmethod
    def one(app: Celery, task: Task, call_args: list[Any], call_kwargs: dict[str, Any],
            queue: str, args: argparse.Namespace) -> int:
        from celery.exceptions import TimeoutError as CeleryTimeout
        from celery.utils import uuid

        from .transport import NotReplicated

        task_id = uuid()
        try:
            result = task.apply_async(call_args, call_kwargs, queue=queue, task_id=task_id)
        except NotReplicated as exc:
            cli.die(f"task {task_id}: {exc}", cli.EXIT_FAIL)
        if not args.wait:
            release([result])
            print(result.id)
            return 0
        deadline, ride = time.monotonic() + args.timeout, RideOut(app)
        while True:
            try:
                value = result.get(timeout=max(0.01, deadline - time.monotonic()),
                                   propagate=False)
                break
            except CeleryTimeout:
                release([result])
                cli.die(f"no result for task {result.id} after {args.timeout:g} s: are workers "
                    f"running and consuming queue {queue!r}? (python -m app ping)",
                    cli.EXIT_FAIL)
            except Exception as exc:
                if lost_connection(exc) is None:
                    raise
                if not ride.wait(exc, deadline):
                    release([result])
                    cli.die(f"no result for task {result.id} after {args.timeout:g} s: "
                            f"{ride.gave_up}", cli.EXIT_FAIL)
        if result.failed():
            cli.die(f"task {task.name} ({result.id}) failed: {type(value).__name__}: {value}",
                cli.EXIT_FAIL)
        print(json.dumps(value))
        return 0

    @staticmethod
    def many(app: Celery, task: Task, call_args: list[Any], call_kwargs: dict[str, Any],
             queue: str, args: argparse.Namespace) -> int:
        from .publish import BatchPublisher, PublishFailed

        unconfirmed, streak, first_error, gone = 0, 0, None, False
        bar = Progress("publishing", args.count)
        start = time.monotonic()
        ride = RideOut(app)
        # One connection for the whole burst, `--batch` tasks per Redis round trip.
        pub = BatchPublisher(app, args.batch)
        try:
            with pub:
                i = 0
                while i < args.count:
                    try:
                        pub.send(task, call_args, call_kwargs, queue=queue)
                        streak = 0
                    except PublishFailed as exc:  # counted and reported, never dropped silently
                        unconfirmed, streak = unconfirmed + exc.uncertain, streak + 1
                        first_error = first_error or exc.cause
                        if streak >= 10:  # failing while Redis answers: something else is wrong
                            break
                        # Redis went away: wait for it to answer again, then go on.
                        if lost_connection(exc.cause) is not None and not ride.wait(exc.cause):
                            gone = True
                            break
                        if not exc.uncertain:  # this task was not sent: send it now
                            continue
                    i += 1
                    bar.update(i)
        except PublishFailed as exc:  # the last batch, sent when the block ends
            unconfirmed += exc.uncertain
            first_error = first_error or exc.cause
        results = pub.accepted
        failed = args.count - len(results)
        bar.close(len(results) + failed)
        release(pub.unconfirmed)
        published = time.monotonic() - start
        print(f"submitted {len(results)}/{args.count} tasks to queue {queue!r} in "
              f"{published:.2f} s ({rate(len(results), published)})")
        if first_error is not None:
            from .transport import NotReplicated

            never = failed - unconfirmed
            why = ("Redis took them but too few replicas confirmed in time"
                   if isinstance(first_error, NotReplicated) else "Redis failed during their batch")
            print(f"{cli.PROG}: error: {failed} submissions failed ({unconfirmed} unconfirmed: "
                  f"{why}, they may still run; {never} not sent); "
                  f"first error: {one_line(first_error, app.conf.broker_url)}",
                  file=sys.stderr)
        try:
            if args.wait and results and not gone:
                code = Submit.collect(app, results, args.timeout, start, queue, ride)
                return code or (cli.EXIT_FAIL if failed else 0)
            return cli.EXIT_FAIL if failed else 0
        finally:
            release(results)

    @staticmethod
    def collect(app: Celery, results: list[Any], timeout: float, start: float,
                queue: str, ride: RideOut | None = None) -> int:
        """Wait for all results (in arrival order) and print the per-worker summary.

        When Redis goes away meanwhile: wait for it (within `timeout`), then wait again for
        the results not seen yet (they were stored in Redis all along)."""
        from celery.exceptions import TimeoutError as CeleryTimeout
        from celery.result import ResultSet

        done, failed, workers = 0, 0, Counter[str]()
        first_failure = ""
        bar = Progress("results   ", len(results))
        pending = {result.id: result for result in results}
        deadline, ride = time.monotonic() + timeout, ride or RideOut(app)
        while pending:
            waiting = ResultSet(list(pending.values()), app=app)
            try:
                for task_id, meta in waiting.iter_native(
                        timeout=max(0.01, deadline - time.monotonic())):
                    if pending.pop(task_id, None) is None:
                        continue  # counted before the outage
                    if meta.get("status") == "SUCCESS":
                        done += 1
                    else:
                        failed += 1
                        first_failure = first_failure or failure_text(task_id, meta)
                    # result_extended=True stores the worker's node name (name@host) in the meta.
                    workers[meta.get("worker") or "?"] += 1
                    bar.update(done + failed)
            except CeleryTimeout:
                break
            except Exception as exc:
                if lost_connection(exc) is None:
                    raise
                if not ride.wait(exc, deadline):
                    break
        bar.close(done + failed)
        elapsed = time.monotonic() - start
        missing = len(results) - done - failed
        print(f"done {done}, failed {failed}, no result {missing} in {elapsed:.2f} s "
              f"({rate(done + failed, elapsed)})")
        for worker, n in sorted(workers.items()):
            print(f"  {worker:<40} {n:>7}")
        if first_failure:
            print(f"{cli.PROG}: error: {failed} tasks failed; first failure: {first_failure}",
                  file=sys.stderr)
        if missing and ride.gave_up:
            print(f"{cli.PROG}: error: {missing} results missing: {ride.gave_up}",
                  file=sys.stderr)
        elif missing:
            print(f"{cli.PROG}: error: {missing} results missing after {timeout:g} s: are workers "
                  f"running and consuming queue {queue!r}? (python -m app ping)", file=sys.stderr)
        return cli.EXIT_FAIL if failed or missing else 0
