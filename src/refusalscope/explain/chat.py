"""An OpenAI-compatible chat endpoint (``POST {base}/v1/chat/completions``), for users who run a local model server
(llama.cpp, vLLM, Ollama, ...): it writes feature explanations from top contexts, and serves the LLM judge.

The explainer prompt lists each top context as token/activation pairs, activations scaled to 0–10 by the
feature's largest activation and the max-activating token marked, the format of the explanations Neuronpedia
shows (after Bills et al. 2023, "Language models can explain neurons in language models"); our wording.
The key, if any, comes from ``REFUSALSCOPE_LLM_API_KEY`` or ``OPENAI_API_KEY``, sent as a Bearer header only.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

from refusalscope.explain.client import EndpointError, api_key, json_of, make_session, request
from refusalscope.explain.records import TopContext

log = logging.getLogger(__name__)

KEY_ENV = ("REFUSALSCOPE_LLM_API_KEY", "OPENAI_API_KEY")
MODEL_ENV = "REFUSALSCOPE_LLM_MODEL"


def endpoint(base_url: str, path: str) -> str:
    """``http://host:port`` or ``http://host:port/v1`` + ``chat/completions`` → the full v1 URL."""
    base = base_url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise EndpointError(f"chat endpoint {base_url!r} is not an http(s) URL")
    return f"{base}/{path}" if base.endswith("/v1") else f"{base}/v1/{path}"


class ChatClient:
    """``complete(messages) -> str``: the first choice's message content, with retries and clear errors."""

    def __init__(self, base_url: str, *, model: str | None = None, timeout: float = 60.0, retries: int = 2,
                 backoff: float = 1.0, max_tokens: int = 64, key_env: Sequence[str] = KEY_ENV):
        self.url = endpoint(base_url, "chat/completions")
        self.base_url = base_url
        self.timeout, self.retries, self.max_tokens = timeout, retries, max_tokens
        self.key_env = tuple(key_env)
        self._model = model or os.environ.get(MODEL_ENV) or None
        self._session = make_session(retries, backoff)

    def _headers(self) -> dict:
        key = api_key(self.key_env)
        return {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}

    @property
    def model(self) -> str:
        """The model option, else ``REFUSALSCOPE_LLM_MODEL``, else the first model the server lists (``/v1/models``),
        else "default" (servers that serve one model ignore the name)."""
        if self._model is None:
            try:
                resp = request(self._session, "GET", endpoint(self.base_url, "models"), what="LLM endpoint",
                               timeout=self.timeout, retries=0, headers=self._headers())
                data = json_of(resp, "LLM endpoint").get("data") or []
                self._model = str(data[0]["id"]) if data and isinstance(data[0], dict) and "id" in data[0] \
                    else "default"
            except (EndpointError, AttributeError):
                self._model = "default"
        return self._model

    def complete(self, messages: list[dict], *, max_tokens: int | None = None) -> str:
        body = {"model": self.model, "messages": messages, "temperature": 0,
                "max_tokens": max_tokens or self.max_tokens}
        resp = request(self._session, "POST", self.url, what="LLM endpoint", timeout=self.timeout,
                       retries=self.retries, headers=self._headers(), data=json.dumps(body))
        data = json_of(resp, "LLM endpoint")
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise EndpointError(f"LLM endpoint: {self.url} answered without choices[0].message.content") from None
        if not isinstance(content, str):
            raise EndpointError(f"LLM endpoint: {self.url} answered a non-text message content")
        return content


# ---- the explainer ----------------------------------------------------------------------------------------------

EXPLAINER_SYSTEM = (
    "You explain features of a language model's sparse autoencoder. You see text excerpts where the feature is "
    "most active, one token per line as token<tab>activation, activations scaled 0-10 (0: inactive); the "
    "strongest token of each excerpt is marked with <<>>. Say in one short phrase (at most 15 words) what the "
    "feature responds to. Answer with the phrase only."
)


def format_contexts(contexts: Sequence[TopContext]) -> str:
    """Token/activation lines of each context, activations scaled to 0–10 by the largest over all contexts."""
    top = max((c.top_value for c in contexts), default=0.0) or 1.0
    blocks = []
    for k, c in enumerate(contexts, 1):
        lines = [f"Excerpt {k}:", "<start>"]
        for i, (tok, act) in enumerate(zip(c.tokens, c.activations)):
            shown = tok.replace("\n", "\\n").replace("\t", "\\t")
            mark = f"<<{shown}>>" if i == c.top_index else shown
            lines.append(f"{mark}\t{max(0, round(10 * act / top))}")
        lines.append("<end>")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def explainer_messages(contexts: Sequence[TopContext]) -> list[dict]:
    return [{"role": "system", "content": EXPLAINER_SYSTEM},
            {"role": "user", "content": format_contexts(contexts) + "\n\nThe feature responds to:"}]


def clean_explanation(answer: str, max_chars: int = 200) -> str:
    """The first non-empty line of the answer, without quotes, labels and trailing punctuation."""
    line = next((s.strip() for s in answer.strip().splitlines() if s.strip()), "")
    for label in ("explanation:", "the feature responds to:", "answer:"):
        if line.lower().startswith(label):
            line = line[len(label):].strip()
    line = line.strip(" \"'`*").rstrip(".").strip()
    return line[:max_chars]


def explain_with_llm(client: ChatClient, contexts: Sequence[TopContext]) -> str:
    """One explanation from the endpoint; ``EndpointError`` if it fails or answers nothing usable."""
    text = clean_explanation(client.complete(explainer_messages(contexts)))
    if not text:
        raise EndpointError(f"LLM endpoint: {client.url} answered an empty explanation")
    return text
