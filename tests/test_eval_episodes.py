"""Tests of the whole-episode evaluation (eval/episodes.py, eval/episode_metrics.py) and of --resume
refusing another --env (grpo/checkpoint.py).

What is checked: the pass^k estimator against hand-computed values, a brute-force count over
subsets of trials, its edge cases, and that it never rises with k; a scripted policy replaying the
gold actions gets success 1 and pass^k = 1 for every k, one doing a wrong write gets 0, one that
does not say the results gets 0, one that does nothing passes exactly the trivial tasks; the greedy
pass decodes greedily and sampled episode j of task i turn t draws from derived_seed(seed, j, i, t)
(--batch-size 1); sampled episodes of the tiny model are reproducible and differ across episode
indices; the command line writes results.json, results.md and the episodes JSONL files (two names
for one checkpoint: a paired difference of exactly 0); a bad --checkpoint path names the flag;
--resume with another --env is refused.
"""

from __future__ import annotations

import itertools
import json
import shutil
from typing import Any

import pytest

import grpo.episodes as episodes_mod
import grpo.trainer as trainer
from data.format import format_completion
from data.synthetic.env import generate_tasks
from eval.episode_metrics import mean_and_se, paired_success, pass_hat, pass_hat_k, summarize
from eval.episodes import EpisodeEvalConfig, main, run_split, trivial_tasks
from grpo.checkpoint import check_resume_compatible, latest_checkpoint
from grpo.episode_tokens import episode_task
from grpo.flags import GRPOConfig
from grpo.policy import Policy, load_policy, load_tokenizer
from grpo.runtime import derived_seed
from tests.test_episodes import ScriptedSampler, gold_script, write_task

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---------------------------------------------------------------------------------------------
# pass^k
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("successes, trials, expected", [
    (2, 4, [1 / 2, 1 / 6, 0.0, 0.0]),
    (3, 4, [3 / 4, 1 / 2, 1 / 4, 0.0]),
    (4, 4, [1.0, 1.0, 1.0, 1.0]),
    (0, 4, [0.0, 0.0, 0.0, 0.0]),
    (1, 1, [1.0]),
    (0, 1, [0.0]),
])
def test_pass_hat_k_hand_computed(successes, trials, expected):
    assert [pass_hat_k(successes, trials, k) for k in range(1, trials + 1)] == pytest.approx(expected, abs=1e-12)


def test_pass_hat_k_is_the_share_of_all_success_k_subsets_and_not_the_plug_in():
    for trials in range(1, 7):
        for successes in range(trials + 1):
            outcomes = [True] * successes + [False] * (trials - successes)
            for k in range(1, trials + 1):
                subsets = list(itertools.combinations(outcomes, k))
                assert pass_hat_k(successes, trials, k) == pytest.approx(sum(map(all, subsets)) / len(subsets))
    assert pass_hat_k(2, 4, 2) != pytest.approx((2 / 4) ** 2)  # (c/n)^k is biased; 1/6, not 1/4


@pytest.mark.parametrize("successes, trials, k", [(2, 4, 0), (2, 4, 5), (5, 4, 1), (-1, 4, 1), (0, 0, 1)])
def test_pass_hat_k_refuses_what_it_cannot_estimate(successes, trials, k):
    with pytest.raises(ValueError):
        pass_hat_k(successes, trials, k)


def test_pass_hat_is_the_mean_over_tasks_and_never_rises_with_k():
    outcomes = {"a": [True, True, False, False], "b": [True] * 4, "c": [False] * 4}
    assert pass_hat(outcomes, 1) == pytest.approx((0.5 + 1 + 0) / 3)
    assert pass_hat(outcomes, 2) == pytest.approx((1 / 6 + 1 + 0) / 3)
    assert pass_hat(outcomes, 4) == pytest.approx(1 / 3)
    for trials in range(1, 9):
        for successes in range(trials + 1):
            values = [pass_hat_k(successes, trials, k) for k in range(1, trials + 1)]
            assert all(later <= earlier for earlier, later in zip(values, values[1:])), (successes, trials)
    with pytest.raises(ValueError):
        pass_hat({}, 1)


