"""The GRPO trainer: one optimizer step (`grpo_step`), read top to bottom.

    prompts -> rollout: G completions each (shared-prefix KV cache)    sample_groups          grpo.rollout.generate
            -> rewards, one batched call                              score_completions      rewards.score_batch
            -> (group selection) -> advantages [B, G]                 select_and_advantages  grpo.advantages
            -> training batches [prompt | completion]                 training_batches
            -> mu passes over micro-batches, loss normaliser fixed    policy_update          grpo.loss.policy_loss
               once for the whole step (accumulation == one big batch); beta > 0: reference
               log-probs under disable_adapter(); clip grad norm; AdamW step
            -> metrics                                                rollout_metrics (+ policy_update's)

Everything before the update is `rollout_and_score` (what a benchmark times as "rollout");
`_train` is the loop around `grpo_step`: learning-rate schedule, NaN guards, logging,
checkpoints, stop signals.

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
position p samples with a generator seeded from (seed, s, p); dropout draws from a torch stream
seeded from (seed, s, rank).  Nothing random depends on what ran before, so a resumed run
re-derives the uninterrupted run's samples without saving generator states, and N processes
sample what one process samples (exactly, when prompts_per_step / N is a multiple of
rollout_batch_prompts, so that no chunk is cut at a rank boundary).

Many processes (torchrun): each rank takes a contiguous share of the step's prompts, samples and
scores whole groups, all-gathers the rewards, and sums its gradients with the others' once per
step; the loss normalisers are the step's global totals.  See grpo/distributed.py.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from grpo.advantages import advantage_stats, group_advantages, group_reward_std, most_varied_groups
from grpo import distributed
from grpo.checkpoint import check_resume_compatible, load_optimizer_state, restore_policy_weights, save_training_checkpoint
from grpo.distributed import SINGLE, Distributed
from grpo.flags import GRPOConfig
from grpo.hf_compat import position_ids_from_mask
from grpo.logprobs import grouped_token_logprobs, token_logprobs
from grpo.loss import policy_loss
from grpo.policy import Policy, pad_token_id, reference_mode
from grpo.prompts import Prompt, build_prompts, prompt_batches, trained_samples  # noqa: F401  (re-exported)
from grpo.rollout import SamplingConfig, decode_completions, generate
from grpo.run import load_start_policy, open_run
from grpo.runtime import StopRequest, derived_seed, lr_at


def check_world(config: GRPOConfig, context: Distributed) -> None:
    """Refuse settings that cannot be split over `context.world_size` processes."""
    if config.prompts_per_step % context.world_size:
        raise SystemExit(f"--prompts-per-step {config.prompts_per_step} must be a multiple of the number of "
                         f"processes ({context.world_size}): every rank samples whole groups for as many prompts")
    if config.fsdp and not context.enabled:
        raise SystemExit("--fsdp needs several processes: start the run with torchrun --nproc_per_node N (N >= 2)")


# ---------------------------------------------------------------------------------------------
# One optimizer step
# ---------------------------------------------------------------------------------------------


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


def rollout_and_score(
    policy: Policy,
    prompts: list[Prompt],
    config: GRPOConfig,
    *,
    step: int,
    reward_fn: Callable[[list[str], list[dict]], list[Any]],
    device: torch.device,
    first_position: int = 0,
    context: Distributed = SINGLE,
) -> tuple[list[StepBatch], torch.Tensor, dict[str, Any], list[dict[str, Any]]]:
    """Generate G completions per prompt, score them, compute advantages: the first half of a step.

    `prompts` are this rank's share of the step, at positions first_position.. of the step's
    global prompt list.  The chunk starting at position p samples with a generator seeded from
    (config.seed, step, p).  Rewards are all-gathered, so the advantages use the whole step's
    groups (exact per group; the batch std of scale_rewards="batch" is global), and the metrics
    describe the whole step.

    Returns this rank's training batches, the rewards of the whole step [B, G], metrics and
    this rank's per-completion records.
    """
    chunks, rollout_time = sample_groups(policy, prompts, config, step=step, first_position=first_position)
    texts, targets, results = score_completions(policy.tokenizer, chunks, reward_fn)
    local_rewards = torch.tensor([r.total for r in results], dtype=torch.float32).view(len(prompts), config.group_size)
    candidates, rewards, local_advantages = select_and_advantages(local_rewards, config, context, first_position)
    batches = training_batches(chunks, local_advantages, config, device)
    records = completion_records(chunks, texts, targets, results)
    metrics = rollout_metrics(records, candidates, rewards, rollout_time, config, context)
    return batches, candidates, metrics, records


class NonFiniteRewards(RuntimeError):
    """Every reward of a step is NaN or infinite: nothing to learn from (raised before the update)."""


def grpo_step(policy: Policy, prompts: list[Prompt], config: GRPOConfig, optimizer: torch.optim.Optimizer, *,
              step: int, reward_fn: Callable[[list[str], list[dict]], list[Any]], device: torch.device,
              first_position: int = 0, context: Distributed = SINGLE, reference_policy: Policy | None = None
              ) -> tuple[torch.Tensor, dict[str, Any], list[dict[str, Any]]]:
    """One GRPO optimizer step: rollout, rewards, advantages, batches (`rollout_and_score`), then
    the clipped-objective update.  Returns the step's rewards [B, G], its metrics and this rank's
    completion records."""
    batches, rewards, metrics, records = rollout_and_score(policy, prompts, config, step=step, reward_fn=reward_fn,
                                                           device=device, first_position=first_position, context=context)
    if not torch.isfinite(rewards).any():  # the rewards of every rank: all ranks agree
        raise NonFiniteRewards(f"step {step + 1}: every reward is NaN or infinite (the reward function could not "
                               "score any completion); stopping instead of training on garbage")
    metrics.update(policy_update(policy, batches, config, optimizer, reference_policy=reference_policy, context=context))
    return rewards, metrics, records


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


def select_and_advantages(local_rewards: torch.Tensor, config: GRPOConfig, context: Distributed,
                          first_position: int) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
    """Gather every rank's rewards, keep the groups to train on, and normalise within groups.

    local_rewards [b, G] (this rank's groups).  Returns the step's sampled rewards [B, G], the
    kept groups' rewards, and {local group index: advantages [G]} for this rank's kept groups.
    With --oversample K each rank keeps b / K of its groups, those whose rewards vary most.
    """
    candidates = distributed.all_gather_rows(context, local_rewards)  # [B, G], every rank's groups in order
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
        if distributed.any_rank(context, nonfinite):
            nonfinite = True
            optimizer.zero_grad(set_to_none=True)
            break
        distributed.sum_gradients(context, params)
        # max_norm = inf only measures (the scale factor is exactly 1).
        grad_norm = distributed.as_float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or math.inf))
        if not math.isfinite(grad_norm):  # identical on every rank: the gradients are
            nonfinite = True
            optimizer.zero_grad(set_to_none=True)
            break
        optimizer.step()
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


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def make_reward_fn(config: GRPOConfig) -> Callable[[list[str], list[dict]], list[Any]]:
    import rewards

    reward_config = rewards.RewardConfig(
        use_length=config.length_reward, w_accuracy=config.w_accuracy, w_format=config.w_format,
        w_length=config.w_length, similarity=config.similarity,
    )
    similarity = rewards.get_similarity(config.similarity, lexical_ok=config.similarity == "lexical")

    def reward_fn(texts: list[str], targets: list[dict]) -> list[Any]:
        return rewards.score_batch(texts, targets, config=reward_config, similarity=similarity)

    return reward_fn


def train(config: GRPOConfig, *, reward_fn: Callable[[list[str], list[dict]], list[Any]] | None = None) -> Path:
    """Run GRPO as configured; returns the run directory.  Resumable with config.resume.

    Under torchrun every process runs this; rank 0 alone writes the run directory.
    """
    with distributed.distributed_run(config.device) as (context, device):
        return _train(config, context, device, reward_fn)


def _train(config: GRPOConfig, context: Distributed, device: torch.device,
           reward_fn: Callable[[list[str], list[dict]], list[Any]] | None) -> Path:
    from tqdm.auto import tqdm

    check_world(config, context)
    run = open_run(config, context, device)
    run_dir, resume_from, state, start_step, logger, log, dtype = (
        run.run_dir, run.resume_from, run.state, run.start_step, run.logger, run.log, run.dtype)
    if context.enabled:
        log(f"distributed: {context.world_size} processes ({context.backend}), "
            f"{config.prompts_per_step // context.world_size} prompts per rank and step"
            + (", FSDP2" if config.fsdp else ""))

    policy = load_start_policy(config, device, dtype, log, context)
    reference_policy = None
    if config.beta > 0 and not policy.use_lora:
        import copy

        # A frozen copy of the starting point, taken before a checkpoint's weights are restored.
        reference_policy = dataclasses.replace(policy, model=copy.deepcopy(policy.model).eval().requires_grad_(False))
    if resume_from is not None:
        check_resume_compatible(resume_from, config, policy)
        restore_policy_weights(policy, resume_from)  # before sharding: every rank reads the whole file
    if config.fsdp:
        distributed.shard_model(context, policy.model, device)
        if reference_policy is not None:
            distributed.shard_model(context, reference_policy.model, device)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    if not config.fsdp:
        distributed.broadcast_parameters(context, params)  # replicas start identical
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    reward_fn = reward_fn or make_reward_fn(config)
    prompts = build_prompts(config, policy.tokenizer, log)

    skipped_steps = 0
    if state is not None:
        load_optimizer_state(optimizer, state, model=policy.model)
        skipped_steps = int(state.get("skipped_steps", 0))
        log(f"resumed from {resume_from} at step {start_step}")

    def save(step: int) -> Path:
        # Sampling is re-derived from (seed, step, prompt position): no generator state to keep.
        sampling = {"scheme": "derived_seed(seed, step, first prompt position of the rollout chunk)", "seed": config.seed}
        path = save_training_checkpoint(run_dir, step, policy=policy, optimizer=optimizer, config=config,
                                        extra={"generator": sampling, "skipped_steps": skipped_steps,
                                               "world_size": context.world_size},
                                        keep_last=config.keep_checkpoints, context=context)
        log(f"checkpoint {path}")
        return path

    bad_steps = 0  # consecutive steps with a non-finite loss
    progress = tqdm(total=config.max_steps, initial=start_step, desc="grpo", dynamic_ncols=True, disable=not context.is_main)
    batches_iter = prompt_batches(len(prompts), config.prompts_per_step * config.oversample, seed=config.seed,
                                  start_step=start_step)
    step, stopping = start_step, False
    try:
        with StopRequest() as stop:
            for step, indices in batches_iter:
                if step >= config.max_steps:
                    break
                # A signal may reach the ranks at different moments: stop together, after the same step.
                stopping = distributed.any_rank(context, bool(stop))
                if stopping:
                    break
                began = time.perf_counter()
                torch.manual_seed(derived_seed(config.seed, step, context.rank))  # dropout, if any
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, lr=config.lr, warmup_steps=config.warmup_steps,
                                        total_steps=config.max_steps, schedule=config.lr_schedule)
                first, last = distributed.shard_bounds(len(indices), context.rank, context.world_size)
                try:
                    _, metrics, records = grpo_step(
                        policy, [prompts[i] for i in indices[first:last]], config, optimizer, step=step,
                        reward_fn=reward_fn, device=device, first_position=first, context=context,
                        reference_policy=reference_policy)
                except NonFiniteRewards as error:
                    save(step)
                    raise SystemExit(str(error)) from None
                metrics["lr"] = optimizer.param_groups[0]["lr"]
                metrics["time/step_s"] = time.perf_counter() - began
                if metrics["nonfinite_loss"]:
                    bad_steps += 1
                    skipped_steps += 1
                    log(f"step {step + 1}: non-finite loss or gradient, step skipped ({bad_steps} in a row)")
                    if bad_steps >= config.max_bad_steps:
                        logger.log(step + 1, {**metrics, "train/skipped_steps": skipped_steps})
                        raise SystemExit(f"stopping: {bad_steps} consecutive steps with a non-finite loss or gradient "
                                         f"(--max-bad-steps {config.max_bad_steps}; see {run_dir}/log.txt)")
                else:
                    bad_steps = 0
                metrics["train/skipped_steps"] = skipped_steps
                # Logged after every log_every-th step (counting from 1) and after the last one.
                if (step + 1) % config.log_every == 0 or step + 1 == config.max_steps:
                    logger.log(step + 1, metrics)
                if config.sample_every and step % config.sample_every == 0:
                    logger.write_jsonl("samples.jsonl", [{"step": step + 1, **r} for r in records[: min(4, len(records))]])
                progress.update(1)
                progress.set_postfix(reward=f"{metrics['reward/mean']:.3f}", acc=f"{metrics.get('reward/accuracy', 0):.2f}",
                                     len=f"{metrics['completion/length_mean']:.0f}", s=f"{metrics['time/step_s']:.1f}")
                if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < config.max_steps:
                    save(step + 1)
        final_step = step  # the first step not taken
        if final_step != start_step or resume_from is None:  # a resume that took no step has its checkpoint
            save(final_step)
    finally:
        progress.close()
        logger.close()
    if stopping:
        raise SystemExit(f"stopped by {stop.signal_name or 'a signal to another rank'} at step {final_step}; "
                         f"resume with --resume --out {run_dir}")
    return run_dir
