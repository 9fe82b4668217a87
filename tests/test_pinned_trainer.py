"""Behaviour that had no test (issue 16), pinned where it is implemented: flags through a training run.

Each test runs grpo.trainer.train the way `python -m grpo.train` does (flags parsed by
`parse_config`) and checks the effect against a value written out by hand:

* --scale-rewards group / batch / none reach the advantages a training step uses.
* --no-lora with beta > 0: a frozen copy of the starting weights is the KL reference, also after
  --resume (the reference is the stage's start, never the resumed weights).
* --warmup-steps and --lr-schedule: the learning rate the optimizer applies at each step.

The trainer tests' tiny model and data (tests/conftest.py); every run is a step or a few.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

import grpo.trainer as trainer
import grpo.step as step_mod
import grpo.update as update_mod
from grpo.config import parse_config
from rewards.score import RewardResult

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def cli_config(tiny_base: Path, small_data: Path, out: Path, *flags: str) -> trainer.GRPOConfig:
    """A small GRPO config as `python -m grpo.train` parses it; later flags override earlier ones."""
    base = ["--model", str(tiny_base), "--data", str(small_data / "train.json"), "--out", str(out),
            "--group-size", "2", "--prompts-per-step", "2", "--rollout-batch-prompts", "2", "--max-new-tokens", "3",
            "--lora-r", "4", "--lora-alpha", "8", "--similarity", "lexical", "--save-every", "0",
            "--sample-every", "0", "--lr", "1e-2", "--device", "cpu", "--dtype", "float32"]
    return parse_config(trainer.GRPOConfig, [*base, *flags])


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def fixed_rewards(values: list[float]):
    """A reward function that gives the i-th completion of a call values[i] (cycled)."""
    def reward_fn(texts: list[str], targets: list[dict]) -> list[RewardResult]:
        return [RewardResult(total=values[i % len(values)], components={}, success=False, kind="answer")
                for i in range(len(texts))]
    return reward_fn



# ---------------------------------------------------------------------------------------------
# 2. --scale-rewards in the trainer
# ---------------------------------------------------------------------------------------------


REWARDS = [0.0, 1.0, 5.0, 2.0, 2.5, 3.0]  # two groups of 3 with different spreads


def hand_advantages(scale: str) -> list[float]:
    groups = [REWARDS[:3], REWARDS[3:]]
    advantages = []
    for group in groups:
        mean = sum(group) / len(group)
        if scale == "group":
            denominator = statistics.stdev(group) + 1e-4
        elif scale == "batch":
            denominator = statistics.stdev(REWARDS) + 1e-4  # the whole step's spread
        else:
            denominator = 1.0
        advantages += [(r - mean) / denominator for r in group]
    return advantages


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_scale_rewards_reaches_the_trainers_advantages(tmp_path, tiny_base, small_data, monkeypatch, scale):
    seen = []
    real_update = update_mod.policy_update

    def recording_update(policy, batches, config, optimizer, **kwargs):
        seen.append(torch.cat([batch.advantages for batch in batches]).tolist())
        return real_update(policy, batches, config, optimizer, **kwargs)

    monkeypatch.setattr(step_mod, "policy_update", recording_update)
    config = cli_config(tiny_base, small_data, tmp_path / "run", "--group-size", "3", "--max-steps", "1",
                        "--max-new-tokens", "2", "--scale-rewards", scale)
    trainer.train(config, reward_fn=fixed_rewards(REWARDS))
    assert len(seen) == 1
    assert seen[0] == pytest.approx(hand_advantages(scale), rel=1e-5, abs=1e-6)
    others = [hand_advantages(other) for other in ("group", "batch", "none") if other != scale]
    assert all(seen[0] != pytest.approx(other, rel=1e-3) for other in others)


# ---------------------------------------------------------------------------------------------
# 4. KL with full fine-tuning, across a resume
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def restore_determinism():
    """train(deterministic=True) switches torch's deterministic algorithms on for the process."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def test_full_fine_tuning_kl_uses_a_frozen_copy_of_the_start_also_after_resume(
        tmp_path, tiny_base, small_data, monkeypatch, restore_determinism):
    from safetensors.torch import load_file

    start = load_file(tiny_base / "model.safetensors")
    seen = []
    real_update = update_mod.policy_update

    def same_as_start(model: torch.nn.Module) -> bool:
        state = model.state_dict()
        assert set(start) <= set(state)
        return all(torch.equal(state[name], tensor.to(state[name].dtype)) for name, tensor in start.items())

    def recording_update(policy, batches, config, optimizer, *, reference_policy=None, **kwargs):
        reference = None if reference_policy is None else reference_policy.model
        seen.append({
            "reference": reference,
            "separate": reference is not None and reference is not policy.model,
            "reference_is_start": reference is not None and same_as_start(reference),
            "policy_is_start": same_as_start(policy.model),
        })
        return real_update(policy, batches, config, optimizer, reference_policy=reference_policy, **kwargs)

    monkeypatch.setattr(step_mod, "policy_update", recording_update)
    flags = ("--no-lora", "--beta", "0.5", "--deterministic", "--seed", "2")
    whole, split = tmp_path / "whole", tmp_path / "split"
    trainer.train(cli_config(tiny_base, small_data, whole, *flags, "--max-steps", "2"),
                  reward_fn=fixed_rewards(REWARDS))
    trainer.train(cli_config(tiny_base, small_data, split, *flags, "--max-steps", "1"),
                  reward_fn=fixed_rewards(REWARDS))
    trainer.train(cli_config(tiny_base, small_data, split, *flags, "--max-steps", "2", "--resume"),
                  reward_fn=fixed_rewards(REWARDS))

    assert len(seen) == 4  # whole: steps 1, 2; split: step 1; resumed: step 2
    for record in seen:
        assert record["separate"] and record["reference_is_start"]
        assert not any(p.requires_grad for p in record["reference"].parameters())
    assert [record["policy_is_start"] for record in seen] == [True, False, True, False]
    # After the runs the copies are still the starting weights (the optimizer never touched them).
    assert all(same_as_start(record["reference"]) for record in seen)

    whole_metrics, split_metrics = read_metrics(whole), read_metrics(split)
    assert [m["step"] for m in split_metrics] == [1, 2]
    assert whole_metrics[0]["loss/kl_mean"] == pytest.approx(0.0, abs=1e-7)  # policy == reference at the start
    assert whole_metrics[1]["loss/kl_mean"] > 1e-6
    # The resumed step 2 measures the KL to the start, as the uninterrupted run does.
    assert split_metrics[1]["loss/kl_mean"] == pytest.approx(whole_metrics[1]["loss/kl_mean"], rel=1e-4)


