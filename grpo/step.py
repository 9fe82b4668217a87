"""One GRPO optimizer step, read top to bottom (`grpo_step`):

    prompts -> rollout: G completions each (shared-prefix KV cache)    sample_groups          grpo.rollout.generate
            -> rewards, one batched call                              score_completions      rewards.score_batch
            -> (group selection) -> advantages [B, G]                 select_and_advantages  grpo.advantages
            -> training batches [prompt | completion]                 training_batches
            -> mu passes of the clipped objective, one AdamW step     policy_update          grpo.update
            -> metrics                                                rollout_metrics (+ policy_update's)

Optional group selection (--oversample K, K = 1 in the paper): sample groups for K times the
step's prompts, then train on the prompts_per_step groups whose rewards vary most
(grpo.advantages.most_varied_groups); the logged rewards describe every sampled group.  Under
torchrun each rank keeps its share from its own groups, so which groups are kept (not what is
sampled) depends on the number of processes.

With mu = 1 (the default, as in the paper) the sampled completions are used once and
old_logprobs = logprobs.detach(), so the ratio is 1 and the objective reduces to the
policy-gradient term.  With mu > 1 the old log-probs are recomputed once, before the first pass.

Randomness: the prompts of step s are cut into rollout chunks at multiples of
rollout_batch_prompts (counted in the step's global prompt list), and the chunk that starts at
position p samples with a generator seeded from (seed, s, p).  Nothing random depends on what
ran before, so a resumed run re-derives the uninterrupted run's samples without saving generator
states, and N processes sample what one process samples (exactly, when prompts_per_step / N is a
multiple of rollout_batch_prompts, so that no chunk is cut at a rank boundary).

Many processes (torchrun): each rank takes a contiguous share of the step's prompts, samples and
scores whole groups, all-gathers the rewards (the one place where distribution changes the data),
and sums its gradients with the others' once per step; the loss normalisers are the step's
global totals.  See grpo/distributed.py.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import torch

from grpo import distributed
from grpo.advantages import advantage_stats, group_advantages, group_reward_std, most_varied_groups
from grpo.distributed import SINGLE, Distributed
from grpo.flags import GRPOConfig
from grpo.policy import Policy, pad_token_id
from grpo.prompts import Prompt
from grpo.rollout import SamplingConfig, decode_completions, generate
from grpo.runtime import derived_seed
from grpo.update import StepBatch, policy_update, sampling_is_the_policy

RewardFn = Callable[[list[str], list[dict]], list[Any]]


@dataclasses.dataclass
class StepResult:
    """What one step produced, on this rank."""

    batches: list[StepBatch]  # this rank's training batches
    rewards: torch.Tensor  # [B, G] every sampled reward of the step (all ranks)
    metrics: dict[str, Any]  # the step's metrics (sums over ranks)
    records: list[dict[str, Any]]  # one per completion of this rank: text, target, reward, components


class NonFiniteRewards(RuntimeError):
    """Every reward of a step is NaN or infinite: nothing to learn from (raised before the update)."""


def grpo_step(policy: Policy, prompts: list[Prompt], config: GRPOConfig, optimizer: torch.optim.Optimizer | None, *,
              step: int, reward_fn: RewardFn, device: torch.device, first_position: int = 0,
              context: Distributed = SINGLE, reference_policy: Policy | None = None) -> StepResult:
    """One GRPO step on this rank's `prompts` (positions first_position.. of the step's prompt list).

    The chunk of prompts starting at position p samples with a generator seeded from
    (config.seed, step, p).  Rewards are all-gathered, so the advantages use the whole step's
    groups (exact per group; the batch std of scale_rewards="batch" is global), and the metrics
    describe the whole step.  optimizer=None stops before the update (what a benchmark times as
    the rollout, and what tests inspect).
    """
    chunks, rollout_time = sample_groups(policy, prompts, config, step=step, first_position=first_position)
    texts, targets, results = score_completions(policy.tokenizer, chunks, reward_fn)
    sampled, kept, advantages = select_and_advantages(reward_matrix(results, config.group_size), config, context,
                                                      first_position, step)
    batches = training_batches(chunks, advantages, config, device)
    update = {} if optimizer is None else policy_update(policy, batches, config, optimizer, context=context,
                                                        reference_policy=reference_policy)
    records = completion_records(chunks, texts, targets, results)
    metrics = {**rollout_metrics(records, sampled, kept, rollout_time, config, context), **update}
    return StepResult(batches, sampled, metrics, records)


def rollout_and_score(policy: Policy, prompts: list[Prompt], config: GRPOConfig, *, step: int, reward_fn: RewardFn,
                      device: torch.device, first_position: int = 0, context: Distributed = SINGLE
                      ) -> tuple[list[StepBatch], torch.Tensor, dict[str, Any], list[dict[str, Any]]]:
    """`grpo_step` without the update: (batches, rewards [B, G], metrics, records)."""
    result = grpo_step(policy, prompts, config, None, step=step, reward_fn=reward_fn, device=device,
                       first_position=first_position, context=context)
    return result.batches, result.rewards, result.metrics, result.records


def rollout_chunks(first: int, stop: int, chunk_prompts: int) -> list[tuple[int, int]]:
    """[start, end) positions of the rollout chunks covering prompts first..stop-1 of a step.

    Chunks are cut at multiples of `chunk_prompts` in the step's *global* prompt list and at this
    rank's bounds, so a chunk never straddles two ranks and, when the rank bounds are multiples
    of `chunk_prompts`, every process count cuts the same chunks.
    """
    chunks, start = [], first
    while start < stop:
        end = min(stop, (start // chunk_prompts + 1) * chunk_prompts)
        chunks.append((start, end))
        start = end
    return chunks



def sample_groups(policy: Policy, prompts: list[Prompt], config: GRPOConfig, *, step: int, first_position: int
                  ) -> tuple[list[tuple[list[Prompt], Any]], float]:
    """G completions for each prompt, in rollout chunks of `rollout_batch_prompts` prompts, each
    chunk with its own derived seed; returns [(chunk prompts, Rollout)] and the sampling time."""
    from data.render import stop_sequences, stop_token_ids

    tokenizer = policy.tokenizer
    sampling = SamplingConfig(
        group_size=config.group_size, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
        top_p=config.top_p, top_k=config.top_k, min_new_tokens=config.min_new_tokens,
    )
    stops = stop_token_ids(tokenizer)
    pad_id = pad_token_id(tokenizer, stops[0])
    chunks, rollout_time = [], 0.0
    with distributed.gathered_for_rollout(policy.model):  # FSDP: ranks run different numbers of passes
        for start, end in rollout_chunks(first_position, first_position + len(prompts), config.rollout_batch_prompts):
            chunk = prompts[start - first_position:end - first_position]
            generator = torch.Generator(device="cpu").manual_seed(derived_seed(config.seed, step, start))
            began = time.perf_counter()
            rollout, _ = generate(
                policy.model, [p.prompt_ids for p in chunk], sampling, pad_token_id=pad_id,
                stop_token_ids=stops, stop_sequences=stop_sequences(tokenizer), generator=generator,
            )
            rollout_time += time.perf_counter() - began
            chunks.append((chunk, rollout))
    return chunks, rollout_time


def score_completions(tokenizer: Any, chunks: list[tuple[list[Prompt], Any]],
                      reward_fn: Callable[[list[str], list[dict]], list[Any]]
                      ) -> tuple[list[str], list[Any], list[Any]]:
    """Every completion's text (final stop token dropped), target and reward, the rewards in one
    batched call (one similarity-model call per step and rank)."""
    from data.render import stop_token_ids

    stops = set(stop_token_ids(tokenizer))
    texts, targets = [], []
    for chunk, rollout in chunks:
        group_size = rollout.completion_ids.shape[1]
        flat_ids, flat_mask = rollout.completion_ids.flatten(0, 1), rollout.completion_mask.flatten(0, 1)
        for row, text in enumerate(decode_completions(tokenizer, flat_ids, flat_mask, stops)):
            texts.append(text)
            targets.append(chunk[row // group_size].sample.target)
    return texts, targets, reward_fn(texts, targets)


def reward_matrix(results: list[Any], group_size: int) -> torch.Tensor:
    """The rewards of this rank's completions as [b, G] (b prompts, their G completions in order)."""
    return torch.tensor([r.total for r in results], dtype=torch.float32).view(-1, group_size)


