"""The GRPO trainer: one optimizer step, read top to bottom.

    prompts  -> rollout (G completions each, shared-prefix KV cache)     grpo.rollout.generate
             -> rewards (one batched call)                             rewards.score_batch
             -> advantages [B, G]                                      grpo.advantages.group_advantages
             -> (beta > 0) reference log-probs under disable_adapter()  grpo.policy.reference_mode
             -> mu passes over micro-batches, loss normaliser fixed    grpo.loss.policy_loss
                once for the whole step (accumulation == one big batch)
             -> clip grad norm -> AdamW step -> learning-rate schedule

With mu = 1 (the default, as in the paper) the sampled completions are used once and
old_logprobs = logprobs.detach(), so the ratio is 1 and the objective reduces to the
policy-gradient term.  With mu > 1 the old log-probs are recomputed once, before the first pass.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from grpo.advantages import advantage_stats, group_advantages
from grpo.checkpoint import latest_checkpoint, resume_training, save_training_checkpoint, write_json
from grpo.config import check_ranges, config_to_dict, field
from grpo.loss import policy_loss
from grpo.policy import LoraSettings, Policy, load_policy, reference_mode, token_logprobs
from grpo.rollout import SamplingConfig, generate
from grpo.runtime import RunLogger, StopRequest, lr_at, resolve_device, resolve_dtype, seed_everything

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
    model: str | None = field(None, "start from a plain model: hub name, local path, or 'tiny'")
    device: str = field("auto", "cpu, cuda, cuda:N or auto")
    dtype: str = field("auto", "float32, bfloat16, float16 or auto (bf16 on GPU, fp32 on CPU)")
    trust_remote_code: bool = field(False, "allow model repositories to run their own code")
    deterministic: bool = field(False, "torch deterministic algorithms (for exact resume checks)")
    threads: int = field(0, "CPU threads for torch (0: torch's default)")
    # --- data ----------------------------------------------------------------------------------
    data: str = field("synthetic:train", "training data: a path or synthetic:<split>")
    data_format: str | None = field(None, "force the data format: apigen, tau or almita")
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
    max_new_tokens: int = field(128, "completion token limit")
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
    train_micro_batch: int = field(16, "sequences per forward/backward micro-batch")
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
            "group_size", "prompts_per_step", "rollout_batch_prompts", "max_new_tokens", "mu", "train_micro_batch",
            "log_every", "max_bad_steps", "max_prompt_length", "lora_r"),
            non_negative=("max_steps", "save_every", "keep_checkpoints", "sample_every", "threads", "top_k",
                          "warmup_steps", "beta", "lr", "weight_decay", "max_grad_norm", "lora_dropout"),
            positive=("temperature",))
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.group_size < 2:
            # One completion per group has no spread to compare: every advantage would be 0.
            raise ValueError(f"--group-size must be >= 2 (GRPO compares the completions of a prompt), "
                             f"got {self.group_size}")


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Prompt:
    """One training prompt: the sample (for its target) and its rendered prompt ids."""

    sample: Any  # data.types.Sample
    prompt_ids: list[int]


def build_prompts(config: GRPOConfig, tokenizer: Any, log: Callable[[str], None] = print) -> list[Prompt]:
    """Render every training sample as a generation prompt; count (and log) what had to be cut."""
    from data import load_dataset, make_samples
    from data.render import ContextTooLong, render_prompt

    conversations, stats = load_dataset(config.data, seed=config.seed, format=config.data_format)
    samples = make_samples(conversations, strip_reasoning=True)
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
        f"data {config.data}: {len(conversations)} conversations, {len(samples)} samples, "
        f"{len(prompts)} prompts ({shortened} shortened, {too_long} skipped as too long even after dropping history)"
    )
    if not prompts:
        raise SystemExit(f"--data {config.data}: no usable prompts (all {len(samples)} exceed --max-prompt-length?)")
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


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def rollout_and_score(
    policy: Policy,
    prompts: list[Prompt],
    config: GRPOConfig,
    *,
    generator: torch.Generator,
    reward_fn: Callable[[list[str], list[dict]], list[Any]],
    device: torch.device,
) -> tuple[list[StepBatch], torch.Tensor, dict[str, Any], list[dict[str, Any]]]:
    """Generate G completions per prompt, score them, compute advantages.

    Returns the training batches, the rewards [B, G], metrics and per-completion records.
    """
    from data.render import stop_sequences, stop_token_ids

    tokenizer = policy.tokenizer
    group_size = config.group_size
    sampling = SamplingConfig(
        group_size=group_size, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
        top_p=config.top_p, top_k=config.top_k,
    )
    stops = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    chunks, records, component_rows = [], [], []
    rollout_tokens, rollout_time = 0, 0.0
    for start in range(0, len(prompts), config.rollout_batch_prompts):
        chunk = prompts[start:start + config.rollout_batch_prompts]
        began = time.perf_counter()
        rollout, _ = generate(
            policy.model, [p.prompt_ids for p in chunk], sampling, pad_token_id=pad_id,
            stop_token_ids=stops, stop_sequences=stop_sequences(tokenizer), generator=generator,
        )
        rollout_time += time.perf_counter() - began
        rollout_tokens += int(rollout.completion_mask.sum())
        chunks.append((chunk, rollout))

    # Score everything in one batched call (one similarity-model call per step).
    texts, targets, owners = [], [], []
    for chunk_index, (chunk, rollout) in enumerate(chunks):
        flat_ids = rollout.completion_ids.flatten(0, 1)
        flat_mask = rollout.completion_mask.flatten(0, 1)
        for row, text in enumerate(decode_completions(tokenizer, flat_ids, flat_mask, set(stops))):
            texts.append(text)
            targets.append(chunk[row // group_size].sample.target)
            owners.append((chunk_index, row))
    results = reward_fn(texts, targets)
    rewards = torch.tensor([r.total for r in results], dtype=torch.float32).view(len(prompts), group_size)
    advantages = group_advantages(rewards, scale=config.scale_rewards)

    batches = []
    for chunk_index, (chunk, rollout) in enumerate(chunks):
        b, g, t = rollout.completion_ids.shape
        prompt_ids = rollout.prompt_ids.repeat_interleave(g, dim=0)
        prompt_mask = rollout.prompt_mask.repeat_interleave(g, dim=0)
        completion_ids = rollout.completion_ids.flatten(0, 1)
        completion_mask = rollout.completion_mask.flatten(0, 1)
        first = sum(len(c) for c, _ in chunks[:chunk_index])  # prompts before this chunk
        batches.append(StepBatch(
            input_ids=torch.cat([prompt_ids, completion_ids], dim=1).to(device),
            attention_mask=torch.cat([prompt_mask, completion_mask.long()], dim=1).to(device),
            completion_mask=completion_mask.float().to(device),
            advantages=advantages[first:first + b].flatten().to(device),
            prompt_length=prompt_ids.shape[1],
        ))
        finished = rollout.finished.flatten()
        lengths = completion_mask.sum(-1)
        for row in range(b * g):
            records.append({"length": int(lengths[row]), "finished": bool(finished[row])})

    for record, text, target, result in zip(records, texts, targets, results):
        record.update(text=text, target=target, reward=result.total, components=dict(result.components), success=result.success)
        component_rows.append(result.components)

    lengths = torch.tensor([r["length"] for r in records], dtype=torch.float32)
    metrics: dict[str, Any] = {
        **{f"reward/{k.removeprefix('reward_')}": v for k, v in advantage_stats(rewards).items()},
        "success_rate": sum(r["success"] for r in records) / len(records),
        "completion/length_mean": float(lengths.mean()),
        "completion/length_max": float(lengths.max()),
        "completion/truncated_share": sum(not r["finished"] for r in records) / len(records),
        "rollout/tokens": rollout_tokens,
        "rollout/tokens_per_s": rollout_tokens / max(rollout_time, 1e-9),
        "time/rollout_s": rollout_time,
    }
    for key in ("accuracy", "format", "length"):
        values = [row[key] for row in component_rows if key in row]
        if values:
            metrics[f"reward/{key}"] = sum(values) / len(values)
    return batches, rewards, metrics, records


def _micro_batches(batch: StepBatch, size: int) -> list[StepBatch]:
    out = []
    for start in range(0, batch.input_ids.shape[0], size):
        piece = slice(start, start + size)
        out.append(StepBatch(
            input_ids=batch.input_ids[piece], attention_mask=batch.attention_mask[piece],
            completion_mask=batch.completion_mask[piece], advantages=batch.advantages[piece],
            prompt_length=batch.prompt_length,
        ))
    return out


def _sequence_logprobs(policy: Policy, batch: StepBatch, temperature: float, *, entropy: bool = False) -> Any:
    return token_logprobs(
        policy.model, batch.input_ids, batch.attention_mask, completion_start=batch.prompt_length,
        temperature=temperature, position_ids=_position_ids(batch.attention_mask), return_entropy=entropy,
    )


def policy_update(
    policy: Policy,
    batches: list[StepBatch],
    config: GRPOConfig,
    optimizer: torch.optim.Optimizer,
    *,
    reference_policy: Policy | None = None,
) -> dict[str, Any]:
    """mu passes of clipped-objective gradient steps over the step's completions.

    The loss normalisers (sequence count, token count) are those of the whole step, so the summed
    micro-batch gradients equal the gradient of one large batch.  Returns metrics; the optimizer
    step and gradient clipping happen here too (one optimizer step per pass).
    """
    micro = [m for batch in batches for m in _micro_batches(batch, config.train_micro_batch)]
    num_sequences = sum(int(m.input_ids.shape[0]) for m in micro)
    num_items = int(sum(m.completion_mask.sum() for m in micro))

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
    for _ in range(config.mu):
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
                break
            loss.backward()
            loss_total += float(loss.detach())
            tokens = float(m.completion_mask.sum())
            train_tokens += int(m.attention_mask.sum())
            weight = tokens / max(num_items, 1)
            for key, value in loss_metrics.items():  # token-weighted means, except counts
                if isinstance(value, (int, float)):
                    sums[key] = sums.get(key, 0.0) + float(value) * (1.0 if key == "num_tokens" else weight)
            sums["entropy"] = sums.get("entropy", 0.0) + float((entropy * m.completion_mask).sum()) / max(num_items, 1)
        if nonfinite:
            optimizer.zero_grad(set_to_none=True)
            break
        if config.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
        else:
            grad_norm = float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        if not math.isfinite(grad_norm):
            nonfinite = True
            optimizer.zero_grad(set_to_none=True)
            break
        optimizer.step()
    elapsed = time.perf_counter() - began
    metrics = {f"loss/{k}": v / config.mu for k, v in sums.items() if k != "entropy"}
    metrics.update({
        "loss": loss_total, "grad_norm": grad_norm, "entropy": sums.get("entropy", 0.0) / config.mu,
        "train/tokens_per_s": train_tokens / max(elapsed, 1e-9), "time/train_s": elapsed, "nonfinite_loss": nonfinite,
    })
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


def load_start_policy(config: GRPOConfig, device: torch.device, dtype: torch.dtype, log: Callable[[str], None]) -> Policy:
    lora = None
    if config.lora:
        lora = LoraSettings(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                            target_modules=tuple(t.strip() for t in config.lora_targets.split(",") if t.strip()))
    if config.init and config.model:
        raise SystemExit("give either --init (an SFT checkpoint) or --model (a plain model), not both")
    if config.init:
        return load_policy(init=config.init, lora=lora, dtype=dtype, device=str(device), trust_remote_code=config.trust_remote_code)
    model = config.model or "tiny"
    if model == "tiny":
        from grpo.tiny import prepare_tiny_base

        base = prepare_tiny_base(Path(config.out) / "base-tiny", seed=config.seed, vocab_size=config.tiny_vocab_size)
        log(f"tiny base model at {base} (random weights, tokenizer trained on synthetic:train)")
        model = str(base)
    return load_policy(base=model, lora=lora, dtype=dtype, device=str(device), trust_remote_code=config.trust_remote_code)


def train(config: GRPOConfig, *, reward_fn: Callable[[list[str], list[dict]], list[Any]] | None = None) -> Path:
    """Run GRPO as configured; returns the run directory.  Resumable with config.resume."""
    from tqdm.auto import tqdm

    run_dir = Path(config.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    if config.deterministic:
        torch.use_deterministic_algorithms(True)
    seed_everything(config.seed)
    logger = RunLogger(run_dir)
    log = lambda message: (print(message), logger.text(message))  # noqa: E731
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)

    resume_from = latest_checkpoint(run_dir) if config.resume else None
    if config.resume and resume_from is None:
        log(f"--resume: no checkpoint in {run_dir}/checkpoints yet, starting from step 0")
    write_json(run_dir / "config.json", config_to_dict(config))

    policy = load_start_policy(config, device, dtype, log)
    reference_policy = None
    if config.beta > 0 and not policy.use_lora:
        import copy

        reference_policy = dataclasses.replace(policy, model=copy.deepcopy(policy.model).eval().requires_grad_(False))
    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    reward_fn = reward_fn or make_reward_fn(config)
    prompts = build_prompts(config, policy.tokenizer, log)

    start_step, skipped_steps = 0, 0
    if resume_from is not None:
        state = resume_training(resume_from, policy=policy, optimizer=optimizer)
        generator.set_state(state["generator"])
        start_step = int(state["step"])
        skipped_steps = int(state.get("skipped_steps", 0))
        log(f"resumed from {resume_from} at step {start_step}")

    def save(step: int) -> Path:
        path = save_training_checkpoint(run_dir, step, policy=policy, optimizer=optimizer, config=config,
                                        extra={"generator": generator.get_state(), "skipped_steps": skipped_steps},
                                        keep_last=config.keep_checkpoints)
        log(f"checkpoint {path}")
        return path

    bad_steps = 0  # consecutive steps with a non-finite loss
    progress = tqdm(total=config.max_steps, initial=start_step, desc="grpo", dynamic_ncols=True)
    batches_iter = prompt_batches(len(prompts), config.prompts_per_step, seed=config.seed, start_step=start_step)
    step = start_step
    try:
        with StopRequest() as stop:
            for step, indices in batches_iter:
                if step >= config.max_steps or stop:
                    break
                began = time.perf_counter()
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, lr=config.lr, warmup_steps=config.warmup_steps,
                                        total_steps=config.max_steps, schedule=config.lr_schedule)
                step_prompts = [prompts[i] for i in indices]
                batches, rewards, metrics, records = rollout_and_score(
                    policy, step_prompts, config, generator=generator, reward_fn=reward_fn, device=device,
                )
                if not torch.isfinite(rewards).any():
                    save(step)
                    raise SystemExit(f"step {step + 1}: every reward is NaN or infinite (the reward function could "
                                     "not score any completion); stopping instead of training on garbage")
                metrics.update(policy_update(policy, batches, config, optimizer, reference_policy=reference_policy))
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
        save(final_step)
    finally:
        progress.close()
        logger.close()
    if stop:
        raise SystemExit(f"stopped by {stop.signal_name} at step {final_step}; resume with --resume --out {run_dir}")
    return run_dir
