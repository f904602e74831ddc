"""Neuronpedia explanations of published SAE features: the feature endpoint and the bulk exports, behind one cache.

- Feature endpoint: ``GET {api}/api/feature/{modelId}/{source}/{index}`` → JSON with ``explanations``
  ([{description, ...}]) and ``activations`` ([{tokens, values, maxValue, maxValueTokenIndex}]). An API key, when
  set in ``NEURONPEDIA_API_KEY``, goes in the ``x-api-key`` header (reads work without one).
- Bulk exports (Neuronpedia asks heavy users to prefer them): the public bucket ``{exports}/v1/{modelId}/{source}/
  explanations/batch-N.jsonl.gz``, one JSON object per line with ``index`` and ``description``; listed through the
  bucket's S3 ``list-type=2`` listing.
- Everything fetched is cached on disk (the API's JSON per feature, the export files as downloaded), and
  ``offline=True`` answers from the cache only, naming what is missing.

Our SAE sets map to Neuronpedia ids through ``saes.registry`` (``SaeSetEntry.neuronpedia_id``), e.g.
``gemmascope-res-16k`` layer 20 → ``gemma-2-2b/20-gemmascope-res-16k``.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from refusalscope.errors import RefusalScopeError
from refusalscope.explain.client import EndpointError, api_key, json_of, make_session, request
from refusalscope.explain.records import TopContext
from refusalscope.store import RunStore

log = logging.getLogger(__name__)

DEFAULT_API = "https://www.neuronpedia.org"
DEFAULT_EXPORTS = "https://neuronpedia-datasets.s3.us-east-1.amazonaws.com"
EXPORTS_VERSION = "v1"
KEY_ENV = ("NEURONPEDIA_API_KEY",)


class MissingExplanation(RefusalScopeError):
    """Offline and not in the cache, or Neuronpedia has nothing for the feature."""


@dataclass(frozen=True)
class NeuronpediaFeature:
    model: str
    source: str
    index: int
    text: str | None  # the first non-empty explanation, None when Neuronpedia has none
    contexts: list[TopContext] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.model}/{self.source}/{self.index}"


def split_id(neuronpedia_id: str) -> tuple[str, str]:
    """'gemma-2-2b/20-gemmascope-res-16k' -> ('gemma-2-2b', '20-gemmascope-res-16k')."""
    model, sep, source = neuronpedia_id.partition("/")
    if not sep or not model or not source or "/" in source:
        raise RefusalScopeError(f"not a Neuronpedia source id {neuronpedia_id!r}; expected MODEL/SOURCE, e.g. "
                                "gemma-2-2b/20-gemmascope-res-16k")
    return model, source


def sources_for_run(saes_record: Mapping, layers: Sequence[int], template: str | None = None) -> dict[int, str]:
    """Neuronpedia ``model/source`` per layer for the run's SAE set (``saes.json``): ``template`` (with
    ``{layer}``) if given, else the registry's, else the ids saes.json recorded from the SAEs' SAELens metadata;
    empty for SAE sets Neuronpedia does not have (e.g. ours)."""
    from refusalscope.saes.registry import SAE_SETS

    if template:
        if "{layer}" not in template:
            raise RefusalScopeError(f"--neuronpedia-source {template!r} must contain {{layer}}")
        out = {layer: template.format(layer=layer) for layer in layers}
    else:
        entry = SAE_SETS.get(str(saes_record.get("spec", "")))
        recorded = saes_record.get("neuronpedia") or {}  # per layer, from a SAELens release's metadata
        if entry is not None and entry.neuronpedia_template is not None:
            out = {layer: entry.neuronpedia_id(layer) for layer in layers}
        elif isinstance(recorded, Mapping) and all(str(layer) in recorded for layer in layers):
            out = {layer: str(recorded[str(layer)]) for layer in layers}
        else:
            return {}
    for value in out.values():
        split_id(value)
    return out


def explanation_text(feature_json: Mapping) -> str | None:
    for e in feature_json.get("explanations") or []:
        text = (e.get("description") or "").strip() if isinstance(e, Mapping) else ""
        if text:
            return text
    return None


def contexts_from_feature_json(feature_json: Mapping, n: int, before: int, after: int) -> list[TopContext]:
    """The ``n`` strongest of Neuronpedia's activation records, cut to ``before``/``after`` tokens around the max."""
    out = []
    acts = [a for a in feature_json.get("activations") or [] if isinstance(a, Mapping) and a.get("tokens")]
    for a in sorted(acts, key=lambda a: -float(a.get("maxValue") or 0))[:n]:
        tokens, values = list(a["tokens"]), [float(v) for v in a.get("values") or []]
        if len(values) != len(tokens):
            continue
        top = int(a.get("maxValueTokenIndex", max(range(len(values)), key=values.__getitem__)))
        lo, hi = max(0, top - before), min(len(tokens), top + after + 1)
        out.append(TopContext(tokens=tokens[lo:hi], activations=values[lo:hi], top_index=top - lo,
                              top_token=tokens[top], top_value=values[top], prompt="".join(tokens)))
    return out


