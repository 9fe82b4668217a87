"""The paper's table (eval/metrics.py) on hand-computed records, and its edge cases."""

from __future__ import annotations

import copy
import math

import pytest

from eval.metrics import (TurnRecord, aggregate, format_paired_table, format_table, format_value,
                          paired_difference)


def tool(name, arguments):
    return {"kind": "tool_call", "name": name, "arguments": arguments}


def record(gold, pred, *, similarity=None, reward=None, components=None, think=None, success=None):
    """A TurnRecord from a gold and a predicted action: ("answer",) or ("tool_call", name, args) or ("invalid",)."""
    return TurnRecord(
        gold_kind=gold[0], pred_kind=pred[0],
        gold_name=gold[1] if gold[0] == "tool_call" else None,
        gold_arguments=gold[2] if gold[0] == "tool_call" else None,
        pred_name=pred[1] if pred[0] == "tool_call" else None,
        pred_arguments=pred[2] if pred[0] == "tool_call" else None,
        similarity=similarity, reward=reward, components=components or {}, think_words=think, success=success,
    )


ANSWER, INVALID = ("answer",), ("invalid",)


@pytest.fixture
def twelve():
    """Twelve turns, one for every cell of the table (hand counts in the test below)."""
    return [
        # 1: right tool, arguments equal after normalisation (1.0 == 1)
        record(("tool_call", "A", {"x": 1}), ("tool_call", "A", {"x": 1.0}), reward=3.0,
               components={"accuracy": 2.0, "format": 1.0, "length": 0.0, "name_match": 1.0}, think=20, success=True),
        # 2: right tool, same arguments in another key order
        record(("tool_call", "A", {"x": 1, "y": "b"}), ("tool_call", "A", {"y": "b", "x": 1}), reward=2.5,
               components={"accuracy": 2.0, "format": 1.0, "length": 0.5}, think=7, success=True),
        # 3: right tool, true is not 1
        record(("tool_call", "A", {"flag": True}), ("tool_call", "A", {"flag": 1}), reward=2.0,
               components={"accuracy": 1.5, "format": 0.5, "length": 0.0}, think=0, success=False),
        # 4: a tool call, but the wrong tool
        record(("tool_call", "B", {"q": "x"}), ("tool_call", "C", {"q": "x"}), reward=1.0,
               components={"accuracy": 1.0, "format": 0.0, "length": 0.0}, think=3),
        # 5: gold tool, predicted an answer
        record(("tool_call", "B", {}), ANSWER, reward=-1.0, components={"accuracy": -1.0}),
        # 6: gold tool, unparsable output
        record(("tool_call", "A", {"x": 2}), INVALID, reward=float("nan"), components={"accuracy": float("nan")}),
        # 7, 8: answer hits with similarities 0.8 and 0.4
        record(ANSWER, ANSWER, similarity=0.8, reward=2.0, components={"accuracy": 1.8}),
        record(ANSWER, ANSWER, similarity=0.4, reward=1.0, components={"accuracy": 1.4}),
        # 9: gold answer, predicted a tool call
        record(ANSWER, ("tool_call", "A", {})),
        # 10: gold answer, unparsable
        record(ANSWER, INVALID),
        # 11: an answer hit without a similarity value (left out of the similarity mean)
        record(ANSWER, ANSWER),
        # 12: right tool with empty arguments
        record(("tool_call", "A", {}), ("tool_call", "A", {})),
    ]


