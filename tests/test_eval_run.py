"""eval.run: command-line plumbing, eval.evaluate's bookkeeping with a scripted sampler, and the CLI
end to end on a tiny random model."""

from __future__ import annotations

import dataclasses
import json
import types

import pytest

from eval.evaluate import PromptJob, length_sorted_batches
from eval.metrics import TABLE_COLUMNS, TurnRecord, aggregate
from eval.run import (
    gather_list_flags,
    parse_checkpoints,
    predictions_path,
    split_names,
)

# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def test_gather_list_flags_repeated_multi_and_inline():
    argv = ["--checkpoint", "a=x", "b=y", "--limit", "3", "--data=synthetic:test", "--checkpoint=c=z",
            "--data", "p/q.json", "--out", "o"]
    assert gather_list_flags(argv) == ["--limit", "3", "--out", "o", "--checkpoint", "a=x,b=y,c=z",
                                       "--data", "synthetic:test,p/q.json"]
    assert gather_list_flags(["--limit", "2"]) == ["--limit", "2"]
    assert gather_list_flags(["--checkpoint"]) == ["--checkpoint"]  # argparse then reports the missing value


def test_parse_checkpoints():
    assert parse_checkpoints("sft=runs/a, rl=runs/b", None) == {"sft": "runs/a", "rl": "runs/b"}
    assert parse_checkpoints("untrained=base,rl=r", "M") == {"untrained": "M", "rl": "r"}
    assert parse_checkpoints("base", "M") == {"base": "M"}
    assert parse_checkpoints("", "M") == {"base": "M"}
    assert parse_checkpoints("x=a=b", None) == {"x": "a=b"}  # only the first '=' splits
    with pytest.raises(ValueError, match="no --model"):
        parse_checkpoints("base", None)
    with pytest.raises(ValueError, match="given twice"):
        parse_checkpoints("a=x,a=y", None)
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_checkpoints("runs/a", None)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        parse_checkpoints("", None)


def test_split_names_are_short_unique_and_file_safe(tmp_path):
    names = split_names(["synthetic:test", "synthetic:ood_test", "../shared/data/tau-bench-airline/",
                         "a/b/almita test.csv", "c/almita test.csv", "tau=x/trajectories.json", "d/k=v.json",
                         "trained:runs/default/grpo"])
    assert list(names) == ["test", "ood_test", "tau-bench-airline", "almita_test", "almita_test-2", "tau", "k_v",
                           "trained"]
    assert names["trained"] == "trained:runs/default/grpo"
    assert names["tau-bench-airline"] == "../shared/data/tau-bench-airline/"
    assert names["tau"] == "x/trajectories.json" and names["k_v"] == "d/k=v.json"
    assert predictions_path(tmp_path, "rl/seed 1", "test").name == "predictions-rl_seed_1-test.jsonl"


def test_length_sorted_batches_cover_every_job_once():
    jobs = [PromptJob(index=i, prompt_ids=[0] * length, dropped_turns=0) for i, length in enumerate([5, 1, 9, 3, 7])]
    batches = length_sorted_batches(jobs, 2)
    assert [[job.index for job in batch] for batch in batches] == [[2, 4], [0, 3], [1]]
    with pytest.raises(ValueError, match="batch_size"):
        length_sorted_batches(jobs, 0)


def test_batches_keep_prompts_that_start_alike_together():
    # Two "domains" (system prompts) whose lengths interleave: a batch never mixes them, so its
    # common first tokens (the system prompt) can be prefilled once.
    domain = {"a": [1] * 70, "b": [2] * 70}
    specs = [("a", 5), ("b", 9), ("a", 3), ("b", 7), ("a", 8), ("b", 1)]
    jobs = [PromptJob(index=i, prompt_ids=domain[name] + [0] * extra, dropped_turns=0)
            for i, (name, extra) in enumerate(specs)]
    batches = length_sorted_batches(jobs, 2)
    assert [[job.index for job in batch] for batch in batches] == [[1, 3], [5], [4, 0], [2]]
    assert sorted(job.index for batch in batches for job in batch) == list(range(len(jobs)))


# ---------------------------------------------------------------------------------------------
# evaluate() with a scripted sampler: every bookkeeping step checked against known completions
# ---------------------------------------------------------------------------------------------

import grpo.rollout as rollout_module  # noqa: E402


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from data import load_dataset
    from data.tokenizer import tokenizer_corpus, train_tokenizer

    conversations, _ = load_dataset("synthetic:train")
    return train_tokenizer(tokenizer_corpus(conversations[:30]), vocab_size=600)


@pytest.fixture(scope="module")
def test_samples():
    from data import load_dataset, make_samples

    conversations, _ = load_dataset("synthetic:test")
    return make_samples(conversations[:3])


