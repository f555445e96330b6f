"""app.cli: parsing, and the checks that must fail before any network traffic."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import types
from typing import ClassVar

import pytest

from app import cli, submit

ROOT = cli.__file__.rsplit("/app/", 1)[0]
KNOWN = "add, beat_tick, cpu, mark, noop, sleep, whoami"


@pytest.fixture
def run(app_env, monkeypatch, capsys):
    """Run `python -m app ARGS` in-process; any attempt to reach Redis fails the test."""

    def no_network(*_a, **_k):
        raise AssertionError("tried to contact Redis")

    monkeypatch.setattr(cli, "check_redis", no_network)

    def runner(*argv: str) -> tuple[int, str, str]:
        try:
            code = cli.main(list(argv))
        except SystemExit as exc:  # argparse errors, --help, --version
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    return runner


@pytest.mark.parametrize(("text", "value"), [
    ("10", 10), ("-3", -3), ("1.5", 1.5), ("x", "x"), ('"10"', "10"), ("[1, 2]", [1, 2]),
    ('{"a": 1}', {"a": 1}), ("true", True), ("null", None), ("NaN", "NaN"), ("", ""),
    ("hello world", "hello world"),
])
def test_parse_arg(text, value):
    assert cli.parse_arg(text) == value


def test_unknown_task(run):
    assert run("submit", "nope", "1") == (
        2, "", f"taskfleet: error: unknown task 'nope'; known tasks: {KNOWN}\n")


def test_celery_builtin_tasks_are_not_submittable(run):
    code, _, err = run("submit", "celery.backend_cleanup")
    assert code == 2 and "unknown task 'celery.backend_cleanup'" in err


@pytest.mark.parametrize(("argv", "message"), [
    (("submit", "add", "10"), "wrong arguments for add: missing a required argument: 'y'; "
                              "usage: add(x, y)"),
    (("submit", "app.tasks.add", "1", "2", "3"), "wrong arguments for add: too many positional "
                                                 "arguments; usage: add(x, y)"),
    (("submit", "noop", "1"), "wrong arguments for noop: too many positional arguments; "
                              "usage: noop()"),
    (("submit", "sleep", "--kwargs", '{"secs": 1}'),
     "wrong arguments for sleep: missing a required argument: 'seconds'; usage: sleep(seconds)"),
    (("submit", "cpu", "5", "--kwargs", '{"n": 5}'),
     "wrong arguments for cpu: multiple values for argument 'n'; usage: cpu(n)"),
    (("submit", "add", "1", "2", "--kwargs", "{bad"),
     "--kwargs is not valid JSON (Expecting property name enclosed in double quotes at "
     """character 1): pass an object, e.g. --kwargs '{"seconds": 2}'"""),
    (("submit", "add", "1", "2", "--kwargs", "[1]"),
     """--kwargs must be a JSON object, e.g. --kwargs '{"seconds": 2}'"""),
])
def test_bad_task_input_fails_before_network(run, argv, message):
    assert run(*argv) == (2, "", f"taskfleet: error: {message}\n")


@pytest.mark.parametrize("argv", [
    ("submit", "whoami"),  # bound task: `self` is not an argument
    ("submit", "add", "10", "20"),
    ("submit", "sleep", "--kwargs", '{"seconds": 0.1}'),
    ("submit", "app.tasks.cpu", "1000"),
])
def test_good_task_input_reaches_the_broker_check(run, argv):
    with pytest.raises(AssertionError, match="tried to contact Redis"):
        run(*argv)


@pytest.mark.parametrize(("argv", "message"), [
    (("submit", "add", "1", "2", "--count", "0"),
     "argument --count: expected a number > 0, got '0' (see: python -m app submit --help)"),
    (("submit", "add", "1", "2", "--timeout", "soon"),
     "argument --timeout: expected a number > 0, got 'soon' (see: python -m app submit --help)"),
    (("submit", "add", "1", "2", "--queue", "a b"),
     "argument --queue: invalid queue name 'a b': use letters, digits and _ . @ : - "
     "(see: python -m app submit --help)"),
    (("submit",), "the following arguments are required: TASK, ARGS "
                  "(see: python -m app submit --help)"),
    ((), "the following arguments are required: COMMAND (see: python -m app --help)"),
    (("frobnicate",), "argument COMMAND: invalid choice: 'frobnicate' (choose from 'submit', "
                      "'status', 'ping', 'config', 'exporter') (see: python -m app --help)"),
])
def test_usage_errors_are_one_line(run, argv, message):
    assert run(*argv) == (2, "", f"taskfleet: error: {message}\n")


def test_version(run):
    code, out, _ = run("--version")
    assert code == 0 and out.startswith("taskfleet 0.1.0 (celery 5.")


def test_config_error_is_one_line(run, monkeypatch):
    from app.config import get_settings

    monkeypatch.setenv("TASKFLEET_CONNECT_TIMEOUT", "-1")
    get_settings.cache_clear()
    try:
        result = run("ping")
    finally:
        monkeypatch.delenv("TASKFLEET_CONNECT_TIMEOUT")
        get_settings.cache_clear()
    assert result == (2, "", "taskfleet: error: configuration: invalid "
                             "TASKFLEET_CONNECT_TIMEOUT='-1': expected a number of seconds > 0\n")


def test_config_command_masks_passwords(run, monkeypatch):
    code, out, _ = run("config")
    assert code == 0
    assert "unit-secret" not in out
    assert "task_acks_late: True" in out


def test_subcommands_register_from_one_list(monkeypatch):
    extra = types.SimpleNamespace(
        add_parser=lambda sub: sub.add_parser("extra").add_argument("--n", type=int),
        run=lambda args: args.n)
    listed = cli.subcommands()
    monkeypatch.setattr(cli, "subcommands", lambda: (*listed, extra))
    assert cli.main(["extra", "--n", "7"]) == 7


def test_help_works_without_any_configuration():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "TASKFLEET_"))}
    for argv in (["--help"], ["submit", "--help"], ["status", "--help"], ["ping", "--help"]):
        proc = subprocess.run([sys.executable, "-m", "app", *argv], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("usage: python -m app")


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    bar = submit.Progress("publishing", 4)
    for i in range(1, 5):
        bar.update(i)
    assert sys.stderr.getvalue() == ""
    monkeypatch.setattr(sys, "stderr", FakeTTY())
    bar = submit.Progress("publishing", 4)
    bar.update(2, force=True)
    bar.update(4)
    assert sys.stderr.getvalue() == (
        "\rpublishing [" + "#" * 15 + "." * 15 + "] 2/4"
        "\rpublishing [" + "#" * 30 + "] 4/4\n")


class FakeBatch:
    """Producer.batch(): its exit is the flush; flushes listed in `fail_on` fail."""

    def __init__(self, producer: FakeProducer) -> None:
        self.producer = producer

    def __enter__(self) -> FakeBatch:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            return
        self.producer.flushes += 1
        if self.producer.flushes in self.producer.fail_flushes:
            raise ConnectionError("Connection reset by peer")


class FakeProducer:
    def __init__(self, fail_flushes: set[int]) -> None:
        self.flushes, self.fail_flushes, self.declared = 0, fail_flushes, 0

    def maybe_declare(self, queue) -> None:
        self.declared += 1

    def batch(self, max_size: int) -> FakeBatch:
        return FakeBatch(self)


class FlakyTask:
    """Publishing fails for the calls listed in `fail_on` (pure logic of the batch loop)."""

    name = "app.tasks.noop"

    def __init__(self, fail_on: set[int]) -> None:
        self.calls, self.fail_on, self.producers = 0, fail_on, set()

    def apply_async(self, *args, producer=None, **kwargs):
        self.producers.add(id(producer))  # the whole burst shares one producer
        self.calls += 1
        if self.calls in self.fail_on:
            raise ConnectionError("Connection reset by peer")
        return types.SimpleNamespace(backend=self)

    def remove_pending_result(self, result):  # stands in for the result backend
        return result


class FakeApp:
    conf = types.SimpleNamespace(broker_url="redis://u:pw@h/0", task_default_queue="celery")
    amqp = types.SimpleNamespace(queues={"celery": "celery-queue"})

    def __init__(self, fail_flushes: set[int] = frozenset(),
                 fail_acquires: set[int] = frozenset()) -> None:
        self.producer = FakeProducer(set(fail_flushes))
        self.acquired, self.released, self.fail_acquires = 0, 0, set(fail_acquires)

    @contextlib.contextmanager
    def producer_or_acquire(self):
        self.acquired += 1
        if self.acquired in self.fail_acquires:
            raise ConnectionError("Error 111 connecting to h:6379. Connection refused.")
        try:
            yield self.producer
        finally:
            self.released += 1


class FakeRideOut:
    """Stands in for submit.RideOut: Redis answers again at once, or (back=False) never."""

    back = True
    waits: ClassVar[list[BaseException]] = []  # every wait() of the test (the fixture resets it)

    def __init__(self, app, patience: float = 30.0) -> None:
        self.gave_up = ""

    def wait(self, exc: BaseException, deadline: float | None = None) -> bool:
        FakeRideOut.waits.append(exc)
        if not self.back:
            self.gave_up = "Redis unavailable for 30 s (Connection refused)"
        return self.back


@pytest.fixture
def ride(monkeypatch):
    """submit.RideOut replaced: these tests never reach Redis."""
    monkeypatch.setattr(FakeRideOut, "waits", [])
    monkeypatch.setattr(submit, "RideOut", FakeRideOut)
    return FakeRideOut


def batch(task: FlakyTask, count: int, size: int = 1, app: FakeApp | None = None) -> int:
    args = types.SimpleNamespace(count=count, wait=False, timeout=1.0, batch=size)
    return submit.Submit.many(app or FakeApp(), task, [], {}, "celery", args)  # type: ignore[arg-type]


def test_batch_counts_failed_submissions(capsys, ride):
    task = FlakyTask({2, 4})
    assert batch(task, 5) == 1
    assert len(task.producers) == 1
    out, err = capsys.readouterr()
    assert out.startswith("submitted 3/5 tasks to queue 'celery' in ")
    assert err == ("taskfleet: error: 2 submissions failed (2 unconfirmed: Redis failed "
                   "during their batch, they may still run; 0 not sent); first error: "
                   "Connection reset by peer\n")


def test_batch_stops_after_ten_failures_in_a_row(capsys, ride):
    task = FlakyTask(set(range(3, 1000)))
    assert batch(task, 500) == 1
    assert task.calls == 12
    out, err = capsys.readouterr()
    assert out.startswith("submitted 2/500 tasks")
    assert err.startswith("taskfleet: error: 498 submissions failed (10 unconfirmed: ")
    assert "; 488 not sent)" in err
    assert len(ride.waits) == 9  # Redis answered after each of the first nine


def test_batch_waits_for_redis_after_a_failure_and_goes_on(capsys, ride):
    app = FakeApp(fail_acquires={2})  # the producer taken again after the failure: refused
    task = FlakyTask({3})
    assert batch(task, 6, app=app) == 1
    # The failed task is not sent again (it may be queued); the one no producer was had for is.
    assert task.calls == 6 and app.acquired == 3 and app.released == 2  # all given back
    assert len(ride.waits) == 2
    out, err = capsys.readouterr()
    assert out.startswith("submitted 5/6 tasks")
    assert err.startswith("taskfleet: error: 1 submissions failed (1 unconfirmed: ")
    assert "; 0 not sent)" in err


def test_batch_stops_when_redis_stays_away(capsys, ride, monkeypatch):
    monkeypatch.setattr(FakeRideOut, "back", False)
    task = FlakyTask({3})
    assert batch(task, 500) == 1
    assert task.calls == 3 and len(ride.waits) == 1
    out, err = capsys.readouterr()
    assert out.startswith("submitted 2/500 tasks")
    assert err.startswith("taskfleet: error: 498 submissions failed (1 unconfirmed: ")
    assert "; 497 not sent)" in err


def test_batched_publish_counts_a_failed_flush_and_declares_once_per_producer(capsys, ride):
    app = FakeApp(fail_flushes={2})
    assert batch(FlakyTask(set()), 250, size=100, app=app) == 1
    assert app.producer.flushes == 3  # 100, 100 (fails), the last 50 when the block ends
    assert app.producer.declared == 2  # once per producer taken: again after the failure
    out, err = capsys.readouterr()
    assert out.startswith("submitted 150/250 tasks")
    assert err.startswith("taskfleet: error: 100 submissions failed (100 unconfirmed: ")
    assert "; 0 not sent)" in err


def test_failure_text_is_one_line_with_the_exception():
    exc = TypeError("unsupported operand type(s) for +:\n 'int' and 'str'")
    assert submit.failure_text("abc", {"status": "FAILURE", "result": exc}) == (
        "task abc: TypeError: unsupported operand type(s) for +: 'int' and 'str'")
    assert submit.failure_text("abc", {"status": "REVOKED", "result": None}) == \
        "task abc: REVOKED: None"


def lost(message: str) -> RuntimeError:
    """What Celery's Redis result listener raises when it cannot reconnect."""
    import redis

    try:
        try:
            raise redis.ConnectionError(message)
        except redis.ConnectionError as exc:
            raise RuntimeError("\nRetry limit exceeded while trying to reconnect to the "
                               "Celery result store\nbackend.\n") from exc
    except RuntimeError as exc:
        return exc


