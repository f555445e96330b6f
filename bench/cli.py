"""`python -m bench`: the options, and one run from start to finish (see bench/__init__.py)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import uuid
from pathlib import Path
from typing import Any, NoReturn

from . import die, guarded, log
from .machine import hardware, versions
from .measure import (
    FULL,
    QUICK,
    Bench,
    Sizes,
    find_baseline,
    find_kit,
    make_sides,
    ratio,
    replicas_part,
)
from .probe import JSON_MARK
from .remote import BenchHosts, admin_redis, deploy_figures, latency_client, remote_latency
from .report import print_table, write_outputs

PARTS = ("throughput", "fire", "efficiency", "latency", "scaling", "replicas", "fsync",
         "deploy")
# Targets from the project: ratios on the same hosts in one run, absolute for the others.
TARGETS = {"throughput": 2.0, "fire": 3.0, "efficiency": 0.97, "latency_p50_ms": 5.0}


class Parser(argparse.ArgumentParser):
    """argparse with the package's one-line error (usage stays in --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"bench: error: {message} (see: {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m bench",
        description="Benchmark the deployed cluster: the kit against plain Celery defaults "
                    "(solo pool, one publish per task) on the same worker hosts, in one run.")
    p.add_argument("--inventory", type=Path,
                   help="Ansible inventory: baseline workers are started on its workers over "
                        "SSH and latency is measured from its first client host (without it: "
                        "local baseline workers, latency from here)")
    p.add_argument("--out", type=Path, help="write bench.json and scaling.png here, and the "
                   "table into ../PERFORMANCE.md if it has the bench markers")
    p.add_argument("--repeat", type=int, help="runs of each measurement (default 3)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, one repeat: checks the whole path in well under a minute")
    p.add_argument("--only", help=f"comma-separated parts: {','.join(PARTS)} (default: all)")
    p.add_argument("--hosts", type=int, default=3, help="most worker hosts to use (default 3)")
    p.add_argument("--tasks", type=int, help="tasks per throughput run (default 500)")
    p.add_argument("--fire", type=int, help="tasks per fire-and-forget run (default 1000)")
    p.add_argument("--samples", type=int, help="round trips per latency run (default 200)")
    p.add_argument("--no-baseline", action="store_true", help="measure the kit only")
    p.add_argument("--baseline-running", action="store_true",
                   help="use baseline workers that are already running (started with "
                        "playbooks/bench.yml -e bench_state=started)")
    p.add_argument("--deploy", action="store_true",
                   help="time a no-change deploy.yml re-run now (needs --inventory)")
    p.add_argument("--profile", type=Path, metavar="FILE",
                   help="also write a cProfile of this client (top functions by cumulative "
                        "time) to FILE")
    p.add_argument("--json", action="store_true",
                   help=f"print the result as one line '{JSON_MARK}{{...}}' instead of a table")
    return p


def sizes_from(args: argparse.Namespace) -> Sizes:
    base = QUICK if args.quick else FULL
    picks = {"tasks": args.tasks, "fire": args.fire, "samples": args.samples,
             "repeat": args.repeat}
    for name, value in picks.items():
        if value is not None and value < 1:
            die(f"--{name} must be >= 1 (got {value})")
    return Sizes(tasks=args.tasks or base.tasks, fire=args.fire or base.fire,
                 rounds=base.rounds, samples=args.samples or base.samples,
                 repeat=args.repeat or base.repeat)


def parts_from(args: argparse.Namespace) -> set[str]:
    if not args.only:
        return set(PARTS)
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    bad = parts - set(PARTS)
    if bad:
        die(f"unknown part(s) in --only: {', '.join(sorted(bad))}",
            f"choose from {', '.join(PARTS)}")
    return parts


