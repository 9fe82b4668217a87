"""The two sides of benchmarks/vs_trl.py and its side measurements, each run in a worker subprocess.

    run_ours               one optimizer step per "go": grpo.step.rollout_and_score + grpo.update.policy_update
    run_trl                TRL 1.16's GRPOTrainer on the same model, prompts and settings; a callback takes turns
    run_side_measurements  rollout tokens/s against transformers' generate, the training forward + backward
                           with and without prefix sharing, its FLOP rate against this machine's matmul peak

A worker reads the shared inputs (`<workdir>/assets.json`, written by vs_trl.py) and talks to the
parent by lines: it receives "go" / "stop" on stdin and sends `MARK` + JSON on stdout.  The work
itself (G, new tokens, loss, learning rate) is fixed here, the same on both sides.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from grpo.policy import LORA_TARGETS  # the paper's targets: all seven projections

GROUP_SIZE = 8
NEW_TOKENS = 64
LOSS_TYPE = "dapo"
LEARNING_RATE = 1e-5
MARK = "@@bench "  # prefix of the lines a worker sends to the parent (libraries print to stdout too)


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


def run_trl(assets: dict[str, Any], total_steps: int, workdir: Path, micro_batch: int = 0) -> None:
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
    # --trl-micro-batch 4 halves that again (SmolLM2 in fp32 beside our worker in 24 GB).
    micro_batch = micro_batch or (GROUP_SIZE * per_step if assets.get("model_name", "tiny") == "tiny" else GROUP_SIZE)
    if (GROUP_SIZE * per_step) % micro_batch:
        raise SystemExit(f"--trl-micro-batch {micro_batch} must divide the step's {GROUP_SIZE * per_step} rows")
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