def test_every_cell_by_hand(twelve):
    metrics = aggregate(twelve)
    # gold tool: 1-6, 12 (7); gold answer: 7-11 (5); pred tool: 1-4, 9, 12 (6); pred answer: 5, 7, 8, 11 (4)
    # tool hits: 1-4, 12 (5); answer hits: 7, 8, 11 (3); right name: 1, 2, 3, 12 (4); exact args: 1, 2, 12 (3)
    assert metrics["counts"] == {
        "turns": 12, "gold_tool": 7, "gold_answer": 5, "pred_tool": 6, "pred_answer": 4, "pred_invalid": 2,
        "tool_hits": 5, "tool_right_name": 4, "tool_exact_arguments": 3, "answer_hits": 3,
        "answer_with_similarity": 2, "nonfinite_rewards": 1,
    }
    expected = {
        "action_accuracy": 8 / 12,
        "tool_precision": 5 / 6,
        "tool_recall": 5 / 7,
        "tool_f1": 10 / 13,
        "tool_name_accuracy": 4 / 7,
        "tool_parameter_match": 3 / 4,
        "answer_precision": 3 / 4,
        "answer_recall": 3 / 5,
        "answer_f1": 6 / 9,
        "answer_similarity": 0.6,
        "reward_mean": (3.0 + 2.5 + 2.0 + 1.0 - 1.0 + 2.0 + 1.0) / 7,
        "reward_accuracy": (2.0 + 2.0 + 1.5 + 1.0 - 1.0 + 1.8 + 1.4) / 7,
        "reward_format": (1.0 + 1.0 + 0.5 + 0.0) / 4,
        "reward_length": 0.5 / 4,
        "think_words_mean": (20 + 7 + 0 + 3) / 4,
        "success_rate": 2 / 3,
    }
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key
    assert set(metrics) == set(expected) | {"counts"}


def test_f1_is_the_harmonic_mean_when_both_are_defined(twelve):
    metrics = aggregate(twelve)
    for kind in ("tool", "answer"):
        precision, recall = metrics[f"{kind}_precision"], metrics[f"{kind}_recall"]
        assert metrics[f"{kind}_f1"] == pytest.approx(2 * precision * recall / (precision + recall))


def test_no_records_gives_none_not_nan():
    metrics = aggregate([])
    assert all(value is None for key, value in metrics.items() if key != "counts")
    assert metrics["counts"]["turns"] == 0


def test_model_that_never_calls_tools():
    records = [record(("tool_call", "A", {}), ANSWER), record(ANSWER, ANSWER, similarity=1.0)]
    metrics = aggregate(records)
    assert metrics["tool_precision"] is None  # no tool predictions: undefined
    assert metrics["tool_recall"] == 0.0
    assert metrics["tool_f1"] == 0.0  # 2TP / (pred + gold) = 0 / 1: defined
    assert metrics["tool_name_accuracy"] == 0.0
    assert metrics["tool_parameter_match"] is None  # no turn with the right name
    assert metrics["answer_precision"] == 0.5 and metrics["answer_recall"] == 1.0
    assert metrics["answer_similarity"] == 1.0
    assert metrics["reward_mean"] is None and metrics["think_words_mean"] is None


def test_only_answers_leaves_tool_cells_empty():
    metrics = aggregate([record(ANSWER, ANSWER, similarity=0.5), record(ANSWER, INVALID)])
    for key in ("tool_precision", "tool_recall", "tool_f1", "tool_name_accuracy", "tool_parameter_match"):
        assert metrics[key] is None, key
    assert metrics["action_accuracy"] == 0.5
    assert metrics["answer_f1"] == pytest.approx(2 / 3)


def test_all_invalid():
    metrics = aggregate([record(ANSWER, INVALID), record(("tool_call", "A", {}), INVALID)])
    assert metrics["action_accuracy"] == 0.0
    assert metrics["tool_precision"] is None and metrics["answer_precision"] is None
    assert metrics["tool_f1"] == 0.0 and metrics["answer_f1"] == 0.0
    assert metrics["answer_similarity"] is None
    assert metrics["counts"]["pred_invalid"] == 2


def test_accepts_dicts_and_leaves_input_unchanged(twelve):
    as_dicts = [r.to_dict() | {"completion": "ignored", "conversation_id": "c"} for r in twelve]
    before = copy.deepcopy(as_dicts)
    assert aggregate(as_dicts) == aggregate(twelve)
    assert as_dicts == before


