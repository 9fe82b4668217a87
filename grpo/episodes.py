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

**Rollout.**  Episodes run in chunks of --rollout-batch-prompts tasks (G episodes each), every
episode of a chunk one row of one KV cache kept from turn to turn (`grpo.episode_cache`, the
default; --no-episode-cache re-prefills each episode's whole sequence every turn through
`grpo.rollout.generate`, which samples the same tokens up to float rounding).  Turn 0's G
identical prompts are separate rows (a prefill per episode, one code path).  Each turn samples
with the stop tokens and stop sequences of the per-turn rollout and --max-new-tokens per turn,
and runs only what each live episode gained since its last turn: the turn's last sampled token
(never fed during decoding) and the environment's segment.  The sampled text (final stop token
dropped) is read by `rewards.parse.parse`: a closed tool call becomes `{"name", "arguments"}`, an
answer its text, anything else `None`, which the environment counts as unparseable; the model is
then shown the environment's error (`{"error": "could not parse an action"}`) as a tool result
and the episode goes on.  Every other message (tool results, refusals, the user's replies) is
appended as token ids built once (`grpo/episode_tokens.py`: sampled tokens are kept as sampled
and never re-rendered, so earlier think blocks stay in the sequence verbatim, and the model sees
its own earlier reasoning).

**Ends** when the environment is done (the user is satisfied, or --max-turns actions were taken),
or when the next turn might not fit --max-episode-tokens: a turn is sampled only if the sequence
plus --max-new-tokens fits, and an environment message that would leave no such room is not
appended.  Those episodes are counted as truncated (`episode/truncated_share`).  Tasks whose first
prompt leaves no room for one turn are skipped when the task list is built (and counted in the log).

**Randomness.**  Episode g of the task at position p of step s draws every sampled token, turn
after turn, from its own generator, seeded from derived_seed(seed, s, p, g): nothing depends on
what ran before (a resumed run samples what the uninterrupted run sampled), nor on which episodes
share its rollout chunk or process (--rollout-batch-prompts and torchrun change only float
rounding).

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

Several processes (torchrun): as for per-turn GRPO, each rank takes a contiguous share of the
step's tasks, rolls out and scores their episodes, all-gathers the rewards for the advantages,
and sums its gradients with the others'; the metrics are sums over ranks.  With tasks per rank a
multiple of --rollout-batch-prompts, N processes sample what one samples.

Not yet: --oversample.
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
from grpo import distributed
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
    generator: torch.Generator  # this episode's own stream, drawn from in every turn
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
    from data.render import stop_token_ids

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
    for offset, task in enumerate(chunk):
        for index in range(group_size):
            env = Environment(max_turns=config.max_turns)
            if env.reset(task.task).user != task.opening:
                raise RuntimeError(f"task {task.task.id}: the environment opened with another message than the prompt")
            prompt = list(task.prompt_ids)
            if len(prompt) + config.max_new_tokens > config.max_episode_tokens:  # build_tasks skips these
                raise ValueError(f"task {task.task.id}: first prompt of {len(prompt)} tokens + --max-new-tokens "
                                 f"{config.max_new_tokens} > --max-episode-tokens {config.max_episode_tokens}")
            row = EpisodeRollout(task.task.id, len(prompt), prompt, [0] * len(prompt), [0.0] * len(prompt))
            generator = torch.Generator(device="cpu").manual_seed(derived_seed(config.seed, step, position + offset, index))
            items.append(_Live(task, env, row, generator))
    pad_id = pad_token_id(tokenizer, stops[0])
    with distributed.gathered_for_rollout(policy.model):  # FSDP: ranks run different numbers of passes
        if config.episode_cache:
            _sample_turns_cached(policy, items, config, step, position, sampling, stops, pad_id)
        else:
            _sample_turns(policy, items, config, step, position, sampling, stops, pad_id)
    for item in items:
        item.episode.record = item.env.episode()
    return [item.episode for item in items]


def _sample_turns(policy: Policy, items: list[_Live], config: GRPOConfig, step: int, position: int,
                  sampling: SamplingConfig, stops: list[int], pad_id: int) -> None:
    """Every turn of the chunk's episodes, each turn one `generate` call that prefills every live
    episode's whole sequence again (--no-episode-cache)."""
    from data.render import stop_sequences

    tokenizer, turn = policy.tokenizer, 0
    while live := [item for item in items if not item.finished]:
        rollout, _ = generate(policy.model, [item.episode.input_ids for item in live], sampling,
                              pad_token_id=pad_id, stop_token_ids=stops, stop_sequences=stop_sequences(tokenizer),
                              generator=[item.generator for item in live])
        for row, item in enumerate(live):
            mask = rollout.completion_mask[row, 0].bool()
            _take_turn(item, rollout.completion_ids[row, 0][mask].tolist(),
                       rollout.sampling_logprobs[row, 0][mask].tolist(), bool(rollout.finished[row, 0]), turn,
                       tokenizer, stops, config)
        turn += 1


def _sample_turns_cached(policy: Policy, items: list[_Live], config: GRPOConfig, step: int, position: int,
                         sampling: SamplingConfig, stops: list[int], pad_id: int) -> None:
    """Every turn of the chunk's episodes with one KV cache kept across turns (`grpo.episode_cache`):
    each turn runs only the tokens added since the last (the final sampled token, never fed, and
    the environment's segment).  Samples what `_sample_turns` samples, up to float rounding."""
    from data.render import stop_sequences
    from grpo.episode_cache import EpisodeCache, decode_turn
    from grpo.hf_compat import causal_lm_of
    from grpo.lora_fold import rollout_mode

    causal_lm = causal_lm_of(policy.model)
    if not EpisodeCache.supports(causal_lm):
        raise ValueError(f"{type(causal_lm).__name__} has sliding-window attention: the episode KV cache cannot "
                         "keep padded turns in it; use --no-episode-cache")
    tokenizer, turn = policy.tokenizer, 0
    live = list(items)
    cached = [0] * len(items)  # tokens of each live episode already in the cache
    with rollout_mode(policy.model, fold_lora=sampling.merge_lora), torch.inference_mode():
        cache = EpisodeCache(causal_lm, len(live), pad_id)
        while live:
            logits = cache.extend([item.episode.input_ids[done:] for item, done in zip(live, cached)])
            cached = [len(item.episode.input_ids) for item in live]
            turns, logprobs, finished = decode_turn(cache, logits, sampling, stop_token_ids=stops,
                                                    stop_sequences=stop_sequences(tokenizer),
                                                    generator=[item.generator for item in live])
            for item, sampled, token_logprobs, stopped in zip(live, turns, logprobs, finished):
                _take_turn(item, sampled, token_logprobs, stopped, turn, tokenizer, stops, config)
            # The decode fed every sampled token but the last of each turn.
            cached = [done + max(len(sampled) - 1, 0) for done, sampled in zip(cached, turns)]
            keep = [row for row, item in enumerate(live) if not item.finished]
            cache.keep(torch.tensor(keep, dtype=torch.long))
            live, cached = [live[row] for row in keep], [cached[row] for row in keep]
            turn += 1


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
                    rollout_time: float, context: Distributed = SINGLE) -> dict[str, Any]:
    """Success rate, turns, invalid actions, refused policy violations, tokens, truncation, rewards:
    sums (and maxima) over every rank's episodes; `rewards` [B, G] is already the whole step's."""
    records = [episode.record for episode in episodes]
    sampled = [sum(episode.loss_mask) for episode in episodes]
    turns = [finished for episode in episodes for finished in episode.turn_finished]
    results = [result for turns_scored in scored for result in turns_scored]
    local_sums: dict[str, float] = {
        "episodes": len(episodes), "success": sum(record.success for record in records),
        "turns": sum(record.turns for record in records),
        "invalid": sum(record.invalid_actions for record in records),
        "violations": sum(record.policy_violations for record in records),
        "tokens": sum(len(episode.input_ids) for episode in episodes),
        "truncated": sum(episode.truncated for episode in episodes),
        "user_done": sum(record.user_done for record in records),
        "targets": sum(target is not None for episode in episodes for target in episode.turn_targets),
        "sampled_turns": len(turns), "unfinished_turns": sum(not finished for finished in turns),
        "sampled": sum(sampled),
    }
    for key in ("accuracy", "format", "length"):
        values = [result.components[key] for result in results if key in result.components]
        local_sums[f"component/{key}"], local_sums[f"component_count/{key}"] = sum(values), len(values)
    sums = distributed.all_reduce_numbers(context, local_sums)
    maxima = distributed.all_reduce_numbers(context, {
        "tokens": max(len(episode.input_ids) for episode in episodes), "sampled": max(sampled),
        "time": rollout_time}, op="max")
    count, sampled_turns = max(sums["episodes"], 1), max(sums["sampled_turns"], 1)
    metrics: dict[str, Any] = {
        **{f"reward/{k.removeprefix('reward_')}": v for k, v in advantage_stats(rewards).items()},
        "success_rate": sums["success"] / count,
        "episode/turns_mean": sums["turns"] / count,
        "episode/invalid_actions_mean": sums["invalid"] / count,
        "episode/policy_violations_mean": sums["violations"] / count,
        "episode/tokens_mean": sums["tokens"] / count,
        "episode/tokens_max": int(maxima["tokens"]),
        "episode/truncated_share": sums["truncated"] / count,
        "episode/user_done_share": sums["user_done"] / count,
        "episode/gold_path_turn_share": sums["targets"] / sampled_turns,
        "completion/length_mean": sums["sampled"] / count,  # sampled tokens per episode
        "completion/length_max": int(maxima["sampled"]),
        "completion/truncated_share": sums["unfinished_turns"] / sampled_turns,  # per turn
        "rollout/tokens": int(sums["sampled"]),
        "rollout/tokens_per_s": sums["sampled"] / max(maxima["time"], 1e-9),
        "time/rollout_s": maxima["time"],
    }
    for key in ("accuracy", "format", "length"):
        if sums[f"component_count/{key}"]:
            metrics[f"reward/{key}"] = sums[f"component/{key}"] / sums[f"component_count/{key}"]
    return metrics


