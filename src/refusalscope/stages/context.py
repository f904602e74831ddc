"""What every stage and analysis shares for one run: the model, the SAE set, the judge, generation settings and a
cache of completions per ablated set (the way heretic's scorers share one context), so each call carries only
what is specific to it (a prompt, a set of features)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from refusalscope.interventions.latents import LatentAblation
from refusalscope.judges import Judge, Verdict
from refusalscope.lm.inference import generate
from refusalscope.lm.loading import LoadedModel
from refusalscope.saes.features import Feature, active_features, as_latent_set, features_of
from refusalscope.saes.sae import Sae
from refusalscope.stages.scoring import SetScorer, prompt_scorer


# A per-prompt piece of stage logic written as a generator: it yields the (prompt, ablated set) pairs it needs
# judged, receives their ``Judged`` results, and returns its result; ``StageContext.lockstep`` runs many at once.
Flow = Generator[list[tuple[str, list]], list["Judged"], object]


@dataclass(frozen=True)
class Judged:
    """One generated completion under an ablated set, and the judge's verdict on it."""

    completion: str
    verdict: Verdict

    @property
    def jailbroken(self) -> bool:
        return self.verdict.jailbroken

    def as_dict(self) -> dict:
        return {"completion": self.completion, **self.verdict.as_dict()}


def set_key(features: Iterable) -> tuple[Feature, ...]:
    """The canonical form of an ablated set: sorted, duplicates dropped."""
    return tuple(sorted(set(features_of(features))))


class CompletionCache:
    """Completions keyed by (prompt, ablated set, generation settings); in memory, or in a SQLite file of the run
    store so every stage and analysis of a run, and a resumed run, reuses what was generated once.

    Verdicts are not cached: the judge is cheap next to generation and may change between commands.
    """

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else None
        self._mem: dict[str, str] = {}
        self._lock = threading.Lock()
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as db:
                db.execute("CREATE TABLE IF NOT EXISTS completions (key TEXT PRIMARY KEY, prompt TEXT, features TEXT, "
                           "settings TEXT, completion TEXT)")

    def _connect(self) -> sqlite3.Connection:
        # the default rollback journal, not WAL: no side files in the run directory, and it works on shared
        # filesystems; writers wait up to a minute for each other
        return sqlite3.connect(self.path, timeout=60)

    @staticmethod
    def key(prompt: str, features: Sequence[Feature], settings: Mapping) -> str:
        blob = json.dumps([prompt, [list(f) for f in features], dict(sorted(settings.items()))])
        return hashlib.sha256(blob.encode()).hexdigest()

    def get_many(self, keys: Sequence[str]) -> dict[str, str]:
        found = {k: self._mem[k] for k in keys if k in self._mem}
        missing = [k for k in keys if k not in found]
        if self.path and missing:
            with self._lock, self._connect() as db:
                for start in range(0, len(missing), 500):
                    part = missing[start:start + 500]
                    marks = ",".join("?" * len(part))
                    rows = db.execute(f"SELECT key, completion FROM completions WHERE key IN ({marks})",
                                      part).fetchall()
                    found.update(dict(rows))
        return found

    def put_many(self, items: Sequence[tuple[str, str, Sequence[Feature], Mapping, str]]) -> None:
        """Items of (key, prompt, features, settings, completion)."""
        for k, *_, completion in items:
            self._mem[k] = completion
        if self.path and items:
            with self._lock, self._connect() as db:
                db.executemany("INSERT OR REPLACE INTO completions VALUES (?, ?, ?, ?, ?)",
                               [(k, p, json.dumps([str(f) for f in fs]), json.dumps(dict(s)), c)
                                for k, p, fs, s, c in items])


