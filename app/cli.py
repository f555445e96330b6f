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
from typing import TYPE_CHECKING, Any, NoReturn

from . import __version__
from .config import QUEUE_RE, ConfigError, Settings, get_settings

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

    # Workers wait for the result backend as long as it takes; a person at a prompt does not.
    tasks.app.conf.result_backend_max_retries = 10
    # The result listener tries to reconnect once, then raises: `submit` waits for Redis
    # itself, bounded and saying so (submit.RideOut), not in Celery's 20 silent 1 s retries.
    options = tasks.app.conf.result_backend_transport_options or {}
    tasks.app.conf.result_backend_transport_options = {
        **options, "retry_policy": {"max_retries": 0}}
    return tasks.app


def check_redis(s: Settings, backend: bool = False) -> None:
    """Fail fast, with the cause, if the broker (and result backend) cannot be used."""
    from .connection import BrokerError, check

    try:
        check(s.broker_url, "CELERY_BROKER_URL", s.connect_timeout, **s.sentinel_args)
        if backend and s.result_backend != s.broker_url:
            check(s.result_backend, "CELERY_RESULT_BACKEND", s.connect_timeout,
                  **s.sentinel_args)
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


# ---------------------------------------------------------------- entry point

def subcommands() -> tuple[Any, ...]:
    """Every subcommand, in the order --help lists them."""
    from .exporter import Exporter
    from .status import Ping, ShowConfig, Status  # they use this module's helpers
    from .submit import Submit

    return (Submit, Status, Ping, ShowConfig, Exporter)


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
        # Connection lost half-way (kombu OperationalError, redis errors, OSError, Celery's
        # RuntimeError from a result listener that could not reconnect): one line, with any
        # password scrubbed, instead of a traceback.
        from kombu.exceptions import KombuError
        from redis import RedisError

        from .connection import lost_connection, one_line

        shown = exc if isinstance(exc, KombuError | RedisError | OSError) \
            else lost_connection(exc)
        if shown is None:
            raise
        text = one_line(shown, get_settings().broker_url)
        print(f"{PROG}: error: Redis failed during the command: {text}", file=sys.stderr)
        return EXIT_FAIL
