"""Behaviour that had no test (issue 16), pinned where it is implemented: rewards, prompts, loaders.

* make_reward_fn passes the weights, the length switch and the similarity choice on.
* decode_completions drops the final stop token before the reward sees the text.
* prompt_batches reshuffles per epoch and wraps around when a step needs more prompts than exist.
* eval.run --trust-remote-code reaches the model and tokenizer loaders.
* Similarity models load from safetensors only (a pytorch_model.bin is refused).

The trainer tests' tiny model and data (tests/conftest.py); every run is a step or a few.
"""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

import grpo.trainer as trainer
import grpo.prompts as prompts_mod
import grpo.rollout as rollout_mod
import grpo.step as step_mod
from tests.test_pinned_trainer import fixed_rewards
from tests.test_pinned_update import full_policy  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


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
