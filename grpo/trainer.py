"""The GRPO trainer: one optimizer step, read top to bottom.

    prompts  -> rollout (G completions each, shared-prefix KV cache)     grpo.rollout.generate
             -> rewards (one batched call)                             rewards.score_batch
             -> advantages [B, G]                                      grpo.advantages.group_advantages
             -> (beta > 0) reference log-probs under disable_adapter()  grpo.policy.reference_mode
             -> mu passes over micro-batches, loss normaliser fixed    grpo.loss.policy_loss
                once for the whole step (accumulation == one big batch)
             -> clip grad norm -> AdamW step -> learning-rate schedule

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
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from grpo.advantages import advantage_stats, group_advantages, group_reward_std, most_varied_groups
from grpo import distributed
from grpo.checkpoint import (
    check_resume_compatible,
    latest_checkpoint,
    load_optimizer_state,
    remove_stale_temporaries,
    restore_policy_weights,
    save_training_checkpoint,
    write_json,
)
from grpo.config import check_ranges, config_to_dict, field
from grpo.distributed import SINGLE, Distributed
from grpo.loss import policy_loss
from grpo.models import ModelNotFound, needs_conversion, resolve_model
from grpo.policy import (LoraSettings, Policy, grouped_token_logprobs, load_policy, model_dtype_device, reference_mode,
                         token_logprobs)
from grpo.rollout import SamplingConfig, generate
from grpo.runtime import RunLogger, StopRequest, derived_seed, lr_at, resolve_dtype, seed_everything, trim_logs

LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclasses.dataclass
class GRPOConfig:
    """Every knob of a GRPO run.  Paper defaults where the paper gives one."""

    # --- run -----------------------------------------------------------------------------------
    out: str = field("runs/grpo", "run directory: config, logs, checkpoints, samples")
    seed: int = field(0, "seed for data order, sampling and initialisation")
    max_steps: int = field(100, "optimizer steps")
    save_every: int = field(25, "checkpoint every N steps (and always at the end)")
    keep_checkpoints: int = field(3, "keep only the newest N checkpoints (0 keeps all)")
    log_every: int = field(1, "log metrics every N steps")
    sample_every: int = field(10, "write a few decoded completions every N steps (0: never)")
    resume: bool = field(False, "continue from the newest checkpoint in --out")
    init: str | None = field(None, "start from this SFT checkpoint directory (its lineage is merged)")
    model: str | None = field(None, "start from a plain model: hub name, folder, .gguf file, 'smollm2' or 'tiny'")
    device: str = field("auto", "cpu, cuda, cuda:N or auto")
    dtype: str = field("auto", "float32, bfloat16, float16 or auto (bf16 on GPUs and fast-bf16 CPUs: runtime.auto_dtype)")
    trust_remote_code: bool = field(False, "allow model repositories to run their own code")
    deterministic: bool = field(False, "torch deterministic algorithms (for exact resume checks)")
    threads: int = field(0, "CPU threads for torch (0: torch's default)")
    fsdp: bool = field(False, "torchrun only: shard parameters, gradients and optimizer state with FSDP2 "
                              "(full fine-tuning: needs --no-lora)")
    # --- data ----------------------------------------------------------------------------------
    data: str = field("synthetic:train", "training data: a path or synthetic:<split>")
    data_format: str | None = field(None, "force the data format (default: detected)", choices=("apigen", "tau", "almita"))
    format_prompt: bool = field(False, "end every system prompt with the output-format instructions "
                                       "(data.format.FORMAT_INSTRUCTIONS)")
    max_prompt_length: int = field(1024, "prompt token limit; older turns are dropped beyond it")
    # --- policy / LoRA -------------------------------------------------------------------------
    lora: bool = field(True, "train LoRA adapters (--no-lora: full fine-tuning)")
    lora_r: int = field(16, "LoRA rank")
    lora_alpha: int = field(32, "LoRA alpha")
    lora_dropout: float = field(0.0, "LoRA dropout")
    lora_targets: str = field(LORA_TARGETS, "comma-separated module names that get LoRA")
    tiny_vocab_size: int = field(4096, "--model tiny: tokenizer vocabulary size")
    # --- rollout -------------------------------------------------------------------------------
    group_size: int = field(8, "completions per prompt (G)")
    prompts_per_step: int = field(16, "prompts per optimizer step (paper: 1 x grad-accum 16)")
    rollout_batch_prompts: int = field(4, "prompts generated together in one rollout call")
    oversample: int = field(1, "sample groups for oversample x prompts-per-step prompts and train on the "
                               "prompts-per-step groups whose rewards vary most (1: every group, as in the paper)")
    max_new_tokens: int = field(128, "completion token limit")
    min_new_tokens: int = field(0, "stop tokens are banned until a completion has this many tokens")
    temperature: float = field(1.0, "sampling temperature (log-probs use the same)")
    top_p: float = field(1.0, "nucleus sampling threshold")
    top_k: int = field(0, "top-k sampling (0: off)")
    # --- objective -----------------------------------------------------------------------------
    loss_type: str = field("grpo", "loss aggregation", choices=("grpo", "bnpo", "dr_grpo", "dapo"))
    scale_rewards: str = field("group", "advantage std scaling", choices=("group", "batch", "none"))
    beta: float = field(0.0, "KL coefficient (0: no reference pass)")
    epsilon_low: float = field(0.2, "lower clip range")
    epsilon_high: float | None = field(None, "upper clip range (default: epsilon_low)")
    mu: int = field(1, "passes over each step's completions")
    train_micro_batch: int = field(16, "sequences per forward/backward micro-batch (whole groups with "
                                       "--share-prefix: rounded down to a multiple of G, at least one group)")
    share_prefix: bool = field(True, "compute each prompt once per group in the training forward (its G "
                                     "completions attend to its keys and values: same result, fewer tokens)")
    # --- optimizer -----------------------------------------------------------------------------
    lr: float = field(1e-5, "peak learning rate")
    lr_schedule: str = field("constant", "after warmup", choices=("constant", "linear", "cosine"))
    warmup_steps: int = field(0, "linear warmup steps")
    weight_decay: float = field(0.0, "AdamW weight decay")
    max_grad_norm: float = field(1.0, "gradient clipping (0: off)")
    max_bad_steps: int = field(3, "stop after this many consecutive steps with a NaN/inf loss")
    # --- rewards -------------------------------------------------------------------------------
    similarity: str = field("default", "answer similarity: default (all-MiniLM-L6-v2), a model name/path, or lexical")
    length_reward: bool = field(True, "use the thinking-length reward")
    w_accuracy: float = field(1.0, "weight of the conditional accuracy reward")
    w_format: float = field(1.0, "weight of the format reward")
    w_length: float = field(1.0, "weight of the thinking-length reward")

    def __post_init__(self) -> None:
        check_ranges(self, at_least_one=(
            "group_size", "prompts_per_step", "rollout_batch_prompts", "oversample", "max_new_tokens", "mu",
            "train_micro_batch",
            "log_every", "max_bad_steps", "max_prompt_length", "lora_r"),
            non_negative=("max_steps", "save_every", "keep_checkpoints", "sample_every", "threads", "top_k",
                          "min_new_tokens", "warmup_steps", "beta", "lr", "weight_decay", "max_grad_norm",
                          "lora_dropout"),
            positive=("temperature",))
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.group_size < 2:
            # One completion per group has no spread to compare: every advantage would be 0.
            raise ValueError(f"--group-size must be >= 2 (GRPO compares the completions of a prompt), "
                             f"got {self.group_size}")
        if self.fsdp and self.oversample > 1:
            # FSDP needs the same number of forward passes on every rank; the kept groups of a rank
            # can fall into a different number of rollout chunks than another rank's.
            raise ValueError("--oversample > 1 is not supported with --fsdp (ranks could run different numbers "
                             "of micro-batches); use it without --fsdp")
        if self.fsdp and self.lora:
            raise ValueError("--fsdp shards full fine-tuning; LoRA adapters are small enough to replicate "
                             "(drop --fsdp, or add --no-lora)")


def check_world(config: GRPOConfig, context: Distributed) -> None:
    """Refuse settings that cannot be split over `context.world_size` processes."""
    if config.prompts_per_step % context.world_size:
        raise SystemExit(f"--prompts-per-step {config.prompts_per_step} must be a multiple of the number of "
                         f"processes ({context.world_size}): every rank samples whole groups for as many prompts")
    if config.fsdp and not context.enabled:
        raise SystemExit("--fsdp needs several processes: start the run with torchrun --nproc_per_node N (N >= 2)")


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Prompt:
    """One training prompt: the sample (for its target) and its rendered prompt ids."""

    sample: Any  # data.types.Sample
    prompt_ids: list[int]


def build_prompts(config: GRPOConfig, tokenizer: Any, log: Callable[[str], None] = print) -> list[Prompt]:
    """Render every training sample as a generation prompt; count (and log) what had to be cut.

    Unreadable data (a missing file, a malformed row) stops the run with the loader's message,
    which names the file, the row and the field.
    """
    from data import load_dataset, make_samples
    from data.loaders import DataError
    from data.render import ContextTooLong, render_prompt

    try:
        conversations, stats = load_dataset(config.data, seed=config.seed, format=config.data_format)
    except (DataError, ValueError) as error:
        raise SystemExit(f"--data {config.data}: {error}") from None
    samples = make_samples(conversations, strip_reasoning=True, format_instructions=config.format_prompt)
    without_action = sum(not any(turn.is_action for turn in conversation.turns) for conversation in conversations)
    prompts, too_long, shortened = [], 0, 0
    for sample in samples:
        try:
            rendered = render_prompt(sample, tokenizer, max_length=config.max_prompt_length)
        except ContextTooLong as error:
            too_long += 1
            if too_long <= 3:
                log(f"skipped prompt: {error}")
            continue
        shortened += rendered.dropped_turns > 0
        prompts.append(Prompt(sample=sample, prompt_ids=rendered.input_ids))
    log(
        f"data {config.data}: {len(conversations)} conversations ({without_action} without an assistant action), "
        f"{len(samples)} samples, {len(prompts)} prompts ({shortened} shortened, {too_long} skipped as too long "
        "even after dropping history)"
    )
    if not prompts:
        reason = ("no conversation has an assistant action" if not samples
                  else f"all {len(samples)} exceed --max-prompt-length {config.max_prompt_length}")
        raise SystemExit(f"--data {config.data}: no usable prompts ({reason})")
    return prompts


def prompt_batches(num_prompts: int, per_step: int, *, seed: int, start_step: int) -> Any:
    """Yield (step, prompt indices) forever: seeded reshuffles per epoch, resumable from any step."""
    from data.batching import batch_indices

    per_epoch = max(1, num_prompts // per_step)
    step = start_step
    while True:
        epoch, position = divmod(step, per_epoch)
        batches = batch_indices(num_prompts, per_step, seed=seed, epoch=epoch, shuffle=True, drop_last=True)
        if not batches:  # fewer prompts than one step needs: reuse them with replacement order
            batches = [[i % num_prompts for i in range(per_step)]]
        yield step, batches[position % len(batches)]
        step += 1


def trained_samples(run_dir: str | Path) -> list[Any]:
    """The samples a GRPO run has trained on so far, in training order (step 1's prompts first).

    Rebuilt from the run's config.json and the tokenizer of its newest checkpoint, with the same
    prompt list and `prompt_batches` order as the run, up to the checkpoint's step; with
    --oversample, every sampled prompt (kept or not).  Lets `eval.run --data trained:RUN_DIR`
    ask whether RL changed the decisions on its own training prompts (optimisation) or only
    failed to carry them to the test split (generalisation).
    """
    import json

    from grpo.checkpoint import load_trainer_state
    from grpo.config import config_from_dict
    from grpo.policy import load_tokenizer

    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{run_dir} is not a GRPO run directory (no config.json)")
    config = config_from_dict(GRPOConfig, json.loads(config_path.read_text()))
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise ValueError(f"{run_dir} has no checkpoint yet: nothing has been trained")
    steps = int(load_trainer_state(checkpoint)["step"])
    prompts = build_prompts(config, load_tokenizer(checkpoint), log=lambda message: None)
    order: list[int] = []
    for step, indices in prompt_batches(len(prompts), config.prompts_per_step * config.oversample,
                                        seed=config.seed, start_step=0):
        if step >= steps:
            break
        order.extend(indices)
    return [prompts[index].sample for index in order]


# ---------------------------------------------------------------------------------------------
# One optimizer step
# ---------------------------------------------------------------------------------------------


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, length - len(row):] = 1
    return ids, mask


def decode_completions(tokenizer: Any, completion_ids: torch.Tensor, completion_mask: torch.Tensor, stop_ids: set[int]) -> list[str]:
    """Text of each completion [N, T] without its final stop token (the parser sees what the model wrote)."""
    texts = []
    for ids, mask in zip(completion_ids.tolist(), completion_mask.tolist()):
        kept = [token for token, keep in zip(ids, mask) if keep]
        if kept and kept[-1] in stop_ids:
            kept = kept[:-1]
        texts.append(tokenizer.decode(kept, skip_special_tokens=False))
    return texts


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


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


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
    """Generate G completions per prompt, score them, compute advantages.

    `prompts` are this rank's share of the step, at positions first_position.. of the step's
    global prompt list.  The chunk starting at position p samples with a generator seeded from
    (config.seed, step, p).  Rewards are all-gathered, so the advantages use the whole step's
    groups (exact per group; the batch std of scale_rewards="batch" is global), and the metrics
    describe the whole step.

    Returns this rank's training batches, the rewards of the whole step [B, G], metrics and
    this rank's per-completion records.
    """
    from data.render import stop_sequences, stop_token_ids

    tokenizer = policy.tokenizer
    group_size = config.group_size
    sampling = SamplingConfig(
        group_size=group_size, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
        top_p=config.top_p, top_k=config.top_k, min_new_tokens=config.min_new_tokens,
    )
    stops = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    chunks, records, component_rows = [], [], []
    rollout_tokens, rollout_time = 0, 0.0
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
            rollout_tokens += int(rollout.completion_mask.sum())
            chunks.append((chunk, rollout))

    # Score everything in one batched call (one similarity-model call per step and rank).
    texts, targets = [], []
    for chunk, rollout in chunks:
        flat_ids = rollout.completion_ids.flatten(0, 1)
        flat_mask = rollout.completion_mask.flatten(0, 1)
        for row, text in enumerate(decode_completions(tokenizer, flat_ids, flat_mask, set(stops))):
            texts.append(text)
            targets.append(chunk[row // group_size].sample.target)
    results = reward_fn(texts, targets)
    local_rewards = torch.tensor([r.total for r in results], dtype=torch.float32).view(len(prompts), group_size)
    candidates = distributed.all_gather_rows(context, local_rewards)  # [B, G], every rank's groups in order
    # --oversample: each rank keeps its share of the step's groups, those whose rewards vary most.
    kept_count = len(prompts) // config.oversample
    kept = (most_varied_groups(local_rewards, kept_count) if config.oversample > 1
            else torch.arange(len(prompts)))
    rewards = distributed.all_gather_rows(context, local_rewards[kept]) if config.oversample > 1 else candidates
    advantages = group_advantages(rewards, scale=config.scale_rewards)
    first_kept = first_position // config.oversample  # ranks keep equal shares, in rank order
    local_advantages = dict(zip(kept.tolist(), advantages[first_kept:first_kept + kept_count]))  # group -> [G]

    batches = []
    first = 0  # this rank's prompts before the current chunk
    for chunk, rollout in chunks:
        b, g, t = rollout.completion_ids.shape
        completion_mask = rollout.completion_mask.flatten(0, 1)
        finished = rollout.finished.flatten()
        lengths = completion_mask.sum(-1)
        for row in range(b * g):
            records.append({"length": int(lengths[row]), "finished": bool(finished[row])})
        groups = [i for i in range(b) if first + i in local_advantages]
        if groups:
            rows = torch.tensor([i * g + j for i in groups for j in range(g)])
            prompt_ids = rollout.prompt_ids[groups].repeat_interleave(g, dim=0)
            prompt_mask = rollout.prompt_mask[groups].repeat_interleave(g, dim=0)
            completion_ids = rollout.completion_ids.flatten(0, 1)[rows]
            batches.append(StepBatch(
                input_ids=torch.cat([prompt_ids, completion_ids], dim=1).to(device),
                attention_mask=torch.cat([prompt_mask, completion_mask[rows].long()], dim=1).to(device),
                completion_mask=completion_mask[rows].float().to(device),
                advantages=torch.cat([local_advantages[first + i] for i in groups]).to(device),
                prompt_length=prompt_ids.shape[1], group_size=g,
                sampling_logprobs=(rollout.sampling_logprobs.flatten(0, 1)[rows].to(device)
                                   if sampling_is_the_policy(config) else None),
            ))
        first += b

    for record, text, target, result in zip(records, texts, targets, results):
        record.update(text=text, target=target, reward=result.total, components=dict(result.components), success=result.success)
        component_rows.append(result.components)

    # Sums (and maxima) over every rank's completions; the same keys on every rank.
    local_sums: dict[str, float] = {
        "completions": len(records), "success": sum(r["success"] for r in records),
        "length": sum(r["length"] for r in records), "truncated": sum(not r["finished"] for r in records),
        "tokens": rollout_tokens,
    }
    for key in ("accuracy", "format", "length"):
        values = [row[key] for row in component_rows if key in row]
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
        "rollout/tokens": int(sums["tokens"]),
        "rollout/tokens_per_s": sums["tokens"] / max(maxima["time"], 1e-9),
        "time/rollout_s": maxima["time"],
    }
    for key in ("accuracy", "format", "length"):
        if sums[f"component_count/{key}"]:
            metrics[f"reward/{key}"] = sums[f"component/{key}"] / sums[f"component_count/{key}"]
    if config.oversample > 1:
        metrics["select/group_std_all"] = _mean_group_std(candidates)
        metrics["select/group_std_kept"] = _mean_group_std(rewards)
    return batches, candidates, metrics, records


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
            temperature=temperature, position_ids=_position_ids(batch.attention_mask), return_entropy=entropy,
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


def plain_model(config: Any, context: Distributed, log: Callable[[str], None]) -> str:
    """What --model names, as `from_pretrained` loads it: `tiny` is built once and `smollm2` or a
    `.gguf` file converted once into the run directory (by rank 0), so the run carries its own
    base and its lineage stays valid; a hub name or a folder is used as it is."""
    model = config.model or "tiny"
    if model == "tiny":
        from grpo.tiny import prepare_tiny_base

        directory = Path(config.out) / "base-tiny"
        if context.is_main:  # other ranks must not write into the run directory
            prepare_tiny_base(directory, seed=config.seed, vocab_size=config.tiny_vocab_size)
        distributed.barrier(context)
        base = prepare_tiny_base(directory, seed=config.seed, vocab_size=config.tiny_vocab_size)  # reused as is
        log(f"tiny base model at {base} (random weights, tokenizer trained on synthetic:train)")
        return str(base)
    if needs_conversion(model):
        directory = Path(config.out) / "base-model"
        if context.is_main:
            resolve_model(model, folder=directory)
        distributed.barrier(context)
        converted = resolve_model(model, folder=directory)  # reused as is
        log(f"{model} converted to a plain model folder at {converted}")
        return converted
    return model


def load_start_policy(config: Any, device: torch.device, dtype: torch.dtype | str, log: Callable[[str], None],
                      context: Distributed = SINGLE) -> Policy:
    """A stage's starting point (GRPO and SFT): --init (a checkpoint, lineage merged) or --model,
    with a fresh LoRA adapter unless --no-lora.  `--model tiny` is built once, by rank 0.
    `config` needs the fields init, model, out, seed, tiny_vocab_size, trust_remote_code, lora*."""
    lora = None
    if config.lora:
        lora = LoraSettings(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                            target_modules=tuple(t.strip() for t in config.lora_targets.split(",") if t.strip()))
    if config.init and config.model:
        raise SystemExit("give either --init (a checkpoint) or --model (a plain model), not both")
    source = f"--init {config.init}" if config.init else f"--model {config.model or 'tiny'}"
    try:
        start = {"init": config.init} if config.init else {"base": plain_model(config, context, log)}
        policy = load_policy(**start, lora=lora, dtype=dtype, device=str(device),
                             trust_remote_code=config.trust_remote_code)
        log(f"weights in {model_dtype_device(policy.model)[0]} (--dtype {config.dtype})")
        return policy
    except ModelNotFound as error:  # its message names the flag and the fix
        raise SystemExit(str(error)) from None
    except (OSError, ValueError) as error:  # a missing or unreadable model or checkpoint
        raise SystemExit(f"{source}: {error}") from None


@dataclasses.dataclass
class RunStart:
    """A trainer's run directory opened for a (possibly resumed) run: see `open_run`."""

    run_dir: Path
    resume_from: Path | None  # the newest checkpoint when --resume found one
    state: dict[str, Any] | None  # its trainer state (step, optimizer, RNG, ...)
    start_step: int
    logger: RunLogger
    log: Callable[[str], None]  # prints and writes log.txt on rank 0; silent elsewhere
    dtype: torch.dtype | str  # "auto": decided per model when it loads (grpo.runtime.auto_dtype)


def open_run(config: Any, context: Distributed, device: torch.device) -> RunStart:
    """What GRPO and SFT do before loading a model: create the run directory (rank 0), clear what a
    killed checkpoint writer left, set threads / determinism / seeds, find the checkpoint to resume
    from and check its settings against `config`, cut the logs back to it, open the logger and
    write config.json.  `config` needs out, resume, threads, deterministic, seed and dtype."""
    from grpo.checkpoint import load_trainer_state

    run_dir = Path(config.out)
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if config.resume:
            remove_stale_temporaries(run_dir)  # what a killed checkpoint writer left behind
    distributed.barrier(context)
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    if config.deterministic:
        # cuBLAS raises at the first GEMM under deterministic algorithms unless this is set before
        # it initialises (harmless on CPU).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    seed_everything(config.seed)  # the same seed on every rank: identical initialisation
    resume_from = latest_checkpoint(run_dir) if config.resume else None
    state = load_trainer_state(resume_from) if resume_from is not None else None
    start_step = int(state["step"]) if state is not None else 0
    if state is not None and context.is_main:
        trim_logs(run_dir, start_step)  # drop what a killed run logged after its last checkpoint
    logger = RunLogger(run_dir, enabled=context.is_main)
    log = (lambda message: (print(message), logger.text(message))) if context.is_main else (lambda message: None)  # noqa: E731
    if config.resume and resume_from is None:
        log(f"--resume: no checkpoint in {run_dir}/checkpoints yet, starting from step 0")
    if context.is_main:
        write_json(run_dir / "config.json", config_to_dict(config))
    if resume_from is not None:
        check_resume_compatible(resume_from, config)  # the settings, before loading a model for nothing
    return RunStart(run_dir, resume_from, state, start_step, logger, log, resolve_dtype(config.dtype, device))


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
                batches, rewards, metrics, records = rollout_and_score(
                    policy, [prompts[i] for i in indices[first:last]], config, step=step, reward_fn=reward_fn,
                    device=device, first_position=first, context=context,
                )
                if not torch.isfinite(rewards).any():  # the rewards of every rank: all ranks agree
                    save(step)
                    raise SystemExit(f"step {step + 1}: every reward is NaN or infinite (the reward function could "
                                     "not score any completion); stopping instead of training on garbage")
                metrics.update(policy_update(policy, batches, config, optimizer, reference_policy=reference_policy,
                                             context=context))
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
