"""Behaviour that had no test (issue 16), pinned where it is implemented.

Each test drives the trainer, the reward plumbing or a loader the way a run does (flags parsed by
`parse_config` where a flag is named) and checks the effect against a value written out by hand:

* --mu > 1: the old log-probs are taken once, before the first pass; later passes see a ratio
  away from 1, and the clip cuts the gradient (compared with the clipped loss written out).
* --epsilon-low / --epsilon-high reach the loss (and --epsilon-high defaults to --epsilon-low).
* --scale-rewards group / batch / none reach the advantages a training step uses.
* --no-lora with beta > 0: a frozen copy of the starting weights is the KL reference, also after
  --resume (the reference is the stage's start, never the resumed weights).
* --warmup-steps and --lr-schedule: the learning rate the optimizer applies at each step.
* make_reward_fn passes the weights, the length switch and the similarity choice on.
* --max-grad-norm: grad_norm is logged before clipping and the applied update is clipped.
* decode_completions drops the final stop token before the reward sees the text.
* prompt_batches reshuffles per epoch and wraps around when a step needs more prompts than exist.
* eval.run --trust-remote-code reaches the model and tokenizer loaders.
* Similarity models load from safetensors only (a pytorch_model.bin is refused).

The trainer tests' tiny model and data (tests/conftest.py); every run is a step or a few.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import statistics
import types
from pathlib import Path

import pytest
import torch

import grpo.trainer as trainer
import grpo.prompts as prompts_mod
import grpo.rollout as rollout_mod
import grpo.step as step_mod
import grpo.update as update_mod
from grpo.config import parse_config
from grpo.logprobs import token_logprobs
from grpo.policy import load_policy
from rewards.score import RewardResult

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def cli_config(tiny_base: Path, small_data: Path, out: Path, *flags: str) -> trainer.GRPOConfig:
    """A small GRPO config as `python -m grpo.train` parses it; later flags override earlier ones."""
    base = ["--model", str(tiny_base), "--data", str(small_data / "train.json"), "--out", str(out),
            "--group-size", "2", "--prompts-per-step", "2", "--rollout-batch-prompts", "2", "--max-new-tokens", "3",
            "--lora-r", "4", "--lora-alpha", "8", "--similarity", "lexical", "--save-every", "0",
            "--sample-every", "0", "--lr", "1e-2", "--device", "cpu", "--dtype", "float32"]
    return parse_config(trainer.GRPOConfig, [*base, *flags])


def update_config(*flags: str) -> trainer.GRPOConfig:
    """A config for policy_update on `step_batches` (T = 4, two micro-batches of 2 rows)."""
    return parse_config(trainer.GRPOConfig, ["--max-new-tokens", "4", "--train-micro-batch", "2", *flags])


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def fixed_rewards(values: list[float]):
    """A reward function that gives the i-th completion of a call values[i] (cycled)."""
    def reward_fn(texts: list[str], targets: list[dict]) -> list[RewardResult]:
        return [RewardResult(total=values[i % len(values)], components={}, success=False, kind="answer")
                for i in range(len(texts))]
    return reward_fn


def trainable(policy) -> list[torch.nn.Parameter]:
    return [parameter for parameter in policy.model.parameters() if parameter.requires_grad]


def fresh_copy(policy):
    return dataclasses.replace(policy, model=copy.deepcopy(policy.model))


@pytest.fixture(scope="module")
def full_policy(tiny_base):
    """The tiny base, fully trainable (no LoRA), float32; tests work on deep copies."""
    return load_policy(base=str(tiny_base), lora=None, dtype=torch.float32)


def step_batches(vocab_size: int) -> list[update_mod.StepBatch]:
    """One rollout chunk of 4 rows: left-padded prompts (width 5), completions of 4, 3, 2, 4 tokens."""
    generator = torch.Generator().manual_seed(11)
    prompt_lengths, completion_lengths, advantages = [5, 3, 4, 5], [4, 3, 2, 4], [1.0, -0.8, 0.5, -1.2]
    prompt_mask = torch.tensor([[0] * (5 - n) + [1] * n for n in prompt_lengths])
    completion_mask = torch.tensor([[1] * n + [0] * (4 - n) for n in completion_lengths])
    return [update_mod.StepBatch(
        input_ids=torch.randint(0, vocab_size, (4, 9), generator=generator),
        attention_mask=torch.cat([prompt_mask, completion_mask], dim=1), completion_mask=completion_mask.float(),
        advantages=torch.tensor(advantages), prompt_length=5,
    )]


def batch_logprobs(model: torch.nn.Module, batch: update_mod.StepBatch) -> torch.Tensor:
    return token_logprobs(model, batch.input_ids, batch.attention_mask, completion_start=batch.prompt_length)


def hand_loss(model: torch.nn.Module, batches: list[update_mod.StepBatch], old: list[torch.Tensor],
              epsilon_low: float, epsilon_high: float, *, clip: bool = True) -> tuple[torch.Tensor, int]:
    """The "grpo" loss written out: per token -min(rho A, clip(rho, 1 - el, 1 + eh) A), mean over each
    sequence's tokens, summed over sequences / the step's sequences.  Returns (loss, clipped tokens),
    a token counting as clipped where the clipped term is the smaller one and differs from rho A."""
    sequences = sum(batch.input_ids.shape[0] for batch in batches)
    total, clipped_tokens = 0.0, 0
    for batch, old_logprobs in zip(batches, old):
        mask = batch.completion_mask
        ratio = torch.exp((batch_logprobs(model, batch) - old_logprobs) * mask)
        advantage = batch.advantages[:, None]
        clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
        per_token = -torch.minimum(ratio * advantage, clipped * advantage) if clip else -ratio * advantage
        clipped_tokens += int((((clipped * advantage) < (ratio * advantage)) & (mask > 0)).sum())
        total = total + ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum() / sequences
    return total, clipped_tokens


def hand_gradient(model: torch.nn.Module, parameters: list[torch.Tensor], batches, old, epsilon_low, epsilon_high,
                  *, clip: bool = True) -> tuple[list[torch.Tensor], int]:
    """d hand_loss / d weights, evaluated at `parameters` (in the order of the trainable weights)."""
    model = copy.deepcopy(model)
    weights = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for weight, value in zip(weights, parameters):
            weight.copy_(value)
    loss, clipped_tokens = hand_loss(model, batches, old, epsilon_low, epsilon_high, clip=clip)
    grads = torch.autograd.grad(loss, weights, allow_unused=True)
    return [torch.zeros_like(w) if g is None else g for w, g in zip(weights, grads)], clipped_tokens


def same_gradients(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> bool:
    return all(torch.allclose(a, e, rtol=1e-4, atol=1e-7) for a, e in zip(actual, expected))


class SnapshotSGD(torch.optim.SGD):
    """Plain SGD that keeps the weights it is about to change (one snapshot per step)."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, lr=lr)
        self.before_step: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        self.before_step.append([p.detach().clone() for group in self.param_groups for p in group["params"]])
        return super().step(closure)


