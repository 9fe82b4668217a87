"""Tests for the GRPO trainer (grpo/trainer.py) and `python -m grpo.train`.

A tiny Qwen3 (hidden 32, 2 layers) with a 512-token tokenizer, trained on a dozen synthetic
conversations, is built once per session.  Where rewards matter a deterministic reward function
is injected (`train(config, reward_fn=...)`); elsewhere `--similarity lexical` keeps every model
but the policy out of the run.

What is checked: the command line writes every diagnostic the issue lists, samples, the config
and a checkpoint peft can load; `--resume` continues the step count and equals an uninterrupted
run; NaN rewards and NaN losses are handled as documented; --oversample; the trained-samples
view; --deterministic.  The update on hand-built batches: tests/test_grpo_update.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import grpo.train
import grpo.trainer as trainer
import grpo.distributed as distributed_mod
import grpo.prompts as prompts_mod
import grpo.run as run_mod
import grpo.step as step_mod
import grpo.update as update_mod
from grpo.checkpoint import latest_checkpoint
from grpo.policy import LoraSettings, read_lineage
from rewards.score import RewardResult

REPO = Path(__file__).resolve().parents[1]
SMALL_LORA = LoraSettings(r=4, alpha=8)

# Metrics the issue asks for, by the names the trainer logs them under.
REQUIRED_METRICS = (
    "reward/mean", "reward/std", "reward/accuracy", "reward/format", "reward/length", "success_rate",
    "reward/zero_variance_group_share", "reward/unscored_count", "completion/length_mean",
    "completion/length_max", "completion/truncated_share", "loss/clip_ratio_low", "loss/clip_ratio_high",
    "loss/clip_ratio", "entropy", "grad_norm", "lr", "rollout/tokens_per_s", "train/tokens_per_s", "loss",
    "train/skipped_steps",
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def restore_determinism():
    """train(deterministic=True) switches torch's deterministic algorithms on for the process."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def scripted_rewards(texts: list[str], targets: list[dict]) -> list[RewardResult]:
    """A deterministic reward with spread inside groups: depends on the completion text only."""
    results = []
    for text in texts:
        value = float(sum(map(ord, text)) % 7) / 3.0
        results.append(RewardResult(total=value, components={"accuracy": value - 1.0, "format": value / 3.0},
                                    success=value > 1.5, kind="answer"))
    return results


def small_config(tiny_base: Path, small_data: Path, out: Path, **overrides) -> trainer.GRPOConfig:
    values = dict(model=str(tiny_base), data=str(small_data / "train.json"), out=str(out), group_size=2,
                  prompts_per_step=2, rollout_batch_prompts=2, max_new_tokens=6, lora_r=4, lora_alpha=8,
                  similarity="lexical", save_every=0, sample_every=1, lr=1e-2)
    values.update(overrides)
    return trainer.GRPOConfig(**values)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# The command line: a 3-step run, its outputs, and --resume
# ---------------------------------------------------------------------------------------------


