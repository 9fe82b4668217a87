"""The policy update of a GRPO step: mu passes of the clipped objective over the step's completions.

    StepBatch (b prompts x G completions, [prompt | completion] rows)
        -> micro-batches of --train-micro-batch rows (whole groups when the prompt is shared)
        -> old log-probs (mu > 1) and reference log-probs (beta > 0), once, without gradients
        -> per pass: log-probs -> grpo.loss.policy_loss -> backward, accumulated over micro-batches
        -> gradients summed over ranks, clipped, one AdamW step (grpo.run.optimizer_step)

The loss normalisers (sequence count, token count) are those of the whole step, fixed before
the first backward, so accumulating micro-batches (and ranks) gives exactly the gradient of one
large batch, for every loss type.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch

from grpo import distributed
from grpo.distributed import SINGLE, Distributed
from grpo.flags import GRPOConfig
from grpo.hf_compat import position_ids_from_mask
from grpo.logprobs import grouped_token_logprobs, token_logprobs
from grpo.loss import policy_loss
from grpo.policy import Policy, reference_mode
from grpo.run import optimizer_step


@dataclasses.dataclass
class StepBatch:
    """The training view of one rollout call: b prompts x G completions, flattened to n = b*G rows."""

    input_ids: torch.Tensor  # [n, P + T] left-padded prompt followed by the completion
    attention_mask: torch.Tensor  # [n, P + T]
    completion_mask: torch.Tensor  # [n, T] float, 1 on tokens that get loss
    advantages: torch.Tensor  # [n]
    prompt_length: int  # P
    group_size: int = 1  # G: rows g*G .. g*G + G-1 share one prompt (1: no structure assumed)
    sampling_logprobs: torch.Tensor | None = None  # [n, T] what the sampler drew each token with



def _micro_batches(batch: StepBatch, size: int, *, whole_groups: bool = False) -> list[StepBatch]:
    """Cut a rollout chunk into micro-batches of at most `size` sequences.

    whole_groups (shared-prefix training): a micro-batch holds whole groups, size // G of them,
    so that each prompt runs once per micro-batch; when size < G, consecutive parts of one group
    of at most `size` rows (the rows of a part still share their prompt).  Otherwise pieces of
    `size` rows with group_size 1 (every row computed on its own).
    """
    rows, group = batch.input_ids.shape[0], batch.group_size
    if rows % group:
        raise ValueError(f"StepBatch has {rows} rows, not a multiple of its group_size {group}")
    if whole_groups and group > 1 and size >= group:
        step = size // group * group
        pieces = [(start, min(start + step, rows), group) for start in range(0, rows, step)]
    elif whole_groups and group > 1:
        pieces = [(start, min(start + size, first + group), min(start + size, first + group) - start)
                  for first in range(0, rows, group) for start in range(first, first + group, size)]
    else:
        pieces = [(start, min(start + size, rows), 1) for start in range(0, rows, size)]
    sampled = batch.sampling_logprobs
    return [StepBatch(input_ids=batch.input_ids[start:end], attention_mask=batch.attention_mask[start:end],
                      completion_mask=batch.completion_mask[start:end], advantages=batch.advantages[start:end],
                      prompt_length=batch.prompt_length, group_size=piece_group,
                      sampling_logprobs=None if sampled is None else sampled[start:end])
            for start, end, piece_group in pieces]


def sampling_is_the_policy(config: Any) -> bool:
    """True when the sampler draws from the policy's own softmax(z / temperature): no top-k, no
    top-p, no stop-token ban.  Only then can its log-probs be compared with the training ones."""
    return config.top_k == 0 and config.top_p >= 1.0 and config.min_new_tokens == 0


def _sequence_logprobs(policy: Policy, batch: StepBatch, temperature: float, *, entropy: bool = False) -> Any:
    """Log-probs [n, T] of the completion tokens (and their entropies, with `entropy`).

    A batch with group_size G > 1 is computed by `grouped_token_logprobs`: each prompt runs once
    and its G completions attend to its keys and values (same values as the unshared forward).
    """
    if batch.group_size == 1:
        return token_logprobs(
            policy.model, batch.input_ids, batch.attention_mask, completion_start=batch.prompt_length,
            temperature=temperature, position_ids=position_ids_from_mask(batch.attention_mask), return_entropy=entropy,
        )
    rows, group, prompt_length = batch.input_ids.shape[0], batch.group_size, batch.prompt_length
    input_ids = batch.input_ids.view(rows // group, group, -1)
    attention_mask = batch.attention_mask.view(rows // group, group, -1)
    prompt_ids, prompt_mask = input_ids[:, 0, :prompt_length], attention_mask[:, 0, :prompt_length]
    if not (torch.equal(input_ids[:, :, :prompt_length], prompt_ids[:, None].expand(-1, group, -1))
            and torch.equal(attention_mask[:, :, :prompt_length], prompt_mask[:, None].expand(-1, group, -1))):
        raise ValueError(f"StepBatch.group_size is {group} but the rows of a group hold different prompts")
    result = grouped_token_logprobs(
        policy.model, prompt_ids, prompt_mask, input_ids[:, :, prompt_length:], attention_mask[:, :, prompt_length:],
        temperature=temperature, return_entropy=entropy,
    )
    return tuple(part.flatten(0, 1) for part in result) if entropy else result.flatten(0, 1)


def policy_update(
    policy: Policy,
    batches: list[StepBatch],
    config: GRPOConfig,
    optimizer: torch.optim.Optimizer,
    *,
    reference_policy: Policy | None = None,
    context: Distributed = SINGLE,
) -> dict[str, Any]:
    """mu passes of clipped-objective gradient steps over the step's completions.

    The loss normalisers (sequence count, token count) are those of the whole step on every
    rank, summed before the first backward, so the summed micro-batch gradients of all ranks
    equal the gradient of one large batch; they are summed across ranks once per pass
    (`distributed.sum_gradients`; FSDP reduce-scatters them itself).  A non-finite loss or
    gradient norm on any rank skips the whole step on every rank.  Returns metrics (sums over
    ranks); the optimizer step and gradient clipping happen here too (one optimizer step per pass).
    """
    micro = [m for batch in batches
             for m in _micro_batches(batch, config.train_micro_batch, whole_groups=config.share_prefix)]
    totals = distributed.all_reduce_numbers(context, {
        "sequences": sum(int(m.input_ids.shape[0]) for m in micro),
        "items": float(sum(m.completion_mask.sum() for m in micro)),
    })
    num_sequences, num_items = int(totals["sequences"]), int(totals["items"])
    sharded = bool(distributed.fsdp_modules(policy.model))

    old_logprobs: list[torch.Tensor | None] = [None] * len(micro)
    ref_logprobs: list[torch.Tensor | None] = [None] * len(micro)
    with torch.no_grad():
        for i, m in enumerate(micro):
            if config.mu > 1:
                old_logprobs[i] = _sequence_logprobs(policy, m, config.temperature)
            if config.beta > 0:
                if reference_policy is not None:  # full fine-tuning keeps a frozen copy
                    ref_logprobs[i] = _sequence_logprobs(reference_policy, m, config.temperature)
                else:
                    with reference_mode(policy):
                        ref_logprobs[i] = _sequence_logprobs(policy, m, config.temperature)

    params = [p for p in policy.model.parameters() if p.requires_grad]
    sums: dict[str, float] = {}
    train_tokens, began = 0, time.perf_counter()
    grad_norm, loss_total, nonfinite = 0.0, 0.0, False
    gap_sum, gap_max, gap_tokens = 0.0, 0.0, 0.0  # |training - sampling log-prob| on the first pass
    for pass_index in range(config.mu):
        optimizer.zero_grad(set_to_none=True)
        loss_total = 0.0
        for i, m in enumerate(micro):
            logprobs, entropy = _sequence_logprobs(policy, m, config.temperature, entropy=True)
            loss, loss_metrics = policy_loss(
                logprobs, m.advantages, m.completion_mask, old_logprobs=old_logprobs[i], ref_logprobs=ref_logprobs[i],
                beta=config.beta, epsilon_low=config.epsilon_low, epsilon_high=config.epsilon_high,
                loss_type=config.loss_type, max_completion_length=config.max_new_tokens, num_items=num_items,
                num_sequences=num_sequences,
            )
            if not torch.isfinite(loss):
                nonfinite = True
                if not sharded:
                    break
                # FSDP's backward holds collectives every rank must join: run it, discard the result.
            loss.backward()
            if nonfinite:
                continue
            loss_total += float(loss.detach())
            tokens = float(m.completion_mask.sum())
            train_tokens += int(m.attention_mask.sum())
            weight = tokens / max(num_items, 1)
            for key, value in loss_metrics.items():  # token-weighted means, except counts
                if isinstance(value, (int, float)):
                    sums[key] = sums.get(key, 0.0) + float(value) * (1.0 if key == "num_tokens" else weight)
            sums["entropy"] = sums.get("entropy", 0.0) + float((entropy * m.completion_mask).sum()) / max(num_items, 1)
            if pass_index == 0 and m.sampling_logprobs is not None:  # same weights as the rollout's
                gap = (logprobs.detach().float() - m.sampling_logprobs).abs()[m.completion_mask.bool()]
                if gap.numel():
                    gap_sum, gap_tokens = gap_sum + float(gap.sum()), gap_tokens + gap.numel()
                    gap_max = max(gap_max, float(gap.max()))
        nonfinite = distributed.any_rank(context, nonfinite)
        grad_norm = optimizer_step(context, params, optimizer, max_grad_norm=config.max_grad_norm, loss_finite=not nonfinite)
        if not math.isfinite(grad_norm):  # the step was skipped, on every rank
            nonfinite = True
            break
    elapsed = distributed.all_reduce_numbers(context, {"time": time.perf_counter() - began}, op="max")["time"]
    if nonfinite:  # agreed by every rank; a rank that stopped early holds fewer keys
        sums = {}
    sums = distributed.all_reduce_numbers(context, {**sums, "__loss": loss_total, "__tokens": train_tokens,
                                                    "__gap_sum": gap_sum, "__gap_tokens": gap_tokens})
    loss_total, train_tokens = sums.pop("__loss"), sums.pop("__tokens")
    gap_sum, gap_tokens = sums.pop("__gap_sum"), sums.pop("__gap_tokens")
    gap_max = distributed.all_reduce_numbers(context, {"gap": gap_max}, op="max")["gap"]
    metrics = {f"loss/{k}": v / config.mu for k, v in sums.items() if k != "entropy"}
    metrics.update({
        "loss": loss_total, "grad_norm": grad_norm, "entropy": sums.get("entropy", 0.0) / config.mu,
        "train/tokens_per_s": train_tokens / max(elapsed, 1e-9), "time/train_s": elapsed, "nonfinite_loss": nonfinite,
    })
    if gap_tokens:  # sampler and trainer disagree by float rounding (more in bf16) or by a bug
        metrics["logprob_gap/mean_abs"], metrics["logprob_gap/max_abs"] = gap_sum / gap_tokens, gap_max
    return metrics
