"""What a run costs and what it ran on: CPU of this machine, Redis and this client; hardware
and versions, recorded beside the figures."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import resource
from importlib import metadata
from pathlib import Path
from typing import Any


def machine_cpu() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of this whole machine since boot, from /proc/stat.

    On the lab every host (Redis, workers, client) runs on this machine, so the busy share
    during a run says whether the run was CPU-bound, and busy seconds / tasks is what one
    task costs the whole cluster. On real machines it covers only this one.
    """
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(x) for x in fields]
    hz = os.sysconf("SC_CLK_TCK")
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    total = sum(ticks[:8])  # guest time is already counted in user
    return (total - idle) / hz, total / hz


def redis_cpu(app: Any) -> float | None:
    """CPU seconds the Redis server has used (INFO cpu), or None where INFO is not allowed.

    The kit's app user may not run INFO (ACL -@dangerous); the bench then goes without it.
    """
    from redis.exceptions import NoPermissionError, ResponseError

    try:
        with app.connection_for_write() as conn:
            info = conn.default_channel.client.info("cpu")
    except (NoPermissionError, ResponseError):
        return None
    return float(info.get("used_cpu_user", 0)) + float(info.get("used_cpu_sys", 0))


class CpuMeter:
    """CPU used during a run: this machine (busy share, per task), Redis, this client."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.redis0 = redis_cpu(app)
        self.client0 = resource.getrusage(resource.RUSAGE_SELF)
        self.machine0 = machine_cpu()

    def per_task(self, n: int) -> dict[str, float]:
        machine1, client1 = machine_cpu(), resource.getrusage(resource.RUSAGE_SELF)
        redis1 = redis_cpu(self.app)
        client = (client1.ru_utime + client1.ru_stime) - (self.client0.ru_utime
                                                          + self.client0.ru_stime)
        out = {"client_cpu_ms_per_task": round(client / n * 1000, 3)}
        if redis1 is not None and self.redis0 is not None:
            out["redis_cpu_ms_per_task"] = round((redis1 - self.redis0) / n * 1000, 3)
        if self.machine0 and machine1:
            busy, total = machine1[0] - self.machine0[0], machine1[1] - self.machine0[1]
            out["machine_cpu_ms_per_task"] = round(busy / n * 1000, 3)
            out["machine_busy"] = round(busy / total, 3) if total > 0 else 0.0
        return out


def versions(app: Any) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist, key in (("celery", "celery"), ("kombu", "kombu"), ("redis", "redis_py")):
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = "?"
    try:
        # HELLO is allowed by the kit's ACL (INFO is in @dangerous, which it denies).
        hello = app.backend.client.execute_command("HELLO")
        fields = dict(zip(hello[::2], hello[1::2], strict=False)) if isinstance(hello, list) \
            else hello
        ver = fields.get(b"version") or fields.get("version")
        out["redis_server"] = ver.decode() if isinstance(ver, bytes) else str(ver)
    except Exception:  # version is informative only
        out["redis_server"] = "?"
    return out


def hardware() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError):
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        model = m.group(1).strip() if m else model
    return {"nproc": os.cpu_count(), "cpu_model": model, "machine": platform.machine()}