@dataclass
class StageContext:
    """The model, SAEs, judge and settings of a run, and the calls the stages make with them."""

    lm: LoadedModel
    saes: Mapping[int, Sae]
    judge: Judge
    max_new_tokens: int = 48
    batch_size: int = 16  # completions per generation batch
    # sets per scoring forward; our choice: 64 on CPU (memory-bound), 1,024 on a GPU (fills an H100 at 2B shapes)
    score_batch_size: int | None = None
    cache: CompletionCache = field(default_factory=CompletionCache)
    # Stage 2 skips chain steps whose block did not fire (exact); None: our choice, on CPU when rows are not shared
    # only: shared rows already run a silent step in its predecessor's row, and skipping then gained nothing
    # measurable on CPU (RESULTS.md); a GPU scores ~1,000 sets per forward anyway
    skip_inactive: bool | None = None
    # Stage-2 scoring: sets that agree on the latents that fired so far share a batch row
    # (``interventions.shared_rows``); our choice: on everywhere, since it only removes duplicate rows (1.5x on
    # Stage 2 on CPU, RESULTS.md; on a GPU not measured yet: gpu_checks.sh rows)
    share_rows: bool = True
    # stop a generation once the judge's verdict cannot change (``Judge.decided``): exact verdicts, shorter
    # completions; our choice: off, since stored completions are read by people (samples in reports)
    early_stop: bool = False
    # decode with a static cache and a compiled step (``lm.compiled.MODES``); ablations are padded to bucketed
    # shapes so compiled steps are reused; a run resolves its "auto" first (``lm.compiled.choose_mode``)
    compile: str = "off"
    # Stage-2 scoring forwards through compiled decoder layers (``lm.compiled_layers``; a mode of
    # ``lm.compiled.MODES``)
    compile_scoring: str = "off"
    # the dtype the run holds its SAE set in (``saes.placement.HOST_DTYPES``): bfloat16 rounds the weights, so it
    # names itself in the completion cache key (float32 does not, so older cached completions stay valid)
    sae_dtype: str = "float32"
    _clean: dict = field(default_factory=dict, repr=False)  # prompt -> its clean activations (``activations``)
    _clean_kept: int = field(default=4, repr=False)  # how many prompts' clean activations are kept

    @property
    def scoring_batch(self) -> int:
        if self.score_batch_size:
            return self.score_batch_size
        return 1024 if torch.device(self.lm.device).type == "cuda" else 64

    def skips_inactive(self, scorer: SetScorer | None = None) -> bool:
        """Whether Stage 2 skips silent chain steps with ``scorer`` (default: as a scorer of this context would)."""
        if self.skip_inactive is not None:
            return self.skip_inactive
        shares = scorer.shares_rows if scorer is not None else self.share_rows
        return torch.device(self.lm.device).type != "cuda" and not shares

    @property
    def generation_settings(self) -> dict:
        """What a completion depends on besides prompt and set (part of its cache key). An early-stopped
        completion names the judge that stopped it: it is complete only for that judge's verdict."""
        out = {"max_new_tokens": self.max_new_tokens, "dtype": str(self.lm.dtype), "greedy": True}
        if self.early_stop:
            out["stopped_by"] = self.judge.name
        if self.compile != "off":  # other kernels: in bf16 a greedy token may differ from the eager one's
            out["compiled"] = self.compile
        if self.sae_dtype == "bfloat16":
            out["sae_dtype"] = self.sae_dtype
        return out

    @property
    def eager_generation_settings(self) -> dict:
        """``generation_settings`` of a completion this context decodes eagerly whatever its compile mode (the
        analyses' generations without ablation hooks: a compiled step for them would be a graph of its own)."""
        return {k: v for k, v in self.generation_settings.items() if k != "compiled"}

    def judged(self, prompt: str, sets: Sequence[Iterable]) -> list[Judged]:
        """Ablate each set (one generation row per distinct set, all in one batch), generate, judge.

        Identical sets are generated once; sets already in the cache are not generated again.
        """
        return self.judged_many([(prompt, x) for x in sets])

    def judged_many(self, requests: Sequence[tuple[str, Iterable]]) -> list[Judged]:
        """``judged`` for (prompt, set) pairs of any prompts: the rows of every prompt share generation batches
        (a GPU decodes 100 rows in about the time of 5), each row its own prompt and ablation."""
        keys = [(p, set_key(x)) for p, x in requests]
        settings = self.generation_settings
        cache_keys = {k: self.cache.key(k[0], k[1], settings) for k in dict.fromkeys(keys)}
        known = self.cache.get_many(list(cache_keys.values()))
        todo = [k for k, ck in cache_keys.items() if ck not in known]
        if todo:
            stop = self.judge.decided if self.early_stop else None
            ablation = LatentAblation.build(self.saes, [as_latent_set(k) for _, k in todo], device=self.lm.device)
            if self.compile != "off":
                ablation = ablation.padded(self.saes, len(todo), self.lm.device)
            outs = generate(self.lm, [p for p, _ in todo], max_new_tokens=self.max_new_tokens,
                            batch_size=self.batch_size, progress=False, stop=stop, interventions=[ablation],
                            compile=self.compile)
            self.cache.put_many([(cache_keys[k], k[0], k[1], settings, o) for k, o in zip(todo, outs)])
            known.update({cache_keys[k]: o for k, o in zip(todo, outs)})
        uniq = list(cache_keys)
        completions = [known[cache_keys[k]] for k in uniq]
        verdicts = dict(zip(uniq, self.judge.judge([p for p, _ in uniq], completions))) if uniq else {}
        return [Judged(known[cache_keys[k]], verdicts[k]) for k in keys]

    def lockstep(self, flows: Sequence[Flow]) -> list:
        """Run several prompts' flows together, each round's requests of all of them through one ``judged_many``
        (so a GPU decodes every prompt's rows in shared batches); the flows' results, in order. A flow's result
        does not depend on the others it runs with: each gets exactly the verdicts of its own requests."""
        results: list = [None] * len(flows)
        pending: dict[int, list] = {}
        self._clean_kept = max(4, len(flows))  # every flow's clean activations stay cached while they run

        def advance(i: int, sent) -> None:
            try:
                pending[i] = flows[i].send(sent)
            except StopIteration as stop:
                results[i] = stop.value

        for i in range(len(flows)):
            advance(i, None)
        while pending:
            round_ = list(pending.items())
            pending.clear()
            judged = self.judged_many([req for _, reqs in round_ for req in reqs])
            at = 0
            for i, reqs in round_:
                advance(i, judged[at:at + len(reqs)])
                at += len(reqs)
        return results

    def scorer(self, prompt: str, candidates: Sequence[Feature]) -> SetScorer:
        """P(refusal) of ``prompt`` under any subsets of ``candidates``, shared work prepared once."""
        return prompt_scorer(self.lm, prompt, self.saes, candidates, batch_size=self.scoring_batch,
                             share_rows=self.share_rows, compile=self.compile_scoring)

    def activations(self, prompt: str, features: Iterable[Feature] | None = None,
                    ablate: Iterable[Feature] = ()) -> dict[Feature, float]:
        """Max activation over the prompt's positions (only firing features when ``features`` is None).

        The clean activations of every feature (no ``features``, nothing ablated: a full encode of every layer,
        asked for by the Stage-2 checks and again by Stage 3) are kept for the last few prompts (at least as many
        as run in a lockstep)."""
        ablate = list(ablate)
        if features is not None or ablate:
            return active_features(self.lm, prompt, self.saes, features, ablate=ablate)
        if prompt not in self._clean:
            while len(self._clean) >= self._clean_kept:
                self._clean.pop(next(iter(self._clean)))
            self._clean[prompt] = active_features(self.lm, prompt, self.saes)
        return dict(self._clean[prompt])