def record(task: str, success: bool, **overrides: Any) -> dict[str, Any]:
    values = dict(task_id=task, success=success, turns=3, invalid_actions=1, policy_violations=0, tokens=100,
                  sampled_tokens=40, truncated=False, user_done=True, db_match=success, errors={"unparseable": 1})
    return {**values, **overrides}


def test_summary_standard_errors_and_paired_differences_by_hand():
    sampled = [record("a", s) for s in (True, True, False, False)] + [record("b", True)] * 4 + [
        record("c", False, truncated=True, tokens=300)] * 4
    summary = summarize(sampled)
    rates = [0.5, 1.0, 0.0]
    mean = sum(rates) / 3
    assert summary["success_rate"] == pytest.approx(mean) == pytest.approx(summary["pass_hat"]["1"])
    assert summary["success_se"] == pytest.approx((sum((r - mean) ** 2 for r in rates) / 2 / 3) ** 0.5)
    assert list(summary["pass_hat"]) == ["1", "2", "3", "4"] and summary["trials_per_task"] == 4
    assert (summary["tasks"], summary["episodes"], summary["tasks_always_solved"], summary["tasks_never_solved"]) == (
        3, 12, 1, 1)
    assert summary["truncated_share"] == pytest.approx(4 / 12)
    assert summary["tokens_mean"] == pytest.approx((8 * 100 + 4 * 300) / 12) and summary["tokens_max"] == 300
    assert summary["errors"] == {"unparseable": 12}
    assert mean_and_se([1.0]) == (1.0, None) and mean_and_se([]) == (None, None)

    after = [record("a", True)] * 4 + [record("b", s) for s in (True, False, False, False)] + [record("d", True)] * 4
    pair = paired_success(sampled, after)  # tasks a and b only: d = +0.5, -0.75
    assert pair["tasks"] == 2 and pair["delta"] == pytest.approx(-0.125)
    assert pair["se"] == pytest.approx(((0.625 ** 2 + 0.625 ** 2) / 1 / 2) ** 0.5)
    assert (pair["better"], pair["worse"]) == (1, 1)


# ---------------------------------------------------------------------------------------------
# Scripted policies: the gold replay passes every k, a wrong write fails
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_tasks():
    return generate_tasks(seed=0, n_train=40, n_test=4, n_ood=4, n_coldstart=100)["train"]


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_base):
    return load_tokenizer(tiny_base)


def eval_config(**overrides: Any) -> EpisodeEvalConfig:
    values = dict(k=3, max_turns=30, max_new_tokens=8, max_episode_tokens=100_000, batch_size=2, seed=7,
                  progress=False, episode_cache=False)  # the scripted sampler stands in for generate
    return EpisodeEvalConfig(**{**values, **overrides})


def scripted_records(monkeypatch, tokenizer, made, scripts, config):
    sampler = ScriptedSampler(tokenizer, made, scripts)
    seen = []

    def spy(model, prompts, sampling, **kwargs):
        seen.append((sampling.greedy, [each.initial_seed() for each in kwargs["generator"]], len(prompts)))
        return sampler(model, prompts, sampling, **kwargs)

    monkeypatch.setattr(episodes_mod, "generate", spy)
    return run_split(Policy(model=None, tokenizer=tokenizer), made, config), seen


