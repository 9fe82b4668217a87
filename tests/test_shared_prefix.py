"""Tests for the shared-prefix training forward (grpo.logprobs.grouped_token_logprobs) and its use in
the trainer (GRPOConfig.share_prefix, whole-group micro-batches).

The anchor: computing each prompt once and letting its G completions attend to its keys and values
gives the same log-probs, entropies and gradients (w.r.t. LoRA parameters and w.r.t. every
parameter of a full model) as `token_logprobs` on the G repeated [prompt ; completion] rows, with
left-padded prompts of different lengths, right-padded completions of different lengths (a
zero-length one and a full one among them) and a temperature != 1.  Then policy_update with
share_prefix on and off must give the same gradients and the same updated weights.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import grpo.trainer as trainer  # noqa: E402
import grpo.prompts as prompts_mod  # noqa: E402
import grpo.step as step_mod  # noqa: E402
import grpo.update as update_mod  # noqa: E402
from grpo.hf_compat import supports_shared_prefix  # noqa: E402
from grpo.logprobs import grouped_token_logprobs, token_logprobs  # noqa: E402
from grpo.policy import LoraSettings, attach_lora, policy_from_model  # noqa: E402
from grpo.tiny import build_tiny_model  # noqa: E402
from rewards.score import RewardResult  # noqa: E402
from tests.test_policy import TINY, build_word_tokenizer  # noqa: E402

VOCAB = 101
NUM_PROMPTS, GROUP, PROMPT_WIDTH, COMPLETION_WIDTH = 3, 4, 9, 6
PROMPT_LENGTHS = (9, 4, 6)  # left padded to 9
COMPLETION_LENGTHS = ((0, 6, 3, 1), (6, 6, 2, 5), (4, 1, 6, 3))  # right padded to 6; a zero-length one
TEMPERATURE = 0.7


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def varied(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights re-drawn at std 0.15 so that logits (and gradients) have some spread."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.15)
    return model


def small_model(family: str = "qwen3", seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2-layer model of the given family, 4 query heads over 2 key/value heads (grouped-query)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128, head_dim=16)
    settings.update(overrides)
    config = AutoConfig.for_model(family, **settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return varied(model, seed + 1)


def grouped_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    """prompt_ids/mask [B, P] (left padded), completion_ids/mask [B, G, T] (right padded)."""
    generator = torch.Generator().manual_seed(seed)
    prompt_mask = torch.tensor([[0] * (PROMPT_WIDTH - n) + [1] * n for n in PROMPT_LENGTHS])
    lengths = torch.tensor(COMPLETION_LENGTHS)
    completion_mask = (torch.arange(COMPLETION_WIDTH) < lengths[..., None]).long()
    return {
        "prompt_ids": torch.randint(0, VOCAB, (NUM_PROMPTS, PROMPT_WIDTH), generator=generator),
        "prompt_mask": prompt_mask,
        "completion_ids": torch.randint(0, VOCAB, (NUM_PROMPTS, GROUP, COMPLETION_WIDTH), generator=generator),
        "completion_mask": completion_mask,
    }


def unshared(model, inputs, **kwargs):
    """token_logprobs on the G repeated [prompt ; completion] rows, reshaped to [B, G, T]."""
    rows = NUM_PROMPTS * GROUP
    input_ids = torch.cat([inputs["prompt_ids"].repeat_interleave(GROUP, 0),
                           inputs["completion_ids"].reshape(rows, -1)], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"].repeat_interleave(GROUP, 0),
                                inputs["completion_mask"].reshape(rows, -1)], dim=1)
    result = token_logprobs(model, input_ids, attention_mask, completion_start=PROMPT_WIDTH, **kwargs)
    if isinstance(result, tuple):
        return tuple(part.view(NUM_PROMPTS, GROUP, -1) for part in result)
    return result.view(NUM_PROMPTS, GROUP, -1)


def token_weights(seed: int = 3) -> torch.Tensor:
    """A random weighting of the real completion tokens: loss = sum(weights * logp)."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(NUM_PROMPTS, GROUP, COMPLETION_WIDTH, generator=generator)
    return weights * grouped_inputs()["completion_mask"]


