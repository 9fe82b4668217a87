"""Behaviour that had no test (issue 16), pinned where it is implemented: grpo.update.policy_update.

Each test drives policy_update with flags parsed by `parse_config` and checks the effect against
the loss or the gradient written out by hand:

* --mu > 1: the old log-probs are taken once, before the first pass; later passes see a ratio
  away from 1, and the clip cuts the gradient (compared with the clipped loss written out).
* --epsilon-low / --epsilon-high reach the loss (and --epsilon-high defaults to --epsilon-low).
* --max-grad-norm: grad_norm is logged before clipping and the applied update is clipped.

The trainer tests' tiny model and data (tests/conftest.py); every run is a step or a few.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import grpo.trainer as trainer
import grpo.update as update_mod
from grpo.config import parse_config
from grpo.logprobs import token_logprobs
from grpo.policy import load_policy

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def update_config(*flags: str) -> trainer.GRPOConfig:
    """A config for policy_update on `step_batches` (T = 4, two micro-batches of 2 rows)."""
    return parse_config(trainer.GRPOConfig, ["--max-new-tokens", "4", "--train-micro-batch", "2", *flags])


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

