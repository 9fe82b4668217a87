"""End to end: `python -m grpo.train --preset smoke` runs every stage of the pipeline and a rerun
reuses them.  (The full default preset is measured by hand; see the README.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECKPOINTS = ("untrained", "sft", "coldstart", "rl")
TABLE_KEYS = ("action_accuracy", "tool_precision", "tool_recall", "tool_f1", "tool_name_accuracy",
              "tool_parameter_match", "answer_precision", "answer_recall", "answer_f1", "answer_similarity")


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "grpo.train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("pipeline") / "smoke"
    result = run("--preset", "smoke", "--out", str(out), "--similarity", "lexical", "--threads", "1", cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


def test_smoke_pipeline_runs_every_stage(smoke_run):
    out, result = smoke_run
    for stage in ("sft-base", "coldstart", "grpo"):
        assert (out / stage / "done.json").is_file(), stage
        assert list((out / stage / "checkpoints").glob("step-*")), stage
    lineage = json.loads((out / "grpo" / "checkpoints" / "step-000002" / "lineage.json").read_text())
    assert len(lineage["adapters"]) == 2  # cold-start adapter merged, then GRPO's own
    results = json.loads((out / "eval" / "results.json").read_text())
    text = json.dumps(results)
    for name in CHECKPOINTS:
        assert name in text
    assert (out / "eval" / "results.md").read_text().count("| rl |") == 2  # one row per split
    for key in TABLE_KEYS:
        assert key in text
    assert "stage times" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["timings_s"]) >= {"sft-base", "coldstart", "grpo", "eval", "eval-sampled", "total"}
    # Greedy eval: each checkpoint against the one before it, on the same turns.
    assert set(results["paired"]["test"]) == {"sft - untrained", "coldstart - sft", "rl - coldstart"}
    # Sampled eval: cold start and RL only, decoded at temperature 1.
    sampled = json.loads((out / "eval-sampled" / "results.json").read_text())
    assert sampled["config"]["greedy"] is False and sampled["config"]["temperature"] == 1.0
    assert set(sampled["results"]["ood_test"]) == {"coldstart", "rl"}
    assert set(sampled["paired"]["test"]) == {"rl - coldstart"}
    pngs = list((out / "plots").glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_rerun_reuses_finished_stages(smoke_run):
    out, _ = smoke_run
    result = run("--preset", "smoke", "--out", str(out), "--similarity", "lexical", "--skip-eval", cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("sft-base", "coldstart", "grpo"):
        assert f"[pipeline] {stage}: finished earlier" in result.stdout


def test_rerun_with_another_recipe_is_refused(tmp_path):
    # A finished stage is reused as it is: a run directory made with another seed or preset must
    # not silently lend its stages to this run.
    from grpo.pipeline import PipelineConfig, check_same_recipe, run_pipeline

    out = tmp_path / "run"
    out.mkdir()
    (out / "pipeline.json").write_text(json.dumps({"config": {"preset": "smoke", "seed": 0, "similarity": "lexical"}}))
    check_same_recipe(out, PipelineConfig(preset="smoke", seed=0, similarity="lexical", threads=2))  # threads: same recipe
    with pytest.raises(SystemExit, match=r"--seed 0 there, 1 here"):
        run_pipeline(PipelineConfig(preset="smoke", seed=1, similarity="lexical", out=str(out)))
    with pytest.raises(SystemExit, match=r"--preset 'smoke' there, 'default' here.*another --out"):
        check_same_recipe(out, PipelineConfig(preset="default", seed=0, similarity="lexical"))
    (out / "pipeline.json").write_text("{not json")
    with pytest.raises(SystemExit, match="unreadable"):
        check_same_recipe(out, PipelineConfig(preset="smoke", seed=0, similarity="lexical"))
    # No record yet: nothing to compare.
    check_same_recipe(tmp_path / "fresh", PipelineConfig())


def test_default_run_directory_follows_the_preset():
    from grpo.pipeline import PipelineConfig, run_directory

    assert run_directory(PipelineConfig()) == Path("runs/default")
    assert run_directory(PipelineConfig(preset="smoke")) == Path("runs/smoke")
    assert run_directory(PipelineConfig(preset="smoke", out="elsewhere/x")) == Path("elsewhere/x")


def test_a_preset_with_a_real_model_runs_every_stage(tmp_path, monkeypatch, tiny_base, capsys):
    """The wiring of `--preset smollm2` (a plain model folder as its base instead of a tiny model
    built from scratch, LoRA SFT, the format instructions in every stage, tau-bench turns
    evaluated), run in process on the trainer tests' tiny model with budgets of a step or two."""
    import copy

    import grpo.pipeline as pipeline
    from data.format import FORMAT_INSTRUCTIONS
    from tests.test_data_loaders import tau_row

    tau = tmp_path / "tau" / "trajectories.json"
    tau.parent.mkdir()
    tau.write_text(json.dumps([tau_row(1.0), tau_row(1.0, task_id=2)]))
    preset = copy.deepcopy(pipeline.PRESETS["smollm2"])
    preset["model"] = str(tiny_base)  # resolve_model passes a folder through as it is
    for stage in ("sft_base", "coldstart", "grpo"):
        preset[stage].update(max_steps=1, save_every=0)
    preset["sft_base"].update(micro_batch=2, lr=1e-3)
    preset["grpo"].update(prompts_per_step=1, rollout_batch_prompts=1, group_size=2, max_new_tokens=8)
    for stage in ("eval", "eval_tau"):
        preset[stage].update(limit=2, max_new_tokens=8)
    monkeypatch.setitem(pipeline.PRESETS, "smollm2", preset)
    monkeypatch.setattr(pipeline, "TAU_AIRLINE", tau)

    out = tmp_path / "run"
    summary = pipeline.run_pipeline(pipeline.PipelineConfig(preset="smollm2", out=str(out), similarity="lexical",
                                                            threads=1))
    assert summary["checkpoints"]["untrained"] == str(tiny_base) and not (out / "base-tiny").exists()
    assert json.loads((out / "sft-base" / "config.json").read_text())["lora"] is True
    for stage in ("sft-base", "coldstart", "grpo"):
        assert json.loads((out / stage / "config.json").read_text())["format_prompt"] is True, stage
    from grpo.prompts import trained_samples

    assert all(sample.system.endswith(FORMAT_INSTRUCTIONS) for sample in trained_samples(out / "grpo"))
    tau_results = json.loads((out / "eval-tau" / "results.json").read_text())
    assert set(tau_results["results"]["tau-airline"]) == set(CHECKPOINTS)
    assert tau_results["config"]["format_prompt"] is True
    assert {"base-model", "eval-tau"} <= set(summary["timings_s"])

    # Without the shared folder, the tau-bench evaluation is skipped with a printed reason.
    monkeypatch.setattr(pipeline, "TAU_AIRLINE", tmp_path / "absent.json")
    capsys.readouterr()
    pipeline.run_pipeline(pipeline.PipelineConfig(preset="smollm2", out=str(out), similarity="lexical", threads=1))
    assert "tau-bench airline evaluation skipped" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["episodes", "smollm2-episodes"])