def gradients(model: torch.nn.Module, compute) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    (compute(model) * token_weights()).sum().backward()
    return [parameter.grad.clone() for parameter in model.parameters() if parameter.requires_grad]


def assert_gradients_equal(shared: list[torch.Tensor], reference: list[torch.Tensor]) -> None:
    assert len(shared) == len(reference) and any(float(grad.abs().max()) > 0 for grad in reference)
    for grad, expected in zip(shared, reference):
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()) + 1e-9)


# ----------------------------------------------------------------------------------------------
# grouped_token_logprobs == token_logprobs on repeated rows
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_logprobs_and_entropy_equal_the_unshared_forward(family):
    model = small_model(family)
    inputs = grouped_inputs()
    assert supports_shared_prefix(model)
    logprobs, entropy = grouped_token_logprobs(model, **inputs, temperature=TEMPERATURE, return_entropy=True)
    expected_logprobs, expected_entropy = unshared(model, inputs, temperature=TEMPERATURE, return_entropy=True)
    assert logprobs.shape == entropy.shape == (NUM_PROMPTS, GROUP, COMPLETION_WIDTH)
    # Every position, padding included: keys, positions and masks are those of the unshared rows.
    torch.testing.assert_close(logprobs, expected_logprobs, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(entropy, expected_entropy, rtol=1e-5, atol=2e-6)
    assert not entropy.requires_grad
    # Temperature matters (so the equality above is not trivially at tau = 1).
    plain = grouped_token_logprobs(model, **inputs)
    assert (plain - logprobs).abs().max() > 1e-3


def embedded_sizes(model: torch.nn.Module, compute) -> list[int]:
    """The number of token positions of each forward pass the decoder runs during `compute()`."""
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda module, args, output: seen.append(args[0].numel()))
    try:
        compute()
    finally:
        hook.remove()
    return seen


def test_each_prompt_runs_once(monkeypatch):
    """The decoder sees each prompt once and B*G*(T-1) completion tokens, not B*G*(P+T): the
    prompts' real tokens one prompt at a time when padding is more than UNPAD_PROMPTS_ABOVE of
    the prompt cells (here 8 of 27), else the B*P padded prompt cells in one pass."""
    model, inputs = small_model(), grouped_inputs()
    completions = NUM_PROMPTS * GROUP * (COMPLETION_WIDTH - 1)
    seen = embedded_sizes(model, lambda: grouped_token_logprobs(model, **inputs))
    assert seen == [*PROMPT_LENGTHS, completions]
    monkeypatch.setattr("grpo.logprobs.UNPAD_PROMPTS_ABOVE", 0.5)
    seen = embedded_sizes(model, lambda: grouped_token_logprobs(model, **inputs))
    assert seen == [NUM_PROMPTS * PROMPT_WIDTH, completions]


def test_unpadded_prompts_give_the_padded_batch_values_and_gradients(monkeypatch):
    """Running the prompts one by one on their real tokens changes only float rounding: log-probs,
    entropies and LoRA gradients equal those of the padded batched prompt forward."""
    model = attach_lora(small_model(seed=6), LoraSettings(r=4, alpha=8))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # non-zero B: the adapter changes the prompts' keys and values
            torch.nn.init.normal_(parameter, std=0.1)
    inputs = grouped_inputs(seed=2)

    def compute(current_model):
        return grouped_token_logprobs(current_model, **inputs, temperature=TEMPERATURE)

    unpadded = gradients(model, compute)
    unpadded_values = compute(model).detach()
    monkeypatch.setattr("grpo.logprobs.UNPAD_PROMPTS_ABOVE", 1.0)  # never unpad
    assert embedded_sizes(model, lambda: compute(model))[0] == NUM_PROMPTS * PROMPT_WIDTH
    torch.testing.assert_close(unpadded_values, compute(model).detach(), rtol=1e-5, atol=2e-6)
    assert_gradients_equal(unpadded, gradients(model, compute))


