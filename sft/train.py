"""Supervised fine-tuning entry point: the paper's stages 1 and 2.

    python -m sft.train --stage base --model tiny --no-lora --lr 1e-3 --out runs/base        # tiny model from random weights
    python -m sft.train --stage coldstart --init runs/base/checkpoints/step-000300 --out runs/coldstart
    python -m sft.train --stage base --model Qwen/Qwen3-1.7B --data apigen-mt-5k.json --out runs/qwen-base
    python -m sft.train --config sft.toml --resume

    torchrun --nproc_per_node 8 -m sft.train --stage base --model Qwen/Qwen3-1.7B --data apigen-mt-5k.json \
             --grad-accum 1 --out runs/qwen-base8                  # 8 GPUs: 2 x 1 x 8 = 16 samples per step
    torchrun --nproc_per_node 8 -m sft.train --stage base --model Qwen/Qwen3-8B --no-lora --fsdp --out runs/full

`base` trains on every assistant turn with an empty think block; `coldstart` only on the turns
that carry written reasoning (the synthetic cold-start split has at most 100) and continues from
the base checkpoint given with --init.  LoRA is the default (paper: q,k,v,o,gate,up,down, micro-batch
2 x accumulation 4, 3 epochs); a tiny model trained from random weights needs --no-lora.
Under torchrun a step is micro-batch x grad-accum x processes samples (N processes with
--grad-accum A train exactly like one with A x N); rank 0 writes the run directory.
"""

from __future__ import annotations

import os
import sys

from grpo.config import parse_config
from sft.trainer import SFTConfig, train


def main(argv: list[str] | None = None) -> None:
    config = parse_config(SFTConfig, sys.argv[1:] if argv is None else argv, description=__doc__)
    run_dir = train(config)
    if os.environ.get("RANK", "0") == "0":  # torchrun: one line, from rank 0
        print(f"done: {run_dir}")


if __name__ == "__main__":
    main()