def scripted_completion(index: int, target: dict) -> str:
    """Turn i of the test gets: a perfect action (i % 4 == 0), the other kind (1), garbage (2), or
    for tool turns the right name with changed arguments / for answers a paraphrase (3)."""
    from data.format import format_completion

    reasoning = "the user asked for this so I act now"
    if index % 4 == 0:
        return format_completion(target, reasoning)
    if index % 4 == 1:
        other = {"kind": "answer", "text": "Sure."} if target["kind"] == "tool_call" else \
            {"kind": "tool_call", "name": "lookup", "arguments": {}}
        return format_completion(other, reasoning)
    if index % 4 == 2:
        return "I am not following the format at all"
    if target["kind"] == "tool_call":
        return format_completion({**target, "arguments": {**target["arguments"], "extra": 1}}, reasoning)
    return format_completion({"kind": "answer", "text": target["text"] + " Thanks!"}, reasoning)


def test_evaluate_bookkeeping_with_a_scripted_sampler(monkeypatch, tiny_tokenizer, test_samples):
    import torch

    import rewards
    from data.render import render_prompt, stop_token_ids
    from eval.evaluate import evaluate

    samples = list(test_samples)
    # One turn whose prompt cannot fit however much history is dropped: skipped and counted.
    samples.insert(2, dataclasses.replace(samples[2], system="word " * 3000))
    max_prompt_length = 4096
    completion_of = {}
    for index, sample in enumerate(samples):
        if index == 2:
            continue
        prompt = tuple(render_prompt(sample, tiny_tokenizer, max_length=max_prompt_length).input_ids)
        completion_of[prompt] = scripted_completion(index, sample.target)
    eos = stop_token_ids(tiny_tokenizer)[0]
    calls = []

    def fake_generate(model, prompts, sampling, *, pad_token_id, stop_token_ids, stop_sequences, generator=None):
        assert sampling.group_size == 1 and sampling.greedy
        calls.append([len(p) for p in prompts])
        rows = [tiny_tokenizer.encode(completion_of[tuple(p)], add_special_tokens=False) + [eos] for p in prompts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), 1, width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), 1, width), dtype=torch.bool)
        for row, tokens in enumerate(rows):
            ids[row, 0, :len(tokens)] = torch.tensor(tokens)
            mask[row, 0, :len(tokens)] = True
        finished = torch.ones((len(rows), 1), dtype=torch.bool)
        return types.SimpleNamespace(completion_ids=ids, completion_mask=mask, finished=finished), {}

    monkeypatch.setattr(rollout_module, "generate", fake_generate)
    policy = types.SimpleNamespace(model=None, tokenizer=tiny_tokenizer)  # the fake sampler ignores the model
    logged = []
    metrics, predictions = evaluate(
        policy, samples, batch_size=3, max_new_tokens=64, similarity="lexical", max_prompt_length=max_prompt_length,
        progress=False, log=logged.append,
    )
    assert any("too long" in line for line in logged)
    assert metrics["counts"]["skipped_too_long"] == 1 and metrics["counts"]["samples"] == len(samples)
    assert [len(batch) for batch in calls] == [3] * (len(completion_of) // 3) + ([len(completion_of) % 3] if len(completion_of) % 3 else [])
    assert all(batch == sorted(batch, reverse=True) for batch in calls)  # grouped by length, longest first

    # Predictions come back in sample order, each with its own completion and target.
    kept = [index for index in range(len(samples)) if index != 2]
    assert [(p["conversation_id"], p["turn_index"]) for p in predictions] == \
        [(samples[i].conversation_id, samples[i].turn_index) for i in kept]
    for index, prediction in zip(kept, predictions):
        assert prediction["completion"] == scripted_completion(index, samples[index].target)
        assert prediction["target"] == samples[index].target
        expected_kind = {0: samples[index].target["kind"], 2: "invalid", 3: samples[index].target["kind"]}.get(
            index % 4, "answer" if samples[index].target["kind"] == "tool_call" else "tool_call")
        assert prediction["pred_kind"] == expected_kind, index

    # The table is exactly aggregate() over the predictions, and matches the script by hand.
    table_keys = [key for key, _ in TABLE_COLUMNS]
    again = aggregate([TurnRecord.from_dict(p) for p in predictions])
    assert {k: metrics[k] for k in table_keys} == {k: again[k] for k in table_keys}
    gold = {i: samples[i].target["kind"] for i in kept}
    hits = [i for i in kept if i % 4 in (0, 3)]
    assert metrics["action_accuracy"] == pytest.approx(len(hits) / len(kept))
    gold_tool = [i for i in kept if gold[i] == "tool_call"]
    assert metrics["tool_recall"] == pytest.approx(len([i for i in hits if gold[i] == "tool_call"]) / len(gold_tool))
    assert metrics["tool_parameter_match"] == pytest.approx(
        len([i for i in hits if gold[i] == "tool_call" and i % 4 == 0]) / len([i for i in hits if gold[i] == "tool_call"]))
    perfect_answers = [p for i, p in zip(kept, predictions) if i % 4 == 0 and gold[i] == "answer"]
    assert all(p["similarity"] == pytest.approx(1.0) for p in perfect_answers)
    scored = rewards.score_batch([p["completion"] for p in predictions], [p["target"] for p in predictions],
                                 similarity="lexical")
    assert metrics["reward_mean"] == pytest.approx(sum(r.total for r in scored) / len(scored))
    assert metrics["think_words_mean"] == pytest.approx(
        sum(0 if i % 4 == 2 else 9 for i in kept) / len(kept))


# ---------------------------------------------------------------------------------------------
# The CLI end to end on a tiny random model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, tiny_tokenizer):
    """A tiny random Qwen3 saved as a plain model, and a LoRA checkpoint on top of it (B = 0, so it
    must decode exactly like the base: a check that the lineage is merged, not ignored)."""
    from grpo.policy import LoraSettings, load_policy, save_base_model, save_policy
    from grpo.tiny import TinyModelConfig, build_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    model = build_tiny_model(tiny_tokenizer, TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                                                             intermediate_size=64, max_position_embeddings=4096), seed=0)
    base = save_base_model(model, tiny_tokenizer, root / "base")
    policy = load_policy(base=str(base), lora=LoraSettings(r=2, alpha=4))
    save_policy(policy, root / "checkpoint")
    return base, root / "checkpoint"