def test_lora_gradients_equal_the_unshared_forward():
    model = attach_lora(small_model(seed=4), LoraSettings(r=4, alpha=8))
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():  # B = 0 would give A no gradient
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    inputs = grouped_inputs(seed=1)
    shared = gradients(model, lambda m: grouped_token_logprobs(m, **inputs, temperature=TEMPERATURE))
    reference = gradients(model, lambda m: unshared(m, inputs, temperature=TEMPERATURE))
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert_gradients_equal(shared, reference)


def test_full_parameter_gradients_equal_the_unshared_forward():
    """Every weight, the embeddings and the prompt-only path through the last layer included."""
    model = small_model(seed=7)
    inputs = grouped_inputs(seed=2)
    shared = gradients(model, lambda m: grouped_token_logprobs(m, **inputs, temperature=TEMPERATURE))
    reference = gradients(model, lambda m: unshared(m, inputs, temperature=TEMPERATURE))
    assert len(shared) == len(list(model.parameters()))
    assert_gradients_equal(shared, reference)


def test_layers_that_rebuild_their_keyword_arguments_still_share():
    """FSDP copies dataclass/list keyword arguments before each layer's forward (torch's
    `_apply_to_tensors`); the prompt prefix must survive that, call count included."""
    from torch.distributed.utils import _apply_to_tensors

    model = small_model()
    def rebuild(module, args, kwargs):
        return args, _apply_to_tensors(lambda tensor: tensor, kwargs)

    hooks = [layer.register_forward_pre_hook(rebuild, with_kwargs=True) for layer in model.model.layers]
    inputs = grouped_inputs()
    try:
        shared = grouped_token_logprobs(model, **inputs)
    finally:
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(shared, unshared(model, inputs), rtol=1e-5, atol=2e-6)


def test_unsupported_family_falls_back_to_the_unshared_forward():
    """Sliding-window layers cannot share the prompt cache this way: same result, unshared."""
    model = small_model(use_sliding_window=True, sliding_window=3, max_window_layers=1)
    assert not supports_shared_prefix(model)
    inputs = grouped_inputs()
    torch.testing.assert_close(grouped_token_logprobs(model, **inputs), unshared(model, inputs), rtol=1e-5, atol=2e-6)


def test_one_token_completions_and_inputs_untouched():
    """T = 1 needs no completion pass (the prompt's last state predicts it); inputs are not mutated."""
    model = small_model()
    inputs = {key: value[..., :1] if key.startswith("completion") else value for key, value in grouped_inputs().items()}
    inputs["completion_mask"] = torch.ones_like(inputs["completion_mask"])
    before = {key: value.clone() for key, value in inputs.items()}
    torch.testing.assert_close(grouped_token_logprobs(model, **inputs), unshared(model, inputs), rtol=1e-5, atol=2e-6)
    assert all(torch.equal(inputs[key], before[key]) for key in inputs)


def test_bad_inputs_raise_clear_errors():
    model = small_model()
    inputs = grouped_inputs()
    with pytest.raises(ValueError, match=r"\[B, G, T\]"):
        grouped_token_logprobs(model, **{**inputs, "completion_ids": inputs["completion_ids"][0]})
    with pytest.raises(ValueError, match="prompts"):
        grouped_token_logprobs(model, **{**inputs, "completion_ids": inputs["completion_ids"][:2],
                                         "completion_mask": inputs["completion_mask"][:2]})
    empty = inputs["prompt_mask"].clone()
    empty[1] = 0
    with pytest.raises(ValueError, match=r"prompts \[1\] have no real token"):
        grouped_token_logprobs(model, **{**inputs, "prompt_mask": empty})
    with pytest.raises(ValueError, match="temperature"):
        grouped_token_logprobs(model, **inputs, temperature=0.0)


# ----------------------------------------------------------------------------------------------
# The trainer: whole-group micro-batches, share_prefix on == off
# ----------------------------------------------------------------------------------------------


