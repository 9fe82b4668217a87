"""Atomic, resumable checkpoints shared by `grpo.train` and `sft.train`.

A checkpoint is one directory `RUN/checkpoints/step-000123/` holding

    adapter/ or model/   the weights (safetensors; written by grpo.policy.save_policy)
    tokenizer/           the tokenizer
    lineage.json         the base model and the parent adapters (grpo.policy)
    trainer_state.pt     optimizer state, step, rank 0's RNG state (a record: the trainers
                         re-derive their streams), trainer counters (tensors and plain
                         Python values only, so it loads with torch.load(weights_only=True))
    config.json          the resolved config of the run that wrote it

It is written into a temporary sibling directory, flushed, and renamed into place; only then is
`RUN/checkpoints/latest` (a one-line text file) replaced atomically.  A crash at any moment
therefore leaves either the previous checkpoint or the new one, never half of one (a killed
writer leaves a `.tmp-*` directory, which nothing reads and the next resume removes).

Distributed runs: every rank calls `save_training_checkpoint` (FSDP gathers the full weights and
optimizer state onto rank 0 with collectives), rank 0 alone writes, and all ranks leave
together.  Every rank resumes from the same directory: the weights before FSDP shards the model
(`restore_policy_weights`), then the optimizer state (`load_optimizer_state` shards a whole one).
Random streams are not saved per rank: the trainers re-derive them from (seed, step, rank) and
(seed, step, prompt position) (grpo.runtime.derived_seed).

Resuming checks that the checkpoint belongs to this run (`check_resume_compatible`): the same
starting model, the same adapter shape.
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


def _fsync_directory(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            _fsync_directory(path)
    _fsync_directory(directory)


def remove_stale_temporaries(run_dir: str | Path) -> list[str]:
    """Delete what killed writers left in RUN/checkpoints (`.tmp-*`, `.latest-*`, `.replaced-*`).

    Call it only when no other process writes checkpoints of this run (rank 0, at start-up).
    Returns the names removed.
    """
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    removed = []
    for path in sorted(root.iterdir()):
        if path.name.startswith(".replaced-"):
            # Killed between moving an old copy of a step aside and publishing the new one: the
            # old copy is complete, put it back.
            original = root / path.name[len(".replaced-"):].rsplit("-", 1)[0]
            if not original.exists() and (path / STATE_FILE).is_file():
                os.replace(path, original)
                continue
        if path.name.startswith((".tmp-", ".latest-", ".replaced-")):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


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
    if final.exists():  # re-saving the same step: move the old one aside first (a rename is atomic)
        replaced = root / f".replaced-{final.name}-{os.getpid()}"
        os.replace(final, replaced)
        os.replace(tmp, final)
        shutil.rmtree(replaced, ignore_errors=True)
    else:
        os.replace(tmp, final)
    latest_tmp = root / f".latest-{os.getpid()}"
    latest_tmp.write_text(final.name + "\n")
    with latest_tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(latest_tmp, root / "latest")
    _fsync_directory(root)  # the renames themselves survive a power cut too
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


def _save_full_model(policy: Any, directory: Path, state_dict: dict[str, Any]) -> None:
    """save_policy for a model whose parameters are sharded: the gathered `state_dict` is written
    as `model/` (safetensors), with the tokenizer and a lineage that names it as the base."""
    from grpo.hf_compat import causal_lm_of
    from grpo.policy import LINEAGE_FILE, MODEL_DIR, TOKENIZER_DIR

    causal_lm_of(policy.model).save_pretrained(directory / MODEL_DIR, state_dict=state_dict, safe_serialization=True)
    policy.tokenizer.save_pretrained(directory / TOKENIZER_DIR)
    (directory / LINEAGE_FILE).write_text(json.dumps({"base": MODEL_DIR, "adapters": []}, indent=2) + "\n")


def save_training_checkpoint(run_dir: str | Path, step: int, *, policy: Any, optimizer: Any, config: Any,
                             extra: dict[str, Any] | None = None, keep_last: int = 0,
                             context: Any = None) -> Path:
    """Weights, tokenizer, lineage, optimizer, rank 0's RNG state, step and config, published atomically.

    Distributed (`context` a grpo.distributed.Distributed): every rank must call this; FSDP's
    full weights and optimizer state are gathered onto rank 0, which alone writes; the ranks
    leave together.  Returns the checkpoint's path on every rank.
    """
    from grpo import distributed
    from grpo.config import config_to_dict
    from grpo.policy import save_policy

    context = context or distributed.SINGLE
    sharded = bool(distributed.fsdp_modules(policy.model))
    model_state = distributed.full_state_dict(policy.model) if sharded else None
    optimizer_state = (distributed.full_optimizer_state(policy.model, optimizer) if sharded
                       else optimizer.state_dict())

    def write(directory: Path) -> None:
        if sharded:
            _save_full_model(policy, directory, model_state)
        else:
            save_policy(policy, directory)
        save_trainer_state(directory, {"step": step, "optimizer": optimizer_state, "optimizer_by_name": sharded,
                                       "rng": rng_state(), **(extra or {})})
        write_json(directory / "config.json", config_to_dict(config))

    path = checkpoints_dir(run_dir) / f"step-{step:06d}"
    if context.is_main:
        path = write_checkpoint(run_dir, step, write, keep_last=keep_last)
    distributed.barrier(context)
    return path


def load_optimizer_state(optimizer: Any, state: dict[str, Any], *, model: Any) -> None:
    """Load the optimizer state of a trainer `state` into `optimizer` (whose parameters belong to
    `model`).

    A state saved under FSDP is keyed by parameter names and whole; it is sharded into this
    rank's optimizer.  A replicated run's state (keyed by position) loads as is.  Saved and
    current runs must agree on FSDP: the checkpoint's weights are the same either way, but the
    optimizer state layouts differ.
    """
    from grpo import distributed

    sharded = bool(distributed.fsdp_modules(model))
    by_name = bool(state.get("optimizer_by_name", False))
    if sharded != by_name:
        raise SystemExit(f"--resume: the optimizer state was saved {'with' if by_name else 'without'} --fsdp; "
                         f"resume {'with' if by_name else 'without'} --fsdp (the weights would load, the optimizer not)")
    if sharded:
        distributed.load_full_optimizer_state(model, optimizer, state["optimizer"])
    else:
        optimizer.load_state_dict(state["optimizer"])


# Config fields that fix what a checkpoint's weights *are*: resuming with other values would load
# tensors into a different model (or silently continue a different experiment: `env` switches
# between per-turn samples and whole conversations, another data stream and another step).
IDENTITY_FIELDS: tuple[str, ...] = ("model", "init", "lora", "lora_r", "lora_alpha", "lora_targets", "stage",
                                    "tiny_vocab_size", "env")
# What a config.json written before an identity field existed meant by leaving it out.
IDENTITY_DEFAULTS: dict[str, Any] = {"env": "none"}
# Model config entries compared between a checkpoint's weights and the model being trained.
ARCHITECTURE_FIELDS: tuple[str, ...] = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers",
                                        "num_attention_heads", "num_key_value_heads", "intermediate_size")


def _same_source(left: Any, right: Any) -> bool:
    if left == right:
        return True
    if isinstance(left, str) and isinstance(right, str) and Path(left).exists() and Path(right).exists():
        return Path(left).resolve() == Path(right).resolve()
    return False


def check_resume_compatible(checkpoint: str | Path, config: Any, policy: Any = None) -> None:
    """Refuse (SystemExit naming both sides) to resume `policy` from a checkpoint of another model.

    Three checks, cheapest first: the run settings that define the weights (IDENTITY_FIELDS of
    the checkpoint's config.json vs this run's); then, given the loaded `policy`, the starting
    point (the checkpoint's lineage without its own adapter vs this policy's lineage) and the
    architecture (the checkpoint's model config, when it holds a full model, vs this model's).
    The trainers call it twice: before loading the model (settings only) and after.
    """
    from grpo.config import config_to_dict
    from grpo.hf_compat import causal_lm_of
    from grpo.policy import ADAPTER_DIR, MODEL_DIR, read_lineage

    checkpoint = Path(checkpoint)
    saved_path = checkpoint / "config.json"
    saved = {**IDENTITY_DEFAULTS, **json.loads(saved_path.read_text())} if saved_path.is_file() else {}
    current = config_to_dict(config)
    differing = [key for key in IDENTITY_FIELDS
                 if key in saved and key in current and not _same_source(saved[key], current[key])]
    if differing:
        then = ", ".join(f"{key}={saved[key]!r}" for key in differing)
        now = ", ".join(f"{key}={current[key]!r}" for key in differing)
        raise SystemExit(f"--resume: {checkpoint} was trained with {then}, but this run has {now}; "
                         "resume with the same settings or start a new run in another --out")
    if policy is None:
        return

    lineage = read_lineage(checkpoint)
    if policy.use_lora and lineage["adapters"] and Path(lineage["adapters"][-1]).name == ADAPTER_DIR:
        start = {"base": lineage["base"], "adapters": lineage["adapters"][:-1]}
        mine = policy.lineage
        same = _same_source(start["base"], mine["base"]) and len(start["adapters"]) == len(mine["adapters"]) and all(
            _same_source(a, b) for a, b in zip(start["adapters"], mine["adapters"]))
        if not same:
            raise SystemExit(f"--resume: {checkpoint} continues base model {start['base']!r} (adapters "
                             f"{start['adapters']}), but this run starts from {mine['base']!r} (adapters "
                             f"{mine['adapters']}); refusing to load its adapter into another model")

    model_config_path = checkpoint / MODEL_DIR / "config.json"
    if model_config_path.is_file():
        theirs = json.loads(model_config_path.read_text())
        ours = causal_lm_of(policy.model).config.to_dict()
        mismatched = [key for key in ARCHITECTURE_FIELDS if key in theirs and key in ours and theirs[key] != ours[key]]
        if mismatched:
            raise SystemExit(
                f"--resume: {checkpoint}/{MODEL_DIR} is a different model ("
                + ", ".join(f"{key}={theirs[key]!r}" for key in mismatched) + ") from "
                f"{getattr(config, 'init', None) or getattr(config, 'model', None)!r} ("
                + ", ".join(f"{key}={ours[key]!r}" for key in mismatched) + ")")
