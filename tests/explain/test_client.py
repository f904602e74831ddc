"""HTTP with retries against a local server: 429 with Retry-After, 5xx, timeouts, refused connections, malformed
JSON; API keys only from the environment."""

from __future__ import annotations

import time

import pytest

from helpers import MockServer, Reply, free_port_url
from refusalscope.explain.client import EndpointError, Unreachable, api_key, json_of, make_session, request


def _get(url, retries=2, backoff=0.0, timeout=5.0, **kw):
    return request(make_session(retries, backoff), "GET", url, what="test", timeout=timeout, retries=retries, **kw)


def _flaky(statuses, final=Reply(body={"ok": True}), retry_after=None):
    """Answer each status of ``statuses`` once, then ``final``."""
    left = list(statuses)

    def handler(req):
        if left:
            headers = {"Retry-After": retry_after} if retry_after is not None else {}
            return Reply(left.pop(0), b"busy", headers)
        return final
    return handler


def test_429_is_retried_and_retry_after_is_honoured():
    with MockServer(_flaky([429], retry_after="1")) as srv:
        start = time.perf_counter()
        resp = _get(srv.url + "/x")
        waited = time.perf_counter() - start
    assert json_of(resp, "test") == {"ok": True}
    assert len(srv.requests) == 2
    assert waited >= 0.9  # Retry-After: 1, with no backoff of our own


@pytest.mark.parametrize("status", [500, 502, 503])
def test_5xx_is_retried_with_exponential_backoff(status):
    with MockServer(_flaky([status, status])) as srv:
        start = time.perf_counter()
        assert _get(srv.url, retries=3, backoff=0.2).ok
        waited = time.perf_counter() - start
    assert len(srv.requests) == 3
    assert waited >= 0.2  # the second retry waits backoff x 2^1 (urllib3 does not wait before the first)


def test_retries_run_out_with_a_clear_message():
    with MockServer(_flaky([429] * 10, retry_after="0")) as srv:
        with pytest.raises(EndpointError, match=r"rate limiting us \(HTTP 429\) after 2 retries"):
            _get(srv.url)
    assert len(srv.requests) == 3  # the request and 2 retries
    with MockServer(lambda req: Reply(500)) as srv:
        with pytest.raises(EndpointError, match="answered HTTP 500"):
            _get(srv.url, retries=1)


def test_timeouts_are_retried_then_reported_as_unreachable():
    with MockServer(lambda req: Reply(body={"late": True}, delay=0.6)) as srv:
        with pytest.raises(Unreachable, match="did not answer within 0.2 s"):
            _get(srv.url, retries=1, timeout=0.2)
    assert len(srv.requests) == 2


def test_refused_connection_is_unreachable():
    with pytest.raises(Unreachable, match="cannot reach"):
        _get(free_port_url(), retries=1)


def test_malformed_json_and_auth_errors():
    with MockServer(lambda req: Reply(body=b"{not json")) as srv:
        with pytest.raises(EndpointError, match="malformed JSON"):
            json_of(_get(srv.url), "test")
    with MockServer(lambda req: Reply(401)) as srv:
        with pytest.raises(EndpointError, match="check the API key"):
            _get(srv.url)
    with MockServer(lambda req: Reply(404)) as srv:
        assert _get(srv.url, ok=(404,)).status_code == 404
        with pytest.raises(EndpointError, match="HTTP 404"):
            _get(srv.url)


def test_api_key_comes_from_the_first_set_variable(monkeypatch):
    monkeypatch.delenv("RS_TEST_A", raising=False)
    monkeypatch.setenv("RS_TEST_B", "  key-b ")
    assert api_key(["RS_TEST_A", "RS_TEST_B"]) == "key-b"
    monkeypatch.setenv("RS_TEST_A", "key-a")
    assert api_key(["RS_TEST_A", "RS_TEST_B"]) == "key-a"
    monkeypatch.delenv("RS_TEST_A")
    monkeypatch.delenv("RS_TEST_B")
    assert api_key(["RS_TEST_A", "RS_TEST_B"]) is None
