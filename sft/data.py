"""SFT data: load, split by conversation, cut into per-turn samples, render with loss masks.

Stage 1 (base) packs each conversation's samples into as few sequences as exactly equal to them
(data.render.render_conversation); stage 2 (coldstart) keeps only the samples with written
reasoning.  Every skip (a row the loader refused, a sample too long even without history) is
counted in the data stats and the first few are logged.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from sft.flags import DEFAULT_DATA, SFTConfig


@dataclasses.dataclass
class SFTData:
    train: list[Any]  # data.render.Rendered
    validation: list[Any]
    stats: dict[str, Any]


def prepare_data(config: SFTConfig, tokenizer: Any, log: Callable[[str], None] = print) -> SFTData:
    """Load, split by conversation, cut into samples, render with loss masks; count every skip."""
    from data import load_dataset, make_samples, split_conversations
    from data.render import ContextTooLong, render, render_conversation, render_each

    spec = config.data or DEFAULT_DATA[config.stage]
    conversations, load_stats = load_dataset(spec, seed=config.seed, format=config.data_format)
    coldstart = config.stage == "coldstart"
    if config.val_fraction > 0 and len(conversations) >= 2:
        splits = split_conversations(conversations, {"train": 1 - config.val_fraction, "validation": config.val_fraction},
                                     seed=config.seed)
    else:
        splits = {"train": conversations, "validation": []}
    rendered: dict[str, list[Any]] = {}
    stats: dict[str, Any] = {"data": spec, "conversations": len(conversations), "skipped_rows": load_stats.skipped}
    for name in ("train", "validation"):
        samples = make_samples(splits[name], only_with_reasoning=coldstart, strip_reasoning=not coldstart,
                               format_instructions=config.format_prompt)
        if name == "train" and config.max_samples > 0:
            samples = samples[: config.max_samples]
        kept, too_long, shortened, packed = [], 0, 0, 0
        # Stage 1 packs each conversation's samples into as few exact sequences as possible.
        groups = _conversation_groups(samples) if config.pack_conversations and not coldstart else [[s] for s in samples]
        for group in groups:
            if len(group) > 1:
                try:
                    items, merged = render_conversation(group, tokenizer, max_length=config.max_length)
                    kept.extend(items)
                    packed += merged
                    shortened += sum(item.dropped_turns > 0 for item in items)
                    continue
                except ContextTooLong:
                    pass  # some sample of it does not fit: render one by one and count the ones skipped
            result = render_each(group, lambda s: render(s, tokenizer, max_length=config.max_length,
                                                         with_reasoning=coldstart),
                                 log, log_prefix="skipped sample", log_limit=3 - too_long)
            kept.extend(item for _, item in result.kept)
            too_long, shortened = too_long + result.too_long, shortened + result.shortened
        stats[f"{name}_packed_samples"] = packed
        rendered[name] = kept
        stats[f"{name}_samples"] = len(kept) + packed  # samples trained on
        stats[f"{name}_sequences"] = len(kept)  # after packing
        stats[f"{name}_too_long"] = too_long
        stats[f"{name}_shortened"] = shortened
    if not rendered["train"]:
        raise SystemExit(f"--data {spec}: no training samples for stage {config.stage!r} "
                         f"({'no sample carries reasoning' if coldstart else 'all too long or none found'})")
    log("data: " + ", ".join(f"{k}={v}" for k, v in stats.items()))
    return SFTData(train=rendered["train"], validation=rendered["validation"], stats=stats)


def _conversation_groups(samples: list[Any]) -> list[list[Any]]:
    """Consecutive samples of the same conversation, in order."""
    groups: list[list[Any]] = []
    for sample in samples:
        if groups and groups[-1][-1].conversation_id == sample.conversation_id:
            groups[-1].append(sample)
        else:
            groups.append([sample])
    return groups


def micro_batches_for_epoch(data: list[Any], config: SFTConfig, epoch: int) -> list[list[int]]:
    from data.batching import length_grouped_batches

    return length_grouped_batches([len(r.input_ids) for r in data], config.micro_batch, seed=config.seed, epoch=epoch)

