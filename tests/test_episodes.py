"""Tests of GRPO over whole conversations (grpo/episodes.py, grpo/episode_tokens.py).

The trainer tests' tiny Qwen3 (random weights, 512-token tokenizer without a chat template: the
project's ChatML) samples real episodes; a scripted sampler stands in for `grpo.rollout.generate`
where the actions must be chosen (gold replays, a wrong write, think blocks).  The real Qwen3
tokenizer (../shared) checks the token building under a chat template that strips think blocks.

What is checked: the first prompt is the per-turn pipeline's; an episode's ids are the first prompt,
exactly the sampled ids and the environment's segments, rebuilt independently (no re-tokenization
drift, no re-render), and with gold actions every turn's prompt equals the per-turn render of that
turn; the loss mask is 1 on sampled tokens only; the sampler's log-probs equal a forward over the
training row; earlier think blocks stay verbatim; gold replays succeed (reward 1) and a wrong
write fails (reward 0); the token budget truncates; rewards per turn follow the gold path; a
`--env synthetic` run writes the new metrics and resumes to the uninterrupted run's weights.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

import grpo.episodes as episodes_mod
import grpo.trainer as trainer
from data.format import IM_END, IM_START, TOOL_RESPONSE_CLOSE, TOOL_RESPONSE_OPEN, format_completion
from data.render import end_of_turn_id, render_prompt
from data.samples import make_samples
from data.source_apigen import parse_apigen_rows
from data.synthetic.env import Environment, generate_tasks
from grpo.checkpoint import latest_checkpoint
from grpo.episode_tokens import episode_task
from grpo.episodes import episode_batches, episode_rewards, run_episodes
from grpo.flags import GRPOConfig
from grpo.logprobs import token_logprobs
from grpo.policy import Policy, load_tokenizer
from grpo.rollout import Rollout, left_pad
from grpo.update import _sequence_logprobs
from rewards.score import RewardResult
from tests.conftest import SHARED
from tests.test_grpo_update import lora_policy  # noqa: F401  (the tiny policy with non-zero LoRA B)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

REASONING = "First I verify who the user is, then I look the order up before changing anything."


@pytest.fixture(scope="module")
def tasks():
    return generate_tasks(seed=0, n_train=40, n_test=4, n_ood=4, n_coldstart=100)["train"]


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_base):
    return load_tokenizer(tiny_base)


@pytest.fixture(scope="module")
def qwen3_tokenizer():
    path = SHARED / "tokenizers" / "qwen3"
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"{path} is absent (the real Qwen3 tokenizer lives in ../shared)")
    return load_tokenizer(path)


def config(**overrides: Any) -> GRPOConfig:
    values = dict(env="synthetic", group_size=2, prompts_per_step=2, rollout_batch_prompts=2, max_turns=3,
                  max_new_tokens=6, max_episode_tokens=2000, seed=5)
    values.update(overrides)
    return GRPOConfig(**values)


def gold_conversation(task, reasoning_at: dict[int, str] | None = None):
    """The task's scripted conversation as a Conversation (optionally with reasoning on some actions)."""
    entries, action = [], 0
    for entry in task.gold:
        entry = dict(entry)
        if entry["from"] in ("function_call", "gpt"):
            if reasoning_at and action in reasoning_at:
                entry["reasoning"] = reasoning_at[action]
            action += 1
        entries.append(entry)
    conversations, _ = parse_apigen_rows([{"id": task.id, "system": task.system, "tools": task.tools,
                                           "conversations": entries}])
    return conversations[0]


def gold_sample_prompt(task, tokenizer, turn: int, reasoning_at: dict[int, str] | None = None) -> list[int]:
    """The per-turn pipeline's prompt for the task's action `turn` (gold history)."""
    sample = make_samples([gold_conversation(task, reasoning_at)], strip_reasoning=False)[turn]
    return render_prompt(sample, tokenizer).input_ids


