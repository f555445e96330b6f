"""Publishing many tasks at once, the way `submit --count` and the benchmark do it.

Celery's `.delay()` costs a Redis round trip per task, plus a queue declaration check on every
publish. A burst needs neither: one producer (one connection) for the whole burst, the queue
declared once, and the messages buffered in a Redis pipeline (kombu's `Producer.batch()`)
that is sent every `size` tasks -- one round trip per batch.

What Redis took is known per batch: `flush()` returns once Redis answered (and, with
TASKFLEET_PUBLISH_REPLICAS, once that many replicas hold the batch: app/transport.py).
If a flush fails (Redis went away), kombu cannot tell how much of that pipeline ran, so its
tasks are "uncertain": they may or may not be queued. Every Taskfleet task is safe to run
twice, so resubmitting them is the fix; the CLI says how many there are.

After a failure the producer is given back to the pool and the next send takes it again: kombu
leaves the producer on a closed channel when its own retries give up, and taking it from the
pool revives it on the connection, which reconnects (once Redis is back).
"""

from __future__ import annotations

import contextlib
from types import TracebackType
from typing import Any

# Messages per pipeline: big enough that the round trip per message vanishes, small enough
# that workers start on the first tasks while the rest are still being sent.
BATCH = 100


class PublishFailed(Exception):
    """A batch could not be published. `uncertain` tasks may or may not be queued."""

    def __init__(self, uncertain: int, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.uncertain = uncertain
        self.cause = cause


class BatchPublisher:
    """Context manager: `send()` tasks, pipelined `size` at a time on one connection.

    size=1 publishes each task at once (one round trip each, the producer still held).
    Leaving the block flushes the last batch (and may raise PublishFailed for it). `accepted`
    lists the results of every task Redis took, in order.
    """

    def __init__(self, app: Any, size: int = BATCH) -> None:
        if size < 1:
            raise ValueError("batch size must be >= 1")
        self.app, self.size = app, size
        self.accepted: list[Any] = []
        self.unconfirmed: list[Any] = []  # results of tasks in a failed batch (release them)
        self._pending: list[Any] = []
        self._declared: set[str] = set()
        self._stack = contextlib.ExitStack()
        self._batch: contextlib.AbstractContextManager[Any] | None = None
        self._producer: Any = None

    def __enter__(self) -> BatchPublisher:
        self._acquire()
        return self

    def _acquire(self) -> None:
        """Take a producer from the pool (again, after a failure gave the last one back)."""
        self._stack.close()
        self._stack = contextlib.ExitStack()
        self._declared.clear()
        self._producer = self._stack.enter_context(self.app.producer_or_acquire())

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if exc_type is None:
                self.flush()
            elif exc is not None:  # an error in the caller's loop: send nothing more
                self._abort(exc)
        finally:
            self._stack.close()

    def send(self, task: Any, args: Any = (), kwargs: Any = None, queue: str | None = None,
             **options: Any) -> Any:
        """Buffer one task (apply_async options allowed); flush when the batch is full.

        Raises PublishFailed when Redis refused it (size 1) or a flush failed; the publisher
        stays usable (the next send starts a new batch on a fresh pipeline, with the producer
        taken from the pool again). PublishFailed with `uncertain` 0: no producer could be had
        (Redis still away), this task was not sent.
        """
        queue = queue or self.app.conf.task_default_queue
        if self._producer is None:
            try:
                self._acquire()
            except Exception as exc:
                raise PublishFailed(0, exc) from exc
        try:
            if queue not in self._declared:
                # Celery re-checks the queue on every publish by default; once per burst does.
                self._producer.maybe_declare(self.app.amqp.queues[queue])
                self._declared.add(queue)
            if self.size > 1 and self._batch is None:
                # max_size above our own count: kombu never flushes on its own, we do, and
                # know exactly which tasks each flush covered.
                self._batch = self._producer.batch(max_size=self.size + 1)
                self._batch.__enter__()
            result = task.apply_async(args, kwargs, queue=queue, producer=self._producer,
                                      declare=[], **options)
        except Exception as exc:
            lost = len(self._pending) + 1
            self._abort(exc)
            raise PublishFailed(lost, exc) from exc
        self._pending.append(result)
        if len(self._pending) >= self.size:
            self.flush()
        return result

    def flush(self) -> None:
        """Send the buffered tasks; raise PublishFailed (with their count) if Redis failed."""
        batch, self._batch = self._batch, None
        pending, self._pending = self._pending, []
        if batch is not None:
            try:
                batch.__exit__(None, None, None)
            except Exception as exc:
                from .transport import NotReplicated

                self.unconfirmed.extend(pending)
                self._producer = None  # taken again by the next send
                # kombu's BatchPublishError says only "delivery is uncertain"; the replicas'
                # shortfall says why, and that Redis did take the batch.
                cause = exc.__cause__ if isinstance(exc.__cause__, NotReplicated) else exc
                raise PublishFailed(len(pending), cause) from exc
        self.accepted.extend(pending)

    def _abort(self, exc: BaseException) -> None:
        """Drop what is buffered (never sent) after an error."""
        batch, self._batch = self._batch, None
        self.unconfirmed.extend(self._pending)
        self._pending = []
        self._producer = None  # taken again by the next send
        if batch is not None:
            with contextlib.suppress(Exception):
                batch.__exit__(type(exc), exc, exc.__traceback__)
