"""The neutral data types every source is read into, and every later stage consumes.

A `Conversation` is what one dataset row becomes, whatever its source format.  A `Sample` is one
assistant action cut out of a conversation (Pre-Act style, one sample per assistant turn): the
context is every turn before it (gold history), the target is that action.

Target dicts (the contract between data, rewards, grpo and eval):

    {"kind": "tool_call", "name": str, "arguments": dict}
    {"kind": "answer", "text": str}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["user", "assistant", "tool_call", "tool"]
ROLES: tuple[str, ...] = ("user", "assistant", "tool_call", "tool")


@dataclass(frozen=True)
class Turn:
    """One turn of a conversation.

    role:
      "user"      - user text in `content`
      "assistant" - assistant text (an answer) in `content`
      "tool_call" - an assistant tool call: `name` and `arguments` (a JSON object)
      "tool"      - a tool result text in `content`; `name` is the tool it answers, when known
    reasoning: optional written reasoning that preceded an assistant action.
    """

    role: Role
    content: str = ""
    name: str | None = None
    arguments: dict[str, Any] | None = None
    reasoning: str | None = None

    @property
    def is_action(self) -> bool:
        return self.role in ("assistant", "tool_call")


@dataclass
class Conversation:
    """A whole conversation in neutral form.

    tools: OpenAI-style schemas, each `{"type": "function", "function": {name, description,
    parameters}}` (loaders convert bare `{name, description, parameters}` definitions).
    """

    id: str
    system: str
    tools: list[dict[str, Any]]
    turns: list[Turn]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Sample:
    """One assistant action with everything before it."""

    conversation_id: str
    turn_index: int  # index of the target turn in conversation.turns
    system: str
    tools: list[dict[str, Any]]
    context: list[Turn]  # all turns before the target, gold history
    target: dict[str, Any]  # see module docstring
    reasoning: str | None = None  # written reasoning for the target, if the source has one
    meta: dict[str, Any] = field(default_factory=dict)


def target_of(turn: Turn) -> dict[str, Any]:
    """The target dict of an assistant action turn."""
    if turn.role == "tool_call":
        return {"kind": "tool_call", "name": turn.name, "arguments": dict(turn.arguments or {})}
    if turn.role == "assistant":
        return {"kind": "answer", "text": turn.content}
    raise ValueError(f"turn with role {turn.role!r} is not an assistant action")