def recorded_update(policy, batches, config, monkeypatch, lr: float = 0.01):
    """policy_update with a recording policy_loss: (metrics, calls, snapshots before each optimizer step)."""
    calls = []
    real_loss = update_mod.policy_loss

    def recording_loss(logprobs, advantages, mask, **kwargs):
        loss, metrics = real_loss(logprobs, advantages, mask, **kwargs)
        old = kwargs.get("old_logprobs")
        calls.append({"logprobs": logprobs.detach().clone(), "old": None if old is None else old.detach().clone(),
                      "epsilon": (kwargs.get("epsilon_low"), kwargs.get("epsilon_high")), "metrics": metrics})
        return loss, metrics

    monkeypatch.setattr(update_mod, "policy_loss", recording_loss)
    optimizer = SnapshotSGD(trainable(policy), lr=lr)
    metrics = update_mod.policy_update(policy, batches, config, optimizer)
    monkeypatch.setattr(update_mod, "policy_loss", real_loss)
    return metrics, calls, optimizer.before_step


# ---------------------------------------------------------------------------------------------
# 1, 3. --mu > 1 and the clip range
# ---------------------------------------------------------------------------------------------


def test_mu_passes_reuse_old_logprobs_taken_once_and_the_clip_cuts_the_gradient(full_policy, monkeypatch):
    policy = fresh_copy(full_policy)
    start = copy.deepcopy(policy.model)
    batches = step_batches(policy.model.config.vocab_size)
    with torch.no_grad():
        initial = [batch_logprobs(start, batch) for batch in batches]
    config = update_config("--mu", "3", "--epsilon-low", "0.1", "--epsilon-high", "0.15", "--max-grad-norm", "0")
    metrics, calls, snapshots = recorded_update(policy, batches, config, monkeypatch)

    assert len(snapshots) == 3 and len(calls) == 6  # one optimizer step per pass, 2 micro-batches each
    mask = batches[0].completion_mask > 0
    for index, call in enumerate(calls):
        rows = slice(2 * (index % 2), 2 * (index % 2) + 2)
        assert call["old"] is not None
        # The same old log-probs in every pass: those of the weights before the first pass.
        assert torch.equal(call["old"], calls[index % 2]["old"])
        torch.testing.assert_close(call["old"][mask[rows]], initial[0][rows][mask[rows]], rtol=1e-5, atol=1e-6)
        moved = float((call["logprobs"] - call["old"])[mask[rows]].abs().max())
        if index < 2:  # first pass: on-policy, ratio 1, nothing clipped
            assert moved == 0.0
            assert call["metrics"]["ratio_mean"] == pytest.approx(1.0) and call["metrics"]["clip_ratio"] == 0.0
        else:  # later passes: the weights moved, the old log-probs did not
            assert moved > 1e-3
    assert sum(call["metrics"]["clip_ratio"] for call in calls[4:]) > 0
    assert metrics["loss/clip_ratio"] > 0

    # The third pass's gradient (kept on the weights: --max-grad-norm 0 scales it by exactly 1) is
    # that of the clipped loss at the weights before the third step, against the initial log-probs.
    grads = [p.grad for p in trainable(policy)]
    expected, clipped_tokens = hand_gradient(start, snapshots[2], batches, initial, 0.1, 0.15)
    assert clipped_tokens > 0
    assert same_gradients(grads, expected)
    unclipped, _ = hand_gradient(start, snapshots[2], batches, initial, 0.1, 0.15, clip=False)
    assert not same_gradients(grads, unclipped)  # the clip acted on this pass


