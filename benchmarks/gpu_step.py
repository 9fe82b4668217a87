"""A GRPO step at the paper's scale on one GPU: the Qwen3-1.7B architecture with random weights.

    python benchmarks/gpu_step.py                 # ours on the GPU: 1 warm-up + 3 measured steps
    python benchmarks/gpu_step.py --trl           # then the same for TRL 1.16's GRPOTrainer (no vLLM)
    python benchmarks/gpu_step.py --tiny --trl    # a CPU smoke test of this script (tiny model, seconds)

The work: the real Qwen3-1.7B configuration (hidden 2048, 28 layers, 16 heads, 8 KV heads,
head_dim 128, intermediate 6144, vocab 151936, tied embeddings) with random weights in bf16,
LoRA r=16, alpha=32 on q,k,v,o,gate,up,down (the paper's targets), 4 prompts of exactly 2,048
tokens per step, G = 8, exactly 256 new tokens per completion (stop tokens banned until then),
temperature 1, beta 0, mu = 1, loss "dapo", micro-batches of 8 sequences (one group).  Prompts are
random token ids spelled as words of a word-level tokenizer with the model's vocabulary size, so
that text -> ids is exact for TRL too.

Reported per side: median step time; rollout tokens/s (generated tokens / rollout time);
training tokens/s (tokens of the [prompt ; completion] rows / time of the loss, backward and
optimizer step); peak accelerator memory (`torch.cuda.max_memory_allocated`; peak RSS on the
CPU); model FLOPs utilisation against the card's dense bf16 peak (table below, or --peak-tflops):

    MFU = (rollout FLOPs + training FLOPs) / (step time x peak FLOP/s)
    forward FLOPs of n tokens = 2 n W + attention (4 d_attn per query-key pair actually computed)
    rollout FLOPs  = forward FLOPs of the prefill (each prompt once) and of every decode step
    training FLOPs = 2 x forward FLOPs of the training forward (forward + gradient w.r.t. the
                     activations; the frozen base weights get no weight gradient, LoRA's is tiny)

W = parameters of the weight matrices (embedding lookups excluded, the output head included).
Ours counts the tokens it runs (each prompt once per group); TRL's count is the same *model*
FLOPs of the work (the shared-prefix count), so the two MFUs compare the same useful work.
Results are printed and written as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from grpo.policy import LORA_TARGETS  # noqa: E402  (the paper's targets: all seven projections)

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by device-name fragment, most specific first.
BF16_PEAK_TFLOPS = (
    ("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("GH200", 989.4), ("B200", 2250.0),
    ("A100", 312.0), ("L40S", 362.1), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.2),
)
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@dataclass
class Workload:
    """Model shape and step size."""

    hidden_size: int = 2048
    num_layers: int = 28
    num_heads: int = 16
    num_kv_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 6144
    vocab_size: int = 151936
    prompt_tokens: int = 2048
    new_tokens: int = 256
    group_size: int = 8
    prompts_per_step: int = 4
    micro_batch: int = 8


TINY = Workload(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
                vocab_size=512, prompt_tokens=48, new_tokens=8, group_size=4, prompts_per_step=2, micro_batch=4)


# ---------------------------------------------------------------------------------------------
# Model, tokenizer and prompts, written once into --out and loaded by each side
# ---------------------------------------------------------------------------------------------


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer whose ids are the words "w0", "w1", ..., plus three special tokens
    at the end: decode and encode are exact inverses for any id sequence."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{index}" for index in range(vocab_size - len(SPECIALS))]
    vocab = {word: index for index, word in enumerate(words + list(SPECIALS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIALS[0]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=SPECIALS[0], pad_token=SPECIALS[0],
                                   eos_token=SPECIALS[2], additional_special_tokens=list(SPECIALS[1:]))


def prepare(out: Path, workload: Workload, total_steps: int, dtype_name: str) -> dict[str, Any]:
    """Save the random-weight model and tokenizer, and draw the prompts of every step."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    model_dir = out / "model"
    tokenizer = word_tokenizer(workload.vocab_size)
    if not (model_dir / "config.json").is_file():
        config = Qwen3Config(
            vocab_size=workload.vocab_size, hidden_size=workload.hidden_size, num_hidden_layers=workload.num_layers,
            num_attention_heads=workload.num_heads, num_key_value_heads=workload.num_kv_heads,
            head_dim=workload.head_dim, intermediate_size=workload.intermediate_size, max_position_embeddings=40960,
            rope_theta=1_000_000.0, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(0)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.device(device):  # initialising 1.7B parameters on the CPU takes minutes
            model = Qwen3ForCausalLM(config).to(getattr(torch, dtype_name))
        model.save_pretrained(model_dir, safe_serialization=True)
        tokenizer.save_pretrained(model_dir)
        del model
    generator = torch.Generator().manual_seed(1)
    words = workload.vocab_size - len(SPECIALS)
    prompts = [torch.randint(0, words, (workload.prompt_tokens,), generator=generator).tolist()
               for _ in range(total_steps * workload.prompts_per_step)]
    return {"model": str(model_dir), "prompts": prompts}


def model_flops(workload: Workload, shared_training: bool = True) -> dict[str, float]:
    """Model FLOPs of one step (see the module docstring)."""
    w = workload
    attention_width = w.num_heads * w.head_dim
    per_layer = (w.hidden_size * attention_width * 2 + w.hidden_size * w.num_kv_heads * w.head_dim * 2
                 + 3 * w.hidden_size * w.intermediate_size)
    weights = w.num_layers * per_layer  # the output head is counted separately (only where logits are made)
    head = w.hidden_size * w.vocab_size
    rows = w.prompts_per_step * w.group_size
    prompt_pairs = w.prompts_per_step * w.prompt_tokens * (w.prompt_tokens + 1) / 2  # causal query-key pairs
    completion_pairs = rows * sum(w.prompt_tokens + t + 1 for t in range(w.new_tokens))

    def attention(pairs: float) -> float:
        return 4 * attention_width * pairs * w.num_layers

    prefill = (2 * weights * w.prompts_per_step * w.prompt_tokens + attention(prompt_pairs)
               + 2 * head * w.prompts_per_step)
    decode = (2 * (weights + head) * rows * (w.new_tokens - 1)
              + attention(completion_pairs - rows * (w.prompt_tokens + w.new_tokens)))  # the last token is not fed
    training_pairs = prompt_pairs + completion_pairs - rows * (w.prompt_tokens + w.new_tokens)
    forward = (2 * weights * (w.prompts_per_step * w.prompt_tokens + rows * (w.new_tokens - 1))
               + 2 * head * rows * w.new_tokens + attention(training_pairs))
    return {"rollout": prefill + decode, "training": 2 * forward}


def bf16_peak(device_name: str) -> float | None:
    for fragment, tflops in BF16_PEAK_TFLOPS:
        if fragment in device_name:
            return tflops * 1e12
    return None


# ---------------------------------------------------------------------------------------------
# The two sides
# ---------------------------------------------------------------------------------------------


def device_memory() -> tuple[str, float]:
    """(what was measured, peak MiB) for this process."""
    import resource

    import torch

    if torch.cuda.is_available():
        return "max_memory_allocated", torch.cuda.max_memory_allocated() / 2**20
    return "peak RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def constant_reward(text: str) -> float:
    """Rewards with spread inside a group, cheap and identical on both sides."""
    return float(sum(map(ord, text)) % 7) / 3.0


def run_ours(assets: dict[str, Any], workload: Workload, warmup: int, steps: int) -> dict[str, Any]:
    import torch

    from grpo.policy import LoraSettings, load_policy
    from grpo.flags import GRPOConfig
    from grpo.prompts import Prompt
    from grpo.step import rollout_and_score
    from grpo.update import policy_update
    from rewards.score import RewardResult

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    policy = load_policy(base=assets["model"], lora=LoraSettings(r=16, alpha=32, target_modules=LORA_TARGETS),
                         dtype=dtype, device=str(device))
    config = GRPOConfig(group_size=workload.group_size, prompts_per_step=workload.prompts_per_step,
                        rollout_batch_prompts=workload.prompts_per_step, max_new_tokens=workload.new_tokens,
                        min_new_tokens=workload.new_tokens, beta=0.0, mu=1, loss_type="dapo",
                        train_micro_batch=workload.micro_batch, lr=1e-5, max_grad_norm=1.0, share_prefix=True)
    optimizer = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=config.lr)
    prompts = [Prompt(sample=SimpleNamespace(target=None), prompt_ids=ids) for ids in assets["prompts"]]

    def reward_fn(texts: list[str], targets: list[Any]) -> list[Any]:
        return [RewardResult(total=constant_reward(text), components={}, success=False, kind="answer")
                for text in texts]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    records = []
    for step in range(warmup + steps):
        if step == warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync()
        began = time.perf_counter()
        step_prompts = prompts[step * workload.prompts_per_step:(step + 1) * workload.prompts_per_step]
        batches, _, rollout_metrics, _ = rollout_and_score(policy, step_prompts, config, step=step,
                                                           reward_fn=reward_fn, device=device)
        sync()
        scored = time.perf_counter()
        policy_update(policy, batches, config, optimizer)
        sync()
        ended = time.perf_counter()
        records.append({"step_s": ended - began, "rollout_s": scored - began, "train_s": ended - scored,
                        "generated_tokens": int(rollout_metrics["rollout/tokens"]),
                        "train_tokens": int(sum(int(batch.attention_mask.sum()) for batch in batches))})
        print(f"ours step {step + 1}: {records[-1]['step_s']:.2f} s", file=sys.stderr, flush=True)
    return summarise("ours", records[warmup:], device_memory())