def test_the_episodes_presets_add_episode_grpo_and_its_evaluation(tmp_path, monkeypatch, tiny_base, name):
    """The wiring of `--preset episodes` and `--preset smollm2-episodes`: after the training stages,
    GRPO over whole conversations from the same cold-start checkpoint, then every checkpoint (untrained,
    SFT, cold start, per-turn RL, episode RL, in that order) evaluated on whole episodes (on the trainer tests' tiny model with budgets of a
    step or two).  smollm2-episodes states the format in every stage and skips the per-turn evaluations."""
    import copy

    import grpo.pipeline as pipeline

    preset = copy.deepcopy(pipeline.PRESETS[name])
    preset["model"] = str(tiny_base)  # a plain folder instead of a tiny model built from scratch
    for stage in ("sft_base", "coldstart", "grpo", "grpo_episodes"):
        preset[stage].update(max_steps=1, save_every=0)
    preset["sft_base"].update(micro_batch=2, lr=1e-3, lora=True)
    preset["grpo"].update(prompts_per_step=1, rollout_batch_prompts=1, group_size=2, max_new_tokens=8)
    preset["grpo_episodes"].update(prompts_per_step=1, rollout_batch_prompts=1, group_size=2, max_new_tokens=8,
                                   max_turns=2, episode_reward="success")
    if "eval" in preset:
        preset["eval"].update(limit=2, max_new_tokens=8)
    preset["eval_episodes"].update(tasks=2, k=2, max_turns=2, max_new_tokens=8, batch_size=2)
    monkeypatch.setitem(pipeline.PRESETS, name, preset)

    out = tmp_path / "run"
    summary = pipeline.run_pipeline(pipeline.PipelineConfig(preset=name, out=str(out), similarity="lexical",
                                                            threads=1))
    config = json.loads((out / "grpo-episodes" / "config.json").read_text())
    assert config["env"] == "synthetic" and config["init"] == summary["checkpoints"]["coldstart"]
    assert summary["checkpoints"]["rl_episodes"].startswith(str(out / "grpo-episodes"))
    results = json.loads((out / "eval-episodes" / "episodes" / "results.json").read_text())
    assert "eval-episodes" in summary["timings_s"]
    for split in ("test", "ood_test"):
        assert list(results["results"][split]) == ["untrained", "sft", "coldstart", "rl", "rl_episodes"], split
    format_prompt = name == "smollm2-episodes"
    assert config["format_prompt"] is format_prompt and results["config"]["format_prompt"] is format_prompt
    assert (out / "eval").is_dir() is not format_prompt  # smollm2-episodes: no per-turn evaluation
    assert (out / "plots" / "episodes" / "rewards.png").is_file()
