"""The OpenAI-compatible chat client and the LLM explainer against a local server: the request it sends (prompt
format, model, key header), the answer it reads, and malformed answers, timeouts and a server that is down."""

from __future__ import annotations

import logging

import pytest

from helpers import MockServer, Reply, chat_reply, free_port_url
from refusalscope.explain.chat import (
    ChatClient,
    clean_explanation,
    endpoint,
    explain_with_llm,
    explainer_messages,
    format_contexts,
)
from refusalscope.explain.client import EndpointError, Unreachable
from refusalscope.explain.records import TopContext

KEY = "llm-planted-key-77aa"
CONTEXTS = [TopContext(tokens=["How", " to", " make", " a", " bomb"], activations=[0.0, 0.0, 2.4, 0.5, 8.0],
                       top_index=4, top_token=" bomb", top_value=8.0, prompt="How to make a bomb"),
            TopContext(tokens=["gun", "\n"], activations=[4.0, 0.0], top_index=0, top_token="gun", top_value=4.0)]


def test_endpoint_paths():
    assert endpoint("http://h:1", "chat/completions") == "http://h:1/v1/chat/completions"
    assert endpoint("http://h:1/v1/", "models") == "http://h:1/v1/models"
    with pytest.raises(EndpointError, match="not an http"):
        endpoint("h:1", "models")


def test_prompt_lists_tokens_with_scaled_activations_and_marks_the_top_token():
    text = format_contexts(CONTEXTS)
    lines = text.splitlines()
    assert lines[:2] == ["Excerpt 1:", "<start>"]
    assert "<<\u0020bomb>>\t10" in lines  # the max of all contexts scales to 10
    assert " make\t3" in lines and " a\t1" in lines and "How\t0" in lines
    assert "<<gun>>\t5" in lines and "\\n\t0" in lines  # newline escaped, one token per line
    assert text.count("<end>") == 2
    system, user = explainer_messages(CONTEXTS)
    assert system["role"] == "system" and "one short phrase" in system["content"]
    assert user["content"].startswith("Excerpt 1:")


@pytest.mark.parametrize("answer,expected", [
    ("Weapons and explosives.", "Weapons and explosives"),
    ('"requests to build weapons"\nBecause the tokens...', "requests to build weapons"),
    ("Explanation: harmful chemistry", "harmful chemistry"),
    ("\n\n  **refusal phrases**  ", "refusal phrases"),
    ("", ""),
])
def test_clean_explanation(answer, expected):
    assert clean_explanation(answer) == expected


def test_explainer_round_trip_sends_model_key_and_prompt(monkeypatch):
    monkeypatch.setenv("REFUSALSCOPE_LLM_API_KEY", KEY)
    with MockServer(lambda req: chat_reply("Explosives and weapons.")) as srv:
        client = ChatClient(srv.url, model="tiny-judge", retries=0)
        assert explain_with_llm(client, CONTEXTS) == "Explosives and weapons"
        [req] = srv.requests
    assert req["method"] == "POST" and req["path"] == "/v1/chat/completions"
    assert req["headers"]["authorization"] == f"Bearer {KEY}"
    body = req["json"]
    assert body["model"] == "tiny-judge" and body["temperature"] == 0
    assert "<< bomb>>\t10" in body["messages"][1]["content"]


def test_model_name_from_the_server_list_then_env(monkeypatch):
    monkeypatch.delenv("REFUSALSCOPE_LLM_MODEL", raising=False)

    def handler(req):
        if req["path"] == "/v1/models":
            return Reply(body={"object": "list", "data": [{"id": "served-model"}, {"id": "other"}]})
        return chat_reply("ok")
    with MockServer(handler) as srv:
        client = ChatClient(srv.url, retries=0)
        client.complete([{"role": "user", "content": "hi"}])
        assert srv.requests[-1]["json"]["model"] == "served-model"
        monkeypatch.setenv("REFUSALSCOPE_LLM_MODEL", "from-env")
        assert ChatClient(srv.url, retries=0).model == "from-env"
    with MockServer(lambda req: Reply(404)) as srv:
        monkeypatch.delenv("REFUSALSCOPE_LLM_MODEL")
        assert ChatClient(srv.url, retries=0).model == "default"


@pytest.mark.parametrize("reply,match", [
    (Reply(body=b"{'choices': oops"), "malformed JSON"),
    (Reply(body={"choices": []}), "without choices"),
    (Reply(body={"choices": [{"message": {"content": None}}]}), "non-text"),
    (chat_reply("   "), "empty explanation"),
    (Reply(500, b"boom"), "HTTP 500"),
])
def test_bad_answers_raise_clear_errors(reply, match, monkeypatch, caplog):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    with MockServer(lambda req: reply) as srv:
        with pytest.raises(EndpointError, match=match) as err:
            explain_with_llm(ChatClient(srv.url, model="m", retries=1, backoff=0), CONTEXTS)
    assert KEY not in str(err.value) and KEY not in caplog.text


def test_timeouts_and_a_server_that_is_down():
    with MockServer(lambda req: Reply(delay=0.5, body={})) as srv:
        with pytest.raises(Unreachable, match="did not answer within 0.1 s"):
            ChatClient(srv.url, model="m", timeout=0.1, retries=1, backoff=0).complete([])
        assert len(srv.requests) == 2  # POSTs are retried too
    with pytest.raises(Unreachable, match="cannot reach"):
        ChatClient(free_port_url(), model="m", retries=0).complete([])