def test_bad_records_name_their_index():
    with pytest.raises(ValueError, match="record 1: gold_kind"):
        aggregate([record(ANSWER, ANSWER), TurnRecord(gold_kind="tool", pred_kind="answer")])
    with pytest.raises(ValueError, match="record 0: pred_kind"):
        aggregate([TurnRecord(gold_kind="answer", pred_kind="nonsense")])
    with pytest.raises(ValueError, match="needs"):
        aggregate([{"gold_kind": "answer"}])
    with pytest.raises(TypeError, match="record 0"):
        aggregate([42])


def test_format_table_layout(twelve):
    rows = {"base": aggregate([record(ANSWER, INVALID)]), "RL": aggregate(twelve)}
    table = format_table(rows, title="synthetic:test")
    lines = table.strip().splitlines()
    assert lines[0] == "### synthetic:test"
    header = [cell.strip() for cell in lines[2].strip("|").split("|")]
    assert header[:11] == ["Checkpoint", "Action acc.", "Tool P", "Tool R", "Tool F1", "Name acc.", "Param. match",
                           "Answer P", "Answer R", "Answer F1", "Similarity"]
    assert header[-1] == "Turns"
    base = [cell.strip() for cell in lines[4].strip("|").split("|")]
    rl = [cell.strip() for cell in lines[5].strip("|").split("|")]
    assert len(base) == len(rl) == len(header)
    assert base[0] == "base" and base[1] == "0.000" and base[2] == "-"  # no tool predictions
    assert rl[0] == "RL" and rl[1] == "0.667" and rl[4] == "0.769" and rl[10] == "0.600" and rl[-1] == "12"
    assert "nan" not in table.lower()


def test_format_table_without_extra_columns():
    table = format_table({"x": {}}, extra=False)
    header = table.splitlines()[0].strip("|").split("|")
    assert len(header) == 11
    assert table.splitlines()[2] == "| x | " + " | ".join(["-"] * 10) + " |"


def test_format_value():
    assert format_value(None) == "-"
    assert format_value(float("nan")) == "-"
    assert format_value(1 / 3) == "0.333"
    assert format_value(7) == "7"
    infinite = aggregate([record(ANSWER, ANSWER, reward=float("inf"), similarity=float("nan"))])
    assert infinite["counts"]["nonfinite_rewards"] == 1
    assert infinite["reward_mean"] is None and infinite["answer_similarity"] is None


def _prediction(conversation: str, turn: int, gold: str, pred: str, accuracy: float, reward: float) -> dict:
    return {"conversation_id": conversation, "turn_index": turn, "gold_kind": gold, "pred_kind": pred,
            "components": {"accuracy": accuracy}, "reward": reward}


def test_paired_difference_by_hand():
    before = [_prediction("a", 1, "answer", "answer", 1.5, 2.5),
              _prediction("a", 3, "tool_call", "answer", -1.0, 0.0),
              _prediction("b", 1, "tool_call", "tool_call", 1.0, 2.0),
              _prediction("only-before", 1, "answer", "invalid", -1.0, -1.0)]
    # Same turns in another order, one turn only here, one worse, one better, one equal.
    after = [_prediction("b", 1, "tool_call", "answer", -1.0, 1.0),
             _prediction("a", 3, "tool_call", "tool_call", 2.0, 3.0),
             _prediction("a", 1, "answer", "answer", 1.5, 2.5),
             _prediction("only-after", 2, "answer", "answer", 2.0, 3.0)]
    result = paired_difference(before, after)
    assert result["turns"] == 3
    # action: d = [0, +1, -1] -> mean 0, sample variance 1, se = sqrt(1/3)
    action = result["action_accuracy"]
    assert action["delta"] == pytest.approx(0.0)
    assert action["se"] == pytest.approx(math.sqrt(1 / 3))
    assert (action["better"], action["worse"], action["n"]) == (1, 1, 3)
    # R_acc: d = [0, 3, -2] -> mean 1/3, variance ((1/3)^2 + (8/3)^2 + (7/3)^2) / 2 = 19/3
    r_acc = result["reward_accuracy"]
    assert r_acc["delta"] == pytest.approx(1 / 3)
    assert r_acc["se"] == pytest.approx(math.sqrt(19 / 3 / 3))
    # reward: d = [0, 3, -1] -> mean 2/3
    assert result["reward_mean"]["delta"] == pytest.approx(2 / 3)
    # a/1 right->right, a/3 wrong->right, b/1 right->wrong; the unpaired turns are not counted.
    moves = result["action_transitions"]
    assert {key: count for key, count in moves.items() if count} == {
        "right->right": 1, "wrong->right": 1, "right->wrong": 1}
    assert len(moves) == 9 and sum(moves.values()) == result["turns"]


