"""Render a `Sample` into token ids and an explicit 0/1 loss mask.

    input_ids = prompt_ids + completion_ids
    prompt_ids     = tokenize(chat template(system, tools, history) + generation prompt)
    completion_ids = tokenize(format_completion(target, reasoning)) + [end-of-turn id]
    loss_mask      = [0] * len(prompt_ids) + [1] * len(completion_ids)

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
    per-turn sample of it (`render_conversation`).

The completion is tokenized on its own and appended, so `render_prompt(...)` is by construction
the exact prefix of `render(...)` (given the same truncation), which is what the sampler needs:
generation starts exactly where the trained completion starts, and the loss mask covers exactly
the tokens the model must produce, the closing end-of-turn token included.

Truncation: when `max_length` is given and the sample does not fit, the oldest history is dropped
(never the system prompt, the tools or the target).  First whole exchanges (a user turn and
everything up to the next user turn) are dropped, oldest first, so a tool result is never left
without its call; if the latest exchange alone is still too long, its oldest actions (each with
the tool results that answer it) are dropped, keeping the user turn that opened it.  The number of
dropped turns is returned in `Rendered.dropped_turns`; if even the shortest history does not fit,
`ContextTooLong` is raised.
"""

from __future__ import annotations

import json
import logging
import weakref
from dataclasses import dataclass
from typing import Any, Callable

from data.format import (
    IM_END, IM_START, STOP_STRINGS, TOOL_RESPONSE_CLOSE, TOOL_RESPONSE_OPEN, format_action, format_completion,
)
from data.types import Conversation, Sample, Turn, target_of

logger = logging.getLogger(__name__)


@dataclass
class Rendered:
    """One rendered sample; input_ids and loss_mask have the same length."""

    input_ids: list[int]  # [L] prompt ids followed by completion ids
    loss_mask: list[int]  # [L] 1 on the completion tokens (end-of-turn included), 0 elsewhere
    prompt_length: int  # number of prompt tokens: the completion starts at this index
    dropped_turns: int = 0  # history turns dropped to fit max_length


class ContextTooLong(ValueError):
    """The sample does not fit in max_length even with the shortest history allowed."""

    def __init__(self, conversation_id: str, turn_index: int, prompt_tokens: int, completion_tokens: int,
                 max_length: int, dropped_turns: int, history_turns: int):
        super().__init__(
            f"conversation {conversation_id!r} turn {turn_index}: prompt of {prompt_tokens} tokens + "
            f"{completion_tokens} completion tokens > max_length {max_length}, even after dropping "
            f"{dropped_turns} of {history_turns} history turns"
        )
        self.conversation_id, self.turn_index = conversation_id, turn_index
        self.prompt_tokens, self.completion_tokens, self.max_length = prompt_tokens, completion_tokens, max_length


# ---------------------------------------------------------------------------------------------
# Special ids


