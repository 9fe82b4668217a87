"""Atomic, resumable checkpoints shared by `grpo.train` and `sft.train`.

A checkpoint is one directory `RUN/checkpoints/step-000123/` holding

    adapter/ or model/   the weights (safetensors; written by grpo.policy.save_policy)
    tokenizer/           the tokenizer
    lineage.json         the base model and the parent adapters (grpo.policy)
    trainer_state.pt     optimizer state, step, RNG states, data position (tensors and plain
                         Python values only, so it loads with torch.load(weights_only=True))
    config.json          the resolved config of the run that wrote it

It is written into a temporary sibling directory, flushed, and renamed into place; only then is
`RUN/checkpoints/latest` (a one-line text file) replaced atomically.  A crash at any moment
therefore leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

STATE_FILE = "trainer_state.pt"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_checkpoint(run_dir: str | Path, step: int, write_fn: Callable[[Path], None], *, keep_last: int = 0) -> Path:
    """Call `write_fn(tmp_dir)` and atomically publish the result as the checkpoint of `step`.

    If `write_fn` raises, the temporary directory is removed and nothing is published (`latest`
    still names the previous checkpoint).  keep_last > 0 deletes, after publishing, the
    checkpoints of earlier steps beyond the newest `keep_last` (this one included); the checkpoint
    just written is never deleted, even when a stale run left checkpoints of later steps.
    """
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write_fn(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # re-saving the same step (e.g. the final save right after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = root / f".latest-{os.getpid()}"
    latest_tmp.write_text(final.name + "\n")
    with latest_tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(latest_tmp, root / "latest")
    if keep_last > 0:
        # Only earlier steps: sorting by name alone would delete the checkpoint just written when a
        # fresh run (no --resume) saves step 2 into a directory that still holds step 40.
        earlier = [path for path in list_checkpoints(run_dir) if path.name < final.name]
        for old in earlier[: max(0, len(earlier) - (keep_last - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).is_file())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None.  Leftover temporary directories are ignored."""
    root = checkpoints_dir(run_dir)
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / STATE_FILE).is_file():
            return candidate
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_trainer_state(directory: str | Path, state: dict[str, Any]) -> None:
    torch.save(state, Path(directory) / STATE_FILE)


def load_trainer_state(directory: str | Path) -> dict[str, Any]:
    """Load with weights_only=True: a checkpoint can never execute code."""
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def write_json(path: str | Path, value: Any) -> None:
    Path(path).write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


def restore_policy_weights(policy: Any, directory: str | Path) -> None:
    """Load the trained weights of a checkpoint into a policy built from the same starting point.

    LoRA: the adapter tensors of `directory/adapter` replace the fresh adapter's.  Full
    fine-tuning: the model tensors of `directory/model` replace the model's.  Safetensors only.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    if policy.use_lora:
        from peft import set_peft_model_state_dict

        tensors = load_file(str(directory / "adapter" / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(policy.model, tensors)
        missing_lora = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
        if missing_lora:
            raise RuntimeError(f"{directory}: adapter is missing {len(missing_lora)} LoRA tensors, e.g. {missing_lora[0]}")
    else:
        from safetensors.torch import load_model

        files = sorted((directory / "model").glob("*.safetensors"))
        if len(files) != 1:
            raise RuntimeError(f"{directory}/model: expected one safetensors file, found {len(files)}")
        missing, unexpected = load_model(policy.model, str(files[0]), strict=False)
        real_missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied embeddings are not stored twice
        if real_missing or unexpected:
            raise RuntimeError(f"{directory}: weights do not match the model (missing {real_missing[:3]}, unexpected {unexpected[:3]})")


def save_training_checkpoint(run_dir: str | Path, step: int, *, policy: Any, optimizer: Any, config: Any,
                             extra: dict[str, Any] | None = None, keep_last: int = 0) -> Path:
    """Weights, tokenizer, lineage, optimizer, RNG states, step and config, published atomically."""
    from grpo.config import config_to_dict
    from grpo.policy import save_policy

    def write(directory: Path) -> None:
        save_policy(policy, directory)
        save_trainer_state(directory, {"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state(), **(extra or {})})
        write_json(directory / "config.json", config_to_dict(config))

    return write_checkpoint(run_dir, step, write, keep_last=keep_last)


def resume_training(checkpoint: str | Path, *, policy: Any, optimizer: Any) -> dict[str, Any]:
    """Restore weights, optimizer and RNG states from a checkpoint; returns its trainer state."""
    state = load_trainer_state(checkpoint)
    restore_policy_weights(policy, checkpoint)
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    return state
