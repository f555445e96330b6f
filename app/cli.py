"""`python -m app`: submit tasks and look at the cluster, with clear one-line errors.

Subcommands are the classes subcommands() lists, each with `add_parser(subparsers)` and
`run(args) -> int`. Adding one is one line.

Mistakes the user can fix (unknown task, wrong arguments, bad JSON, bad configuration, Redis
unreachable or refusing the password) print `taskfleet: error: ...` on stderr and exit non-zero
within seconds: never a traceback, never minutes of Celery's connection retries.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, NoReturn

from . import __version__
from .config import QUEUE_RE, ConfigError, Settings, get_settings
from .publish import BATCH

if TYPE_CHECKING:
    from celery import Celery, Task

PROG = "taskfleet"
TASK_PREFIX = "app.tasks."
EXIT_FAIL = 1  # the command ran but the cluster did not do what was asked
EXIT_USAGE = 2  # the user's input or configuration is wrong (argparse uses 2 as well)


class UserError(Exception):
    """A problem the user can fix, in one line: what (`message`), how (`hint`); `code` is the
    exit status."""

    def __init__(self, message: str, code: int = EXIT_USAGE, *, hint: str | None = None) -> None:
        super().__init__(f"{message} ({hint})" if hint else message)
        self.code = code


def die(message: str, code: int = EXIT_USAGE, *, hint: str | None = None) -> NoReturn:
    """Stop the command with a user error; main() prints it as one line, never a traceback."""
    raise UserError(message, code, hint=hint)


# ---------------------------------------------------------------- shared helpers

def settings() -> Settings:
    try:
        return get_settings()
    except ConfigError as exc:
        die(f"configuration: {exc}")


def celery_app() -> Celery:
    """The configured Celery app with the tasks registered (config validated first)."""
    settings()
    from . import tasks  # registers app.tasks.* on the app

    return tasks.app


def check_redis(s: Settings, backend: bool = False) -> None:
    """Fail fast, with the cause, if the broker (and result backend) cannot be used."""
    from .connection import BrokerError, check

    try:
        check(s.broker_url, "CELERY_BROKER_URL", s.connect_timeout)
        if backend and s.result_backend != s.broker_url:
            check(s.result_backend, "CELERY_RESULT_BACKEND", s.connect_timeout)
    except BrokerError as exc:
        die(str(exc), EXIT_FAIL)


def known_tasks(app: Celery) -> list[str]:
    return sorted(name for name in app.tasks if not name.startswith("celery."))


def resolve_task(app: Celery, name: str) -> Task:
    """Find a task by short name (add) or full name (app.tasks.add)."""
    for candidate in (name, TASK_PREFIX + name):
        if candidate in app.tasks and not candidate.startswith("celery."):
            return app.tasks[candidate]
    short = ", ".join(n.removeprefix(TASK_PREFIX) for n in known_tasks(app))
    die(f"unknown task {name!r}; known tasks: {short}")


def parse_arg(text: str) -> Any:
    """A command-line argument as a JSON value when it parses (10 -> int), else a string."""
    try:
        return json.loads(text, parse_constant=lambda c: c)
    except ValueError:
        return text


def parse_kwargs(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        die(f"--kwargs is not valid JSON ({exc.msg} at character {exc.pos}): "
            """pass an object, e.g. --kwargs '{"seconds": 2}'""")
    if not isinstance(value, dict):
        die("""--kwargs must be a JSON object, e.g. --kwargs '{"seconds": 2}'""")
    return value


def check_signature(task: Task, args: list[Any], kwargs: dict[str, Any]) -> None:
    """Refuse, before anything is sent, arguments the task's function cannot take."""
    sig = inspect.signature(task.run)
    try:
        sig.bind(*args, **kwargs)
    except TypeError as exc:
        short = task.name.removeprefix(TASK_PREFIX)
        die(f"wrong arguments for {short}: {exc}; usage: {short}{sig_text(sig)}")


def sig_text(sig: inspect.Signature) -> str:
    return "(" + ", ".join(str(p).split(":")[0] for p in sig.parameters.values()) + ")"


def positive(kind: type) -> Any:
    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
        return value
    return convert


