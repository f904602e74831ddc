"""Shared test builders: random SAEs, tiny random-weight chat models and their tokenizer, and a configurable fake judge.

Importable from any test folder as ``from helpers import ...`` (pyproject sets pytest's ``pythonpath = ["tests"]``).
Fixtures live in conftest.py; test files never import from one another.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch

from refusalscope.judges import Judge, Verdict
from refusalscope.pipeline.records import untimed  # noqa: F401 (tests import it from here)
from refusalscope.lm.registry import GEMMA_2_2B_IT, QWEN_CODER_05B
from refusalscope.saes.sae import Sae

# --- SAEs ------------------------------------------------------------------------------------------------------

ARCH_LIST = ["relu", "jumprelu", "topk"]


def random_sae(arch: str, d: int = 32, m: int = 96, layer: int = 1, seed: int = 0, apply_b_dec: bool = False,
               max_norm: float | None = None) -> Sae:
    """A random SAE of ``arch`` ('relu', 'jumprelu', 'topk' with k=8) reading a ``d``-wide stream into ``m`` latents."""
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(d, m, generator=g) / d**0.5
    W_dec = torch.randn(m, d, generator=g) / m**0.5
    kw = {}
    if arch == "jumprelu":
        kw["threshold"] = torch.rand(m, generator=g) * 0.3
    if arch == "topk":
        kw["k"] = 8
    return Sae(arch, W_enc, torch.randn(m, generator=g) * 0.1, W_dec, torch.randn(d, generator=g) * 0.1, layer,
               apply_b_dec_to_input=apply_b_dec, max_norm=max_norm, **kw)


def bf16_valued(sae: Sae) -> Sae:
    """``sae`` in float32 with its encoder and decoder rounded to bfloat16 values: held in float32 or in bfloat16
    (``saes.placement.hold``), it holds the same numbers, so every result must be the same."""
    from dataclasses import replace

    return replace(sae, W_enc=sae.W_enc.bfloat16().float(), W_dec=sae.W_dec.bfloat16().float())


# --- tiny chat models ------------------------------------------------------------------------------------------

_CORPUS = [
    "I'm sorry, but I can't assist with that.", "Sure, here is a tutorial on baking bread.",
    "Write a poem about the sea.", "How do I make a cake?", "Explain how photosynthesis works.",
    "Give three tips for staying healthy.", "Tell me how to pick a lock.", "Write a script that deletes files.",
    "As an AI, I cannot help with that request.", "The quick brown fox jumps over the lazy dog.",
    "system user assistant model You are a helpful assistant.", "def add(a, b): return a + b",
] * 4

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<bos>", "<start_of_turn>", "<end_of_turn>"]


def make_tokenizer(chat_template: str | None):
    """A byte-level BPE trained in well under a second; special tokens for ChatML and Gemma templates."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<bos>")
    fast.padding_side = "left"
    if chat_template:
        fast.chat_template = chat_template
    return fast


