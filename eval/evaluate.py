"""Evaluate one policy on one list of test turns (`evaluate`), the core of `eval.run`.

Each turn is rendered as a generation prompt (history dropped to fit, a prompt that never fits is
skipped and counted), the prompts are decoded in batches of alike prompts with the project's own
sampler (`grpo.rollout.generate`), every completion is parsed and scored with `rewards` in one
batch, and the scored turns are aggregated into the paper's table (`eval.metrics.aggregate`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

from eval.metrics import TurnRecord, aggregate


@dataclasses.dataclass
class PromptJob:
    """One test turn ready to decode."""

    index: int  # position in the evaluated sample list
    prompt_ids: list[int]
    dropped_turns: int


PREFIX_KEY_TOKENS = 64  # prompts whose first 64 tokens agree (one domain's system prompt) are batched together


def length_sorted_batches(jobs: Sequence[PromptJob], batch_size: int) -> list[list[PromptJob]]:
    """Batches of prompts that start alike and have similar lengths.

    Prompts are grouped by their first PREFIX_KEY_TOKENS tokens (one domain's system prompt and
    tools; shorter prompts form one group), so a batch's common first tokens are prefilled once (`grpo.rollout`); inside a group,
    longest first, since left padding costs compute proportional to the length spread inside a
    batch.  Groups go in order of their longest prompt, so memory problems show up at once.
    Every job appears in exactly one batch.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    groups: dict[tuple[int, ...], list[PromptJob]] = {}
    for job in jobs:
        key = tuple(job.prompt_ids[:PREFIX_KEY_TOKENS]) if len(job.prompt_ids) > PREFIX_KEY_TOKENS else ()
        groups.setdefault(key, []).append(job)  # prompts too short to share much form one group
    batches = []
    for group in sorted(groups.values(), key=lambda group: (-max(len(job.prompt_ids) for job in group),
                                                             min(job.index for job in group))):
        ordered = sorted(group, key=lambda job: (-len(job.prompt_ids), job.index))
        batches += [list(ordered[start:start + batch_size]) for start in range(0, len(ordered), batch_size)]
    return batches


def turn_record(parsed: Any, target: dict[str, Any], result: Any) -> TurnRecord:
    """The table's view of one scored completion (`parsed` from rewards.parse, `result` a RewardResult)."""
    call = parsed.call if parsed.kind == "tool_call" else None
    components = dict(result.components)
    similarity = components.get("similarity") if parsed.kind == target["kind"] == "answer" else None
    return TurnRecord(
        gold_kind=target["kind"],
        pred_kind=parsed.kind,
        gold_name=target.get("name") if target["kind"] == "tool_call" else None,
        pred_name=call["name"] if call else None,
        gold_arguments=target.get("arguments") if target["kind"] == "tool_call" else None,
        pred_arguments=call["arguments"] if call else None,
        similarity=similarity,
        reward=result.total,
        components=components,
        think_words=parsed.think_words,
        success=result.success,
    )


