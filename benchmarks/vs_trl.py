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
per completion token (the output head).

The table goes to stdout, the raw numbers to `<workdir>/results.json`; the last line is
`speedup (TRL step time / our step time): X.XX`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from grpo.policy import LORA_TARGETS  # noqa: E402  (the paper's targets: all seven projections)

GROUP_SIZE = 8
NEW_TOKENS = 64
LOSS_TYPE = "dapo"
LEARNING_RATE = 1e-5
MARK = "@@bench "  # prefix of the lines a worker sends to the parent (libraries print to stdout too)


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


def bench_reward(text: str) -> float:
    """A deterministic reward with spread inside a group (the same function on both sides)."""
    return float(sum(map(ord, text)) % 7) / 3.0


# ---------------------------------------------------------------------------------------------
# Talking to the parent
# ---------------------------------------------------------------------------------------------


def send(kind: str, **payload: Any) -> None:
    print(MARK + json.dumps({"kind": kind, **payload}), flush=True)


def wait_for_turn() -> bool:
    """Block until the parent says "go" (True) or "stop" / closes the pipe (False)."""
    return sys.stdin.readline().strip() == "go"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------


def our_config(prompts_per_step: int, **overrides: Any):
    from grpo.trainer import GRPOConfig

    settings = dict(group_size=GROUP_SIZE, prompts_per_step=prompts_per_step, rollout_batch_prompts=prompts_per_step,
                    max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, temperature=1.0, top_p=1.0, top_k=0,
                    beta=0.0, mu=1, loss_type=LOSS_TYPE, scale_rewards="group", epsilon_low=0.2,
                    train_micro_batch=GROUP_SIZE * prompts_per_step, lr=LEARNING_RATE, max_grad_norm=1.0,
                    weight_decay=0.0, share_prefix=True)
    settings.update(overrides)
    return GRPOConfig(**settings)


def load_our_policy(assets: dict[str, Any]):
    from grpo.policy import LoraSettings, load_policy

    return load_policy(base=assets["model"], lora=LoraSettings(r=16, alpha=32, target_modules=LORA_TARGETS),
                       dtype=assets.get("dtype", "float32"), device="cpu")


def our_reward_fn(texts: list[str], targets: list[Any]) -> list[Any]:
    from rewards.score import RewardResult

    return [RewardResult(total=bench_reward(text), components={}, success=False, kind="answer") for text in texts]


def our_prompts(assets: dict[str, Any]) -> list[Any]:
    from grpo.prompts import Prompt

    return [Prompt(sample=SimpleNamespace(target=None), prompt_ids=prompt["ids"]) for prompt in assets["prompts"]]


def run_ours(assets: dict[str, Any]) -> None:
    """One optimizer step per "go": the body of grpo.trainer's loop, grpo.step.grpo_step (without logging)."""
    import torch

    from grpo.step import rollout_and_score
    from grpo.update import policy_update

    policy = load_our_policy(assets)
    per_step = assets.get("prompts_per_step", 2)
    config = our_config(per_step)
    optimizer = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    prompts = our_prompts(assets)
    send("ready", rss_mib=current_rss_mib())
    step = 0
    while wait_for_turn():
        began = time.perf_counter()
        step_prompts = prompts[step * per_step:(step + 1) * per_step]
        batches, _, rollout_metrics, _ = rollout_and_score(policy, step_prompts, config, step=step,
                                                           reward_fn=our_reward_fn, device=torch.device("cpu"))
        scored = time.perf_counter()
        update_metrics = policy_update(policy, batches, config, optimizer)
        ended = time.perf_counter()
        send("step", seconds=ended - began, rollout_s=scored - began, train_s=ended - scored,
             completion_tokens=int(rollout_metrics["rollout/tokens"]), loss=update_metrics["loss"])
        step += 1
    send("done", peak_rss_mib=peak_rss_mib())