class ScriptedSampler:
    """Stands in for `grpo.rollout.generate`: the completion of each prompt is the script of its task
    at its turn (turn = assistant headers in the prompt - 1), followed by the end-of-turn token."""

    def __init__(self, tokenizer: Any, tasks: list, scripts: dict[str, list[str]]) -> None:
        self.tokenizer, self.tasks, self.scripts = tokenizer, tasks, scripts
        self.calls: list[tuple[list[list[int]], list[list[int]]]] = []  # (prompts, completions) per call

    def __call__(self, model, prompts, config, *, pad_token_id, stop_token_ids, stop_sequences=(), generator=None):
        completions = []
        for prompt in prompts:
            task = next(t for t in self.tasks if list(prompt[:len(t.prompt_ids)]) == t.prompt_ids)
            turn = self.tokenizer.decode(prompt).count(f"{IM_START}assistant") - 1
            script = self.scripts[task.task.id]
            text = script[turn] if turn < len(script) else "<think>\n\n</think>\n\n<answer>Anything else?</answer>"
            completions.append(self.tokenizer.encode(text, add_special_tokens=False)
                               + [end_of_turn_id(self.tokenizer)])
        self.calls.append(([list(p) for p in prompts], completions))
        width = max(len(c) for c in completions)
        ids = torch.full((len(prompts), 1, width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), 1, width), dtype=torch.long)
        for row, completion in enumerate(completions):
            ids[row, 0, :len(completion)], mask[row, 0, :len(completion)] = torch.tensor(completion), 1
        prompt_ids, prompt_mask = left_pad(prompts, pad_token_id)
        return Rollout(prompt_ids, prompt_mask, ids, mask, torch.ones(len(prompts), 1, dtype=torch.bool),
                       torch.zeros(ids.shape, dtype=torch.float32)), {}


def gold_script(episode_task_, reasoning_at: dict[int, str] | None = None) -> list[str]:
    return [format_completion(target, (reasoning_at or {}).get(turn))
            for turn, target in enumerate(episode_task_.gold_targets)]


def scripted_run(monkeypatch, tokenizer, episode_tasks, scripts, **overrides):
    sampler = ScriptedSampler(tokenizer, episode_tasks, scripts)
    monkeypatch.setattr(episodes_mod, "generate", sampler)
    settings = config(**{"max_turns": 30, "max_episode_tokens": 100_000, "rollout_batch_prompts": 4,
                         "episode_cache": False, **overrides})  # the scripted sampler stands in for generate
    policy = Policy(model=None, tokenizer=tokenizer)  # the scripted sampler needs no model
    episodes, _ = run_episodes(policy, episode_tasks, settings, step=0)
    return episodes, sampler, settings


def write_task(tasks):
    """A training task whose script changes an address (the user accepts), and a wrong version of that write."""
    for task in tasks:
        actions = task.gold_actions()
        for index, action in enumerate(actions):
            if isinstance(action, dict) and action["name"] == "change_address":
                wrong = {**action, "arguments": {**action["arguments"], "address": "1 Nowhere Rd, Lakeview"}}
                return task, index, wrong
    pytest.fail("no training task of the fixture changes an address; grow n_train")


# ---------------------------------------------------------------------------------------------
# Tokens: the first prompt, the segments, no drift, no re-render
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("format_prompt", [False, True])
def test_first_prompt_is_the_per_turn_pipelines_prompt(tasks, tiny_tokenizer, format_prompt):
    from data import load_dataset

    conversations, _ = load_dataset("synthetic:train", seed=0)  # the rows the tasks are made from
    for index in (0, 3):
        made = episode_task(tasks[index], tiny_tokenizer, format_prompt=format_prompt)
        conversation = next(c for c in conversations if c.id == tasks[index].id)
        sample = make_samples([conversation], strip_reasoning=True, format_instructions=format_prompt)[0]
        assert made.prompt_ids == render_prompt(sample, tiny_tokenizer).input_ids
        assert ("Output format:" in tiny_tokenizer.decode(made.prompt_ids)) is format_prompt


