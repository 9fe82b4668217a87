"""GRPO training entry point.

    python -m grpo.train                                   # the whole pipeline on the built-in default:
                                                           # tiny model, synthetic data, CPU (see grpo/pipeline.py)
    python -m grpo.train --preset smoke                    # the same pipeline, under 2 minutes
    python -m grpo.train --init runs/coldstart/checkpoints/step-000090 --out runs/grpo   # GRPO from an SFT checkpoint
    python -m grpo.train --model Qwen/Qwen3-1.7B --data apigen-mt-5k.json --out runs/qwen  # from a plain model
    python -m grpo.train --model tiny --max-steps 3 --out runs/try                        # GRPO alone on a fresh tiny model
    python -m grpo.train --config run.toml --resume        # flags from a TOML file; continue the newest checkpoint
    torchrun --nproc_per_node 2 -m grpo.train --init ... # data parallel (see README)

With --init or --model this runs GRPO alone (grpo/trainer.py); without either it runs the
pipeline (grpo/pipeline.py).  `--help` lists the GRPO flags; `--preset default --help` the
pipeline's.
"""

from __future__ import annotations

import sys

from grpo.config import parse_config
from grpo.trainer import GRPOConfig, train


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    flags = {arg.split("=")[0] for arg in argv}
    grpo_only = bool(flags & {"--init", "--model"}) or (bool(flags & {"--help", "-h"}) and "--preset" not in flags)
    if not grpo_only:
        from grpo.pipeline import main as pipeline_main

        pipeline_main(argv)
        return
    config = parse_config(GRPOConfig, argv, description=__doc__)
    run_dir = train(config)
    print(f"done: {run_dir}")


if __name__ == "__main__":
    main()