class NeuronpediaClient:
    """Explanations of Neuronpedia features, from the API or the bulk exports, cached under ``cache_dir``."""

    def __init__(self, cache_dir: str | Path, *, api_url: str = DEFAULT_API, exports_url: str = DEFAULT_EXPORTS,
                 offline: bool = False, retries: int = 4, backoff: float = 1.0, timeout: float = 30.0,
                 key_env: Sequence[str] = KEY_ENV):
        self.cache = Path(cache_dir).expanduser()
        self.api_url, self.exports_url = api_url.rstrip("/"), exports_url.rstrip("/")
        self.offline, self.retries, self.timeout = offline, retries, timeout
        self.key_env = tuple(key_env)
        self._session = None if offline else make_session(retries, backoff)
        self._exports: dict[tuple[str, str], dict[int, str]] = {}

    # ---- the feature endpoint -------------------------------------------------------------------------------------

    def _feature_path(self, model: str, source: str, index: int) -> Path:
        return self.cache / "features" / model / source / f"{int(index)}.json"

    def feature_json(self, model: str, source: str, index: int) -> dict:
        """The endpoint's JSON for one feature (``{}`` when Neuronpedia has no such feature), cached."""
        path = self._feature_path(model, source, index)
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError:
                path.unlink()  # a damaged cache entry is fetched again
        if self.offline:
            raise MissingExplanation(f"Neuronpedia feature {model}/{source}/{index} is not in the cache "
                                     f"({self.cache}); rerun without --offline once to fetch it")
        url = f"{self.api_url}/api/feature/{quote(model)}/{quote(source)}/{int(index)}"
        key = api_key(self.key_env)
        headers = {"Accept": "application/json", **({"x-api-key": key} if key else {})}
        resp = request(self._session, "GET", url, what="Neuronpedia", timeout=self.timeout, retries=self.retries,
                       headers=headers, ok=(404,))
        data = {} if resp.status_code == 404 else json_of(resp, "Neuronpedia")
        if not isinstance(data, dict):
            raise EndpointError(f"Neuronpedia: {url} returned JSON that is not an object")
        # keep only what we read: the response may be large (logits, histograms)
        kept = {k: data[k] for k in ("modelId", "layer", "index", "explanations", "activations") if k in data}
        RunStore(path.parent).write_json(path.name, kept)
        return kept

    def feature(self, model: str, source: str, index: int, *, n_contexts: int = 5, before: int = 10,
                after: int = 3) -> NeuronpediaFeature:
        data = self.feature_json(model, source, index)
        return NeuronpediaFeature(model, source, int(index), explanation_text(data),
                                  contexts_from_feature_json(data, n_contexts, before, after))

    # ---- the bulk exports -----------------------------------------------------------------------------------------

    def _export_dir(self, model: str, source: str) -> Path:
        return self.cache / "exports" / model / source / "explanations"

    def _list_export(self, model: str, source: str) -> list[str]:
        prefix = f"{EXPORTS_VERSION}/{model}/{source}/explanations/"
        keys, token = [], None
        while True:
            params = {"list-type": "2", "prefix": prefix, **({"continuation-token": token} if token else {})}
            resp = request(self._session, "GET", f"{self.exports_url}/", what="Neuronpedia exports",
                           timeout=self.timeout, retries=self.retries, params=params)
            try:
                root = ET.fromstring(resp.content)
            except ET.ParseError:
                raise EndpointError(f"Neuronpedia exports: the listing of {prefix} is not valid XML") from None
            ns = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
            keys += [k.text for k in root.iter(f"{ns}Key") if k.text and k.text.endswith(".jsonl.gz")]
            truncated = (root.findtext(f"{ns}IsTruncated") or "false").lower() == "true"
            token = root.findtext(f"{ns}NextContinuationToken")
            if not truncated or not token:
                break
        if not keys:
            raise MissingExplanation(f"Neuronpedia exports have no explanations for {model}/{source} "
                                     f"({self.exports_url}/{prefix})")
        return sorted(keys)

    def export_files(self, model: str, source: str) -> list[Path]:
        """The export's explanation files, downloaded once into the cache (a manifest marks a complete set)."""
        folder = self._export_dir(model, source)
        manifest = folder / "manifest.json"
        if manifest.is_file():
            names = json.loads(manifest.read_text())["files"]
            if all((folder / n).is_file() for n in names):
                return [folder / n for n in names]
        if self.offline:
            raise MissingExplanation(f"the Neuronpedia exports for {model}/{source} are not in the cache "
                                     f"({folder}); rerun without --offline once to download them")
        names = []
        for key in self._list_export(model, source):
            name = key.rsplit("/", 1)[-1]
            target = folder / name
            if not target.is_file():
                resp = request(self._session, "GET", f"{self.exports_url}/{quote(key)}", what="Neuronpedia exports",
                               timeout=self.timeout, retries=self.retries)
                _write_bytes(target, resp.content)
            names.append(name)
        RunStore(folder).write_json("manifest.json", {"files": names})
        return [folder / n for n in names]

    def export_explanations(self, model: str, source: str) -> dict[int, str]:
        """index → the first non-empty explanation in the export files of ``model/source``."""
        if (model, source) in self._exports:
            return self._exports[(model, source)]
        out: dict[int, str] = {}
        for path in self.export_files(model, source):
            try:
                with gzip.open(path, "rt", encoding="utf-8") as fh:
                    for line in fh:
                        if not line.strip():
                            continue
                        row = json.loads(line)
                        text = (row.get("description") or "").strip()
                        if text and row.get("index") is not None:
                            out.setdefault(int(row["index"]), text)
            except (OSError, EOFError, json.JSONDecodeError, ValueError, AttributeError) as e:
                path.unlink(missing_ok=True)  # fetched again next time
                (path.parent / "manifest.json").unlink(missing_ok=True)
                raise EndpointError(f"Neuronpedia export file {path.name} of {model}/{source} is damaged "
                                    f"({type(e).__name__}); it was removed from the cache, rerun to fetch it") from None
        self._exports[(model, source)] = out
        return out

    def explanation_from_exports(self, model: str, source: str, index: int) -> str | None:
        return self.export_explanations(model, source).get(int(index))


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
