"""The paper's per-turn evaluation table, computed from one record per test turn (pure Python).

Every test turn has a gold action kind (``tool_call`` or ``answer``) and a predicted kind
(``tool_call``, ``answer`` or ``invalid`` when the completion could not be parsed).  With

    n            = number of turns
    gold_tool    = turns whose gold kind is tool_call          pred_tool    = predicted tool_call
    gold_answer  = turns whose gold kind is answer             pred_answer  = predicted answer
    tool_hit     = gold tool_call and predicted tool_call      answer_hit   = likewise for answers
    right_name   = tool_hit turns whose predicted tool name equals the gold name
    exact_args   = right_name turns whose arguments equal the gold arguments exactly
                   (after the JSON normalisation of `rewards.parse.json_equal`: key order does
                   not matter, 1.0 == 1, true != 1; the same test as the reward's arguments_match)

the table (DESIGN.md, "Evaluation: the paper's table") is

    action accuracy   = (tool_hit + answer_hit) / n
    tool precision    = tool_hit / pred_tool            answer precision = answer_hit / pred_answer
    tool recall       = tool_hit / gold_tool            answer recall    = answer_hit / gold_answer
    tool F1           = 2 tool_hit / (pred_tool + gold_tool)          (answer F1 likewise)
    name accuracy     = right_name / gold_tool
    parameter match   = exact_args / right_name
    similarity        = mean similarity over the answer_hit turns

The F1 is written as 2TP / (2TP + FP + FN), which equals the harmonic mean 2PR / (P + R) whenever
both are defined and stays defined (0) when the model never predicts that kind but the gold has it.

Also: the mean reward and the mean of each reward component (accuracy, format, length), the mean think length in words, and
the counts behind every share.  A share whose denominator is 0 is None (rendered "-"), never a
crash or NaN; non-finite rewards are left out of the means (and counted).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable, Mapping

from rewards.parse import json_equal

GOLD_KINDS: tuple[str, ...] = ("tool_call", "answer")
PREDICTED_KINDS: tuple[str, ...] = ("tool_call", "answer", "invalid")
# The reward components that enter the total (rewards/score.py); their means are reported.
REWARD_COMPONENTS: tuple[str, ...] = ("accuracy", "format", "length")

# The table's columns in the paper's order: (metric key, column header).
TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("action_accuracy", "Action acc."),
    ("tool_precision", "Tool P"),
    ("tool_recall", "Tool R"),
    ("tool_f1", "Tool F1"),
    ("tool_name_accuracy", "Name acc."),
    ("tool_parameter_match", "Param. match"),
    ("answer_precision", "Answer P"),
    ("answer_recall", "Answer R"),
    ("answer_f1", "Answer F1"),
    ("answer_similarity", "Similarity"),
)
# The extra columns after the paper's: training-signal diagnostics.
EXTRA_COLUMNS: tuple[tuple[str, str], ...] = (
    ("reward_mean", "Reward"),
    ("reward_accuracy", "R_acc"),
    ("reward_format", "R_fmt"),
    ("reward_length", "R_len"),
    ("think_words_mean", "Think words"),
)


@dataclass(frozen=True)
class TurnRecord:
    """What the table needs to know about one evaluated turn.

    gold_kind: "tool_call" or "answer"; pred_kind: "tool_call", "answer" or "invalid".
    gold_name/gold_arguments: the gold tool call (None for answers); pred_name/pred_arguments the
    parsed prediction (None unless pred_kind is "tool_call").  similarity: semantic similarity of a
    predicted answer to the gold answer (used only when both kinds are "answer").  reward and
    components: the composite reward of the completion and its parts (accuracy, format, length,
    ...; only REWARD_COMPONENTS are averaged).  think_words: words inside the <think> block
    (None when there is none to count).  success: the reward's success flag, when known.
    """

    gold_kind: str
    pred_kind: str
    gold_name: str | None = None
    pred_name: str | None = None
    gold_arguments: Any = None
    pred_arguments: Any = None
    similarity: float | None = None
    reward: float | None = None
    components: dict[str, float] = field(default_factory=dict)
    think_words: int | None = None
    success: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TurnRecord":
        """Rebuild a record from a dict (e.g. a line of a predictions file); other keys are ignored."""
        names = {f.name for f in fields(cls)}
        missing = [name for name in ("gold_kind", "pred_kind") if name not in values]
        if missing:
            raise ValueError(f"a turn record needs {missing}; got keys {sorted(values)}")
        return cls(**{key: value for key, value in values.items() if key in names})


def share(numerator: float, denominator: float) -> float | None:
    """numerator / denominator, or None when the denominator is 0."""
    return numerator / denominator if denominator else None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(record: Any, index: int) -> TurnRecord:
    if isinstance(record, Mapping):
        record = TurnRecord.from_dict(record)
    if not isinstance(record, TurnRecord):
        raise TypeError(f"record {index}: expected a TurnRecord or a dict, got {type(record).__name__}")
    if record.gold_kind not in GOLD_KINDS:
        raise ValueError(f"record {index}: gold_kind must be one of {GOLD_KINDS}, got {record.gold_kind!r}")
    if record.pred_kind not in PREDICTED_KINDS:
        raise ValueError(f"record {index}: pred_kind must be one of {PREDICTED_KINDS}, got {record.pred_kind!r}")
    return record


def aggregate(records: Iterable[TurnRecord | Mapping[str, Any]]) -> dict[str, Any]:
    """The table row of a set of turns: every metric of the module docstring, plus "counts".

    Accepts TurnRecords or their dicts.  Returns a flat dict of floats (or None where a
    denominator is 0) with a nested "counts" dict of ints.  The input is not modified.
    """
    checked = [_check(record, index) for index, record in enumerate(records)]
    n = len(checked)
    gold_tool = sum(r.gold_kind == "tool_call" for r in checked)
    gold_answer = sum(r.gold_kind == "answer" for r in checked)
    pred_tool = sum(r.pred_kind == "tool_call" for r in checked)
    pred_answer = sum(r.pred_kind == "answer" for r in checked)
    pred_invalid = sum(r.pred_kind == "invalid" for r in checked)
    tool_hits = [r for r in checked if r.gold_kind == r.pred_kind == "tool_call"]
    answer_hits = [r for r in checked if r.gold_kind == r.pred_kind == "answer"]
    right_name = [r for r in tool_hits if r.pred_name == r.gold_name]
    exact_args = [r for r in right_name if json_equal(r.pred_arguments, r.gold_arguments)]
    similarities = [float(r.similarity) for r in answer_hits if _finite_number(r.similarity)]

    rewards = [float(r.reward) for r in checked if _finite_number(r.reward)]
    nonfinite_rewards = sum(r.reward is not None and not _finite_number(r.reward) for r in checked)
    component_values: dict[str, list[float]] = {name: [] for name in REWARD_COMPONENTS}
    for record in checked:
        for name in REWARD_COMPONENTS:
            if _finite_number(record.components.get(name)):
                component_values[name].append(float(record.components[name]))
    think_words = [float(r.think_words) for r in checked if _finite_number(r.think_words)]
    successes = [bool(r.success) for r in checked if r.success is not None]

    metrics: dict[str, Any] = {
        "action_accuracy": share(len(tool_hits) + len(answer_hits), n),
        "tool_precision": share(len(tool_hits), pred_tool),
        "tool_recall": share(len(tool_hits), gold_tool),
        "tool_f1": share(2 * len(tool_hits), pred_tool + gold_tool),
        "tool_name_accuracy": share(len(right_name), gold_tool),
        "tool_parameter_match": share(len(exact_args), len(right_name)),
        "answer_precision": share(len(answer_hits), pred_answer),
        "answer_recall": share(len(answer_hits), gold_answer),
        "answer_f1": share(2 * len(answer_hits), pred_answer + gold_answer),
        "answer_similarity": _mean(similarities),
        "reward_mean": _mean(rewards),
    }
    for name in REWARD_COMPONENTS:
        metrics[f"reward_{name}"] = _mean(component_values[name])
    metrics["think_words_mean"] = _mean(think_words)
    metrics["success_rate"] = share(sum(successes), len(successes))
    metrics["counts"] = {
        "turns": n,
        "gold_tool": gold_tool,
        "gold_answer": gold_answer,
        "pred_tool": pred_tool,
        "pred_answer": pred_answer,
        "pred_invalid": pred_invalid,
        "tool_hits": len(tool_hits),
        "tool_right_name": len(right_name),
        "tool_exact_arguments": len(exact_args),
        "answer_hits": len(answer_hits),
        "answer_with_similarity": len(similarities),
        "nonfinite_rewards": nonfinite_rewards,
    }
    return metrics


def format_value(value: Any, digits: int = 3) -> str:
    """A table cell: None -> "-", floats with `digits` decimals, anything else as text."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else "-"
    return str(value)


