"""The row machinery shared by the source parsers (data.source_apigen, data.source_tau,
data.source_almita): the error and statistics types, per-row quirk counts, JSON decoding, tool
schemas, and the row loop that turns a malformed row into a `DataError` or a skip.

Names with a leading underscore are internal to the data package's loaders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from data.types import Conversation, Turn

ON_ERROR: tuple[str, ...] = ("raise", "skip")


class DataError(ValueError):
    """A malformed record.  The message names the file (or source), the row index and the field."""

    def __init__(self, source: str, row: int | None, field_name: str | None, problem: str):
        where = source if row is None else f"{source}: row {row}"
        if field_name:
            where += f": field {field_name!r}"
        super().__init__(f"{where}: {problem}")
        self.source, self.row, self.field, self.problem = source, row, field_name, problem


@dataclass
class LoadStats:
    """What a loader read, kept, dropped and repaired.

    rows: records read (a JSON row; for a CSV, a conversation); conversations: kept;
    skipped: malformed rows dropped in "skip" mode, with one reason each in skipped_reasons;
    filtered_failed: tau-bench trajectories dropped because reward != 1.0.
    The remaining counters are the source quirks listed in the source modules' docstrings.
    """

    source: str = ""
    format: str = ""
    rows: int = 0
    conversations: int = 0
    skipped: int = 0
    skipped_reasons: list[str] = field(default_factory=list)
    filtered_failed: int = 0
    undeclared_tool_calls: int = 0
    undeclared_tools: dict[str, int] = field(default_factory=dict)
    double_encoded_arguments: int = 0
    empty_observations: int = 0
    ends_on_observation: int = 0
    consecutive_assistant_turns: int = 0
    empty_assistant_turns: int = 0
    parallel_tool_calls: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


class _RowError(Exception):
    """Raised inside one row's parser; the row loop turns it into a DataError or a skip."""

    def __init__(self, field_name: str, problem: str):
        super().__init__(problem)
        self.field, self.problem = field_name, problem


@dataclass
class _RowQuirks:
    """Quirk counts of one row, added to LoadStats only when the row is kept."""

    undeclared: dict[str, int] = field(default_factory=dict)
    double_encoded_arguments: int = 0
    empty_observations: int = 0
    ends_on_observation: int = 0
    consecutive_assistant_turns: int = 0
    empty_assistant_turns: int = 0
    parallel_tool_calls: int = 0

    def add_to(self, stats: LoadStats) -> None:
        for name, count in self.undeclared.items():
            stats.undeclared_tools[name] = stats.undeclared_tools.get(name, 0) + count
            stats.undeclared_tool_calls += count
        stats.double_encoded_arguments += self.double_encoded_arguments
        stats.empty_observations += self.empty_observations
        stats.ends_on_observation += self.ends_on_observation
        stats.consecutive_assistant_turns += self.consecutive_assistant_turns
        stats.empty_assistant_turns += self.empty_assistant_turns
        stats.parallel_tool_calls += self.parallel_tool_calls



def _check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")


def _decode_json_object(
    value: Any, field_name: str, quirks: _RowQuirks | None = None, expected_layers: int = 1,
) -> dict[str, Any]:
    """A JSON object given as a dict or as (possibly repeatedly) JSON-encoded text.

    Real APIGen rows sometimes encode `arguments` once more than the text around them
    ('"{\\"id\\": 1}"' inside an already decoded call); every layer of encoding is decoded, and
    a value with more than `expected_layers` layers is counted as double-encoded.  Empty text
    means no arguments.
    """
    layers = 0
    while isinstance(value, str):
        if not value.strip():
            return {}
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise _RowError(field_name, f"not valid JSON ({error.msg} at char {error.pos})") from None
        layers += 1
        if layers > 3:
            raise _RowError(field_name, "JSON encoded more than three times")
    if not isinstance(value, dict):
        raise _RowError(field_name, f"expected a JSON object, got {type(value).__name__}")
    if layers > expected_layers and quirks is not None:
        quirks.double_encoded_arguments += 1
    return value


