"""Tests of the KV cache kept across an episode's turns (grpo/episode_cache.py).

What is checked: after ragged extends and decode columns with pads, every row's next-token logits
equal a forward over that row's real tokens alone (before and after `compact`, and after rows
leave); episodes sampled with the cache are the episodes sampled by re-prefilling every turn
(same ids, loss masks and turn ends; log-probs equal up to float rounding), greedy and sampled;
and each turn runs only the tokens added since the last one.
"""

from __future__ import annotations

import pytest
import torch

import grpo.episode_cache as cache_mod
from data.synthetic.env import generate_tasks
from grpo.episode_cache import EpisodeCache, decode_turn
from grpo.episode_tokens import episode_task
from grpo.episodes import run_episodes
from grpo.flags import GRPOConfig
from grpo.hf_compat import causal_lm_of
from grpo.policy import load_tokenizer
from grpo.rollout import SamplingConfig
from tests.test_grpo_update import lora_policy  # noqa: F401  (the tiny policy with non-zero LoRA B)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def alone(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    """Logits [V] of the next token after `tokens`, one unpadded forward."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0, -1]


def test_logits_after_ragged_extends_and_pads_equal_each_row_alone(lora_policy):
    model = causal_lm_of(lora_policy.model).eval()
    generator = torch.Generator().manual_seed(3)
    vocab = model.config.vocab_size

    def tokens(n: int) -> list[int]:
        return torch.randint(1, vocab, (n,), generator=generator).tolist()

    rows = [tokens(7), tokens(3), tokens(12)]
    with torch.no_grad():
        cache = EpisodeCache(model, len(rows), pad_token_id=0)
        logits = cache.extend(rows)
        for row, sequence in enumerate(rows):
            assert torch.allclose(logits[row], alone(model, sequence), atol=1e-5)
        # Two decode columns: row 1 stops after the first one (a pad in the second column).
        for running in ([True, True, True], [True, False, True]):
            column = torch.tensor(tokens(3))
            running_mask = torch.tensor(running)
            logits = cache.step(column, running_mask)
            for row, sequence in enumerate(rows):
                if running[row]:
                    sequence.append(int(column[row]))
                    assert torch.allclose(logits[row], alone(model, sequence), atol=1e-5)
        assert cache.length.tolist() == [len(sequence) for sequence in rows]
        # Row 0 leaves; the other two get new tokens of different lengths (more left pads).
        cache.keep(torch.tensor([1, 2]))
        rows = rows[1:]
        new = [tokens(9), tokens(2)]
        logits = cache.extend(new)
        for row, (sequence, added) in enumerate(zip(rows, new)):
            sequence += added
            assert torch.allclose(logits[row], alone(model, sequence), atol=1e-5)
        width_before = cache.mask.shape[1]
        cache.compact()
        assert cache.mask.shape[1] == max(len(sequence) for sequence in rows) < width_before
        assert cache.mask.sum(-1).tolist() == [len(sequence) for sequence in rows]
        assert all(layer.keys.shape[2] == cache.mask.shape[1] for layer in cache.cache.layers)
        new = [tokens(1), tokens(4)]
        logits = cache.extend(new)
        for row, (sequence, added) in enumerate(zip(rows, new)):
            sequence += added
            assert torch.allclose(logits[row], alone(model, sequence), atol=1e-5)


def test_decode_turn_stops_rows_on_stop_tokens_and_stop_sequences(lora_policy):
    model = causal_lm_of(lora_policy.model).eval()
    vocab = model.config.vocab_size
    # Logits that force each row's tokens: row 0 says 5 then stop token 2, row 1 says 7 8 9 (stop
    # sequence [8, 9]), row 2 runs out of tokens.  The model's own logits are replaced by a script.
    script = {0: [5, 2], 1: [7, 8, 9], 2: [4, 4, 4, 4]}
    fed: list[list[int]] = []

    class Scripted:
        rows, pad_token_id = 3, 0
        position = [0, 0, 0]

        def step(self, tokens, running):
            fed.append([int(t) if r else None for t, r in zip(tokens, running)])
            for row in range(3):
                self.position[row] += int(running[row])
            return forced([self.position[row] for row in range(3)])

    def forced(positions: list[int]) -> torch.Tensor:
        logits = torch.full((3, vocab), -1e4)
        for row, at in enumerate(positions):
            logits[row, script[row][min(at, len(script[row]) - 1)]] = 0.0
        return logits

    sampled, logprobs, finished = decode_turn(Scripted(), forced([0, 0, 0]), SamplingConfig(group_size=1,
                                              max_new_tokens=4, greedy=True),
                                              stop_token_ids=[2], stop_sequences=[[8, 9]])
    assert sampled == [[5, 2], [7, 8, 9], [4, 4, 4, 4]]
    assert finished == [True, True, False]
    assert [len(row) for row in logprobs] == [2, 3, 4]
    # Stopping tokens are never fed; a stopped row feeds pads (None) from then on.
    assert fed == [[5, 7, 4], [None, 8, 4], [None, None, 4]]