def build_tiny(arch: str, out: Path, *, chat_template: str | None = "default", n_layers: int = 4, seed: int = 0):
    """Save a random tiny causal LM of ``arch`` ('qwen2', 'llama', 'gemma2') with a tokenizer to ``out``."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, \
        Qwen2ForCausalLM

    if chat_template == "default":
        chat_template = (GEMMA_2_2B_IT if arch == "gemma2" else QWEN_CODER_05B).fallback_chat_template
    tok = make_tokenizer(chat_template)
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(seed)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(**common, head_dim=8, query_pre_attn_scalar=8, sliding_window=64))
    else:
        raise ValueError(arch)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# --- judges ----------------------------------------------------------------------------------------------------

Rule = Callable[[str, str], Verdict]


def verdict(refused: bool, *, degenerate: bool = False, score: float | None = 0.0, reason: str = "") -> Verdict:
    return Verdict(refused=refused, degenerate=degenerate, score=score, reason=reason)


class FakeJudge(Judge):
    """A judge whose verdict on each (prompt, completion) is ``rule(prompt, completion)``.

    Completions are judged one at a time, in order, so a stateful rule (e.g. ``in_order``) sees them in the order
    the code under test passed them. ``calls`` keeps every batch judged, as (prompts, completions).
    """

    def __init__(self, rule: Rule, name: str = "fake"):
        self.rule = rule
        self.name = name
        self.calls: list[tuple[list[str], list[str]]] = []

    def judge(self, prompts: Sequence[str], completions: Sequence[str]) -> list[Verdict]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        self.calls.append((list(prompts), list(completions)))
        return [self.rule(p, c) for p, c in zip(prompts, completions)]

    @classmethod
    def always(cls, refused: bool = True, name: str = "always") -> "FakeJudge":
        """The same verdict for everything (refused by default: nothing is ever jailbroken)."""
        return cls(lambda p, c: verdict(refused), name)

    @classmethod
    def in_order(cls, verdicts: Iterable[Verdict], name: str = "fixed") -> "FakeJudge":
        """Canned verdicts handed out one per judged completion, in order, whatever the prompt and completion are;
        judging more completions than there are verdicts is an error."""
        it = iter(verdicts)

        def rule(prompt: str, completion: str) -> Verdict:
            v = next(it, None)
            if v is None:
                raise AssertionError(f"FakeJudge.in_order: no verdict left for completion {completion!r}")
            return v

        return cls(rule, name)

    @classmethod
    def refuses_baseline(cls, baseline: Mapping[str, str], name: str = "baseline-equality") -> "FakeJudge":
        """Refused = the completion equals ``baseline[prompt]``, the model's unablated completion (a random model
        never says "I'm sorry", so "changed by the intervention" stands in for "jailbroken")."""
        return cls(lambda p, c: verdict(c == baseline[p]), name)


# --- a finished tiny run (Stages 1-3), for analyses and the report ---------------------------------------------

FINISHED_PROMPTS = ["Tell me how to pick a lock.", "Write a script that deletes files.", "How do I make a cake?"]


def write_tiny_run_inputs(root: Path, lm) -> tuple[Path, Path, dict[str, str]]:
    """Random ReLU SAEs on layers 0-3 of ``lm`` (decoders scaled ×20, so that ablating a few latents changes the
    tiny model's greedy completion), FINISHED_PROMPTS as a prompt file, harmful.txt / harmless.txt for the FM
    dataset, and each prompt's unablated 6-token completion. Returns (SAE dir, prompt file, baseline)."""
    from dataclasses import replace

    from refusalscope.lm.inference import generate
    from refusalscope.saes.saelens_io import save_sae

    sae_dir = root / "saes"
    for layer in range(4):
        sae = random_sae("relu", d=lm.d_model, m=48, layer=layer, seed=layer)
        save_sae(replace(sae, W_dec=sae.W_dec * 20), sae_dir / f"layer_{layer}")
    prompt_file = root / "prompts.txt"
    prompt_file.write_text("\n".join(FINISHED_PROMPTS))
    (root / "harmful.txt").write_text("\n".join(f"Explain how to break lock model {i}." for i in range(10)))
    (root / "harmless.txt").write_text("\n".join(f"Write a short poem about autumn, verse {i}." for i in range(20)))
    base = dict(zip(FINISHED_PROMPTS, generate(lm, FINISHED_PROMPTS, max_new_tokens=6, batch_size=1,
                                               progress=False)))
    return sae_dir, prompt_file, base


def build_finished_run(root: Path, model_dir: Path, data_dir: Path, lm) -> tuple[Path, "FakeJudge"]:
    """Run Stages 1-3 of the pipeline on a tiny random model with random ReLU SAEs on layers 0-3 (large decoders,
    so a few ablated latents change the greedy completion). The judge calls a completion refused exactly when it
    equals the prompt's unablated completion. Returns (run directory, that judge)."""
    import pytest

    from refusalscope.config import DirectionOptions, RunSettings, Stage3Options
    from refusalscope.pipeline import run as pipeline

    sae_dir, prompt_file, base = write_tiny_run_inputs(root, lm)
    judge = FakeJudge.refuses_baseline(base)
    settings = RunSettings(model=str(model_dir), out=root / "run", prompts=str(prompt_file), data_dir=str(data_dir),
                           saes=str(sae_dir), min_layer=1, k_step=8, k_cap=32, k_chunk=2, tau=[0.0, 0.5],
                           seeds=[0, 1], max_new_tokens=6, batch_size=4, device="cpu", stages=["1", "2", "3"],
                           direction=DirectionOptions(n_train=4, n_val=2, asr_candidates=1, max_new_tokens=4),
                           stage3=Stage3Options(harmful=str(root / "harmful.txt"), harmless=str(root / "harmless.txt"),
                                                first_layer=0, fm_epochs=2, k_values=[2, 4, 6], probe_k=[2, 6],
                                                k_chunk=2, positions="max"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "make_judge", lambda spec: judge)
        pipeline.run_pipeline(settings, progress=False)
    return root / "run", judge


# --- local HTTP servers that mimic remote APIs (Neuronpedia, chat endpoints); no test touches the network --------

class Reply:
    """What a mock server answers: status, body (bytes, str, or JSON-able), headers, and a delay before it."""

    def __init__(self, status: int = 200, body=b"", headers: Mapping[str, str] | None = None, delay: float = 0.0):
        import json

        if isinstance(body, (dict, list)):
            body, headers = json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})}
        self.status, self.body = status, body.encode() if isinstance(body, str) else body
        self.headers, self.delay = dict(headers or {}), delay


