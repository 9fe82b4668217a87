"""Tests for grpo.rollout: the hand-written sampler.

The correctness anchor is greedy equality with transformers' `generate` on each prompt alone.
Most tests use a small word-level vocabulary (fast, and frequent enough tokens to make stop
conditions fire); the anchor also runs with the real Qwen3 tokenizer when ../shared has it.
Models are tiny random Qwen3s with weights re-drawn at std 0.15, so that greedy decoding does not
just repeat its last input token (the default 0.02 init with tied embeddings does).
Stops, padding, housekeeping and the common-prefix prefill: tests/test_rollout_stops.py.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from grpo.logprobs import token_logprobs  # noqa: E402
from grpo.policy import policy_from_model  # noqa: E402
from grpo.rollout import Rollout, SamplingConfig, filter_logits, generate  # noqa: E402
from grpo.tiny import build_tiny_model  # noqa: E402
from tests.test_policy import QWEN3_TOKENIZER, SMALL_LORA, TINY, build_word_tokenizer, make_tokenizer  # noqa: E402

PROMPT_LENGTHS = (3, 7, 12)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def varied_model(tokenizer, seed: int = 0):
    model = build_tiny_model(tokenizer, TINY, seed=seed)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.15)
    return model


def random_prompts(vocab_size: int, lengths=PROMPT_LENGTHS, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    # Skip the first 16 ids (special tokens of the word tokenizer).
    return [torch.randint(16, vocab_size, (length,), generator=generator).tolist() for length in lengths]


def completion(rollout: Rollout, prompt: int, sample: int) -> list[int]:
    mask = rollout.completion_mask[prompt, sample].bool()
    return rollout.completion_ids[prompt, sample][mask].tolist()


def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos_ids: list[int], pad_token_id: int) -> list[int]:
    """transformers' greedy generate on one unpadded prompt, cut after the first EOS."""
    output = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_ids,
                            pad_token_id=pad_token_id)
    new_tokens = output[0, len(prompt):].tolist()
    for index, token in enumerate(new_tokens):
        if token in eos_ids:
            return new_tokens[:index + 1]
    return new_tokens


@pytest.fixture(scope="module")
def word_tokenizer():
    return build_word_tokenizer()


@pytest.fixture(scope="module")
def word_model(word_tokenizer):
    return varied_model(word_tokenizer, seed=0)


@pytest.fixture(scope="module")
def word_prompts(word_tokenizer):
    return random_prompts(len(word_tokenizer))


def run(model, prompts, tokenizer, *, stop_token_ids=(), stop_sequences=(), seed=0, **config):
    config.setdefault("group_size", 2)
    config.setdefault("max_new_tokens", 10)
    generator = torch.Generator().manual_seed(seed)
    return generate(model, prompts, SamplingConfig(**config), pad_token_id=tokenizer.pad_token_id,
                    stop_token_ids=list(stop_token_ids), stop_sequences=stop_sequences, generator=generator)