def test_a_gold_replay_succeeds_at_every_k_and_a_wrong_write_fails(monkeypatch, train_tasks, tiny_tokenizer):
    task, index, wrong = write_task(train_tasks)
    made = [episode_task(task, tiny_tokenizer)] + [episode_task(other, tiny_tokenizer) for other in train_tasks[:2]]
    config = eval_config()
    records, _ = scripted_records(monkeypatch, tiny_tokenizer, made, {m.task.id: gold_script(m) for m in made}, config)
    assert len(records) == len(made) * (1 + config.k)
    greedy = summarize([r for r in records if r["mode"] == "greedy"])
    sampled = summarize([r for r in records if r["mode"] == "sampled"])
    assert greedy["success_rate"] == 1.0 and greedy["pass_hat"] == {"1": 1.0}
    assert sampled["pass_hat"] == {"1": 1.0, "2": 1.0, "3": 1.0} and sampled["success_se"] == 0.0
    assert all(r["user_done"] and r["invalid_actions"] == r["policy_violations"] == 0 for r in records)

    script = gold_script(made[0])
    script[index] = format_completion({"kind": "tool_call", **wrong})
    records, _ = scripted_records(monkeypatch, tiny_tokenizer, made[:1], {made[0].task.id: script}, config)
    assert not any(r["success"] for r in records) and not any(r["db_match"] for r in records)
    assert summarize([r for r in records if r["mode"] == "sampled"])["pass_hat"] == {"1": 0.0, "2": 0.0, "3": 0.0}
    assert records[0]["transcript"][0]["from"] == "human" and records[0]["outputs"][index] == script[index]

    # The right database but a last answer that does not say the results: not a success either.
    silent = made[1]  # train task 0: its last answer states an order id, a status and an amount
    script = gold_script(silent)
    last = max(turn for turn, target in enumerate(silent.gold_targets) if target["kind"] == "answer")
    script[last] = format_completion({"kind": "answer", "text": "Done."})
    records, _ = scripted_records(monkeypatch, tiny_tokenizer, [silent], {silent.task.id: script}, config)
    assert all(r["db_match"] and r["user_done"] and r["missing_outputs"] and not r["success"] for r in records)


def test_a_policy_that_does_nothing_passes_exactly_the_trivial_tasks(monkeypatch, tiny_tokenizer):
    tasks = generate_tasks(seed=0)["test"][:40]
    trivial = trivial_tasks(tasks)
    chosen = [task for task in tasks if task.id in trivial][:2] + [task for task in tasks if task.id not in trivial][:4]
    assert len(chosen) == 6, "the first 40 test tasks hold no trivial task: look further"
    made = [episode_task(task, tiny_tokenizer) for task in chosen]
    records, _ = scripted_records(monkeypatch, tiny_tokenizer, made, {m.task.id: ["no action"] * 3 for m in made},
                                  eval_config(k=1, max_turns=3))
    assert {r["task_id"] for r in records if r["success"]} == set(trivial[:2])
    assert all(r["invalid_actions"] == 3 and not r["user_done"] for r in records)

@pytest.mark.parametrize("batch_size", [1, 2])
def test_greedy_pass_is_greedy_and_each_sampled_episode_draws_from_seed_pass_task(
        monkeypatch, train_tasks, tiny_tokenizer, batch_size):
    """Every turn of pass j's episode of task i samples from the generator seeded derived_seed(seed,
    j, i, 0), whichever tasks share its batch."""
    made = [episode_task(task, tiny_tokenizer) for task in train_tasks[:3]]
    scripts = {m.task.id: gold_script(m)[:1] + ["no action"] * 2 for m in made}  # 1 tool call, 2 unparseable
    config = eval_config(k=2, max_turns=3, batch_size=batch_size)
    records, seen = scripted_records(monkeypatch, tiny_tokenizer, made, scripts, config)
    assert [(r["mode"], r["episode"], r["task_id"]) for r in records] == (
        [("greedy", 0, m.task.id) for m in made] + [("sampled", j, m.task.id) for j in range(2) for m in made])
    assert all(r["turns"] == 3 and r["invalid_actions"] == 2 for r in records)
    calls_per_pass = 3 * (3 if batch_size == 1 else 2)  # 3 turns per chunk of tasks
    greedy_calls, sampled_calls = seen[:calls_per_pass], seen[calls_per_pass:]
    assert all(is_greedy for is_greedy, _, _ in greedy_calls) and not any(g for g, _, _ in sampled_calls)
    chunks = [[0], [1], [2]] if batch_size == 1 else [[0, 1], [2]]
    expected = [[derived_seed(config.seed, episode, task, 0) for task in chunk] for episode in range(2)
                for chunk in chunks for _turn in range(3)]
    assert [seeds for _, seeds, _ in sampled_calls] == expected
    assert [rows for _, _, rows in seen] == [len(seeds) for _, seeds, _ in seen]


