"""Settings.from_env: defaults, parsing and one clear error per bad variable (pure, no servers)."""

from __future__ import annotations

import base64
import json

import pytest

from forwarder.errors import ConfigError
from forwarder.pool_bootstrap import pool_from_env
from forwarder.settings import VARS, Settings, describe, effective_config, load_settings, unknown_variables
from forwarder.urls import safe_url


def test_defaults_match_a_model_server_on_localhost_5005():
    settings = Settings.from_env({})
    assert settings.pool == "prefork"
    assert settings.model_url == "http://localhost:5005/predict"
    assert settings.healthcheck_url == "http://localhost:5005/readyz"
    assert settings.effective_prefetch_multiplier == 1
    assert Settings.from_env({"CELERY_WORKER_POOL": "gevent"}).effective_prefetch_multiplier == 2
    assert settings.max_tasks_per_child is None
    assert settings.result_format == "wrapped"
    assert settings.hooks == ()
    assert settings.memory_debug is False
    assert settings.max_response_bytes == 64 * 1024 * 1024
    assert settings.max_result_bytes == 128 * 1024 * 1024
    assert settings.warnings == ()


def test_every_variable_is_documented_in_help():
    text = describe()
    for var in VARS:
        assert var.name in text
        assert var.help


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CELERY_WORKER_POOL", "eventlet"),
        ("CELERY_WORKER_POOL", ""),
        ("CELERY_WORKER_POOL", "geventt"),
        ("CELERY_WORKER_CONCURRENCY", "0"),
        ("CELERY_WORKER_CONCURRENCY", "four"),
        ("CELERY_WORKER_MAX_TASKS_PER_CHILD", "-1"),
        ("CELERY_WORKER_MAX_MEMORY_PER_CHILD", "abc"),
        ("CELERY_BROKER_URL", "amqp://localhost"),
        ("CELERY_RESULT_BACKEND", "rpc://"),
        ("CELERY_QUEUE", " "),
        ("CELERY_BROKER_VISIBILITY_TIMEOUT", "0"),
        ("FORWARDER_MODEL_URL", "localhost:5005/predict"),
        ("FORWARDER_MODEL_READ_TIMEOUT", "inf"),
        ("FORWARDER_READY_TIMEOUT", "-3"),
        ("FORWARDER_RESULT_FORMAT", "pickle"),
        ("FORWARDER_RETRY_MAX", "-1"),
        ("FORWARDER_MAX_RESPONSE_BYTES", "0"),
        ("FORWARDER_MAX_RESPONSE_BYTES", "16 MiB"),
        ("FORWARDER_MAX_RESULT_BYTES", "-1"),
        ("FORWARDER_MAX_RESULT_BYTES", "1e6"),
        ("FORWARDER_HOOKS", "callback,billing"),
        ("FORWARDER_LABELS", "[1, 2]"),
        ("FORWARDER_MEMORY_DEBUG", "maybe"),
        ("FIREHOSE_SESSION_DURATION", "60"),
        ("CELERY_SQS_WAIT_TIME_SECONDS", "21"),
        ("CELERY_SQS_WAIT_TIME_SECONDS", "1.5"),
    ],
)
def test_invalid_value_names_the_variable(name, value):
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({name: value})
    assert caught.value.variable == name
    assert str(caught.value).startswith(f"{name}=")
    assert "\n" not in str(caught.value)


def test_secret_values_are_never_echoed():
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"FORWARDER_CALLBACK_AUTH_PASSWORD": "s3cret", "FORWARDER_HOOKS": "nope"})
    assert "s3cret" not in str(caught.value)
    assert "s3cret" not in repr(Settings.from_env({"FORWARDER_CALLBACK_AUTH_PASSWORD": "s3cret"}))


def test_sqs_broker_requires_the_queue_url():
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"CELERY_BROKER_URL": "sqs://"})
    assert caught.value.variable == "CELERY_SQS_QUEUE_URL"


def test_logging_hook_requires_a_stream():
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"FORWARDER_HOOKS": "logging"})
    assert caught.value.variable == "FIREHOSE_STREAM_NAME"


def test_child_limits_under_gevent_warn_instead_of_failing():
    settings = Settings.from_env({"CELERY_WORKER_POOL": "gevent", "CELERY_WORKER_MAX_TASKS_PER_CHILD": "10"})
    assert settings.max_tasks_per_child == 10
    assert any("CELERY_WORKER_MAX_TASKS_PER_CHILD" in w for w in settings.warnings)


