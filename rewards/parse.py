"""Read a completion as `<think>REASONING</think>` + one action, leniently but honestly.

The format (data/format.py):

    <think>REASONING</think> <tool_call>{"name": ..., "arguments": {...}}</tool_call>
    <think>REASONING</think> <answer>TEXT</answer>

`parse` never raises on model output (empty text, unclosed or repeated tags, broken JSON, NUL
bytes, huge junk): it extracts whatever it can and lists every deviation in `problems`.  It also
records the five format checks of R_fmt (DESIGN, "Rewards"); R_fmt is their mean.

Decisions the DESIGN leaves open (ours):

* Think block.  "Present" means `<think>` followed later by `</think>`; its text (stripped) is the
  reasoning and `think_words = len(reasoning.split())`.  Action tags inside a closed think block
  are reasoning text, not actions.  Leniency without credit: a `</think>` with no `<think>`
  (e.g. a prompt that pre-filled `<think>`) makes everything before it the reasoning, and an
  unclosed `<think>` runs to the first action tag; in both cases the block counts as absent.
* "It comes first": only whitespace before `<think>`.  With no think block this check fails too
  (a missing block cannot come first), so a bare, perfect action scores R_fmt = 3/5.
* Actions are searched after the think block (the whole text when there is none).  Each action
  block runs from its opening tag to the first matching closing tag (to the end of the text when
  unclosed); the next block is searched after it.  The *first* block decides the kind.
* "Exactly one action block follows it": exactly one block (closed or not), with only whitespace
  between `</think>` (or the start of the text) and its opening tag.  A tool call and an answer
  in one completion are two blocks: this check fails, and so does the next one.
* "Nothing but whitespace follows the action block": the first block is closed and after its
  closing tag there is only whitespace or end-of-turn markers (`<|im_end|>`, `<|endoftext|>`), in
  case the sampler decodes them.  An unclosed block fails this check.
* An unclosed first block is no action: kind `"invalid"` (R_acc = -1), body check failed.  Its end
  is unknown, so reading "to the end of the text" would score whatever follows.  GRPO exploited
  that when an unclosed answer still counted: a tiny model that writes reasoning learned to run on
  after `<answer>` (into more think and tool-call text, until the token limit): over a third of
  its greedy test outputs were such run-ons, scored as right answers with their similarity.
* "The body parses": a tool-call body must be a JSON object (strict JSON: no NaN/Infinity, no
  trailing text) with a string `name` and an object `arguments`.  For an answer the body must be
  non-empty after stripping.  With no action block the check fails.
* Kind.  `"tool_call"` when the first block is a closed tool call whose body is a JSON object with a
  string `name` and whose `arguments` are an object, missing/null (read as `{}`, for tools
  without parameters) or a JSON string holding an object (OpenAI style); the last two are listed
  as problems and fail the body check.  Any other tool-call body (broken JSON, a list, a
  non-string name, non-object arguments) is `"invalid"`, as is a completion without action block.
  `"answer"` when the first block is a closed answer (its stripped text, possibly empty).
* Argument values are compared in canonical JSON (`canonical_json`): key order and whitespace do
  not matter, types do (`"5"` != `5`, `true` != `1`, `null` != missing key), list order matters,
  and `1 == 1.0` (JSON has a single number type; a float with an integral value is an integer).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from data.format import ANSWER_CLOSE, ANSWER_OPEN, IM_END, THINK_CLOSE, THINK_OPEN, TOOL_CLOSE, TOOL_OPEN

END_OF_TURN_MARKERS: tuple[str, ...] = (IM_END, "<|endoftext|>")
# The five conditions of R_fmt, in the order the DESIGN lists them.
FORMAT_CHECKS: tuple[str, ...] = ("think_present", "think_first", "one_action", "clean_end", "valid_body")
KINDS: tuple[str, ...] = ("tool_call", "answer", "invalid")

_ACTION_OPEN = re.compile(f"{re.escape(TOOL_OPEN)}|{re.escape(ANSWER_OPEN)}")
_CLOSE_TAG = {TOOL_OPEN: TOOL_CLOSE, ANSWER_OPEN: ANSWER_CLOSE}
_KIND_OF_TAG = {TOOL_OPEN: "tool_call", ANSWER_OPEN: "answer"}
_MAX_PROBLEM_DETAIL = 120  # characters of a parser error message kept in `problems`


@dataclass(frozen=True)
class ActionBlock:
    """One `<tool_call>...</tool_call>` or `<answer>...</answer>` span of the completion."""

    kind: str  # "tool_call" | "answer", from the opening tag
    body: str  # text between the tags; to the end of the text when unclosed
    start: int  # index of the opening tag
    end: int  # index just past the closing tag; len(text) when unclosed
    closed: bool


@dataclass(frozen=True)
class Parsed:
    """What a completion says, and how well it follows the format.

    reasoning: stripped think text, None when there is neither `<think>` nor `</think>`.
    kind: "tool_call" | "answer" | "invalid" (decided by the first action block).
    call: {"name": str, "arguments": dict} when kind == "tool_call", else None.
    answer: stripped answer text when kind == "answer", else None.
    problems: human-readable format deviations, in the order found.
    think_words: whitespace-separated words of the reasoning (0 when None).
    format_checks: the five R_fmt conditions (FORMAT_CHECKS) -> held or not.
    """

    reasoning: str | None
    kind: str
    call: dict[str, Any] | None
    answer: str | None
    problems: list[str]
    think_words: int
    format_checks: dict[str, bool]

    @property
    def format_fraction(self) -> float:
        """R_fmt: the share of format checks that hold, in [0, 1]."""
        return sum(self.format_checks.values()) / len(FORMAT_CHECKS)


def parse(completion: str) -> Parsed:
    """Split a completion into reasoning and its first action; never raises on model output."""
    text, problems = _as_text(completion)
    reasoning, action_start, think_present, think_first, think_problems = _read_think(text)
    problems = problems + think_problems
    blocks = _action_blocks(text, action_start)

    one_action = len(blocks) == 1 and not text[action_start : blocks[0].start].strip()
    if not blocks:
        problems.append("no action block (<tool_call> or <answer>)")
    else:
        if len(blocks) > 1:
            problems.append(f"{len(blocks)} action blocks; the first one decides the kind")
        if text[action_start : blocks[0].start].strip():
            problems.append("text before the action block")

    clean_end = False
    kind, call, answer, valid_body = "invalid", None, None, False
    if blocks:
        first = blocks[0]
        if not first.closed:  # kind stays "invalid": an action without its end is no action
            tag = TOOL_OPEN if first.kind == "tool_call" else ANSWER_OPEN
            problems.append(f"unclosed {tag} block (not an action)")
        else:
            clean_end = _is_end_of_turn(text[first.end :])
            if not clean_end:
                problems.append("text after the action block")
            if first.kind == "answer":
                kind, answer = "answer", first.body.strip()
                valid_body = bool(answer)
                if not answer:
                    problems.append("empty answer")
            else:
                call, call_problems = _read_call(first.body)
                problems.extend(call_problems)
                kind = "tool_call" if call is not None else "invalid"
                valid_body = call is not None and not call_problems

    checks = dict(
        zip(FORMAT_CHECKS, (think_present, think_first, one_action, clean_end, valid_body), strict=True)
    )
    return Parsed(
        reasoning=reasoning,
        kind=kind,
        call=call,
        answer=answer,
        problems=problems,
        think_words=len(reasoning.split()) if reasoning else 0,
        format_checks=checks,
    )


def canonical_json(value: Any) -> str | None:
    """The comparison form of a JSON value: sorted keys, no whitespace, integral floats as ints.

    Returns None for a value that cannot be serialised (non-JSON types, nesting deeper than the
    recursion limit); `json_equal` treats None as equal to nothing.
    """
    try:
        return json.dumps(_integral_floats_as_ints(value), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError):
        return None


def json_equal(left: Any, right: Any) -> bool:
    """Equality after JSON normalisation (see the module docstring)."""
    left_form = canonical_json(left)
    return left_form is not None and left_form == canonical_json(right)


def _integral_floats_as_ints(value: Any) -> Any:
    # bool is an int subclass: check it first so that true stays true, not 1.
    if isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _integral_floats_as_ints(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_integral_floats_as_ints(item) for item in value]
    return value


def _as_text(completion: Any) -> tuple[str, list[str]]:
    """Model output should be str; accept None and bytes too rather than raise."""
    if isinstance(completion, str):
        return completion, []
    if completion is None:
        return "", ["completion is None"]
    if isinstance(completion, (bytes, bytearray)):
        return bytes(completion).decode("utf-8", errors="replace"), ["completion is bytes"]
    return str(completion), [f"completion is a {type(completion).__name__}, not a str"]


def _read_think(text: str) -> tuple[str | None, int, bool, bool, list[str]]:
    """(reasoning, index where actions are searched from, think_present, think_first, problems)."""
    open_at = text.find(THINK_OPEN)
    if open_at < 0:
        close_at = text.find(THINK_CLOSE)
        if close_at < 0:
            return None, 0, False, False, ["no <think> block"]
        return text[:close_at].strip(), close_at + len(THINK_CLOSE), False, False, ["</think> without <think>"]

    reasoning_start = open_at + len(THINK_OPEN)
    close_at = text.find(THINK_CLOSE, reasoning_start)
    if close_at < 0:
        action = _ACTION_OPEN.search(text, reasoning_start)
        reasoning_end = action.start() if action else len(text)
        return text[reasoning_start:reasoning_end].strip(), reasoning_end, False, False, ["unclosed <think> block"]

    think_first = not text[:open_at].strip()
    problems = [] if think_first else ["text before <think>"]
    return text[reasoning_start:close_at].strip(), close_at + len(THINK_CLOSE), True, think_first, problems


def _action_blocks(text: str, start: int) -> list[ActionBlock]:
    """Every action block from `start` on, left to right, each searched after the previous one."""
    blocks: list[ActionBlock] = []
    position = start
    while (opening := _ACTION_OPEN.search(text, position)) is not None:
        tag = opening.group(0)
        body_start = opening.end()
        close_at = text.find(_CLOSE_TAG[tag], body_start)
        if close_at < 0:
            blocks.append(ActionBlock(_KIND_OF_TAG[tag], text[body_start:], opening.start(), len(text), False))
            break
        end = close_at + len(_CLOSE_TAG[tag])
        blocks.append(ActionBlock(_KIND_OF_TAG[tag], text[body_start:close_at], opening.start(), end, True))
        position = end
    return blocks


def _is_end_of_turn(rest: str) -> bool:
    for marker in END_OF_TURN_MARKERS:
        rest = rest.replace(marker, "")
    return not rest.strip()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _loads_strict(text: str) -> tuple[Any, str | None]:
    """(value, None) or (None, error message). Strict JSON: NaN/Infinity are refused."""
    try:
        return json.loads(text, parse_constant=_reject_constant), None
    except (ValueError, RecursionError) as error:  # JSONDecodeError is a ValueError
        return None, f"{type(error).__name__}: {error}"[:_MAX_PROBLEM_DETAIL]


def _read_call(body: str) -> tuple[dict[str, Any] | None, list[str]]:
    """(call or None, problems) for a tool-call body; None means the body is not a usable call."""
    value, error = _loads_strict(body.strip())
    if error is not None:
        return None, [f"tool-call body is not valid JSON ({error})"]
    if not isinstance(value, dict):
        return None, [f"tool-call JSON is not an object (got {type(value).__name__})"]
    name = value.get("name")
    if not isinstance(name, str):
        return None, [f"tool-call name is not a string (got {type(name).__name__})"]

    arguments = value.get("arguments")
    if isinstance(arguments, dict):
        return {"name": name, "arguments": arguments}, []
    if arguments is None:
        return {"name": name, "arguments": {}}, ["tool-call arguments missing or null (read as {})"]
    if isinstance(arguments, str):
        decoded, error = _loads_strict(arguments)
        if error is None and isinstance(decoded, dict):
            return {"name": name, "arguments": decoded}, ["tool-call arguments are a JSON string, not an object"]
    return None, [f"tool-call arguments are not an object (got {type(arguments).__name__})"]