def evaluate(
    policy: Any,
    samples: Sequence[Any],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 128,
    similarity: Any = None,
    reward_config: Any = None,
    max_prompt_length: int | None = 1024,
    greedy: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    progress: bool | str = True,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Decode each sample's action once, score it, and aggregate the table.

    policy: anything with `.model` (a causal LM, possibly a PeftModel) and `.tokenizer`.
    similarity: a callable (predictions, golds) -> scores or a backend name (see rewards).
    Prompts that do not fit `max_prompt_length` even after dropping history are skipped, counted
    in metrics["counts"]["skipped_too_long"] and the first few logged; they are not in the table.

    Returns (metrics, predictions): metrics as `eval.metrics.aggregate` plus generation counts and
    timings; one prediction dict per decoded sample, in sample order, holding the TurnRecord
    fields plus the conversation id, turn index, completion text, target, token counts and
    format problems.
    """
    import torch
    from tqdm.auto import tqdm

    import rewards
    from data.render import render_each, render_prompt, stop_sequences, stop_token_ids
    from grpo.policy import pad_token_id
    from grpo.rollout import SamplingConfig, decode_completions, generate

    began = time.perf_counter()
    tokenizer = policy.tokenizer
    reward_config = reward_config or rewards.RewardConfig()
    stops = stop_token_ids(tokenizer)
    pad_id = pad_token_id(tokenizer, stops[0])

    prompts = render_each(samples, lambda sample: render_prompt(sample, tokenizer, max_length=max_prompt_length), log,
                          log_prefix="skipped (prompt too long)")
    jobs = [PromptJob(index=index, prompt_ids=list(rendered.input_ids), dropped_turns=rendered.dropped_turns)
            for index, rendered in prompts.kept]
    skipped, shortened = prompts.too_long, prompts.shortened
    if skipped > 3:
        log(f"skipped {skipped} of {len(samples)} turns in all: prompt longer than {max_prompt_length} tokens")

    sampling = SamplingConfig(group_size=1, max_new_tokens=max_new_tokens, greedy=greedy, temperature=temperature,
                              top_p=top_p, top_k=top_k)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    decoded: dict[int, dict[str, Any]] = {}
    batches = length_sorted_batches(jobs, batch_size)
    bar = tqdm(total=len(jobs), desc=progress if isinstance(progress, str) else "eval", disable=not progress,
               dynamic_ncols=True, unit="turn")
    generated_tokens, generation_time = 0, 0.0
    for batch in batches:  # generate() runs the model in eval mode under inference_mode
        batch_began = time.perf_counter()
        rollout, _ = generate(
            policy.model, [job.prompt_ids for job in batch], sampling, pad_token_id=pad_id,
            stop_token_ids=stops, stop_sequences=stop_sequences(tokenizer), generator=generator,
        )
        generation_time += time.perf_counter() - batch_began
        completion_ids = rollout.completion_ids[:, 0]  # [b, T]: one completion per prompt
        completion_mask = rollout.completion_mask[:, 0]  # [b, T]
        texts = decode_completions(tokenizer, completion_ids, completion_mask, set(stops))
        lengths = completion_mask.sum(-1).tolist()
        finished = rollout.finished[:, 0].tolist()
        generated_tokens += int(sum(lengths))
        for job, text, length, done in zip(batch, texts, lengths, finished):
            decoded[job.index] = {"completion": text, "completion_tokens": int(length), "finished": bool(done),
                                  "prompt_tokens": len(job.prompt_ids), "dropped_turns": job.dropped_turns}
        bar.update(len(batch))
    bar.close()

    # Score everything at once: one call to the similarity model for the whole split.
    order = sorted(decoded)
    texts = [decoded[index]["completion"] for index in order]
    targets = [samples[index].target for index in order]
    results = rewards.score_batch(texts, targets, config=reward_config, similarity=similarity)
    predictions, records = [], []
    for index, text, target, result in zip(order, texts, targets, results):
        parsed = rewards.parse(text)
        record = turn_record(parsed, target, result)
        records.append(record)
        sample = samples[index]
        predictions.append({
            "conversation_id": sample.conversation_id, "turn_index": sample.turn_index,
            **decoded[index], "target": target, **record.to_dict(), "problems": list(result.problems),
        })

    metrics = aggregate(records)
    unfinished = sum(not decoded[index]["finished"] for index in order)
    metrics["counts"].update({
        "samples": len(samples), "skipped_too_long": skipped, "shortened_prompts": shortened,
        "unfinished": unfinished, "generated_tokens": generated_tokens,
    })
    metrics["truncated_share"] = unfinished / len(order) if order else None
    metrics["completion_tokens_mean"] = generated_tokens / len(order) if order else None
    metrics["time_s"] = time.perf_counter() - began
    metrics["tokens_per_s"] = generated_tokens / generation_time if generation_time > 0 else None
    return metrics, predictions