def test_hooks_are_normalised_and_deduplicated():
    settings = Settings.from_env({"FORWARDER_HOOKS": " Callback , logging,callback", "FIREHOSE_STREAM_NAME": "s"})
    assert settings.hooks == ("callback", "logging")


def test_llm_engine_endpoint_config_fills_unset_hook_settings(tmp_path):
    config = {
        "endpoint_name": "my-endpoint",
        "bundle_name": "b",
        "post_inference_hooks": ["callback"],
        "default_callback_url": "https://example.com/cb",
        "default_callback_auth": {"kind": "basic", "username": "u", "password": "p"},
        "endpoint_id": "end_123",
        "labels": {"team": "ml"},
    }
    path = tmp_path / "endpoint_config"
    path.write_bytes(base64.b64encode(json.dumps(config).encode()))
    settings = load_settings({"FORWARDER_ENDPOINT_CONFIG_PATH": str(path), "FORWARDER_ENDPOINT_NAME": "env-wins"})
    assert settings.hooks == ("callback",)
    assert settings.endpoint_name == "env-wins"
    assert settings.endpoint_id == "end_123"
    assert settings.callback_url == "https://example.com/cb"
    assert (settings.callback_username, settings.callback_password) == ("u", "p")
    assert settings.labels == {"team": "ml"}


def test_endpoint_config_user_id_fills_the_callback_user_and_env_wins():
    config = {"user_id": "owner-1", "post_inference_hooks": ["callback"]}
    assert Settings.from_env({}, config).endpoint_user_id == "owner-1"
    assert Settings.from_env({"FORWARDER_ENDPOINT_USER_ID": "ops"}, config).endpoint_user_id == "ops"


def test_hooks_the_endpoint_config_names_but_this_worker_lacks_are_warned_about_and_skipped():
    settings = Settings.from_env({}, {"post_inference_hooks": ["billing", "Callback", "billing"]})
    assert settings.hooks == ("callback",)
    assert [w for w in settings.warnings if "billing" in w] == [
        "endpoint config hook 'billing' is not run by this worker; skipped (runs: callback, logging)"
    ]
    with pytest.raises(ConfigError) as caught:  # an operator's own list stays strict
        Settings.from_env({"FORWARDER_HOOKS": "billing,callback"})
    assert caught.value.variable == "FORWARDER_HOOKS"


def test_unreadable_endpoint_config_is_a_start_error(tmp_path):
    path = tmp_path / "garbage"
    path.write_text("not base64 json!")
    with pytest.raises(ConfigError) as caught:
        load_settings({"FORWARDER_ENDPOINT_CONFIG_PATH": str(path)})
    assert caught.value.variable == "FORWARDER_ENDPOINT_CONFIG_PATH"


def test_a_result_limit_above_what_redis_stores_in_one_value_warns_on_redis_only():
    above = str(512 * 1024 * 1024)
    warned = Settings.from_env({"FORWARDER_MAX_RESULT_BYTES": above}).warnings
    assert len(warned) == 1 and warned[0].startswith("FORWARDER_MAX_RESULT_BYTES is above what Redis stores")
    assert Settings.from_env({"FORWARDER_MAX_RESULT_BYTES": above, "CELERY_RESULT_BACKEND": "s3://bucket/tmp"}).warnings == ()
    assert Settings.from_env({"FORWARDER_MAX_RESULT_BYTES": str(256 * 1024 * 1024)}).warnings == ()


# ------------------------------------------------------------------------------------------------ URLs