def run_trl(assets: dict[str, Any], workload: Workload, warmup: int, steps: int, out: Path,
            gradient_checkpointing: bool) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(assets["model"])
    model = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.bfloat16 if cuda else torch.float32)
    dataset = Dataset.from_list([{"prompt": " ".join(f"w{token}" for token in ids)} for ids in assets["prompts"]])
    records: list[dict[str, Any]] = []
    rows = workload.prompts_per_step * workload.group_size

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == warmup and cuda:
                torch.cuda.reset_peak_memory_stats()
            if cuda:
                torch.cuda.synchronize()
            self.began, self.rollout_s = time.perf_counter(), 0.0

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - self.began
            records.append({"step_s": elapsed, "rollout_s": self.rollout_s, "train_s": elapsed - self.rollout_s,
                            "generated_tokens": rows * workload.new_tokens,
                            "train_tokens": rows * (workload.prompt_tokens + workload.new_tokens)})
            print(f"trl step {state.global_step}: {elapsed:.2f} s", file=sys.stderr, flush=True)

    timer = Timer()
    accumulation = rows // workload.micro_batch
    config = GRPOConfig(
        output_dir=str(out / "trl-out"), per_device_train_batch_size=workload.micro_batch,
        gradient_accumulation_steps=accumulation, steps_per_generation=accumulation,
        num_generations=workload.group_size, max_completion_length=workload.new_tokens,
        generation_kwargs={"min_new_tokens": workload.new_tokens}, temperature=1.0, top_p=1.0, top_k=0,
        beta=0.0, num_iterations=1, loss_type="dapo", learning_rate=1e-5, lr_scheduler_type="constant",
        max_grad_norm=1.0, max_steps=warmup + steps, shuffle_dataset=False, bf16=cuda, fp16=False, use_cpu=not cuda,
        gradient_checkpointing=gradient_checkpointing, logging_steps=10_000, report_to="none", save_strategy="no",
        disable_tqdm=True, seed=0, use_vllm=False,
    )

    def reward(completions: list[str], **kwargs: Any) -> list[float]:
        return [constant_reward(text) for text in completions]

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer],
                          peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                 target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM"))
    generate_and_score = trainer._generate_and_score_completions

    def timed(*args: Any, **kwargs: Any) -> Any:
        if cuda:
            torch.cuda.synchronize()
        began = time.perf_counter()
        result = generate_and_score(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        timer.rollout_s += time.perf_counter() - began
        return result

    trainer._generate_and_score_completions = timed
    trainer.train()
    summary = summarise("trl", records[warmup:], device_memory())
    summary["gradient_checkpointing"] = gradient_checkpointing
    return summary


def summarise(side: str, records: list[dict[str, Any]], memory: tuple[str, float]) -> dict[str, Any]:
    def median(key: str) -> float:
        return statistics.median(record[key] for record in records)

    return {
        "side": side, "steps": [record["step_s"] for record in records], "step_s": median("step_s"),
        "rollout_s": median("rollout_s"), "train_s": median("train_s"),
        "rollout_tokens_per_s": median("generated_tokens") / median("rollout_s"),
        "train_tokens_per_s": median("train_tokens") / median("train_s"),
        "memory_kind": memory[0], "peak_memory_mib": memory[1],
    }


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: a smoke test of this script")
    parser.add_argument("--trl", action="store_true", help="also run TRL's GRPOTrainer (needs trl==1.16.0)")
    parser.add_argument("--trl-gradient-checkpointing", default=None, choices=("on", "off"),
                        help="TRL's gradient checkpointing (default: on with a GPU, where its unshared forward "
                             "would not fit otherwise; off on the CPU)")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per side")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up steps per side")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak (default: table)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's; 1 with --tiny)")
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-gpu"), help="model, results.json")
    parser.add_argument("--side", choices=("ours", "trl"), help=argparse.SUPPRESS)  # a worker subprocess
    args = parser.parse_args(argv)
    workload = TINY if args.tiny else Workload()
    out = Path(args.out) / ("tiny" if args.tiny else "qwen3-1.7b")
    out.mkdir(parents=True, exist_ok=True)

    import torch

    threads = args.threads or (1 if args.tiny else None)
    if threads:
        torch.set_num_threads(threads)
    if args.side is not None:  # worker: one side in its own process (its own peak memory)
        assets = json.loads((out / "assets.json").read_text())
        if args.side == "ours":
            result = run_ours(assets, workload, args.warmup, args.steps)
        else:
            checkpointing = (args.trl_gradient_checkpointing or ("on" if torch.cuda.is_available() else "off")) == "on"
            result = run_trl(assets, workload, args.warmup, args.steps, out, checkpointing)
        (out / f"{args.side}.json").write_text(json.dumps(result, indent=2) + "\n")
        return

    if not torch.cuda.is_available() and not args.tiny:
        print("no CUDA device: the 1.7B step would take hours on a CPU; running anyway (use --tiny for a smoke test)",
              file=sys.stderr)
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    dtype_name = "bfloat16" if torch.cuda.is_available() else "float32"
    assets = prepare(out, workload, args.warmup + args.steps, dtype_name)
    (out / "assets.json").write_text(json.dumps(assets))
    flops = model_flops(workload)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else bf16_peak(device_name)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results = {"device": device_name, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "workload": asdict(workload),
               "model_flops_per_step": flops, "peak_flops": peak, "torch": torch.__version__}
    for side in ("ours", "trl") if args.trl else ("ours",):
        command = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--out", args.out,
                   "--steps", str(args.steps), "--warmup", str(args.warmup)]
        command += ["--tiny"] if args.tiny else []
        command += ["--threads", str(args.threads)] if args.threads else []
        if args.trl_gradient_checkpointing:
            command += ["--trl-gradient-checkpointing", args.trl_gradient_checkpointing]
        finished = subprocess.run(command, env=env, cwd=REPO)
        if finished.returncode != 0:
            results[side] = {"error": f"exit code {finished.returncode}"}
            continue
        result = json.loads((out / f"{side}.json").read_text())
        total = flops["rollout"] + flops["training"]
        result["mfu"] = total / (result["step_s"] * peak) if peak else None
        results[side] = result
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    print(f"\n{device_name}, {dtype_name}; workload {asdict(workload)}")
    print(f"{'':28}" + "".join(f"{side:>14}" for side in ("ours", "trl") if side in results))
    rows = (("step_s", "step time (s)", 1), ("rollout_tokens_per_s", "rollout tokens/s", 1),
            ("train_tokens_per_s", "training tokens/s", 1), ("peak_memory_mib", "peak memory (MiB)", 1),
            ("mfu", "MFU (%)", 100))
    for key, label, scale in rows:
        cells = []
        for side in ("ours", "trl"):
            if side in results:
                value = results[side].get(key)
                cells.append(f"{value * scale:14.2f}" if isinstance(value, (int, float)) else f"{'n/a':>14}")
        print(f"{label:28}" + "".join(cells))
    if "trl" in results and "step_s" in results["trl"]:
        print(f"\nspeedup (TRL step time / our step time): {results['trl']['step_s'] / results['ours']['step_s']:.2f}")


if __name__ == "__main__":
    main()
