"""GRPO over whole conversations in the synthetic world: tools run, the user is simulated, the task's
success is rewarded, and the per-turn update (`grpo.update.policy_update`) trains it unchanged.

    python -m grpo.train --env synthetic --model tiny --max-steps 2 --prompts-per-step 2 --group-size 2 --max-turns 3
    python -m grpo.train --env synthetic --init runs/default/coldstart/checkpoints/step-000090 \\
        --episode-reward mean_turn --out runs/episodes

One step, `episode_step` (the counterpart of `grpo.step.grpo_step`, called by the same loop):

    tasks (generate_tasks(seed)["train"], in grpo.prompts.prompt_batches order)      build_tasks
      -> G episodes per task, turn by turn: sample, parse, env.step, append     run_episodes
      -> one reward per episode                                                 episode_rewards
      -> advantages [B, G] within each task's G episodes                        grpo.step.select_and_advantages
      -> one training row per episode, loss on sampled tokens only              episode_batches
      -> mu passes of the clipped objective, one AdamW step                     grpo.update.policy_update
      -> metrics                                                                episode_metrics

**Rollout.**  Episodes run in chunks of --rollout-batch-prompts tasks (G episodes each).  At each
turn every live episode of the chunk is one prompt of one `grpo.rollout.generate` call
(group_size=1: turn 0's G identical prompts are separate rows too, which costs a prefill per
episode but keeps one code path), with the stop tokens and stop sequences of the per-turn
rollout and --max-new-tokens per turn.  The sampled text (final stop token dropped) is read by
`rewards.parse.parse`: a closed tool call becomes `{"name", "arguments"}`, an answer its text,
anything else `None`, which the environment counts as unparseable; the model is then shown the
environment's error (`{"error": "could not parse an action"}`) as a tool result and the episode
goes on.  Every other message (tool results, refusals, the user's replies) is appended as token
ids built once (`grpo/episode_tokens.py`: sampled tokens are kept as sampled and never
re-rendered, so earlier think blocks stay in the sequence verbatim, and the model sees its own
earlier reasoning).

**No KV cache across turns.**  Each turn re-prefills each episode's whole sequence (correct, and
simple, but slower than keeping each episode's cache from turn to turn: that is not done yet).

**Ends** when the environment is done (the user is satisfied, or --max-turns actions were taken),
or when the next turn might not fit --max-episode-tokens: a turn is sampled only if the sequence
plus --max-new-tokens fits, and an environment message that would leave no such room is not
appended.  Those episodes are counted as truncated (`episode/truncated_share`).  Tasks whose first
prompt leaves no room for one turn are skipped when the task list is built (and counted in the log).

**Randomness.**  The generate call of turn k of the chunk that starts at task position p of step s
samples with a generator seeded from derived_seed(seed, s, p, k): nothing depends on what ran
before, so a resumed run samples what the uninterrupted run sampled.

**Training view.**  Episode i becomes the row [first prompt | everything after it]: attention mask
1 on every real token (environment tokens included: later turns attend to them), loss mask
(`StepBatch.completion_mask`) 1 only on the tokens the policy sampled.  The first prompts are
left-padded, the rest right-padded; group_size = G, so the shared-prefix forward computes each
task's first prompt once.  `sampling_logprobs` is None (no sampler/trainer gap metric).  For
--loss-type dr_grpo the constant length normaliser is --max-episode-tokens.

**Rewards** (--episode-reward):
* `success` (default): 1 if the task succeeded (tau-bench's rule, `data.synthetic.env`), else 0.
* `mean_turn`: success plus the mean, over the episode's turns that have a gold target, of the
  per-turn composite reward (`rewards.score_batch` through the run's reward function: accuracy +
  format + thinking length, with --w-accuracy, --w-format, --w-length; in [-1, 4] with the
  default weights, so it outweighs success unless the weights are lowered).  Turn k's target is
  the k-th action of the task's scripted (gold) conversation while the episode is on the gold
  path: every earlier action was parseable and left the transcript equal to the gold one
  (tool calls equal as JSON, answers of any wording, but the same tool results and the same
  user replies followed).  From the first turn that leaves it, and past the end of the gold
  actions, turns have no target and are not scored.  Turn 1 always has one.

Evaluation of whole episodes (greedy and sampled success, pass^k) is `eval.episodes`, which calls
`run_episodes` with one episode per task and its own sampling settings.

Not yet: several processes (torchrun), --oversample, KV-cache reuse across turns.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any, Callable

import torch

from data.synthetic.env import Environment, Episode
from grpo.advantages import advantage_stats
from grpo.distributed import SINGLE, Distributed
from grpo.episode_tokens import EpisodeTask, episode_task, message_segment
from grpo.flags import GRPOConfig
from grpo.policy import Policy, pad_token_id
from grpo.rollout import SamplingConfig, generate
from grpo.runtime import derived_seed
from grpo.step import StepResult, rollout_chunks, select_and_advantages
from grpo.update import StepBatch, policy_update

RewardFn = Callable[[list[str], list[dict]], list[Any]]


@dataclasses.dataclass
class EpisodeRollout:
    """One sampled episode: its token row and what happened in it."""

    task_id: str
    prompt_length: int  # P: tokens of the first prompt
    input_ids: list[int]  # [L] the first prompt, then the sampled turns and the environment's segments
    loss_mask: list[int]  # [L] 1 exactly on the tokens the policy sampled
    sampling_logprobs: list[float]  # [L] the log-prob each sampled token was drawn with, 0 elsewhere
    turn_spans: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # [start, end) of each turn
    turn_texts: list[str] = dataclasses.field(default_factory=list)  # what the parser read (stop token dropped)
    turn_finished: list[bool] = dataclasses.field(default_factory=list)  # stopped before --max-new-tokens
    turn_targets: list[dict | None] = dataclasses.field(default_factory=list)  # gold action (None: off the path)
    truncated: bool = False  # ended because the next turn might not fit --max-episode-tokens
    record: Episode | None = None  # the environment's record: success, turns, errors, transcript


@dataclasses.dataclass
class _Live:
    """An episode being sampled: its task, environment and row, and whether it follows the gold script."""

    task: EpisodeTask
    env: Environment
    episode: EpisodeRollout
    on_path: bool = True
    finished: bool = False


def build_tasks(config: GRPOConfig, tokenizer: Any, log: Callable[[str], None] = print) -> list[EpisodeTask]:
    """The training tasks (`generate_tasks(config.seed)["train"]`) with their first prompts; tasks
    whose first prompt leaves no room for one turn in --max-episode-tokens are skipped and counted."""
    from data.synthetic.env import generate_tasks

    tasks = [episode_task(task, tokenizer, format_prompt=config.format_prompt)
             for task in generate_tasks(config.seed)["train"]]
    kept = [task for task in tasks if len(task.prompt_ids) + config.max_new_tokens <= config.max_episode_tokens]
    lengths = sorted(len(task.prompt_ids) for task in tasks)
    log(f"env synthetic: {len(tasks)} training tasks (generate_tasks(seed={config.seed})['train']; --data is not "
        f"used), first prompts of {lengths[0]}-{lengths[-1]} tokens; {len(tasks) - len(kept)} skipped: first prompt "
        f"+ --max-new-tokens {config.max_new_tokens} > --max-episode-tokens {config.max_episode_tokens}")
    if not kept:
        raise SystemExit(f"--max-episode-tokens {config.max_episode_tokens}: no task's first prompt leaves room for "
                         f"one turn of --max-new-tokens {config.max_new_tokens} (shortest prompt: {lengths[0]} tokens)")
    return kept


# ----------------------------------------------------------------------------------------------
# Rollout
# ----------------------------------------------------------------------------------------------


def run_episodes(policy: Policy, tasks: list[EpisodeTask], config: GRPOConfig, *, step: int, first_position: int = 0,
                 episodes_per_task: int | None = None, sampling: SamplingConfig | None = None
                 ) -> tuple[list[EpisodeRollout], float]:
    """G episodes per task, task-major (task i's at i*G .. i*G + G-1), and the sampling time in seconds.

    G is config.group_size unless `episodes_per_task` is given; each turn samples with the
    config's temperature / top-p / top-k unless `sampling` (one completion per prompt: group_size
    1) replaces them.  Evaluation (`eval.episodes`) passes both: 1 episode per task, greedy or not."""
    episodes, elapsed = [], 0.0
    group_size = episodes_per_task or config.group_size
    for start, end in rollout_chunks(first_position, first_position + len(tasks), config.rollout_batch_prompts):
        began = time.perf_counter()
        episodes += _run_chunk(policy, tasks[start - first_position:end - first_position], config, step, start,
                               group_size, sampling)
        elapsed += time.perf_counter() - began
    return episodes, elapsed


def _run_chunk(policy: Policy, chunk: list[EpisodeTask], config: GRPOConfig, step: int, position: int,
               group_size: int, sampling: SamplingConfig | None) -> list[EpisodeRollout]:
    from data.render import stop_sequences, stop_token_ids

    tokenizer = policy.tokenizer
    stops = stop_token_ids(tokenizer)
    sampling = sampling or SamplingConfig(group_size=1, max_new_tokens=config.max_new_tokens,
                                          temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                                          min_new_tokens=config.min_new_tokens)
    if sampling.group_size != 1 or sampling.max_new_tokens != config.max_new_tokens:
        raise ValueError(f"sampling: each episode is one prompt of a turn's generate call (group_size 1, got "
                         f"{sampling.group_size}) whose budget is --max-new-tokens {config.max_new_tokens} (got "
                         f"{sampling.max_new_tokens})")
    items: list[_Live] = []
    for task in chunk:
        for _ in range(group_size):
            env = Environment(max_turns=config.max_turns)
            if env.reset(task.task).user != task.opening:
                raise RuntimeError(f"task {task.task.id}: the environment opened with another message than the prompt")
            prompt = list(task.prompt_ids)
            if len(prompt) + config.max_new_tokens > config.max_episode_tokens:  # build_tasks skips these
                raise ValueError(f"task {task.task.id}: first prompt of {len(prompt)} tokens + --max-new-tokens "
                                 f"{config.max_new_tokens} > --max-episode-tokens {config.max_episode_tokens}")
            row = EpisodeRollout(task.task.id, len(prompt), prompt, [0] * len(prompt), [0.0] * len(prompt))
            items.append(_Live(task, env, row))
    turn = 0
    while live := [item for item in items if not item.finished]:
        generator = torch.Generator(device="cpu").manual_seed(derived_seed(config.seed, step, position, turn))
        rollout, _ = generate(policy.model, [item.episode.input_ids for item in live], sampling,
                              pad_token_id=pad_token_id(tokenizer, stops[0]), stop_token_ids=stops,
                              stop_sequences=stop_sequences(tokenizer), generator=generator)
        for row, item in enumerate(live):
            mask = rollout.completion_mask[row, 0].bool()
            _take_turn(item, rollout.completion_ids[row, 0][mask].tolist(),
                       rollout.sampling_logprobs[row, 0][mask].tolist(), bool(rollout.finished[row, 0]), turn,
                       tokenizer, stops, config)
        turn += 1
    for item in items:
        item.episode.record = item.env.episode()
    return [item.episode for item in items]


def _take_turn(item: _Live, sampled: list[int], logprobs: list[float], finished: bool, turn: int, tokenizer: Any,
               stops: list[int], config: GRPOConfig) -> None:
    """Append a sampled turn, let the environment act on it, append its message (or end the episode)."""
    from rewards.parse import parse

    episode, env = item.episode, item.env
    start = len(episode.input_ids)
    episode.input_ids += sampled
    episode.loss_mask += [1] * len(sampled)
    episode.sampling_logprobs += logprobs
    episode.turn_spans.append((start, len(episode.input_ids)))
    ended_on = sampled[-1] if sampled and sampled[-1] in stops else None
    text = tokenizer.decode(sampled[:-1] if ended_on is not None else sampled, skip_special_tokens=False)
    episode.turn_texts.append(text)
    episode.turn_finished.append(finished)
    gold = item.task.gold_targets
    episode.turn_targets.append(gold[turn] if item.on_path and turn < len(gold) else None)

    parsed = parse(text)
    action = parsed.call if parsed.kind == "tool_call" else parsed.answer if parsed.kind == "answer" else None
    before = len(env.transcript)
    result = env.step(action)
    item.on_path = item.on_path and action is not None and _follows_gold(env.transcript[before:],
                                                                          item.task.task.gold[before:])
    if result.done:
        item.finished = True
        return
    role = result.role or "observation"  # an unparseable action: the environment's error, as a tool result
    segment = message_segment(tokenizer, item.task, role, result.text or "", last_sampled=ended_on,
                              tool_name=action["name"] if isinstance(action, dict) else None)
    if len(episode.input_ids) + len(segment) + config.max_new_tokens > config.max_episode_tokens:
        episode.truncated = item.finished = True
        return
    episode.input_ids += segment
    episode.loss_mask += [0] * len(segment)
    episode.sampling_logprobs += [0.0] * len(segment)


def _follows_gold(entries: list[dict[str, str]], gold: tuple[dict[str, str], ...] | list) -> bool:
    """Whether the transcript entries a turn added equal the gold conversation's at the same places:
    the same speakers; tool calls equal as JSON; tool results and user replies equal; answers in any words."""
    from rewards.parse import json_equal

    if not entries or len(entries) > len(gold):
        return False
    for entry, expected in zip(entries, gold):
        if entry["from"] != expected["from"]:
            return False
        if entry["from"] == "function_call":
            if not json_equal(json.loads(entry["value"]), json.loads(expected["value"])):
                return False
        elif entry["from"] != "gpt" and entry["value"] != expected["value"]:
            return False
    return True


# ----------------------------------------------------------------------------------------------
# Rewards, training rows, metrics
# ----------------------------------------------------------------------------------------------


def episode_rewards(episodes: list[EpisodeRollout], config: GRPOConfig, reward_fn: RewardFn | None
                    ) -> tuple[torch.Tensor, list[list[Any]]]:
    """Rewards [B, G] (see the module docstring), and each episode's per-turn reward results
    (empty lists with --episode-reward success; one per turn that has a target, in turn order)."""
    success = [float(episode.record.success) for episode in episodes]
    scored: list[list[Any]] = [[] for _ in episodes]
    if config.episode_reward == "mean_turn":
        pairs = [(index, text, target) for index, episode in enumerate(episodes)
                 for text, target in zip(episode.turn_texts, episode.turn_targets) if target is not None]
        results = reward_fn([text for _, text, _ in pairs], [target for _, _, target in pairs]) if pairs else []
        for (index, _, _), result in zip(pairs, results):
            scored[index].append(result)
        success = [value + _mean([result.total for result in turns]) for value, turns in zip(success, scored)]
    return torch.tensor(success, dtype=torch.float32).view(-1, config.group_size), scored


def _mean(values: list[float]) -> float:
    """Mean of the finite values (NaN when there is none: the episode is then unscored)."""
    finite = [value for value in values if math.isfinite(value)]
    return sum(finite) / len(finite) if finite else math.nan


def episode_batches(episodes: list[EpisodeRollout], advantages: torch.Tensor, group_size: int,
                    device: torch.device, pad_id: int) -> list[StepBatch]:
    """The step's episodes as one StepBatch of [first prompt | everything after it] rows: attention
    on every real token, loss (completion_mask) on sampled tokens only; advantages [B, G]."""
    prompt_width = max(episode.prompt_length for episode in episodes)
    rest_width = max(len(episode.input_ids) - episode.prompt_length for episode in episodes)
    rows = len(episodes)
    input_ids = torch.full((rows, prompt_width + rest_width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((rows, prompt_width + rest_width), dtype=torch.long)
    completion_mask = torch.zeros((rows, rest_width), dtype=torch.float32)
    for row, episode in enumerate(episodes):
        prompt, rest = episode.input_ids[:episode.prompt_length], episode.input_ids[episode.prompt_length:]
        input_ids[row, prompt_width - len(prompt):prompt_width] = torch.tensor(prompt)
        input_ids[row, prompt_width:prompt_width + len(rest)] = torch.tensor(rest, dtype=torch.long)
        attention_mask[row, prompt_width - len(prompt):prompt_width + len(rest)] = 1
        completion_mask[row, :len(rest)] = torch.tensor(episode.loss_mask[episode.prompt_length:], dtype=torch.float32)
    return [StepBatch(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                      completion_mask=completion_mask.to(device), advantages=advantages.flatten().to(device),
                      prompt_length=prompt_width, group_size=group_size, sampling_logprobs=None)]


def episode_records(episodes: list[EpisodeRollout], rewards: torch.Tensor) -> list[dict[str, Any]]:
    """One JSON-ready record per episode (what samples.jsonl shows)."""
    return [{"task_id": episode.task_id, "reward": float(reward), "success": episode.record.success,
             "turns": episode.record.turns, "truncated": episode.truncated, "tokens": len(episode.input_ids),
             "sampled_tokens": sum(episode.loss_mask), "errors": {k: v for k, v in episode.record.errors.items() if v},
             "texts": list(episode.turn_texts)}
            for episode, reward in zip(episodes, rewards.flatten().tolist())]


def episode_metrics(episodes: list[EpisodeRollout], rewards: torch.Tensor, scored: list[list[Any]],
                    rollout_time: float) -> dict[str, Any]:
    """Success rate, turns, invalid actions, refused policy violations, tokens, truncation, rewards."""
    count = len(episodes)
    records = [episode.record for episode in episodes]
    sampled = [sum(episode.loss_mask) for episode in episodes]
    turns = [finished for episode in episodes for finished in episode.turn_finished]
    targets = sum(target is not None for episode in episodes for target in episode.turn_targets)
    metrics: dict[str, Any] = {
        **{f"reward/{k.removeprefix('reward_')}": v for k, v in advantage_stats(rewards).items()},
        "success_rate": sum(record.success for record in records) / count,
        "episode/turns_mean": sum(record.turns for record in records) / count,
        "episode/invalid_actions_mean": sum(record.invalid_actions for record in records) / count,
        "episode/policy_violations_mean": sum(record.policy_violations for record in records) / count,
        "episode/tokens_mean": sum(len(episode.input_ids) for episode in episodes) / count,
        "episode/tokens_max": max(len(episode.input_ids) for episode in episodes),
        "episode/truncated_share": sum(episode.truncated for episode in episodes) / count,
        "episode/user_done_share": sum(record.user_done for record in records) / count,
        "episode/gold_path_turn_share": targets / max(len(turns), 1),
        "completion/length_mean": sum(sampled) / count,  # sampled tokens per episode
        "completion/length_max": max(sampled),
        "completion/truncated_share": sum(not finished for finished in turns) / max(len(turns), 1),  # per turn
        "rollout/tokens": sum(sampled),
        "rollout/tokens_per_s": sum(sampled) / max(rollout_time, 1e-9),
        "time/rollout_s": rollout_time,
    }
    results = [result for turns_scored in scored for result in turns_scored]
    for key in ("accuracy", "format", "length"):
        values = [result.components[key] for result in results if key in result.components]
        if values:
            metrics[f"reward/{key}"] = sum(values) / len(values)
    return metrics


def episode_step(policy: Policy, tasks: list[EpisodeTask], config: GRPOConfig, optimizer: torch.optim.Optimizer | None,
                 *, step: int, reward_fn: RewardFn | None, device: torch.device, first_position: int = 0,
                 context: Distributed = SINGLE, reference_policy: Policy | None = None) -> StepResult:
    """One GRPO step over whole episodes of `tasks` (positions first_position.. of the step's list);
    the arguments and the result are grpo_step's.  optimizer=None stops before the update."""
    if context.world_size > 1:
        raise ValueError("episode_step runs in one process (--env synthetic is refused under torchrun)")
    episodes, rollout_time = run_episodes(policy, tasks, config, step=step, first_position=first_position)
    rewards, scored = episode_rewards(episodes, config, reward_fn)
    # The per-turn step's own: the all-non-finite stop, then group-normalised advantages.
    rewards, _, advantages = select_and_advantages(rewards, config, context, first_position, step)
    pad_id = pad_token_id(policy.tokenizer, policy.tokenizer.eos_token_id)
    batches = episode_batches(episodes, torch.stack([advantages[i] for i in range(len(tasks))]), config.group_size,
                              device, pad_id)
    # dr_grpo's constant normaliser: the longest row the budget allows, not one turn's limit.
    update_config = dataclasses.replace(config, max_new_tokens=config.max_episode_tokens)
    update = {} if optimizer is None else policy_update(policy, batches, update_config, optimizer, context=context,
                                                        reference_policy=reference_policy)
    metrics = {**episode_metrics(episodes, rewards, scored, rollout_time), **update}
    return StepResult(batches, rewards, metrics, episode_records(episodes, rewards))
