"""Evaluation of whole episodes in the synthetic world: does the policy finish the user's task, and reliably?

    python -m eval.episodes --checkpoint coldstart=runs/default/coldstart --checkpoint rl=runs/episodes \\
        --out runs/eval                                     # test and ood_test, 200 tasks each, k = 4
    python -m eval.episodes --checkpoint rl=runs/episodes --tasks 50 --k 8 --temperature 0.7 --splits test
    python -m eval.episodes --checkpoint base --model smollm2 --format-prompt --tasks 20 --out runs/eval-smollm2

`eval.run` scores one action at a time on the gold history.  Here the policy holds the whole
conversation, as in tau-bench and in `python -m grpo.train --env synthetic`: for every task of a
split (`data.synthetic.env.generate_tasks(--seed)[split]`, the first --tasks of them) it acts, the
tools run on the task's database, the scripted user answers, until the user is done or
--max-turns actions were taken; the task succeeds when the final database is the gold one and
every required output was said (tau-bench's rule, `data.synthetic.env`).

The episodes are rolled out by training's own code, `grpo.episodes.run_episodes` (the same first
prompt, token segments, parser, environment and --max-episode-tokens budget), with one episode
per task per pass:

* **greedy**: one pass, argmax at every token (`SamplingConfig(greedy=True)`, as `eval.run`).
* **sampled**: --k passes at --temperature (top-p, top-k), the policy GRPO optimises.  In pass j
  the episode of task i draws every token from its own generator, seeded from
  derived_seed(--seed, j, i, 0) (`grpo.runtime`): the same flags give the same transcripts,
  passes differ from each other, and an episode does not depend on which tasks share its batch.
  --batch-size changes only float rounding (which can flip a sampled token on a real model).

Reported per checkpoint and split (`eval.episode_metrics`): greedy success and sampled success
(pass^1), each ± its standard error over tasks; tau-bench's pass^k for k = 1..--k (the chance
that k sampled episodes of a task all succeed, unbiased estimator C(c,k)/C(n,k)); per episode:
turns, invalid actions, refused policy violations, tokens, truncated share.  With two or more
checkpoints, each minus the one listed before it on the same tasks (paired per-task difference).
Also per split: the *trivial* tasks (no change to the database, no required output: 7 of the 200
test tasks and 12 of the 200 ood_test tasks for seed 0), which a policy that does nothing passes;
their share is a floor under every success rate, not skill.

Writes into --out/episodes/:
    results.json                              the config, every summary, the paired differences
    results.md                                one table per split (and its paired differences)
    episodes-<checkpoint>-<split>.jsonl       one line per episode: mode (greedy / sampled), episode
                                              index, task id, success, turns, errors, the model's
                                              outputs as sampled and the transcript

--seed is also the synthetic world's seed: evaluate a run with the seed it was trained with.
--checkpoint and --model read as in `eval.run` (NAME=PATH pairs; PATH a checkpoint, a run
directory, a model folder or hub name, or `base` for --model).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from eval.episode_metrics import paired_success, results_markdown, summarize
from eval.run import gather_list_flags, load_for_eval, parse_checkpoints, resolve_model_path, safe_name, split_list
from grpo.config import check_ranges, config_to_dict, field, parse_config


@dataclasses.dataclass
class EpisodeEvalConfig:
    """Every knob of a whole-episode evaluation (one flag each; see the module docstring)."""

    checkpoint: str = field("", "NAME=PATH pairs to evaluate (repeat the flag or separate with commas); "
                                "PATH 'base' means --model")
    model: str | None = field(None, "the plain model evaluated for PATH 'base': hub name, folder, .gguf file or 'smollm2'")
    splits: str = field("test,ood_test", "synthetic splits whose tasks are run (generate_tasks(--seed)): test, "
                                         "ood_test, train, coldstart; comma-separated")
    tasks: int = field(0, "run the first N tasks of each split (0: all)")
    k: int = field(4, "sampled episodes per task (pass^1..pass^k; 0: greedy only)")
    greedy: bool = field(True, "also run one greedy episode per task (--no-greedy: sampled only)")
    temperature: float = field(1.0, "sampling temperature of the sampled episodes")
    top_p: float = field(1.0, "nucleus sampling threshold of the sampled episodes")
    top_k: int = field(0, "top-k sampling of the sampled episodes (0: off)")
    seed: int = field(0, "seed of the synthetic world (the run's --seed) and of the sampled episodes")
    max_turns: int = field(20, "agent actions per episode at most (grpo.train's --max-turns)")
    max_new_tokens: int = field(128, "tokens per turn at most")
    max_episode_tokens: int = field(2048, "tokens per episode, first prompt included; an episode whose next turn "
                                          "might not fit ends and counts as truncated (and, usually, failed)")
    format_prompt: bool = field(False, "end every system prompt with the output-format instructions "
                                       "(data.format.FORMAT_INSTRUCTIONS), as the run trained with")
    batch_size: int = field(16, "episodes decoded together (one generate call per turn over a chunk of tasks)")
    episode_cache: bool = field(True, "keep each episode's KV cache from turn to turn (grpo.train's --episode-cache)")
    out: str = field("runs/eval", "output directory (the files go into OUT/episodes/)")
    device: str = field("auto", "cpu, cuda, cuda:N or auto")
    dtype: str = field("auto", "float32, bfloat16, float16 or auto (bf16 on GPUs and fast-bf16 CPUs: runtime.auto_dtype)")
    threads: int = field(0, "CPU threads for torch (0: torch's default)")
    trust_remote_code: bool = field(False, "allow model repositories to run their own code")
    progress: bool = field(True, "show a progress bar over episodes")

    def __post_init__(self) -> None:
        check_ranges(self, at_least_one=("max_turns", "max_new_tokens", "max_episode_tokens", "batch_size"),
                     non_negative=("tasks", "k", "top_k", "threads"), positive=("temperature",))
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.k == 0 and not self.greedy:
            raise ValueError("--k 0 with --no-greedy runs no episode: give --k N or drop --no-greedy")


def rollout_settings(config: EpisodeEvalConfig) -> Any:
    """The GRPOConfig that `grpo.episodes.run_episodes` reads: the episode budgets, the seed, the
    format prompt, --batch-size tasks per chunk (group_size is unused: one episode per task per pass)."""
    from grpo.flags import GRPOConfig

    return GRPOConfig(env="synthetic", seed=config.seed, max_turns=config.max_turns,
                      max_new_tokens=config.max_new_tokens, max_episode_tokens=config.max_episode_tokens,
                      temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                      format_prompt=config.format_prompt, rollout_batch_prompts=config.batch_size,
                      episode_cache=config.episode_cache)


def passes(config: EpisodeEvalConfig) -> list[tuple[str, int, Any]]:
    """(mode, episode index, SamplingConfig) of every pass over the tasks: greedy first, then --k sampled."""
    from grpo.rollout import SamplingConfig

    greedy = SamplingConfig(group_size=1, max_new_tokens=config.max_new_tokens, greedy=True)
    sampled = SamplingConfig(group_size=1, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                             top_p=config.top_p, top_k=config.top_k)
    return ([("greedy", 0, greedy)] if config.greedy else []) + [("sampled", index, sampled)
                                                                 for index in range(config.k)]


def split_tasks(tasks: Sequence[Any], tokenizer: Any, config: EpisodeEvalConfig) -> tuple[list[Any], list[str]]:
    """The tasks as EpisodeTasks (first prompts rendered with this tokenizer), and the ids of those
    skipped because their first prompt leaves no room for one turn in --max-episode-tokens."""
    from grpo.episode_tokens import episode_task

    made = [episode_task(task, tokenizer, format_prompt=config.format_prompt) for task in tasks]
    fits = [len(task.prompt_ids) + config.max_new_tokens <= config.max_episode_tokens for task in made]
    return ([task for task, fit in zip(made, fits) if fit],
            [task.task.id for task, fit in zip(made, fits) if not fit])


def trivial_tasks(tasks: Sequence[Any]) -> list[str]:
    """Ids of the tasks whose gold database is the start one and that require no output: success
    (database equal, nothing missing) needs no action at all, so every policy that breaks nothing passes them."""
    return [task.id for task in tasks if not task.outputs and task.gold_db == task.start_db]


def episode_record(episode: Any, mode: str, index: int) -> dict[str, Any]:
    """One JSONL line: what happened in an episode (`grpo.episodes.EpisodeRollout`), and its transcript."""
    record = episode.record
    return {"mode": mode, "episode": index, "task_id": episode.task_id, "domain": record.domain,
            "success": record.success, "db_match": record.db_match, "missing_outputs": list(record.missing_outputs),
            "user_done": record.user_done, "turns": record.turns, "invalid_actions": record.invalid_actions,
            "policy_violations": record.policy_violations,
            "errors": {kind: count for kind, count in record.errors.items() if count},
            "truncated": episode.truncated, "tokens": len(episode.input_ids), "sampled_tokens": sum(episode.loss_mask),
            "unfinished_turns": sum(not finished for finished in episode.turn_finished),
            "outputs": list(episode.turn_texts), "transcript": [dict(entry) for entry in record.transcript]}


def run_split(policy: Any, tasks: list[Any], config: EpisodeEvalConfig, *,
              on_chunk: Callable[[int], None] = lambda episodes: None) -> list[dict[str, Any]]:
    """Every episode of one policy on `tasks`: the greedy pass, then the --k sampled passes, each in
    chunks of --batch-size tasks through `grpo.episodes.run_episodes`; one record per episode."""
    from grpo.episodes import run_episodes

    settings = rollout_settings(config)
    records = []
    for mode, index, sampling in passes(config):
        for start in range(0, len(tasks), config.batch_size):
            chunk = tasks[start:start + config.batch_size]
            episodes, _ = run_episodes(policy, chunk, settings, step=index, first_position=start,
                                       episodes_per_task=1, sampling=sampling)
            records += [episode_record(episode, mode, index) for episode in episodes]
            on_chunk(len(chunk))
    return records


def paired_differences(records_of: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, dict[str, Any]]:
    """Per split, each checkpoint minus the one before it (in --checkpoint order), greedy and sampled."""
    paired: dict[str, dict[str, Any]] = {}
    for split, by_name in records_of.items():
        names = list(by_name)
        paired[split] = {
            f"{after} - {before}": {mode: paired_success([r for r in by_name[before] if r["mode"] == mode],
                                                         [r for r in by_name[after] if r["mode"] == mode])
                                    for mode in ("greedy", "sampled")
                                    if any(r["mode"] == mode for r in by_name[before])}
            for before, after in zip(names, names[1:])}
    return paired


def episodes_path(out: Path, checkpoint: str, split: str) -> Path:
    return out / f"episodes-{safe_name(checkpoint)}-{safe_name(split)}.jsonl"


def run_eval(config: EpisodeEvalConfig) -> dict[str, Any]:
    """Run every checkpoint on every split, write the outputs, print the tables; returns results.json's dict."""
    import torch
    from tqdm.auto import tqdm

    from data.synthetic.env import generate_tasks

    if config.threads > 0:
        torch.set_num_threads(config.threads)
    try:
        checkpoints = parse_checkpoints(config.checkpoint, config.model)
        locations = {name: resolve_model_path(path) for name, path in checkpoints.items()}  # all, before any run
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"eval.episodes: {error}") from None
    world = generate_tasks(config.seed)
    splits = split_list(config.splits)
    unknown = [split for split in splits if split not in world]
    if unknown or not splits:
        raise SystemExit(f"eval.episodes: --splits {config.splits!r}: choose among {', '.join(world)}")
    out = Path(config.out) / "episodes"
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()

    results: dict[str, dict[str, Any]] = {split: {} for split in splits}
    records_of: dict[str, dict[str, list[dict[str, Any]]]] = {split: {} for split in splits}
    skipped: dict[str, dict[str, list[str]]] = {split: {} for split in splits}
    chosen = {split: world[split][:config.tasks] if config.tasks else world[split] for split in splits}
    split_info = {split: {"tasks": len(tasks), "trivial_tasks": trivial_tasks(tasks)}
                  for split, tasks in chosen.items()}
    for name, (kind, location) in locations.items():
        loading = time.perf_counter()
        try:
            policy = load_for_eval((kind, location), config)  # reads device, dtype, trust_remote_code
        except (OSError, ValueError) as error:
            raise SystemExit(f"eval.episodes: --checkpoint {name}={checkpoints[name]}: cannot load {location}: "
                             f"{error}") from None
        print(f"[episodes] {name}: loaded {location} in {time.perf_counter() - loading:.1f}s")
        for split in splits:
            tasks, skipped[split][name] = split_tasks(chosen[split], policy.tokenizer, config)
            split_began = time.perf_counter()
            with tqdm(total=len(tasks) * len(passes(config)), desc=f"{name} {split}", unit="episode",
                      disable=not config.progress, dynamic_ncols=True) as bar:
                records = run_split(policy, tasks, config, on_chunk=bar.update)
            records = [{"checkpoint": name, "split": split, **record} for record in records]
            records_of[split][name] = records
            results[split][name] = {mode: summarize([r for r in records if r["mode"] == mode])
                                    for mode in ("greedy", "sampled") if any(r["mode"] == mode for r in records)}
            results[split][name]["skipped_tasks"] = skipped[split][name]
            results[split][name]["time_s"] = time.perf_counter() - split_began
            with episodes_path(out, name, split).open("w") as handle:
                for record in records:
                    handle.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
            print(f"[episodes] {name} {split}: {len(tasks)} tasks ({len(skipped[split][name])} skipped: first prompt "
                  f"too long), {len(records)} episodes in {results[split][name]['time_s']:.1f}s")
        del policy  # free this model before the next one is loaded

    summary = {
        "config": config_to_dict(config),
        "checkpoints": checkpoints,
        "loaded": {name: {"as": kind, "location": location} for name, (kind, location) in locations.items()},
        "splits": split_info,
        "results": results,
        "paired": paired_differences(records_of),
        "time_s": time.perf_counter() - began,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False, default=str) + "\n")
    table = results_markdown(results, summary["paired"], k=config.k, temperature=config.temperature,
                             greedy=config.greedy, splits=split_info)
    (out / "results.md").write_text(table)
    print(table)
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    arguments = gather_list_flags(sys.argv[1:] if argv is None else list(argv), flags=("--checkpoint",))
    run_eval(parse_config(EpisodeEvalConfig, arguments, description=__doc__))


if __name__ == "__main__":
    main()
