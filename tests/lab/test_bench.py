"""The benchmark end to end on the lab cluster: a --quick run, kit against baseline.

Figures are not asserted (they depend on the machine); the test checks that every part ran on
real hosts and produced well-formed output: numbers > 0, ratios that are kit / baseline, a real
PNG, and no baseline worker left running afterwards.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from .labkit import REPO, clean_environ, record_timing

pytestmark = pytest.mark.lab

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench(cluster, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`python -m bench ...` on the controller, configured by the deploy's env file."""
    env = clean_environ() | {"TASKFLEET_ENV_FILE": str(cluster.env_file)}
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def appendfsync(cluster) -> str:
    """redis1's running AOF fsync policy (CONFIG GET as the operators' ACL user, whose
    password the deploy generated; it goes through stdin, never argv)."""
    password = (cluster.inventory / ".secrets" / "redis_admin_password").read_text().strip()
    script = ('read -r REDISCLI_AUTH; export REDISCLI_AUTH; '
              'exec redis-cli --no-auth-warning --user admin "$@"')
    out = cluster.lab.ssh("redis1", "bash", "-c", script, "redis-cli", "CONFIG", "GET",
                          "appendfsync", check=True, input=password + "\n", timeout=30).stdout
    return out.split()[-1]


def positive(x) -> bool:
    return isinstance(x, int | float) and x > 0


def check_pair(fig: dict) -> None:
    """kit and baseline medians > 0 and the ratio is their quotient."""
    for side in ("kit", "baseline"):
        s = fig[side]
        assert positive(s["median"]), fig
        assert s["min"] <= s["median"] <= s["max"], fig
        assert all(positive(v) for v in s["values"]), fig
    assert fig["ratio"] == pytest.approx(fig["kit"]["median"] / fig["baseline"]["median"],
                                         rel=0.01)


def test_quick_bench_end_to_end(cluster, tmp_path):
    out = tmp_path / "bench"
    doc = tmp_path / "PERFORMANCE.md"
    from bench.report import DOC_BEGIN, DOC_END

    doc.write_text(f"# Performance\n\nintro\n\n{DOC_BEGIN}\nSTALE-TABLE\n{DOC_END}\n\nafter\n")
    start = time.monotonic()
    proc = bench(cluster, "--quick", "--inventory", str(cluster.inventory), "--out", str(out))
    record_timing("bench --quick (kit + baseline, all parts)", time.monotonic() - start)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ratio" in proc.stdout and "throughput" in proc.stdout  # the terminal table

    result = json.loads((out / "bench.json").read_text())
    workers = cluster.workers()
    assert sorted(result["hosts"]["workers"]) == sorted(workers)
    # Latency is measured on the client host, not the controller.
    assert result["hosts"]["latency_from"].startswith("client")
    assert positive(result["hardware"]["nproc"])
    for key in ("celery", "kombu", "redis_py", "redis_server"):
        assert re.match(r"^\d+\.\d+", result["versions"][key]), result["versions"]

    figures = result["figures"]
    for key in ("throughput", "fire", "efficiency"):
        check_pair(figures[key])
        assert figures[key]["hosts"] == len(workers)
        assert isinstance(figures[key]["met"], bool)
    conc = figures["efficiency"]["concurrency"]
    assert conc["baseline"] == len(workers)  # one solo worker per host
    assert conc["kit"] >= len(workers)
    lat = figures["latency"]
    for side in ("kit", "baseline"):
        assert 0 < lat[side]["p50_ms"] <= lat[side]["p99_ms"], lat
    assert lat["ratio_p50"] == pytest.approx(lat["kit"]["p50_ms"] / lat["baseline"]["p50_ms"],
                                             rel=0.01)

    # One Redis host: no replica to wait for, and the part says so instead of a figure.
    assert "no replicas" in figures["replicas"]["skipped"], figures["replicas"]

    # The AOF policy's cost: the kit under both, and Redis set back to the role's default.
    fsync = figures["fsync"]
    assert fsync["policy_before"] == "always", fsync
    for key in ("throughput", "fire"):
        for policy in ("always", "everysec"):
            assert all(positive(v) for v in fsync[key][policy]["values"]), fsync
        assert fsync[key]["ratio"] == pytest.approx(
            fsync[key]["always"]["median"] / fsync[key]["everysec"]["median"], rel=0.01)
    assert fsync["postponed_fsyncs"]["always"] == 0, fsync
    assert appendfsync(cluster) == "always"
    assert "appendfsync always vs everysec" in proc.stdout

    scaling = result["scaling"]
    assert [row["hosts"] for row in scaling] == list(range(1, len(workers) + 1))
    for row in scaling:
        check_pair(row["throughput"])
        check_pair(row["efficiency"])
    assert "source" in result["deploy"]
    # Where the time goes: CPU per task of the client and of the whole machine, per run.
    for side in ("kit", "baseline"):
        for run in result["phases"][f"throughput.{side}"]:
            assert run["client_cpu_ms_per_task"] > 0 and run["machine_cpu_ms_per_task"] > 0, run
            assert 0 < run["machine_busy"] <= 1, run

    png = (out / "scaling.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    text = doc.read_text()
    assert "STALE-TABLE" not in text and "| figure | kit | baseline | ratio | target |" in text
    assert text.endswith(f"{DOC_END}\n\nafter\n")

    # The baseline workers are gone: no transient unit, no baseline node answering.
    for host in workers:
        state = cluster.on(host, "systemctl", "is-active", "taskfleet-bench-baseline")
        assert state.stdout.strip() != "active", host
    ping = cluster.app("ping", timeout=60)
    assert "baseline@" not in ping.stdout
    # Nor is the bench's code, on the workers or the client: it reaches the hosts for a run
    # (playbooks/bench.yml), never with the app.
    for host in [*workers, result["hosts"]["latency_from"]]:
        left = cluster.on(host, "ls", "/opt/taskfleet/bench", "/opt/taskfleet/app/bench.py",
                          "/opt/taskfleet/app/baseline.py")
        assert left.returncode != 0 and not left.stdout.strip(), (host, left.stdout)


def test_bench_rejects_bad_options_fast(cluster):
    """User errors: one line, non-zero exit, no traceback, no work started."""
    for args, words in ((["--only", "speed"], "unknown part"),
                        (["--repeat", "0"], "--repeat"),
                        (["--inventory", "/nonexistent"], "inventory")):
        start = time.monotonic()
        proc = bench(cluster, *args, timeout=60)
        assert proc.returncode != 0
        assert words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert time.monotonic() - start < 15
