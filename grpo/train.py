"""GRPO training entry point.

    python -m grpo.train                                   # the whole pipeline on the built-in default:
                                                           # tiny model, synthetic data, CPU (see grpo/pipeline.py)
    python -m grpo.train --preset smoke                    # the same pipeline, under 2 minutes
    python -m grpo.train --init runs/coldstart/checkpoints/step-000090 --out runs/grpo   # GRPO from an SFT checkpoint
    python -m grpo.train --model Qwen/Qwen3-1.7B --data apigen-mt-5k.json --out runs/qwen  # from a plain model
    python -m grpo.train --model tiny --max-steps 3 --out runs/try                        # GRPO alone on a fresh tiny model
    python -m grpo.train --config run.toml --resume        # flags from a TOML file; continue the newest checkpoint

    torchrun --nproc_per_node 8 -m grpo.train --init CKPT --prompts-per-step 16 --out runs/grpo8   # 8 GPUs, data parallel
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
             -m grpo.train --init CKPT --out /shared/runs/grpo16                                   # on each of 2 machines
    torchrun --nproc_per_node 8 -m grpo.train --model Qwen/Qwen3-8B --no-lora --fsdp --out runs/full   # FSDP2, full weights

With --init or --model (given as flags or in the --config file) this runs GRPO alone
(grpo/trainer.py); without either it runs the pipeline (grpo/pipeline.py, one process only).
Under torchrun every process takes an equal share of each step's prompts (--prompts-per-step
must be a multiple of the number of processes) and rank 0 writes the run directory; see
grpo/distributed.py and the README section "Multi-GPU and multi-node".  `--help` lists the GRPO
flags, then the pipeline's (`--preset NAME --help` lists the pipeline's alone).
"""

from __future__ import annotations

import os
import sys

from grpo.config import parse_config
from grpo.trainer import GRPOConfig, train


def _config_file_names_start(argv: list[str]) -> bool:
    """Whether `--config FILE.toml` sets `init` or `model` (then the run is GRPO alone, as with the flags)."""
    path = None
    for index, arg in enumerate(argv):
        if arg == "--config" and index + 1 < len(argv):
            path = argv[index + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
    if path is None:
        return False
    try:
        from grpo.config import tomllib

        with open(path, "rb") as handle:
            keys = {key.replace("-", "_") for key in tomllib.load(handle)}
    except (OSError, ValueError, ImportError, AttributeError):  # AttributeError: no TOML parser
        return False  # the parser that reads the file reports the problem
    return bool(keys & {"init", "model"})


def print_help() -> None:
    """The GRPO flags (a run with --init or --model), then the pipeline's (a run without them)."""
    from grpo.config import build_parser
    from grpo.pipeline import PipelineConfig

    print(build_parser(GRPOConfig, __doc__ or "").format_help())
    pipeline = build_parser(PipelineConfig, "").format_help()
    print("pipeline options (python -m grpo.train without --init or --model; grpo/pipeline.py):")
    print(pipeline[pipeline.index("options:") + len("options:"):].lstrip("\n") if "options:" in pipeline else pipeline)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    flags = {arg.split("=")[0] for arg in argv}
    grpo_only = (bool(flags & {"--init", "--model"}) or _config_file_names_start(argv)
                 or (bool(flags & {"--help", "-h"}) and "--preset" not in flags))
    if not grpo_only:
        from grpo.pipeline import main as pipeline_main

        pipeline_main(argv)
        return
    if flags & {"--help", "-h"}:
        print_help()
        raise SystemExit(0)  # as argparse's --help does
    config = parse_config(GRPOConfig, argv, description=__doc__)
    run_dir = train(config)
    if os.environ.get("RANK", "0") == "0":  # torchrun: one line, from rank 0
        print(f"done: {run_dir}")


if __name__ == "__main__":
    main()