def test_cli_three_steps_writes_everything_and_resume_continues(tmp_path, tiny_base, small_data):
    out = tmp_path / "run"
    argv = ["--model", str(tiny_base), "--data", str(small_data / "train.json"), "--out", str(out),
            "--save-every", "2", "--group-size", "2", "--prompts-per-step", "2", "--max-new-tokens", "6",
            "--beta", "0.05", "--similarity", "lexical", "--sample-every", "1", "--lora-r", "4", "--lora-alpha", "8",
            "--threads", "1", "--seed", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-m", "grpo.train", *argv, "--max-steps", "3"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"done: {out}" in result.stdout

    metrics = read_metrics(out)
    assert [record["step"] for record in metrics] == [1, 2, 3]
    for record in metrics:
        missing = [key for key in (*REQUIRED_METRICS, "loss/kl_mean") if key not in record]
        assert not missing, missing
        assert math.isfinite(record["reward/mean"]) and math.isfinite(record["reward/std"])
        assert 0 <= record["success_rate"] <= 1 and 0 <= record["completion/truncated_share"] <= 1
        assert 1 <= record["completion/length_mean"] <= record["completion/length_max"] <= 6
        assert record["lr"] == pytest.approx(1e-5)
        assert record["rollout/tokens_per_s"] > 0 and record["train/tokens_per_s"] > 0
        assert record["loss/kl_mean"] >= 0 and record["nonfinite_loss"] is False
        # The sampler's log-probs reach the update, and agree with the trainer's in fp32.
        assert 0 <= record["logprob_gap/mean_abs"] <= record["logprob_gap/max_abs"] < 1e-3
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {sample["step"] for sample in samples} == {1, 2, 3}
    assert all({"text", "reward", "components", "target", "length", "finished"} <= set(sample) for sample in samples)
    config = json.loads((out / "config.json").read_text())
    assert (config["max_steps"], config["beta"], config["model"]) == (3, 0.05, str(tiny_base))

    checkpoint = latest_checkpoint(out)
    assert checkpoint is not None and checkpoint.name == "step-000003"
    assert (out / "checkpoints" / "step-000002").is_dir()  # --save-every 2
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "tokenizer", "lineage.json",
                 "config.json", "trainer_state.pt"):
        assert (checkpoint / name).exists(), name
    assert json.loads((checkpoint / "config.json").read_text()) == config
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    assert state["step"] == 3 and state["optimizer"]["state"] and {"rng", "generator"} <= set(state)

    # The adapter loads with plain peft on top of the base, and holds the saved tensors.
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), checkpoint / "adapter")
    saved = load_file(checkpoint / "adapter" / "adapter_model.safetensors")
    loaded = {name: tensor for name, tensor in model.state_dict().items() if "lora_" in name}
    assert len(saved) == len(loaded) > 0
    for name, tensor in saved.items():
        assert torch.equal(loaded[name.replace(".weight", ".default.weight")], tensor), name
    assert read_lineage(checkpoint)["base"] == str(tiny_base.resolve())

    # --resume with a larger budget continues at step 4 (in-process: the same entry point, no startup cost).
    grpo.train.main([*argv, "--max-steps", "5", "--resume"])
    assert [record["step"] for record in read_metrics(out)] == [1, 2, 3, 4, 5]
    assert "at step 3" in (out / "log.txt").read_text()
    final = latest_checkpoint(out)
    assert final.name == "step-000005"
    assert torch.load(final / "trainer_state.pt", weights_only=True)["step"] == 5
    # keep_checkpoints = 3: step 2 is pruned, 3 (first run), 4 (--save-every) and 5 remain.
    assert sorted(path.name for path in (out / "checkpoints").glob("step-*")) == [
        "step-000003", "step-000004", "step-000005"]


def test_resumed_run_equals_uninterrupted_run(tmp_path, tiny_base, small_data, restore_determinism):
    """Same seed, deterministic mode: 2 steps + resume to 3 gives the adapter of 3 steps at once.

    beta > 0, so the reference pass after resuming must also be the stage's starting point.
    """
    from safetensors.torch import load_file

    common = dict(deterministic=True, beta=0.1, seed=3)
    trainer.train(small_config(tiny_base, small_data, tmp_path / "whole", max_steps=3, **common),
                  reward_fn=scripted_rewards)
    trainer.train(small_config(tiny_base, small_data, tmp_path / "split", max_steps=2, **common),
                  reward_fn=scripted_rewards)
    trainer.train(small_config(tiny_base, small_data, tmp_path / "split", max_steps=3, resume=True, **common),
                  reward_fn=scripted_rewards)

    whole = load_file(latest_checkpoint(tmp_path / "whole") / "adapter" / "adapter_model.safetensors")
    split = load_file(latest_checkpoint(tmp_path / "split") / "adapter" / "adapter_model.safetensors")
    assert whole.keys() == split.keys()
    assert max(float(tensor.abs().max()) for name, tensor in whole.items() if "lora_B" in name) > 0  # B starts at 0
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-5, atol=1e-6)
    whole_metrics, split_metrics = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "split")
    assert [m["step"] for m in split_metrics] == [1, 2, 3]
    for key in ("reward/mean", "loss", "loss/kl_mean", "completion/length_mean"):
        assert [m[key] for m in split_metrics] == pytest.approx([m[key] for m in whole_metrics], rel=1e-5, abs=1e-7)
    assert whole_metrics[0]["loss/kl_mean"] == pytest.approx(0.0, abs=1e-7)  # fresh LoRA: policy == reference
    assert whole_metrics[2]["loss/kl_mean"] > 0



class PoisonedLoss:
    """Makes the loss NaN during the given (1-based) calls of policy_update."""

    def __init__(self, poisoned_steps: set[int]) -> None:
        self.poisoned_steps, self.calls = poisoned_steps, 0
        self.update, self.loss = update_mod.policy_update, update_mod.policy_loss

    def policy_update(self, *args, **kwargs):
        self.calls += 1
        return self.update(*args, **kwargs)

    def policy_loss(self, *args, **kwargs):
        loss, metrics = self.loss(*args, **kwargs)
        return (loss * math.nan if self.calls in self.poisoned_steps else loss), metrics



# ---------------------------------------------------------------------------------------------
# NaN rewards and NaN losses in a run
# ---------------------------------------------------------------------------------------------