def test_epsilon_low_and_high_reach_the_loss(full_policy, monkeypatch):
    batches = step_batches(full_policy.model.config.vocab_size)
    with torch.no_grad():
        initial = [batch_logprobs(full_policy.model, batch) for batch in batches]
    grads_of = {}
    for flags, (low, high) in ((("--epsilon-low", "0.1", "--epsilon-high", "0.15"), (0.1, 0.15)),
                               (("--epsilon-low", "0.1"), (0.1, 0.1))):  # --epsilon-high defaults to the low one
        policy = fresh_copy(full_policy)
        config = update_config("--mu", "3", "--max-grad-norm", "0", *flags)
        _, calls, snapshots = recorded_update(policy, batches, config, monkeypatch)
        assert {call["epsilon"][0] for call in calls} == {low}
        assert {call["epsilon"][1] for call in calls} <= {high, None}  # None: the loss uses epsilon_low
        grads = [p.grad for p in trainable(policy)]
        expected, clipped_tokens = hand_gradient(full_policy.model, snapshots[2], batches, initial, low, high)
        assert clipped_tokens > 0 and same_gradients(grads, expected), (low, high)
        # ... and the range matters here: the default range (0.2, 0.2) gives another gradient.
        default, _ = hand_gradient(full_policy.model, snapshots[2], batches, initial, 0.2, 0.2)
        assert not same_gradients(grads, default), (low, high)
        grads_of[(low, high)] = (grads, snapshots[2])
    # Between the two runs only --epsilon-high differs; at the second run's weights the two ranges disagree.
    grads, at = grads_of[(0.1, 0.1)]
    other, _ = hand_gradient(full_policy.model, at, batches, initial, 0.1, 0.15)
    assert not same_gradients(grads, other)


# ---------------------------------------------------------------------------------------------
# 2. --scale-rewards in the trainer
# ---------------------------------------------------------------------------------------------


REWARDS = [0.0, 1.0, 5.0, 2.0, 2.5, 3.0]  # two groups of 3 with different spreads


