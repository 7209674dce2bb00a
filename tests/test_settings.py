"""Settings.from_env: defaults, parsing and one clear error per bad variable (pure, no servers)."""

from __future__ import annotations

import base64
import json

import pytest

from forwarder.errors import ConfigError
from forwarder.settings import VARS, Settings, describe, load_settings


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
        ("CELERY_WORKER_POOL", "Gevent"),
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
