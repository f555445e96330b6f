"""`python -m bench.probe`: the latency part, run on a client host so it crosses the network.

playbooks/bench.yml copies it (with bench/__init__, machine, measure and baseline) next to the
deployed app; the controller's bench runs it over Ansible with the host's env file and reads
the one line `BENCH-JSON {"latency": {...}}` it prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import uuid

from . import guarded

JSON_MARK = "BENCH-JSON "  # prefix of the one JSON line a --json run or the probe prints
KIT_HOSTS = 3  # the controller's default --hosts: latency uses the first of them


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.probe",
                                description="Latency, kit and baseline, from this host.")
    p.add_argument("--samples", type=int, required=True, help="round trips per repeat")
    p.add_argument("--repeat", type=int, required=True, help="runs of the measurement")
    p.add_argument("--no-baseline", action="store_true", help="measure the kit only")
    args = p.parse_args(argv)

    def probe() -> int:
        from .measure import FULL, Bench, find_baseline, find_kit, make_sides

        kit, base = make_sides(with_baseline=not args.no_baseline)
        find_kit(kit, KIT_HOSTS)
        if base:
            find_baseline(base, kit, want=1)
        sizes = dataclasses.replace(FULL, samples=args.samples, repeat=args.repeat)
        lat = Bench(kit, base, sizes, uuid.uuid4().hex[:8]).latency_part()
        print(JSON_MARK + json.dumps({"latency": lat}, separators=(",", ":")), flush=True)
        return 0

    return guarded(probe)


if __name__ == "__main__":
    sys.exit(main())