#: URLs each of which crashed the worker (a traceback, exit 1) or left it retrying forever, after `check`
#: had passed it: (variable, URL, what the one line says).
BAD_URLS = [
    ("CELERY_BROKER_URL", "redis://localhost:abc/0", "port that is not a number from 1 to 65535"),
    ("CELERY_BROKER_URL", "redis://localhost:70000/0", "port that is not a number from 1 to 65535"),
    ("CELERY_BROKER_URL", "redis://localhost:0/0", "port that is not a number from 1 to 65535"),
    ("CELERY_BROKER_URL", "redis://:hunter2@localhost:6379/x", "Redis database that is not a number from 0 to 15"),
    ("CELERY_BROKER_URL", "redis://localhost:6379/-1", "Redis database that is not a number from 0 to 15"),
    ("CELERY_BROKER_URL", "redis://localhost:6379/16", "Redis database 16"),
    ("CELERY_BROKER_URL", "redis://localhost:6379/0?socket_timeout=abc", "query option kombu does not take (socket_timeout)"),
    ("CELERY_BROKER_URL", "redis:///0", "must name a host"),
    ("CELERY_RESULT_BACKEND", "redis://localhost:abc/1", "port that is not a number from 1 to 65535"),
    ("CELERY_RESULT_BACKEND", "redis://localhost:99999/1", "port that is not a number from 1 to 65535"),
    ("CELERY_RESULT_BACKEND", "redis://:hunter2@localhost:6379/x", "Redis database that is not a number from 0 to 15"),
    ("CELERY_RESULT_BACKEND", "redis://localhost:6379/20", "Redis database 20"),
    ("CELERY_RESULT_BACKEND", "rediss://:hunter2@localhost:6379/1", "A rediss:// URL must have parameter ssl_cert_reqs"),
    ("CELERY_RESULT_BACKEND", "redis://localhost:6379/1?ssl_cert_reqs=none", "SSL connection parameters"),
    ("FORWARDER_MODEL_URL", "http://localhost:99999/predict", "port that is not a number from 1 to 65535"),
    ("FORWARDER_HEALTHCHECK_URL", "http://localhost:x/readyz", "port that is not a number from 1 to 65535"),
    ("FORWARDER_CALLBACK_URL", "https://hooks.example.com:0/done", "port that is not a number from 1 to 65535"),
    ("CELERY_SQS_QUEUE_URL", "https://sqs.us-east-1.amazonaws.com:123456/1/q", "port that is not a number from 1 to 65535"),
    ("DD_DOGSTATSD_URL", "udp://localhost:99999", "out of range"),
]


@pytest.mark.parametrize(("name", "value", "reason"), BAD_URLS)
def test_a_url_is_parsed_in_full_and_refused_with_one_line_naming_the_variable(name, value, reason):
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({name: value})
    message = str(caught.value)
    assert caught.value.variable == name and message.startswith(f"{name}=")
    assert reason in message and "\n" not in message
    assert "hunter2" not in message and "socket_timeout=abc" not in message  # password and query masked


@pytest.mark.parametrize("value", [
    "redis://localhost:6379/3", "redis://localhost/0", "redis://localhost", "rediss://:tok@cache.example:6380/15",
    "REDIS://localhost:6379/3", "rediss://:tok@cache.example:6380/3?ssl_cert_reqs=none", "sqs://", "sqs://AKIA:sec@",
])
def test_urls_the_worker_takes_are_accepted(value):
    env = {"CELERY_BROKER_URL": value, "CELERY_SQS_QUEUE_URL": "https://sqs.us-east-1.amazonaws.com/1/q"}
    assert Settings.from_env(env).broker_url == value.replace("REDIS://", "redis://")


def test_result_backend_urls_celery_takes_are_accepted():
    for value in ("redis://localhost:6379/1", "rediss://:tok@cache.example:6380/1?ssl_cert_reqs=required",
                  "s3://bucket/tmp/celery"):
        assert Settings.from_env({"CELERY_RESULT_BACKEND": value}).result_backend == value


def test_urls_are_shown_without_password_nor_query():
    assert safe_url("rediss://:tok@h:6380/3?ssl_cert_reqs=none") == "rediss://:***@h:6380/3?***"
    assert safe_url("redis://h:6379/0") == "redis://h:6379/0"
    assert safe_url("sqs://") == "sqs://"
    shown = effective_config(Settings.from_env({"CELERY_BROKER_URL": "rediss://:pw@h:1/3?ssl_cert_reqs=none"}))
    assert shown["CELERY_BROKER_URL"] == "rediss://:***@h:1/3?***"


# ------------------------------------------------------------------------------------------------ choices


@pytest.mark.parametrize(("name", "raw", "value"), [
    ("CELERY_WORKER_POOL", "GEVENT", "gevent"),
    ("CELERY_WORKER_POOL", " Prefork ", "prefork"),
    ("CELERY_LOG_LEVEL", "debug", "DEBUG"),
    ("FORWARDER_LOG_FORMAT", "JSON", "json"),
    ("FORWARDER_RESULT_FORMAT", "Raw", "raw"),
    ("FORWARDER_HOOKS", "CALLBACK", ("callback",)),
    ("FORWARDER_METRICS", "FALSE", False),
])
def test_choices_take_any_case_and_are_normalised_once(name, raw, value):
    var = next(var for var in VARS if var.name == name)
    assert getattr(Settings.from_env({name: raw}), var.attr) == value
    if name == "CELERY_WORKER_POOL":  # the bootstrap (gevent patch) reads it the same way
        assert pool_from_env({name: raw}) == value


