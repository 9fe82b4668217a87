"""The composite verifiable reward: R = w_acc R_acc + w_fmt R_fmt + w_len R_len.

Our copy of the paper (Rawat et al., 2025) names these components but not their equations; the
equations below are *our reconstruction* (../shared/DESIGN.md, "Rewards"), and every constant is
a `RewardConfig` field (rewards/config.py says where each default comes from).

    R_fmt in [0, 1]   share of five format checks that hold (rewards/parse.py defines them):
                      think block present; it comes first; exactly one action block follows it;
                      nothing but whitespace after the action block; the action body is valid.
    R_len in [0, 1]   w = words inside <think>, [lo, hi] = [length_min_words, length_max_words]:
                      1 if lo <= w <= hi;  w / lo if w < lo;  max(0, 1 - (w - hi) / decay) if w > hi.
    R_acc             wrong or unparsable action kind: wrong_kind_penalty (-1).
                      right kind: 1 + q with q in [0, 1]:
                        tool call  q = S / S_max,  S = [name right] + J + V,  S_max = 2 + |K_gold|,
                                   J = |K_pred ∩ K_gold| / |K_pred ∪ K_gold| (1 when both empty),
                                   V = #{k in K_gold : pred[k] == gold[k] in canonical JSON};
                                   a wrong name makes J and V count 0.
                        answer     q = similarity(predicted text, gold text) in [0, 1].
    R                 w_acc R_acc + [use_format] w_fmt R_fmt + [use_length] w_len R_len.

success: right kind and, for a call, right name and arguments equal in canonical JSON; for an
answer, similarity >= success_similarity.

`components` always holds the raw values "accuracy", "format", "length" (even when a switch keeps
a component out of the total, so logs stay comparable), "think_words", "kind_match" (0/1) and
"similarity_nan" (1 when the backend returned a non-finite score, which is then scored as 0);
right-kind tool calls add "name_match", "key_jaccard", "values_matched" and "arguments_match",
right-kind answers add "similarity".

`score_batch` scores a whole step: all answer pairs go to the similarity backend in one call, and
the backend is loaded only when some pair needs it.

Debug one completion from the command line:

    python -m rewards.score --completion '<think>...</think><answer>Done.</answer>' \\
        --target '{"kind": "answer", "text": "It is done."}' [--similarity lexical] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from rewards.config import RewardConfig
from rewards.parse import Parsed, json_equal, parse
from rewards.similarity import get_similarity

SimilarityFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]


@dataclass(frozen=True)
class RewardResult:
    """The reward of one completion. kind: the predicted action kind; problems: format problems."""

    total: float
    components: dict[str, float]
    success: bool
    kind: str
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total, "success": self.success, "kind": self.kind,
            "components": dict(self.components), "problems": list(self.problems),
        }


def length_reward(think_words: int, config: RewardConfig) -> float:
    """R_len for `think_words` words of reasoning (see module docstring), in [0, 1]."""
    if think_words < config.length_min_words:
        return max(0.0, think_words / config.length_min_words)
    if think_words <= config.length_max_words:
        return 1.0
    return max(0.0, 1.0 - (think_words - config.length_max_words) / config.length_decay_words)


def tool_call_match(call: dict[str, Any], target: dict[str, Any]) -> tuple[float, dict[str, float]]:
    """(q = S / S_max, details) for a predicted call against a tool-call target."""
    gold_arguments = target["arguments"]
    predicted_arguments = call["arguments"]
    name_match = call["name"] == target["name"]
    if name_match:
        gold_keys, predicted_keys = set(gold_arguments), set(predicted_arguments)
        union = gold_keys | predicted_keys
        key_jaccard = len(gold_keys & predicted_keys) / len(union) if union else 1.0
        values_matched = sum(
            1 for key in gold_keys
            if key in predicted_arguments and json_equal(predicted_arguments[key], gold_arguments[key])
        )
        arguments_match = json_equal(predicted_arguments, gold_arguments)
    else:
        key_jaccard, values_matched, arguments_match = 0.0, 0, False
    quality = (float(name_match) + key_jaccard + values_matched) / (2 + len(gold_arguments))
    details = {
        "name_match": float(name_match), "key_jaccard": key_jaccard,
        "values_matched": float(values_matched), "arguments_match": float(arguments_match),
    }
    return quality, details


def score(
    completion: str, target: dict[str, Any], *, config: RewardConfig | None = None,
    similarity: SimilarityFn | str | None = None,
) -> RewardResult:
    """The reward of one completion against its target dict; see `score_batch`."""
    return score_batch([completion], [target], config=config, similarity=similarity)[0]


def score_batch(
    completions: Sequence[str], targets: Sequence[dict[str, Any]], *, config: RewardConfig | None = None,
    similarity: SimilarityFn | str | None = None,
) -> list[RewardResult]:
    """Rewards of completions[i] against targets[i]; never raises on model output.

    similarity: a callable (predictions, golds) -> scores in [0, 1], a backend name for
    `get_similarity`, or None for `config.similarity`.  It is called at most once, with every
    pair whose prediction and target are both answers.
    Raises ValueError for mismatched lengths or a malformed target (data errors, not model output).
    """
    config = config or RewardConfig()
    if len(completions) != len(targets):
        raise ValueError(f"score_batch: {len(completions)} completions but {len(targets)} targets")
    for index, target in enumerate(targets):
        _check_target(target, index)

    parsed = [parse(completion) for completion in completions]
    answer_rows = [
        row for row, (reading, target) in enumerate(zip(parsed, targets))
        if reading.kind == "answer" and target["kind"] == "answer"
    ]
    similarity_of_row: dict[int, float] = {}
    if answer_rows:
        scorer = _resolve_similarity(similarity, config)
        predictions = [parsed[row].answer or "" for row in answer_rows]
        raw_scores = list(scorer(predictions, [targets[row]["text"] for row in answer_rows]))
        if len(raw_scores) != len(answer_rows):
            raise ValueError(f"similarity returned {len(raw_scores)} scores for {len(answer_rows)} pairs")
        similarity_of_row = dict(zip(answer_rows, raw_scores))
    return [
        _result(reading, target, similarity_of_row.get(row), config)
        for row, (reading, target) in enumerate(zip(parsed, targets))
    ]


def _result(reading: Parsed, target: dict[str, Any], raw_similarity: Any, config: RewardConfig) -> RewardResult:
    components: dict[str, float] = {
        "format": reading.format_fraction,
        "length": length_reward(reading.think_words, config),
        "think_words": float(reading.think_words),
        "kind_match": float(reading.kind == target["kind"]),
        "similarity_nan": 0.0,
    }
    success = False
    if reading.kind != target["kind"]:
        accuracy = config.wrong_kind_penalty
    elif reading.kind == "tool_call":
        assert reading.call is not None  # parse() sets a call exactly when the kind is "tool_call"
        quality, details = tool_call_match(reading.call, target)
        components.update(details)
        accuracy = 1.0 + quality
        success = details["name_match"] == 1.0 and details["arguments_match"] == 1.0
    else:
        value = _as_float(raw_similarity)
        if not math.isfinite(value):
            components["similarity_nan"] = 1.0
            value = 0.0
        value = min(1.0, max(0.0, value))  # an injected scorer may stray out of [0, 1]
        components["similarity"] = value
        accuracy = 1.0 + value
        success = value >= config.success_similarity
    components["accuracy"] = accuracy

    total = config.w_accuracy * accuracy
    if config.use_format:
        total += config.w_format * components["format"]
    if config.use_length:
        total += config.w_length * components["length"]
    return RewardResult(
        total=total, components=components, success=success, kind=reading.kind, problems=list(reading.problems)
    )


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _resolve_similarity(similarity: SimilarityFn | str | None, config: RewardConfig) -> SimilarityFn:
    if callable(similarity):
        return similarity
    name = similarity if isinstance(similarity, str) else config.similarity
    return get_similarity(name, lexical_ok=config.similarity_lexical_ok)


def _check_target(target: Any, index: int) -> None:
    """Targets come from the data layer; a malformed one is a data bug, reported by its index."""
    where = f"target #{index}"
    if not isinstance(target, dict):
        raise ValueError(f"{where}: expected a dict, got {type(target).__name__}")
    kind = target.get("kind")
    if kind == "tool_call":
        if not isinstance(target.get("name"), str):
            raise ValueError(f"{where}: a tool_call target needs a string 'name', got {target.get('name')!r}")
        if not isinstance(target.get("arguments"), dict):
            raise ValueError(f"{where}: a tool_call target needs a dict 'arguments', got {target.get('arguments')!r}")
    elif kind == "answer":
        if not isinstance(target.get("text"), str):
            raise ValueError(f"{where}: an answer target needs a string 'text', got {target.get('text')!r}")
    else:
        raise ValueError(f"{where}: 'kind' must be 'tool_call' or 'answer', got {kind!r}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rewards.score", description="Print the reward components of one completion."
    )
    parser.add_argument("--completion", required=True, help="completion text, or - to read it from stdin")
    parser.add_argument("--target", required=True, help='target JSON, e.g. \'{"kind": "answer", "text": "Hi"}\'')
    parser.add_argument("--similarity", default=None, help="similarity backend (default: all-MiniLM-L6-v2; 'lexical')")
    parser.add_argument("--lexical-ok", action="store_true", help="fall back to lexical similarity if no model loads")
    parser.add_argument("--no-format", action="store_true", help="leave R_fmt out of the total")
    parser.add_argument("--no-length", action="store_true", help="leave R_len out of the total (stage-1 runs)")
    parser.add_argument("--success-similarity", type=float, default=RewardConfig.success_similarity)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)

    completion = sys.stdin.read() if args.completion == "-" else args.completion
    try:
        target = json.loads(args.target)
        _check_target(target, 0)
        config = RewardConfig(
            use_format=not args.no_format, use_length=not args.no_length, similarity=args.similarity,
            similarity_lexical_ok=args.lexical_ok, success_similarity=args.success_similarity,
        )
    except ValueError as error:
        parser.error(f"--target / options: {error}")
    result = score(completion, target, config=config)

    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
        return 0
    print(f"{'kind':<16}{result.kind} (target: {target['kind']})")
    for name in sorted(result.components):
        print(f"{name:<16}{result.components[name]:.4f}")
    print(f"{'total':<16}{result.total:.4f}")
    print(f"{'success':<16}{result.success}")
    print(f"{'problems':<16}{'; '.join(result.problems) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