# ----------------------------------------------------------------------------------------------
# The anchor: greedy == transformers generate
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocabulary,share_prefix", [("words", True), ("words", False), ("qwen3", True)])
def test_greedy_equals_transformers_generate_per_prompt(vocabulary, share_prefix, word_tokenizer):
    if vocabulary == "qwen3" and not QWEN3_TOKENIZER.is_dir():
        pytest.skip(f"the Qwen3 tokenizer is not at {QWEN3_TOKENIZER}")
    tokenizer = word_tokenizer if vocabulary == "words" else make_tokenizer()
    model = varied_model(tokenizer, seed=1)
    prompts = random_prompts(len(tokenizer), seed=1)
    max_new_tokens = 12
    # Make the token that prompt 0 emits third a stop id, so rows stop at different steps (and the
    # stopped rows are dropped from the decode batch while others go on).
    free_run = [hf_greedy(model, prompt, max_new_tokens, [], tokenizer.pad_token_id) for prompt in prompts]
    stop_id = free_run[0][2]
    eos_ids = [stop_id, tokenizer.eos_token_id]

    rollout, metrics = run(model, prompts, tokenizer, stop_token_ids=eos_ids, greedy=True, group_size=3,
                           max_new_tokens=max_new_tokens, share_prefix=share_prefix)
    assert rollout.completion_ids.shape == (3, 3, max_new_tokens)
    stopped_early = False
    for index, prompt in enumerate(prompts):
        expected = hf_greedy(model, prompt, max_new_tokens, eos_ids, tokenizer.pad_token_id)
        for sample in range(3):
            assert completion(rollout, index, sample) == expected, (vocabulary, index, sample)
            # The mask is a prefix of ones; pads after it.
            length = len(expected)
            assert rollout.completion_mask[index, sample, :length].all()
            assert not rollout.completion_mask[index, sample, length:].any()
            assert (rollout.completion_ids[index, sample, length:] == tokenizer.pad_token_id).all()
            assert bool(rollout.finished[index, sample]) == (expected[-1] in eos_ids)
        stopped_early |= len(expected) < max_new_tokens
    # Prompt 0's whole group stops after 3 tokens while the others go on: the decoder drops rows
    # and prompts from its batch and cache mid-rollout.
    assert stopped_early and len(completion(rollout, 0, 0)) == 3
    assert metrics["rollout/tokens"] == float(rollout.completion_mask.sum())


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
def test_greedy_equals_generate_on_other_architectures(family):
    """Other policy models: llama takes the shared-prefix path; mistral (sliding-window config) and
    gemma2 (sliding layers, soft-capped logits) take the repeated-cache path."""
    import transformers

    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
    }[family]
    config = config_class(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=64, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = model_class(config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.15)
    prompts = random_prompts(200, lengths=(4, 9), seed=2)
    rollout, _ = generate(model, prompts, SamplingConfig(group_size=2, max_new_tokens=8, greedy=True),
                          pad_token_id=0, stop_token_ids=[1])
    for index, prompt in enumerate(prompts):
        assert completion(rollout, index, 1) == hf_greedy(model, prompt, 8, [1], 0), (family, index)


def test_greedy_on_fresh_lora_policy_equals_plain_model(word_tokenizer, word_model, word_prompts):
    import copy

    policy = policy_from_model(copy.deepcopy(word_model), word_tokenizer, base="unused", lora=SMALL_LORA)
    plain, _ = run(word_model, word_prompts, word_tokenizer, greedy=True)
    with_lora, _ = run(policy.model, word_prompts, word_tokenizer, greedy=True)
    assert torch.equal(plain.completion_ids, with_lora.completion_ids)


def test_lora_folding_and_cache_sharing_do_not_change_the_samples(word_tokenizer, word_model, word_prompts):
    import copy

    from grpo.policy import reference_mode

    policy = policy_from_model(copy.deepcopy(word_model), word_tokenizer, base="unused", lora=SMALL_LORA)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in policy.model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    lora_layers = [module for module in policy.model.modules() if hasattr(module, "lora_A")]
    weights_before = [(layer.base_layer.weight, layer.base_layer.weight.data.clone()) for layer in lora_layers]
    data_before = [layer.base_layer.weight.data_ptr() for layer in lora_layers]
    trainable_before = [name for name, parameter in policy.model.named_parameters() if parameter.requires_grad]

    stops = [word_tokenizer.convert_tokens_to_ids("the")]
    results = {}
    for merge_lora in (True, False):
        for share_prefix in (True, False):
            results[merge_lora, share_prefix], _ = run(
                policy.model, word_prompts, word_tokenizer, stop_token_ids=stops, seed=9, group_size=4,
                merge_lora=merge_lora, share_prefix=share_prefix)
    reference = results[False, False]
    for key, rollout in results.items():
        assert torch.equal(rollout.completion_ids, reference.completion_ids), key
        torch.testing.assert_close(rollout.sampling_logprobs, reference.sampling_logprobs, atol=1e-4, rtol=1e-4)
    # The adapter matters here (so folding it in was really exercised) ...
    plain, _ = run(word_model, word_prompts, word_tokenizer, stop_token_ids=stops, seed=9, group_size=4)
    assert not torch.equal(plain.completion_ids, reference.completion_ids)
    # ... and the policy is exactly as before: same weight tensors, values, flags, trainable set.
    for layer, (parameter, values) in zip(lora_layers, weights_before):
        assert layer.base_layer.weight is parameter and torch.equal(parameter.data, values)
        assert not layer.disable_adapters
    assert [layer.base_layer.weight.data_ptr() for layer in lora_layers] == data_before
    assert trainable_before == [name for name, parameter in policy.model.named_parameters() if parameter.requires_grad]
    # Under reference_mode (adapter off) nothing is folded in: the rollout is the base model's.
    with reference_mode(policy):
        in_reference, _ = run(policy.model, word_prompts, word_tokenizer, stop_token_ids=stops, seed=9, group_size=4)
    assert torch.equal(in_reference.completion_ids, plain.completion_ids)


def test_top_k_one_equals_greedy(word_tokenizer, word_model, word_prompts):
    stops = [word_tokenizer.eos_token_id]
    greedy, _ = run(word_model, word_prompts, word_tokenizer, stop_token_ids=stops, greedy=True)
    top_one, _ = run(word_model, word_prompts, word_tokenizer, stop_token_ids=stops, top_k=1, temperature=0.7)
    assert torch.equal(greedy.completion_ids, top_one.completion_ids)
    assert torch.equal(greedy.completion_mask, top_one.completion_mask)
    # Sampling from a one-token distribution: every sampled token has probability 1.
    assert torch.allclose(top_one.sampling_logprobs, torch.zeros_like(top_one.sampling_logprobs))


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_and_seeds_differ(word_tokenizer, word_model, word_prompts):
    first, _ = run(word_model, word_prompts, word_tokenizer, seed=7, group_size=4)
    again, _ = run(word_model, word_prompts, word_tokenizer, seed=7, group_size=4)
    other, _ = run(word_model, word_prompts, word_tokenizer, seed=8, group_size=4)
    for field in ("completion_ids", "completion_mask", "finished", "sampling_logprobs"):
        assert torch.equal(getattr(first, field), getattr(again, field)), field
    assert not torch.equal(first.completion_ids, other.completion_ids)
    # The G samples of one prompt are different draws, not copies.
    assert not torch.equal(first.completion_ids[0, 0], first.completion_ids[0, 1])


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sampling_logprobs_equal_full_forward_logprobs(word_tokenizer, word_model, word_prompts, temperature):
    # A frequent stop token makes rows end at different steps: the recomputation also checks the
    # cache bookkeeping when finished rows leave the decode batch.
    stop_ids = [word_tokenizer.convert_tokens_to_ids("the"), word_tokenizer.eos_token_id]
    rollout, _ = run(word_model, word_prompts, word_tokenizer, stop_token_ids=stop_ids, seed=3, group_size=4,
                     max_new_tokens=8, temperature=temperature)
    lengths = rollout.completion_lengths
    assert lengths.min() < lengths.max(), "expected rows of different lengths"
    num_prompts, group_size, max_new_tokens = rollout.completion_ids.shape
    prompt_ids = rollout.prompt_ids.repeat_interleave(group_size, dim=0)
    prompt_mask = rollout.prompt_mask.repeat_interleave(group_size, dim=0)
    input_ids = torch.cat([prompt_ids, rollout.completion_ids.reshape(-1, max_new_tokens)], dim=1)
    attention_mask = torch.cat([prompt_mask, rollout.completion_mask.reshape(-1, max_new_tokens)], dim=1)
    with torch.no_grad():
        recomputed = token_logprobs(word_model, input_ids, attention_mask, completion_start=prompt_ids.shape[1],
                                    temperature=temperature)
    mask = rollout.completion_mask.reshape(-1, max_new_tokens).bool()
    sampled = rollout.sampling_logprobs.reshape(-1, max_new_tokens)
    torch.testing.assert_close(sampled[mask], recomputed[mask], atol=1e-4, rtol=1e-4)
    assert (sampled[~mask] == 0).all()


def test_top_k_samples_only_the_k_most_likely_tokens(word_tokenizer, word_model, word_prompts):
    rollout, _ = run(word_model, word_prompts, word_tokenizer, seed=5, group_size=4, top_k=3, temperature=2.0)
    num_prompts, group_size, max_new_tokens = rollout.completion_ids.shape
    prompt_ids = rollout.prompt_ids.repeat_interleave(group_size, dim=0)
    input_ids = torch.cat([prompt_ids, rollout.completion_ids.reshape(-1, max_new_tokens)], dim=1)
    attention_mask = torch.cat([rollout.prompt_mask.repeat_interleave(group_size, dim=0),
                                torch.ones_like(rollout.completion_ids.reshape(-1, max_new_tokens))], dim=1)
    from grpo.hf_compat import position_ids_from_mask

    with torch.no_grad():
        logits = word_model(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids_from_mask(attention_mask)).logits
    step_logits = logits[:, prompt_ids.shape[1] - 1:-1]
    chosen = step_logits.gather(-1, input_ids[:, prompt_ids.shape[1]:, None]).squeeze(-1)
    rank = (step_logits > chosen.unsqueeze(-1)).sum(-1)  # how many tokens beat the sampled one
    assert (rank < 3).all()
    assert (rank > 0).any(), "temperature 2 should sometimes pick a non-argmax token"


def test_filter_logits_by_hand():
    probabilities = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probabilities.log()
    # Nucleus 0.8: sorted 0.5, 0.3 reach 0.8 -> keep those two.
    kept = filter_logits(logits, 1.0, 0, 0.8).isfinite()
    assert kept.tolist() == [[False, True, False, True]]
    kept = filter_logits(logits, 1.0, 0, 0.81).isfinite()
    assert kept.tolist() == [[False, True, True, True]]
    # Tiny top-p still keeps the most likely token.
    assert filter_logits(logits, 1.0, 0, 0.01).isfinite().tolist() == [[False, True, False, False]]
    assert filter_logits(logits, 1.0, 2, 1.0).isfinite().tolist() == [[False, True, False, True]]
    # Temperature divides the logits before any filter.
    torch.testing.assert_close(filter_logits(logits, 0.5, 0, 1.0), logits / 0.5)