def select_and_advantages(local_rewards: torch.Tensor, config: GRPOConfig, context: Distributed,
                          first_position: int, step: int = 0
                          ) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
    """Gather every rank's rewards, keep the groups to train on, and normalise within groups.

    local_rewards [b, G] (this rank's groups).  Returns the step's sampled rewards [B, G], the
    kept groups' rewards, and {local group index: advantages [G]} for this rank's kept groups.
    With --oversample K each rank keeps b / K of its groups, those whose rewards vary most.
    Raises NonFiniteRewards (on every rank alike) when no reward of the step is finite.
    """
    candidates = distributed.all_gather_rows(context, local_rewards)  # [B, G], every rank's groups in order
    if not torch.isfinite(candidates).any():
        raise NonFiniteRewards(f"step {step + 1}: every reward is NaN or infinite (the reward function could not "
                               "score any completion); stopping instead of training on garbage")
    kept_count = local_rewards.shape[0] // config.oversample
    kept = (most_varied_groups(local_rewards, kept_count) if config.oversample > 1
            else torch.arange(local_rewards.shape[0]))
    rewards = distributed.all_gather_rows(context, local_rewards[kept]) if config.oversample > 1 else candidates
    advantages = group_advantages(rewards, scale=config.scale_rewards)
    first_kept = first_position // config.oversample  # ranks keep equal shares, in rank order
    return candidates, rewards, dict(zip(kept.tolist(), advantages[first_kept:first_kept + kept_count]))


