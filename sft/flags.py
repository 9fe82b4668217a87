"""Every flag of an SFT run (`python -m sft.train --help` lists them with their defaults)."""

from __future__ import annotations

import dataclasses

from grpo.config import check_ranges, field
from grpo.policy import LORA_TARGETS

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