def run_trl(assets: dict[str, Any], total_steps: int, workdir: Path) -> None:
    """TRL's GRPOTrainer on the same model, prompts and settings; a callback takes turns."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo.policy import load_tokenizer

    tokenizer = load_tokenizer(assets["model"])
    bf16 = assets.get("dtype", "float32") == "bfloat16"
    per_step = assets.get("prompts_per_step", 2)
    model = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.bfloat16 if bf16 else torch.float32)
    # The tiny model trains all 16 rows at once.  A real model's 32 rows of about 800 tokens would
    # keep about 24 GB of activations without recomputation: TRL accumulates 4 micro-batches of 8
    # (one group each; it still generates all 32 rows at once, in the first micro-step).
    micro_batch = GROUP_SIZE * per_step if assets.get("model_name", "tiny") == "tiny" else GROUP_SIZE
    dataset = Dataset.from_list([{"prompt": prompt["text"]} for prompt in assets["prompts"]])

    def reward(completions: list[str], **kwargs: Any) -> list[float]:
        return [bench_reward(text) for text in completions]

    class TakeTurns(TrainerCallback):
        """Wait for the parent before each step; report its time after the optimizer step."""

        def on_step_begin(self, args, state, control, **kwargs):
            if not wait_for_turn():
                raise SystemExit("parent stopped the benchmark")
            self.began = time.perf_counter()
            self.rollout_s = 0.0

        def on_step_end(self, args, state, control, **kwargs):
            send("step", seconds=time.perf_counter() - self.began, rollout_s=self.rollout_s,
                 train_s=time.perf_counter() - self.began - self.rollout_s)

    turns = TakeTurns()
    config = GRPOConfig(
        output_dir=str(workdir / "trl-out"), per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=GROUP_SIZE * per_step // micro_batch, num_generations=GROUP_SIZE,
        max_completion_length=NEW_TOKENS,
        generation_kwargs={"min_new_tokens": NEW_TOKENS}, temperature=1.0, top_p=1.0, top_k=0,
        beta=0.0, num_iterations=1, loss_type=LOSS_TYPE, scale_rewards="group", epsilon=0.2,
        learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        max_steps=total_steps, shuffle_dataset=False, gradient_checkpointing=False, bf16=bf16, fp16=False,
        use_cpu=True, logging_steps=10_000, report_to="none", save_strategy="no", disable_tqdm=True, seed=0,
        dataloader_num_workers=0, log_completions=False,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[turns],
                          peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                 target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM"))
    generate_and_score = trainer._generate_and_score_completions

    def timed_generate_and_score(*args: Any, **kwargs: Any) -> Any:  # TRL's rollout + rewards + advantages
        began = time.perf_counter()
        result = generate_and_score(*args, **kwargs)
        turns.rollout_s += time.perf_counter() - began
        return result

    trainer._generate_and_score_completions = timed_generate_and_score
    send("ready", rss_mib=current_rss_mib())
    trainer.train()
    send("done", peak_rss_mib=peak_rss_mib())


def run_side_measurements(assets: dict[str, Any], repeats: int) -> None:
    """Rollout tokens/s against transformers' generate, and the training forward with and without
    prefix sharing (time and the token positions the decoder runs)."""
    import copy
    import dataclasses

    import torch

    from data.render import stop_sequences, stop_token_ids
    from grpo.rollout import SamplingConfig, generate, left_pad
    from grpo.step import rollout_and_score
    from grpo.update import policy_update

    policy = load_our_policy(assets)
    tokenizer = policy.tokenizer
    per_step = assets.get("prompts_per_step", 2)
    tiny = assets.get("model_name", "tiny") == "tiny"
    prompts = [prompt["ids"] for prompt in assets["prompts"][:per_step]]
    stops = stop_token_ids(tokenizer)
    rows = len(prompts) * GROUP_SIZE
    results: dict[str, Any] = {"rows": rows, "new_tokens": NEW_TOKENS,
                               "prompt_tokens": [len(prompt) for prompt in prompts]}

    def ours(**options: Any) -> float:
        config = SamplingConfig(group_size=GROUP_SIZE, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, **options)
        began = time.perf_counter()
        rollout, _ = generate(policy.model, prompts, config, pad_token_id=tokenizer.pad_token_id,
                              stop_token_ids=stops, stop_sequences=stop_sequences(tokenizer),
                              generator=torch.Generator().manual_seed(0))
        assert int(rollout.completion_mask.sum()) == rows * NEW_TOKENS
        return time.perf_counter() - began

    prompt_ids, prompt_mask = left_pad([prompt for prompt in prompts for _ in range(GROUP_SIZE)],
                                       tokenizer.pad_token_id)

    def transformers_generate() -> float:
        # What TRL does: the prompts repeated G times, the peft model (adapter not merged).
        policy.model.eval()
        began = time.perf_counter()
        with torch.no_grad():
            output = policy.model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True,
                                           temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=NEW_TOKENS,
                                           min_new_tokens=NEW_TOKENS, pad_token_id=tokenizer.pad_token_id,
                                           eos_token_id=stops)
        assert output.shape == (rows, prompt_ids.shape[1] + NEW_TOKENS)
        return time.perf_counter() - began

    variants = {
        "ours": lambda: ours(),
        "ours, no LoRA folding": lambda: ours(merge_lora=False),
        "ours, prompt cache repeated (no shared-prefix attention)": lambda: ours(share_prefix=False),
        "transformers generate": transformers_generate,
    }
    if not tiny:  # a real model's variants take minutes each: ours against generate only
        variants = {name: variants[name] for name in ("ours", "transformers generate")}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for name, run in variants.items():  # warm-up
        run()
    for _ in range(repeats):
        for name, run in variants.items():
            times[name].append(run())
    results["rollout_tokens_per_s"] = {name: rows * NEW_TOKENS / statistics.median(values)
                                       for name, values in times.items()}

    # Training forward + backward of one step's completions, shared vs unshared.
    config = our_config(per_step)
    step_prompts = our_prompts(assets)[:per_step]
    batches, _, _, _ = rollout_and_score(policy, step_prompts, config, step=0, reward_fn=our_reward_fn,
                                         device=torch.device("cpu"))
    positions: dict[bool, int] = {}
    sharing = (True, False) if tiny else (True,)
    update_times: dict[bool, list[float]] = {share: [] for share in sharing}
    for round_index in range(repeats + 1):
        for share_prefix in sharing:
            model = copy.deepcopy(policy.model)
            trial = dataclasses.replace(policy, model=model)
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr)
            seen = []
            hook = model.get_input_embeddings().register_forward_hook(
                lambda module, args, output: seen.append(args[0].numel()))
            began = time.perf_counter()
            policy_update(trial, batches, dataclasses.replace(config, share_prefix=share_prefix), optimizer)
            elapsed = time.perf_counter() - began
            hook.remove()
            positions[share_prefix] = sum(seen)
            if round_index:  # the first round warms up
                update_times[share_prefix].append(elapsed)
    names = {True: "shared", False: "unshared"}
    results["train_forward_positions"] = {names[share]: positions[share] for share in sharing}
    results["train_update_s"] = {names[share]: statistics.median(update_times[share]) for share in sharing}
    completion_tokens = sum(int(batch.completion_mask.sum()) for batch in batches)
    flops = training_flops(policy.model, positions[True], completion_tokens)
    peak = matmul_peak_flops(assets.get("dtype", "float32"))
    results["train_flops"] = flops
    results["train_flops_per_s"] = flops / results["train_update_s"]["shared"]
    results["matmul_peak_flops_per_s"] = peak
    results["train_share_of_peak"] = results["train_flops_per_s"] / peak
    send("side", **results)


def training_flops(model: Any, positions: int, completion_tokens: int) -> float:
    """Forward + input-gradient backward FLOPs of a LoRA update: 4 x (decoder linear weights) per
    token position, plus 4 x vocab x hidden per completion token for the output head.  LoRA's own
    matmuls and the attention scores are left out (a lower bound)."""
    import torch

    from grpo.hf_compat import causal_lm_of

    causal_lm = causal_lm_of(model)
    decoder_weights = sum(module.weight.numel() for name, module in causal_lm.get_decoder().named_modules()
                          if isinstance(module, torch.nn.Linear) and "lora_" not in name)
    head = causal_lm.get_output_embeddings().weight.numel()
    return 4.0 * decoder_weights * positions + 4.0 * head * completion_tokens


def matmul_peak_flops(dtype: str, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` size^3 matmuls in `dtype` (this process's threads)."""
    import torch

    kind = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype, torch.float32)
    a, b = torch.randn(size, size, dtype=kind), torch.randn(size, size, dtype=kind)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - began)
    return 2.0 * size ** 3 / best


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
        "trl": Worker("trl", [*me, "--worker", "trl", "--steps", str(args.steps), "--warmup", str(args.warmup)],
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
        run_trl(assets, args.warmup + args.steps, Path(args.workdir))
    else:
        run_side_measurements(assets, args.repeats)


if __name__ == "__main__":
    main()