def hand_advantages(scale: str) -> list[float]:
    groups = [REWARDS[:3], REWARDS[3:]]
    advantages = []
    for group in groups:
        mean = sum(group) / len(group)
        if scale == "group":
            denominator = statistics.stdev(group) + 1e-4
        elif scale == "batch":
            denominator = statistics.stdev(REWARDS) + 1e-4  # the whole step's spread
        else:
            denominator = 1.0
        advantages += [(r - mean) / denominator for r in group]
    return advantages


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_scale_rewards_reaches_the_trainers_advantages(tmp_path, tiny_base, small_data, monkeypatch, scale):
    seen = []
    real_update = update_mod.policy_update

    def recording_update(policy, batches, config, optimizer, **kwargs):
        seen.append(torch.cat([batch.advantages for batch in batches]).tolist())
        return real_update(policy, batches, config, optimizer, **kwargs)

    monkeypatch.setattr(step_mod, "policy_update", recording_update)
    config = cli_config(tiny_base, small_data, tmp_path / "run", "--group-size", "3", "--max-steps", "1",
                        "--max-new-tokens", "2", "--scale-rewards", scale)
    trainer.train(config, reward_fn=fixed_rewards(REWARDS))
    assert len(seen) == 1
    assert seen[0] == pytest.approx(hand_advantages(scale), rel=1e-5, abs=1e-6)
    others = [hand_advantages(other) for other in ("group", "batch", "none") if other != scale]
    assert all(seen[0] != pytest.approx(other, rel=1e-3) for other in others)


