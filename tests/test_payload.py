"""The llm-engine contract as pure functions: unwrapping, result shapes, the error payload."""

from __future__ import annotations

import json

import pytest

from forwarder.errors import MalformedRequest, ResultTooLarge
from forwarder.payload import error_payload, plan_request, shape_result
from forwarder.settings import Settings

#: The default result limit.
LIMIT = Settings.from_env({}).max_result_bytes


def test_wrapped_forwards_args_and_stores_json_string_with_status():
    plan = plan_request({"args": {"x": 1}, "url": None, "return_pickled": False}, "wrapped")
    assert plan.body == {"x": 1}
    assert shape_result({"y": 2}, 200, plan, max_bytes=LIMIT) == {"result": json.dumps({"y": 2}), "status_code": 200}


def test_wrapped_without_args_forwards_the_whole_request():
    plan = plan_request({"x": 1}, "wrapped")
    assert plan.body == {"x": 1}


def test_non_2xx_is_a_result_with_its_status():
    plan = plan_request({"args": {}}, "wrapped")
    assert shape_result({"detail": "bad"}, 422, plan, max_bytes=LIMIT) == {"result": '{"detail": "bad"}', "status_code": 422}


@pytest.mark.parametrize("where", ["top", "args"])
def test_serialize_override(where):
    request = {"args": {"x": 1}}
    target = request if where == "top" else request["args"]
    target["serialize_results_as_string"] = False
    plan = plan_request(request, "wrapped")
    assert shape_result({"y": 2}, 200, plan, max_bytes=LIMIT) == {"result": {"y": 2}, "status_code": 200}


def test_top_level_override_wins():
    plan = plan_request({"serialize_results_as_string": True, "args": {"serialize_results_as_string": False}}, "wrapped")
    assert plan.serialize_as_string is True


@pytest.mark.parametrize(
    "request_", [None, [], "text", 3, {"args": None}, {"args": 7}, {"args": 1.5}, {"args": True}, {"args": False}],
)
def test_what_llm_engine_cannot_forward_fails_clearly(request_):
    # A request that is not an object, or ``args`` that is a number, boolean or null: llm-engine's forwarder
    # fails these too, before any HTTP call (TypeError in its serialize_results_as_string lookup).
    with pytest.raises(MalformedRequest) as caught:
        plan_request(request_, "wrapped")
    assert "request" in str(caught.value)


@pytest.mark.parametrize("args", [{"x": 1}, [1, "two"], "just a string", "", []])
def test_every_json_type_llm_engine_forwards_is_forwarded(args):
    plan = plan_request({"args": args}, "wrapped")
    assert plan.body == args and plan.serialize_as_string is True


@pytest.mark.parametrize("args", [None, 7, True])
def test_a_top_level_serialize_key_skips_the_args_check_as_in_llm_engine(args):
    plan = plan_request({"args": args, "serialize_results_as_string": False}, "wrapped")
    assert plan.body == args and plan.serialize_as_string is False


@pytest.mark.parametrize(("value", "expected"), [("false", True), (0, False), ("", False), (1, True)])
def test_serialize_key_is_read_with_python_truthiness_as_llm_engine_does(value, expected):
    assert plan_request({"args": {"serialize_results_as_string": value}}, "wrapped").serialize_as_string is expected


def test_raw_forwards_everything_and_stores_model_json():
    request = {"args": {"x": 1}, "url": None}
    plan = plan_request(request, "raw")
    assert plan.body == request
    assert shape_result({"y": 2}, 500, plan, max_bytes=LIMIT) == {"y": 2}


def test_error_payload_shape():
    try:
        raise ValueError("boom")
    except ValueError as exc:
        payload = error_payload(exc)
    assert payload["error"] == "boom"
    assert payload["error_metadata"].startswith("Internal failure\nTraceback")
    assert "ValueError: boom" in payload["error_metadata"]


def test_raw_never_forwards_callback_credentials():
    request = {"args": {"x": 1}, "callback_auth": {"kind": "basic", "username": "u", "password": "p"}}
    assert plan_request(request, "raw").body == {"args": {"x": 1}}


@pytest.mark.parametrize("result_format", ["wrapped", "raw"])
def test_a_result_whose_json_fits_the_limit_exactly_is_returned_one_byte_more_fails_naming_the_limit(result_format):
    plan = plan_request({"args": {"x": 1}}, result_format)
    answer = {"text": "a" * 1000}
    size = len(json.dumps(shape_result(answer, 200, plan, max_bytes=LIMIT)))
    assert shape_result(answer, 200, plan, max_bytes=size) is not None
    with pytest.raises(ResultTooLarge) as caught:
        shape_result(answer, 200, plan, max_bytes=size - 1)
    assert str(caught.value) == (
        f"the task's result is {size} bytes as JSON, more than {size - 1} bytes (the limit, set by "
        "FORWARDER_MAX_RESULT_BYTES); it was not stored"
    )


def test_the_size_is_the_stored_encoding_so_escaping_in_the_wrapped_format_counts():
    # Quotes and non-ASCII text grow twice: once as the model's JSON string, again inside the result.
    answer = {"text": 'é"' * 1000}
    sent = len(json.dumps(answer, ensure_ascii=False).encode())  # the model's answer, in UTF-8
    plan = plan_request({"args": {}}, "wrapped")
    stored = len(json.dumps(shape_result(answer, 200, plan, max_bytes=LIMIT)))
    assert stored > 2 * sent
    with pytest.raises(ResultTooLarge):
        shape_result(answer, 200, plan, max_bytes=2 * sent)
