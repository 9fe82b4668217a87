"""One GRPO optimizer step here and in TRL 1.16's GRPOTrainer, on the same work, side by side.

    pip install -e ".[bench]"               # trl==1.16.0; the package itself never imports trl
    python benchmarks/vs_trl.py             # 2 warm-up + 10 measured steps each (5-10 minutes, idle box)
    python benchmarks/vs_trl.py --quick     # 1 warm-up + 3 measured steps, shorter side measurements
    python benchmarks/vs_trl.py --model smollm2 --dtype float32 --steps 2 --warmup 1 --repeats 1
                                            # the real model (SmolLM2-135M-Instruct), 4 prompts per step

The work (identical on both sides):
- Model (`--model tiny`, the default): Qwen3 architecture, hidden 256, 4 layers, 8 heads, 4 KV
  heads, intermediate 768, the project's tokenizer (BPE trained on the synthetic training split,
  4096 tokens), random weights built once and saved as a Hugging Face directory that both sides
  load.  `--model smollm2` (or a folder, a hub name, a .gguf file: what `grpo.train --model`
  takes) uses that real model and its own tokenizer and chat template instead, converted once
  into the work directory.  LoRA r=16, alpha=32 on q,k,v,o,gate,up,down, 2 CPU threads per side.
  Precision: `--dtype` (float32 by default) on both sides; with bfloat16, TRL runs with `bf16=True`
  and the model loaded in bf16, ours with bf16 base weights and fp32 LoRA (as in training).
- Data: prompts rendered from the synthetic *test* split (multi-turn, several hundred tokens),
  the same prompts per step on both sides (2 per step for tiny, 4 for a real model:
  `--prompts-per-step`), G = 8 completions each, exactly 64 new tokens per
  completion (stop tokens banned until 64: `min_new_tokens` here, `generation_kwargs=
  {"min_new_tokens": 64}` in TRL), temperature 1, no top-k/top-p, beta 0 (no reference pass),
  one iteration (mu = 1), loss "dapo" (TRL's default), group-scaled advantages, eps 0.2, AdamW,
  gradient clipping at 1.0.  OMP_WAIT_POLICY=PASSIVE on both sides (see `worker_env`).  TRL runs
  without gradient checkpointing (its GRPOConfig default is on; recomputing activations would
  only slow it down here).  With a real model TRL trains its 32 rows as 4 accumulated
  micro-batches of 8 (one group each: all 32 at once would keep about 24 GB of activations);
  ours trains them in one micro-batch, each prompt computed once per group.
- Reward: the same cheap deterministic function of the completion text on both sides (the
  reward is not what is measured; it only has to give the groups some spread).

How it is measured: each side runs in its own subprocess (so that its peak resident memory,
`ru_maxrss`, is its own), both processes live at once and take turns: the parent lets one side
run one optimizer step while the other waits, alternating which side goes first.  A step is
timed from its start (before sampling) to the end of the optimizer step: for TRL from its
`on_step_begin` to its `on_step_end` callback (generation, scoring, loss, backward, optimizer);
here `grpo.step.rollout_and_score` + `grpo.update.policy_update`, the body of the training loop.
Logging is outside the timed region on both sides.  Reported: the median over the measured
steps.  Then a third subprocess measures (a) rollout tokens/s of `grpo.rollout.generate` against
transformers' `generate` on the same LoRA model and the same 16 rows, and (b) the training
forward + backward (`policy_update`) with and without prefix sharing, with the number of token
positions the decoder processes in each (a real model: with sharing only, since the unshared
update is what TRL's side already measures), and (c) the FLOP rate of that forward + backward as
a share of this machine's matmul peak in the same precision, measured in the same process with a
2048 x 2048 x 2048 matmul.  The training FLOPs are counted as 4 x (decoder linear weights) per
token position (forward 2, input gradient 2; frozen base weights need no weight gradient; LoRA
and attention scores are left out, so the share is a lower bound) plus 4 x vocabulary x hidden
per completion token (the output head).  The workers (our side, TRL's side, the side
measurements) are in `vs_trl_sides.py`; this file prepares their inputs, takes turns and reports.

The table goes to stdout, the raw numbers to `<workdir>/results.json`; the last line is
`speedup (TRL step time / our step time): X.XX`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vs_trl_sides import (  # noqa: E402  (this folder: sys.path[0] when run as a script)
    GROUP_SIZE, MARK, NEW_TOKENS, run_ours, run_side_measurements, run_trl,
)


# ---------------------------------------------------------------------------------------------
# Shared inputs: the model directory and the prompts, written once, read by every worker
# ---------------------------------------------------------------------------------------------


def prepare_model(workdir: Path, model: str, seed: int = 0) -> str:
    """The model folder both sides load: the random-weight tiny Qwen3 (`tiny`), or a real model
    resolved as `grpo.train --model` resolves it (`smollm2` and .gguf files converted once)."""
    if model == "tiny":
        from grpo.tiny import TinyModelConfig
        from grpo.tiny import prepare_tiny_base

        model_config = TinyModelConfig(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4,
                                       intermediate_size=768)
        return str(prepare_tiny_base(workdir / "model", seed=seed, vocab_size=4096, model_config=model_config))
    from grpo.models import needs_conversion, resolve_model

    folder = workdir / ("model-" + Path(model).name.removesuffix(".gguf")) if needs_conversion(model) else None
    return resolve_model(model, folder=folder)


def prepare_assets(workdir: Path, num_prompts: int, *, model: str = "tiny", dtype: str = "float32",
                   prompts_per_step: int = 2, seed: int = 0) -> dict[str, Any]:
    """Build (or reuse) the model and pick `num_prompts` test prompts.

    A prompt is kept only if tokenizing its text (as TRL does) gives back exactly its ids.
    """
    import random

    from data import load_dataset, make_samples
    from data.render import render_prompt
    from grpo.policy import load_tokenizer

    base = prepare_model(workdir, model, seed=seed)
    tokenizer = load_tokenizer(base)
    conversations, _ = load_dataset("synthetic:test", seed=seed)
    samples = make_samples(conversations, strip_reasoning=True)
    random.Random(seed).shuffle(samples)
    prompts = []
    for sample in samples:
        ids = render_prompt(sample, tokenizer).input_ids
        text = tokenizer.decode(ids, skip_special_tokens=False)
        if tokenizer(text)["input_ids"] == ids:
            prompts.append({"ids": ids, "text": text})
        if len(prompts) == num_prompts:
            break
    assets = {"model": str(base), "model_name": model, "dtype": dtype, "prompts_per_step": prompts_per_step,
              "prompts": prompts}
    (workdir / "assets.json").write_text(json.dumps(assets))
    return assets


# ---------------------------------------------------------------------------------------------
# The parent: start the workers, take turns, print the table
# ---------------------------------------------------------------------------------------------


class Worker:
    """A worker subprocess and its line protocol (parent -> "go"/"stop", worker -> MARK json)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log = log_path.open("w")
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                        text=True, env=env, cwd=REPO)

    def receive(self, kind: str) -> dict[str, Any]:
        for line in self.process.stdout:
            if line.startswith(MARK):
                message = json.loads(line[len(MARK):])
                if message["kind"] != kind:
                    raise RuntimeError(f"{self.name}: expected {kind!r}, got {message}")
                return message
            self.log.write(line)
        self.process.wait()
        raise RuntimeError(f"{self.name} worker exited (code {self.process.returncode}) before sending {kind!r}; "
                           f"see {self.log.name}")

    def tell(self, word: str) -> None:
        try:
            self.process.stdin.write(word + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:  # TRL's worker ends by itself after max_steps
            pass

    def finish(self) -> None:
        try:
            self.process.stdin.close()
        except BrokenPipeError:
            pass
        self.process.wait(timeout=120)
        self.log.close()


def worker_env(threads: int) -> dict[str, str]:
    """The workers' environment.  OMP_WAIT_POLICY=PASSIVE (unless set by the caller): an OpenMP
    thread waiting at a barrier sleeps instead of spinning.  On an idle machine that should change
    little (not measured); with other jobs on the cores, spinning threads wait a whole scheduler
    time slice for a descheduled partner at every barrier, and a 2-thread step ran 4-10 times
    slower than a 1-thread one (measured here): that measures the other jobs, not the trainers."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": "",
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), "PYTHONWARNINGS": "ignore"}


def compare(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    total_steps = args.warmup + args.steps
    per_step = args.prompts_per_step or (2 if args.model == "tiny" else 4)
    assets = prepare_assets(workdir, num_prompts=total_steps * per_step, model=args.model, dtype=args.dtype,
                            prompts_per_step=per_step)
    if len(assets["prompts"]) < total_steps * per_step:
        raise SystemExit(f"only {len(assets['prompts'])} usable prompts for {total_steps} steps")
    load_at_start = os.getloadavg()
    env = worker_env(args.threads)
    me = [sys.executable, str(Path(__file__).resolve()), "--workdir", str(workdir), "--threads", str(args.threads)]
    def side_measurements() -> dict[str, Any]:
        side_worker = Worker("side", [*me, "--worker", "side", "--repeats", str(args.repeats)], env,
                             workdir / "side.log")
        side = side_worker.receive("side")
        side_worker.finish()
        return side

    if args.side_only:
        side = side_measurements()
        summary = {"command": " ".join(["python", "benchmarks/vs_trl.py", *sys.argv[1:]]),
                   "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "threads": args.threads, "model": args.model,
                   "dtype": args.dtype, "prompts_per_step": per_step, "side": side,
                   "load_average": {"start": load_at_start, "end": os.getloadavg()}}
        (workdir / "results-side.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary
    workers = {
        "ours": Worker("ours", [*me, "--worker", "ours"], env, workdir / "ours.log"),
        "trl": Worker("trl", [*me, "--worker", "trl", "--steps", str(args.steps), "--warmup", str(args.warmup),
                              "--trl-micro-batch", str(args.trl_micro_batch)],
                      env, workdir / "trl.log"),
    }
    setup_rss = {name: worker.receive("ready")["rss_mib"] for name, worker in workers.items()}
    steps: dict[str, list[dict[str, Any]]] = {name: [] for name in workers}
    for step in range(total_steps):
        order = ["ours", "trl"] if step % 2 == 0 else ["trl", "ours"]
        for name in order:
            workers[name].tell("go")
            steps[name].append(workers[name].receive("step"))
            print(f"  step {step + 1}/{total_steps} {name}: {steps[name][-1]['seconds']:.2f} s", file=sys.stderr,
                  flush=True)
    peak_rss = {}
    for name, worker in workers.items():
        worker.tell("stop")
        peak_rss[name] = worker.receive("done")["peak_rss_mib"]
        worker.finish()

    side = side_measurements()

    measured = {name: records[args.warmup:] for name, records in steps.items()}
    summary = {
        "command": " ".join(["python", "benchmarks/vs_trl.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "threads": args.threads, "omp_wait_policy": env["OMP_WAIT_POLICY"], "warmup_steps": args.warmup,
        "measured_steps": args.steps, "model": args.model, "dtype": args.dtype, "prompts_per_step": per_step,
        "prompt_tokens": [len(prompt["ids"]) for prompt in assets["prompts"]],
        "step_s": {name: statistics.median(r["seconds"] for r in records) for name, records in measured.items()},
        "rollout_s": {name: statistics.median(r["rollout_s"] for r in records) for name, records in measured.items()},
        "train_s": {name: statistics.median(r["train_s"] for r in records) for name, records in measured.items()},
        "all_step_s": {name: [r["seconds"] for r in records] for name, records in steps.items()},
        "setup_rss_mib": setup_rss, "peak_rss_mib": peak_rss, "side": side,
        "load_average": {"start": load_at_start, "end": os.getloadavg()},  # 1, 5, 15 minutes
    }
    (workdir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def print_side(summary: dict[str, Any]) -> None:
    side = summary["side"]
    print(f"\nModel {summary.get('model', 'tiny')}, {summary.get('dtype', 'float32')}, {summary['threads']} threads")
    print(f"Rollout, {side['rows']} rows x {side['new_tokens']} tokens (prompts {side['prompt_tokens']}):")
    for name, rate in side["rollout_tokens_per_s"].items():
        print(f"  {name:58}{rate:9.0f} tokens/s")
    rates = side["rollout_tokens_per_s"]
    print(f"  ours / transformers generate: {rates['ours'] / rates['transformers generate']:.2f}x")
    positions, update = side["train_forward_positions"], side["train_update_s"]
    print("Training forward + backward of one step (policy_update, prefix shared):")
    print(f"  {positions['shared']} token positions in {update['shared']:.2f} s "
          f"({positions['shared'] / update['shared']:.0f} positions/s)")
    print(f"  training FLOP rate {side['train_flops_per_s'] / 1e9:.1f} GFLOP/s = "
          f"{100 * side['train_share_of_peak']:.0f}% of this machine's {summary.get('dtype', 'float32')} matmul peak "
          f"({side['matmul_peak_flops_per_s'] / 1e9:.1f} GFLOP/s, 2048^3 matmul, same process)")


def print_report(summary: dict[str, Any]) -> None:
    step, rollout, train = summary["step_s"], summary["rollout_s"], summary["train_s"]
    peak, setup, side = summary["peak_rss_mib"], summary["setup_rss_mib"], summary["side"]
    prompt_tokens = summary["prompt_tokens"]
    print(f"\nModel {summary.get('model', 'tiny')}, {summary.get('dtype', 'float32')}")
    print(f"GRPO step: {summary.get('prompts_per_step', 2)} prompts x G={GROUP_SIZE} x {NEW_TOKENS} new tokens, prompts of "
          f"{min(prompt_tokens)}-{max(prompt_tokens)} tokens (median {statistics.median(prompt_tokens):.0f}); "
          f"{summary['threads']} threads (OMP_WAIT_POLICY={summary['omp_wait_policy']}); "
          f"median of {summary['measured_steps']} steps after "
          f"{summary['warmup_steps']} warm-up, alternating")
    print(f"{'':24}{'ours':>12}{'TRL 1.16':>12}")
    print(f"{'step time (s)':24}{step['ours']:12.2f}{step['trl']:12.2f}")
    print(f"{'  rollout + rewards (s)':24}{rollout['ours']:12.2f}{rollout['trl']:12.2f}")
    print(f"{'  loss + update (s)':24}{train['ours']:12.2f}{train['trl']:12.2f}")
    print(f"{'peak RSS (MiB)':24}{peak['ours']:12.0f}{peak['trl']:12.0f}")
    print(f"{'RSS after setup (MiB)':24}{setup['ours']:12.0f}{setup['trl']:12.0f}")
    rows = side["rows"]
    print(f"\nRollout, {rows} rows x {side['new_tokens']} tokens (prompts {side['prompt_tokens']}):")
    for name, rate in side["rollout_tokens_per_s"].items():
        print(f"  {name:58}{rate:9.0f} tokens/s")
    positions, update = side["train_forward_positions"], side["train_update_s"]
    print("\nTraining forward + backward of one step (policy_update):")
    for key, label in (("shared", "with prefix sharing"), ("unshared", "without")):
        if key in positions:
            print(f"  {label:24}{positions[key]:8d} token positions  {update[key]:6.2f} s  "
                  f"({positions[key] / update[key]:.0f} positions/s)")
    if "train_share_of_peak" in side:
        print(f"  training FLOP rate {side['train_flops_per_s'] / 1e9:.1f} GFLOP/s = "
              f"{100 * side['train_share_of_peak']:.0f}% of this machine's {summary.get('dtype', 'float32')} matmul peak "
              f"({side['matmul_peak_flops_per_s'] / 1e9:.1f} GFLOP/s, 2048^3 matmul, same process)")
    load = summary["load_average"]
    print(f"\nmachine load average (1 min) at start / end: {load['start'][0]:.1f} / {load['end'][0]:.1f} "
          f"on {os.cpu_count()} cores")
    print(f"\nspeedup (TRL step time / our step time): {step['trl'] / step['ours']:.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 warm-up + 3 measured steps, 2 side repeats")
    parser.add_argument("--steps", type=int, default=10, help="measured steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps per side (not measured)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the side measurements")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per side")
    parser.add_argument("--model", default="tiny",
                        help="tiny (random-weight 4M Qwen3), smollm2, a folder, a hub name or a .gguf file")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="precision of both sides (bf16: base weights; LoRA and the loss stay fp32 here)")
    parser.add_argument("--prompts-per-step", type=int, default=0, help="prompts per step (0: 2 for tiny, 4 otherwise)")
    parser.add_argument("--workdir", default=None,
                        help="model, prompts, logs, results (default runs/bench-vs-trl, or runs/bench-vs-trl-MODEL-DTYPE)")
    parser.add_argument("--side-only", action="store_true",
                        help="only the side measurements (rollout vs generate, training FLOP rate), no TRL step")
    parser.add_argument("--trl-micro-batch", type=int, default=0,
                        help="rows per TRL micro-batch (0: the whole step for tiny, one group of 8 for a real model; "
                             "4 fits SmolLM2 in fp32 beside our worker in 24 GB)")
    parser.add_argument("--worker", choices=("ours", "trl", "side"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.workdir is None:
        suffix = "" if args.model == "tiny" and args.dtype == "float32" else \
            f"-{Path(args.model).name.removesuffix('.gguf')}-{args.dtype}"
        args.workdir = str(REPO / "runs" / f"bench-vs-trl{suffix}")
    if args.quick:
        args.steps, args.warmup, args.repeats = 3, 1, 2
    if args.worker is None:
        summary = compare(args)
        print_side(summary) if args.side_only else print_report(summary)
        return

    import torch

    torch.set_num_threads(args.threads)
    assets = json.loads((Path(args.workdir) / "assets.json").read_text())
    if args.worker == "ours":
        run_ours(assets)
    elif args.worker == "trl":
        run_trl(assets, args.warmup + args.steps, Path(args.workdir), micro_batch=args.trl_micro_batch)
    else:
        run_side_measurements(assets, args.repeats)


if __name__ == "__main__":
    main()