def normalize_tools(tools: Any, field_name: str = "tools") -> list[dict[str, Any]]:
    """Tool definitions -> OpenAI-style `{"type": "function", "function": {...}}` schemas.

    Accepts a list or its JSON text; each item either already OpenAI-style or a bare
    `{name, description, parameters}` definition.  None or "" means no tools.
    """
    if tools is None or (isinstance(tools, str) and not tools.strip()):
        return []
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as error:
            raise _RowError(field_name, f"not valid JSON ({error.msg} at char {error.pos})") from None
    if isinstance(tools, dict):  # a single definition
        tools = [tools]
    if not isinstance(tools, list):
        raise _RowError(field_name, f"expected a list of tool definitions, got {type(tools).__name__}")
    schemas = []
    for index, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise _RowError(f"{field_name}[{index}]", f"expected an object, got {type(tool).__name__}")
        function = tool.get("function", tool) if tool.get("type", "function") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _RowError(f"{field_name}[{index}]", "tool definition without a string 'name'")
        problem = parameters_schema_problem(function.get("parameters"))
        if problem:
            raise _RowError(f"{field_name}[{index}].parameters", f"tool {function['name']!r}: {problem}")
        schemas.append({"type": "function", "function": dict(function)})
    return schemas


def parameters_schema_problem(parameters: Any) -> str | None:
    """What makes a tool's `parameters` an unusable JSON schema, or None when it is usable.

    A minimal structural check (not a JSON-Schema validator): absent/None is allowed (a tool
    without arguments); otherwise an object whose `type`, if given, is a string, whose
    `properties`, if given, maps names to schema objects, and whose `required`, if given, is a
    list of strings.  These are the parts the renderer and the rewards read.
    """
    if parameters is None:
        return None
    if not isinstance(parameters, dict):
        return f"parameters must be a JSON schema object, got {type(parameters).__name__}"
    if "type" in parameters and not isinstance(parameters["type"], str):
        return f"parameters 'type' must be a string, got {parameters['type']!r}"
    properties = parameters.get("properties", {})
    if not isinstance(properties, dict):
        return f"parameters 'properties' must be an object, got {type(properties).__name__}"
    for name, schema in properties.items():
        if not isinstance(schema, dict):
            return f"property {name!r} must be a schema object, got {type(schema).__name__}"
    required = parameters.get("required", [])
    if not isinstance(required, list) or not all(isinstance(name, str) for name in required):
        return f"parameters 'required' must be a list of names, got {required!r}"
    return None


def tool_names(tools: list[dict[str, Any]]) -> set[str]:
    return {tool["function"]["name"] for tool in tools}


def _text(value: Any, field_name: str, *, allow_none: bool = False) -> str:
    if value is None and allow_none:
        return ""
    if not isinstance(value, str):
        raise _RowError(field_name, f"expected a string, got {type(value).__name__}")
    return value


def _optional_reasoning(value: Any, field_name: str) -> str | None:
    if value is None:
        return None
    text = _text(value, field_name).strip()
    return text or None


def _count_turn_quirks(turns: list[Turn], declared: set[str], quirks: _RowQuirks) -> None:
    """Quirks that are properties of the finished turn list (same rule for every source)."""
    for previous, turn in zip(turns, turns[1:]):
        if previous.role == "assistant" and turn.role == "assistant":
            quirks.consecutive_assistant_turns += 1
    for turn in turns:
        if turn.role == "tool_call" and turn.name not in declared:
            quirks.undeclared[turn.name] = quirks.undeclared.get(turn.name, 0) + 1
        if turn.role == "tool" and not turn.content.strip():
            quirks.empty_observations += 1
    if turns and turns[-1].role == "tool":
        quirks.ends_on_observation += 1


def _unique_id(wanted: str, seen: set[str]) -> str:
    """`wanted`, or `wanted#2`, `wanted#3`... so that ids stay unique within one load."""
    candidate, copy = wanted, 1
    while candidate in seen:
        copy += 1
        candidate = f"{wanted}#{copy}"
    seen.add(candidate)
    return candidate


def _parse_rows(
    rows: list[Any],
    parse_row: Callable[[Any, int], tuple[Conversation | None, _RowQuirks]],
    stats: LoadStats,
    on_error: str,
) -> list[Conversation]:
    """Run `parse_row` over rows; a None conversation means "filtered on purpose" (not an error)."""
    conversations: list[Conversation] = []
    for index, row in enumerate(rows):
        stats.rows += 1
        try:
            conversation, quirks = parse_row(row, index)
        except _RowError as error:
            if on_error == "raise":
                raise DataError(stats.source, index, error.field, error.problem) from None
            stats.skipped += 1
            stats.skipped_reasons.append(f"row {index}: field {error.field!r}: {error.problem}")
            continue
        if conversation is not None:
            quirks.add_to(stats)
            conversations.append(conversation)
    stats.conversations = len(conversations)
    return conversations