@pytest.mark.parametrize("tokenizer_name", ["tiny_tokenizer", "qwen3_tokenizer"])
def test_gold_replay_succeeds_with_reward_1_and_a_wrong_write_fails_with_0(
        request, monkeypatch, tasks, tokenizer_name):
    tokenizer = request.getfixturevalue(tokenizer_name)
    task, index, wrong = write_task(tasks)
    made = episode_task(task, tokenizer)
    right = gold_script(made)
    wrong_script = list(right)
    wrong_script[index] = format_completion({"kind": "tool_call", **wrong})
    episodes, _, settings = scripted_run(monkeypatch, tokenizer, [made], {made.task.id: right})
    wrong_episodes, _, _ = scripted_run(monkeypatch, tokenizer, [made], {made.task.id: wrong_script})
    good, bad = episodes[0], wrong_episodes[0]  # G = 2 episodes per task, alike: the script does not sample
    assert good.record.success and good.record.user_done and good.record.turns == len(right)
    assert not bad.record.success and not bad.record.db_match
    assert episode_rewards(episodes, settings, None)[0].tolist() == [[1.0, 1.0]]
    assert episode_rewards(wrong_episodes, settings, None)[0].tolist() == [[0.0, 0.0]]
    # Every gold turn follows the gold path; the wrong write and what follows it do not.
    assert good.turn_targets == made.gold_targets
    assert bad.turn_targets[:index + 1] == made.gold_targets[:index + 1]  # the write itself is scored
    assert all(target is None for target in bad.turn_targets[index + 1:])


def test_with_gold_actions_every_turn_prompt_is_the_per_turn_render(monkeypatch, tasks, tiny_tokenizer):
    """ChatML shows history actions as the model writes them (empty think block), so an episode of
    gold actions is, turn by turn, token for token the per-turn pipeline's prompt: no drift."""
    made = [episode_task(task, tiny_tokenizer) for task in tasks[:3]]
    _, sampler, _ = scripted_run(monkeypatch, tiny_tokenizer, made, {m.task.id: gold_script(m) for m in made})
    checked = 0
    for turn, (prompts, _) in enumerate(sampler.calls):
        for prompt in prompts:
            task = next(m for m in made if prompt[:len(m.prompt_ids)] == m.prompt_ids)
            if turn < len(task.gold_targets):
                assert prompt == gold_sample_prompt(task.task, tiny_tokenizer, turn), (task.task.id, turn)
                checked += 1
    assert checked == 2 * sum(len(m.gold_targets) for m in made)  # G = 2 episodes per task


@pytest.mark.parametrize("tokenizer_name", ["tiny_tokenizer", "qwen3_tokenizer"])
def test_earlier_think_blocks_stay_verbatim(request, monkeypatch, tasks, tokenizer_name):
    tokenizer = request.getfixturevalue(tokenizer_name)
    made = episode_task(tasks[0], tokenizer)
    assert len(made.gold_targets) >= 3
    _, sampler, _ = scripted_run(monkeypatch, tokenizer, [made], {made.task.id: gold_script(made, {0: REASONING})})
    first_turn = sampler.calls[0][1][0]
    third_prompt = sampler.calls[2][0][0]
    start = len(made.prompt_ids)
    assert third_prompt[start:start + len(first_turn)] == first_turn  # the ids as sampled, where sampled
    assert REASONING in tokenizer.decode(third_prompt)
    # A re-render of the same history (the per-turn pipeline, Qwen3's template) drops the reasoning.
    rerender = gold_sample_prompt(tasks[0], tokenizer, 2, reasoning_at={0: REASONING})
    assert REASONING not in tokenizer.decode(rerender)


def test_qwen3_segments_are_the_templates_text(monkeypatch, tasks, qwen3_tokenizer):
    made = episode_task(tasks[0], qwen3_tokenizer)
    episodes, _, _ = scripted_run(monkeypatch, qwen3_tokenizer, [made], {made.task.id: gold_script(made)})
    episode = episodes[0]
    first_end, second_start = episode.turn_spans[0][1], episode.turn_spans[1][0]
    observation = episode.record.transcript[2]["value"]
    assert episode.record.transcript[2]["from"] == "observation"
    # The sampled turn ended with <|im_end|>: the segment goes on from there.
    assert qwen3_tokenizer.decode(episode.input_ids[first_end:second_start]) == (
        f"\n{IM_START}user\n{TOOL_RESPONSE_OPEN}\n{observation}\n{TOOL_RESPONSE_CLOSE}{IM_END}\n{IM_START}assistant\n")


