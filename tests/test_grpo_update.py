"""Tests for the policy update of a GRPO step (grpo/update.py: `policy_update`) on hand-built batches.

Gradient accumulation equals one large batch for every loss type (against a hand-written loss);
beta > 0 takes the reference pass under `reference_mode` (KL 0 at a fresh LoRA, > 0 after an
update) and beta == 0 never does; a non-finite loss skips the update; the sampler/trainer
log-prob gap is measured on the first pass.  The trainer around it: tests/test_grpo_trainer.py.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import grpo.trainer as trainer
import grpo.update as update_mod
from grpo.logprobs import token_logprobs
from grpo.policy import Policy, load_policy, reference_mode
from tests.test_grpo_trainer import SMALL_LORA, PoisonedLoss

# ---------------------------------------------------------------------------------------------
# policy_update on hand-built batches
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_policy(tiny_base) -> Policy:
    """A LoRA policy whose B matrices are non-zero (so that A gets gradients too)."""
    torch.manual_seed(0)
    policy = load_policy(base=str(tiny_base), lora=SMALL_LORA)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in policy.model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return policy


def hand_built_batches(vocab_size: int) -> list[update_mod.StepBatch]:
    """Two rollout chunks with different prompt widths, ragged completions and a zero-length one.

    completion lengths [4, 2, 0] and [3, 1] of T = 4: the loss types then disagree.
    """
    generator = torch.Generator().manual_seed(5)
    chunks = []
    for prompt_lengths, completion_lengths, advantages in (
        ([5, 3, 5], [4, 2, 0], [1.0, -0.5, 0.3]),
        ([7, 6], [3, 1], [0.7, -1.2]),
    ):
        width, rows = max(prompt_lengths), len(prompt_lengths)
        prompt_mask = torch.tensor([[0] * (width - n) + [1] * n for n in prompt_lengths])
        completion_mask = torch.tensor([[1] * n + [0] * (4 - n) for n in completion_lengths])
        input_ids = torch.randint(0, vocab_size, (rows, width + 4), generator=generator)
        chunks.append(update_mod.StepBatch(
            input_ids=input_ids, attention_mask=torch.cat([prompt_mask, completion_mask], dim=1),
            completion_mask=completion_mask.float(), advantages=torch.tensor(advantages), prompt_length=width,
        ))
    return chunks


def hand_written_loss(policy: Policy, batches: list[update_mod.StepBatch], loss_type: str, max_new_tokens: int):
    """The on-policy (ratio 1) GRPO loss of the whole step, written out per loss type."""
    num_sequences = sum(batch.input_ids.shape[0] for batch in batches)
    num_tokens = sum(float(batch.completion_mask.sum()) for batch in batches)
    total = 0.0
    for batch in batches:
        logprobs = token_logprobs(policy.model, batch.input_ids, batch.attention_mask,
                                  completion_start=batch.prompt_length)
        per_sequence = (logprobs * batch.completion_mask).sum(dim=1)  # sum_t logp
        lengths = batch.completion_mask.sum(dim=1)
        if loss_type == "grpo":  # mean over tokens, then over all sequences of the step
            total = total - (batch.advantages * per_sequence / lengths.clamp(min=1)).sum() / num_sequences
        elif loss_type == "dr_grpo":  # sum / (sequences * generation budget)
            total = total - (batch.advantages * per_sequence).sum() / (num_sequences * max_new_tokens)
        else:  # dapo: token mean over the whole step
            total = total - (batch.advantages * per_sequence).sum() / num_tokens
    return total


def trainable(policy: Policy) -> list[torch.nn.Parameter]:
    return [parameter for parameter in policy.model.parameters() if parameter.requires_grad]


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_accumulation_equals_one_large_batch(lora_policy, loss_type):
    batches = hand_built_batches(lora_policy.model.config.vocab_size)
    config = trainer.GRPOConfig(loss_type=loss_type, max_new_tokens=4, max_grad_norm=0.0)

    reference = dataclasses.replace(lora_policy, model=copy.deepcopy(lora_policy.model))
    hand_written_loss(reference, batches, loss_type, max_new_tokens=4).backward()
    expected = [parameter.grad.clone() for parameter in trainable(reference)]
    assert any(float(grad.abs().max()) > 0 for grad in expected)

    updated = {}
    for micro_batch in (16, 1, 2):  # the whole chunk at once, one sequence at a time, uneven pieces
        policy = dataclasses.replace(lora_policy, model=copy.deepcopy(lora_policy.model))
        optimizer = torch.optim.SGD(trainable(policy), lr=0.5)
        metrics = update_mod.policy_update(policy, batches, dataclasses.replace(config, train_micro_batch=micro_batch),
                                        optimizer)
        assert metrics["nonfinite_loss"] is False
        assert metrics["loss/num_tokens"] == 10.0
        for grad, parameter in zip(expected, trainable(policy)):
            torch.testing.assert_close(parameter.grad, grad, rtol=1e-4, atol=1e-7)
        updated[micro_batch] = [parameter.detach().clone() for parameter in trainable(policy)]
    for micro_batch in (1, 2):
        for one, other in zip(updated[16], updated[micro_batch]):
            torch.testing.assert_close(other, one, rtol=1e-5, atol=1e-7)


def test_beta_positive_uses_reference_mode_and_kl_grows_after_an_update(tiny_base, monkeypatch):
    entered = []

    def counting_reference_mode(policy):
        entered.append(policy)
        return reference_mode(policy)

    monkeypatch.setattr(update_mod, "reference_mode", counting_reference_mode)
    torch.manual_seed(0)
    policy = load_policy(base=str(tiny_base), lora=SMALL_LORA)  # fresh LoRA: B = 0
    batches = hand_built_batches(policy.model.config.vocab_size)
    config = trainer.GRPOConfig(beta=0.5, max_new_tokens=4, train_micro_batch=2, lr=0.05)
    optimizer = torch.optim.AdamW(trainable(policy), lr=0.05)

    first = update_mod.policy_update(policy, batches, config, optimizer)
    assert len(entered) == 3  # one reference pass per micro-batch: chunks of 3 and 2 rows in pieces of 2
    assert first["loss/kl_mean"] == pytest.approx(0.0, abs=1e-7)
    second = update_mod.policy_update(policy, batches, config, optimizer)
    assert second["loss/kl_mean"] > 1e-6


def test_beta_zero_never_enters_reference_mode(lora_policy, monkeypatch):
    def refuse(policy):
        raise AssertionError("reference_mode entered with beta == 0")

    monkeypatch.setattr(update_mod, "reference_mode", refuse)
    policy = dataclasses.replace(lora_policy, model=copy.deepcopy(lora_policy.model))
    config = trainer.GRPOConfig(beta=0.0, max_new_tokens=4)
    metrics = update_mod.policy_update(policy, hand_built_batches(policy.model.config.vocab_size), config,
                                    torch.optim.SGD(trainable(policy), lr=0.1))
    assert "loss/kl_mean" not in metrics



def test_nonfinite_loss_skips_the_update(lora_policy, monkeypatch):
    poison = PoisonedLoss({1})
    monkeypatch.setattr(update_mod, "policy_loss", poison.policy_loss)
    poison.calls = 1  # policy_update is called directly here, not through the counting wrapper
    policy = dataclasses.replace(lora_policy, model=copy.deepcopy(lora_policy.model))
    before = [parameter.detach().clone() for parameter in trainable(policy)]
    metrics = update_mod.policy_update(policy, hand_built_batches(policy.model.config.vocab_size),
                                    trainer.GRPOConfig(max_new_tokens=4), torch.optim.SGD(trainable(policy), lr=0.1))
    assert metrics["nonfinite_loss"] is True
    for old, parameter in zip(before, trainable(policy)):
        assert torch.equal(old, parameter) and parameter.grad is None



def test_logprob_gap_measures_sampling_against_training_logprobs(lora_policy):
    batches = hand_built_batches(lora_policy.model.config.vocab_size)
    config = trainer.GRPOConfig(max_new_tokens=4, train_micro_batch=2)
    with torch.no_grad():
        exact = [token_logprobs(lora_policy.model, batch.input_ids, batch.attention_mask,
                                completion_start=batch.prompt_length) for batch in batches]
    for offset in (0.0, 0.25):
        shifted = [dataclasses.replace(batch, sampling_logprobs=logprobs + offset * batch.completion_mask.sign()
                                       * torch.tensor([1.0, -1.0, 1.0, -1.0]))
                   for batch, logprobs in zip(batches, exact)]
        policy = dataclasses.replace(lora_policy, model=copy.deepcopy(lora_policy.model))
        metrics = update_mod.policy_update(policy, shifted, dataclasses.replace(config, mu=2),
                                        torch.optim.SGD(trainable(policy), lr=0.1))
        # Measured on the first pass (the rollout's weights), over completion tokens only.
        assert metrics["logprob_gap/mean_abs"] == pytest.approx(offset, abs=1e-5)
        assert metrics["logprob_gap/max_abs"] == pytest.approx(offset, abs=1e-5)
    # Without sampler log-probs (top-k, top-p or a stop-token ban change the distribution) no gap is logged.
    policy = dataclasses.replace(lora_policy, model=copy.deepcopy(lora_policy.model))
    metrics = update_mod.policy_update(policy, batches, config, torch.optim.SGD(trainable(policy), lr=0.1))
    assert "logprob_gap/mean_abs" not in metrics
    assert update_mod.sampling_is_the_policy(config)
    for change in ({"top_k": 5}, {"top_p": 0.9}, {"min_new_tokens": 2}):
        assert not update_mod.sampling_is_the_policy(dataclasses.replace(config, **change))