# ---------------------------------------------------------------------------------------------
# Real sampling with the tiny model: reproducible, different across episodes
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_policy(tiny_base) -> Policy:
    policy = load_policy(base=str(tiny_base), lora=None)
    policy.model.requires_grad_(False)
    return policy


def test_sampled_episodes_are_reproducible_and_differ_across_episode_indices(train_tasks, tiny_policy):
    made = [episode_task(task, tiny_policy.tokenizer) for task in train_tasks[:2]]
    config = eval_config(k=3, max_turns=2, max_new_tokens=6, max_episode_tokens=2000, batch_size=2)
    first, again = run_split(tiny_policy, made, config), run_split(tiny_policy, made, config)
    assert [r["outputs"] for r in first] == [r["outputs"] for r in again]
    assert [r["transcript"] for r in first] == [r["transcript"] for r in again]
    for task in made:
        outputs = [r["outputs"] for r in first if r["mode"] == "sampled" and r["task_id"] == task.task.id]
        assert len(outputs) == 3 and len({json.dumps(o) for o in outputs}) == 3, outputs
    other_seed = run_split(tiny_policy, made, eval_config(**{**config.__dict__, "seed": 8}))
    assert [r["outputs"] for r in other_seed if r["mode"] == "sampled"] != [
        r["outputs"] for r in first if r["mode"] == "sampled"]
    assert [r["outputs"] for r in other_seed if r["mode"] == "greedy"] == [
        r["outputs"] for r in first if r["mode"] == "greedy"]


# ---------------------------------------------------------------------------------------------
# The command line, a bad path, and --resume with another --env
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_base):
    """A one-step `--env synthetic` GRPO run of the tiny model (its run directory)."""
    out = tmp_path_factory.mktemp("episodes-run") / "run"
    trainer.train(GRPOConfig(out=str(out), model=str(tiny_base), env="synthetic", max_steps=1, group_size=2,
                             prompts_per_step=1, rollout_batch_prompts=1, max_turns=2, max_new_tokens=4,
                             max_episode_tokens=1500, lora_r=4, lora_alpha=8, save_every=0, sample_every=0))
    return out


CLI = ["--tasks", "2", "--k", "2", "--max-turns", "2", "--max-new-tokens", "4", "--max-episode-tokens", "1500",
       "--no-progress", "--device", "cpu", "--dtype", "float32"]