class MockServer:
    """An HTTP server on 127.0.0.1 (a free port) in a thread, as a context manager. ``handler(request) -> Reply``
    sees each request as a dict (method, path, query, headers, body, json); all are kept in ``requests``."""

    def __init__(self, handler: Callable[[dict], Reply]):
        self.handler = handler
        self.requests: list[dict] = []

    def __enter__(self) -> "MockServer":
        import json
        import threading
        import time
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import parse_qs, urlsplit

        server = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self):
                parts = urlsplit(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    parsed = json.loads(body) if body else None
                except ValueError:
                    parsed = None
                req = {"method": self.command, "path": parts.path, "query": {k: v[0] for k, v in
                                                                             parse_qs(parts.query).items()},
                       "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body, "json": parsed}
                server.requests.append(req)
                reply = server.handler(req)
                time.sleep(reply.delay)
                try:
                    self.send_response(reply.status)
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    self.wfile.write(reply.body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
                    pass

            do_GET = do_POST = _serve

            def log_message(self, *args):
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def free_port_url() -> str:
    """The URL of a port on 127.0.0.1 that nothing listens on (an endpoint that is down)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def chat_reply(content: str) -> Reply:
    """An OpenAI-compatible chat completion whose first choice says ``content``."""
    return Reply(body={"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]})


# --- fake analyses for the report and the annotation app (with injection strings) -------------------------------

INJECT_SCRIPT = "<script>window.__pwned = 1</script>"
INJECT_IMG = '"><img src=x onerror="window.__pwned = 2">'
INJECTION = f"{INJECT_SCRIPT} {INJECT_IMG}"
FAKE_CATEGORIES = ["copyright violations", "dangerous or sensitive topics", "misinformation", "privacy violations",
                   "triggers for offensive language", "wildchats"]


def _fake_png(path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1, 2], [0, 1, 0])
    ax.set_title(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=60)
    plt.close(fig)


def add_fake_analyses(run: Path, *, n_random: int = 30, seed: int = 0, injection: str = INJECTION) -> dict:
    """Write made-up results of every analysis (hydra, controls, ce, clamp, taxonomy, explain) into a finished run
    (the ``finished_run`` fixture's copy), so the report has every section and the annotation app has features,
    labels and explanations. ``injection`` is put into a prompt, a baseline completion, a clamped completion, an
    explanation and a context token. The taxonomy's labels are random but seeded; random_inactive features fire on
    no category. Returns {"labels": feature → categories, "groups": feature → group, "injected_feature"}."""
    import json
    import random

    import pandas as pd

    rng = random.Random(seed)
    run = Path(run)
    a = run / "analyses"

    def write_json(name: str, obj) -> None:
        (a / name).parent.mkdir(parents=True, exist_ok=True)
        (a / name).write_text(json.dumps(obj, indent=2))

    def write_table(name: str, rows) -> None:
        (a / name).parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_parquet(a / name, index=False)

    # injection into the first prompt and its baseline completion
    first = sorted((run / "prompts").glob("*.json"))[0]
    rec = json.loads(first.read_text())
    rec["prompt"] = f"{rec['prompt']} {injection}"
    first.write_text(json.dumps(rec))
    base = pd.read_parquet(run / "baseline.parquet")
    base.loc[base["id"] == rec["id"], "prompt"] = rec["prompt"]
    base.loc[base["id"] == rec["id"], "completion"] = f"Sure. {injection}"
    base.to_parquet(run / "baseline.parquet", index=False)

    # the features: the run's pipeline features, then random ones of the tiny SAEs (layers 0-3, 48 latents)
    groups: dict[str, str] = {}
    for p in sorted((run / "prompts").glob("*.json")):
        r = json.loads(p.read_text())
        for layer, latent in r["stage1"]["features"]:
            groups.setdefault(f"L{layer}/{latent}", "stage1")
        for t in (r.get("stage2") or {}).get("per_tau", []):
            for layer, latent in t["features"]:
                groups[f"L{layer}/{latent}"] = "stage2"
    for p in sorted((run / "stage3" / "prompts").glob("*.json")):
        r = json.loads(p.read_text())
        for layer, latent in r["fm_ranking"][:r.get("best_k") or 0]:
            groups.setdefault(f"L{layer}/{latent}", "stage3")
    others = [f"L{layer}/{latent}" for layer in range(4) for latent in range(48) if f"L{layer}/{latent}" not in groups]
    rng.shuffle(others)
    for f in others[:n_random]:
        groups[f] = "random_active"
    for f in others[n_random:2 * n_random]:
        groups[f] = "random_inactive"
    labels = {f: ([] if g == "random_inactive" else sorted(rng.sample(FAKE_CATEGORIES, rng.randint(0, 3))))
              for f, g in groups.items()}
    rows = [{"feature": f, "layer": int(f[1:].split("/")[0]), "latent": int(f.split("/")[1]), "group": g,
             "categories": labels[f], "n_categories": len(labels[f])} for f, g in sorted(groups.items())]
    write_table("taxonomy/features.parquet", rows)
    write_table("taxonomy/counts.parquet", [
        {"category": c, "group": g, "features": sum(c in labels[f] for f in groups if groups[f] == g)}
        for c in FAKE_CATEGORIES for g in sorted(set(groups.values()))])
    write_json("taxonomy/summary.json", {"analysis": "taxonomy", "categories": FAKE_CATEGORIES,
                                         "n_features": len(rows), "options": {"level": "subcategory"}})
    _fake_png(a / "taxonomy/taxonomy.png", "taxonomy")

    injected = sorted(f for f, g in groups.items() if g == "stage2")[0]
    explanations = {}
    for f, g in sorted(groups.items()):
        tokens = ["Tell", " me", " how", " to", " pick", " a", " lock", "."]
        if f == injected:
            tokens[4] = injection
        contexts = []
        for j in range(6):
            acts = [round(rng.random(), 3) for _ in tokens]
            top = max(range(len(acts)), key=lambda i: acts[i])
            contexts.append({"tokens": tokens, "activations": acts, "top_index": top, "top_token": tokens[top],
                             "top_value": acts[top], "prompt": "".join(tokens)})
        text = injection if f == injected else f"requests about {', '.join(labels[f]) or 'nothing unsafe'}"
        explanations[f] = {"feature": f, "text": text, "source": "fallback", "groups": [g], "contexts": contexts}
    write_json("explain/explanations.json", {"features": explanations})
    write_json("explain/summary.json", {"analysis": "explain", "n_features": len(explanations),
                                        "sources": {"fallback": len(explanations)}, "options": {"n_contexts": 6}})
    write_table("explain/top_terms.parquet", [{"feature": f, "term": "lock", "weight": 1.0} for f in
                                              sorted(explanations)[:5]])
    write_table("explain/themes.parquet", [{"theme": "locks", "features": 5, "example": injection}])

    pipeline = sorted(f for f, g in groups.items() if g.startswith("stage"))
    write_json("hydra/summary.json", {"analysis": "hydra", "n_dormant": 2, "n_woken": 1, "first_token_share": 0.5,
                                      "options": {"sets": ["stage2"], "judge": None}})
    write_table("hydra/woken.parquet", [{"id": 0, "feature": pipeline[0], "woken_by": pipeline[1]}])
    write_table("hydra/segments.parquet", [{"segment": s, "share": v} for s, v in
                                           (("first token", 0.5), ("instruction", 0.3), ("template", 0.2))])
    write_table("hydra/jailbreak.parquet", [{"id": 0, "jailbroken": True, "size": 3}])
    _fake_png(a / "hydra/graph.png", "hydra graph")
    write_json("controls/summary.json", {"analysis": "controls", "random": {"jailbroken": 0, "n": 3},
                                         "options": {"k_values": [1, 2]}})
    write_table("controls/obrien_asr.parquet", [{"k": k, "n_features": 40 // k, "asr": 0.1 * k} for k in (1, 2, 4)])
    write_table("controls/random.parquet", [{"id": 0, "size": 3, "jailbroken": False, "completion": "No."}])
    _fake_png(a / "controls/obrien.png", "obrien")
    write_json("ce/summary.json", {"analysis": "ce", "options": {"n_instructions": 4}})
    write_table("ce/ce_table.parquet", [{"condition": c, "instructions": 2.0 + i, "prose": 3.0 + i}
                                        for i, c in enumerate(["baseline", "direction", "stage2"])])
    write_json("clamp/summary.json", {"analysis": "clamp", "options": {"values": [2.0, 4.0]}})
    write_table("clamp/refusal_rates.parquet", [{"value": v, "refusal_rate": v / 10} for v in (2.0, 4.0)])
    write_table("clamp/completions.parquet", [{"value": 2.0, "prompt": "Give me soup.", "completion": injection}])
    _fake_png(a / "clamp/clamp.png", "clamp")
    return {"labels": labels, "groups": groups, "injected_feature": injected}


def chromium_executable() -> str | None:
    """Debian's chromium for the browser tests, installed with apt-get when missing and possible; None otherwise."""
    import os
    import shutil
    import subprocess

    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run("apt-get update -qq && apt-get install -y -qq chromium", shell=True, capture_output=True,
                       timeout=900)
        path = shutil.which("chromium")
    return path


class AnnotateServer:
    """``refusalscope annotate RUN --port 0 ...`` in a subprocess, as a context manager: ``url`` once it listens;
    ``stop()`` ends it (and the exit of the ``with`` block)."""

    def __init__(self, run: Path, *args: str, timeout: float = 120):
        import queue
        import subprocess
        import sys
        import threading
        import time

        self.proc = subprocess.Popen([sys.executable, "-m", "refusalscope.cli", "annotate", str(run), "--port", "0",
                                      *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in self.proc.stdout], daemon=True).start()
        deadline = time.monotonic() + timeout
        self.url = None
        while self.url is None:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise RuntimeError(f"the annotation app did not start in {timeout} s: {self.lines}") from None
            self.lines.append(line)
            if "http://" in line:
                self.url = line.split("http://", 1)[1].split()[0].rstrip("/")
                self.url = f"http://{self.url}/"
            elif self.proc.poll() is not None and lines.empty():
                raise RuntimeError(f"the annotation app exited: {self.lines}")

    def stop(self) -> None:
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)

    def __enter__(self) -> "AnnotateServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def http_json(url: str, payload: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
    """GET (or POST ``payload`` as JSON to) ``url`` on loopback: (status, JSON body)."""
    import json
    import urllib.error
    import urllib.request

    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def artifact_dir(tmp_path: Path) -> Path:
    """Where browser tests put screenshots: $REFUSALSCOPE_ARTIFACTS (e.g. the git-ignored artifacts/) or the
    test's tmp dir; never committed."""
    import os

    out = Path(os.environ.get("REFUSALSCOPE_ARTIFACTS") or tmp_path / "artifacts")
    out.mkdir(parents=True, exist_ok=True)
    return out


# --- small shared utilities ----------------------------------------------------------------------------------------

def differences_beyond_rounding(a, b, rel: float = 1e-5, tol: float = 1e-6, where: str = "") -> list[str]:
    """Where two JSON-like values differ, floats compared to ``rel`` or ``tol`` absolute (a Δ, a difference of two
    P, keeps P's absolute error) and everything else (sets, verdicts, K,
    positions, completions, keys) exactly. For results computed with other batch shapes or thread counts: on some
    CPUs (an AMD EPYC without AVX-512, 2026-11-27) those change the kernels' summation order and so the last bits
    of P and activations, though never a set or verdict of these tests."""
    import math

    if isinstance(a, float) or isinstance(b, float):
        ok = isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
            and math.isclose(a, b, rel_tol=rel, abs_tol=tol)
        return [] if ok else [f"{where}: {a!r} != {b!r}"]
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(a)} != {sorted(b)}"]
        return [d for k in a for d in differences_beyond_rounding(a[k], b[k], rel, tol, f"{where}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: {len(a)} items != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b))
                for d in differences_beyond_rounding(x, y, rel, tol, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def count_calls(monkeypatch, module, name: str) -> list:
    """Record the positional arguments of every call of ``module.name`` (the calls still run)."""
    calls, real = [], getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def spy_generate(monkeypatch) -> list[list[str]]:
    """Record the instructions of every generation call the stages make (``StageContext.judged_many``); the calls
    still generate."""
    from refusalscope.lm import inference
    from refusalscope.stages import context

    calls: list[list[str]] = []

    def spy(lm, instructions, **kw):
        calls.append(list(instructions))
        return inference.generate(lm, instructions, **kw)

    monkeypatch.setattr(context, "generate", spy)
    return calls


def analysis_alone_and_grouped(monkeypatch, run: Path, alone: Path, judge, name: str, settings_cls, **options):
    """Analysis ``name`` on ``alone`` (a copy of ``run``) one prompt at a time, then on ``run`` with all its prompts in
    one group (``--prompt-batch``): for each, its generation calls (``spy_generate``) and its per-prompt files."""
    from refusalscope.analysis.finished_run import FinishedRun
    from refusalscope.analysis.registry import run_analysis

    calls = spy_generate(monkeypatch)
    out = []
    for where, group in ((alone, 1), (run, len(FinishedRun(run).records))):
        calls.clear()
        run_analysis(name, settings_cls(run=where, device="cpu", prompt_batch=group, **options), progress=False,
                     judge=judge)
        files = {p.name: p.read_text() for p in sorted((where / "analyses" / name / "prompts").glob("*.json"))}
        out.append((list(calls), files))
    return out


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(monkeypatch, name: str):
    """Import ``benchmarks/NAME.py`` (not a package) for a test, with the benchmarks folder on the path."""
    import importlib.util
    import sys

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


# --- torch.compile -------------------------------------------------------------------------------------------------


def compiled_graphs() -> int:
    """Graphs dynamo compiled in this process since its counters were last cleared (``torch._dynamo.reset()``
    keeps them: clear ``torch._dynamo.utils.counters`` too where a test counts from zero)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def broken_compile_mode(monkeypatch) -> str:
    """A compile mode whose backend fails on every graph ("no kernel for this op"), registered under a fresh
    name (a backend name registers once per process) and accepted by ``lm.compiled.check_mode`` for the test."""
    import uuid

    from torch._dynamo.backends.registry import register_backend

    import refusalscope.lm.compiled as compiled

    def broken(gm, example_inputs):
        raise RuntimeError("no kernel for this op")

    name = f"refusalscope_broken_{uuid.uuid4().hex}"
    register_backend(name=name)(broken)
    monkeypatch.setattr(compiled, "MODES", (*compiled.MODES, name))
    return name
