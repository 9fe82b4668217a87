"""APIGen-MT rows (ShareGPT-like JSON array; `parse_apigen_rows` for rows already in memory).

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
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data.rows import (
    DataError, LoadStats, _check_on_error, _count_turn_quirks, _decode_json_object, _optional_reasoning, _parse_rows,
    _RowError, _RowQuirks, _text, _unique_id, normalize_tools, tool_names,
)
from data.types import Conversation, Turn

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
