"""tau-bench trajectories: a JSON array of `{task_id, trial, reward, traj: [OpenAI messages]}`.

Rows with `messages` instead of `traj` are read the same way.  Only `reward == 1.0` rows are kept
unless `include_failed` (rows without a `reward` key are kept: nothing says they failed).  An
assistant message with text and a tool call becomes one tool-call turn whose text is its
reasoning.  Tool schemas come from `tools.json` beside the file, or a row's own `tools`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data.rows import (
    DataError, LoadStats, _check_on_error, _count_turn_quirks, _decode_json_object, _parse_rows, _RowError,
    _RowQuirks, _text, _unique_id, normalize_tools, tool_names,
)
from data.types import Conversation, Turn


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
