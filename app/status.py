"""`status`, `ping` and `config`: the commands that look at the cluster and change nothing.

They share cli.py's helpers with `submit` (settings, the Redis preflight, one-line errors) and
call them through the module, so a test that stubs cli.check_redis stubs it here too.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from . import cli


class Status:
    """Live workers and queue depths."""

    @staticmethod
    def add_parser(subparsers: Any) -> None:
        p = subparsers.add_parser(
            "status", help="live workers and queue depths",
            description="Show every worker that answers (pool, concurrency, tasks running and "
                        "done) and the messages waiting in each queue. Exit 1 if none answers.")
        p.add_argument("--timeout", metavar="S", type=cli.positive(float), default=2.0,
                       help="seconds to wait for workers to answer (default 2)")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from .connection import queue_depths, unacked_count

        app = cli.celery_app()
        s = cli.settings()
        cli.check_redis(s)
        stats = app.control.inspect(timeout=args.timeout).stats() or {}
        nodes = sorted(stats)
        active: dict[str, list[Any]] = {}
        consumed: dict[str, list[dict[str, Any]]] = {}
        if nodes:
            # The first call waited the whole timeout to find the workers; these return as
            # soon as every known worker has answered.
            insp = app.control.inspect(destination=nodes, limit=len(nodes), timeout=args.timeout)
            active = insp.active() or {}
            consumed = insp.active_queues() or {}
        rows = [("NODE", "HOST", "POOL", "CONC", "ACTIVE", "PROCESSED")]
        for node in nodes:
            st = stats[node]
            pool = st.get("pool", {})
            impl = str(pool.get("implementation", "?")).split(":")[0].rsplit(".", 1)[-1]
            rows.append((node, node.partition("@")[2] or "?", impl,
                         str(pool.get("max-concurrency", "?")),
                         str(len(active.get(node) or [])),
                         str(sum(st.get("total", {}).values()))))
        print_table(rows)
        queues = {s.default_queue} | {q["name"] for qs in consumed.values() for q in qs}
        depths = queue_depths(s.broker_url, sorted(queues), s.connect_timeout,
                              **s.sentinel_args)
        print()
        print_table([("QUEUE", "WAITING")] + [(q, str(n)) for q, n in depths.items()])
        unacked = unacked_count(s.broker_url, s.connect_timeout, **s.sentinel_args)
        print(f"unacknowledged (running or reserved): {unacked}")
        if not nodes:
            cli.die(f"no worker answered within {args.timeout:g} s", cli.EXIT_FAIL)
        return 0


def print_table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


class Ping:
    """Every worker answers a ping (and runs a canary on its queue); fail when one does not."""

    @staticmethod
    def add_parser(subparsers: Any) -> None:
        p = subparsers.add_parser(
            "ping", help="ping every worker",
            description="Broadcast a ping, list the workers that answer, exit 1 if fewer than "
                        "--expect answered. With --canary, also run a whoami task on each "
                        "given queue and print which worker ran it.")
        p.add_argument("--expect", metavar="N", type=int, default=1,
                       help="minimum number of workers that must answer (default 1)")
        p.add_argument("--timeout", metavar="S", type=cli.positive(float), default=2.0,
                       help="seconds to wait for answers and canaries (default 2)")
        p.add_argument("--node", metavar="NAME", action="append", default=[],
                       help="ping only this worker (repeatable, e.g. worker@host1): returns as "
                            "soon as all of them answered, exit 1 naming any that did not")
        p.add_argument("--canary", metavar="QUEUE", action="append", default=[],
                       type=cli.queue_name,
                       help="send a whoami task to this queue and wait for it (repeatable, "
                            "e.g. host.host1): prints 'QUEUE: answered by NODE on HOST'")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        app = cli.celery_app()
        cli.check_redis(cli.settings(), backend=bool(args.canary))
        # Canaries first: their round trips overlap the ping's.
        whoami = app.tasks["app.tasks.whoami"]
        canaries = {queue: whoami.apply_async(queue=queue) for queue in args.canary}
        wanted = sorted(set(args.node))
        if wanted:  # only these; stop waiting once every one of them answered
            replies = app.control.ping(destination=wanted, limit=len(wanted),
                                       timeout=args.timeout) or []
        else:  # anyone may answer: wait the whole timeout
            replies = app.control.ping(timeout=args.timeout) or []
        nodes = sorted(node for reply in replies for node in reply)
        for node in nodes:
            print(f"{node}: pong")
        print(f"{len(nodes)} worker(s) answered")
        problems = []
        if wanted and (silent := sorted(set(wanted) - set(nodes))):
            problems.append(f"no answer within {args.timeout:g} s from {', '.join(silent)}: on "
                            "its host, systemctl status taskfleet-worker")
        if len(nodes) < args.expect:
            problems.append(f"only {len(nodes)} of the {args.expect} expected workers answered "
                            f"within {args.timeout:g} s")
        problems += Ping.canaries(canaries, args.timeout)
        if problems:
            cli.die("; ".join(problems), cli.EXIT_FAIL)
        return 0

    @staticmethod
    def canaries(canaries: dict[str, Any], timeout: float) -> list[str]:
        """Wait for every canary (one deadline for all); print who ran each, return failures."""
        import time

        from celery.exceptions import TimeoutError as CeleryTimeout

        from .submit import failure_text, release

        deadline, problems, unanswered = time.monotonic() + timeout, [], []
        for queue, result in canaries.items():
            try:
                value = result.get(timeout=max(0.1, deadline - time.monotonic()),
                                   propagate=False)
            except CeleryTimeout:
                unanswered.append(result)
                problems.append(f"the canary on queue {queue} did not come back within "
                                f"{timeout:g} s: is its worker consuming it?")
                continue
            if result.failed():
                problems.append(f"the canary on queue {queue} failed: "
                                + failure_text(result.id, {"result": value}))
            else:
                print(f"{queue}: answered by {value['worker']} on {value['host']}")
        release(unanswered)
        return problems


class ShowConfig:
    """Print the effective settings, passwords masked."""

    @staticmethod
    def add_parser(subparsers: Any) -> None:
        subparsers.add_parser(
            "config", help="show the effective Celery settings (passwords masked)",
            description="Validate the environment and print the Celery settings it gives.")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        s = cli.settings()
        app = cli.celery_app()
        print(f"# env file: {s.env_file or '(none)'}")
        print(app.conf.humanize(censored=True))
        return 0
