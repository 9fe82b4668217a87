"""Hand-computed rewards: every component and the total, on the cases the issue lists.

Default config: R = R_acc + R_fmt + R_len; penalty -1; length bounds 14 / 100 (decay 100).
Gold call used throughout: book_flight(origin="SFO", destination="JFK", passengers=2),
so |K_gold| = 3 and S_max = 2 + 3 = 5.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data.format import format_completion
from rewards import (
    FORMAT_CHECKS,
    LexicalSimilarity,
    RewardConfig,
    canonical_json,
    json_equal,
    length_reward,
    parse,
    score,
    score_batch,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

GOLD_CALL = {
    "kind": "tool_call", "name": "book_flight", "arguments": {"origin": "SFO", "destination": "JFK", "passengers": 2}
}
GOLD_ANSWER = {"kind": "answer", "text": "Your flight from SFO to JFK is booked."}
REASONING_20 = " ".join(f"step{i}" for i in range(20))  # 20 words: inside [14, 100], R_len = 1


def think(words: int) -> str:
    return "<think>" + " ".join(["word"] * words) + "</think>\n"


def call_block(name: str, arguments: object) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def call_completion(arguments: dict, name: str = "book_flight", think_words: int = 20) -> str:
    return think(think_words) + call_block(name, arguments)


class FixedSimilarity:
    """Deterministic similarity for tests: a fixed value per (prediction, gold), counting calls."""

    def __init__(self, values: dict[tuple[str, str], float] | None = None, default: float = 0.0) -> None:
        self.values = values or {}
        self.default = default
        self.calls: list[tuple[list[str], list[str]]] = []

    def __call__(self, predictions, golds):
        self.calls.append((list(predictions), list(golds)))
        return [self.values.get((prediction, gold), self.default) for prediction, gold in zip(predictions, golds)]


# --- length reward -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "words, expected",
    [(0, 0.0), (7, 0.5), (13, 13 / 14), (14, 1.0), (57, 1.0), (100, 1.0), (101, 0.99), (130, 0.7), (150, 0.5),
     (200, 0.0), (250, 0.0)],
)
def test_length_reward_hand_computed(words, expected):
    assert length_reward(words, RewardConfig()) == pytest.approx(expected)


def test_length_reward_uses_config_bounds():
    config = RewardConfig(length_min_words=10, length_max_words=20, length_decay_words=10)
    assert length_reward(5, config) == pytest.approx(0.5)
    assert length_reward(25, config) == pytest.approx(0.5)


# --- tool calls ----------------------------------------------------------------------------------


def test_exact_call_scores_the_maximum():
    result = score(call_completion({"passengers": 2, "destination": "JFK", "origin": "SFO"}), GOLD_CALL)
    # R_acc = 1 + 5/5 = 2, R_fmt = 1, R_len = 1.
    assert result.components["accuracy"] == pytest.approx(2.0)
    assert result.components["format"] == 1.0
    assert result.components["length"] == 1.0
    assert result.total == pytest.approx(4.0)
    assert result.success and result.kind == "tool_call"
    assert result.components["arguments_match"] == 1.0 and result.components["name_match"] == 1.0


def test_call_with_one_wrong_value():
    result = score(call_completion({"origin": "SFO", "destination": "JFK", "passengers": 3}), GOLD_CALL)
    # S = 1 (name) + 1 (J = 3/3) + 2 (values) = 4, q = 4/5.
    assert result.components["accuracy"] == pytest.approx(1.8)
    assert result.components["values_matched"] == 2.0
    assert result.total == pytest.approx(3.8)
    assert not result.success


def test_call_with_string_instead_of_number_is_a_wrong_value():
    result = score(call_completion({"origin": "SFO", "destination": "JFK", "passengers": "2"}), GOLD_CALL)
    assert result.components["accuracy"] == pytest.approx(1.8)
    assert not result.success


def test_call_with_float_of_integral_value_matches():
    result = score(call_completion({"origin": "SFO", "destination": "JFK", "passengers": 2.0}), GOLD_CALL)
    assert result.components["accuracy"] == pytest.approx(2.0) and result.success


def test_call_with_an_extra_key():
    arguments = {"origin": "SFO", "destination": "JFK", "passengers": 2, "seat": "aisle"}
    result = score(call_completion(arguments), GOLD_CALL)
    # J = 3/4, V = 3: S = 1 + 0.75 + 3 = 4.75, q = 0.95.
    assert result.components["key_jaccard"] == pytest.approx(0.75)
    assert result.components["accuracy"] == pytest.approx(1.95)
    assert result.total == pytest.approx(3.95)
    assert not result.success


def test_call_with_a_missing_key():
    result = score(call_completion({"origin": "SFO", "passengers": 2}), GOLD_CALL)
    # J = 2/3, V = 2: S = 1 + 2/3 + 2 = 11/3, q = 11/15.
    assert result.components["accuracy"] == pytest.approx(1 + 11 / 15)


def test_call_with_wrong_tool_name_counts_no_keys_or_values():
    result = score(call_completion(GOLD_CALL["arguments"], name="cancel_flight"), GOLD_CALL)
    # Name wrong: S = 0, R_acc = 1 (right kind only).
    assert result.components["accuracy"] == pytest.approx(1.0)
    assert result.components["name_match"] == 0.0 and result.components["key_jaccard"] == 0.0
    assert result.total == pytest.approx(3.0)
    assert not result.success


def test_call_with_broken_json_is_invalid():
    completion = think(20) + '<tool_call>{"name": "book_flight", "arguments": {"origin": "SFO",</tool_call>'
    result = score(completion, GOLD_CALL)
    # Kind unparsable: R_acc = -1. Format: every check but the body holds: 4/5.
    assert result.kind == "invalid"
    assert result.components["accuracy"] == -1.0
    assert result.components["format"] == pytest.approx(0.8)
    assert result.total == pytest.approx(-1 + 0.8 + 1)
    assert any("not valid JSON" in problem for problem in result.problems)


def test_key_order_and_whitespace_do_not_matter():
    body = '{ "arguments" : {"passengers":2 ,\n "origin": "SFO", "destination":"JFK"},  "name":"book_flight" }'
    result = score(think(20) + f"<tool_call>\n{body}\n</tool_call>", GOLD_CALL)
    assert result.success and result.total == pytest.approx(4.0)


def test_tool_without_parameters():
    target = {"kind": "tool_call", "name": "list_flights", "arguments": {}}
    exact = score(call_completion({}, name="list_flights"), target)
    # S = 1 + J(empty, empty) = 1 + 0 values, S_max = 2: q = 1.
    assert exact.components["accuracy"] == pytest.approx(2.0) and exact.success
    # Arguments left out: read as {}, same accuracy, but the body check fails (R_fmt = 4/5).
    omitted = score(think(20) + '<tool_call>{"name": "list_flights"}</tool_call>', target)
    assert omitted.kind == "tool_call" and omitted.components["accuracy"] == pytest.approx(2.0)
    assert omitted.components["format"] == pytest.approx(0.8)


def test_arguments_as_json_string_are_read_but_cost_format():
    body = json.dumps({"name": "book_flight", "arguments": json.dumps(GOLD_CALL["arguments"])})
    result = score(think(20) + f"<tool_call>{body}</tool_call>", GOLD_CALL)
    assert result.success and result.components["format"] == pytest.approx(0.8)


# --- format --------------------------------------------------------------------------------------


def test_missing_think_block():
    result = score(call_block("book_flight", GOLD_CALL["arguments"]), GOLD_CALL)
    # No think block: "present" and "first" fail, R_fmt = 3/5; w = 0, R_len = 0.
    assert result.components["format"] == pytest.approx(0.6)
    assert result.components["length"] == 0.0
    assert result.total == pytest.approx(2.0 + 0.6)
    assert result.success


def test_too_short_think_block():
    result = score(call_completion(GOLD_CALL["arguments"], think_words=7), GOLD_CALL)
    assert result.components["length"] == pytest.approx(0.5)
    assert result.total == pytest.approx(2 + 1 + 0.5)


def test_too_long_think_block():
    result = score(call_completion(GOLD_CALL["arguments"], think_words=150), GOLD_CALL)
    assert result.components["length"] == pytest.approx(0.5)
    assert result.components["think_words"] == 150.0
    assert result.total == pytest.approx(2 + 1 + 0.5)


def test_stage1_empty_think_block_with_length_switched_off():
    completion = format_completion(GOLD_CALL)  # "<think>\n\n</think>\n\n<tool_call>..."
    result = score(completion, GOLD_CALL, config=RewardConfig(use_length=False))
    assert result.components["format"] == 1.0
    assert result.components["length"] == 0.0  # still reported
    assert result.total == pytest.approx(3.0)


def test_two_action_blocks_first_decides():
    completion = think(20) + call_block("book_flight", GOLD_CALL["arguments"]) + "<answer>Booked.</answer>"
    result = score(completion, GOLD_CALL)
    # The call decides the kind; "exactly one block" and "nothing after it" fail: R_fmt = 3/5.
    assert result.kind == "tool_call" and result.success
    assert result.components["format"] == pytest.approx(0.6)
    assert result.total == pytest.approx(2 + 0.6 + 1)


def test_answer_first_then_call_is_an_answer():
    completion = think(20) + "<answer>Booked.</answer>" + call_block("book_flight", GOLD_CALL["arguments"])
    result = score(completion, GOLD_CALL, similarity=FixedSimilarity())
    assert result.kind == "answer" and result.components["accuracy"] == -1.0


def test_text_after_action_costs_one_check_but_end_of_turn_does_not():
    base = call_completion(GOLD_CALL["arguments"])
    assert score(base + " Anything else?", GOLD_CALL).components["format"] == pytest.approx(0.8)
    assert score(base + "\n<|im_end|>\n", GOLD_CALL).components["format"] == 1.0


def test_text_before_think_costs_one_check():
    result = score("Sure! " + call_completion(GOLD_CALL["arguments"]), GOLD_CALL)
    assert parse("Sure! " + call_completion(GOLD_CALL["arguments"])).format_checks["think_first"] is False
    assert result.components["format"] == pytest.approx(0.8)


def test_text_between_think_and_action_fails_one_action_check():
    checks = parse(think(20) + "Let me book it. " + call_block("book_flight", {})).format_checks
    assert checks == {
        "think_present": True, "think_first": True, "one_action": False, "clean_end": True, "valid_body": True
    }


def test_unclosed_action_block_is_not_an_action():
    parsed = parse(think(20) + '<tool_call>{"name": "book_flight", "arguments": {}}')
    assert parsed.kind == "invalid" and parsed.call is None
    assert parsed.format_checks == {
        "think_present": True, "think_first": True, "one_action": True, "clean_end": False, "valid_body": False}
    assert "unclosed <tool_call> block (not an action)" in parsed.problems
    result = score(think(20) + '<tool_call>{"name": "book_flight", "arguments": {}}', GOLD_CALL)
    assert result.components["accuracy"] == -1.0 and result.kind == "invalid"


def test_run_on_answer_scores_no_accuracy():
    # What GRPO learned when an unclosed answer counted: an answer that runs on into more reasoning
    # and a tool call until the token limit.  It is no answer: R_acc -1, however similar its text.
    run_on = (think(20) + "<answer>" + GOLD_ANSWER["text"] + " I call get_order.\n</think>\n\n<tool_call>\n"
              '{"name": "get_order')
    result = score(run_on, GOLD_ANSWER, similarity=LexicalSimilarity())
    assert result.kind == "invalid" and result.components["accuracy"] == -1.0
    assert "similarity" not in result.components and result.success is False
    closed = score(think(20) + "<answer>" + GOLD_ANSWER["text"] + "</answer>", GOLD_ANSWER,
                   similarity=LexicalSimilarity())
    assert closed.kind == "answer" and closed.components["accuracy"] == pytest.approx(2.0)


def test_action_tags_inside_reasoning_are_not_actions():
    completion = "<think>I could say <answer>no</answer> but</think><tool_call>" + json.dumps(
        {"name": "f", "arguments": {}}) + "</tool_call>"
    parsed = parse(completion)
    assert parsed.kind == "tool_call" and parsed.format_fraction == 1.0
    assert parsed.reasoning == "I could say <answer>no</answer> but"


def test_closing_think_without_opening_is_lenient_but_not_credited():
    parsed = parse("I reason here.</think><answer>Hi</answer>")
    assert parsed.reasoning == "I reason here." and parsed.think_words == 3
    assert parsed.kind == "answer" and parsed.format_fraction == pytest.approx(0.6)


# --- answers -------------------------------------------------------------------------------------


def test_identical_answer():
    completion = think(20) + f"<answer>{GOLD_ANSWER['text']}</answer>"
    result = score(completion, GOLD_ANSWER, similarity=LexicalSimilarity())
    assert result.components["similarity"] == 1.0
    assert result.components["accuracy"] == 2.0
    assert result.total == pytest.approx(4.0) and result.success


def test_unrelated_answer():
    result = score(think(20) + "<answer>Bananas are yellow.</answer>", GOLD_ANSWER, similarity=LexicalSimilarity())
    # No shared token: similarity 0, R_acc = 1.
    assert result.components["similarity"] == 0.0
    assert result.total == pytest.approx(3.0) and not result.success


def test_answer_similarity_and_success_threshold():
    prediction = "Booked: SFO to JFK."
    similarity = FixedSimilarity({(prediction, GOLD_ANSWER["text"]): 0.5})
    result = score(think(20) + f"<answer>{prediction}</answer>", GOLD_ANSWER, similarity=similarity)
    assert result.components["accuracy"] == pytest.approx(1.5) and result.success  # 0.5 >= default 0.5
    stricter = score(think(20) + f"<answer>{prediction}</answer>", GOLD_ANSWER, similarity=similarity,
                     config=RewardConfig(success_similarity=0.6))
    assert not stricter.success and stricter.total == pytest.approx(result.total)


def test_wrong_kind_is_penalised_without_similarity():
    similarity = FixedSimilarity(default=1.0)
    result = score(think(20) + "<answer>I booked it.</answer>", GOLD_CALL, similarity=similarity)
    assert result.components["accuracy"] == -1.0 and result.components["kind_match"] == 0.0
    assert result.total == pytest.approx(1.0)
    assert similarity.calls == []
    answer_gold_call_predicted = score(call_completion({}), GOLD_ANSWER, similarity=similarity)
    assert answer_gold_call_predicted.components["accuracy"] == -1.0 and similarity.calls == []


def test_nan_similarity_is_zero_and_counted():
    result = score(think(20) + "<answer>x</answer>", GOLD_ANSWER, similarity=lambda p, g: [math.nan] * len(p))
    assert result.components["similarity"] == 0.0 and result.components["similarity_nan"] == 1.0
    assert result.components["accuracy"] == 1.0 and math.isfinite(result.total)


def test_out_of_range_similarity_is_clipped():
    result = score(think(20) + "<answer>x</answer>", GOLD_ANSWER, similarity=lambda p, g: [7.0] * len(p))
    assert result.components["similarity"] == 1.0


# --- config, batch, targets ----------------------------------------------------------------------


def test_weights_and_switches():
    completion = call_completion(GOLD_CALL["arguments"], think_words=7)  # acc 2, fmt 1, len 0.5
    config = RewardConfig(w_accuracy=2.0, w_format=0.5, w_length=4.0)
    assert score(completion, GOLD_CALL, config=config).total == pytest.approx(4 + 0.5 + 2)
    assert score(completion, GOLD_CALL, config=RewardConfig(use_format=False)).total == pytest.approx(2.5)
    assert score(completion, GOLD_CALL, config=RewardConfig(wrong_kind_penalty=-3.0)).total == pytest.approx(3.5)
    wrong = score(think(7) + "<answer>x</answer>", GOLD_CALL, config=RewardConfig(wrong_kind_penalty=-3.0))
    assert wrong.total == pytest.approx(-3 + 1 + 0.5)


def test_config_rejects_bad_constants():
    with pytest.raises(ValueError, match="length_min_words"):
        RewardConfig(length_min_words=50, length_max_words=10)
    with pytest.raises(ValueError, match="success_similarity"):
        RewardConfig(success_similarity=1.5)
    with pytest.raises(ValueError, match="w_format"):
        RewardConfig(w_format=float("nan"))


def test_score_batch_makes_one_similarity_call_for_all_answer_pairs():
    similarity = FixedSimilarity(default=0.25)
    completions = [
        think(20) + "<answer>a</answer>",
        call_completion(GOLD_CALL["arguments"]),
        think(20) + "<answer>b</answer>",
        think(20) + "<answer>c</answer>",  # answer against a tool gold: no similarity needed
    ]
    targets = [GOLD_ANSWER, GOLD_CALL, {"kind": "answer", "text": "gold b"}, GOLD_CALL]
    results = score_batch(completions, targets, similarity=similarity)
    assert similarity.calls == [(["a", "b"], [GOLD_ANSWER["text"], "gold b"])]
    assert [result.components["accuracy"] for result in results] == pytest.approx([1.25, 2.0, 1.25, -1.0])
    assert [result.total for result in results] == pytest.approx([3.25, 4.0, 3.25, 1.0])


def test_score_batch_without_answer_pairs_loads_no_similarity_model():
    config = RewardConfig(similarity="/nonexistent/similarity-model")
    results = score_batch([call_completion({})], [GOLD_CALL], config=config)
    assert results[0].kind == "tool_call"


def test_score_batch_matches_score_one_by_one():
    similarity = LexicalSimilarity()
    completions = [think(20) + "<answer>flight booked</answer>", call_completion({"origin": "SFO"}), "junk"]
    targets = [GOLD_ANSWER, GOLD_CALL, GOLD_ANSWER]
    batch = score_batch(completions, targets, similarity=similarity)
    single = [score(completion, target, similarity=similarity) for completion, target in zip(completions, targets)]
    assert batch == single


def test_malformed_targets_are_reported_by_index():
    with pytest.raises(ValueError, match="target #1.*kind"):
        score_batch(["x", "y"], [GOLD_CALL, {"kind": "speech"}])
    with pytest.raises(ValueError, match="target #0.*arguments"):
        score("x", {"kind": "tool_call", "name": "f", "arguments": [1]})
    with pytest.raises(ValueError, match="2 completions but 1 targets"):
        score_batch(["x", "y"], [GOLD_CALL])


def test_score_does_not_mutate_its_target():
    target = copy.deepcopy(GOLD_CALL)
    score(call_completion({"origin": "SFO", "passengers": 2.0}), target)
    assert target == GOLD_CALL


# --- parser on hostile output --------------------------------------------------------------------


HOSTILE = {
    "empty": "",
    "whitespace": " \n\t ",
    "unclosed think": "<think>still thinking",
    "unclosed tool": '<think>a</think><tool_call>{"name": "f"',
    "repeated tags": "<think><think>a</think></think><answer><answer>x</answer></answer>",
    "json list": "<think>a</think><tool_call>[1, 2]</tool_call>",
    "non-string name": '<think>a</think><tool_call>{"name": ["f"], "arguments": {}}</tool_call>',
    "non-dict arguments": '<think>a</think><tool_call>{"name": "f", "arguments": [1]}</tool_call>',
    "NaN constant": '<think>a</think><tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>',
    "nul bytes": "<think>\x00</think><tool_call>\x00{\"name\": \"f\\u0000\", \"arguments\": {}}</tool_call>\x00",
    "deep nesting": "<think>a</think><tool_call>" + "[" * 50_000 + "</tool_call>",
    "huge number": '<think>a</think><tool_call>{"name": "f", "arguments": {"x": ' + "9" * 5000 + "}}</tool_call>",
    "junk": ("<tool_call>{<answer></think>" + "x" * 37) * 300,
    "lone surrogate": "<think>\ud800</think><answer>\ud800</answer>",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_output_never_raises_and_stays_in_range(name):
    completion = HOSTILE[name]
    parsed = parse(completion)
    assert parsed.kind in ("tool_call", "answer", "invalid")
    for target in (GOLD_CALL, GOLD_ANSWER):
        result = score(completion, target, similarity=LexicalSimilarity())
        assert math.isfinite(result.total)
        assert -1.0 <= result.components["accuracy"] <= 2.0
        assert 0.0 <= result.components["format"] <= 1.0 and 0.0 <= result.components["length"] <= 1.0


def test_hostile_outputs_are_invalid_with_reasons():
    for name in ("json list", "non-string name", "non-dict arguments", "NaN constant", "deep nesting", "huge number"):
        parsed = parse(HOSTILE[name])
        assert parsed.kind == "invalid" and parsed.problems, name
    assert parse("").problems == ["no <think> block", "no action block (<tool_call> or <answer>)"]
    assert parse(None).kind == "invalid"  # type: ignore[arg-type]


def test_parsed_fields_of_a_well_formed_completion():
    parsed = parse(format_completion(GOLD_CALL, reasoning="Book it."))
    assert parsed.reasoning == "Book it." and parsed.think_words == 2
    assert parsed.kind == "tool_call" and parsed.call == {"name": "book_flight", "arguments": GOLD_CALL["arguments"]}
    assert parsed.answer is None and parsed.problems == []
    assert tuple(parsed.format_checks) == FORMAT_CHECKS and all(parsed.format_checks.values())
    answer = parse(format_completion(GOLD_ANSWER))
    assert answer.kind == "answer" and answer.answer == GOLD_ANSWER["text"] and answer.reasoning == ""


# --- JSON normalisation --------------------------------------------------------------------------


def test_canonical_json_rules():
    assert canonical_json({"b": 1, "a": [1.0, True]}) == '{"a":[1,true],"b":1}'
    assert json_equal({"x": 1}, {"x": 1.0})
    assert not json_equal({"x": "5"}, {"x": 5})
    assert not json_equal({"x": True}, {"x": 1})
    assert not json_equal({"x": None}, {})
    assert not json_equal([1, 2], [2, 1])
    assert json_equal("ünï", "ünï")
    assert canonical_json({1, 2}) is None and not json_equal({1, 2}, {1, 2})  # not JSON: equal to nothing


# --- CLI -----------------------------------------------------------------------------------------


def _run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "rewards.score", *args], cwd=REPO_ROOT, env=env, input=stdin,
        capture_output=True, text=True, timeout=120,
    )


def test_cli_prints_components_as_json():
    completion = call_completion({"origin": "SFO", "destination": "JFK", "passengers": 3})
    process = _run_cli("--completion", completion, "--target", json.dumps(GOLD_CALL), "--json")
    assert process.returncode == 0, process.stderr
    assert "RuntimeWarning" not in process.stderr
    output = json.loads(process.stdout)
    assert output["total"] == pytest.approx(3.8) and output["success"] is False
    assert output["components"]["accuracy"] == pytest.approx(1.8)


def test_cli_table_reads_stdin_and_honours_switches():
    completion = think(7) + "<answer>flight booked</answer>"
    process = _run_cli("--completion", "-", "--target", json.dumps(GOLD_ANSWER), "--similarity", "lexical",
                       "--no-length", stdin=completion)
    assert process.returncode == 0, process.stderr
    lines = dict(line.split(None, 1) for line in process.stdout.strip().splitlines())
    # Token F1: 2 shared tokens ("flight", "booked") of 2 + 8: 2 * 2 / 10 = 0.4.
    assert float(lines["similarity"]) == pytest.approx(0.4, abs=1e-4)
    assert float(lines["length"]) == pytest.approx(0.5)
    assert float(lines["total"]) == pytest.approx(1.4 + 1, abs=1e-4)


def test_cli_rejects_a_bad_target():
    process = _run_cli("--completion", "x", "--target", '{"kind": "speech"}')
    assert process.returncode == 2 and "kind" in process.stderr
    process = _run_cli("--completion", "x", "--target", "{not json")
    assert process.returncode == 2 and "--target" in process.stderr
