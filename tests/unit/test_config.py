"""app.config: every variable's default, accepted values and exact error line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.config import (
    ConfigError,
    celery_settings,
    default_soft_limit,
    load_env_file,
    mask_url,
    read_settings,
    restore_interval,
)

ROOT = Path(__file__).resolve().parents[2]
URL = "redis://taskfleet:s3cret@10.0.0.5:6379/0"
URL_HELP = "redis://[user:password@]host[:port][/db] or rediss://... (Redis only)"


def settings(**env: str):
    return read_settings({"CELERY_BROKER_URL": URL, **env})


def error(**env: str) -> str:
    with pytest.raises(ConfigError) as info:
        read_settings({"CELERY_BROKER_URL": URL, **env})
    return str(info.value)


def test_defaults():
    s = read_settings({"CELERY_BROKER_URL": URL})
    assert s.broker_url == URL
    assert s.result_backend == URL  # default: the broker
    assert s.worker_pool == "prefork"
    assert s.worker_concurrency == (os.cpu_count() or 1)
    assert s.worker_prefetch_multiplier == 1
    assert s.worker_max_tasks_per_child == 0
    assert s.task_time_limit == 300
    assert s.task_soft_time_limit == 270
    assert s.visibility_timeout == 3600
    assert s.result_expires == 86400
    assert s.default_queue == "celery"
    assert s.connect_timeout == 5.0
    assert s.log_level == "INFO"
    assert s.log_tasks is False


def test_empty_values_mean_default():
    s = settings(TASKFLEET_WORKER_POOL="", TASKFLEET_TASK_TIME_LIMIT="  ",
                 CELERY_RESULT_BACKEND="")
    assert (s.worker_pool, s.task_time_limit, s.result_backend) == ("prefork", 300, URL)


def test_good_values():
    s = settings(
        CELERY_RESULT_BACKEND="rediss://r.example:6380/1",
        TASKFLEET_WORKER_POOL="Threads", TASKFLEET_WORKER_CONCURRENCY="8",
        TASKFLEET_WORKER_PREFETCH_MULTIPLIER="4", TASKFLEET_WORKER_MAX_TASKS_PER_CHILD="100",
        TASKFLEET_TASK_TIME_LIMIT="60", TASKFLEET_TASK_SOFT_TIME_LIMIT="50",
        TASKFLEET_VISIBILITY_TIMEOUT="61", TASKFLEET_RESULT_EXPIRES="600",
        TASKFLEET_DEFAULT_QUEUE="jobs.high@eu:1-x_y", TASKFLEET_CONNECT_TIMEOUT="0.5",
        TASKFLEET_LOG_LEVEL="debug", TASKFLEET_LOG_TASKS="Yes",
    )
    assert s.result_backend == "rediss://r.example:6380/1"
    assert s.worker_pool == "threads"
    assert (s.worker_concurrency, s.worker_prefetch_multiplier) == (8, 4)
    assert s.worker_max_tasks_per_child == 100
    assert (s.task_time_limit, s.task_soft_time_limit, s.visibility_timeout) == (60, 50, 61)
    assert s.result_expires == 600
    assert s.default_queue == "jobs.high@eu:1-x_y"
    assert s.connect_timeout == 0.5
    assert s.log_level == "DEBUG"
    assert s.log_tasks is True


@pytest.mark.parametrize("url", [
    "redis://localhost", "redis://h:6379/15", "rediss://u:p%40ss@h:6380/0", "redis://:pw@h/2",
])
def test_broker_urls_accepted(url):
    assert read_settings({"CELERY_BROKER_URL": url}).broker_url == url


def test_broker_missing():
    with pytest.raises(ConfigError) as info:
        read_settings({})
    assert str(info.value) == f"CELERY_BROKER_URL is not set: set it to {URL_HELP}"


@pytest.mark.parametrize(("url", "message"), [
    ("amqp://u:topsecret@h//",
     f"invalid CELERY_BROKER_URL='amqp://u:***@h//': expected {URL_HELP}"),
    ("http://h:1", f"invalid CELERY_BROKER_URL='http://h:1': expected {URL_HELP}"),
    ("redis://:topsecret@", f"invalid CELERY_BROKER_URL='redis://:***@': no host in the URL; "
                            f"expected {URL_HELP}"),
    ("redis://u:topsecret@h:70000/0", f"invalid CELERY_BROKER_URL='redis://u:***@h:70000/0': "
                                      f"expected {URL_HELP} (port must be 1-65535)"),
    ("redis://u:topsecret@h:6379/db1", "invalid CELERY_BROKER_URL='redis://u:***@h:6379/db1': "
                                       "the database after the last / must be a number; "
                                       f"{URL_HELP}"),
    ("localhost:6379", f"invalid CELERY_BROKER_URL='localhost:6379': expected {URL_HELP}"),
])
def test_broker_bad(url, message):
    with pytest.raises(ConfigError) as info:
        read_settings({"CELERY_BROKER_URL": url})
    assert str(info.value) == message
    assert "topsecret" not in str(info.value)


def test_result_backend_bad_is_masked():
    assert error(CELERY_RESULT_BACKEND="mongodb://admin:hunter2@db/x") == (
        f"invalid CELERY_RESULT_BACKEND='mongodb://admin:***@db/x': expected {URL_HELP}")


@pytest.mark.parametrize(("name", "value", "allowed"), [
    ("TASKFLEET_WORKER_POOL", "gevent", "allowed values are prefork, threads, solo"),
    ("TASKFLEET_WORKER_CONCURRENCY", "0", "expected a whole number >= 1"),
    ("TASKFLEET_WORKER_CONCURRENCY", "two", "expected a whole number >= 1"),
    ("TASKFLEET_WORKER_CONCURRENCY", "1.5", "expected a whole number >= 1"),
    ("TASKFLEET_WORKER_PREFETCH_MULTIPLIER", "0", "expected a whole number >= 1"),
    ("TASKFLEET_WORKER_MAX_TASKS_PER_CHILD", "-1",
     "expected a whole number >= 0 (0 = unlimited)"),
    ("TASKFLEET_TASK_TIME_LIMIT", "0", "expected a whole number of seconds > 0"),
    ("TASKFLEET_TASK_TIME_LIMIT", "5m", "expected a whole number of seconds > 0"),
    ("TASKFLEET_TASK_SOFT_TIME_LIMIT", "0",
     "expected a whole number of seconds > 0 and < TASKFLEET_TASK_TIME_LIMIT (300)"),
    ("TASKFLEET_TASK_SOFT_TIME_LIMIT", "300",
     "expected a whole number of seconds > 0 and < TASKFLEET_TASK_TIME_LIMIT (300)"),
    ("TASKFLEET_VISIBILITY_TIMEOUT", "-5", "expected a whole number of seconds > 0"),
    ("TASKFLEET_HEARTBEAT_INTERVAL", "-1",
     "expected a number of seconds >= 0 (0 = off: kombu's visibility timeout alone decides)"),
    ("TASKFLEET_HEARTBEAT_INTERVAL", "often",
     "expected a number of seconds >= 0 (0 = off: kombu's visibility timeout alone decides)"),
    ("TASKFLEET_DEAD_AFTER", "0", "expected a number of seconds > 0"),
    ("TASKFLEET_DEAD_AFTER", "2",
     "must be at least 3 x TASKFLEET_HEARTBEAT_INTERVAL (3 s), so a worker that misses one "
     "heartbeat is not taken for dead"),
    ("TASKFLEET_RESULT_EXPIRES", "0", "expected a whole number of seconds > 0"),
    ("TASKFLEET_DEFAULT_QUEUE", "my queue", "queue names use only letters, digits and _ . @ : -"),
    ("TASKFLEET_DEFAULT_QUEUE", "a/b", "queue names use only letters, digits and _ . @ : -"),
    ("TASKFLEET_CONNECT_TIMEOUT", "0", "expected a number of seconds > 0"),
    ("TASKFLEET_CONNECT_TIMEOUT", "fast", "expected a number of seconds > 0"),
    ("TASKFLEET_CONNECT_TIMEOUT", "nan", "expected a number of seconds > 0"),
    ("TASKFLEET_CONNECT_TIMEOUT", "inf", "expected a number of seconds > 0"),
    ("TASKFLEET_LOG_LEVEL", "TRACE", "allowed values are DEBUG, INFO, WARNING, ERROR"),
    ("TASKFLEET_LOG_TASKS", "true", "allowed values are yes, no"),
])
def test_bad_values(name, value, allowed):
    assert error(**{name: value}) == f"invalid {name}={value!r}: {allowed}"


def test_without_heartbeats_the_visibility_timeout_must_exceed_the_hard_limit():
    assert error(TASKFLEET_HEARTBEAT_INTERVAL="0", TASKFLEET_VISIBILITY_TIMEOUT="300") == (
        "invalid TASKFLEET_VISIBILITY_TIMEOUT='300': must be greater than "
        "TASKFLEET_TASK_TIME_LIMIT (300) when TASKFLEET_HEARTBEAT_INTERVAL=0, or Redis hands a "
        "task that is still running to a second worker")
    assert "TASKFLEET_TASK_TIME_LIMIT (900)" in error(
        TASKFLEET_HEARTBEAT_INTERVAL="0", TASKFLEET_TASK_TIME_LIMIT="900",
        TASKFLEET_VISIBILITY_TIMEOUT="600")
    assert settings(TASKFLEET_HEARTBEAT_INTERVAL="0", TASKFLEET_TASK_TIME_LIMIT="8",
                    TASKFLEET_VISIBILITY_TIMEOUT="10").visibility_timeout == 10


def test_with_heartbeats_a_task_may_outlast_the_visibility_timeout():
    s = settings(TASKFLEET_TASK_TIME_LIMIT="900", TASKFLEET_VISIBILITY_TIMEOUT="60")
    assert (s.task_time_limit, s.visibility_timeout) == (900, 60)


def test_heartbeat_defaults_and_dead_after_follows_the_interval():
    s = settings()
    assert (s.heartbeat_interval, s.dead_after) == (1.0, 6.0)
    assert settings(TASKFLEET_HEARTBEAT_INTERVAL="2.5").dead_after == 15.0
    assert settings(TASKFLEET_HEARTBEAT_INTERVAL="0").heartbeat_interval == 0
    assert settings(TASKFLEET_HEARTBEAT_INTERVAL="0", TASKFLEET_DEAD_AFTER="1").dead_after == 1


@pytest.mark.parametrize(("hard", "soft"), [(3600, 3570), (300, 270), (100, 90), (10, 9),
                                            (1, 0.9), (7, 6.3)])
def test_default_soft_limit(hard, soft):
    assert default_soft_limit(hard) == soft
    s = settings(TASKFLEET_TASK_TIME_LIMIT=str(hard), TASKFLEET_VISIBILITY_TIMEOUT="7200")
    assert s.task_soft_time_limit == soft


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://u:pw@h:1/0", "redis://u:***@h:1/0"),
    ("redis://:pw@h", "redis://:***@h"),
    ("redis://h:1/0", "redis://h:1/0"),
    ("rediss://user@h", "rediss://user@h"),
])
def test_mask_url(url, shown):
    assert mask_url(url) == shown


def test_restore_interval_is_the_heartbeat_or_scales_with_visibility_timeout():
    def interval(vt: int, beat: str = "0") -> float:
        return restore_interval(settings(TASKFLEET_HEARTBEAT_INTERVAL=beat,
                                         TASKFLEET_TASK_TIME_LIMIT="1",
                                         TASKFLEET_VISIBILITY_TIMEOUT=str(vt)))

    assert [interval(v) for v in (2, 10, 25, 300, 3600, 86400)] == [1, 1, 2, 30, 100, 100]
    assert interval(3600, beat="1") == 1
    assert interval(3600, beat="2.5") == 2.5


def test_celery_settings_reliability():
    conf = celery_settings(settings(TASKFLEET_VISIBILITY_TIMEOUT="7200",
                                    TASKFLEET_CONNECT_TIMEOUT="2"))
    assert conf["accept_content"] == ["json"] == conf["result_accept_content"]
    assert conf["task_serializer"] == conf["result_serializer"] == "json"
    assert conf["task_acks_late"] is conf["task_reject_on_worker_lost"] is True
    assert conf["worker_cancel_long_running_tasks_on_connection_loss"] is True
    assert conf["broker_connection_retry_on_startup"] is True
    assert conf["broker_transport_options"]["visibility_timeout"] == 7200
    assert conf["result_backend_transport_options"]["visibility_timeout"] == 7200
    assert conf["broker_transport_options"]["unacked_restore_throttle"] == 1
    assert conf["broker_transport_options"]["unacked_restore_interval"] == 1
    assert conf["broker_transport_options"]["unacked_mutex_expire"] == 5
    assert conf["broker_transport_options"]["taskfleet_heartbeat_interval"] == 1
    assert conf["broker_transport_options"]["taskfleet_dead_after"] == 6
    assert conf["broker_transport_options"]["taskfleet_heartbeat_thread"] is False
    assert "result_backend_max_retries" not in conf  # Celery's default: no limit
    assert conf["broker_transport_options"]["socket_connect_timeout"] == 2
    assert conf["broker_transport_options"]["socket_timeout"] == 5
    assert conf["redis_socket_connect_timeout"] == 2
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["result_extended"] is True
    assert conf["broker_transport"] == "app.transport:Transport"
    assert conf["task_track_started"] is False
    assert conf["worker_send_task_events"] is conf["task_send_sent_event"] is False
    assert conf["worker_max_tasks_per_child"] is None  # 0 means unlimited
    assert (conf["task_time_limit"], conf["task_soft_time_limit"]) == (300, 270)
    assert conf["task_default_queue"] == "celery"
    assert conf["result_expires"] == 86400


def test_celery_settings_are_known_to_celery():
    """Every key is a real Celery 5.7 setting (catches renamed or misspelled names)."""
    from celery.app.defaults import NAMESPACES, flatten

    known = {name for name, _ in flatten(NAMESPACES)}
    # Read by celery/backends/redis.py through conf.get() without a declared default.
    known.add("redis_backend_health_check_interval")
    assert set(celery_settings(settings())) - known == set()


# ------------------------------------------------------------------ env file

@pytest.fixture
def clean_env(monkeypatch):
    for name in ("TASKFLEET_ENV_FILE", "CELERY_BROKER_URL", "TASKFLEET_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)  # undo also removes what the file sets
    return monkeypatch


def test_env_file_explicit(tmp_path, clean_env):
    f = tmp_path / "tf.env"
    f.write_text(f"CELERY_BROKER_URL={URL}\nTASKFLEET_LOG_LEVEL=ERROR\n")
    clean_env.setenv("TASKFLEET_ENV_FILE", str(f))
    clean_env.setenv("TASKFLEET_LOG_LEVEL", "DEBUG")  # the real environment wins
    assert load_env_file() == f
    s = read_settings(os.environ)
    assert (s.broker_url, s.log_level) == (URL, "DEBUG")


def test_env_file_explicit_missing(tmp_path, clean_env):
    clean_env.setenv("TASKFLEET_ENV_FILE", str(tmp_path / "nope.env"))
    with pytest.raises(ConfigError) as info:
        load_env_file()
    assert str(info.value) == (
        f"TASKFLEET_ENV_FILE={str(tmp_path / 'nope.env')!r} does not exist or is not a file: "
        "point it at the env file or unset it (./.env is used when present)")


def test_env_file_dot_env_in_cwd(tmp_path, clean_env):
    (tmp_path / ".env").write_text(f"CELERY_BROKER_URL={URL}\n")
    clean_env.chdir(tmp_path)
    assert load_env_file() == Path(".env")
    assert os.environ["CELERY_BROKER_URL"] == URL


def test_no_env_file(tmp_path, clean_env):
    clean_env.chdir(tmp_path)
    assert load_env_file() is None


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CELERY_", "TASKFLEET_"))}
    return {**env, **extra}


def test_import_with_bad_config_exits_2_with_one_line(tmp_path):
    """`celery -A app worker` imports app.celery: a bad value must not become a traceback."""
    env = subprocess_env(CELERY_BROKER_URL="redis://u:topsecret@h/0",
                         TASKFLEET_WORKER_POOL="eventlet")
    proc = subprocess.run([sys.executable, "-c", "import app.celery"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == ("taskfleet: configuration error: invalid TASKFLEET_WORKER_POOL="
                           "'eventlet': allowed values are prefork, threads, solo\n")


def test_celery_worker_with_bad_config_exits_2_with_one_line(tmp_path):
    env = subprocess_env(CELERY_BROKER_URL="redis://u:topsecret@h/0",
                         TASKFLEET_DEAD_AFTER="1")
    celery = Path(sys.executable).parent / "celery"
    proc = subprocess.run([str(celery), "-A", "app", "worker"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith(
        "taskfleet: configuration error: invalid TASKFLEET_DEAD_AFTER='1'")
    assert proc.stderr.count("\n") == 1 and "topsecret" not in proc.stderr


def test_transport_options_are_known_to_kombu_or_our_transport():
    from kombu.transport.redis import Channel

    from app.transport import OPTIONS

    opts = celery_settings(settings())["broker_transport_options"]
    assert set(opts) - set(Channel.from_transport_options) == set(OPTIONS)


def test_log_level_becomes_the_worker_default(tmp_path):
    """`celery worker` without -l reads CELERY_WORKER_LOGLEVEL, which app.celery defaults."""
    env = subprocess_env(CELERY_BROKER_URL="redis://h/0", TASKFLEET_LOG_LEVEL="warning")
    code = "import os, app.celery; print(os.environ['CELERY_WORKER_LOGLEVEL'])"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (0, "WARNING\n"), proc.stderr


def test_env_example_documents_every_variable_and_is_valid():
    """.env.example names every variable app.config reads, and its values pass validation."""
    import re

    from dotenv import dotenv_values

    import app.config

    text = (ROOT / ".env.example").read_text()
    source = Path(app.config.__file__).read_text()
    variables = set(re.findall(r'"((?:TASKFLEET|CELERY)_[A-Z_]+)"', source))
    variables.add("TASKFLEET_ENV_FILE")
    assert len(variables) == 25
    for name in sorted(variables):
        assert re.search(rf"^#? ?{name}=", text, re.M), f"{name} missing from .env.example"
    values = {k: v or "" for k, v in dotenv_values(ROOT / ".env.example").items()}
    s = read_settings(values)
    assert (s.task_time_limit, s.visibility_timeout, s.worker_pool) == (300, 3600, "prefork")


def test_metrics_port_needs_the_multiprocess_directory():
    assert settings().metrics_port == 0  # off by default
    s = settings(TASKFLEET_METRICS_PORT="9809", TASKFLEET_METRICS_ADDRESS="10.0.0.7",
                 PROMETHEUS_MULTIPROC_DIR="/run/taskfleet-worker")
    assert (s.metrics_port, s.metrics_address) == (9809, "10.0.0.7")
    assert error(TASKFLEET_METRICS_PORT="9809") == (
        "TASKFLEET_METRICS_PORT=9809 needs PROMETHEUS_MULTIPROC_DIR: set it to an empty "
        "directory the worker may write (the unit's RuntimeDirectory)")
    assert error(TASKFLEET_METRICS_PORT="70000") == (
        "invalid TASKFLEET_METRICS_PORT='70000': expected a whole number from 1 to 65535 (0 = off)")
    assert error(TASKFLEET_METRICS_PORT="-1") == (
        "invalid TASKFLEET_METRICS_PORT='-1': expected a whole number from 1 to 65535 (0 = off)")


# --------------------------------------------------------------------------- Sentinel (HA tier)

SENTINELS = ("sentinel://taskfleet:s3cret@10.0.0.5:26379/0;"
             "sentinel://taskfleet:s3cret@10.0.0.6:26379/0;sentinel://taskfleet:s3cret@10.0.0.7/0")
SENTINEL_ENV = {"CELERY_BROKER_URL": SENTINELS, "TASKFLEET_SENTINEL_MASTER": "taskfleet",
                "TASKFLEET_SENTINEL_PASSWORD": "sentinel-pw"}


def sentinel_error(**env: str) -> str:
    with pytest.raises(ConfigError) as info:
        read_settings({**SENTINEL_ENV, **env})
    return str(info.value)


def test_sentinel_urls_and_options():
    s = read_settings(SENTINEL_ENV)
    assert s.broker_url == s.result_backend == SENTINELS
    assert (s.sentinel_master, s.sentinel_password) == ("taskfleet", "sentinel-pw")
    conf = celery_settings(s)
    assert conf["broker_transport"] == "app.transport:SentinelTransport"
    expected = {"master_name": "taskfleet",
                "sentinel_kwargs": {"password": "sentinel-pw", "socket_connect_timeout": 1.0,
                                    "socket_timeout": 1.0}}
    for options in (conf["broker_transport_options"], conf["result_backend_transport_options"]):
        # One try per Sentinel: a cut-off one must not be retried (redis-py's default is 10).
        kwargs = dict(options["sentinel_kwargs"])
        assert kwargs.pop("retry").get_retries() == 0
        assert expected.items() <= {**options, "sentinel_kwargs": kwargs}.items()
    # The heartbeat options are kept: the Sentinel channel has the same QoS.
    assert conf["broker_transport_options"]["taskfleet_heartbeat_interval"] == 1.0
    assert conf["broker_channel_error_retry"] is True
    assert "broker_channel_error_retry" not in celery_settings(settings())
    assert settings().sentinel_args == {}
    assert s.sentinel_args == {"master": "taskfleet", "sentinel_password": "sentinel-pw",
                               "tls_ca": None}
    # Plain TCP unless TASKFLEET_REDIS_TLS_CA says otherwise.
    assert "broker_use_ssl" not in conf and "redis_backend_use_ssl" not in conf
    assert "ssl" not in dict(conf["broker_transport_options"]["sentinel_kwargs"])


def test_sentinel_options_encode_without_the_password():
    """A worker's transport options travel in `inspect stats` replies (kombu's JSON)."""
    from kombu.utils.json import dumps, loads

    options = celery_settings(read_settings(SENTINEL_ENV))["broker_transport_options"]
    shown = loads(dumps(options))["sentinel_kwargs"]
    assert shown["password"] == "***" and shown["socket_timeout"] == 1.0, shown
    assert "sentinel-pw" not in dumps(options) + repr(options)
    assert dict(options["sentinel_kwargs"])["password"] == "sentinel-pw"  # what redis-py gets


def test_sentinel_password_is_optional_and_masked():
    s = read_settings({**SENTINEL_ENV, "TASKFLEET_SENTINEL_PASSWORD": ""})
    assert s.sentinel_password is None
    assert "password" not in celery_settings(s)["broker_transport_options"]["sentinel_kwargs"]
    assert mask_url(SENTINELS).count("taskfleet:***@") == 3
    assert "s3cret" not in mask_url(SENTINELS)


@pytest.mark.parametrize(("env", "expected"), [
    ({"TASKFLEET_SENTINEL_MASTER": ""},
     "TASKFLEET_SENTINEL_MASTER is not set: with sentinel:// URLs, name the master the "
     "Sentinels monitor (`sentinel monitor <name> ...`)"),
    ({"TASKFLEET_SENTINEL_MASTER": "my master"},
     "invalid TASKFLEET_SENTINEL_MASTER='my master': a Sentinel master name uses only letters, "
     "digits and _ . @ : -"),
    ({"CELERY_BROKER_URL": "sentinel://"},
     "invalid CELERY_BROKER_URL='sentinel://': a Sentinel URL without a host; expected "
     "sentinel://[user:password@]host[:port][/db];sentinel://... (one per Sentinel, the Redis "
     "user's password)"),
    ({"CELERY_BROKER_URL": ";"},
     "invalid CELERY_BROKER_URL=';': no Sentinel in the list; expected "
     "sentinel://[user:password@]host[:port][/db];sentinel://... (one per Sentinel, the Redis "
     "user's password)"),
    ({"CELERY_BROKER_URL": "sentinel://:pw@a:26379;redis://b:6379"},
     "invalid CELERY_BROKER_URL='sentinel://:***@a:26379;redis://b:6379': every URL of a "
     "Sentinel list is sentinel://; sentinel://[user:password@]host[:port][/db];sentinel://... "
     "(one per Sentinel, the Redis user's password)"),
    ({"CELERY_BROKER_URL": "sentinel://a:26379/0;sentinel://b:26379/1"},
     "invalid CELERY_BROKER_URL='sentinel://a:26379/0;sentinel://b:26379/1': the Sentinel URLs "
     "name different databases: use one"),
    ({"CELERY_BROKER_URL": "sentinel://a:99999"},
     "invalid CELERY_BROKER_URL='sentinel://a:99999': expected sentinel://[user:password@]"
     "host[:port][/db];sentinel://... (one per Sentinel, the Redis user's password) (port must "
     "be 1-65535)"),
    ({"CELERY_RESULT_BACKEND": URL},
     "CELERY_BROKER_URL and CELERY_RESULT_BACKEND mix sentinel:// and redis:// URLs: use "
     "Sentinel URLs for both, or for neither"),
    ({"TASKFLEET_PUBLISH_REPLICAS": "-1"},
     "invalid TASKFLEET_PUBLISH_REPLICAS='-1': expected a whole number >= 0 (0 = do not wait)"),
    ({"TASKFLEET_PUBLISH_REPLICAS_TIMEOUT": "0"},
     "invalid TASKFLEET_PUBLISH_REPLICAS_TIMEOUT='0': expected a number of seconds > 0"),
])
def test_sentinel_errors(env, expected):
    assert sentinel_error(**env) == expected


def test_sentinel_tls_reaches_the_sentinels_the_broker_and_the_backend(tmp_path):
    """TASKFLEET_REDIS_TLS_CA: kombu's Sentinel channel and Celery's Sentinel backend connect to
    the primary with TLS (broker_use_ssl, redis_backend_use_ssl), the Sentinel managers to the
    Sentinels (sentinel_kwargs); every certificate verified with that CA."""
    import ssl

    from kombu.utils.json import dumps

    ca = tmp_path / "ca.crt"
    ca.write_text("PEM")
    s = read_settings({**SENTINEL_ENV, "TASKFLEET_REDIS_TLS_CA": str(ca)})
    assert s.tls_ca == str(ca) and s.sentinel_args["tls_ca"] == str(ca)
    conf = celery_settings(s)
    verified = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(ca)}
    assert conf["broker_use_ssl"] == conf["redis_backend_use_ssl"] == verified
    for key in ("broker_transport_options", "result_backend_transport_options"):
        login = conf[key]["sentinel_kwargs"]
        assert {k: login[k] for k in ("ssl", "ssl_cert_reqs", "ssl_ca_certs")} == \
            {"ssl": True, "ssl_cert_reqs": "required", "ssl_ca_certs": str(ca)}
        assert login["password"] == "sentinel-pw" and "sentinel-pw" not in dumps(login)


def test_sentinel_tls_errors(tmp_path):
    assert sentinel_error(TASKFLEET_REDIS_TLS_CA=str(tmp_path / "nope.crt")) == (
        f"invalid TASKFLEET_REDIS_TLS_CA='{tmp_path / 'nope.crt'}': no such file: point it at "
        "the CA certificate (PEM) that signed the certificates of Redis and the Sentinels")
    ca = tmp_path / "ca.crt"
    ca.write_text("PEM")
    with pytest.raises(ConfigError) as info:
        read_settings({"CELERY_BROKER_URL": URL, "TASKFLEET_REDIS_TLS_CA": str(ca)})
    assert str(info.value) == (
        "TASKFLEET_REDIS_TLS_CA is for the HA tier's sentinel:// URLs: with one Redis host, use "
        "rediss://...?ssl_cert_reqs=required&ssl_ca_certs=<CA file> and unset "
        "TASKFLEET_REDIS_TLS_CA")


def test_publish_replicas_reach_the_broker_transport_only():
    s = read_settings({**SENTINEL_ENV, "TASKFLEET_PUBLISH_REPLICAS": "1",
                       "TASKFLEET_PUBLISH_REPLICAS_TIMEOUT": "0.25"})
    conf = celery_settings(s)
    assert {k: v for k, v in conf["broker_transport_options"].items() if "publish" in k} == \
        {"taskfleet_publish_replicas": 1, "taskfleet_publish_replicas_timeout": 0.25}
    assert not [k for k in conf["result_backend_transport_options"] if "publish" in k]
    assert read_settings(SENTINEL_ENV).publish_replicas == 0


def test_publish_replicas_need_the_sentinel_urls():
    assert error(TASKFLEET_PUBLISH_REPLICAS="1") == (
        "TASKFLEET_PUBLISH_REPLICAS=1 needs the HA tier's sentinel:// URLs (a single Redis host "
        "has no replica to wait for): set it to 0, or list replicas in [redis_replicas] and "
        "deploy")
    assert settings(TASKFLEET_PUBLISH_REPLICAS="0").publish_replicas == 0
