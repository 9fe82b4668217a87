"""Supervised fine-tuning: the paper's stage 1 (base, no reasoning) and stage 2 (cold start).

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

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from grpo import distributed
from grpo.checkpoint import check_resume_compatible, load_optimizer_state, restore_policy_weights, save_training_checkpoint
from grpo.config import check_ranges, field
from grpo.distributed import SINGLE, Distributed
from grpo.hf_compat import PLAIN_HEAD_MODEL_TYPES, causal_lm_of
from grpo.policy import LORA_TARGETS, Policy, pad_token_id
from grpo.run import load_start_policy, open_run  # the same run setup and starting point as GRPO
from grpo.runtime import StopRequest, derived_seed, lr_at

DEFAULT_DATA = {"base": "synthetic:train", "coldstart": "synthetic:coldstart"}


@dataclasses.dataclass
class SFTConfig:
    """Every knob of an SFT run.  Paper defaults: LoRA, micro-batch 2 x accumulation 4, 3 epochs."""

    stage: str = field("base", "base: all samples, empty think block; coldstart: reasoning samples only",
                       choices=("base", "coldstart"))
    out: str = field("runs/sft", "run directory")
    seed: int = field(0, "seed for data order and initialisation")
    epochs: float = field(3.0, "passes over the training samples (ignored when --max-steps > 0)")
    max_steps: int = field(0, "optimizer steps (0: from --epochs)")
    save_every: int = field(0, "checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = field(2, "keep only the newest N checkpoints (0 keeps all)")
    eval_every: int = field(50, "held-out loss every N steps (0: only at the end)")
    log_every: int = field(10, "log metrics every N steps")
    resume: bool = field(False, "continue from the newest checkpoint in --out")
    init: str | None = field(None, "start from this checkpoint (e.g. the base stage's); its lineage is merged")
    model: str | None = field(None, "start from a plain model: hub name, folder, .gguf file, 'smollm2' or 'tiny'")
    device: str = field("auto", "cpu, cuda, cuda:N or auto")
    dtype: str = field("auto", "float32, bfloat16, float16 or auto (bf16 on GPUs and fast-bf16 CPUs: runtime.auto_dtype)")
    trust_remote_code: bool = field(False, "allow model repositories to run their own code")
    threads: int = field(0, "CPU threads for torch (0: torch's default)")
    deterministic: bool = field(False, "torch deterministic algorithms (for exact resume checks)")
    fsdp: bool = field(False, "torchrun only: shard parameters, gradients and optimizer state with FSDP2 "
                              "(full fine-tuning: needs --no-lora)")
    # data
    data: str | None = field(None, "training data: a path or synthetic:<split> (default: by stage)")
    data_format: str | None = field(None, "force the data format (default: detected)", choices=("apigen", "tau", "almita"))
    format_prompt: bool = field(False, "end every system prompt with the output-format instructions "
                                       "(data.format.FORMAT_INSTRUCTIONS)")
    val_fraction: float = field(0.05, "share of conversations held out for the validation loss")
    max_length: int = field(1024, "token limit of a rendered sample; older turns are dropped beyond it")
    max_samples: int = field(0, "use at most this many training samples (0: all)")
    pack_conversations: bool = field(True, "stage base: train on all of a conversation's turns in one sequence where "
                                           "that is exactly equal to the per-turn samples (see data.render.render_conversation)")
    # optimisation
    micro_batch: int = field(2, "samples per forward/backward")
    grad_accum: int = field(4, "micro-batches per optimizer step")
    lr: float = field(2e-4, "peak learning rate")
    lr_schedule: str = field("cosine", "after warmup", choices=("constant", "linear", "cosine"))
    warmup_steps: int = field(10, "linear warmup steps")
    weight_decay: float = field(0.0, "AdamW weight decay")
    max_grad_norm: float = field(1.0, "gradient clipping (0: off)")
    max_bad_steps: int = field(3, "stop after this many consecutive steps with a NaN/inf loss (each is skipped)")
    # policy
    lora: bool = field(True, "train LoRA adapters (--no-lora: full fine-tuning, needed for a tiny model from random weights)")
    lora_r: int = field(16, "LoRA rank")
    lora_alpha: int = field(32, "LoRA alpha")
    lora_dropout: float = field(0.0, "LoRA dropout")
    lora_targets: str = field(",".join(LORA_TARGETS), "comma-separated module names that get LoRA")
    tiny_vocab_size: int = field(4096, "--model tiny: tokenizer vocabulary size")

    def __post_init__(self) -> None:
        check_ranges(self, at_least_one=("micro_batch", "grad_accum", "log_every", "max_length", "lora_r",
                                         "max_bad_steps"),
                     non_negative=("max_steps", "save_every", "keep_checkpoints", "eval_every", "threads",
                                   "max_samples", "warmup_steps", "lr", "weight_decay", "max_grad_norm",
                                   "lora_dropout"),
                     positive=("epochs",))
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.fsdp and self.lora:
            raise ValueError("--fsdp shards full fine-tuning; LoRA adapters are small enough to replicate "
                             "(drop --fsdp, or add --no-lora)")


def masked_nll_sum(model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
    """(sum of -log p over loss-mask tokens, their count) for a right-padded `data.batching.Batch`.

    Token t is predicted from position t-1, so the mask is shifted by one.
    """
    target_mask = batch.loss_mask[:, 1:].bool()
    targets = batch.input_ids[:, 1:][target_mask]  # [K]
    count = int(target_mask.sum())
    causal_lm = causal_lm_of(model)
    if getattr(causal_lm.config, "model_type", None) in PLAIN_HEAD_MODEL_TYPES:
        hidden = causal_lm.get_decoder()(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False,
        ).last_hidden_state
        logits = causal_lm.get_output_embeddings()(hidden[:, :-1][target_mask])  # [K, V]
    else:  # unknown head: let the model compute its logits
        logits = causal_lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids, use_cache=False).logits[:, :-1][target_mask]
    return F.cross_entropy(logits.float(), targets, reduction="sum"), count


def step_loss_tokens(batches: list[Any]) -> int:
    """Loss tokens of micro-`batches` (the mask shifted by one, as masked_nll_sum counts them)."""
    return sum(int(batch.loss_mask[:, 1:].sum()) for batch in batches)


def accumulate_gradients(model: torch.nn.Module, batches: list[Any], device: torch.device, *,
                         normaliser: int | None = None) -> tuple[float, int]:
    """Backward the loss of one optimizer step made of micro-`batches`; returns (loss, normaliser T).

        L = sum_m masked_nll_sum(m) / T,   T = loss tokens of *all* micro-batches of the step

    Each micro-batch's backward adds d(nll_m / T) to the gradients already in `.grad`, so any
    split of the same samples into micro-batches gives the gradient of one large batch (dividing
    each micro-batch by its own token count and averaging would weight short ones up).
    `normaliser` overrides T (a distributed step passes the loss tokens of every rank).
    """
    step_tokens = step_loss_tokens(batches) if normaliser is None else normaliser  # the step's normaliser
    step_loss = 0.0
    for batch in batches:
        nll, _ = masked_nll_sum(model, _to_device(batch, device))
        loss = nll / max(step_tokens, 1)
        loss.backward()
        step_loss += float(loss.detach())
    return step_loss, step_tokens


@dataclasses.dataclass
class SFTData:
    train: list[Any]  # data.render.Rendered
    validation: list[Any]
    stats: dict[str, Any]


def prepare_data(config: SFTConfig, tokenizer: Any, log: Callable[[str], None] = print) -> SFTData:
    """Load, split by conversation, cut into samples, render with loss masks; count every skip."""
    from data import load_dataset, make_samples, split_conversations
    from data.render import ContextTooLong, render, render_conversation

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
            for sample in group:
                try:
                    item = render(sample, tokenizer, max_length=config.max_length, with_reasoning=coldstart)
                except ContextTooLong as error:
                    too_long += 1
                    if too_long <= 3:
                        log(f"skipped sample: {error}")
                    continue
                shortened += item.dropped_turns > 0
                kept.append(item)
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


@torch.no_grad()
def validation_loss(policy: Policy, data: list[Any], config: SFTConfig, device: torch.device,
                    context: Distributed = SINGLE) -> float | None:
    """Token-mean NLL of the held-out samples; ranks take every world_size-th chunk and sum.

    Under FSDP every rank runs as many forward passes (their collectives must pair up): a rank
    out of chunks repeats its first one and discards the result.
    """
    from data.batching import collate

    if not data:
        return None
    policy.model.eval()
    sharded = bool(distributed.fsdp_modules(policy.model))
    size = config.micro_batch * 4
    chunks = [data[start:start + size] for start in range(0, len(data), size)]
    rounds = math.ceil(len(chunks) / context.world_size)
    total, count = 0.0, 0
    for round_index in range(rounds):
        index = round_index * context.world_size + context.rank
        if index >= len(chunks) and not sharded:
            break
        batch = _to_device(collate(chunks[min(index, len(chunks) - 1)], pad_token_id(policy.tokenizer)), device)
        nll, tokens = masked_nll_sum(policy.model, batch)
        if index < len(chunks):
            total, count = total + float(nll), count + tokens
    policy.model.train()
    sums = distributed.all_reduce_numbers(context, {"total": total, "count": count})
    return sums["total"] / max(sums["count"], 1)


def _to_device(batch: Any, device: torch.device) -> Any:
    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name).to(device) for f in dataclasses.fields(batch)})


def train(config: SFTConfig) -> Path:
    """Run one SFT stage; returns the run directory (its newest checkpoint is the stage's result).

    Under torchrun every process runs this; rank 0 alone writes the run directory.
    """
    with distributed.distributed_run(config.device) as (context, device):
        return _train(config, context, device)


def _train(config: SFTConfig, context: Distributed, device: torch.device) -> Path:
    from tqdm.auto import tqdm

    from data.batching import collate
    from data.loaders import DataError

    if config.fsdp and not context.enabled:
        raise SystemExit("--fsdp needs several processes: start the run with torchrun --nproc_per_node N (N >= 2)")
    run = open_run(config, context, device)
    run_dir, resume_from, state, start_step, logger, log, dtype = (
        run.run_dir, run.resume_from, run.state, run.start_step, run.logger, run.log, run.dtype)
    policy = load_start_policy(config, device, dtype, log, context)
    try:
        data = prepare_data(config, policy.tokenizer, log)
    except (DataError, ValueError) as error:
        raise SystemExit(f"--data {config.data or DEFAULT_DATA[config.stage]}: {error}") from None
    if resume_from is not None:
        check_resume_compatible(resume_from, config, policy)
        restore_policy_weights(policy, resume_from)  # before sharding: every rank reads the whole file
    if config.fsdp:
        distributed.shard_model(context, policy.model, device)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    if not config.fsdp:
        distributed.broadcast_parameters(context, params)  # replicas start identical
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    # One optimizer step = grad_accum micro-batches on each of world_size ranks, consecutive in the
    # (rank-independent) list of the epoch's micro-batches.
    per_step = config.grad_accum * context.world_size
    micro_per_epoch = len(micro_batches_for_epoch(data.train, config, 0))
    steps_per_epoch = max(1, micro_per_epoch // per_step)
    max_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))

    skipped_steps = int(state.get("skipped_steps", 0)) if state is not None else 0
    if state is not None:
        load_optimizer_state(optimizer, state, model=policy.model)
        log(f"resumed from {resume_from} at step {start_step}")
    log(f"stage {config.stage}: {data.stats['train_samples']} samples in {len(data.train)} sequences, "
        f"{steps_per_epoch} steps/epoch, {max_steps} steps, {sum(p.numel() for p in params):,} trainable parameters"
        + (f" per rank ({context.world_size} ranks, FSDP2)" if config.fsdp else "")
        + (f", {context.world_size} processes x {config.grad_accum} micro-batches per step" if context.enabled else ""))

    def save(step: int) -> Path:
        path = save_training_checkpoint(run_dir, step, policy=policy, optimizer=optimizer, config=config,
                                        extra={"data_stats": data.stats, "skipped_steps": skipped_steps,
                                               "world_size": context.world_size},
                                        keep_last=config.keep_checkpoints, context=context)
        log(f"checkpoint {path}")
        return path

    policy.model.train()
    pad_id = pad_token_id(policy.tokenizer)
    epoch_cache: dict[int, list[list[int]]] = {}

    def micro_batch(index: int) -> list[int]:
        epoch, position = divmod(index, steps_per_epoch * per_step)
        if epoch not in epoch_cache:
            epoch_cache.clear()
            epoch_cache[epoch] = micro_batches_for_epoch(data.train, config, epoch)
        return epoch_cache[epoch][position % len(epoch_cache[epoch])]

    progress = tqdm(total=max_steps, initial=start_step, desc=f"sft:{config.stage}", dynamic_ncols=True,
                    disable=not context.is_main)
    step, bad_steps, stopping = start_step, 0, False
    window: dict[str, float] = {"steps": 0, "loss": 0.0, "tokens": 0, "padding": 0, "cells": 0, "time": 0.0}
    try:
        with StopRequest() as stop:
            while step < max_steps:
                # A signal may reach the ranks at different moments: stop together, after the same step.
                stopping = distributed.any_rank(context, bool(stop))
                if stopping:
                    break
                began = time.perf_counter()
                torch.manual_seed(derived_seed(config.seed, step, context.rank))  # dropout, if any
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, lr=config.lr, warmup_steps=config.warmup_steps, total_steps=max_steps,
                                        schedule=config.lr_schedule)
                first = step * per_step + context.rank * config.grad_accum  # this rank's micro-batches
                batches = [collate([data.train[i] for i in micro_batch(first + k)], pad_id) for k in range(config.grad_accum)]
                optimizer.zero_grad(set_to_none=True)
                step_tokens = int(distributed.all_reduce_numbers(context, {"tokens": step_loss_tokens(batches)})["tokens"])
                local_loss, _ = accumulate_gradients(policy.model, batches, device, normaliser=step_tokens)
                sums = distributed.all_reduce_numbers(context, {
                    "loss": local_loss, "padding": sum(int((batch.attention_mask == 0).sum()) for batch in batches),
                    "cells": sum(batch.attention_mask.numel() for batch in batches)})
                step_loss = sums["loss"]  # NaN on every rank when it is NaN on one
                window["padding"] += sums["padding"]
                window["cells"] += sums["cells"]
                grad_norm = math.nan
                if math.isfinite(step_loss):
                    distributed.sum_gradients(context, params)
                    grad_norm = distributed.as_float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or math.inf))
                if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
                    # Skip the update (the same decision on every rank: the sums are global).
                    optimizer.zero_grad(set_to_none=True)
                    bad_steps += 1
                    skipped_steps += 1
                    log(f"step {step + 1}: non-finite loss {step_loss} or gradient norm {grad_norm}, step skipped "
                        f"({bad_steps} in a row)")
                    if bad_steps >= config.max_bad_steps:
                        logger.log(step + 1, {"loss": step_loss, "grad_norm": grad_norm, "skipped_steps": skipped_steps})
                        raise SystemExit(f"stopping: {bad_steps} consecutive steps with a non-finite loss or gradient "
                                         f"(--max-bad-steps {config.max_bad_steps}); lower --lr (checkpoints in {run_dir})")
                else:
                    bad_steps = 0
                    optimizer.step()
                    window["steps"] += 1  # the loss mean is over the steps taken
                    window["loss"] += step_loss
                    window["tokens"] += step_tokens
                step += 1
                window["time"] += time.perf_counter() - began
                progress.update(1)
                progress.set_postfix(loss=f"{step_loss:.3f}")
                evaluate_now = config.eval_every and step % config.eval_every == 0
                if step % config.log_every == 0 or evaluate_now or step == max_steps:
                    metrics = {
                        "loss": window["loss"] / max(window["steps"], 1), "grad_norm": grad_norm,
                        "lr": optimizer.param_groups[0]["lr"], "epoch": step / steps_per_epoch,
                        "padding_share": window["padding"] / max(window["cells"], 1),
                        "tokens_per_s": window["tokens"] / max(window["time"], 1e-9), "skipped_steps": skipped_steps,
                    }
                    if evaluate_now or step == max_steps:
                        metrics["val_loss"] = validation_loss(policy, data.validation, config, device, context)
                    logger.log(step, metrics)
                    window = dict.fromkeys(window, 0)
                if config.save_every and step % config.save_every == 0 and step < max_steps:
                    save(step)
        if step != start_step or resume_from is None:  # a resume that took no step has its checkpoint
            save(step)
    finally:
        progress.close()
        logger.close()
    if stopping:
        raise SystemExit(f"stopped by {stop.signal_name or 'a signal to another rank'} at step {step}; "
                         f"resume with --resume --out {run_dir}")
    return run_dir