def chatml_segment(tokenizer, role: str, text: str, ended_with_end_of_turn: bool) -> list[int]:
    """The project's ChatML for an environment message and the next assistant header, written out."""
    body = f"\n{TOOL_RESPONSE_OPEN}\n{text}\n{TOOL_RESPONSE_CLOSE}" if role == "observation" else f"\n{text}"
    segment = f"\n{IM_START}user{body}{IM_END}\n{IM_START}assistant\n"
    return tokenizer.encode(segment if ended_with_end_of_turn else IM_END + segment, add_special_tokens=False)


def sampled_episodes(monkeypatch, policy, settings, episode_tasks):
    """Real sampled episodes, with what the sampler returned and what the environment answered."""
    calls, steps = [], {}
    real_generate = episodes_mod.generate

    def spy_generate(*args, **kwargs):
        rollout, metrics = real_generate(*args, **kwargs)
        calls.append(rollout)
        return rollout, metrics

    created: list[Environment] = []

    class SpyEnvironment(Environment):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self)

        def step(self, action):
            result = super().step(action)
            steps.setdefault(id(self), []).append(result)
            return result

    monkeypatch.setattr(episodes_mod, "generate", spy_generate)
    monkeypatch.setattr(episodes_mod, "Environment", SpyEnvironment)
    episodes, _ = run_episodes(policy, episode_tasks, settings, step=3)
    return episodes, calls, [steps.get(id(env), []) for env in created]


