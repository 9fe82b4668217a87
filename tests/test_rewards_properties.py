"""Property tests: no model output makes the reward raise, leave its range, or ignore its own rules."""

from __future__ import annotations

import json
import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from data.format import (
    ANSWER_CLOSE, ANSWER_OPEN, IM_END, THINK_CLOSE, THINK_OPEN, TOOL_CLOSE, TOOL_OPEN, format_completion,
)
from rewards import FORMAT_CHECKS, RewardConfig, json_equal, parse, score, score_batch, tool_call_match

QUICK = settings(max_examples=200, deadline=None)
TAGS = [THINK_OPEN, THINK_CLOSE, TOOL_OPEN, TOOL_CLOSE, ANSWER_OPEN, ANSWER_CLOSE, IM_END]
TARGETS = [
    {"kind": "tool_call", "name": "f", "arguments": {"a": 1, "b": "x"}},
    {"kind": "tool_call", "name": "g", "arguments": {}},
    {"kind": "answer", "text": "the answer"},
]

# JSON values without NaN/inf; strings without "<" so that no value can contain a closing tag.
safe_text = st.text(st.characters(blacklist_characters="<", blacklist_categories=("Cs",)), max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    | safe_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(safe_text, children, max_size=4),
    max_leaves=12,
)
arguments_dicts = st.dictionaries(safe_text, json_values, max_size=5)
tool_bodies = st.one_of(
    json_values.map(json.dumps),
    st.builds(lambda name, arguments: json.dumps({"name": name, "arguments": arguments}), json_values, json_values),
    st.text(max_size=40),
)
# Text assembled from tags, junk and JSON bodies reaches the parser's interesting branches.
tagged_text = st.lists(
    st.one_of(st.sampled_from(TAGS), st.text(max_size=15), tool_bodies), max_size=12
).map("".join)
valid_calls = st.builds(
    lambda name, arguments: json.dumps({"name": name, "arguments": arguments}),
    st.sampled_from(["f", "g", "h"]), st.one_of(arguments_dicts, st.just({"a": 1, "b": "x"})),
)


