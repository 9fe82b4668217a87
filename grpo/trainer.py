"""The GRPO trainer: the loop around `grpo.step.grpo_step`.

    for each step (grpo.run.TrainingRun: stop signals, seeds, learning rate, checkpoints)
        this rank's share of the step's prompts         grpo.prompts.prompt_batches
        grpo_step: rollout -> rewards -> advantages -> update -> metrics     grpo/step.py
          (--env synthetic: episode_step over whole conversations instead)  grpo/episodes.py
        skip-and-count a non-finite step; log; sample records

Under torchrun every process runs this loop; rank 0 alone writes the run directory.  See
grpo/step.py for the step itself, grpo/update.py for the clipped-objective update, and
grpo/run.py for what SFT shares with it.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import torch

from grpo import distributed
from grpo.distributed import Distributed
from grpo.flags import GRPOConfig
from grpo.prompts import build_prompts, prompt_batches
from grpo.run import TrainingRun
from grpo.step import NonFiniteRewards, grpo_step


def check_world(config: GRPOConfig, context: Distributed) -> None:
    """Refuse settings that cannot be split over `context.world_size` processes."""
    if config.prompts_per_step % context.world_size:
        raise SystemExit(f"--prompts-per-step {config.prompts_per_step} must be a multiple of the number of "
                         f"processes ({context.world_size}): every rank samples whole groups for as many prompts")
    if config.fsdp and not context.enabled:
        raise SystemExit("--fsdp needs several processes: start the run with torchrun --nproc_per_node N (N >= 2)")


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
        check_world(config, context)
        with TrainingRun(config, context, device, name="grpo") as run:
            # Episodes rewarded by success alone score no single turn: no similarity model to load.
            turn_rewards = config.env == "none" or config.episode_reward != "success"
            return _train(run, config, context, device, reward_fn or (make_reward_fn(config) if turn_rewards else None))


def _train(run: TrainingRun, config: GRPOConfig, context: Distributed, device: torch.device,
           reward_fn: Callable[[list[str], list[dict]], list[Any]]) -> Path:
    if context.enabled:
        run.log(f"distributed: {context.world_size} processes ({context.backend}), "
                f"{config.prompts_per_step // context.world_size} prompts per rank and step"
                + (", FSDP2" if config.fsdp else ""))
    policy = run.load_policy()
    reference_policy = None
    if config.beta > 0 and not policy.use_lora:
        import copy

        # A frozen copy of the starting point, taken before a checkpoint's weights are restored.
        reference_policy = dataclasses.replace(policy, model=copy.deepcopy(policy.model).eval().requires_grad_(False))
    optimizer = run.prepare(policy, *([reference_policy] if reference_policy is not None else []))
    if config.env == "synthetic":  # whole conversations: grpo/episodes.py; tasks take the prompts' place
        from grpo.episodes import build_tasks, episode_step

        prompts, step_fn = build_tasks(config, policy.tokenizer, run.log), episode_step
    else:
        prompts, step_fn = build_prompts(config, policy.tokenizer, run.log), grpo_step
    # Sampling is re-derived from (seed, step, prompt position): no generator state to keep.
    scheme = ("derived_seed(seed, step, first prompt position of the rollout chunk"
              + (", turn)" if config.env != "none" else ")"))
    run.checkpoint_extra["generator"] = {"scheme": scheme, "seed": config.seed}
    batches = prompt_batches(len(prompts), config.prompts_per_step * config.oversample, seed=config.seed,
                             start_step=run.start_step)
    for step in run.steps(config.max_steps):
        _, indices = next(batches)
        first, last = distributed.shard_bounds(len(indices), context.rank, context.world_size)
        try:
            result = step_fn(policy, [prompts[i] for i in indices[first:last]], config, optimizer, step=step,
                             reward_fn=reward_fn, device=device, first_position=first, context=context,
                             reference_policy=reference_policy)
        except NonFiniteRewards as error:
            run.save(step)
            raise SystemExit(str(error)) from None
        metrics = {**result.metrics, "lr": optimizer.param_groups[0]["lr"],
                   "time/step_s": time.perf_counter() - run.step_began}
        run.count_bad_step(step, not metrics["nonfinite_loss"], "non-finite loss or gradient", metrics,
                           skipped_key="train/skipped_steps")
        metrics["train/skipped_steps"] = run.skipped_steps
        # Logged after every log_every-th step (counting from 1) and after the last one.
        if (step + 1) % config.log_every == 0 or step + 1 == config.max_steps:
            run.logger.log(step + 1, metrics)
        if config.sample_every and step % config.sample_every == 0:
            run.logger.write_jsonl("samples.jsonl", [{"step": step + 1, **r} for r in result.records[:4]])
        run.progress.set_postfix(reward=f"{metrics['reward/mean']:.3f}", acc=f"{metrics.get('reward/accuracy', 0):.2f}",
                                 len=f"{metrics['completion/length_mean']:.0f}", s=f"{metrics['time/step_s']:.1f}")
    return run.finish()
