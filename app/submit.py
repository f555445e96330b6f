"""`submit`: send a task, or a batch of them, and optionally wait for the results.

It shares cli.py's helpers with the other commands (settings, the Redis preflight, one-line
errors) and calls them through the module, as status.py does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from . import cli
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


def release(results: list[Any]) -> None:
    """Stop listening for results we will not wait for any longer.

    The Redis result backend subscribes to each task's result channel when it is sent; left
    alone, AsyncResult.__del__ unsubscribes during interpreter shutdown and prints a traceback.
    """
    for result in results:
        result.backend.remove_pending_result(result)


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
            return Submit.one(task, call_args, call_kwargs, queue, args)
        return Submit.many(app, task, call_args, call_kwargs, queue, args)

    @staticmethod
    def one(task: Task, call_args: list[Any], call_kwargs: dict[str, Any], queue: str,
            args: argparse.Namespace) -> int:
        from celery.exceptions import TimeoutError as CeleryTimeout

        result = task.apply_async(call_args, call_kwargs, queue=queue)
        if not args.wait:
            release([result])
            print(result.id)
            return 0
        try:
            value = result.get(timeout=args.timeout, propagate=False)
        except CeleryTimeout:
            release([result])
            cli.die(f"no result for task {result.id} after {args.timeout:g} s: are workers "
                f"running and consuming queue {queue!r}? (python -m app ping)", cli.EXIT_FAIL)
        if result.failed():
            cli.die(f"task {task.name} ({result.id}) failed: {type(value).__name__}: {value}",
                cli.EXIT_FAIL)
        print(json.dumps(value))
        return 0

    @staticmethod
    def many(app: Celery, task: Task, call_args: list[Any], call_kwargs: dict[str, Any],
             queue: str, args: argparse.Namespace) -> int:
        from .publish import BatchPublisher, PublishFailed

        unconfirmed, streak, first_error = 0, 0, None
        bar = Progress("publishing", args.count)
        start = time.monotonic()
        # One connection for the whole burst, `--batch` tasks per Redis round trip.
        pub = BatchPublisher(app, args.batch)
        try:
            with pub:
                for i in range(args.count):
                    try:
                        pub.send(task, call_args, call_kwargs, queue=queue)
                        streak = 0
                    except PublishFailed as exc:  # counted and reported, never dropped silently
                        unconfirmed, streak = unconfirmed + exc.uncertain, streak + 1
                        first_error = first_error or exc.cause
                        if streak >= 10:  # Redis is gone: do not spend a retry cycle per batch
                            break
                    bar.update(i + 1)
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
            from .connection import scrub

            never = failed - unconfirmed
            print(f"{cli.PROG}: error: {failed} submissions failed ({unconfirmed} unconfirmed: "
                  f"Redis failed during their batch, they may still run; {never} not sent); "
                  f"first error: {scrub(str(first_error), app.conf.broker_url)}",
                  file=sys.stderr)
        try:
            if args.wait and results:
                code = Submit.collect(app, results, args.timeout, start, queue)
                return code or (cli.EXIT_FAIL if failed else 0)
            return cli.EXIT_FAIL if failed else 0
        finally:
            release(results)

    @staticmethod
    def collect(app: Celery, results: list[Any], timeout: float, start: float,
                queue: str) -> int:
        """Wait for all results (in arrival order) and print the per-worker summary."""
        from celery.exceptions import TimeoutError as CeleryTimeout
        from celery.result import ResultSet

        done, failed, workers = 0, 0, Counter[str]()
        first_failure = ""
        bar = Progress("results   ", len(results))
        try:
            for task_id, meta in ResultSet(results, app=app).iter_native(timeout=timeout):
                if meta.get("status") == "SUCCESS":
                    done += 1
                else:
                    failed += 1
                    first_failure = first_failure or failure_text(task_id, meta)
                # result_extended=True stores the worker's node name (name@host) in the meta.
                workers[meta.get("worker") or "?"] += 1
                bar.update(done + failed)
        except CeleryTimeout:
            pass
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
        if missing:
            print(f"{cli.PROG}: error: {missing} results missing after {timeout:g} s: are workers "
                  f"running and consuming queue {queue!r}? (python -m app ping)", file=sys.stderr)
        return cli.EXIT_FAIL if failed or missing else 0