def training_batches(chunks: list[tuple[list[Prompt], Any]], advantages: dict[int, torch.Tensor],
                     config: GRPOConfig, device: torch.device) -> list[StepBatch]:
    """The kept groups of each rollout chunk as one StepBatch: [prompt | completion] rows, the
    completion mask, each row's advantage and, where comparable, the sampler's log-probs."""
    batches, first = [], 0  # first: this rank's prompts before the current chunk
    for chunk, rollout in chunks:
        b, g, _ = rollout.completion_ids.shape
        completion_mask = rollout.completion_mask.flatten(0, 1)
        groups = [i for i in range(b) if first + i in advantages]
        if groups:
            rows = torch.tensor([i * g + j for i in groups for j in range(g)])
            prompt_ids = rollout.prompt_ids[groups].repeat_interleave(g, dim=0)
            prompt_mask = rollout.prompt_mask[groups].repeat_interleave(g, dim=0)
            completion_ids = rollout.completion_ids.flatten(0, 1)[rows]
            batches.append(StepBatch(
                input_ids=torch.cat([prompt_ids, completion_ids], dim=1).to(device),
                attention_mask=torch.cat([prompt_mask, completion_mask[rows].long()], dim=1).to(device),
                completion_mask=completion_mask[rows].float().to(device),
                advantages=torch.cat([advantages[first + i] for i in groups]).to(device),
                prompt_length=prompt_ids.shape[1], group_size=g,
                sampling_logprobs=(rollout.sampling_logprobs.flatten(0, 1)[rows].to(device)
                                   if sampling_is_the_policy(config) else None),
            ))
        first += b
    return batches


def completion_records(chunks: list[tuple[list[Prompt], Any]], texts: list[str], targets: list[Any],
                       results: list[Any]) -> list[dict[str, Any]]:
    """One record per completion of this rank (length, finished, text, target, reward, components)."""
    records = []
    for chunk, rollout in chunks:
        lengths = rollout.completion_mask.flatten(0, 1).sum(-1)
        finished = rollout.finished.flatten()
        records += [{"length": int(lengths[row]), "finished": bool(finished[row])} for row in range(lengths.shape[0])]
    for record, text, target, result in zip(records, texts, targets, results):
        record.update(text=text, target=target, reward=result.total, components=dict(result.components),
                      success=result.success)
    return records


def rollout_metrics(records: list[dict[str, Any]], candidates: torch.Tensor, rewards: torch.Tensor,
                    rollout_time: float, config: GRPOConfig, context: Distributed) -> dict[str, Any]:
    """The step's rollout metrics: sums (and maxima) over every rank's completions."""
    local_sums: dict[str, float] = {
        "completions": len(records), "success": sum(r["success"] for r in records),
        "length": sum(r["length"] for r in records), "truncated": sum(not r["finished"] for r in records),
    }  # "length" sums generated tokens, stop tokens included: the rollout's token count
    for key in ("accuracy", "format", "length"):
        values = [r["components"][key] for r in records if key in r["components"]]
        local_sums[f"component/{key}"], local_sums[f"component_count/{key}"] = sum(values), len(values)
    sums = distributed.all_reduce_numbers(context, local_sums)
    maxima = distributed.all_reduce_numbers(
        context, {"length": max(r["length"] for r in records), "time": rollout_time}, op="max")
    completions = max(sums["completions"], 1)
    metrics: dict[str, Any] = {
        **{f"reward/{k.removeprefix('reward_')}": v for k, v in advantage_stats(candidates).items()},
        "success_rate": sums["success"] / completions,
        "completion/length_mean": sums["length"] / completions,
        "completion/length_max": maxima["length"],
        "completion/truncated_share": sums["truncated"] / completions,
        "rollout/tokens": int(sums["length"]),
        "rollout/tokens_per_s": sums["length"] / max(maxima["time"], 1e-9),
        "time/rollout_s": maxima["time"],
    }
    for key in ("accuracy", "format", "length"):
        if sums[f"component_count/{key}"]:
            metrics[f"reward/{key}"] = sums[f"component/{key}"] / sums[f"component_count/{key}"]
    if config.oversample > 1:
        metrics["select/group_std_all"] = _mean_group_std(candidates)
        metrics["select/group_std_kept"] = _mean_group_std(rewards)
    return metrics


def _mean_group_std(rewards: torch.Tensor) -> float:
    """Mean over groups of the std of their scored rewards (a logging diagnostic for --oversample)."""
    stds = group_reward_std(rewards)
    stds = stds[~stds.isnan()]
    return stds.mean().item() if stds.numel() else math.nan