def bench(args: argparse.Namespace) -> dict[str, Any]:
    sizes, parts = sizes_from(args), parts_from(args)
    if args.inventory and not Path(args.inventory).is_dir():
        die(f"inventory {args.inventory} not found",
            "deploy first: make bench, or ansible-playbook -i INVENTORY deploy.yml")
    if args.hosts < 1:
        die("--hosts must be >= 1")
    kit, base = make_sides(with_baseline=not args.no_baseline)
    find_kit(kit, args.hosts)
    k_max = len(kit.nodes)
    run_id = uuid.uuid4().hex[:8]
    result: dict[str, Any] = {
        "schema": 1,
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full", "repeat": sizes.repeat,
        "sizes": sizes.__dict__,
        "hosts": {"workers": [n.host for n in kit.nodes], "latency_from": platform.node()},
        "hardware": hardware() | {"kit_concurrency": {n.host: n.concurrency for n in kit.nodes}},
        "versions": versions(kit.app), "figures": {}, "scaling": [], "phases": {},
    }
    # Latency from the inventory's first client host when it has one (bench.probe there).
    client = None
    if "latency" in parts and args.inventory is not None and not args.json:
        client = latency_client(args.inventory)
    # Parts that compare with the baseline workers (fsync and replicas measure the kit alone).
    need_workers = bool(parts - {"deploy", "replicas", "fsync"}
                        - ({"latency"} if client else set()))
    start_workers = base is not None and (need_workers or client is not None)
    hosts = None
    if (start_workers or client) and not args.baseline_running:
        hosts = BenchHosts(args.inventory, [n.host for n in kit.nodes] if start_workers else [],
                           client)
    try:
        if hosts:
            hosts.start()
        if base:
            find_baseline(base, kit, want=k_max if hosts and start_workers else 1)
        b = Bench(kit, base, sizes, run_id)
        counts = list(range(1, k_max + 1)) if "scaling" in parts else [k_max]
        for k in counts:
            at_max = k == k_max
            wanted_parts = {p for p in ("throughput", "efficiency")
                            if p in parts or "scaling" in parts}
            if at_max and "fire" in parts:
                wanted_parts.add("fire")
            if not at_max and "scaling" not in parts:
                continue
            if not wanted_parts:
                continue
            row = b.per_hosts(k, wanted_parts)
            if "scaling" in parts:
                result["scaling"].append({p: row[p] for p in row if p != "fire"})
            if at_max:
                for p in ("throughput", "fire", "efficiency"):
                    if p in row and p in parts:
                        result["figures"][p] = row[p] | {"hosts": k}
        if "latency" in parts:
            if client and args.inventory:
                lat = remote_latency(args.inventory, client, sizes, with_baseline=bool(base))
                result["hosts"]["latency_from"] = client
            else:
                lat = b.latency_part()
            lat["from"] = result["hosts"]["latency_from"]
            result["figures"]["latency"] = lat
        if "replicas" in parts:
            result["figures"]["replicas"] = replicas_part(sizes, run_id)
        if "fsync" in parts:
            admin, why_not = admin_redis(args.inventory)
            result["figures"]["fsync"] = b.fsync_part(admin) if admin else {"skipped": why_not}
        result["phases"] = b.phases
    finally:
        if hosts:
            hosts.stop()
    if "deploy" in parts:
        result["deploy"] = deploy_figures(args.deploy, args.inventory)
    judge(result)
    return result


def judge(result: dict[str, Any]) -> None:
    """Mark each target met or missed (figures are never asserted by the tests, only shown)."""
    f = result["figures"]
    for key in ("throughput", "fire"):
        if key in f and f[key]["ratio"] is not None:
            f[key]["met"] = f[key]["ratio"] >= TARGETS[key]
    if "efficiency" in f:
        f["efficiency"]["met"] = f["efficiency"]["kit"]["median"] >= TARGETS["efficiency"]
        if f["efficiency"]["baseline"]:
            f["efficiency"]["ratio"] = ratio(f["efficiency"]["kit"], f["efficiency"]["baseline"])
    if "latency" in f:
        lat = f["latency"]
        lat["met"] = lat["kit"]["p50_ms"] <= TARGETS["latency_p50_ms"]
        if lat.get("baseline"):
            lat["ratio_p50"] = round(lat["kit"]["p50_ms"] / lat["baseline"]["p50_ms"], 3)
            lat["ratio_p99"] = round(lat["kit"]["p99_ms"] / lat["baseline"]["p99_ms"], 3)


def profiled(args: argparse.Namespace) -> dict[str, Any]:
    """The run under cProfile; the top functions by cumulative time go to --profile."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    result: dict[str, Any] = prof.runcall(bench, args)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(40)
    Path(args.profile).write_text(buf.getvalue())
    log(f"wrote the client profile to {args.profile}")
    return result


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def command() -> int:
        result = profiled(args) if args.profile else bench(args)
        if args.json:
            print(JSON_MARK + json.dumps(result, separators=(",", ":")), flush=True)
        else:
            print_table(result)
        if args.out:
            write_outputs(result, Path(args.out))
        return 0

    return guarded(command)


if __name__ == "__main__":
    sys.exit(main())