def optional(strategy: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(st.just(""), strategy)


action_blocks = st.one_of(
    st.builds(lambda body, close: f"{TOOL_OPEN}{body}{close}", st.one_of(valid_calls, valid_calls, tool_bodies),
              st.sampled_from([TOOL_CLOSE, TOOL_CLOSE, ""])),
    st.builds(lambda text, close: f"{ANSWER_OPEN}{text}{close}", st.text(max_size=30),
              st.sampled_from([ANSWER_CLOSE, ANSWER_CLOSE, ""])),
)
# Near-miss completions: every part of the format present, absent or damaged.
structured_text = st.builds(
    lambda prefix, think_open, reasoning, think_close, middle, actions, suffix: "".join(
        [prefix, think_open, reasoning, think_close, middle, *actions, suffix]),
    optional(st.text(max_size=5)), st.sampled_from([THINK_OPEN, THINK_OPEN, ""]),
    st.text(st.characters(blacklist_characters="<"), max_size=200), st.sampled_from([THINK_CLOSE, THINK_CLOSE, ""]),
    optional(st.text(max_size=5)), st.lists(action_blocks, min_size=1, max_size=3),
    optional(st.sampled_from([IM_END, "\n", "junk"])),
)
model_output = st.one_of(st.text(max_size=300), tagged_text, structured_text)


def random_similarity(predictions, golds):
    """Hostile backend: NaN, infinities and out-of-range values among ordinary ones."""
    generator = random.Random(len(predictions))
    choices = [0.0, 0.3, 1.0, -2.0, 5.0, math.nan, math.inf, -math.inf]
    return [generator.choice(choices) for _ in predictions]


def assert_in_range(result, config: RewardConfig) -> None:
    low, high = config.total_range
    components = result.components
    assert math.isfinite(result.total) and low - 1e-9 <= result.total <= high + 1e-9
    assert all(math.isfinite(value) for value in components.values())
    assert components["accuracy"] == config.wrong_kind_penalty or 1.0 <= components["accuracy"] <= 2.0
    assert 0.0 <= components["format"] <= 1.0 and 0.0 <= components["length"] <= 1.0
    assert components["similarity_nan"] in (0.0, 1.0) and components["kind_match"] in (0.0, 1.0)
    if "similarity" in components:
        assert 0.0 <= components["similarity"] <= 1.0
    expected_total = (
        config.w_accuracy * components["accuracy"]
        + (config.w_format * components["format"] if config.use_format else 0.0)
        + (config.w_length * components["length"] if config.use_length else 0.0)
    )
    assert math.isclose(result.total, expected_total, abs_tol=1e-9)
    if result.success:
        assert components["kind_match"] == 1.0 and components["accuracy"] >= 1.0


@QUICK
@given(model_output)
def test_parse_never_raises_and_is_consistent(text):
    parsed = parse(text)
    assert parsed.kind in ("tool_call", "answer", "invalid")
    assert tuple(parsed.format_checks) == FORMAT_CHECKS
    assert 0.0 <= parsed.format_fraction <= 1.0
    assert parsed.think_words >= 0 and (parsed.reasoning is not None or parsed.think_words == 0)
    assert (parsed.call is not None) == (parsed.kind == "tool_call")
    assert (parsed.answer is not None) == (parsed.kind == "answer")
    if parsed.call is not None:
        assert isinstance(parsed.call["name"], str) and isinstance(parsed.call["arguments"], dict)
    if parsed.format_fraction == 1.0:
        assert parsed.problems == []


@QUICK
@given(st.lists(model_output, min_size=1, max_size=4), st.data())
def test_score_batch_stays_in_range_for_any_output(texts, data):
    targets = [data.draw(st.sampled_from(TARGETS)) for _ in texts]
    config = data.draw(st.sampled_from([RewardConfig(), RewardConfig(use_length=False, w_format=0.5)]))
    for result in score_batch(texts, targets, config=config, similarity=random_similarity):
        assert_in_range(result, config)


@QUICK
@given(safe_text.filter(lambda name: name.strip() != ""), arguments_dicts, safe_text)
def test_the_gold_completion_gets_full_accuracy_and_format(name, arguments, reasoning):
    target = {"kind": "tool_call", "name": name, "arguments": arguments}
    result = score(format_completion(target, reasoning=reasoning), target)
    assert result.success
    assert result.components["accuracy"] == 2.0 and result.components["format"] == 1.0


@QUICK
@given(arguments_dicts, arguments_dicts, st.booleans())
def test_tool_call_quality_is_in_range_and_one_only_for_an_exact_call(gold, predicted, same_name):
    target = {"kind": "tool_call", "name": "f", "arguments": gold}
    quality, details = tool_call_match({"name": "f" if same_name else "h", "arguments": predicted}, target)
    assert 0.0 <= quality <= 1.0
    assert (quality == 1.0) == (same_name and json_equal(predicted, gold))
    assert details["arguments_match"] == float(same_name and json_equal(predicted, gold))
    if not same_name:
        assert quality == 0.0


@QUICK
@given(arguments_dicts, st.randoms(use_true_random=False))
def test_argument_key_order_never_matters(arguments, generator):
    shuffled_items = list(arguments.items())
    generator.shuffle(shuffled_items)
    body = json.dumps({"arguments": dict(shuffled_items), "name": "f"}, indent=generator.choice([None, 1, 4]))
    target = {"kind": "tool_call", "name": "f", "arguments": arguments}
    assert score(f"<think>x</think>{TOOL_OPEN}{body}{TOOL_CLOSE}", target).success


def _is_object_string(value) -> bool:
    """A string holding a strict-JSON object (NaN/Infinity refused, as the parser does)."""

    def refuse(constant: str):
        raise ValueError(constant)

    try:
        return isinstance(value, str) and isinstance(json.loads(value, parse_constant=refuse), dict)
    except ValueError:
        return False


@QUICK
@given(json_values, st.one_of(json_values, arguments_dicts, arguments_dicts.map(json.dumps)))
def test_a_call_is_recognised_exactly_when_name_and_arguments_are_usable(name, arguments):
    parsed = parse(f"<think>x</think>{TOOL_OPEN}{json.dumps({'name': name, 'arguments': arguments})}{TOOL_CLOSE}")
    usable_arguments = arguments is None or isinstance(arguments, dict) or _is_object_string(arguments)
    usable = isinstance(name, str) and usable_arguments
    assert (parsed.kind == "tool_call") == usable
    assert parsed.format_checks["valid_body"] == (isinstance(name, str) and isinstance(arguments, dict))