def test_lost_connection_is_found_through_the_causes():
    from kombu.exceptions import OperationalError

    from app.connection import lost_connection

    exc = lost("Error 111 connecting to h:6379. Connection refused.")
    assert str(lost_connection(exc)) == "Error 111 connecting to h:6379. Connection refused."
    refused = OperationalError("Error 111")
    assert lost_connection(refused) is refused
    assert lost_connection(RuntimeError("something else")) is None
    assert lost_connection(ValueError("bad")) is None


def test_redis_lost_during_a_command_is_one_line(run, monkeypatch):
    def fail(args):
        raise lost("Error 111 connecting to h:6379. Connection refused, password unit-secret.")

    monkeypatch.setattr(submit.Submit, "run", staticmethod(fail))
    code, out, err = run("submit", "add", "1", "2")
    assert (code, out) == (1, "")
    assert err == ("taskfleet: error: Redis failed during the command: Error 111 connecting to "
                   "h:6379. Connection refused, password ***.\n")


def test_release_skips_results_whose_connection_is_gone():
    class Backend:
        def __init__(self, error: BaseException) -> None:
            self.error = error

        def remove_pending_result(self, result):
            raise self.error

    gone = types.SimpleNamespace(backend=Backend(lost("Connection closed by server.")))
    submit.release([gone, gone])
    with pytest.raises(ValueError, match="bug"):
        submit.release([types.SimpleNamespace(backend=Backend(ValueError("bug")))])


def test_one_line_error_folds_lines_and_scrubs_every_password():
    from app.connection import one_line

    urls = ("sentinel://:s3cr%40t@10.0.0.1:26379;sentinel://:s3cr%40t@10.0.0.2:26379",
            "redis://app:other-pw@10.0.0.3:6379/0")
    exc = ConnectionError("Error 111 connecting with\n  password s3cr@t and s3cr%40t;\tother-pw")
    assert one_line(exc, *urls) == "Error 111 connecting with password *** and ***; ***"
    assert one_line(TimeoutError()) == "TimeoutError"