def format_table(rows: Mapping[str, Mapping[str, Any]], *, title: str | None = None, extra: bool = True,
                 digits: int = 3) -> str:
    """A Markdown table in the paper's layout: one row per checkpoint (in the given order).

    Columns: checkpoint, the paper's ten metrics (action accuracy; tool P/R/F1, name accuracy,
    parameter match; answer P/R/F1, similarity), then (with `extra`) mean reward, its accuracy,
    format and length components, mean think words, and the number of turns.  Missing metrics and
    None values are shown as "-".
    """
    columns = list(TABLE_COLUMNS) + (list(EXTRA_COLUMNS) if extra else [])
    header = ["Checkpoint"] + [label for _, label in columns] + (["Turns"] if extra else [])
    lines = []
    if title:
        lines += [f"### {title}", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|")
    for name, metrics in rows.items():
        cells = [str(name)] + [format_value(metrics.get(key), digits) for key, _ in columns]
        if extra:
            cells.append(format_value(metrics.get("counts", {}).get("turns")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# Per-turn quantities compared between two checkpoints on the same turns: (key, column header).
PAIRED_COLUMNS: tuple[tuple[str, str], ...] = (
    ("action_accuracy", "Action acc."),
    ("reward_accuracy", "R_acc"),
    ("reward_mean", "Reward"),
)


def turn_values(prediction: Mapping[str, Any]) -> dict[str, float | None]:
    """The per-turn values behind PAIRED_COLUMNS (None where the turn has no finite value).

    action_accuracy: 1 when the predicted kind equals the gold kind, else 0; reward_accuracy: the
    turn's accuracy component; reward_mean: its total reward.  Their means over turns are the
    table's "Action acc.", "R_acc" and "Reward".
    """
    components = prediction.get("components") or {}
    accuracy = components.get("accuracy")
    reward = prediction.get("reward")
    return {
        "action_accuracy": float(prediction["gold_kind"] == prediction["pred_kind"]),
        "reward_accuracy": float(accuracy) if _finite_number(accuracy) else None,
        "reward_mean": float(reward) if _finite_number(reward) else None,
    }


def paired_difference(before: Iterable[Mapping[str, Any]], after: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """after - before on the turns both evaluated, with the paired standard error of the mean.

    Both inputs are prediction dicts (a predictions-*.jsonl line: TurnRecord fields plus
    "conversation_id" and "turn_index", which pair the turns).  For each key of PAIRED_COLUMNS,
    with d_i = value_after(i) - value_before(i) over the n paired turns where both are finite:

        delta = mean(d)        se = stdev(d) / sqrt(n)        (sample stdev; 0 when n < 2)
        better / worse = turns with d > 0 / d < 0

    Because both checkpoints answer the same turns, se is much smaller than the standard error
    of either mean alone: turns both get right or both get wrong add nothing to it.  delta / se
    above ~2 is unlikely from turn sampling alone (it does not measure seed-to-seed variation).

    "action_transitions" counts the turns by their action state before and after ("right->right",
    "invalid->right", "wrong->right", ...; states from `action_state`): it tells a change of
    decisions (wrong->right, right->wrong) from a repair or a break of the output format
    (invalid->right, right->invalid), which the action-accuracy delta alone cannot.
    """
    def keyed(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[Any, Any, int], Mapping[str, Any]]:
        # A data file may repeat a conversation id: repeats are paired in their order of appearance.
        seen: dict[tuple[Any, Any], int] = {}
        keyed_rows = {}
        for row in rows:
            turn = (row["conversation_id"], row["turn_index"])
            seen[turn] = seen.get(turn, 0) + 1
            keyed_rows[(*turn, seen[turn])] = row
        return keyed_rows

    first, second = keyed(before), keyed(after)
    common = [key for key in first if key in second]
    result: dict[str, Any] = {"turns": len(common)}
    for name, _ in PAIRED_COLUMNS:
        differences = []
        for key in common:
            a, b = turn_values(first[key])[name], turn_values(second[key])[name]
            if a is not None and b is not None:
                differences.append(b - a)
        n = len(differences)
        mean = _mean(differences)
        if n >= 2 and mean is not None:
            variance = sum((d - mean) ** 2 for d in differences) / (n - 1)
            se: float | None = math.sqrt(variance / n)
        else:
            se = 0.0 if n == 1 else None
        result[name] = {"delta": mean, "se": se, "n": n, "better": sum(d > 0 for d in differences),
                        "worse": sum(d < 0 for d in differences)}
    transitions = {f"{a}->{b}": 0 for a in ACTION_STATES for b in ACTION_STATES}
    for key in common:
        transitions[f"{action_state(first[key])}->{action_state(second[key])}"] += 1
    result["action_transitions"] = transitions
    return result


ACTION_STATES = ("right", "wrong", "invalid")


def action_state(prediction: Mapping[str, Any]) -> str:
    """right: the predicted action kind is the gold kind; invalid: no parsable action (malformed
    tool-call JSON, no action block, ...); wrong: a well-formed action of the other kind."""
    if prediction["pred_kind"] == prediction["gold_kind"]:
        return "right"
    return "invalid" if prediction["pred_kind"] == "invalid" else "wrong"


def format_paired_table(pairs: Mapping[str, Mapping[str, Any]], *, title: str | None = None, digits: int = 3) -> str:
    """A Markdown table of paired differences: one row per "after - before" pair, cells "delta +- se"."""
    header = ["Comparison"] + [label for _, label in PAIRED_COLUMNS] + [
        "Kind: invalid→right / wrong→right / right→wrong / right→invalid", "Turns"]
    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|")
    for name, pair in pairs.items():
        cells = [str(name)]
        for key, _ in PAIRED_COLUMNS:
            value = pair.get(key, {})
            delta, se = value.get("delta"), value.get("se")
            cells.append("-" if delta is None else f"{delta:+.{digits}f} ± {format_value(se, digits)}")
        moves = pair.get("action_transitions")
        cells.append(" / ".join(str(moves[key]) for key in ("invalid->right", "wrong->right", "right->wrong",
                                                             "right->invalid")) if moves else "-")
        cells.append(str(pair.get("turns", 0)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