def end_of_turn_id(tokenizer: Any) -> int:
    """The id of `<|im_end|>`; for a tokenizer without it, its EOS id (Llama-style templates end
    a turn with EOS)."""
    token_id = tokenizer.convert_tokens_to_ids(IM_END)
    if isinstance(token_id, int) and token_id != getattr(tokenizer, "unk_token_id", None):
        return token_id
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError(f"tokenizer {type(tokenizer).__name__} has neither {IM_END!r} nor an EOS token")


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Token ids that end generation: EOS and the end-of-turn token, without duplicates."""
    ids = [tokenizer.eos_token_id, end_of_turn_id(tokenizer)]
    return list(dict.fromkeys(int(token_id) for token_id in ids if token_id is not None))


def stop_sequences(tokenizer: Any) -> list[list[int]]:
    """The token ids of each of `data.format.STOP_STRINGS` (the closing action tags)."""
    return [tokenizer.encode(text, add_special_tokens=False) for text in STOP_STRINGS]


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


# ---------------------------------------------------------------------------------------------
# Prompt text

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


# ---------------------------------------------------------------------------------------------
# Encoding

# tokenizer -> (its size when cached, {message block text: ids}).  Weak keys: a tokenizer that is
# garbage-collected takes its cache with it (an id()-keyed cache could hand a new tokenizer another
# one's ids); the size check drops the cache when tokens are added to the tokenizer.
_BLOCK_CACHE: "weakref.WeakKeyDictionary[Any, tuple[int, dict[str, list[int]] | None]]" = weakref.WeakKeyDictionary()
_BLOCK_CACHE_SIZE = 20_000


def _block_cache(tokenizer: Any) -> dict[str, list[int]] | None:
    """The block cache of this tokenizer, or None when block-wise encoding would not be exact."""
    try:
        size = len(tokenizer)
        if tokenizer not in _BLOCK_CACHE or _BLOCK_CACHE[tokenizer][0] != size:
            _BLOCK_CACHE[tokenizer] = (size, {} if _im_end_is_atomic(tokenizer) else None)
        return _BLOCK_CACHE[tokenizer][1]
    except TypeError:  # an unhashable, unsized or non-weakref-able tokenizer: no cache
        return None


def _im_end_is_atomic(tokenizer: Any) -> bool:
    """True when `<|im_end|>` is an added token that does not strip the whitespace around it."""
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if str(token) == IM_END:
            return not getattr(token, "lstrip", False) and not getattr(token, "rstrip", False)
    return False


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """`tokenizer.encode(text, add_special_tokens=False)`, computed block by block with a cache.

    A tokenizer splits its text at added tokens before anything else, so when `<|im_end|>` is
    one (and strips no whitespace), encoding the pieces that end with it one at a time and
    concatenating gives exactly the same ids.  Every sample of a dataset repeats the same system
    and tools block, and each sample of a conversation repeats the history of the one before, so
    caching the pieces makes rendering a dataset linear instead of quadratic in conversation length.
    """
    cache = _block_cache(tokenizer)
    if cache is None:
        return tokenizer.encode(text, add_special_tokens=False)
    ids: list[int] = []
    pieces = text.split(IM_END)
    for index, piece in enumerate(pieces):
        block = piece + IM_END if index < len(pieces) - 1 else piece
        if not block:
            continue
        if block not in cache:
            if len(cache) >= _BLOCK_CACHE_SIZE:
                cache.clear()
            cache[block] = tokenizer.encode(block, add_special_tokens=False)
        ids += cache[block]
    return ids


# ---------------------------------------------------------------------------------------------
# Truncation


def history_cuts(history: list[Turn]) -> list[list[int]]:
    """Kept history indices for each allowed truncation, from "keep all" to "keep the least".

    Each candidate keeps a subset of the one before it, so prompt lengths never increase along
    the list (a binary search over it is valid).
    """
    count = len(history)
    candidates = [list(range(count))]
    exchange_starts = [index for index, turn in enumerate(history) if turn.role == "user"]
    for start in exchange_starts:
        if start > 0:
            candidates.append(list(range(start, count)))
    last_start = exchange_starts[-1] if exchange_starts else 0
    head = [last_start] if exchange_starts else []
    # Inside the latest exchange, an action and the tool results after it go together.
    action_starts = [index for index in range(last_start + len(head), count) if history[index].is_action]
    for start in action_starts[1:]:
        candidates.append(head + list(range(start, count)))
    return candidates


def _prompt_ids(tokenizer: Any, sample: Sample, kept: list[int]) -> list[int]:
    history = [sample.context[index] for index in kept]
    text = prompt_text(tokenizer, sample.system, sample.tools, history, sample.conversation_id)
    return encode_text(tokenizer, text)


def _fitting_prompt(sample: Sample, tokenizer: Any, max_length: int | None, budget: int) -> tuple[list[int], int]:
    """(prompt ids, dropped turns) with the longest history such that prompt + budget <= max_length."""
    candidates = history_cuts(sample.context)
    full = _prompt_ids(tokenizer, sample, candidates[0])
    if max_length is None or len(full) + budget <= max_length:
        return full, 0
    cache = {0: full}

    def ids_of(position: int) -> list[int]:
        if position not in cache:
            cache[position] = _prompt_ids(tokenizer, sample, candidates[position])
        return cache[position]

    last = len(candidates) - 1
    if len(ids_of(last)) + budget > max_length:
        raise ContextTooLong(sample.conversation_id, sample.turn_index, len(ids_of(last)), budget, max_length,
                             len(sample.context) - len(candidates[last]), len(sample.context))
    low, high = 1, last  # candidates[high] fits, candidates[low - 1] does not
    while low < high:
        middle = (low + high) // 2
        if len(ids_of(middle)) + budget <= max_length:
            high = middle
        else:
            low = middle + 1
    dropped = len(sample.context) - len(candidates[high])
    logger.debug("conversation %s turn %d: dropped %d history turns to fit %d tokens",
                 sample.conversation_id, sample.turn_index, dropped, max_length)
    return ids_of(high), dropped


# ---------------------------------------------------------------------------------------------
# Public rendering


def completion_ids(sample: Sample, tokenizer: Any, *, with_reasoning: bool = True) -> list[int]:
    """tokenize(think block + action block) + [end-of-turn id], no special-token additions."""
    try:
        text = format_completion(sample.target, sample.reasoning if with_reasoning else None)
    except (KeyError, ValueError) as error:
        raise ValueError(f"conversation {sample.conversation_id!r} turn {sample.turn_index}: bad target "
                         f"{sample.target!r}: {error}") from error
    return tokenizer.encode(text, add_special_tokens=False) + [end_of_turn_id(tokenizer)]


def render(sample: Sample, tokenizer: Any, *, max_length: int | None = None, with_reasoning: bool = True) -> Rendered:
    """Prompt + completion ids with the loss mask on the completion (see the module docstring)."""
    completion = completion_ids(sample, tokenizer, with_reasoning=with_reasoning)
    prompt, dropped = _fitting_prompt(sample, tokenizer, max_length, budget=len(completion))
    return Rendered(
        input_ids=prompt + completion,
        loss_mask=[0] * len(prompt) + [1] * len(completion),
        prompt_length=len(prompt),
        dropped_turns=dropped,
    )


def render_prompt(sample: Sample, tokenizer: Any, *, max_length: int | None = None, completion_budget: int = 0) -> Rendered:
    """The prompt alone, for generation: it ends exactly where the completion starts (after
    `<|im_start|>assistant\\n`), loss mask all 0.  History is dropped until prompt length +
    `completion_budget` fits `max_length`; with `completion_budget = len(completion_ids(...))` the
    result is token for token the prefix of `render(sample, tokenizer, max_length=max_length)`.
    """
    prompt, dropped = _fitting_prompt(sample, tokenizer, max_length, budget=completion_budget)
    return Rendered(input_ids=prompt, loss_mask=[0] * len(prompt), prompt_length=len(prompt), dropped_turns=dropped)


def render_conversation(samples: list[Sample], tokenizer: Any, *, max_length: int | None = None) -> tuple[list[Rendered], int]:
    """Pack the consecutive per-turn samples of one conversation into as few sequences as possible.

    For stage-1 SFT (no reasoning) the full rendering of a conversation's last action contains
    every earlier action, rendered exactly as that action's own completion, so one forward pass
    can train on all of them: the loss mask is 1 on every action's completion tokens.  This is
    exact, not approximate: each earlier sample's `render(...)` is checked to be a token prefix of
    the packed sequence before its mask is copied in; where the check fails (a chat template that
    shows history differently, as Qwen3's does, or a history cut to fit `max_length`) the sample is
    rendered on its own instead.  Returns (sequences, number of samples packed into others).

    `samples` must be one conversation's samples in turn order, rendered without reasoning.
    """
    rendered = [render(sample, tokenizer, max_length=max_length, with_reasoning=False) for sample in samples]
    out: list[Rendered] = []
    chain: list[Rendered] = []  # each covers the one before it; flushed as one sequence

    def covers(longer: Rendered, shorter: Rendered) -> bool:
        return (longer.dropped_turns == 0 and shorter.dropped_turns == 0
                and len(shorter.input_ids) <= longer.prompt_length
                and longer.input_ids[: len(shorter.input_ids)] == shorter.input_ids)

    def flush() -> None:
        last = chain[-1]
        mask = list(last.loss_mask)
        for earlier in chain[:-1]:
            mask[earlier.prompt_length: len(earlier.input_ids)] = earlier.loss_mask[earlier.prompt_length:]
        out.append(Rendered(input_ids=list(last.input_ids), loss_mask=mask, prompt_length=chain[0].prompt_length,
                            dropped_turns=last.dropped_turns))

    for item in rendered:
        if chain and not covers(item, chain[-1]):
            flush()
            chain = []
        chain.append(item)
    if chain:
        flush()
    return out, len(rendered) - len(out)
