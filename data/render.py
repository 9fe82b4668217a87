"""Render a `Sample` into token ids and an explicit 0/1 loss mask.

    input_ids = prompt_ids + completion_ids
    prompt_ids     = tokenize(chat template(system, tools, history) + generation prompt)
    completion_ids = tokenize(format_completion(target, reasoning)) + [end-of-turn id]
    loss_mask      = [0] * len(prompt_ids) + [1] * len(completion_ids)

The prompt text comes from `data.chat_text.prompt_text`: the tokenizer's own chat template when it
has one (probed first for what it shows), otherwise the project's ChatML template, which has the
same layout as Qwen3's.

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
`ContextTooLong` is raised.  `render_each` renders a list of samples, skipping and counting those.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from data.chat_text import prompt_text
from data.format import IM_END, STOP_STRINGS, format_completion
from data.types import Sample, Turn

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


# ---------------------------------------------------------------------------------------------
# Rendering a list of samples


@dataclass
class RenderedSet:
    """What `render_each` kept and skipped."""

    kept: list[tuple[int, Rendered]]  # (position in the samples, its rendering), in sample order
    too_long: int  # samples skipped: ContextTooLong even with the shortest history
    shortened: int  # kept samples whose history was cut to fit (dropped_turns > 0)


def render_each(samples: Sequence[Sample], render_one: Callable[[Sample], Rendered], log: Callable[[str], None],
                *, log_prefix: str = "skipped", log_limit: int = 3) -> RenderedSet:
    """`render_one(sample)` for each sample, in order; one that raises `ContextTooLong` is skipped.

    Skips are counted, and the first `log_limit` of them logged as `f"{log_prefix}: {error}"` (a
    caller that renders in several calls and logs the first 3 skips in all passes `3 - skips so far`).
    Any other error propagates.
    """
    kept: list[tuple[int, Rendered]] = []
    too_long, shortened = 0, 0
    for index, sample in enumerate(samples):
        try:
            rendered = render_one(sample)
        except ContextTooLong as error:
            too_long += 1
            if too_long <= log_limit:
                log(f"{log_prefix}: {error}")
            continue
        shortened += rendered.dropped_turns > 0
        kept.append((index, rendered))
    return RenderedSet(kept=kept, too_long=too_long, shortened=shortened)