def step_batch(rows: int, group_size: int) -> update_mod.StepBatch:
    return update_mod.StepBatch(input_ids=torch.arange(rows)[:, None].repeat(1, 5), attention_mask=torch.ones(rows, 5),
                             completion_mask=torch.ones(rows, 2), advantages=torch.zeros(rows), prompt_length=3,
                             group_size=group_size)


@pytest.mark.parametrize("size,whole_groups,expected", [
    (16, True, [(12, 4)]),  # everything fits
    (8, True, [(8, 4), (4, 4)]),  # two groups, then one
    (5, True, [(4, 4)] * 3),  # rounded down to whole groups
    (3, True, [(3, 3), (1, 1)] * 3),  # smaller than a group: parts of one group
    (5, False, [(5, 1), (5, 1), (2, 1)]),  # share_prefix off: plain pieces, no group structure
])
def test_micro_batches_hold_whole_groups(size, whole_groups, expected):
    pieces = update_mod._micro_batches(step_batch(12, 4), size, whole_groups=whole_groups)
    assert [(piece.input_ids.shape[0], piece.group_size) for piece in pieces] == expected
    assert torch.cat([piece.input_ids[:, 0] for piece in pieces]).tolist() == list(range(12))


def test_group_rows_with_different_prompts_are_refused():
    batch = dataclasses.replace(step_batch(8, 4), input_ids=torch.randint(0, VOCAB, (8, 5)))
    policy = SimpleNamespace(model=small_model())
    with pytest.raises(ValueError, match="rows of a group hold different prompts"):
        update_mod._sequence_logprobs(policy, batch, 1.0)


@pytest.fixture(scope="module")
def word_policy():
    tokenizer = build_word_tokenizer()
    model = varied(build_tiny_model(tokenizer, TINY, seed=0), seed=5)
    policy = policy_from_model(model, tokenizer, base="unsaved", lora=LoraSettings(r=4, alpha=8))
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, parameter in policy.model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return policy


def length_reward(texts: list[str], targets: list[dict]) -> list[RewardResult]:
    """Deterministic rewards with spread inside each group."""
    return [RewardResult(total=float(len(text) % 5), components={}, success=False, kind="answer") for text in texts]


def rollout_batches(policy, config: trainer.GRPOConfig) -> list[update_mod.StepBatch]:
    generator = torch.Generator().manual_seed(0)
    prompts = [prompts_mod.Prompt(sample=SimpleNamespace(target={}),
                              prompt_ids=torch.randint(16, len(policy.tokenizer), (length,), generator=generator).tolist())
               for length in (5, 11, 8)]
    batches, _, _, _ = step_mod.rollout_and_score(policy, prompts, config, step=0, reward_fn=length_reward,
                                                 device=torch.device("cpu"))
    return batches


def test_min_new_tokens_forces_the_completion_length(word_policy):
    config = trainer.GRPOConfig(group_size=4, max_new_tokens=7, min_new_tokens=7, rollout_batch_prompts=2)
    batches = rollout_batches(word_policy, config)
    assert [batch.group_size for batch in batches] == [4, 4]  # chunks of 2 and 1 prompts
    assert all(bool((batch.completion_mask.sum(-1) == 7).all()) for batch in batches)


