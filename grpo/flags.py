"""GRPOConfig: every flag of a GRPO run (`python -m grpo.train --help` lists them with their defaults)."""

from __future__ import annotations

import dataclasses

from grpo.config import check_ranges, field
from grpo.policy import LORA_TARGETS


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
    lora_targets: str = field(",".join(LORA_TARGETS), "comma-separated module names that get LoRA")
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
    # --- whole conversations (grpo/episodes.py) ------------------------------------------------
    env: str = field("none", "none: train on per-turn samples of --data; synthetic: on whole conversations with the "
                             "synthetic world's training tasks (tools executed, user simulated, success rewarded)",
                     choices=("none", "synthetic"))
    max_turns: int = field(20, "--env: agent actions per episode at most")
    max_episode_tokens: int = field(2048, "--env: tokens per episode, first prompt included; an episode whose next "
                                          "turn (--max-new-tokens) might not fit ends and counts as truncated")
    episode_reward: str = field("success", "--env: success (1 or 0), or mean_turn (success + the mean per-turn "
                                           "reward of the turns that follow the gold conversation)",
                                choices=("success", "mean_turn"))
    episode_cache: bool = field(True, "--env: keep each episode's KV cache from turn to turn (off: every turn "
                                      "prefills the whole episode again; the same samples up to float rounding)")

    def __post_init__(self) -> None:
        check_ranges(self, at_least_one=(
            "group_size", "prompts_per_step", "rollout_batch_prompts", "oversample", "max_new_tokens", "mu",
            "train_micro_batch", "max_turns", "max_episode_tokens",
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
        if self.env != "none" and self.oversample > 1:
            raise ValueError("--oversample > 1 is not supported with --env synthetic yet (it selects among "
                             "per-turn groups); drop one of them")
        if self.fsdp and self.lora:
            raise ValueError("--fsdp shards full fine-tuning; LoRA adapters are small enough to replicate "
                             "(drop --fsdp, or add --no-lora)")
