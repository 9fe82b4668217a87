"""ALMITA (Zendesk) CSV, one row per turn.

Columns are mapped by header name (see `ALMITA_COLUMNS` for the accepted names); a file whose
header lacks a required column fails with a message listing the expected and the found columns.
Rows are grouped into conversations by the conversation-id column and ordered by the turn column
when there is one.  In "skip" mode a bad line drops the whole conversation it belongs to.
"""

from __future__ import annotations

import csv

from data.rows import (
    DataError, LoadStats, _check_on_error, _count_turn_quirks, _decode_json_object, _parse_rows, _RowError,
    _RowQuirks, normalize_tools, tool_names,
)
from data.types import Conversation, Turn

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
