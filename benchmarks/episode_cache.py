"""Episode rollout with the KV cache kept across turns against re-prefilling every turn, side by side.

    python benchmarks/episode_cache.py                                  # the tiny default model
    python benchmarks/episode_cache.py --init runs/default/coldstart    # a trained checkpoint
    python benchmarks/episode_cache.py --init runs/smollm2/coldstart --format-prompt --tasks 2 --group-size 4

The work: `grpo.episodes.run_episodes` on the first --tasks synthetic training tasks, --group-size
episodes each, one rollout chunk, --max-turns / --max-new-tokens / --max-episode-tokens as in
training, sampling at temperature 1 with a fixed seed; once with `episode_cache=True` (the
default: one KV cache per chunk, each turn runs only the tokens added since the last) and once
with `episode_cache=False` (each turn one `grpo.rollout.generate` call that prefills every live
episode's whole sequence again).  The two sides alternate for --repeats rounds, in one process,
the same LoRA policy; reported: the median seconds per rollout, sampled tokens per second, the
token positions each side ran through the model, and whether both sampled the same tokens.
The last line is `speedup (re-prefill time / cached time): X.XX`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny (random weights, the default pipeline's shape), "
                                                        "smollm2, a folder or a hub name")
    parser.add_argument("--init", default=None, help="a checkpoint (run directory or step folder) instead of --model")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-turns", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-episode-tokens", type=int, default=2048)
    parser.add_argument("--format-prompt", action="store_true",
                        help="state the output format in the system prompt (as --preset smollm2 trains; on for --model smollm2)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default="runs/bench-episode-cache")
    args = parser.parse_args()

    import torch

    from data.synthetic.env import generate_tasks
    from grpo.episode_tokens import episode_task
    from grpo.episodes import run_episodes
    from grpo.flags import GRPOConfig
    from grpo.models import resolve_model
    from grpo.policy import LoraSettings, load_policy
    from grpo.runtime import auto_dtype

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    workdir = Path(args.workdir)
    if args.init:
        from grpo.checkpoint import latest_checkpoint

        init = Path(args.init)
        policy = load_policy(init=latest_checkpoint(init) or init, lora=LoraSettings())
    elif args.model == "tiny":
        from grpo.tiny import TinyModelConfig, prepare_tiny_base

        base = prepare_tiny_base(workdir / "tiny", seed=0, vocab_size=2048, model_config=TinyModelConfig(
            hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=384))
        policy = load_policy(base=str(base), lora=LoraSettings())
    else:
        base = resolve_model(args.model, folder=workdir / "base-model")
        policy = load_policy(base=str(base), lora=LoraSettings(), dtype=auto_dtype("cpu"))
    tasks = generate_tasks(0)["train"][:args.tasks]
    made = [episode_task(task, policy.tokenizer, format_prompt=args.format_prompt or args.model == "smollm2") for task in tasks]
    settings = dict(env="synthetic", group_size=args.group_size, prompts_per_step=args.tasks,
                    rollout_batch_prompts=args.tasks, max_turns=args.max_turns, max_new_tokens=args.max_new_tokens,
                    max_episode_tokens=args.max_episode_tokens, seed=0)
    model_calls: dict[str, int] = {}
    positions = {"cached": 0, "re-prefill": 0}
    side = {"name": ""}

    def count(module, inputs, kwargs):
        ids = kwargs.get("input_ids", inputs[0] if inputs else None)
        if ids is not None:
            positions[side["name"]] += ids.numel()
        model_calls[side["name"]] = model_calls.get(side["name"], 0) + 1

    from grpo.hf_compat import causal_lm_of

    causal_lm_of(policy.model).register_forward_pre_hook(count, with_kwargs=True)
    times: dict[str, list[float]] = {"cached": [], "re-prefill": []}
    tokens: dict[str, int] = {}
    samples: dict[str, list[list[int]]] = {}
    for round_ in range(args.repeats):
        order = ["cached", "re-prefill"] if round_ % 2 == 0 else ["re-prefill", "cached"]
        for name in order:
            side["name"] = name
            positions[name] = 0
            began = time.perf_counter()
            episodes, _ = run_episodes(policy, made, GRPOConfig(**settings, episode_cache=name == "cached"), step=0)
            times[name].append(time.perf_counter() - began)
            tokens[name] = sum(sum(episode.loss_mask) for episode in episodes)
            samples[name] = [episode.input_ids for episode in episodes]
            turns = sum(len(episode.turn_spans) for episode in episodes)
            print(f"round {round_ + 1} {name}: {times[name][-1]:.1f} s, {tokens[name]} sampled tokens, "
                  f"{turns} turns, {positions[name]} token positions through the model", flush=True)
    same = samples["cached"] == samples["re-prefill"]
    print(f"\n| side | median s | sampled tokens/s | token positions run |\n|:---|---:|---:|---:|")
    for name in ("cached", "re-prefill"):
        median = statistics.median(times[name])
        print(f"| {name} | {median:.2f} | {tokens[name] / median:.1f} | {positions[name]} |")
    print(f"\nsame sampled episodes on both sides: {same}")
    print(f"speedup (re-prefill time / cached time): "
          f"{statistics.median(times['re-prefill']) / statistics.median(times['cached']):.2f}")


if __name__ == "__main__":
    main()
