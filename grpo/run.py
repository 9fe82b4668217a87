"""What every trainer (GRPO and SFT) does around its step: the run.

`TrainingRun` is the part of a training run that does not depend on what a step computes:

    with TrainingRun(config, context, device, name="grpo") as run:   # open or resume the run directory
        policy = run.load_policy()                                    # --init checkpoint or --model, LoRA
        optimizer = run.prepare(policy)                               # resumed weights, FSDP or replicas, AdamW
        for step in run.steps(max_steps):                             # stop signals, seeds, learning rate,
            ...one step, ending in optimizer_step(...)...             #   progress bar, checkpoint cadence
            run.count_bad_step(step, ok, ...)                         # the non-finite-step guard
            run.logger.log(step + 1, metrics)
        return run.finish()                                           # last checkpoint; stop message

`optimizer_step` is the end of every step: gradients summed over ranks, clipped, one optimizer
step, skipped (on every rank alike) when the loss or the gradient norm is not finite.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from grpo import distributed
from grpo.checkpoint import (check_resume_compatible, latest_checkpoint, load_optimizer_state, remove_stale_temporaries,
                             restore_policy_weights, save_training_checkpoint, write_json)
from grpo.config import config_to_dict
from grpo.distributed import SINGLE, Distributed
from grpo.models import ModelNotFound, needs_conversion, resolve_model
from grpo.policy import LoraSettings, Policy, load_policy, model_dtype_device
from grpo.runtime import RunLogger, StopRequest, derived_seed, lr_at, resolve_dtype, seed_everything, trim_logs


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
    if resume_from is not None:  # the settings, before touching the run's files or loading a model for nothing
        check_resume_compatible(resume_from, config)
    if state is not None and context.is_main:
        trim_logs(run_dir, start_step)  # drop what a killed run logged after its last checkpoint
    logger = RunLogger(run_dir, enabled=context.is_main)
    log = (lambda message: (print(message), logger.text(message))) if context.is_main else (lambda message: None)  # noqa: E731
    if config.resume and resume_from is None:
        log(f"--resume: no checkpoint in {run_dir}/checkpoints yet, starting from step 0")
    if context.is_main:
        write_json(run_dir / "config.json", config_to_dict(config))
    return RunStart(run_dir, resume_from, state, start_step, logger, log, resolve_dtype(config.dtype, device))


def optimizer_step(context: Distributed, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, *,
                   max_grad_norm: float, loss_finite: bool) -> float:
    """End a step: sum the gradients over ranks, clip them to `max_grad_norm` (0: no clipping) and
    step the optimizer.  Returns the gradient norm before clipping.

    A non-finite loss (`loss_finite` must be the same on every rank) or gradient norm (the same on
    every rank once the gradients are summed) skips the update: the gradients are cleared and the
    norm returned is NaN or infinite, so the caller can count the skipped step.
    """
    if not loss_finite:
        optimizer.zero_grad(set_to_none=True)
        return math.nan
    distributed.sum_gradients(context, params)
    # max_norm = inf only measures (the scale factor is exactly 1).
    grad_norm = distributed.as_float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm or math.inf))
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        return grad_norm
    optimizer.step()
    return grad_norm


class TrainingRun:
    """One training run of SFT or GRPO around its step (see the module docstring for the shape).

    `config` needs the fields `open_run` and `load_start_policy` read, plus fsdp, lr, lr_schedule,
    warmup_steps, weight_decay, save_every, keep_checkpoints and max_bad_steps.  Attributes:
    run_dir, resume_from, state (the resumed trainer state or None), start_step, logger, log,
    dtype, policy and optimizer (after `prepare`), step (the first step not yet taken),
    skipped_steps (non-finite steps so far, resumed), step_began (perf_counter at the current
    step's start), progress (the tqdm bar, during `steps`), and checkpoint_extra (what the trainer
    adds to every checkpoint's trainer state).
    """

    def __init__(self, config: Any, context: Distributed, device: torch.device, *, name: str) -> None:
        start = open_run(config, context, device)
        self.config, self.context, self.device, self.name = config, context, device, name
        self.run_dir, self.resume_from, self.state, self.start_step = (
            start.run_dir, start.resume_from, start.state, start.start_step)
        self.logger, self.log, self.dtype = start.logger, start.log, start.dtype
        self.step = self.start_step
        self.skipped_steps = int(self.state.get("skipped_steps", 0)) if self.state is not None else 0
        self.bad_steps = 0  # consecutive skipped steps
        self.checkpoint_extra: dict[str, Any] = {}
        self.policy: Policy | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.params: list[torch.nn.Parameter] = []
        self.progress: Any = None
        self.step_began = time.perf_counter()
        self.stopping = False
        self._stop = StopRequest()

    def __enter__(self) -> "TrainingRun":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.__exit__()  # the signal handlers `steps` installed, if any
        if self.progress is not None:
            self.progress.close()
        self.logger.close()

    def load_policy(self) -> Policy:
        """The stage's starting policy: --init (lineage merged) or --model, with a fresh LoRA."""
        return load_start_policy(self.config, self.device, self.dtype, self.log, self.context)

    def prepare(self, policy: Policy, *frozen: Policy) -> torch.optim.Optimizer:
        """Make `policy` the trained one: a resumed run's weights restored (before sharding: every
        rank reads the whole file), FSDP shards (of `frozen` copies too) or identical replicas, and
        AdamW over the trainable parameters, with its resumed state."""
        config, context = self.config, self.context
        if self.resume_from is not None:
            check_resume_compatible(self.resume_from, config, policy)
            restore_policy_weights(policy, self.resume_from)
        if config.fsdp:
            for model in (policy, *frozen):
                distributed.shard_model(context, model.model, self.device)
        self.params = [p for p in policy.model.parameters() if p.requires_grad]
        if not config.fsdp:
            distributed.broadcast_parameters(context, self.params)  # replicas start identical
        self.policy, self.optimizer = policy, torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        if self.state is not None:
            load_optimizer_state(self.optimizer, self.state, model=policy.model)
            self.log(f"resumed from {self.resume_from} at step {self.start_step}")
        return self.optimizer

    def steps(self, max_steps: int) -> Iterator[int]:
        """Yield the steps start_step .. max_steps - 1 to take.

        Before each: agree with every rank on a stop signal (SIGINT/SIGTERM finish the step, then
        stop), seed torch from (seed, step, rank) (dropout), set the learning rate.  After each:
        the progress bar, and a checkpoint every save_every steps (the last one is `finish`'s).
        """
        from tqdm.auto import tqdm

        config, context = self.config, self.context
        self.progress = tqdm(total=max_steps, initial=self.start_step, desc=self.name, dynamic_ncols=True,
                             disable=not context.is_main)
        with self._stop:
            for step in range(self.start_step, max_steps):
                # A signal may reach the ranks at different moments: stop together, after the same step.
                self.stopping = distributed.any_rank(context, bool(self._stop))
                if self.stopping:
                    return
                self.step_began = time.perf_counter()
                torch.manual_seed(derived_seed(config.seed, step, context.rank))  # dropout, if any
                for group in self.optimizer.param_groups:
                    group["lr"] = lr_at(step, lr=config.lr, warmup_steps=config.warmup_steps, total_steps=max_steps,
                                        schedule=config.lr_schedule)
                yield step
                self.step = step + 1
                self.progress.update(1)
                if config.save_every and self.step % config.save_every == 0 and self.step < max_steps:
                    self.save(self.step)

    def count_bad_step(self, step: int, ok: bool, problem: str, metrics: dict[str, Any], skipped_key: str) -> None:
        """The non-finite-step guard: a skipped step (`ok` False, `problem` says why) is counted and
        logged; --max-bad-steps of them in a row stop the run (their metrics logged first)."""
        if ok:
            self.bad_steps = 0
            return
        self.bad_steps += 1
        self.skipped_steps += 1
        self.log(f"step {step + 1}: {problem}, step skipped ({self.bad_steps} in a row)")
        if self.bad_steps >= self.config.max_bad_steps:
            self.logger.log(step + 1, {**metrics, skipped_key: self.skipped_steps})
            raise SystemExit(f"stopping: {self.bad_steps} consecutive steps with a non-finite loss or gradient "
                             f"(--max-bad-steps {self.config.max_bad_steps}); lower --lr, or see {self.run_dir}/log.txt")

    def save(self, step: int) -> Path:
        """A checkpoint of the policy, the optimizer and the trainer state after `step` steps."""
        path = save_training_checkpoint(self.run_dir, step, policy=self.policy, optimizer=self.optimizer,
                                        config=self.config,
                                        extra={**self.checkpoint_extra, "skipped_steps": self.skipped_steps,
                                               "world_size": self.context.world_size},
                                        keep_last=self.config.keep_checkpoints, context=self.context)
        self.log(f"checkpoint {path}")
        return path

    def finish(self) -> Path:
        """The last checkpoint (a resume that took no step already has it); exit non-zero when a
        signal stopped the run.  Returns the run directory."""
        if self.step != self.start_step or self.resume_from is None:
            self.save(self.step)
        if self.stopping:
            raise SystemExit(f"stopped by {self._stop.signal_name or 'a signal to another rank'} at step {self.step}; "
                             f"resume with --resume --out {self.run_dir}")
        return self.run_dir
