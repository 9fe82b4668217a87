"""The prompt as text: a sample's system prompt, tools and history through a chat template.

The prompt goes through the tokenizer's own chat template when it has one, otherwise through the
project's ChatML template below, which has the same layout as Qwen3's.  A template is probed first
(`template_support`): many real ones (SmolLM2's among them) render only `role` and `content` and
silently drop `tools=` and assistant `tool_calls`.
  * A template that shows tools, tool calls and tool results (Qwen3's) gets them as structured
    fields: `apply_chat_template(messages, tools=..., add_generation_prompt=True)`; a history tool
    call goes through `tool_calls`, a history answer is `<answer>text</answer>` (Qwen3 shows past
    turns without think blocks), tool results are `tool` messages.
  * Any other template gets `plain_chat_messages` inside its own turn markers: the project's tools
    block in the system text, history actions as the model writes them, tool results as user turns
    of `<tool_response>` blocks.  (A template that adds its own default system prompt when there
    is none, as SmolLM2's does, still adds it for a sample without a system prompt.)
  * Without a template, the project's ChatML: each history action exactly as the model writes it,
    with an empty think block, so that one rendering of a whole conversation contains every
    per-turn sample of it (`data.render.render_conversation`).

Tokenizing the text, loss masks and history truncation are in `data.render`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

from data.format import IM_END, IM_START, TOOL_RESPONSE_CLOSE, TOOL_RESPONSE_OPEN, format_action, format_completion
from data.types import Conversation, Turn, target_of


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


CHATML_TOOLS_PREAMBLE = (
    "# Tools\n\nCall one tool as <tool_call>\n{\"name\": ..., \"arguments\": {...}}\n</tool_call> "
    "or reply to the user as <answer>...</answer>.\n<tools>\n"
)


def chat_messages(system: str, history: list[Turn]) -> list[dict[str, Any]]:
    """OpenAI-style messages for a tokenizer's chat template (system first when non-empty)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for turn in history:
        if turn.role == "user":
            messages.append({"role": "user", "content": turn.content})
        elif turn.role == "assistant":
            messages.append({"role": "assistant", "content": format_action(target_of(turn))})
        elif turn.role == "tool_call":
            call = {"name": turn.name, "arguments": dict(turn.arguments or {})}
            messages.append({"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]})
        else:
            message = {"role": "tool", "content": turn.content}
            if turn.name:
                message["name"] = turn.name
            messages.append(message)
    return messages


def _schema_type(schema: dict[str, Any]) -> str:
    """A short type for one parameter schema: `string`, `basic|economy`, `array[string]`, ..."""
    if not isinstance(schema, dict):
        return "any"
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return "|".join(json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v for v in schema["enum"])
    kind = schema.get("type", "any")
    if isinstance(kind, list):
        kind = "|".join(str(k) for k in kind)
    if kind == "array" and isinstance(schema.get("items"), dict):
        return f"array[{_schema_type(schema['items'])}]"
    return str(kind)


def tool_signature(tool: dict[str, Any]) -> str:
    """One compact line per tool: `name(required: type, optional?: type): description`.

    The project's own template shows tools this way instead of as JSON schemas: the same
    information (names, types, enums, which parameters are required) in about a third of the
    tokens, which matters for a tiny model trained on a CPU.  Tokenizers with a chat template
    (Qwen3) get the template's JSON schemas instead.
    """
    function = tool.get("function", tool)
    parameters = function.get("parameters") or {}
    properties = parameters.get("properties") or {}
    required = set(parameters.get("required") or [])
    ordered = [name for name in properties if name in required] + [name for name in properties if name not in required]
    args = ", ".join(f"{name}{'' if name in required else '?'}: {_schema_type(properties[name])}" for name in ordered)
    description = str(function.get("description") or "").strip()
    return f"{function.get('name', '?')}({args})" + (f": {description}" if description else "")


def system_with_tools(system: str, tools: list[dict[str, Any]]) -> str:
    """The project's system text: the system prompt, then a short tools section when there are tools."""
    if not tools:
        return system
    lines = "\n".join(tool_signature(tool) for tool in tools)
    head = f"{system}\n\n" if system else ""
    return f"{head}{CHATML_TOOLS_PREAMBLE}{lines}\n</tools>"


def chatml_system(system: str, tools: list[dict[str, Any]]) -> str:
    """The project's system block (`system_with_tools` in ChatML turn markers), empty without either."""
    text = system_with_tools(system, tools)
    return f"{IM_START}system\n{text}{IM_END}\n" if text else ""


def chatml_turns(turns: list[Turn], action_text: Callable[[Turn], str]) -> str:
    """The project's ChatML for a list of turns; consecutive tool results share one user turn."""
    parts = []
    for index, turn in enumerate(turns):
        if turn.role == "user":
            parts.append(f"{IM_START}user\n{turn.content}{IM_END}\n")
        elif turn.is_action:
            parts.append(f"{IM_START}assistant\n{action_text(turn)}{IM_END}\n")
        else:
            opens = index == 0 or turns[index - 1].role != "tool"
            closes = index == len(turns) - 1 or turns[index + 1].role != "tool"
            parts.append(f"{IM_START}user" if opens else "")
            parts.append(f"\n{TOOL_RESPONSE_OPEN}\n{turn.content}\n{TOOL_RESPONSE_CLOSE}")
            parts.append(f"{IM_END}\n" if closes else "")
    return "".join(parts)


def chatml_prompt(system: str, tools: list[dict[str, Any]], history: list[Turn]) -> str:
    """The project's ChatML prompt, ending with the generation prompt `<|im_start|>assistant\\n`.

    History actions are shown as the model writes them, with an empty think block (their
    reasoning is never shown), so a whole conversation rendered once is token for token every
    per-turn sample of it at once (`render_conversation`).
    """
    history_text = chatml_turns(history, lambda turn: format_completion(target_of(turn), None))
    return f"{chatml_system(system, tools)}{history_text}{IM_START}assistant\n"


def chatml_conversation_text(conversation: Conversation) -> str:
    """A whole conversation in the project's ChatML, every action with its think block: the
    text the project's tokenizer is trained on."""
    return chatml_system(conversation.system, conversation.tools) + chatml_turns(
        conversation.turns, lambda turn: format_completion(target_of(turn), turn.reasoning)
    )


# What a chat template shows.  Many real templates (SmolLM2's, Llama 2's, most ChatML ones) render
# only `role` and `content`: given `tools=` and assistant `tool_calls` they silently drop both, and
# some raise on a `tool` role.  Probe with sentinel strings instead of trusting the model's name.
_PROBE_TOOL = "probe_defined_tool_q7x"
_PROBE_CALL, _PROBE_VALUE, _PROBE_RESULT = "probe_called_tool_q7x", "probe_value_q7x", "probe_result_q7x"


@dataclass(frozen=True)
class TemplateSupport:
    """Which of the things the model must see a chat template renders."""

    tools: bool  # the tool definitions passed as `tools=`
    tool_calls: bool  # assistant messages' `tool_calls` (name and arguments)
    tool_results: bool  # `tool` messages

    @property
    def complete(self) -> bool:
        return self.tools and self.tool_calls and self.tool_results


def _probe(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
    try:
        return str(tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False))
    except Exception:  # a template that refuses tools, tool calls or the tool role does not show them
        return ""


# chat template text -> what it shows (templates are pure functions of their inputs).
_SUPPORT_CACHE: dict[str, TemplateSupport] = {}


def template_support(tokenizer: Any) -> TemplateSupport:
    """What the tokenizer's chat template shows, found by rendering sentinels through it."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return TemplateSupport(False, False, False)
    key = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    if key not in _SUPPORT_CACHE:
        tool = {"type": "function", "function": {"name": _PROBE_TOOL, "description": "probe",
                                                 "parameters": {"type": "object", "properties": {}}}}
        call = {"type": "function", "function": {"name": _PROBE_CALL, "arguments": {"probe_key": _PROBE_VALUE}}}
        system, user = {"role": "system", "content": "S"}, {"role": "user", "content": "U"}
        with_tools = _probe(tokenizer, [system, user], [tool])
        with_call = _probe(tokenizer, [system, user, {"role": "assistant", "content": "", "tool_calls": [call]},
                                       {"role": "tool", "content": _PROBE_RESULT}], None)
        _SUPPORT_CACHE[key] = TemplateSupport(
            tools=_PROBE_TOOL in with_tools,
            tool_calls=_PROBE_CALL in with_call and _PROBE_VALUE in with_call,
            tool_results=_PROBE_RESULT in with_call,
        )
    return _SUPPORT_CACHE[key]


def plain_chat_messages(system: str, tools: list[dict[str, Any]], history: list[Turn]) -> list[dict[str, Any]]:
    """Messages with nothing but `role` and `content`, for templates that drop tools or tool calls.

    The content is the project's own rendering: the system text gains the tools block, history
    actions are the text the model writes (an empty think block and the action block), and tool
    results are user turns of `<tool_response>` blocks.  Inside a ChatML template (SmolLM2's) this
    is exactly the project's ChatML prompt.
    """
    system_text = system_with_tools(system, tools)
    messages: list[dict[str, Any]] = [{"role": "system", "content": system_text}] if system_text else []
    for index, turn in enumerate(history):
        if turn.role == "user":
            messages.append({"role": "user", "content": turn.content})
        elif turn.is_action:
            messages.append({"role": "assistant", "content": format_completion(target_of(turn), None)})
        else:
            block = f"{TOOL_RESPONSE_OPEN}\n{turn.content}\n{TOOL_RESPONSE_CLOSE}"
            if index > 0 and history[index - 1].role == "tool":  # consecutive results share one turn
                messages[-1]["content"] += "\n" + block
            else:
                messages.append({"role": "user", "content": block})
    return messages


def prompt_text(tokenizer: Any, system: str, tools: list[dict[str, Any]], history: list[Turn],
                conversation_id: str = "?") -> str:
    """The prompt text through the tokenizer's chat template, or the project's ChatML without one.

    A template that shows tools, tool calls and tool results gets them as structured fields (Qwen3
    renders its own tool schemas); one that drops any of them gets `plain_chat_messages` inside its
    turn markers, so nothing the model must see is lost (`template_support`).
    """
    if not has_chat_template(tokenizer):
        return chatml_prompt(system, tools, history)
    if template_support(tokenizer).complete:
        messages, template_tools = chat_messages(system, history), tools or None
    else:
        messages, template_tools = plain_chat_messages(system, tools, history), None
    # Templates refuse an empty conversation (no system prompt, nothing before the first action,
    # e.g. a conversation that opens with the agent's greeting): use the ChatML prompt, which is
    # then the bare generation prompt `<|im_start|>assistant\n` (plus the tools block, if any).
    if not messages:
        return chatml_prompt(system, tools, history)
    try:
        return tokenizer.apply_chat_template(messages, tools=template_tools, add_generation_prompt=True, tokenize=False)
    except Exception as error:  # a template's own error (e.g. "roles must alternate"): name the record
        raise ValueError(f"conversation {conversation_id!r}: the tokenizer's chat template failed: {error}") from error