def test_all_rewards_nan_stops_with_a_clear_message(tmp_path, tiny_base, small_data):
    def unscorable(texts, targets):
        return [RewardResult(total=math.nan, components={}, success=False, kind="invalid") for _ in texts]

    with pytest.raises(SystemExit, match="every reward is NaN"):
        trainer.train(small_config(tiny_base, small_data, tmp_path / "run", max_steps=3), reward_fn=unscorable)


def test_some_nan_rewards_are_counted_and_training_continues(tmp_path, tiny_base, small_data, monkeypatch):
    def refuse(policy):
        raise AssertionError("reference_mode entered with beta == 0")

    monkeypatch.setattr(update_mod, "reference_mode", refuse)

    def partly_unscored(texts, targets):
        results = scripted_rewards(texts, targets)
        return [dataclasses.replace(results[0], total=math.nan), *results[1:]]

    out = tmp_path / "run"
    trainer.train(small_config(tiny_base, small_data, out, max_steps=2), reward_fn=partly_unscored)
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2]
    assert [m["reward/unscored_count"] for m in metrics] == [1, 1]
    assert all(math.isfinite(m["reward/mean"]) and m["nonfinite_loss"] is False for m in metrics)
    assert latest_checkpoint(out).name == "step-000002"


def test_nan_loss_step_is_skipped_and_counted(tmp_path, tiny_base, small_data, monkeypatch):
    poison = PoisonedLoss({2})
    monkeypatch.setattr(step_mod, "policy_update", poison.policy_update)
    monkeypatch.setattr(update_mod, "policy_loss", poison.policy_loss)
    out = tmp_path / "run"
    trainer.train(small_config(tiny_base, small_data, out, max_steps=3), reward_fn=scripted_rewards)
    metrics = read_metrics(out)
    assert [m["nonfinite_loss"] for m in metrics] == [False, True, False]
    assert [m["train/skipped_steps"] for m in metrics] == [0, 1, 1]
    assert "step 2: non-finite loss" in (out / "log.txt").read_text()
    assert latest_checkpoint(out).name == "step-000003"


def test_consecutive_nan_losses_stop_the_run(tmp_path, tiny_base, small_data, monkeypatch):
    poison = PoisonedLoss({1, 2, 3, 4, 5})
    monkeypatch.setattr(step_mod, "policy_update", poison.policy_update)
    monkeypatch.setattr(update_mod, "policy_loss", poison.policy_loss)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="2 consecutive steps with a non-finite loss"):
        trainer.train(small_config(tiny_base, small_data, out, max_steps=5, max_bad_steps=2),
                      reward_fn=scripted_rewards)
    assert poison.calls == 2
    assert [m["train/skipped_steps"] for m in read_metrics(out)] == [1, 2]


def test_oversample_run_samples_twice_the_prompts_and_logs_the_selection(tmp_path, tiny_base, small_data):
    scored = []

    def counting_rewards(texts, targets):
        scored.append(len(texts))
        return scripted_rewards(texts, targets)

    out = tmp_path / "run"
    trainer.train(small_config(tiny_base, small_data, out, max_steps=2, oversample=2), reward_fn=counting_rewards)
    assert scored == [8, 8]  # 2 prompts per step x oversample 2 = 4 groups of 2 completions
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["select/group_std_kept"] >= m["select/group_std_all"]
        assert math.isfinite(m["loss"]) and m["nonfinite_loss"] is False
    assert latest_checkpoint(out).name == "step-000002"

    # The run's training prompts, rebuilt from its directory: 2 steps x 4 sampled prompts, in order.
    trained = prompts_mod.trained_samples(out)
    assert len(trained) == 8
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1] * 4 + [2] * 4  # each step's first 4 completions: 2 groups of 2
    for step in range(2):
        first_two = [records[4 * step]["target"], records[4 * step + 2]["target"]]
        assert first_two == [trained[4 * step].target, trained[4 * step + 1].target]

    from eval.run import load_samples

    samples, info = load_samples(f"trained:{out}", seed=0, limit=3)
    assert samples == trained[:3] and info["turns"] == 3 and info["turns_available"] == 8
    with pytest.raises(ValueError, match="not a GRPO run directory"):
        prompts_mod.trained_samples(tmp_path)



def test_deterministic_sets_the_cublas_workspace_before_any_gemm(tmp_path, tiny_base, small_data, monkeypatch,
                                                                 restore_determinism):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    run_mod.open_run(small_config(tiny_base, small_data, tmp_path / "run", deterministic=False),
                     distributed_mod.SINGLE, torch.device("cpu"))
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    run_mod.open_run(small_config(tiny_base, small_data, tmp_path / "run2", deterministic=True),
                     distributed_mod.SINGLE, torch.device("cpu"))
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