def episode_step(policy: Policy, tasks: list[EpisodeTask], config: GRPOConfig, optimizer: torch.optim.Optimizer | None,
                 *, step: int, reward_fn: RewardFn | None, device: torch.device, first_position: int = 0,
                 context: Distributed = SINGLE, reference_policy: Policy | None = None) -> StepResult:
    """One GRPO step over whole episodes of `tasks` (positions first_position.. of the step's list);
    the arguments and the result are grpo_step's.  optimizer=None stops before the update."""
    episodes, rollout_time = run_episodes(policy, tasks, config, step=step, first_position=first_position)
    local_rewards, scored = episode_rewards(episodes, config, reward_fn)
    # The per-turn step's own: gathered over ranks, the all-non-finite stop, group-normalised advantages.
    rewards, _, advantages = select_and_advantages(local_rewards, config, context, first_position, step)
    pad_id = pad_token_id(policy.tokenizer, policy.tokenizer.eos_token_id)
    batches = episode_batches(episodes, torch.stack([advantages[i] for i in range(len(tasks))]), config.group_size,
                              device, pad_id)
    # dr_grpo's constant normaliser: the longest row the budget allows, not one turn's limit.
    update_config = dataclasses.replace(config, max_new_tokens=config.max_episode_tokens)
    update = {} if optimizer is None else policy_update(policy, batches, update_config, optimizer, context=context,
                                                        reference_policy=reference_policy)
    metrics = {**episode_metrics(episodes, rewards, scored, rollout_time, context), **update}
    return StepResult(batches, rewards, metrics, episode_records(episodes, local_rewards))