@pytest.fixture(scope="module")
def made(tiny_base):
    tokenizer = load_tokenizer(tiny_base)
    tasks = generate_tasks(seed=0, n_train=40, n_test=4, n_ood=4, n_coldstart=100)["train"]
    return [episode_task(task, tokenizer) for task in tasks[:3]]


@pytest.mark.parametrize("greedy", [False, True])
def test_cached_episodes_are_the_episodes_sampled_by_reprefilling(monkeypatch, made, lora_policy, greedy):
    settings = dict(env="synthetic", group_size=2, prompts_per_step=3, rollout_batch_prompts=3, max_turns=4,
                    max_new_tokens=8, max_episode_tokens=4000, seed=11)
    sampling = SamplingConfig(group_size=1, max_new_tokens=8, greedy=greedy) if greedy else None
    extends: list[list[int]] = []
    real_extend = EpisodeCache.extend

    def spy_extend(self, new_tokens):
        extends.append([len(tokens) for tokens in new_tokens])
        return real_extend(self, new_tokens)

    monkeypatch.setattr(EpisodeCache, "extend", spy_extend)
    monkeypatch.setattr(cache_mod, "COMPACT_ABOVE", 0.0)  # compact before every turn: that path runs too
    cached, _ = run_episodes(lora_policy, made, GRPOConfig(**settings, episode_cache=True), step=2,
                             sampling=sampling)
    uncached, _ = run_episodes(lora_policy, made, GRPOConfig(**settings, episode_cache=False), step=2,
                               sampling=sampling)
    assert len(extends) >= 3  # several turns
    assert sum(len(episode.turn_spans) >= 3 for episode in cached) >= 2
    for left, right in zip(cached, uncached):
        assert left.input_ids == right.input_ids
        assert left.loss_mask == right.loss_mask and left.turn_finished == right.turn_finished
        assert left.record.transcript == right.record.transcript
        assert torch.allclose(torch.tensor(left.sampling_logprobs), torch.tensor(right.sampling_logprobs), atol=1e-4)
    # Turn 1 runs the first prompts; later turns only what each live episode gained since (the last
    # sampled token and the environment's segment), never the whole episode again.
    assert extends[0] == [len(episode.prompt_length * [0]) for episode in cached]
    longest_segment = max(end - start for episode in cached for start, end in _segments(episode))
    assert max(max(turn) for turn in extends[1:]) <= longest_segment + 1


def _segments(episode) -> list[tuple[int, int]]:
    """[start, end) of each environment segment of an episode (between its sampled turns)."""
    spans = episode.turn_spans
    return [(end, next_start) for (_, end), (next_start, _) in zip(spans, spans[1:])]


@pytest.mark.parametrize("episode_cache", [True, False])
def test_an_episode_samples_the_same_tokens_whichever_episodes_share_its_chunk(made, lora_policy, episode_cache):
    """Each episode draws from its own generator (derived_seed(seed, step, task position, g)), so
    rolling the three tasks out one chunk each, or all in one chunk, or starting from another
    position, samples the same episodes (the tiny model's rounding does not flip a token here)."""
    settings = dict(env="synthetic", group_size=2, prompts_per_step=3, max_turns=4, max_new_tokens=8,
                    max_episode_tokens=4000, seed=5, episode_cache=episode_cache)
    together, _ = run_episodes(lora_policy, made, GRPOConfig(**settings, rollout_batch_prompts=3), step=1)
    apart, _ = run_episodes(lora_policy, made, GRPOConfig(**settings, rollout_batch_prompts=1), step=1)
    last_alone, _ = run_episodes(lora_policy, made[2:], GRPOConfig(**settings, rollout_batch_prompts=1), step=1,
                                 first_position=2)
    assert sum(len(episode.turn_spans) >= 2 for episode in together) >= 2  # several turns, sampled
    for left, right in zip(together, apart):
        assert left.input_ids == right.input_ids and left.record.transcript == right.record.transcript
    assert [episode.input_ids for episode in last_alone] == [episode.input_ids for episode in together[4:]]
    # ...and the episodes of a group, and of other steps, differ.
    assert together[0].input_ids != together[1].input_ids
    other_step, _ = run_episodes(lora_policy, made, GRPOConfig(**settings, rollout_batch_prompts=3), step=2)
    assert [episode.input_ids for episode in other_step] != [episode.input_ids for episode in together]