def read_predictions(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_end_to_end(tmp_path, tiny_models, capsys):
    from eval.run import main

    base, checkpoint = tiny_models
    out = tmp_path / "eval"
    main(["--checkpoint", "untrained=base", f"lora={checkpoint}", "--model", str(base),
          "--data", "synthetic:test", "--data=synthetic:ood_test", "--limit", "5", "--batch-size", "2",
          "--max-new-tokens", "12", "--max-prompt-length", "4000", "--similarity", "lexical", "--no-progress",
          "--threads", "2", "--out", str(out)])
    printed = capsys.readouterr().out

    assert (out / "results.md").is_file() and (out / "results.json").is_file()
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["limit"] == 5 and results["config"]["similarity"] == "lexical"
    assert results["checkpoints"] == {"untrained": str(base), "lora": str(checkpoint)}
    assert set(results["results"]) == {"test", "ood_test"}
    table_keys = [key for key, _ in TABLE_COLUMNS] + ["reward_mean", "think_words_mean"]
    for split in ("test", "ood_test"):
        assert results["splits"][split]["turns"] == 5
        for name in ("untrained", "lora"):
            path = out / f"predictions-{name}-{split}.jsonl"
            predictions = read_predictions(path)
            assert len(predictions) == 5 - results["results"][split][name]["counts"]["skipped_too_long"]
            assert all(p["checkpoint"] == name and p["split"] == split for p in predictions)
            assert all(0 < p["completion_tokens"] <= 12 for p in predictions)
            again = aggregate([TurnRecord.from_dict(p) for p in predictions])
            for key in table_keys:
                assert results["results"][split][name][key] == pytest.approx(again[key]) if again[key] is not None \
                    else results["results"][split][name][key] is None, (split, name, key)
        # A fresh adapter (B = 0) on the same base decodes the same text, turn for turn.
        untrained = read_predictions(out / f"predictions-untrained-{split}.jsonl")
        lora = read_predictions(out / f"predictions-lora-{split}.jsonl")
        assert [p["completion"] for p in untrained] == [p["completion"] for p in lora]
        # ... so the paired difference of "lora - untrained" is exactly zero on every turn.
        paired = results["paired"][split]["lora - untrained"]
        assert paired["turns"] == len(lora)
        for key in ("action_accuracy", "reward_accuracy", "reward_mean"):
            assert (paired[key]["delta"], paired[key]["better"], paired[key]["worse"]) == (0.0, 0, 0), key

    markdown = (out / "results.md").read_text()
    for text in ("### test (synthetic:test)", "### ood_test (synthetic:ood_test)", "| untrained |", "| lora |",
                 "### test: paired differences", "| lora - untrained | +0.000 ± 0.000 |"):
        assert text in markdown and text in printed


def test_cli_errors_are_clear(tmp_path, capsys):
    from eval.run import main

    with pytest.raises(SystemExit, match="nothing to evaluate"):
        main(["--data", "synthetic:test", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["--checkpoint", "a=x", "--limt", "3"])
    assert "did you mean '--limit'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no such directory"):
        main(["--checkpoint", f"a={tmp_path / 'missing'}", "--out", str(tmp_path / "o")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="neither a checkpoint"):
        main(["--checkpoint", f"a={tmp_path / 'empty'}", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="--data nope.json"):
        main(["--checkpoint", "a=some-org/some-model", "--data", "nope.json", "--similarity", "lexical",
              "--out", str(tmp_path / "o")])