# ---------------------------------------------------------------------------------------------
# 4. KL with full fine-tuning, across a resume
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def restore_determinism():
    """train(deterministic=True) switches torch's deterministic algorithms on for the process."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def test_full_fine_tuning_kl_uses_a_frozen_copy_of_the_start_also_after_resume(
        tmp_path, tiny_base, small_data, monkeypatch, restore_determinism):
    from safetensors.torch import load_file

    start = load_file(tiny_base / "model.safetensors")
    seen = []
    real_update = update_mod.policy_update

    def same_as_start(model: torch.nn.Module) -> bool:
        state = model.state_dict()
        assert set(start) <= set(state)
        return all(torch.equal(state[name], tensor.to(state[name].dtype)) for name, tensor in start.items())

    def recording_update(policy, batches, config, optimizer, *, reference_policy=None, **kwargs):
        reference = None if reference_policy is None else reference_policy.model
        seen.append({
            "reference": reference,
            "separate": reference is not None and reference is not policy.model,
            "reference_is_start": reference is not None and same_as_start(reference),
            "policy_is_start": same_as_start(policy.model),
        })
        return real_update(policy, batches, config, optimizer, reference_policy=reference_policy, **kwargs)

    monkeypatch.setattr(step_mod, "policy_update", recording_update)
    flags = ("--no-lora", "--beta", "0.5", "--deterministic", "--seed", "2")
    whole, split = tmp_path / "whole", tmp_path / "split"
    trainer.train(cli_config(tiny_base, small_data, whole, *flags, "--max-steps", "2"),
                  reward_fn=fixed_rewards(REWARDS))
    trainer.train(cli_config(tiny_base, small_data, split, *flags, "--max-steps", "1"),
                  reward_fn=fixed_rewards(REWARDS))
    trainer.train(cli_config(tiny_base, small_data, split, *flags, "--max-steps", "2", "--resume"),
                  reward_fn=fixed_rewards(REWARDS))

    assert len(seen) == 4  # whole: steps 1, 2; split: step 1; resumed: step 2
    for record in seen:
        assert record["separate"] and record["reference_is_start"]
        assert not any(p.requires_grad for p in record["reference"].parameters())
    assert [record["policy_is_start"] for record in seen] == [True, False, True, False]
    # After the runs the copies are still the starting weights (the optimizer never touched them).
    assert all(same_as_start(record["reference"]) for record in seen)

    whole_metrics, split_metrics = read_metrics(whole), read_metrics(split)
    assert [m["step"] for m in split_metrics] == [1, 2]
    assert whole_metrics[0]["loss/kl_mean"] == pytest.approx(0.0, abs=1e-7)  # policy == reference at the start
    assert whole_metrics[1]["loss/kl_mean"] > 1e-6
    # The resumed step 2 measures the KL to the start, as the uninterrupted run does.
    assert split_metrics[1]["loss/kl_mean"] == pytest.approx(whole_metrics[1]["loss/kl_mean"], rel=1e-4)


# ---------------------------------------------------------------------------------------------
# 5. Learning-rate warm-up and schedules
# ---------------------------------------------------------------------------------------------

# --lr 0.01, --warmup-steps 2, --max-steps 6: warm-up (s + 1) / 2 * lr for steps 0, 1, then the
# schedule over the remaining 4 steps, progress p = (s - 2) / 4.
EXPECTED_LR = {
    "constant": [0.005, 0.01, 0.01, 0.01, 0.01, 0.01],
    "linear": [0.005, 0.01, 0.01, 0.0075, 0.005, 0.0025],
    "cosine": [0.005, 0.01, 0.01, 0.005 * (1 + math.cos(math.pi / 4)), 0.005, 0.005 * (1 + math.cos(3 * math.pi / 4))],
}


@pytest.mark.parametrize("schedule", sorted(EXPECTED_LR))
def test_warmup_and_schedule_set_the_applied_learning_rate(tmp_path, tiny_base, small_data, monkeypatch, schedule):
    applied = []

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            applied.append([group["lr"] for group in self.param_groups])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    out = tmp_path / "run"
    config = cli_config(tiny_base, small_data, out, "--max-steps", "6", "--warmup-steps", "2",
                        "--lr-schedule", schedule, "--prompts-per-step", "1", "--max-new-tokens", "2")
    trainer.train(config, reward_fn=fixed_rewards([0.0, 1.0]))
    assert len(applied) == 6
    assert all(len(set(rates)) == 1 for rates in applied)  # every parameter group
    assert [rates[0] for rates in applied] == pytest.approx(EXPECTED_LR[schedule], rel=1e-9)
    assert [m["lr"] for m in read_metrics(out)] == pytest.approx(EXPECTED_LR[schedule], rel=1e-9)


# ---------------------------------------------------------------------------------------------
# 6. make_reward_fn
# ---------------------------------------------------------------------------------------------

COMPLETION = "<think>I will tell the user that the flight is booked now</think>\n\n<answer>your flight is booked</answer>"
TARGET = {"kind": "answer", "text": "the flight is booked today"}


def test_make_reward_fn_passes_weights_length_switch_and_similarity(monkeypatch):
    import rewards
    from rewards.similarity import Similarity

    # Lexical similarity: token F1 of "your flight is booked" and "the flight is booked today" = 2*3/9.
    # 11 think words: length reward 11/14.  Every format check holds: format 1.
    similarity, length = 2 * 3 / 9, 11 / 14
    config = trainer.GRPOConfig(similarity="lexical", w_accuracy=2.0, w_format=0.5, w_length=3.0)
    (result,) = trainer.make_reward_fn(config)([COMPLETION], [TARGET])
    assert result.components["similarity"] == pytest.approx(similarity)
    assert result.components["length"] == pytest.approx(length) and result.components["format"] == 1.0
    assert result.total == pytest.approx(2.0 * (1 + similarity) + 0.5 * 1.0 + 3.0 * length)

    no_length = dataclasses.replace(config, length_reward=False)
    (result,) = trainer.make_reward_fn(no_length)([COMPLETION], [TARGET])
    assert result.total == pytest.approx(2.0 * (1 + similarity) + 0.5 * 1.0)

    class Constant(Similarity):
        def _score_pairs(self, predictions, golds):
            return [0.25] * len(predictions)

    requests = []

    def fake_get_similarity(name=None, *, lexical_ok=False, **kwargs):
        requests.append((name, lexical_ok))
        return Constant("constant")

    monkeypatch.setattr(rewards, "get_similarity", fake_get_similarity)
    chosen = trainer.GRPOConfig(similarity="some-org/some-model", w_accuracy=1.0, w_format=0.0, length_reward=False)
    (result,) = trainer.make_reward_fn(chosen)([COMPLETION], [TARGET])
    assert requests == [("some-org/some-model", False)]  # a named model: no silent lexical fallback
    assert result.components["similarity"] == 0.25 and result.total == pytest.approx(1.25)
    trainer.make_reward_fn(trainer.GRPOConfig(similarity="lexical"))
    assert requests[-1] == ("lexical", True)


# ---------------------------------------------------------------------------------------------
# 7. Gradient clipping and the logged grad_norm
# ---------------------------------------------------------------------------------------------


def test_grad_norm_is_logged_before_clipping_and_the_update_is_clipped(full_policy):
    batches = step_batches(full_policy.model.config.vocab_size)
    with torch.no_grad():
        initial = [batch_logprobs(full_policy.model, batch) for batch in batches]
    weights = [p.detach() for p in trainable(full_policy)]
    raw, _ = hand_gradient(full_policy.model, weights, batches, initial, 0.2, 0.2)  # mu = 1: ratio 1
    norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in raw)))
    assert norm > 0
    lr = 0.1
    for max_norm in (norm / 4, 0.0):  # clipping on (a quarter of the norm) and off
        policy = fresh_copy(full_policy)
        before = [p.detach().clone() for p in trainable(policy)]
        config = update_config("--max-grad-norm", repr(max_norm))
        metrics = update_mod.policy_update(policy, batches, config, torch.optim.SGD(trainable(policy), lr=lr))
        assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-4)  # the norm before clipping
        scale = max_norm / (norm + 1e-6) if max_norm else 1.0  # torch's clip_grad_norm_ factor
        steps = [after.detach() - old for after, old in zip(trainable(policy), before)]
        for step, grad in zip(steps, raw):
            torch.testing.assert_close(step, -lr * scale * grad, rtol=1e-3, atol=1e-7)
        applied = float(torch.sqrt(sum((s.double() ** 2).sum() for s in steps)))
        assert applied == pytest.approx(lr * (max_norm if max_norm else norm), rel=1e-3)


# ---------------------------------------------------------------------------------------------
# 8. decode_completions drops the stop token before scoring
# ---------------------------------------------------------------------------------------------


def test_final_stop_token_is_dropped_before_the_reward_sees_the_text(full_policy, monkeypatch):
    from data.render import stop_token_ids
    from grpo.rollout import Rollout

    tokenizer = full_policy.tokenizer
    stops = stop_token_ids(tokenizer)
    stop, pad = stops[0], tokenizer.pad_token_id
    body = tokenizer.encode("<answer>the flight is booked</answer>", add_special_tokens=False)
    text = tokenizer.decode(body, skip_special_tokens=False)
    stop_text = tokenizer.decode([stop], skip_special_tokens=False)
    assert stop_text and stop_text not in text
    width = len(body) + 3
    rows = [
        (body + [stop], "stopped"),  # stop token after the answer, then padding
        (body[:4], "truncated"),  # no stop: every token kept
        ([stop] + body, "stop first"),  # a stop token that does not end the completion is text
        ([stop], "only a stop"),
    ]
    ids = torch.tensor([row + [pad] * (width - len(row)) for row, _ in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row, _ in rows])
    expected = [text, tokenizer.decode(body[:4], skip_special_tokens=False), stop_text + text, ""]
    assert rollout_mod.decode_completions(tokenizer, ids, mask, set(stops)) == expected

    # In a training step: the reward function gets exactly these texts.
    def scripted_generate(model, prompts, sampling, **kwargs):
        assert sampling.group_size == 4 and len(prompts) == 1
        return Rollout(prompt_ids=torch.tensor([prompts[0]]), prompt_mask=torch.ones(1, len(prompts[0]), dtype=torch.long),
                       completion_ids=ids[None], completion_mask=mask[None],
                       finished=torch.tensor([[True, False, True, True]]),
                       sampling_logprobs=torch.zeros(1, 4, width)), {}

    scored = []

    def recording_rewards(texts, targets):
        scored.extend(texts)
        return fixed_rewards([0.0, 1.0])(texts, targets)

    monkeypatch.setattr(step_mod, "generate", scripted_generate)
    prompt = prompts_mod.Prompt(sample=types.SimpleNamespace(target=TARGET), prompt_ids=body[:3])
    config = trainer.GRPOConfig(group_size=4, prompts_per_step=1, max_new_tokens=width)
    batches, _, metrics, records = step_mod.rollout_and_score(full_policy, [prompt], config, step=0,
                                                             reward_fn=recording_rewards, device=torch.device("cpu"))
    assert scored == expected and [record["text"] for record in records] == expected
    assert torch.equal(batches[0].completion_mask, mask.float())  # the stop token still gets loss


# ---------------------------------------------------------------------------------------------
# 9. prompt_batches
# ---------------------------------------------------------------------------------------------


def take(stream, count: int) -> list[tuple[int, list[int]]]:
    return [next(stream) for _ in range(count)]


def test_prompt_batches_reshuffle_every_epoch_and_resume_at_any_step():
    batches = take(prompts_mod.prompt_batches(6, 2, seed=3, start_step=0), 12)  # 3 steps per epoch, 4 epochs
    assert [step for step, _ in batches] == list(range(12))
    epochs = [[index for _, indices in batches[3 * e:3 * e + 3] for index in indices] for e in range(4)]
    assert all(sorted(order) == list(range(6)) for order in epochs)  # every prompt once per epoch
    assert len({tuple(order) for order in epochs}) == 4  # a new order every epoch
    assert take(prompts_mod.prompt_batches(6, 2, seed=3, start_step=5), 7) == batches[5:]  # resumable
    assert [b for _, b in take(prompts_mod.prompt_batches(6, 2, seed=4, start_step=0), 3)] != [b for _, b in batches[:3]]

    # 7 prompts, 2 per step: 3 steps per epoch (one prompt left out), distinct prompts within an epoch.
    uneven = take(prompts_mod.prompt_batches(7, 2, seed=0, start_step=0), 6)
    for epoch in range(2):
        order = [index for _, indices in uneven[3 * epoch:3 * epoch + 3] for index in indices]
        assert len(order) == len(set(order)) == 6 and set(order) <= set(range(7))


def test_prompt_batches_wrap_around_when_a_step_needs_more_prompts_than_exist():
    for step, indices in take(prompts_mod.prompt_batches(3, 5, seed=0, start_step=0), 4):
        assert len(indices) == 5 and set(indices) == {0, 1, 2}
        assert sorted(indices.count(i) for i in range(3)) == [1, 2, 2]  # as even as 5 over 3 can be
    assert take(prompts_mod.prompt_batches(3, 5, seed=0, start_step=7), 1)[0][0] == 7


# ---------------------------------------------------------------------------------------------
# 10. eval.run --trust-remote-code
# ---------------------------------------------------------------------------------------------


def test_eval_trust_remote_code_reaches_the_model_and_tokenizer_loaders(tmp_path, tiny_base, monkeypatch):
    import transformers

    from eval.run import main

    class Reached(Exception):
        pass

    seen: list[tuple[str, object]] = []
    load_model = transformers.AutoModelForCausalLM.from_pretrained

    def recording_model(*args, **kwargs):
        seen.append(("model", kwargs.get("trust_remote_code")))
        return load_model(*args, **kwargs)

    def recording_tokenizer(*args, **kwargs):
        seen.append(("tokenizer", kwargs.get("trust_remote_code")))
        raise Reached  # both loaders reached: no need to evaluate

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", recording_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", recording_tokenizer)
    for flags, expected in (([], False), (["--trust-remote-code"], True)):
        seen.clear()
        with pytest.raises(Reached):
            main(["--checkpoint", f"base={tiny_base}", "--data", "synthetic:test", "--limit", "1",
                  "--similarity", "lexical", "--device", "cpu", "--dtype", "float32", "--no-progress",
                  "--out", str(tmp_path / "eval"), *flags])
        assert seen == [("model", expected), ("tokenizer", expected)]


# ---------------------------------------------------------------------------------------------
# 11. Similarity models: safetensors only
# ---------------------------------------------------------------------------------------------


def test_similarity_models_load_from_safetensors_only(tmp_path, monkeypatch):
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

    from rewards import similarity as similarity_module
    from rewards.similarity import BiEncoderSimilarity, CrossEncoderSimilarity, SimilarityLoadError, get_similarity

    monkeypatch.setattr(similarity_module, "_BY_REQUEST", {})
    monkeypatch.setattr(similarity_module, "_BY_MODEL", {})
    words = "[PAD] [UNK] [CLS] [SEP] [MASK] your flight is booked".split()
    config = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=1)
    for classifier, kind in ((True, CrossEncoderSimilarity), (False, BiEncoderSimilarity)):
        torch.manual_seed(0)
        model = BertForSequenceClassification(config) if classifier else BertModel(config)
        folders = {}
        for weights in ("safetensors", "pickle"):
            folder = folders[weights] = tmp_path / f"{kind.__name__}-{weights}"
            folder.mkdir()
            (folder / "vocab.txt").write_text("\n".join(words) + "\n")
            BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
            model.save_pretrained(folder)
            if weights == "pickle":  # the same weights as a pickled pytorch_model.bin
                (folder / "model.safetensors").unlink()
                torch.save(model.state_dict(), folder / "pytorch_model.bin")
        loaded = get_similarity(str(folders["safetensors"]), device="cpu")
        assert isinstance(loaded, kind)
        assert 0.0 <= loaded(["your flight"], ["is booked"])[0] <= 1.0
        with pytest.raises(SimilarityLoadError, match="safetensors"):
            get_similarity(str(folders["pickle"]), device="cpu")
