"""What every trainer (GRPO and SFT) does around its loop: open or resume the run directory, and
load the stage's starting policy."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

import torch

from grpo import distributed
from grpo.checkpoint import check_resume_compatible, latest_checkpoint, remove_stale_temporaries, write_json
from grpo.config import config_to_dict
from grpo.distributed import SINGLE, Distributed
from grpo.models import ModelNotFound, needs_conversion, resolve_model
from grpo.policy import LoraSettings, Policy, load_policy, model_dtype_device
from grpo.runtime import RunLogger, resolve_dtype, seed_everything, trim_logs


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
