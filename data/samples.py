"""Per-turn samples (Pre-Act style) and the split by conversation.

One sample per assistant action: every tool call and every assistant answer.  The context of a
sample is every turn before it, with the gold history (the dataset's own earlier actions and tool
results, never the model's); the target is the action itself (`data.types.target_of`) plus the
reasoning the source wrote for it, if any.
"""

from __future__ import annotations

import math
import random
from typing import Iterable

from data.format import FORMAT_INSTRUCTIONS
from data.types import Conversation, Sample, target_of


def conversation_samples(conversation: Conversation, *, only_with_reasoning: bool = False) -> list[Sample]:
    """The samples of one conversation, in turn order."""
    samples = []
    for turn_index, turn in enumerate(conversation.turns):
        if not turn.is_action:
            continue
        if only_with_reasoning and not (turn.reasoning or "").strip():
            continue
        samples.append(Sample(
            conversation_id=conversation.id,
            turn_index=turn_index,
            system=conversation.system,
            tools=conversation.tools,
            context=list(conversation.turns[:turn_index]),
            target=target_of(turn),
            reasoning=turn.reasoning,
            meta=dict(conversation.meta),
        ))
    return samples


def make_samples(
    conversations: Iterable[Conversation], *, only_with_reasoning: bool = False, strip_reasoning: bool = False,
    format_instructions: bool = False,
) -> list[Sample]:
    """Samples of many conversations.

    only_with_reasoning: keep only actions that have written reasoning (the cold-start set).
    strip_reasoning: drop the reasoning from every sample (stage-1 SFT renders an empty think block).
    format_instructions: end each sample's system prompt with `data.format.FORMAT_INSTRUCTIONS`.
    """
    samples = []
    for conversation in conversations:
        for sample in conversation_samples(conversation, only_with_reasoning=only_with_reasoning):
            # Each Sample is fresh, so changing it leaves the conversation untouched.
            if strip_reasoning:
                sample.reasoning = None
            if format_instructions:
                sample.system = f"{sample.system}\n\n{FORMAT_INSTRUCTIONS}" if sample.system else FORMAT_INSTRUCTIONS
            samples.append(sample)
    return samples


def split_conversations(
    conversations: list[Conversation], fractions: dict[str, float], seed: int,
) -> dict[str, list[Conversation]]:
    """Split by conversation (never by turn), deterministically from `seed`.

    The conversations are shuffled with `random.Random(seed)` and cut into consecutive parts
    whose sizes are the fractions times n, rounded by largest remainder so that they sum to n
    when the fractions sum to 1 (fractions summing to less than 1 leave the rest unused).
    Each part keeps the input order.  The same conversation id never lands in two parts.
    """
    if not fractions:
        raise ValueError("fractions is empty: name at least one split, e.g. {'train': 0.9, 'test': 0.1}")
    for name, fraction in fractions.items():
        if not (isinstance(fraction, (int, float)) and 0.0 <= fraction <= 1.0):
            raise ValueError(f"fraction of split {name!r} must be in [0, 1], got {fraction!r}")
    total = sum(fractions.values())
    if total > 1.0 + 1e-9:
        raise ValueError(f"fractions sum to {total:.6g} > 1: {fractions}")
    ids = [conversation.id for conversation in conversations]
    if len(set(ids)) != len(ids):
        duplicated = sorted({conversation_id for conversation_id in ids if ids.count(conversation_id) > 1})[:5]
        raise ValueError(f"conversation ids must be unique to split by conversation; duplicated: {duplicated}")

    count = len(conversations)
    exact = {name: fraction * count for name, fraction in fractions.items()}
    sizes = {name: math.floor(value) for name, value in exact.items()}
    target_total = min(count, round(total * count))
    by_remainder = sorted(fractions, key=lambda name: exact[name] - sizes[name], reverse=True)
    for name in by_remainder[: max(0, target_total - sum(sizes.values()))]:
        sizes[name] += 1

    order = list(range(count))
    random.Random(seed).shuffle(order)
    parts: dict[str, list[Conversation]] = {}
    start = 0
    for name in fractions:
        chosen = sorted(order[start:start + sizes[name]])
        parts[name] = [conversations[index] for index in chosen]
        start += sizes[name]
    return parts