def test_paired_difference_tells_format_repairs_from_decision_changes():
    # invalid->right is a repaired output, wrong->right a changed decision; both raise accuracy alike.
    before = [_prediction("a", 1, "tool_call", "invalid", -1.0, -0.6),
              _prediction("a", 2, "answer", "invalid", -1.0, -0.6),
              _prediction("a", 3, "answer", "tool_call", -1.0, 0.0),
              _prediction("a", 4, "answer", "answer", 1.5, 2.5),
              _prediction("a", 5, "tool_call", "tool_call", 1.5, 2.5)]
    after = [_prediction("a", 1, "tool_call", "tool_call", 1.5, 2.5),
             _prediction("a", 2, "answer", "tool_call", -1.0, 0.0),
             _prediction("a", 3, "answer", "answer", 1.5, 2.5),
             _prediction("a", 4, "answer", "invalid", -1.0, -0.6),
             _prediction("a", 5, "tool_call", "tool_call", 1.5, 2.5)]
    moves = paired_difference(before, after)["action_transitions"]
    assert moves["invalid->right"] == 1 and moves["invalid->wrong"] == 1 and moves["wrong->right"] == 1
    assert moves["right->invalid"] == 1 and moves["right->right"] == 1
    assert sum(moves.values()) == 5
    assert paired_difference(before, after)["action_accuracy"]["delta"] == pytest.approx(1 / 5)


def test_paired_difference_skips_nonfinite_and_handles_tiny_inputs():
    before = [_prediction("a", 1, "answer", "answer", float("nan"), 1.0)]
    after = [_prediction("a", 1, "answer", "tool_call", -1.0, 0.0)]
    result = paired_difference(before, after)
    assert result["reward_accuracy"] == {"delta": None, "se": None, "n": 0, "better": 0, "worse": 0}
    assert result["action_accuracy"]["delta"] == -1.0 and result["action_accuracy"]["se"] == 0.0
    assert paired_difference([], [])["turns"] == 0


def test_paired_difference_pairs_repeated_ids_in_order():
    # Two conversations share an id (allowed in user data): the k-th repeat pairs with the k-th.
    before = [_prediction("dup", 1, "answer", "answer", 1.0, 2.0), _prediction("dup", 1, "answer", "invalid", -1.0, -1.0)]
    after = [_prediction("dup", 1, "answer", "answer", 1.0, 2.0), _prediction("dup", 1, "answer", "answer", 1.0, 2.0)]
    result = paired_difference(before, after)
    assert result["turns"] == 2
    assert result["action_accuracy"]["delta"] == pytest.approx(0.5)
    assert (result["action_accuracy"]["better"], result["action_accuracy"]["worse"]) == (1, 0)


def test_format_paired_table():
    before = [_prediction("a", i, "answer", "answer" if i % 2 else "tool_call", 1.0, 2.0) for i in range(4)]
    after = [_prediction("a", i, "answer", "answer", 1.5, 2.5) for i in range(4)]
    text = format_paired_table({"rl - coldstart": paired_difference(before, after)}, title="test")
    lines = text.splitlines()
    assert lines[0] == "### test"
    assert lines[2] == ("| Comparison | Action acc. | R_acc | Reward | Kind: invalid→right / wrong→right / "
                        "right→wrong / right→invalid | Turns |")
    assert lines[4] == "| rl - coldstart | +0.500 ± 0.289 | +0.500 ± 0.000 | +0.500 ± 0.000 | 0 / 2 / 0 / 0 | 4 |"
