"""Tests for grpo.rollout, continued: stop tokens and sequences, padding, housekeeping (training
flags, bad inputs) and the prompts' common prefix prefilled once.

The word-level tokenizer, the tiny model and the helpers are those of tests/test_rollout.py.
"""

from __future__ import annotations

import pytest
import torch

from grpo.logprobs import token_logprobs
from grpo.rollout import SamplingConfig, left_pad
from tests.test_rollout import (  # noqa: F401 (word_model, word_prompts, word_tokenizer: fixtures)
    PROMPT_LENGTHS, completion, hf_greedy, random_prompts, run, word_model, word_prompts, word_tokenizer,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ----------------------------------------------------------------------------------------------
# Stops
# ----------------------------------------------------------------------------------------------


def test_eos_inside_the_prompt_does_not_stop_generation(word_tokenizer, word_model):
    eos = word_tokenizer.eos_token_id
    prompts = [[20, eos, 21, 22, eos], [eos]]
    free, _ = run(word_model, prompts, word_tokenizer, greedy=True)
    assert all(token != eos for token in completion(free, 0, 0)), "pick prompts whose greedy run avoids EOS"
    rollout, _ = run(word_model, prompts, word_tokenizer, stop_token_ids=[eos], greedy=True)
    assert rollout.completion_lengths[0].tolist() == [10, 10]
    assert not rollout.finished[0].any()
    # A stop sequence whose first token ends the prompt is not completed by the first generated token.
    first_generated = completion(free, 0, 0)[0]
    rollout, _ = run(word_model, prompts, word_tokenizer, stop_sequences=[[eos, first_generated]], greedy=True)
    assert rollout.completion_lengths[0].tolist() == [10, 10]


def test_stop_sequences_stop_and_are_included_in_the_mask(word_tokenizer, word_model, word_prompts):
    free, _ = run(word_model, word_prompts, word_tokenizer, greedy=True, max_new_tokens=10)
    reference = completion(free, 1, 0)
    stop = reference[3:5]
    # Expected end: the first place where `stop` ends in the free run.
    end = next(index + len(stop) for index in range(len(reference)) if reference[index:index + len(stop)] == stop)
    rollout, _ = run(word_model, word_prompts, word_tokenizer, greedy=True, max_new_tokens=10,
                     stop_sequences=[[999_999_999, 1, 2], stop])  # an unmatchable longer one too
    assert completion(rollout, 1, 0) == reference[:end]
    assert rollout.completion_mask[1, 0].tolist() == [1] * end + [0] * (10 - end)
    assert rollout.finished[1].all()


def test_a_completion_whose_first_token_is_eos_has_length_one(word_tokenizer, word_model, word_prompts):
    free, _ = run(word_model, word_prompts, word_tokenizer, greedy=True)
    first = completion(free, 0, 0)[0]
    rollout, _ = run(word_model, word_prompts, word_tokenizer, greedy=True, stop_token_ids=[first])
    assert rollout.completion_mask[0].tolist() == [[1] + [0] * 9] * 2
    assert rollout.completion_ids[0, :, 0].tolist() == [first, first]
    assert (rollout.completion_ids[0, :, 1:] == word_tokenizer.pad_token_id).all()
    assert rollout.finished[0].all() and rollout.sampling_logprobs[0, :, 0].lt(0).all()
    # min_new_tokens bans stop tokens until then: that token never appears in the first 3 places.
    delayed, _ = run(word_model, word_prompts, word_tokenizer, greedy=True, stop_token_ids=[first],
                     min_new_tokens=3)
    assert (delayed.completion_lengths >= 3).all()
    assert not (delayed.completion_ids[:, :, :3] == first).any()


def test_zero_max_new_tokens_gives_empty_tensors(word_tokenizer, word_model, word_prompts):
    rollout, metrics = run(word_model, word_prompts, word_tokenizer, max_new_tokens=0, group_size=3)
    assert rollout.completion_ids.shape == (3, 3, 0) and rollout.sampling_logprobs.shape == (3, 3, 0)
    assert rollout.completion_mask.shape == (3, 3, 0) and not rollout.finished.any()
    assert rollout.prompt_ids.shape == (3, max(PROMPT_LENGTHS)) and metrics["rollout/tokens"] == 0


def test_left_padding_and_prompt_tensors(word_tokenizer, word_model):
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    rollout, _ = run(word_model, [[5, 6, 7], [8]], word_tokenizer, max_new_tokens=2)
    assert torch.equal(rollout.prompt_ids, torch.tensor([[5, 6, 7], [word_tokenizer.pad_token_id] * 2 + [8]]))
    assert torch.equal(rollout.prompt_mask, mask)


# ----------------------------------------------------------------------------------------------
# Housekeeping
# ----------------------------------------------------------------------------------------------


def test_training_flags_are_restored_and_inputs_untouched(word_tokenizer, word_model, word_prompts):
    word_model.train()
    word_model.model.layers[0].eval()  # a deliberately frozen submodule keeps its flag
    prompts = [list(prompt) for prompt in word_prompts]
    run(word_model, prompts, word_tokenizer)
    assert word_model.training and word_model.model.layers[1].training
    assert not word_model.model.layers[0].training
    assert prompts == word_prompts
    word_model.eval()


def test_bad_inputs_raise_clear_errors(word_tokenizer, word_model):
    with pytest.raises(ValueError, match="at least one prompt"):
        run(word_model, [], word_tokenizer)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        run(word_model, [[5], []], word_tokenizer)
    with pytest.raises(ValueError, match="vocabulary"):
        run(word_model, [[5, 10**6]], word_tokenizer)
    with pytest.raises(ValueError, match="stop sequence 0 is empty"):
        run(word_model, [[5]], word_tokenizer, stop_sequences=[[]])
    for bad in ({"temperature": 0.0}, {"top_p": 0.0}, {"top_k": -1}, {"group_size": 0}, {"max_new_tokens": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingConfig(**bad)


# ----------------------------------------------------------------------------------------------
# The prompts' common first tokens are prefilled once
# ----------------------------------------------------------------------------------------------


def test_common_prefix_length():
    from grpo.decoders import common_prefix_length

    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    # Each prompt keeps at least one token of its own: the prefill must end on it.
    assert common_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2
    assert common_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert common_prefix_length([[7, 2], [1, 2]]) == 0
    assert common_prefix_length([[1, 2, 3]]) == 0  # one prompt: nothing to share


def test_common_prefix_is_prefilled_once_and_changes_nothing(word_tokenizer, word_model):
    from grpo.decoders import MIN_COMMON_PREFIX

    shared = random_prompts(len(word_tokenizer), lengths=[MIN_COMMON_PREFIX + 8], seed=5)[0]
    own_lengths = [3, 9, 1, 6]
    prompts = [shared + own for own in random_prompts(len(word_tokenizer), lengths=own_lengths, seed=6)]
    max_new_tokens = 8
    positions = []
    hook = word_model.get_input_embeddings().register_forward_hook(
        lambda module, args, output: positions.append(args[0].shape))
    try:
        rollout, _ = run(word_model, prompts, word_tokenizer, greedy=True, group_size=2,
                         max_new_tokens=max_new_tokens, share_prefix=True)
    finally:
        hook.remove()
    # The shared tokens ran as one row; then every prompt's own tokens (left-padded to the longest).
    assert positions[0] == (1, len(shared))
    assert positions[1] == (len(prompts), max(own_lengths))
    for index, prompt in enumerate(prompts):
        expected = hf_greedy(word_model, prompt, max_new_tokens, [], word_tokenizer.pad_token_id)
        for sample in range(2):
            assert completion(rollout, index, sample) == expected, index

    # Sampled: the same draws as without prefix sharing, and log-probs equal to a full forward.
    sampled, _ = run(word_model, prompts, word_tokenizer, seed=4, group_size=3, max_new_tokens=max_new_tokens,
                     share_prefix=True)
    unshared, _ = run(word_model, prompts, word_tokenizer, seed=4, group_size=3, max_new_tokens=max_new_tokens,
                      share_prefix=False)
    assert torch.equal(sampled.completion_ids, unshared.completion_ids)
    torch.testing.assert_close(sampled.sampling_logprobs, unshared.sampling_logprobs, atol=1e-4, rtol=1e-4)
    num_prompts, group_size, _ = sampled.completion_ids.shape
    input_ids = torch.cat([sampled.prompt_ids.repeat_interleave(group_size, dim=0),
                           sampled.completion_ids.reshape(-1, max_new_tokens)], dim=1)
    attention_mask = torch.cat([sampled.prompt_mask.repeat_interleave(group_size, dim=0),
                                sampled.completion_mask.reshape(-1, max_new_tokens)], dim=1)
    with torch.no_grad():
        recomputed = token_logprobs(word_model, input_ids, attention_mask,
                                    completion_start=sampled.prompt_ids.shape[1])
    mask = sampled.completion_mask.reshape(-1, max_new_tokens).bool()
    torch.testing.assert_close(sampled.sampling_logprobs.reshape(-1, max_new_tokens)[mask], recomputed[mask],
                               atol=1e-4, rtol=1e-4)
