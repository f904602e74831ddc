"""HTTP for the explainers and the LLM judge: a ``requests`` session that retries with exponential backoff on 429,
5xx, refused connections and timeouts (honouring ``Retry-After``, through urllib3's ``Retry``), JSON reads with
one-line errors, and API keys read only from environment variables.

Keys go into request headers and nowhere else: never into a URL, a message, a log line, a cache or a run file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from refusalscope.errors import RefusalScopeError

RETRY_STATUS = (429, 500, 502, 503, 504)


class EndpointError(RefusalScopeError):
    """An HTTP endpoint answered, but not usefully (an error status after the retries, malformed JSON)."""


class Unreachable(EndpointError):
    """An HTTP endpoint did not answer at all (refused connection or timeouts, after the retries)."""


def api_key(env_names: Sequence[str]) -> str | None:
    """The first non-empty environment variable of ``env_names`` (keys are never options, so never saved)."""
    for name in env_names:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def make_session(retries: int, backoff: float) -> requests.Session:
    """A session whose every request is retried up to ``retries`` times: waits of ``backoff`` × 2^(n-1) s, or
    what ``Retry-After`` says on 429/503."""
    retry = Retry(total=retries, connect=retries, read=retries, status=retries, other=0, backoff_factor=backoff,
                  status_forcelist=RETRY_STATUS, allowed_methods=None, respect_retry_after_header=True,
                  raise_on_status=False)
    s = requests.Session()
    adapter = HTTPAdapter(max_retries=retry)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    return s


def request(session: requests.Session, method: str, url: str, *, what: str, timeout: float, retries: int,
            headers: dict | None = None, ok: Sequence[int] = (), **kw) -> requests.Response:
    """``session.request`` with our errors; returns 2xx responses and those with a status in ``ok`` (e.g. 404)."""
    try:
        resp = session.request(method, url, headers=headers, timeout=timeout, **kw)
    except (requests.Timeout, requests.ConnectionError, requests.exceptions.RetryError) as e:
        if isinstance(e, requests.Timeout) or isinstance(_reason(e), urllib3.exceptions.ReadTimeoutError):
            raise Unreachable(f"{what}: {url} did not answer within {timeout:g} s ({retries} retries)") from None
        raise Unreachable(f"{what}: cannot reach {url} after {retries} retries ({_short(e)})") from None
    except requests.RequestException as e:
        raise EndpointError(f"{what}: request to {url} failed ({type(e).__name__})") from None
    if resp.ok or resp.status_code in ok:
        return resp
    if resp.status_code == 429:
        raise EndpointError(f"{what}: {url} is rate limiting us (HTTP 429) after {retries} retries; wait and rerun "
                            "(finished items are cached)")
    if resp.status_code in (401, 403):
        raise EndpointError(f"{what}: {url} refused the request (HTTP {resp.status_code}); check the API key "
                            "environment variable")
    raise EndpointError(f"{what}: {url} answered HTTP {resp.status_code}")


def json_of(resp: requests.Response, what: str):
    try:
        return resp.json()
    except (ValueError, json.JSONDecodeError):
        raise EndpointError(f"{what}: {resp.url} returned malformed JSON ({len(resp.content)} bytes starting "
                            f"{resp.content[:40]!r})") from None


def _reason(e: Exception):
    """The urllib3 error inside a requests error (``MaxRetryError.reason``), or None."""
    return getattr(e.args[0], "reason", None) if e.args else None


def _short(e: Exception) -> str:
    """The innermost reason of a requests/urllib3 connection error, without the long wrapper text."""
    return str(_reason(e) or e).split(": ", 1)[-1][:120]