# ---------------------------------------------------------------------------------------------
# 5. Learning-rate warm-up and schedules
# ---------------------------------------------------------------------------------------------

# --lr 0.01, --warmup-steps 2, --max-steps 6: warm-up (s + 1) / 2 * lr for steps 0, 1, then the
# schedule over the remaining 4 steps, progress p = (s - 2) / 4.
EXPECTED_LR = {
    "constant": [0.005, 0.01, 0.01, 0.01, 0.01, 0.01],
    "linear": [0.005, 0.01, 0.01, 0.0075, 0.005, 0.0025],
    "cosine": [0.005, 0.01, 0.01, 0.005 * (1 + math.cos(math.pi / 4)), 0.005, 0.005 * (1 + math.cos(3 * math.pi / 4))],
}


@pytest.mark.parametrize("schedule", sorted(EXPECTED_LR))
def test_warmup_and_schedule_set_the_applied_learning_rate(tmp_path, tiny_base, small_data, monkeypatch, schedule):
    applied = []

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            applied.append([group["lr"] for group in self.param_groups])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    out = tmp_path / "run"
    config = cli_config(tiny_base, small_data, out, "--max-steps", "6", "--warmup-steps", "2",
                        "--lr-schedule", schedule, "--prompts-per-step", "1", "--max-new-tokens", "2")
    trainer.train(config, reward_fn=fixed_rewards([0.0, 1.0]))
    assert len(applied) == 6
    assert all(len(set(rates)) == 1 for rates in applied)  # every parameter group
    assert [rates[0] for rates in applied] == pytest.approx(EXPECTED_LR[schedule], rel=1e-9)
    assert [m["lr"] for m in read_metrics(out)] == pytest.approx(EXPECTED_LR[schedule], rel=1e-9)

