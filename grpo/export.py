"""Export a checkpoint as one plain Hugging Face model folder, loadable without this project.

    python -m grpo.export runs/default/grpo/checkpoints/step-000020 --out exported/grpo
    python -m grpo.export runs/default/grpo --out exported/grpo            # a run directory: its newest checkpoint
    python -m grpo.export runs/default/grpo --out exported/grpo-bf16 --dtype bfloat16

A checkpoint of this project is not a model on its own: its `lineage.json` names a base model and
the LoRA adapters of every stage before it (grpo/policy.py, "Stage chaining").  This loads the
chain with `load_policy(init=CHECKPOINT, lora=None)`, which merges every adapter into the base in
order (W <- W + (alpha/r) B A), and writes the merged model into --out:

    config.json, generation_config.json, model*.safetensors   the merged weights
    tokenizer files (with the chat template, if any)          the checkpoint's tokenizer
    export.json                                               the source checkpoint and its lineage

so that `AutoModelForCausalLM.from_pretrained(OUT)` and `AutoTokenizer.from_pretrained(OUT)` load
it alone (as can other tools that read Hugging Face model folders).  The merge runs in float32 on
the CPU and only its result is cast to --dtype: merging in bf16 would round the weights again after
every adapter.  `auto` keeps the dtype the base model's config records (bf16 for most released
models).  The folder is written beside --out and renamed into place, so an interrupted export
never looks complete.

The checkpoint comes first (or as --checkpoint); `--help` lists every flag with its default.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from grpo.config import field, parse_config
from grpo.runtime import DTYPES

EXPORT_RECORD = "export.json"
SAVED_DTYPES = ("float32", "bfloat16")  # names in grpo.runtime.DTYPES


@dataclasses.dataclass
class ExportConfig:
    """Every knob of an export (one flag each; see the module docstring for examples)."""

    checkpoint: str = field("", "the checkpoint directory (with lineage.json) or a run directory (its newest "
                                "checkpoint); may also be given first, without the flag")
    out: str = field("", "the folder to write; it must not exist yet or be empty")
    dtype: str = field("auto", "dtype of the saved weights (auto: the dtype recorded by the base model's config)",
                       choices=("auto", *SAVED_DTYPES))
    trust_remote_code: bool = field(False, "allow a base model that needs its own code (its files are saved too)")

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ValueError("give the checkpoint to export: python -m grpo.export CHECKPOINT --out DIR")
        if not self.out:
            raise ValueError("--out is required: the folder to write the merged model into")


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory that `path` names: itself when it holds lineage.json, the newest
    complete checkpoint when it is a run directory (with checkpoints/).  SystemExit otherwise."""
    from grpo.checkpoint import checkpoints_dir, latest_checkpoint
    from grpo.policy import LINEAGE_FILE

    location = Path(path).expanduser()
    if (location / LINEAGE_FILE).is_file():
        return location
    if checkpoints_dir(location).is_dir():
        newest = latest_checkpoint(location)
        if newest is None:
            raise SystemExit(f"{path}: a run directory without a complete checkpoint in {checkpoints_dir(location)}")
        return newest
    if not location.exists():
        raise SystemExit(f"{path}: no such checkpoint directory")
    hint = " (a plain model folder with config.json loads as it is; it needs no export)" if (
        location / "config.json").is_file() else ""
    raise SystemExit(f"{path} is not a checkpoint: it holds no {LINEAGE_FILE} and no checkpoints/ folder{hint}")


def recorded_dtype(name_or_path: str, *, trust_remote_code: bool = False) -> torch.dtype:
    """The dtype a model's config records for its weights (float32 when it records none)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def save_plain_model(model: torch.nn.Module, tokenizer: Any, out: Path, *, record: dict[str, Any]) -> None:
    """Write `model` and `tokenizer` into the new folder `out` as one ordinary model folder, with
    `record` as export.json.  Written beside `out`, then renamed into place."""
    # A base converted from GGUF (or another quantized format) may still carry the quantization
    # settings it was read with; the merged weights are plain tensors, and a loader that found
    # them would try to quantize or dequantize the model again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".tmp-{out.name}-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)  # the chat template travels with the tokenizer files
        (staging / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked by the caller); a directory is not replaced by rename everywhere
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, dtype: str = "auto",
                      trust_remote_code: bool = False) -> Path:
    """Merge the lineage of `checkpoint` (a checkpoint or a run directory) and save it as a plain
    model folder `out`; returns `out`.  SystemExit with the reason when either path is unusable."""
    from grpo.policy import LINEAGE_FILE, load_policy, read_lineage

    if dtype != "auto" and dtype not in SAVED_DTYPES:
        raise SystemExit(f"--dtype {dtype!r}: expected auto or one of {list(SAVED_DTYPES)}")
    source = resolve_checkpoint(checkpoint).resolve()
    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SystemExit(f"--out {out}: exists and is not an empty folder; choose a new one (an export never mixes "
                         f"its files with others)")
    if out == source or source in out.parents:
        raise SystemExit(f"--out {out}: must lie outside the checkpoint {source}")
    try:
        lineage = read_lineage(source)
        target = DTYPES[dtype] if dtype != "auto" else recorded_dtype(lineage["base"],
                                                                      trust_remote_code=trust_remote_code)
        policy = load_policy(init=source, lora=None, dtype=torch.float32, device="cpu",
                             trust_remote_code=trust_remote_code)
    except OSError as error:  # a missing parent (FileNotFoundError) or an unreadable base model
        raise SystemExit(f"cannot export {source}: {error}") from error
    model = policy.model.to(target)
    model.requires_grad_(False)  # load_policy(lora=None) made every weight trainable; saving needs none
    record = {
        "checkpoint": str(source),
        "lineage": lineage,  # absolute paths: what was merged, in order
        "lineage_as_saved": json.loads((source / LINEAGE_FILE).read_text()),
        "dtype": str(target).removeprefix("torch."),
    }
    save_plain_model(model, policy.tokenizer, out, record=record)
    return out


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--checkpoint", *argv]  # `CHECKPOINT --out DIR`: the checkpoint may come first, without its flag
    config = parse_config(ExportConfig, argv, description=__doc__)
    out = export_checkpoint(config.checkpoint, config.out, dtype=config.dtype,
                            trust_remote_code=config.trust_remote_code)
    print(f"exported {config.checkpoint} -> {out}")
    return out


if __name__ == "__main__":
    main()
