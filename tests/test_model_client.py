"""``ModelClient.predict`` against the example model: the answer-size limit, read by Content-Length or counted."""

from __future__ import annotations

import time
import types

import pytest

from devtools.servers import ModelServer, wait_for
from gateways.model_server import (
    ModelClient,
    ModelConnectionError,
    ModelResponseError,
    ModelResponseTooLarge,
    ModelServerError,
)

MIB = 1024 * 1024
MODES = ["huge", "huge-chunked"]  # with a Content-Length, and chunked without one


def client(model: ModelServer, limit: int, pool_size: int = 2) -> ModelClient:
    return ModelClient(f"{model.url}/predict", f"{model.url}/readyz", connect_timeout=2, read_timeout=10,
                       pool_size=pool_size, max_response_bytes=limit)


@pytest.mark.parametrize("mode", MODES)
def test_an_answer_of_exactly_the_limit_is_read_and_one_byte_more_is_refused_naming_the_limit(mode, model):
    model.behaviour.mode = mode
    model.behaviour.huge_bytes = MIB
    answer = client(model, MIB).predict({"id": 1})
    assert answer.status_code == 200 and answer.body == {"text": "a" * (MIB - 12)}
    with pytest.raises(ModelResponseTooLarge) as caught:
        client(model, MIB - 1).predict({"id": 2})
    assert str(caught.value) == (
        f"model server answered HTTP 200 with more than {MIB - 1} bytes (the limit, set by "
        "FORWARDER_MAX_RESPONSE_BYTES); the answer was dropped"
    )
    assert isinstance(caught.value, ModelServerError) and not isinstance(caught.value, ModelConnectionError)


@pytest.mark.parametrize("mode", MODES)
def test_a_200_mb_answer_is_cut_off_at_once_and_its_connection_closed_not_drained(mode, model):
    model.behaviour.mode = mode
    model.behaviour.huge_bytes = 200_000_000
    one = client(model, 4 * MIB, pool_size=1)  # a connection kept by a refused answer would block the next call
    started = time.monotonic()
    for n in range(3):
        with pytest.raises(ModelResponseTooLarge) as caught:
            one.predict({"id": n})
        # Raised from nothing and holding nothing: no chained error, no frame with the bytes read.
        assert caught.value.__context__ is None and caught.value.__cause__ is None
        frames = [tb.tb_frame for tb in _tracebacks(caught.value.__traceback__)]
        assert all(not isinstance(v, (bytes, bytearray)) or len(v) < MIB for f in frames for v in f.f_locals.values())
    model.behaviour.mode = "json"
    assert one.predict({"id": "after"}).body["echo"] == {"id": "after"}
    assert time.monotonic() - started < 10
    wait_for(lambda: model.behaviour.huge_cut == 3, 10, "three huge answers cut off")
    assert model.behaviour.huge_sent == 0
    one.close()


def test_a_body_that_is_not_json_still_fails_with_its_preview(model):
    model.behaviour.mode, model.behaviour.status = "text", 502
    with pytest.raises(ModelResponseError) as caught:
        client(model, MIB).predict({"id": 1})
    assert str(caught.value) == (
        "model server answered HTTP 502 with a body that is not JSON: '<html>oops, not json</html>'"
    )


def test_non_ascii_text_in_a_utf8_answer_is_read_intact(model):
    answer = client(model, MIB).predict({"text": "héllo ✓"})
    assert answer.body["echo"] == {"text": "héllo ✓"}


def _tracebacks(tb: types.TracebackType | None) -> list[types.TracebackType]:
    found = []
    while tb is not None:
        found.append(tb)
        tb = tb.tb_next
    return found
