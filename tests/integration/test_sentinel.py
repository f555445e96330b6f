"""Redis behind Sentinel on loopback: a primary, a replica and three Sentinels (real
redis-server processes, the Sentinels as `redis-server --sentinel`), with the ACL users the
redis role deploys: the app's, replication's (masteruser) and Sentinel's (auth-user). The
`ha_tls` tier is the same with TLS only, as the redis role deploys it with taskfleet_redis_tls:
Redis and the Sentinels listen TLS-only (port 0), replicate and talk to each other over TLS
(tls-replication), with certificates made by the tls_ca role's own openssl commands; the nodes
verify them with TASKFLEET_REDIS_TLS_CA.

A worker and the command line reach Redis only through the Sentinels; the worker's heartbeats
run through kombu's Sentinel channel; when the primary is SIGKILLed the Sentinels promote the
replica and the same worker, never restarted, runs the next task from it. The lab suite
(tests/lab/test_ha.py) does the same at production settings on real hosts; here Sentinel's
down-after is 1 s, only to keep the test short.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import pytest
import redis
import yaml

from app.config import tls_options

from .itkit import (
    BIN,
    REDIS_SERVER,
    ROOT,
    USER,
    free_port,
    node_env,
    run,
    run_cli,
    start_workers,
    stop_workers,
    wait_for,
)

pytestmark = pytest.mark.integration
MASTER = "taskfleet"
SENTINEL_ACL = ("allchannels +multi +slaveof +replicaof +ping +exec +subscribe +config|rewrite "
                "+role +publish +info +client|setname +client|kill +script|kill")


TLS_CA_TASKS = ROOT / "deploy" / "roles" / "tls_ca" / "tasks" / "main.yml"
CERT_NAME = "redis-loopback"  # every server of the tier runs on 127.0.0.1: one certificate


def make_certificates(directory: Path, san: str = "IP:127.0.0.1,DNS:loopback") -> Path:
    """The private CA and a server certificate, made by the very openssl commands of the tls_ca
    role (its task's loop, rendered with the role's variables; files already there are kept,
    as the role's creates: does). Returns the directory: ca.crt, redis-loopback.crt/.key."""
    directory.mkdir(exist_ok=True)
    tasks = yaml.safe_load(TLS_CA_TASKS.read_text())
    task = next(t for t in tasks if t["name"] == "Create the certificates with openssl")
    names = {"tls_ca_days": 3650, "tls_ca_server_days": 825, "__tls_ca_name": CERT_NAME,
             "inventory_hostname": "loopback", "__tls_ca_san": san}
    # Command arguments, not HTML: nothing to escape (as in Ansible's own templating).
    env = jinja2.Environment(undefined=jinja2.StrictUndefined,
                             autoescape=jinja2.select_autoescape(default_for_string=False))
    for item in task["loop"]:
        if (directory / env.from_string(item["creates"]).render(names)).exists():
            continue
        argv = [env.from_string(str(arg)).render(names) for arg in item["argv"]]
        subprocess.run(argv, cwd=directory, check=True, capture_output=True)
    return directory


@dataclass
class HA:
    tmp: Path
    tls: Path | None = None  # the certificates' directory: TLS only, everywhere
    password: str = field(default_factory=lambda: secrets.token_hex(12))
    admin_pw: str = field(default_factory=lambda: secrets.token_hex(12))
    repl_pw: str = field(default_factory=lambda: secrets.token_hex(12))
    sentinel_user_pw: str = field(default_factory=lambda: secrets.token_hex(12))
    sentinel_pw: str = field(default_factory=lambda: secrets.token_hex(12))
    redis_ports: list[int] = field(default_factory=list)
    sentinel_ports: list[int] = field(default_factory=list)
    procs: dict[int, subprocess.Popen] = field(default_factory=dict)

    def tls_config(self) -> list[str]:
        """redis.conf lines of the TLS listener (the redis role's, port 0 beside it)."""
        if self.tls is None:
            return []
        return ["port 0", f"tls-cert-file {self.tls / CERT_NAME}.crt",
                f"tls-key-file {self.tls / CERT_NAME}.key", f"tls-ca-cert-file {self.tls}/ca.crt",
                "tls-auth-clients no", "tls-replication yes"]

    def listen(self, port: int) -> list[str]:
        if self.tls is None:
            return ["--port", str(port)]
        return ["--tls-port", str(port)] + [
            arg for line in self.tls_config() for arg in (f"--{line.split()[0]}",
                                                           line.split(maxsplit=1)[1])]

    @property
    def ca(self) -> str | None:
        return str(self.tls / "ca.crt") if self.tls else None

    def start_redis(self, port: int, replica_of: int | None) -> None:
        d = self.tmp / f"redis-{port}"
        d.mkdir(exist_ok=True)
        argv = [REDIS_SERVER, "--bind", "127.0.0.1", *self.listen(port), "--dir", str(d),
                "--save", "", "--appendonly", "yes", "--appendfsync", "always",
                "--logfile", str(d / "redis.log"),
                "--masteruser", "replication", "--masterauth", self.repl_pw,
                "--min-replicas-to-write", "0",
                "--user", "default", "off", "resetkeys", "resetchannels", "~*", "&*", "+@all",
                "--user", USER, "on", f">{self.password}", "~*", "&*", "+@all", "-@dangerous",
                "--user", "admin", "on", f">{self.admin_pw}", "~*", "&*", "+@all",
                "--user", "replication", "on", f">{self.repl_pw}", "+psync", "+replconf",
                "+ping",
                "--user", "sentinel", "on", f">{self.sentinel_user_pw}",
                *SENTINEL_ACL.split()]
        if replica_of:
            argv += ["--replicaof", "127.0.0.1", str(replica_of)]
        self.procs[port] = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.STDOUT)
        wait_for(lambda: self._answers(port), 15, f"redis-server on {port}")

    def start_sentinel(self, port: int, primary: int) -> bool:
        """False if it exited at once (its port, free a moment ago, was taken meanwhile)."""
        conf = self.tmp / f"sentinel-{port}.conf"
        listener = "\n".join([f"tls-port {port}", *self.tls_config()]) if self.tls \
            else f"port {port}"
        conf.write_text(
            f"{listener}\nbind 127.0.0.1\ndir {self.tmp}\n"
            f"logfile {self.tmp}/sentinel-{port}.log\n"
            f"requirepass {self.sentinel_pw}\nsentinel sentinel-pass {self.sentinel_pw}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {primary} 2\n"
            f"sentinel auth-user {MASTER} sentinel\n"
            f"sentinel auth-pass {MASTER} {self.sentinel_user_pw}\n"
            f"sentinel down-after-milliseconds {MASTER} 1000\n"
            f"sentinel failover-timeout {MASTER} 10000\n")
        proc = subprocess.Popen([REDIS_SERVER, str(conf), "--sentinel"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.procs[port] = proc

        def up() -> bool:
            try:
                return bool(self.sentinel(port).ping())
            except redis.RedisError:
                return proc.poll() is not None  # exited: the port was taken meanwhile
        wait_for(up, 15, f"redis-sentinel on {port}")
        if proc.poll() is not None:
            log = self.tmp / f"sentinel-{port}.log"
            print(f"redis-sentinel on {port} exited with {proc.returncode}: "
                  f"{log.read_text()[-500:] if log.exists() else ''}")
            del self.procs[port]
            return False
        return True

    def seen(self) -> str:
        """What each Sentinel knows of the primary, for a failure message."""
        lines = []
        for port in self.sentinel_ports:
            try:
                info = self.sentinel(port).sentinel_master(MASTER)
                lines.append(f"{port}: other sentinels {info.get('num-other-sentinels')}, "
                             f"replicas {info.get('num-slaves')}, flags {info.get('flags')}")
            except redis.RedisError as exc:
                lines.append(f"{port}: {exc}")
        return "; ".join(lines)

    def _answers(self, port: int) -> bool:
        try:
            return bool(self.admin(port).ping())
        except redis.RedisError:
            return False

    def admin(self, port: int) -> redis.Redis:
        return redis.Redis("127.0.0.1", port, username="admin", password=self.admin_pw,
                           socket_timeout=2, **tls_options(self.ca))

    def sentinel(self, port: int) -> redis.Redis:
        return redis.Redis("127.0.0.1", port, password=self.sentinel_pw, socket_timeout=2,
                           decode_responses=True, **tls_options(self.ca))

    def primary(self) -> int | None:
        for port in self.sentinel_ports:
            try:
                found = self.sentinel(port).sentinel_get_master_addr_by_name(MASTER)
            except redis.RedisError:
                continue
            if found:
                return int(found[1])
        return None

    def env(self) -> dict[str, str]:
        urls = ";".join(f"sentinel://{USER}:{self.password}@127.0.0.1:{p}/0"
                        for p in self.sentinel_ports)
        env = node_env(self.tmp, urls, TASKFLEET_SENTINEL_MASTER=MASTER,
                       TASKFLEET_SENTINEL_PASSWORD=self.sentinel_pw)
        if self.ca:
            env["TASKFLEET_REDIS_TLS_CA"] = self.ca
        return env

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextlib.contextmanager
def tier(tmp_path: Path, tls: bool) -> Iterator[HA]:
    if not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    cluster = HA(tmp_path, tls=make_certificates(tmp_path / "tls") if tls else None)
    try:
        primary, replica = free_port(), free_port()
        cluster.redis_ports = [primary, replica]
        cluster.start_redis(primary, None)
        cluster.start_redis(replica, primary)
        for _ in range(6):
            port = free_port()
            if cluster.start_sentinel(port, primary):
                cluster.sentinel_ports.append(port)
            if len(cluster.sentinel_ports) == 3:
                break
        else:
            pytest.fail("redis-sentinel did not start (its log is printed above)")

        def ready() -> bool:
            try:
                info = cluster.sentinel(cluster.sentinel_ports[0]).sentinel_master(MASTER)
            except redis.RedisError:
                return False
            return int(info.get("num-other-sentinels", 0)) == 2 \
                and int(info.get("num-slaves", 0)) == 1
        try:
            wait_for(ready, 60, "three Sentinels that know each other and the replica", 0.3)
        except pytest.fail.Exception as exc:
            pytest.fail(f"{exc}: {cluster.seen()}")
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def ha(no_celery_env, tmp_path) -> Iterator[HA]:
    with tier(tmp_path, tls=False) as cluster:
        yield cluster


@pytest.fixture
def ha_tls(no_celery_env, tmp_path) -> Iterator[HA]:
    with tier(tmp_path, tls=True) as cluster:
        yield cluster


@pytest.mark.parametrize("kind", ["ha", "ha_tls"])
def test_worker_and_cli_follow_a_failover(kind: str, request: pytest.FixtureRequest,
                                          tmp_path: Path):
    """Through the Sentinels (with TLS: every connection TLS, to Sentinels and Redis alike):
    status, submit --wait, inspect stats and ping; the worker follows a failover."""
    ha: HA = request.getfixturevalue(kind)
    env = ha.env()
    status = run_cli(env, "status", "--timeout", "1")
    assert "QUEUE" in status.stdout, status.stdout + status.stderr  # Redis reached; no worker
    workers = start_workers(env, ["ha"], tmp_path)
    try:
        done = run_cli(env, "submit", "add", "1", "2", "--wait", "--timeout", "20")
        assert (done.returncode, done.stdout.strip()) == (0, "3"), done.stderr
        # status lists workers from their inspect stats replies, which carry the transport
        # options: encodable, and without the Sentinels' password.
        status = run_cli(env, "status", "--timeout", "2")
        assert workers[0].name in status.stdout, status.stdout + status.stderr
        stats = run([str(BIN / "celery"), "-A", "app", "inspect", "stats", "--timeout", "2"],
                    env, 30)
        assert '"sentinel_kwargs"' in stats.stdout and '"***"' in stats.stdout, stats.stdout
        assert ha.sentinel_pw not in stats.stdout, "the Sentinels' password in a stats reply"

        # Heartbeats through the Sentinel channel: a running task has an owner, stamped.
        primary = ha.primary()
        assert primary == ha.redis_ports[0]
        run_cli(env, "submit", "sleep", "4")
        owners = wait_for(lambda: ha.admin(primary).hgetall("unacked_owner"), 10,
                          "the running task's owner entry (heartbeats on)")
        assert len(owners) == 1, owners

        ha.procs[primary].send_signal(signal.SIGKILL)
        ha.procs[primary].wait(5)
        killed = time.monotonic()
        promoted = wait_for(lambda: (p := ha.primary()) != primary and p, 30,
                            "the Sentinels to promote the replica")
        assert promoted == ha.redis_ports[1]
        done = run_cli(env, "submit", "add", "2", "3", "--wait", "--timeout", "30", timeout=60)
        assert (done.returncode, done.stdout.strip()) == (0, "5"), done.stdout + done.stderr
        assert time.monotonic() - killed < 60
        assert workers[0].alive(), "the worker exited instead of following the failover"
        ping = run_cli(env, "ping", "--node", workers[0].name, "--timeout", "10")
        assert ping.returncode == 0, ping.stdout + ping.stderr
    finally:
        stop_workers(workers)


def test_cli_names_the_sentinel_problem(ha: HA):
    env = ha.env() | {"TASKFLEET_SENTINEL_PASSWORD": "wrong"}
    bad = run_cli(env, "status")
    assert bad.returncode != 0
    line = bad.stderr.strip()
    assert len(line.splitlines()) == 1, line
    assert "no Sentinel named the primary 'taskfleet'" in line, line
    assert "wrong" not in line and ha.password not in line, line
    env = ha.env() | {"TASKFLEET_SENTINEL_MASTER": "other"}
    assert "no Sentinel named the primary 'other'" in run_cli(env, "status").stderr


def test_publish_waits_for_the_replica(ha: HA):
    """TASKFLEET_PUBLISH_REPLICAS=1: each publish -- one task, each pipeline of a batch -- ends
    with WAIT on its own connection and returns once the replica holds it. With the replica
    stopped, submit fails within the timeout with one line per command, and the tasks it
    reports as unconfirmed are on the primary (they would run)."""
    env = ha.env() | {"TASKFLEET_PUBLISH_REPLICAS": "1",
                      "TASKFLEET_PUBLISH_REPLICAS_TIMEOUT": "0.5"}
    primary, replica = ha.redis_ports
    queue = "celery"

    def waits() -> int:
        stats = ha.admin(primary).info("commandstats").get("cmdstat_wait", {})
        return int(stats.get("calls", 0))

    # Linked is not yet in sync: the first sync starts after repl-diskless-sync-delay (5 s).
    wait_for(lambda: ha.admin(replica).info("replication")["master_link_status"] == "up", 30,
             "the replica's first sync")
    before = waits()
    one = run_cli(env, "submit", "add", "10", "20")
    assert one.returncode == 0, one.stderr
    many = run_cli(env, "submit", "add", "1", "2", "--count", "250", "--batch", "100")
    assert many.returncode == 0, many.stderr
    assert waits() - before == 1 + 3, "one WAIT per publish: 1 task, then 3 pipelines"
    # WAIT returned once the replica had applied every write before it: nothing to wait for.
    assert ha.admin(replica).llen(queue) == 251

    ha.procs[replica].send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        bad = run_cli(env, "submit", "add", "10", "20")
        assert bad.returncode != 0
        line = bad.stderr.strip()
        assert len(line.splitlines()) == 1, line
        assert "0 of the 1 replica(s) that TASKFLEET_PUBLISH_REPLICAS asks for" in line, line
        assert ha.password not in line, line
        burst = run_cli(env, "submit", "add", "1", "2", "--count", "150", "--batch", "100")
        took = time.monotonic() - started
        assert burst.returncode != 0
        assert "150 submissions failed (150 unconfirmed: Redis took them but too few replicas " \
            "confirmed in time, they may still run; 0 not sent)" in burst.stderr, burst.stderr
        assert "TASKFLEET_PUBLISH_REPLICAS_TIMEOUT" in burst.stderr, burst.stderr
        # Two CLI starts, three WAITs of 0.5 s: not minutes of retries.
        assert took < 20, took
        assert ha.admin(primary).llen(queue) == 251 + 1 + 150, "Redis took them all"
    finally:
        ha.procs[replica].send_signal(signal.SIGCONT)
    wait_for(lambda: ha.admin(replica).llen(queue) == 402, 20, "the replica to catch up")


def test_bench_measures_what_waiting_for_a_replica_costs(ha: HA, tmp_path: Path):
    """`python -m bench --only replicas`: publishes with and without WAIT in turns, through the
    Sentinels; the WAITs it reports are the ones the primary counted, and it leaves no key."""
    env = ha.env() | {"TASKFLEET_PUBLISH_REPLICAS": "1"}
    primary, replica = ha.redis_ports
    wait_for(lambda: ha.admin(replica).info("replication")["master_link_status"] == "up", 30,
             "the replica's first sync")
    # The bench finds the kit's workers first (their stats replies are sent without WAIT).
    workers = start_workers(env, ["bench"], tmp_path)
    try:
        keys = set(ha.admin(primary).keys())
        before = ha.admin(primary).info("commandstats").get("cmdstat_wait", {}).get("calls", 0)
        proc = subprocess.run(
            [sys.executable, "-m", "bench", "--only", "replicas", "--no-baseline", "--quick",
             "--repeat", "2", "--json"], cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=120, check=False)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH-JSON "))
        rep = json.loads(line.removeprefix("BENCH-JSON "))["figures"]["replicas"]
        after = ha.admin(primary).info("commandstats")["cmdstat_wait"]["calls"]
        # --quick: bursts of 200 (2 pipelines of 100) and 20 single publishes, twice.
        assert after - before == 2 * (2 + 20), rep
        assert rep["replicas"] == 1 and len(rep["burst"]["wait"]["values"]) == 2, rep
        for side in ("wait", "no_wait"):
            assert rep["burst"][side]["median"] > 0, rep
            assert 0 < rep["single_ms"][side]["p50"] <= rep["single_ms"][side]["p99"], rep
        assert rep["burst"]["ratio"] == pytest.approx(
            rep["burst"]["wait"]["median"] / rep["burst"]["no_wait"]["median"], rel=0.01)
        assert set(ha.admin(primary).keys()) <= keys | {b"_kombu.binding.celery.pidbox"}, \
            set(ha.admin(primary).keys()) - keys
    finally:
        stop_workers(workers)


@pytest.mark.parametrize("kind", ["ha", "ha_tls"])
def test_exporter_reports_queues_from_the_primary_only(kind: str, request: pytest.FixtureRequest):
    """With sentinel:// URLs the exporter reads the Redis it is given (its host's): the
    primary's reports queues and taskfleet_redis_primary 1, a replica's only that it is up and
    not the primary -- one series per queue across the tier, whichever host is primary. With
    TLS it reads its Redis and asks the Sentinels over TLS."""
    ha: HA = request.getfixturevalue(kind)
    env = ha.env()
    primary, replica = ha.redis_ports
    sent = run_cli(env, "submit", "add", "1", "2", "--count", "3")
    assert sent.returncode == 0, sent.stderr
    wait_for(lambda: ha.admin(replica).llen("celery") == 3, 10, "the replica to hold the queue")
    on_primary = run_cli(env, "exporter", "--once", "--redis", f"127.0.0.1:{primary}")
    assert on_primary.returncode == 0, on_primary.stderr
    assert "taskfleet_redis_primary 1.0" in on_primary.stdout, on_primary.stdout
    assert 'taskfleet_queue_messages{queue="celery"} 3.0' in on_primary.stdout, on_primary.stdout
    on_replica = run_cli(env, "exporter", "--once", "--redis", f"127.0.0.1:{replica}")
    assert on_replica.returncode == 0, on_replica.stderr
    assert "taskfleet_redis_up 1.0" in on_replica.stdout, on_replica.stdout
    assert "taskfleet_redis_primary 0.0" in on_replica.stdout, on_replica.stdout
    assert "taskfleet_queue_messages" not in on_replica.stdout, on_replica.stdout
    missing = run_cli(env, "exporter", "--once")
    assert missing.returncode != 0 and "--redis ADDRESS:PORT" in missing.stderr, missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1, missing.stderr


def test_tls_tier_refuses_plain_and_unverified_connections(ha_tls: HA, tmp_path: Path):
    """TLS only, verified: the replica replicates over TLS; Redis and Sentinel ports answer no
    plain client; a node without TASKFLEET_REDIS_TLS_CA, or with another CA, gets one line
    that names the variable, not a traceback."""
    primary, replica = ha_tls.redis_ports
    # Linked is not yet in sync: the first sync starts after repl-diskless-sync-delay (5 s).
    info = wait_for(lambda: (i := ha_tls.admin(replica).info("replication"))
                    ["master_link_status"] == "up" and i, 30, "the replica's first sync (TLS)")
    assert info["master_port"] == primary, info
    for port in (primary, ha_tls.sentinel_ports[0]):
        plain = redis.Redis("127.0.0.1", port, password=ha_tls.sentinel_pw, socket_timeout=2,
                            socket_connect_timeout=2)
        with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
            plain.ping()

    env = ha_tls.env()
    del env["TASKFLEET_REDIS_TLS_CA"]
    bad = run_cli(env, "status", "--timeout", "1")
    assert bad.returncode != 0
    line = bad.stderr.strip()
    assert len(line.splitlines()) == 1, line
    assert "no Sentinel named the primary 'taskfleet'" in line, line
    assert "TASKFLEET_REDIS_TLS_CA (unset: TLS off)" in line, line

    other = make_certificates(tmp_path / "other")  # a CA that signed none of the tier's
    env = ha_tls.env() | {"TASKFLEET_REDIS_TLS_CA": str(other / "ca.crt")}
    bad = run_cli(env, "status", "--timeout", "1")
    assert bad.returncode != 0
    line = bad.stderr.strip()
    assert len(line.splitlines()) == 1, line
    assert "certificate verify failed" in line, line
    assert ha_tls.password not in line and ha_tls.sentinel_pw not in line, line