@pytest.mark.parametrize("loss_type,micro_batch", [("grpo", 16), ("dapo", 4), ("dr_grpo", 3), ("grpo", 5)])
def test_policy_update_with_and_without_prefix_sharing_agree(word_policy, loss_type, micro_batch):
    """One real rollout (ragged lengths, two chunks), then the same update both ways."""
    config = trainer.GRPOConfig(group_size=4, max_new_tokens=8, rollout_batch_prompts=2, loss_type=loss_type,
                                temperature=0.8, train_micro_batch=micro_batch, max_grad_norm=0.0)
    batches = rollout_batches(word_policy, config)
    lengths = torch.cat([batch.completion_mask.sum(-1) for batch in batches])
    assert lengths.min() < lengths.max()  # ragged completions: padding is exercised

    results = {}
    for share_prefix in (True, False):
        policy = dataclasses.replace(word_policy, model=copy.deepcopy(word_policy.model))
        trainable = [parameter for parameter in policy.model.parameters() if parameter.requires_grad]
        optimizer = torch.optim.SGD(trainable, lr=0.5)
        metrics = update_mod.policy_update(policy, batches, dataclasses.replace(config, share_prefix=share_prefix),
                                        optimizer)
        assert metrics["nonfinite_loss"] is False
        results[share_prefix] = (metrics, [parameter.grad.clone() for parameter in trainable],
                                 [parameter.detach().clone() for parameter in trainable])
    (shared_metrics, shared_grads, shared_weights), (metrics, grads, weights) = results[True], results[False]
    assert shared_metrics["loss"] == pytest.approx(metrics["loss"], rel=1e-5, abs=1e-7)
    assert shared_metrics["entropy"] == pytest.approx(metrics["entropy"], rel=1e-5)
    assert any(float(grad.abs().max()) > 0 for grad in grads)
    for grad, expected in zip(shared_grads, grads):
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-7)
    for weight, expected in zip(shared_weights, weights):
        torch.testing.assert_close(weight, expected, rtol=1e-5, atol=1e-7)


def scaled_length_reward(texts: list[str], targets: list[dict]) -> list[RewardResult]:
    """Rewards whose spread inside a group is set by the group's target (0: a zero-variance group)."""
    return [RewardResult(total=target["scale"] * float(len(text) % 5), components={}, success=False, kind="answer")
            for text, target in zip(texts, targets)]


def test_oversample_trains_on_the_groups_whose_rewards_vary_most(word_policy):
    from grpo.advantages import group_advantages, most_varied_groups

    generator = torch.Generator().manual_seed(1)
    prompts = [prompts_mod.Prompt(sample=SimpleNamespace(target={"scale": scale}),
                              prompt_ids=torch.randint(16, len(word_policy.tokenizer), (length,), generator=generator).tolist())
               for scale, length in zip((0.0, 1.0, 3.0, 0.1, 2.0, 5.0), (5, 11, 8, 6, 9, 7))]

    def run(oversample: int):
        config = trainer.GRPOConfig(group_size=4, max_new_tokens=8, rollout_batch_prompts=4, oversample=oversample)
        return step_mod.rollout_and_score(word_policy, prompts, config, step=3, reward_fn=scaled_length_reward,
                                         device=torch.device("cpu"))

    every_batch, every_reward, _, _ = run(1)
    batches, rewards, metrics, records = run(2)
    # The same completions are sampled either way; the metrics and records describe all 6 groups.
    assert torch.equal(rewards, every_reward) and rewards.shape == (6, 4) and len(records) == 24
    kept = most_varied_groups(rewards, 3).tolist()
    assert 0 not in kept and 3 not in kept  # the zero-variance and the nearly constant group are dropped
    assert metrics["select/group_std_kept"] > metrics["select/group_std_all"]

    def rows_of(step_batches, groups):
        rows = [(batch, i) for batch in step_batches for i in range(batch.input_ids.shape[0])]
        return [rows[g * 4 + j] for g in groups for j in range(4)]

    expected = rows_of(every_batch, kept)
    got = rows_of(batches, range(3))
    assert len(got) == sum(batch.input_ids.shape[0] for batch in batches) == 12
    for (want_batch, want_row), (got_batch, got_row) in zip(expected, got):
        assert torch.equal(got_batch.input_ids[got_row], want_batch.input_ids[want_row])
        assert torch.equal(got_batch.completion_mask[got_row], want_batch.completion_mask[want_row])
    advantages = torch.cat([batch.advantages for batch in batches])
    assert torch.allclose(advantages, group_advantages(rewards[kept]).flatten())


def test_oversample_must_be_positive_and_is_refused_with_fsdp():
    with pytest.raises(ValueError, match="oversample"):
        trainer.GRPOConfig(oversample=0)
    with pytest.raises(ValueError, match="--oversample > 1 is not supported with --fsdp"):
        trainer.GRPOConfig(oversample=2, fsdp=True, lora=False)
    assert trainer.GRPOConfig(oversample=1, fsdp=True, lora=False).oversample == 1