def test_episode_ids_are_prompt_sampled_tokens_and_env_segments_and_only_sampled_tokens_get_loss(
        monkeypatch, tasks, tiny_tokenizer, lora_policy):
    settings = config(max_turns=3, max_new_tokens=6, episode_cache=False)  # a generate call per turn, spied on
    made = [episode_task(task, tiny_tokenizer) for task in tasks[:2]]
    episodes, calls, steps = sampled_episodes(monkeypatch, lora_policy, settings, made)
    end_of_turn = end_of_turn_id(tiny_tokenizer)
    # Every sampled turn is followed by one environment step, so the rows of the k-th generate call
    # are, in episode order, the episodes that took more than k steps.
    rows_per_call = [[index for index in range(len(episodes)) if len(steps[index]) > turn]
                     for turn in range(len(calls))]
    expected_ids = [list(made[index // settings.group_size].prompt_ids) for index in range(len(episodes))]
    expected_mask = [[0] * len(ids) for ids in expected_ids]
    messages_seen = 0
    for index, episode in enumerate(episodes):
        for turn, result in enumerate(steps[index]):
            rollout, row = calls[turn], rows_per_call[turn].index(index)
            sampled = rollout.completion_ids[row, 0][rollout.completion_mask[row, 0].bool()].tolist()
            expected_ids[index] += sampled
            expected_mask[index] += [1] * len(sampled)
            if result.done:
                break
            segment = chatml_segment(tiny_tokenizer, result.role or "observation", result.text,
                                     sampled[-1] == end_of_turn)
            if len(expected_ids[index]) + len(segment) + settings.max_new_tokens > settings.max_episode_tokens:
                break
            expected_ids[index] += segment
            expected_mask[index] += [0] * len(segment)
            messages_seen += 1
        assert episode.input_ids == expected_ids[index], index
        assert episode.loss_mask == expected_mask[index], index
        # Every environment message lies in the masked-out part, none in a sampled turn.
        unmasked = tiny_tokenizer.decode([t for t, m in zip(episode.input_ids, episode.loss_mask) if not m])
        for result in steps[index]:
            if result.text is not None and not result.done:
                assert result.text in unmasked
        assert sum(episode.loss_mask[:episode.prompt_length]) == 0
    assert messages_seen >= len(episodes)  # the test saw environment segments between turns


def test_sampler_logprobs_equal_a_forward_over_the_training_row(monkeypatch, tasks, tiny_tokenizer, lora_policy):
    settings = config(max_turns=3, max_new_tokens=6)
    made = [episode_task(task, tiny_tokenizer) for task in tasks[:2]]
    episodes, _ = run_episodes(lora_policy, made, settings, step=1)
    assert all(len(episode.turn_spans) >= 2 for episode in episodes)  # later turns attend to env tokens
    advantages = torch.zeros(len(made), settings.group_size)
    batch, = episode_batches(episodes, advantages, settings.group_size, torch.device("cpu"), pad_id=0)
    with torch.no_grad():
        single = token_logprobs(lora_policy.model, batch.input_ids, batch.attention_mask,
                                completion_start=batch.prompt_length)
        grouped = _sequence_logprobs(lora_policy, batch, 1.0)  # what policy_update computes (shared prefix)
    for row, episode in enumerate(episodes):
        mask = batch.completion_mask[row].bool()
        rest = episode.input_ids[episode.prompt_length:]
        assert mask.sum() == sum(episode.loss_mask) and mask[:len(rest)].tolist() == [
            bool(m) for m in episode.loss_mask[episode.prompt_length:]]
        sampled = torch.tensor(episode.sampling_logprobs[episode.prompt_length:])
        assert torch.allclose(single[row, :len(rest)][mask[:len(rest)]], sampled[mask[:len(rest)]], atol=1e-5)
        assert torch.allclose(grouped[row][mask], single[row][mask], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Ends, rewards
# ---------------------------------------------------------------------------------------------


def test_the_token_budget_truncates_and_is_counted(monkeypatch, tasks, tiny_tokenizer):
    made = episode_task(tasks[0], tiny_tokenizer)
    first_turn = len(tiny_tokenizer.encode(gold_script(made)[0], add_special_tokens=False)) + 1
    budget = len(made.prompt_ids) + first_turn + 40  # no room for a segment and another full turn
    episodes, _, _ = scripted_run(monkeypatch, tiny_tokenizer, [made], {made.task.id: gold_script(made)},
                                  max_new_tokens=40)
    assert not episodes[0].truncated and episodes[0].record.success
    episodes, _, _ = scripted_run(monkeypatch, tiny_tokenizer, [made], {made.task.id: gold_script(made)},
                                  max_new_tokens=40, max_episode_tokens=budget)
    episode = episodes[0]
    assert episode.truncated and len(episode.turn_spans) == 1 and episode.record.turns == 1
    assert len(episode.input_ids) == len(made.prompt_ids) + first_turn <= budget
    metrics = episodes_mod.episode_metrics(episodes, torch.zeros(1, 2), [[], []], 1.0)
    assert metrics["episode/truncated_share"] == 1.0 and metrics["episode/turns_mean"] == 1.0


def constant_turn_rewards(texts, targets):
    return [RewardResult(total=2.0, components={"accuracy": 1.0, "format": 1.0}, success=True, kind="answer")
            for _ in texts]


def test_mean_turn_adds_the_mean_reward_of_the_turns_on_the_gold_path(monkeypatch, tasks, tiny_tokenizer):
    task, index, wrong = write_task(tasks)
    made = episode_task(task, tiny_tokenizer)
    script = gold_script(made)
    script[index] = format_completion({"kind": "tool_call", **wrong})
    seen = []

    def reward_fn(texts, targets):
        seen.extend(targets)
        return [RewardResult(total=float(i), components={"accuracy": 1.0}, success=True, kind="answer")
                for i in range(len(texts))]

    episodes, _, settings = scripted_run(monkeypatch, tiny_tokenizer, [made], {made.task.id: script},
                                         episode_reward="mean_turn")
    rewards, scored = episode_rewards(episodes, settings, reward_fn)
    assert seen == made.gold_targets[:index + 1] * 2  # each of the G = 2 episodes: turns up to the wrong
    assert rewards[0, 0].item() == pytest.approx(sum(range(index + 1)) / (index + 1))  # write, against gold
    assert rewards[0, 1].item() == pytest.approx(sum(range(index + 1, 2 * index + 2)) / (index + 1))
    assert [len(turns) for turns in scored] == [index + 1, index + 1]


def test_env_flags_are_refused_where_not_supported():
    with pytest.raises(ValueError, match="--oversample"):
        GRPOConfig(env="synthetic", oversample=2)


# ---------------------------------------------------------------------------------------------
# The trainer: a short run, its metrics, and --resume
# ---------------------------------------------------------------------------------------------


def text_rewards(texts, targets):
    """A deterministic per-turn reward with spread: it depends on the sampled text only."""
    return [RewardResult(total=float(sum(map(ord, text)) % 7) / 3.0, components={"accuracy": 0.0, "format": 0.5},
                         success=False, kind="answer") for text in texts]


NEW_KEYS = ("success_rate", "episode/turns_mean", "episode/invalid_actions_mean", "episode/policy_violations_mean",
            "episode/tokens_mean", "episode/truncated_share", "reward/mean", "completion/length_mean", "loss",
            "grad_norm")


def test_env_synthetic_run_writes_metrics_and_resumes_to_the_same_weights(tmp_path, tiny_base):
    from safetensors.torch import load_file

    before = torch.are_deterministic_algorithms_enabled()
    common = dict(model=str(tiny_base), env="synthetic", group_size=2, prompts_per_step=2, rollout_batch_prompts=2,
                  max_turns=3, max_new_tokens=6, max_episode_tokens=1200, episode_reward="mean_turn", lora_r=4,
                  lora_alpha=8, lr=1e-2, save_every=0, sample_every=1, deterministic=True, seed=2)
    try:
        trainer.train(GRPOConfig(out=str(tmp_path / "whole"), max_steps=3, **common), reward_fn=text_rewards)
        trainer.train(GRPOConfig(out=str(tmp_path / "split"), max_steps=2, **common), reward_fn=text_rewards)
        trainer.train(GRPOConfig(out=str(tmp_path / "split"), max_steps=3, resume=True, **common),
                      reward_fn=text_rewards)
    finally:
        torch.use_deterministic_algorithms(before)
    metrics = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in metrics] == [1, 2, 3]
    for record in metrics:
        assert all(key in record for key in NEW_KEYS), [key for key in NEW_KEYS if key not in record]
        assert 1 <= record["episode/turns_mean"] <= 3 and record["episode/tokens_mean"] <= 1200
    assert any(record["grad_norm"] > 0 for record in metrics)  # the rewards had spread: weights moved
    samples = [json.loads(line) for line in (tmp_path / "whole" / "samples.jsonl").read_text().splitlines()]
    assert {"task_id", "reward", "success", "turns", "texts"} <= set(samples[0])
    whole = load_file(latest_checkpoint(tmp_path / "whole") / "adapter" / "adapter_model.safetensors")
    split = load_file(latest_checkpoint(tmp_path / "split") / "adapter" / "adapter_model.safetensors")
    assert whole.keys() == split.keys()
    for key in whole:
        assert torch.equal(whole[key], split[key]), key
    assert any(bool(value.abs().sum() > 0) for key, value in whole.items() if "lora_B" in key)


def test_the_command_line_trains_on_episodes(tmp_path, tiny_base, capsys):
    import grpo.train

    out = tmp_path / "cli"
    grpo.train.main(["--env", "synthetic", "--model", str(tiny_base), "--max-steps", "2", "--group-size", "2",
                     "--prompts-per-step", "2", "--max-turns", "2", "--max-new-tokens", "4",
                     "--max-episode-tokens", "1000", "--lora-r", "4", "--lora-alpha", "8", "--out", str(out)])
    assert f"done: {out}" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert (config["env"], config["max_turns"], config["max_episode_tokens"]) == ("synthetic", 2, 1000)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in metrics] == [1, 2]
    assert all(1 <= record["episode/turns_mean"] <= 2 and "reward/accuracy" not in record for record in metrics)