def test_the_command_line_writes_results_and_episodes(tmp_path, trained_run, capsys):
    out = tmp_path / "eval"
    main(["--checkpoint", f"first={trained_run}", "--checkpoint", f"again={trained_run}", "--out", str(out), *CLI])
    printed = capsys.readouterr().out
    results = json.loads((out / "episodes" / "results.json").read_text())
    assert set(results) >= {"config", "checkpoints", "loaded", "results", "paired", "time_s"}
    assert results["config"]["k"] == 2 and list(results["checkpoints"]) == ["first", "again"]
    assert results["splits"]["test"]["tasks"] == 2 and isinstance(results["splits"]["test"]["trivial_tasks"], list)
    for split in ("test", "ood_test"):
        for name in ("first", "again"):
            row = results["results"][split][name]
            assert row["skipped_tasks"] == [] and row["greedy"]["episodes"] == 2 and row["sampled"]["episodes"] == 4
            assert list(row["sampled"]["pass_hat"]) == ["1", "2"] and list(row["greedy"]["pass_hat"]) == ["1"]
            for key in ("success_rate", "success_se", "turns_mean", "invalid_actions_mean", "policy_violations_mean",
                        "tokens_mean", "truncated_share"):
                assert key in row["sampled"] and key in row["greedy"], key
            lines = (out / "episodes" / f"episodes-{name}-{split}.jsonl").read_text().splitlines()
            episodes = [json.loads(line) for line in lines]
            assert len(episodes) == 6 and {e["mode"] for e in episodes} == {"greedy", "sampled"}
            assert {"task_id", "success", "turns", "errors", "transcript", "outputs", "episode"} <= set(episodes[0])
            assert 1 <= episodes[0]["turns"] <= 2 and episodes[0]["transcript"][0]["from"] == "human"
        # One checkpoint under two names: the same seeds give the same episodes, a difference of exactly 0.
        pair = results["paired"][split]["again - first"]
        assert pair["greedy"]["delta"] == 0 and pair["sampled"]["delta"] == 0 and pair["sampled"]["tasks"] == 2
        first = (out / "episodes" / f"episodes-first-{split}.jsonl").read_text().replace('"first"', '"again"')
        assert first == (out / "episodes" / f"episodes-again-{split}.jsonl").read_text()
    markdown = (out / "episodes" / "results.md").read_text()
    assert "### test:" in markdown and "### ood_test:" in markdown and "pass^2" in markdown
    assert "again - first" in markdown and "| first |" in markdown and markdown in printed
    assert "of these 2 tasks need no change" in markdown


def test_a_bad_checkpoint_path_or_split_names_the_flag(tmp_path, trained_run):
    with pytest.raises(SystemExit, match="--checkpoint .*missing: no such directory"):
        main(["--checkpoint", f"rl={tmp_path / 'missing'}", "--out", str(tmp_path), *CLI])
    with pytest.raises(SystemExit, match="--checkpoint .*neither a checkpoint"):
        main(["--checkpoint", f"rl={tmp_path}", "--out", str(tmp_path), *CLI])
    with pytest.raises(SystemExit, match="--splits 'tset'"):
        main(["--checkpoint", f"rl={trained_run}", "--splits", "tset", "--out", str(tmp_path), *CLI])
    assert not (tmp_path / "episodes").exists()  # refused before anything ran


def test_resume_with_another_env_is_refused(tmp_path, trained_run, tiny_base):
    run = shutil.copytree(trained_run, tmp_path / "run")
    checkpoint = latest_checkpoint(run)
    files = {name: (run / name).read_bytes() for name in ("config.json", "metrics.jsonl")}
    with pytest.raises(SystemExit, match="env='synthetic'.*env='none'"):
        trainer.train(GRPOConfig(out=str(run), resume=True, model=str(tiny_base), env="none", max_steps=2,
                                 group_size=2, prompts_per_step=1, lora_r=4, lora_alpha=8))
    # Refused before the run's files are touched: its config and logs are as they were.
    assert {name: (run / name).read_bytes() for name in files} == files
    check_resume_compatible(checkpoint, GRPOConfig(model=str(tiny_base), env="synthetic", lora_r=4, lora_alpha=8))
    # A checkpoint written before --env existed trained on per-turn samples: env 'none'.
    old = tmp_path / "old"
    old.mkdir()
    saved = json.loads((checkpoint / "config.json").read_text())
    del saved["env"]
    (old / "config.json").write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match="env='none'.*env='synthetic'"):
        check_resume_compatible(old, GRPOConfig(model=str(tiny_base), env="synthetic", lora_r=4, lora_alpha=8))
    check_resume_compatible(old, GRPOConfig(model=str(tiny_base), env="none", lora_r=4, lora_alpha=8))
