"""Supervised fine-tuning: the paper's stage 1 (base, no reasoning) and stage 2 (cold start).

    for each step (grpo.run.TrainingRun: stop signals, seeds, learning rate, checkpoints, as GRPO)
        this rank's grad_accum micro-batches        sft.data.micro_batches_for_epoch
        accumulate the step's gradients              sft.loss.accumulate_gradients
        optimizer_step (skipped when not finite)     grpo.run.optimizer_step
        log (with the validation loss every eval_every steps)

Loss: token-mean cross-entropy over the loss mask (the assistant target tokens and the closing
end-of-turn token), with the normaliser fixed per optimizer step:

    L = - sum_{micro-batches m} sum_{tokens t in m, mask=1} log p(x_t | x_<t)  /  (mask tokens in the whole step)

so `grad_accum` micro-batches give exactly the gradient of one large batch.  Only the hidden
states of masked positions are projected onto the vocabulary (no [N, L, V] logits tensor).

Stage 1 renders every sample with an empty think block; stage 2 trains only on the samples that
carry written reasoning (at most 100 in the paper) and starts from the stage-1 checkpoint
(`--init`), whose adapters are merged before a fresh LoRA is attached (grpo.policy.load_policy).

Many processes (torchrun): the step's grad_accum x N micro-batches are consecutive entries of one
seeded list (the same on every rank), rank r takes grad_accum of them, T is all-reduced before
the first backward and the gradients are summed once per step (grpo/distributed.py), so N
processes with grad_accum A train exactly like one process with grad_accum A x N.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from grpo import distributed
from grpo.distributed import Distributed
from grpo.policy import pad_token_id
from grpo.run import TrainingRun, optimizer_step  # the same run as GRPO's
from sft.data import micro_batches_for_epoch, prepare_data
from sft.flags import DEFAULT_DATA, SFTConfig
from sft.loss import accumulate_gradients, step_loss_tokens, validation_loss

__all__ = ["SFTConfig", "train"]


def train(config: SFTConfig) -> Path:
    """Run one SFT stage; returns the run directory (its newest checkpoint is the stage's result).

    Under torchrun every process runs this; rank 0 alone writes the run directory.
    """
    with distributed.distributed_run(config.device) as (context, device):
        if config.fsdp and not context.enabled:
            raise SystemExit("--fsdp needs several processes: start the run with torchrun --nproc_per_node N (N >= 2)")
        with TrainingRun(config, context, device, name=f"sft:{config.stage}") as run:
            return _train(run, config, context, device)


def _train(run: TrainingRun, config: SFTConfig, context: Distributed, device: torch.device) -> Path:
    from data.batching import collate
    from data.loaders import DataError

    policy = run.load_policy()
    try:
        data = prepare_data(config, policy.tokenizer, run.log)
    except (DataError, ValueError) as error:
        raise SystemExit(f"--data {config.data or DEFAULT_DATA[config.stage]}: {error}") from None
    optimizer = run.prepare(policy)
    run.checkpoint_extra["data_stats"] = data.stats
    # One optimizer step = grad_accum micro-batches on each of world_size ranks, consecutive in the
    # (rank-independent) list of the epoch's micro-batches.
    per_step = config.grad_accum * context.world_size
    micro_per_epoch = len(micro_batches_for_epoch(data.train, config, 0))
    steps_per_epoch = max(1, micro_per_epoch // per_step)
    max_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    run.log(f"stage {config.stage}: {data.stats['train_samples']} samples in {len(data.train)} sequences, "
            f"{steps_per_epoch} steps/epoch, {max_steps} steps, {sum(p.numel() for p in run.params):,} trainable parameters"
            + (f" per rank ({context.world_size} ranks, FSDP2)" if config.fsdp else "")
            + (f", {context.world_size} processes x {config.grad_accum} micro-batches per step" if context.enabled else ""))

    policy.model.train()
    pad_id = pad_token_id(policy.tokenizer)
    epoch_cache: dict[int, list[list[int]]] = {}

    def micro_batch(index: int) -> list[int]:
        epoch, position = divmod(index, steps_per_epoch * per_step)
        if epoch not in epoch_cache:
            epoch_cache.clear()
            epoch_cache[epoch] = micro_batches_for_epoch(data.train, config, epoch)
        return epoch_cache[epoch][position % len(epoch_cache[epoch])]

    window: dict[str, float] = {"steps": 0, "loss": 0.0, "tokens": 0, "padding": 0, "cells": 0, "time": 0.0}
    for step in run.steps(max_steps):
        first = step * per_step + context.rank * config.grad_accum  # this rank's micro-batches
        batches = [collate([data.train[i] for i in micro_batch(first + k)], pad_id) for k in range(config.grad_accum)]
        optimizer.zero_grad(set_to_none=True)
        step_tokens = int(distributed.all_reduce_numbers(context, {"tokens": step_loss_tokens(batches)})["tokens"])
        local_loss, _ = accumulate_gradients(policy.model, batches, device, normaliser=step_tokens)
        sums = distributed.all_reduce_numbers(context, {
            "loss": local_loss, "padding": sum(int((batch.attention_mask == 0).sum()) for batch in batches),
            "cells": sum(batch.attention_mask.numel() for batch in batches)})
        step_loss = sums["loss"]  # NaN on every rank when it is NaN on one
        grad_norm = optimizer_step(context, run.params, optimizer, max_grad_norm=config.max_grad_norm,
                                   loss_finite=math.isfinite(step_loss))
        ok = math.isfinite(step_loss) and math.isfinite(grad_norm)
        run.count_bad_step(step, ok, f"non-finite loss {step_loss} or gradient norm {grad_norm}",
                           {"loss": step_loss, "grad_norm": grad_norm}, skipped_key="skipped_steps")
        if ok:  # the loss mean is over the steps taken
            window["steps"], window["loss"], window["tokens"] = (window["steps"] + 1, window["loss"] + step_loss,
                                                                 window["tokens"] + step_tokens)
        window["padding"] += sums["padding"]
        window["cells"] += sums["cells"]
        window["time"] += time.perf_counter() - run.step_began
        run.progress.set_postfix(loss=f"{step_loss:.3f}")
        done = step + 1
        evaluate_now = config.eval_every and done % config.eval_every == 0
        if done % config.log_every == 0 or evaluate_now or done == max_steps:
            metrics = {
                "loss": window["loss"] / max(window["steps"], 1), "grad_norm": grad_norm,
                "lr": optimizer.param_groups[0]["lr"], "epoch": done / steps_per_epoch,
                "padding_share": window["padding"] / max(window["cells"], 1),
                "tokens_per_s": window["tokens"] / max(window["time"], 1e-9), "skipped_steps": run.skipped_steps,
            }
            if evaluate_now or done == max_steps:
                metrics["val_loss"] = validation_loss(policy, data.validation, config, device, context)
            run.logger.log(done, metrics)
            window = dict.fromkeys(window, 0)
    return run.finish()
