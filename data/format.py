"""The completion format the policy learns, shared by the renderer (data) and the parser (rewards).

    <think>\nREASONING\n</think>\n\n<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>
    <think>\nREASONING\n</think>\n\n<answer>TEXT</answer>

followed by the tokenizer's end-of-turn token.  Stage 1 (no reasoning) renders an empty think
block, `<think>\n\n</think>\n\n`, exactly as Qwen3's chat template does, so one parser serves all
stages.  The tool-call body is `json.dumps({"name": ..., "arguments": ...}, ensure_ascii=False)`,
the same text Qwen3's template writes for tool calls in the history.
"""

from __future__ import annotations

import json
from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# Strings after which generation stops (besides EOS / end-of-turn).
STOP_STRINGS: tuple[str, ...] = (TOOL_CLOSE, ANSWER_CLOSE)
# Every tag the project's own tokenizer must keep as one special token.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", IM_START, IM_END, THINK_OPEN, THINK_CLOSE, TOOL_OPEN, TOOL_CLOSE,
    ANSWER_OPEN, ANSWER_CLOSE, TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE,
)


# What the system prompt says about the output format when asked to (`make_samples(...,
# format_instructions=True)`, the trainers' and eval's --format-prompt).  The paper's prompt
# template (its Appendix A) is lost from our copy: this text is ours.  It lets an untrained
# instruct model's zero-shot row measure the model rather than its ignorance of our tags.
FORMAT_INSTRUCTIONS = (
    "Output format: first think step by step inside <think>...</think>. Then take exactly one action: "
    "call one tool as <tool_call>\n{\"name\": \"TOOL_NAME\", \"arguments\": {...}}\n</tool_call> with "
    "arguments that follow the tool's parameters, or reply to the user as <answer>TEXT</answer>. "
    "Write nothing after the action."
)


def tool_call_json(name: str, arguments: dict[str, Any]) -> str:
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)


def format_action(target: dict[str, Any]) -> str:
    """The action block alone (no think block): also how history actions are shown."""
    if target["kind"] == "tool_call":
        return f"{TOOL_OPEN}\n{tool_call_json(target['name'], target['arguments'])}\n{TOOL_CLOSE}"
    if target["kind"] == "answer":
        return f"{ANSWER_OPEN}{target['text']}{ANSWER_CLOSE}"
    raise ValueError(f"unknown target kind {target.get('kind')!r}")


def format_completion(target: dict[str, Any], reasoning: str | None = None) -> str:
    """Think block + action block, without the end-of-turn token."""
    reasoning = (reasoning or "").strip()
    think = f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n" if reasoning else f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n"
    return think + format_action(target)