def queue_name(text: str) -> str:
    if not QUEUE_RE.match(text):
        raise argparse.ArgumentTypeError(
            f"invalid queue name {text!r}: use letters, digits and _ . @ : -")
    return text


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
        p.add_argument("--queue", metavar="Q", type=queue_name,
                       help="queue to send to (default: TASKFLEET_DEFAULT_QUEUE)")
        p.add_argument("--count", metavar="N", type=positive(int), default=1,
                       help="send N copies on one connection (default 1)")
        p.add_argument("--batch", metavar="B", type=positive(int), default=BATCH,
                       help=f"with --count: tasks per Redis round trip (default {BATCH}; "
                            "1 = each task confirmed by Redis before the next is sent)")
        p.add_argument("--wait", action="store_true",
                       help="wait for the result(s); with --count print a summary")
        p.add_argument("--timeout", metavar="S", type=positive(float), default=60.0,
                       help="seconds to wait for results with --wait (default 60)")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        app = celery_app()
        task = resolve_task(app, args.task)
        call_args = [parse_arg(a) for a in args.args]
        call_kwargs = parse_kwargs(args.kwargs)
        check_signature(task, call_args, call_kwargs)
        s = settings()
        check_redis(s, backend=args.wait)
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
            die(f"no result for task {result.id} after {args.timeout:g} s: are workers "
                f"running and consuming queue {queue!r}? (python -m app ping)", EXIT_FAIL)
        if result.failed():
            die(f"task {task.name} ({result.id}) failed: {type(value).__name__}: {value}",
                EXIT_FAIL)
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
            print(f"{PROG}: error: {failed} submissions failed ({unconfirmed} unconfirmed: "
                  f"Redis failed during their batch, they may still run; {never} not sent); "
                  f"first error: {scrub(str(first_error), app.conf.broker_url)}",
                  file=sys.stderr)
        try:
            if args.wait and results:
                code = Submit.collect(app, results, args.timeout, start, queue)
                return code or (EXIT_FAIL if failed else 0)
            return EXIT_FAIL if failed else 0
        finally:
            release(results)

    @staticmethod
    def collect(app: Celery, results: list[Any], timeout: float, start: float,
                queue: str) -> int:
        """Wait for all results (in arrival order) and print the per-worker summary."""
        from celery.exceptions import TimeoutError as CeleryTimeout
        from celery.result import ResultSet

        done, failed, workers = 0, 0, Counter[str]()
        bar = Progress("results   ", len(results))
        try:
            for _task_id, meta in ResultSet(results, app=app).iter_native(timeout=timeout):
                if meta.get("status") == "SUCCESS":
                    done += 1
                else:
                    failed += 1
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
        if missing:
            print(f"{PROG}: error: {missing} results missing after {timeout:g} s: are workers "
                  f"running and consuming queue {queue!r}? (python -m app ping)", file=sys.stderr)
        return EXIT_FAIL if failed or missing else 0


# ---------------------------------------------------------------- entry point

def subcommands() -> tuple[Any, ...]:
    """Every subcommand, in the order --help lists them."""
    from .status import Ping, ShowConfig, Status  # they use this module's helpers

    return (Submit, Status, Ping, ShowConfig)


class Parser(argparse.ArgumentParser):
    """argparse with the project's one-line error format (usage stays in --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{PROG}: error: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m app",
        description="Taskfleet: submit tasks to the shared Celery app and check its workers. "
                    "Settings come from the environment and the env file ($TASKFLEET_ENV_FILE, "
                    "else ./.env); see .env.example.")
    parser.add_argument("--version", action="version", version=version_text())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                       parser_class=Parser)
    for cmd in subcommands():
        before = set(subparsers.choices)
        cmd.add_parser(subparsers)
        for name in set(subparsers.choices) - before:
            subparsers.choices[name].set_defaults(handler=cmd.run)
    return parser


def version_text() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        deps = f" (celery {version('celery')}, kombu {version('kombu')})"
    except PackageNotFoundError:
        deps = ""
    return f"{PROG} {__version__}{deps}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except UserError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # Connection lost half-way (kombu OperationalError, redis errors, OSError): one line,
        # with any password scrubbed, instead of a traceback.
        from kombu.exceptions import KombuError
        from redis import RedisError

        if not isinstance(exc, KombuError | RedisError | OSError):
            raise
        from .connection import scrub

        url = get_settings().broker_url
        print(f"{PROG}: error: Redis failed during the command: "
              f"{scrub(str(exc) or type(exc).__name__, url)}", file=sys.stderr)
        return EXIT_FAIL