# ------------------------------------------------------------------------------------------------ unknown names


def typo(name):
    """A one-letter slip: the variable with one letter dropped from its last word."""
    head, _, last = name.rpartition("_")
    return f"{head}_{last[:-2]}{last[-1]}" if len(last) > 2 else f"{name}S"


OURS = [var.name for var in VARS if var.name.startswith(("FORWARDER_", "FIREHOSE_", "CELERY_"))]


@pytest.mark.parametrize("name", OURS)
def test_a_misspelt_variable_is_named_with_the_closest_known_one(name):
    slip = typo(name)
    assert slip not in OURS
    settings = Settings.from_env({slip: "1"})
    assert [w for w in settings.warnings if slip in w] == [
        f"{slip} is not a variable this worker reads (did you mean {name}?); ignored"
    ]
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({slip: "1", "FORWARDER_STRICT_ENV": "1"})
    assert caught.value.variable == slip and f"did you mean {name}?" in str(caught.value)


def test_the_issues_examples_and_a_secret_typo_never_echoed():
    env = {"FORWARDER_HOOK": "callback", "FORWARDER_MODEL_READ_TIMOUT": "60", "CELERY_WORKER_CONCURENCY": "8",
           "FORWARDER_CALLBACK_AUTH_PASWORD": "hunter2"}
    assert unknown_variables(env) == [
        ("CELERY_WORKER_CONCURENCY", " (did you mean CELERY_WORKER_CONCURRENCY?)"),
        ("FORWARDER_CALLBACK_AUTH_PASWORD", " (did you mean FORWARDER_CALLBACK_AUTH_PASSWORD?)"),
        ("FORWARDER_HOOK", " (did you mean FORWARDER_HOOKS?)"),
        ("FORWARDER_MODEL_READ_TIMOUT", " (did you mean FORWARDER_MODEL_READ_TIMEOUT?)"),
    ]
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**env, "FORWARDER_STRICT_ENV": "yes"})
    assert "hunter2" not in str(caught.value)
    assert not any("hunter2" in w for w in Settings.from_env(env).warnings)
    assert unknown_variables({"FORWARDER_ZZZZZZZZZZZZZZZZZZZZ": "1"}) == [("FORWARDER_ZZZZZZZZZZZZZZZZZZZZ", "")]


def test_variables_of_other_tools_are_left_alone():
    env = {
        "CELERY_RDBSIG": "1", "CELERY_RDB_PORT": "6900", "CELERY_TASK_VISIBILITY": "VISIBILITY_24H",
        "CELERY_CONFIG_MODULE": "x", "CELERY_SOMETHING_ELSE_ENTIRELY": "1", "DD_ENV": "prod", "DD_SERVICE": "s",
        "DD_TRACE_ENABLED": "false", "DD_CELERY_DISTRIBUTED_TRACING": "true", "AWS_PROFILE": "p",
        "AWS_DEFAULT_REGION": "us-east-1", "REDIS_PASSWORD": "x", "PATH": "/bin", "HOME": "/root",
    }
    assert unknown_variables(env) == []
    assert Settings.from_env({**env, "FORWARDER_STRICT_ENV": "1"}).warnings == ()


def test_the_outage_hold_stays_below_the_visibility_timeout():
    # Unset: 900 s, or half a shorter Redis visibility timeout (a held task is unacknowledged).
    assert Settings.from_env({}).model_outage_max == 900
    assert Settings.from_env({"CELERY_BROKER_VISIBILITY_TIMEOUT": "30"}).model_outage_max == 15
    # Set: refused when the broker would deliver a held task again while it waits.
    with pytest.raises(ConfigError, match=r"FORWARDER_MODEL_OUTAGE_MAX='60' must be below CELERY_BROKER_VISIBILITY_TIMEOUT"):
        Settings.from_env({"CELERY_BROKER_VISIBILITY_TIMEOUT": "30", "FORWARDER_MODEL_OUTAGE_MAX": "60"})
    assert Settings.from_env({"CELERY_BROKER_VISIBILITY_TIMEOUT": "30", "FORWARDER_MODEL_OUTAGE_MAX": "20"}).model_outage_max == 20


def test_a_misspelt_variable_is_named_with_an_endpoint_config_too():
    settings = Settings.from_env({"FORWARDER_HOOK": "callback"}, {"post_inference_hooks": ["billing"]})
    assert any(w.startswith("FORWARDER_HOOK is not a variable") for w in settings.warnings), settings.warnings
    assert any("billing" in w for w in settings.warnings), settings.warnings
