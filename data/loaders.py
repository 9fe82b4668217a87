"""Read every supported source into neutral `Conversation`s (see data/types.py).

Sources and what each loader does with them:

* **APIGen-MT** (ShareGPT-like JSON array; `parse_apigen_rows` for rows already in memory).
  Each row: `system` (str), `tools` (a JSON *string* of bare `{name, description, parameters}`
  definitions, or a list), `conversations`: `[{from, value}]` with `from` in human / gpt /
  function_call / observation.  A function_call's value is `{"name", "arguments"}` as JSON.
  "gpt" and "function_call" entries may carry an extra `reasoning` string (the synthetic
  cold-start set does), kept in `Turn.reasoning`.  Quirks of the real data, all handled and
  counted in `LoadStats`:
    - `arguments` is sometimes itself a JSON-encoded string: decoded again;
    - the `think` tool returns an empty observation: kept as an empty tool result;
    - a conversation may end on an observation: kept (it yields no sample);
    - two gpt turns in a row: both kept, each is its own answer sample;
    - calls to tools the row does not declare: kept, counted per tool name;
    - an assistant turn with no text and no call: dropped (there is nothing to learn), counted.
* **tau-bench** trajectories (JSON array of `{task_id, trial, reward, traj: [OpenAI messages]}`;
  rows with `messages` instead of `traj` are read the same way).  Only `reward == 1.0` rows are
  kept unless `include_failed` (rows without a `reward` key are kept: nothing says they failed).
  An assistant message with text and a tool call becomes one tool-call turn whose text is its
  reasoning.  Tool schemas come from `tools.json` beside the file, or a row's own `tools`.
* **ALMITA** (Zendesk) CSV, one row per turn.  Columns are mapped by header name (see
  `ALMITA_COLUMNS` for the accepted names); a file whose header lacks a required column fails
  with a message listing the expected and the found columns.  Rows are grouped into
  conversations by the conversation-id column and ordered by the turn column when there is one.

Error handling (`on_error`): "raise" stops at the first malformed row with a `DataError` naming
the file, the row index and the field; "skip" drops the whole row (for the CSV: the whole
conversation the bad line belongs to), counts it and records the reason.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from data.types import Conversation, Turn

FORMATS: tuple[str, ...] = ("apigen", "tau", "almita")
ON_ERROR: tuple[str, ...] = ("raise", "skip")
SYNTHETIC_SPLITS: tuple[str, ...] = ("train", "test", "ood_test", "coldstart")
SYNTHETIC_PREFIX = "synthetic:"


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
    The remaining counters are the source quirks listed in the module docstring.
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


# ---------------------------------------------------------------------------------------------
# Shared helpers


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


# ---------------------------------------------------------------------------------------------
# APIGen-MT

_APIGEN_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                 "function_call": "tool_call", "observation": "tool"}


def _parse_apigen_row(row: Any, index: int, source_name: str, seen_ids: set[str]) -> tuple[Conversation, _RowQuirks]:
    if not isinstance(row, dict):
        raise _RowError("<row>", f"expected a JSON object, got {type(row).__name__}")
    quirks = _RowQuirks()
    system = _text(row.get("system", ""), "system", allow_none=True)
    tools = normalize_tools(row.get("tools"), "tools")
    entries = row.get("conversations")
    if not isinstance(entries, list) or not entries:
        raise _RowError("conversations", "expected a non-empty list of {from, value} turns")

    turns: list[Turn] = []
    last_call_name: str | None = None
    for position, entry in enumerate(entries):
        where = f"conversations[{position}]"
        if not isinstance(entry, dict):
            raise _RowError(where, f"expected an object, got {type(entry).__name__}")
        speaker = entry.get("from")
        role = _APIGEN_ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise _RowError(f"{where}.from", f"unknown speaker {speaker!r} (expected one of {sorted(_APIGEN_ROLES)})")
        value = entry.get("value")
        reasoning = _optional_reasoning(entry.get("reasoning"), f"{where}.reasoning")
        if role == "tool_call":
            call = _decode_json_object(value, f"{where}.value")
            name = call.get("name")
            if not isinstance(name, str) or not name:
                raise _RowError(f"{where}.value", "function call without a string 'name'")
            # `value` was the encoded text; arguments inside it should already be an object.
            arguments = _decode_json_object(call.get("arguments", {}), f"{where}.value.arguments", quirks,
                                            expected_layers=0)
            turns.append(Turn("tool_call", name=name, arguments=arguments, reasoning=reasoning))
            last_call_name = name
        elif role == "tool":
            # Some exports store a structured observation instead of its JSON text.
            content = json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else value
            turns.append(Turn("tool", content=_text(content, f"{where}.value", allow_none=True), name=last_call_name))
        elif role == "assistant":
            text = _text(value, f"{where}.value", allow_none=True)
            if not text.strip():
                quirks.empty_assistant_turns += 1
                continue
            turns.append(Turn("assistant", content=text, reasoning=reasoning))
        else:
            turns.append(Turn("user", content=_text(value, f"{where}.value")))

    _count_turn_quirks(turns, tool_names(tools), quirks)
    raw_id = row.get("id", row.get("conversation_id"))
    conversation_id = _unique_id(str(raw_id) if raw_id is not None else f"{source_name}-{index}", seen_ids)
    meta = {key: value for key, value in row.items() if key not in ("system", "tools", "conversations")}
    meta.update(source="apigen", row=index)
    return Conversation(conversation_id, system, tools, turns, meta), quirks


def parse_apigen_rows(
    rows: list[dict[str, Any]], *, source: str = "<memory>", on_error: str = "raise"
) -> tuple[list[Conversation], LoadStats]:
    """APIGen-MT rows (already decoded JSON objects) -> conversations and stats."""
    _check_on_error(on_error)
    if not isinstance(rows, list):
        raise DataError(source, None, None, f"expected a list of rows, got {type(rows).__name__}")
    stats = LoadStats(source=source, format="apigen")
    source_name = Path(source).stem if not source.startswith("<") else "apigen"
    seen_ids: set[str] = set()
    conversations = _parse_rows(
        rows, lambda row, index: _parse_apigen_row(row, index, source_name, seen_ids), stats, on_error
    )
    return conversations, stats


# ---------------------------------------------------------------------------------------------
# tau-bench


def _parse_tau_row(
    row: Any, index: int, source_name: str, file_tools: list[dict[str, Any]], include_failed: bool,
    seen_ids: set[str], stats: LoadStats,
) -> tuple[Conversation | None, _RowQuirks]:
    if not isinstance(row, dict):
        raise _RowError("<row>", f"expected a JSON object, got {type(row).__name__}")
    quirks = _RowQuirks()
    reward = row.get("reward")
    if reward is not None and (isinstance(reward, bool) or not isinstance(reward, (int, float))):
        raise _RowError("reward", f"expected a number, got {reward!r}")
    if reward is not None and reward != 1.0 and not include_failed:
        stats.filtered_failed += 1
        return None, quirks
    messages_key = "traj" if "traj" in row else "messages"
    messages = row.get(messages_key)
    if not isinstance(messages, list) or not messages:
        raise _RowError(messages_key, "expected a non-empty list of messages")
    tools = normalize_tools(row["tools"], "tools") if "tools" in row else file_tools

    system = ""
    turns: list[Turn] = []
    for position, message in enumerate(messages):
        where = f"{messages_key}[{position}]"
        if not isinstance(message, dict):
            raise _RowError(where, f"expected an object, got {type(message).__name__}")
        role = message.get("role")
        content = _text(message.get("content"), f"{where}.content", allow_none=True)
        if role == "system":
            if position != 0:
                raise _RowError(f"{where}.role", "a system message after the first message")
            system = content
        elif role == "user":
            turns.append(Turn("user", content=content))
        elif role == "assistant":
            calls = message.get("tool_calls") or []
            if not isinstance(calls, list):
                raise _RowError(f"{where}.tool_calls", f"expected a list, got {type(calls).__name__}")
            if len(calls) > 1:
                quirks.parallel_tool_calls += 1
            for call_index, call in enumerate(calls):
                call_where = f"{where}.tool_calls[{call_index}]"
                function = call.get("function", call) if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise _RowError(call_where, "tool call without a function name")
                arguments = _decode_json_object(function.get("arguments", {}), f"{call_where}.arguments", quirks)
                # The text the assistant wrote beside the call is the reasoning that led to it.
                reasoning = (content.strip() or None) if call_index == 0 else None
                turns.append(Turn("tool_call", name=function["name"], arguments=arguments, reasoning=reasoning))
            if not calls:
                if not content.strip():
                    quirks.empty_assistant_turns += 1
                    continue
                turns.append(Turn("assistant", content=content))
        elif role == "tool":
            name = message.get("name")
            turns.append(Turn("tool", content=content, name=name if isinstance(name, str) else None))
        else:
            raise _RowError(f"{where}.role", f"unknown role {role!r} (expected system, user, assistant or tool)")

    _count_turn_quirks(turns, tool_names(tools), quirks)
    task_id, trial = row.get("task_id"), row.get("trial")
    wanted_id = f"tau-{task_id}-{trial}" if task_id is not None and trial is not None else f"{source_name}-{index}"
    meta = {"source": "tau", "row": index, "task_id": task_id, "trial": trial, "reward": reward}
    return Conversation(_unique_id(wanted_id, seen_ids), system, tools, turns, meta), quirks


def _tau_file_tools(path: Path) -> list[dict[str, Any]]:
    tools_path = path.parent / "tools.json"
    if not tools_path.is_file():
        return []
    try:
        return normalize_tools(json.loads(tools_path.read_text(encoding="utf-8")), "tools")
    except (json.JSONDecodeError, _RowError) as error:
        raise DataError(str(tools_path), None, None, f"unreadable tool schemas: {error}") from None


def parse_tau_rows(
    rows: list[Any], *, source: str = "<memory>", on_error: str = "raise", include_failed: bool = False,
    tools: list[dict[str, Any]] | None = None,
) -> tuple[list[Conversation], LoadStats]:
    """tau-bench trajectories -> conversations (reward == 1.0 only unless include_failed)."""
    _check_on_error(on_error)
    if not isinstance(rows, list):
        raise DataError(source, None, None, f"expected a list of trajectories, got {type(rows).__name__}")
    stats = LoadStats(source=source, format="tau")
    source_name = Path(source).stem if not source.startswith("<") else "tau"
    seen_ids: set[str] = set()
    file_tools = tools or []
    conversations = _parse_rows(
        rows,
        lambda row, index: _parse_tau_row(row, index, source_name, file_tools, include_failed, seen_ids, stats),
        stats, on_error,
    )
    return conversations, stats


# ---------------------------------------------------------------------------------------------
# ALMITA CSV

# logical column -> accepted header names (compared after lower-casing and turning spaces and
# hyphens into underscores), in order of preference.
ALMITA_COLUMNS: dict[str, tuple[str, ...]] = {
    "conversation_id": ("conversation_id", "conv_id", "conversation", "dialogue_id", "dialog_id", "chat_id",
                        "session_id", "ticket_id", "test_id", "id"),
    "turn": ("turn", "turn_id", "turn_index", "turn_idx", "turn_number", "turn_no", "step", "order",
             "position", "message_index", "seq"),
    "role": ("role", "speaker", "from", "author", "sender", "actor", "participant"),
    "content": ("content", "text", "message", "utterance", "value", "body"),
    "tool_name": ("tool_name", "tool", "function_name", "function", "api_name", "api", "name"),
    "arguments": ("arguments", "args", "tool_arguments", "tool_args", "function_arguments", "parameters",
                  "params", "api_arguments", "api_args"),
    "system": ("system", "system_prompt", "procedure", "instructions", "policy"),
    "tools": ("tools", "tool_schemas", "apis", "functions", "available_tools"),
}
ALMITA_REQUIRED: tuple[str, ...] = ("conversation_id", "role", "content")

_ALMITA_ROLES = {
    **dict.fromkeys(("user", "customer", "human", "client", "end_user", "requester"), "user"),
    **dict.fromkeys(("assistant", "agent", "bot", "gpt", "ai", "model", "support"), "assistant"),
    **dict.fromkeys(("tool_call", "function_call", "api_call", "call"), "tool_call"),
    **dict.fromkeys(("tool", "observation", "tool_output", "tool_result", "tool_response", "function_result",
                     "function_response", "api_output", "api_response", "api_result"), "tool"),
}


def _normalize_header(name: str) -> str:
    return name.strip().lower().replace(" ", "_").replace("-", "_")


def map_almita_columns(header: list[str], source: str = "<csv>") -> dict[str, str]:
    """Logical column -> the header name that holds it; DataError if a required one is missing."""
    normalized = {_normalize_header(name): name for name in header}
    mapping: dict[str, str] = {}
    for logical, candidates in ALMITA_COLUMNS.items():
        for candidate in candidates:
            if candidate in normalized and normalized[candidate] not in mapping.values():
                mapping[logical] = normalized[candidate]
                break
    missing = [logical for logical in ALMITA_REQUIRED if logical not in mapping]
    if missing:
        expected = "; ".join(
            f"{logical}{' (required)' if logical in ALMITA_REQUIRED else ''}: one of {', '.join(ALMITA_COLUMNS[logical])}"
            for logical in ALMITA_COLUMNS
        )
        raise DataError(source, None, None,
                        f"CSV header lacks {', '.join(missing)}. Expected columns -> {expected}. "
                        f"Found columns: {', '.join(header) or '(none)'}")
    return mapping


def _parse_almita_conversation(
    conversation_id: str, lines: list[tuple[int, dict[str, str]]], mapping: dict[str, str], index: int,
) -> tuple[Conversation, _RowQuirks]:
    quirks = _RowQuirks()

    def cell(line: dict[str, str], logical: str) -> str:
        column = mapping.get(logical)
        return (line.get(column) or "") if column else ""

    if "turn" in mapping:
        keyed = []
        for line_number, line in lines:
            raw_turn = cell(line, "turn").strip()
            try:
                keyed.append((float(raw_turn), line_number, line))
            except ValueError:
                raise _RowError(f"line {line_number}: {mapping['turn']}", f"turn {raw_turn!r} is not a number") from None
        lines = [(line_number, line) for _, line_number, line in sorted(keyed, key=lambda item: item[:2])]

    system = next((cell(line, "system") for _, line in lines if cell(line, "system").strip()), "")
    tools_text = next((cell(line, "tools") for _, line in lines if cell(line, "tools").strip()), "")
    tools = normalize_tools(tools_text, mapping.get("tools", "tools"))

    turns: list[Turn] = []
    last_call_name: str | None = None
    for line_number, line in lines:
        raw_role = _normalize_header(cell(line, "role"))
        role = _ALMITA_ROLES.get(raw_role)
        where = f"line {line_number}"
        if role is None:
            raise _RowError(f"{where}: {mapping['role']}",
                            f"unknown role {cell(line, 'role')!r} (expected one of {sorted(_ALMITA_ROLES)})")
        content = cell(line, "content")
        name = cell(line, "tool_name").strip()
        if role == "assistant" and name:
            role = "tool_call"  # an agent row that names a tool is a call
        if role == "tool_call":
            if not name:
                raise _RowError(f"{where}: {mapping.get('tool_name', 'tool_name')}", "a tool call without a tool name")
            arguments = _decode_json_object(cell(line, "arguments"), f"{where}: {mapping.get('arguments', 'arguments')}",
                                            quirks)
            turns.append(Turn("tool_call", name=name, arguments=arguments, reasoning=content.strip() or None))
            last_call_name = name
        elif role == "tool":
            turns.append(Turn("tool", content=content, name=name or last_call_name))
        elif role == "assistant":
            if not content.strip():
                quirks.empty_assistant_turns += 1
                continue
            turns.append(Turn("assistant", content=content))
        else:
            turns.append(Turn("user", content=content))

    _count_turn_quirks(turns, tool_names(tools), quirks)
    meta = {"source": "almita", "row": index, "lines": [line_number for line_number, _ in lines]}
    return Conversation(conversation_id, system, tools, turns, meta), quirks


def parse_almita_csv(text: str, *, source: str = "<csv>", on_error: str = "raise") -> tuple[list[Conversation], LoadStats]:
    """ALMITA-style CSV text (one row per turn) -> conversations.  A "row" here is a conversation."""
    _check_on_error(on_error)
    reader = csv.DictReader(text.splitlines())
    mapping = map_almita_columns(list(reader.fieldnames or []), source)
    grouped: dict[str, list[tuple[int, dict[str, str]]]] = {}
    for line_number, line in enumerate(reader, start=2):  # line 1 is the header
        conversation_id = (line.get(mapping["conversation_id"]) or "").strip()
        if not conversation_id:
            conversation_id = f"<missing id, line {line_number}>"
        grouped.setdefault(conversation_id, []).append((line_number, line))
    stats = LoadStats(source=source, format="almita")

    def parse_group(group: tuple[str, list[tuple[int, dict[str, str]]]], index: int) -> tuple[Conversation, _RowQuirks]:
        conversation_id, lines = group
        if conversation_id.startswith("<missing id"):
            raise _RowError(mapping["conversation_id"], f"empty conversation id ({conversation_id[1:-1]})")
        return _parse_almita_conversation(conversation_id, lines, mapping, index)

    conversations = _parse_rows(list(grouped.items()), parse_group, stats, on_error)
    return conversations, stats


# ---------------------------------------------------------------------------------------------
# Files, format detection, dataset specs


def _read_json_rows(text: str, source: str) -> list[Any]:
    """A JSON array, a single JSON object, or JSON lines."""
    try:
        value = json.loads(text)
        return value if isinstance(value, list) else [value]
    except json.JSONDecodeError as whole_error:
        rows = []
        for line_number, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(source, None, None,
                                f"not valid JSON ({whole_error.msg} at char {whole_error.pos}) "
                                f"nor JSON lines (line {line_number + 1})") from None
        return rows


def detect_format(text: str, source: str = "<text>") -> str:
    """'apigen', 'tau' or 'almita' from the content: JSON rows with `conversations` are APIGen,
    JSON rows with `traj` or `messages` are tau-bench, anything else that has a CSV header with a
    recognisable role column is ALMITA."""
    stripped = text.lstrip("\ufeff \t\r\n")
    if stripped[:1] in ("[", "{"):
        rows = _read_json_rows(stripped, source)
        first = next((row for row in rows if isinstance(row, dict)), None)
        if first is not None and "conversations" in first:
            return "apigen"
        if first is not None and ("traj" in first or "messages" in first):
            return "tau"
        keys = sorted(first) if first is not None else []
        raise DataError(source, None, None,
                        f"cannot detect the format: JSON rows without 'conversations' (APIGen) or 'traj'/'messages' "
                        f"(tau-bench); first row keys: {keys}. Pass format= / --format to force one")
    header = next(csv.reader(stripped.splitlines()[:1]), [])
    normalized = {_normalize_header(name) for name in header}
    if len(header) > 1 and normalized & set(ALMITA_COLUMNS["role"]):
        return "almita"
    raise DataError(source, None, None,
                    "cannot detect the format: neither JSON nor a CSV header with a role column. "
                    "Pass format= / --format to force one")


def load_conversations(
    path: str | Path, *, format: str | None = None, on_error: str = "raise", include_failed: bool = False,
) -> tuple[list[Conversation], LoadStats]:
    """Read one file of any supported format (auto-detected by content unless `format` is given)."""
    _check_on_error(on_error)
    if format is not None and format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS} or None, got {format!r}")
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise DataError(source, None, None, "no such file")
    text = path.read_text(encoding="utf-8-sig")
    format = format or detect_format(text, source)
    if format == "almita":
        return parse_almita_csv(text, source=source, on_error=on_error)
    rows = _read_json_rows(text, source)
    if format == "apigen":
        return parse_apigen_rows(rows, source=source, on_error=on_error)
    return parse_tau_rows(rows, source=source, on_error=on_error, include_failed=include_failed,
                          tools=_tau_file_tools(path))


@lru_cache(maxsize=4)
def _synthetic_splits(seed: int) -> dict[str, list[dict[str, Any]]]:
    # Imported here so that the data layer works (and its tests run) without the generator.
    from data.synthetic import generate_splits

    return generate_splits(seed=seed)


def load_dataset(
    spec: str, *, seed: int = 0, on_error: str = "raise", include_failed: bool = False, format: str | None = None,
) -> tuple[list[Conversation], LoadStats]:
    """A file path, or "synthetic:<split>" with split in train / test / ood_test / coldstart.

    Synthetic splits are generated in memory by `data.synthetic.generate_splits(seed=seed)` (cached
    per seed in this process) as APIGen-MT rows and read by the APIGen parser, exactly like a file.
    """
    if spec.startswith(SYNTHETIC_PREFIX):
        split = spec[len(SYNTHETIC_PREFIX):]
        if split not in SYNTHETIC_SPLITS:
            raise ValueError(f"unknown synthetic split {split!r} in {spec!r}; expected one of {SYNTHETIC_SPLITS}")
        rows = _synthetic_splits(seed)[split]
        return parse_apigen_rows(rows, source=f"synthetic:{split}(seed={seed})", on_error=on_error)
    return load_conversations(spec, format=format, on_error=on_error, include_failed=include_failed)
