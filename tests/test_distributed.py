"""Tests for data-parallel training (grpo/distributed.py) with 2 real CPU processes (gloo).

One `torchrun --nproc_per_node 2` launch runs this file as a script (`worker`, at the bottom):
the two processes open one gloo group and run the command lines of `grpo.train` (parsed, then
`train` with a scripted reward that has spread inside groups) and `sft.train.main` several
times in a row (one launch: the ~7 s import cost is paid once).  The
references run in the test process with one process and the same *global* batch:

- GRPO with LoRA, 4 prompts per step (2 per rank, one rollout chunk each), batch-std
  advantages (the global std needs the all-gathered rewards), beta > 0: after 3 steps the
  adapter equals the one-process adapter, and the logged metrics (global reductions) agree;
  a 2-step run resumed to 3 steps by both ranks equals it too.
- SFT with LoRA, grad_accum 1 on each of 2 ranks == grad_accum 2 on one process; the same with
  FSDP2 and full fine-tuning.
- GRPO with --fsdp --no-lora (FSDP2 on gloo works): the full weights after 2 steps equal the
  one-process full fine-tuning, also when both ranks resume after step 1, and the checkpoint is
  a plain safetensors model.
- GRPO with --oversample 2: the same sampled groups as one process (each rank then keeps its
  share from its own groups).
- GRPO over whole conversations (--env synthetic), LoRA replicas and FSDP2, and a 1-step run
  resumed to 2 steps by both ranks: the same episodes (global metrics) and weights as one process.
- Rank 0 alone writes the run directory: one metrics line per step, one log line per event.

Pure functions (shard_bounds, rollout_chunks, the single-process collectives) are tested
directly.  Equality holds to float tolerance: the ranks' gradients are summed in another order.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import TRAINER_TINY_MODEL

REPO = Path(__file__).resolve().parents[1]
FSDP = {"fsdp": True, "lora": False, "beta": 0.0, "lr": 1e-3, "max-steps": 2, "loss-type": "dapo"}
OVERSAMPLE = {"oversample": 2, "max-steps": 1, "beta": 0.0}
# Whole conversations (--env synthetic): 4 tasks per step, 2 per rank, one rollout chunk each.
EPISODES = {"env": "synthetic", "episode-reward": "mean_turn", "max-turns": 3, "max-episode-tokens": 3000,
            "max-steps": 2, "beta": 0.0}
SFT_FSDP = ["--fsdp", "--no-lora"]


# ---------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------


def test_shard_bounds_are_contiguous_and_cover_everything():
    from grpo.distributed import shard_bounds

    assert [shard_bounds(8, rank, 4) for rank in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert shard_bounds(5, 0, 1) == (0, 5)
    with pytest.raises(ValueError, match="cannot be split evenly over 3"):
        shard_bounds(8, 0, 3)


def test_rollout_chunks_are_cut_at_global_multiples_and_rank_bounds():
    from grpo.step import rollout_chunks

    # One process, 8 prompts in chunks of 4; two ranks of 4 each cut the same chunks.
    assert rollout_chunks(0, 8, 4) == [(0, 4), (4, 8)]
    assert rollout_chunks(0, 4, 4) + rollout_chunks(4, 8, 4) == [(0, 4), (4, 8)]
    # A rank bound inside a chunk (3 ranks x 2 prompts, chunks of 4): cut there, never straddled.
    assert rollout_chunks(2, 4, 4) == [(2, 4)] and rollout_chunks(4, 6, 4) == [(4, 6)]
    assert rollout_chunks(1, 7, 4) == [(1, 4), (4, 7)]


def test_single_process_collectives_are_identities():
    from grpo import distributed

    single = distributed.SINGLE
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.equal(distributed.all_gather_rows(single, values), values)
    assert torch.equal(distributed.all_reduce(single, values, "max"), values)
    assert distributed.all_reduce_numbers(single, {"a": 2.0}) == {"a": 2.0}
    assert distributed.any_rank(single, True) and not distributed.any_rank(single, False)
    parameter = torch.nn.Parameter(torch.ones(2))
    parameter.grad = torch.full((2,), 3.0)
    distributed.sum_gradients(single, [parameter])
    assert torch.equal(parameter.grad, torch.full((2,), 3.0))


def test_derived_seeds_depend_only_on_their_parts():
    from grpo.runtime import derived_seed

    assert derived_seed(0, 3, 4) == derived_seed(0, 3, 4)
    assert len({derived_seed(0, 3, 4), derived_seed(0, 3, 6), derived_seed(0, 4, 4), derived_seed(1, 3, 4)}) == 4
    assert 0 <= derived_seed(7, 1) < 2**63


def test_fsdp_and_lora_and_world_size_are_checked(tmp_path):
    from grpo.distributed import Distributed
    from grpo.trainer import GRPOConfig, check_world
    from sft.trainer import SFTConfig

    with pytest.raises(ValueError, match="--fsdp shards full fine-tuning"):
        GRPOConfig(fsdp=True)
    with pytest.raises(ValueError, match="--fsdp shards full fine-tuning"):
        SFTConfig(fsdp=True)
    with pytest.raises(SystemExit, match="--prompts-per-step 5 must be a multiple of the number of processes \\(2\\)"):
        check_world(GRPOConfig(prompts_per_step=5), Distributed(rank=0, world_size=2))
    with pytest.raises(SystemExit, match="--fsdp needs several processes"):
        check_world(GRPOConfig(fsdp=True, lora=False), Distributed())


# ---------------------------------------------------------------------------------------------
# Two processes vs one
# ---------------------------------------------------------------------------------------------


def grpo_argv(tiny_base: Path, data: Path, out: Path, **overrides) -> list[str]:
    values = {"model": tiny_base, "data": data / "train.json", "out": out, "group-size": 2, "prompts-per-step": 4,
              "rollout-batch-prompts": 2, "max-new-tokens": 6, "lora-r": 4, "lora-alpha": 8, "similarity": "lexical",
              "save-every": 0, "sample-every": 0, "lr": 1e-2, "seed": 5, "threads": 1, "scale-rewards": "batch",
              "beta": 0.05, "max-steps": 3, "device": "cpu"}
    values.update(overrides)
    argv = []
    for key, value in values.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is False:
            argv.append(f"--no-{key}")
        else:
            argv += [f"--{key}", str(value)]
    return argv


def sft_argv(tiny_base: Path, data: Path, out: Path, **overrides) -> list[str]:
    values = {"model": tiny_base, "data": data / "train.json", "out": out, "stage": "base", "lora-r": 4,
              "lora-alpha": 8, "micro-batch": 2, "grad-accum": 2, "max-steps": 3, "lr": 1e-2, "warmup-steps": 0,
              "eval-every": 0, "val-fraction": 0.2, "log-every": 1, "max-samples": 16, "seed": 2, "threads": 1,
              "device": "cpu"}
    values.update(overrides)
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def scripted_rewards(texts: list[str], targets: list[dict]) -> list:
    """A deterministic reward with spread inside groups (the tiny model's text earns none from the real one)."""
    from rewards.score import RewardResult

    results = []
    for text in texts:
        value = float(sum(map(ord, text)) % 7) / 3.0
        results.append(RewardResult(total=value, components={"accuracy": value - 1.0}, success=value > 1.5, kind="answer"))
    return results


def run_grpo(argv: list[str]) -> None:
    """`python -m grpo.train ARGV` with the scripted reward (parse_config + train, as main does)."""
    from grpo.config import parse_config
    from grpo.trainer import GRPOConfig, train

    train(parse_config(GRPOConfig, argv), reward_fn=scripted_rewards)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def trained_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from grpo.checkpoint import latest_checkpoint

    checkpoint = latest_checkpoint(run_dir)
    files = sorted(checkpoint.glob("adapter/*.safetensors")) or sorted(checkpoint.glob("model/*.safetensors"))
    assert len(files) == 1, files
    return load_file(files[0])


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], moved: dict | None = None,
                        rtol: float = 1e-4, atol: float = 2e-6):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=atol, msg=name)
    if moved is not None:  # the runs trained at all
        assert any(not torch.equal(expected[name], moved[name]) for name in expected if name in moved)


@pytest.fixture(scope="module")
def setup(tiny_base, small_data) -> tuple[Path, Path]:
    """The trainer tests' tiny model and data (tests/conftest.py)."""
    return tiny_base, small_data


@pytest.fixture(scope="module")
def two_process_runs(setup, tmp_path_factory):
    """Launch the 2-process worker once; returns the run directories by name."""
    tiny_base, data = setup
    root = tmp_path_factory.mktemp("two-processes")
    runs = {
        "grpo": ("grpo", grpo_argv(tiny_base, data, root / "grpo")),
        "grpo-split": ("grpo", grpo_argv(tiny_base, data, root / "grpo-split", **{"max-steps": 2})),
        "grpo-resumed": ("grpo", grpo_argv(tiny_base, data, root / "grpo-split", resume=True)),
        "sft": ("sft", sft_argv(tiny_base, data, root / "sft", **{"grad-accum": 1})),
        "fsdp": ("grpo", grpo_argv(tiny_base, data, root / "fsdp", **FSDP)),
        "fsdp-split": ("grpo", grpo_argv(tiny_base, data, root / "fsdp-split", **{**FSDP, "max-steps": 1})),
        "fsdp-resumed": ("grpo", grpo_argv(tiny_base, data, root / "fsdp-split", resume=True, **FSDP)),
        "sft-fsdp": ("sft", sft_argv(tiny_base, data, root / "sft-fsdp", **{"grad-accum": 1, "lr": 1e-3}) + SFT_FSDP),
        "oversample": ("grpo", grpo_argv(tiny_base, data, root / "oversample", **OVERSAMPLE)),
        "episodes": ("grpo", grpo_argv(tiny_base, data, root / "episodes", **EPISODES)),
        "episodes-fsdp": ("grpo", grpo_argv(tiny_base, data, root / "episodes-fsdp", **{**EPISODES, **FSDP})),
        "episodes-split": ("grpo", grpo_argv(tiny_base, data, root / "episodes-split", **{**EPISODES, "max-steps": 1})),
        "episodes-resumed": ("grpo", grpo_argv(tiny_base, data, root / "episodes-split", resume=True, **EPISODES)),
    }
    spec = root / "spec.json"
    spec.write_text(json.dumps([[entry, argv] for entry, argv in runs.values()]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(Path(__file__).resolve()), str(spec)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-5000:])
    return {name: root / name for name in runs} | {"grpo-resumed": root / "grpo-split", "fsdp-resumed": root / "fsdp-split",
                                                  "episodes-resumed": root / "episodes-split"}


@pytest.fixture(scope="module")
def one_process(setup, tmp_path_factory):
    """The one-process references, run in this process (threads restored afterwards)."""
    import sft.train

    tiny_base, data = setup
    root = tmp_path_factory.mktemp("one-process")
    threads = torch.get_num_threads()
    try:
        run_grpo(grpo_argv(tiny_base, data, root / "grpo"))
        sft.train.main(sft_argv(tiny_base, data, root / "sft"))
        run_grpo(grpo_argv(tiny_base, data, root / "full", **{**FSDP, "fsdp": False}))
        sft.train.main(sft_argv(tiny_base, data, root / "sft-full", lr=1e-3) + SFT_FSDP[1:])
        run_grpo(grpo_argv(tiny_base, data, root / "oversample", **OVERSAMPLE))
        run_grpo(grpo_argv(tiny_base, data, root / "episodes", **EPISODES))
        run_grpo(grpo_argv(tiny_base, data, root / "episodes-full", **{**EPISODES, **FSDP, "fsdp": False}))
    finally:
        torch.set_num_threads(threads)
    return {"grpo": root / "grpo", "sft": root / "sft", "full": root / "full", "sft-full": root / "sft-full",
            "oversample": root / "oversample", "episodes": root / "episodes", "episodes-full": root / "episodes-full"}


def test_grpo_two_processes_equal_one(two_process_runs, one_process):
    expected = trained_tensors(one_process["grpo"])
    assert_same_weights(trained_tensors(two_process_runs["grpo"]), expected,
                        moved={name: torch.zeros_like(tensor) for name, tensor in expected.items() if "lora_B" in name})
    # The logged metrics are global reductions: the same numbers as one process computed.
    two, one = read_metrics(two_process_runs["grpo"]), read_metrics(one_process["grpo"])
    assert [record["step"] for record in two] == [1, 2, 3]  # rank 0 alone logs
    for key in ("reward/mean", "reward/std", "completion/length_mean", "completion/length_max", "success_rate",
                "loss", "loss/kl_mean", "loss/num_tokens", "grad_norm", "reward/zero_variance_group_share"):
        assert [record[key] for record in two] == pytest.approx([record[key] for record in one], rel=1e-4, abs=1e-6), key
    assert two[0]["loss/kl_mean"] == pytest.approx(0.0, abs=1e-7) and two[2]["loss/kl_mean"] > 0
    log = (two_process_runs["grpo"] / "log.txt").read_text()
    assert "distributed: 2 processes (gloo), 2 prompts per rank and step" in log
    assert log.count("checkpoint ") == 1 and log.count("data ") == 1  # one writer


def test_grpo_resumed_by_both_ranks_equals_uninterrupted(two_process_runs, one_process):
    resumed = two_process_runs["grpo-resumed"]
    assert_same_weights(trained_tensors(resumed), trained_tensors(one_process["grpo"]))
    assert [record["step"] for record in read_metrics(resumed)] == [1, 2, 3]
    assert "at step 2" in (resumed / "log.txt").read_text()


def test_sft_two_processes_equal_one_with_the_same_global_batch(two_process_runs, one_process):
    assert_same_weights(trained_tensors(two_process_runs["sft"]), trained_tensors(one_process["sft"]))
    two, one = read_metrics(two_process_runs["sft"]), read_metrics(one_process["sft"])
    assert [record["step"] for record in two] == [1, 2, 3]
    assert [record["loss"] for record in two] == pytest.approx([record["loss"] for record in one], rel=1e-4)
    assert two[-1]["val_loss"] == pytest.approx(one[-1]["val_loss"], rel=1e-4)


def test_oversample_two_processes_sample_what_one_samples_and_keep_per_rank(two_process_runs, one_process):
    """8 groups sampled per step, 4 kept: the same samples as one process; each rank keeps its best
    2 of its own 4, so the kept groups' mean std is at most that of one process's best 4 of 8."""
    (two,), (one,) = read_metrics(two_process_runs["oversample"]), read_metrics(one_process["oversample"])
    for key in ("reward/mean", "reward/std", "completion/length_mean", "select/group_std_all"):
        assert two[key] == pytest.approx(one[key], rel=1e-5), key
    assert one["select/group_std_all"] <= two["select/group_std_kept"] <= one["select/group_std_kept"] + 1e-6
    assert math.isfinite(two["loss"]) and two["nonfinite_loss"] is False


EPISODE_METRICS = ("reward/mean", "reward/std", "success_rate", "episode/turns_mean", "episode/tokens_mean",
                   "episode/tokens_max", "episode/invalid_actions_mean", "completion/length_mean",
                   "episode/gold_path_turn_share", "reward/accuracy", "loss", "loss/num_tokens", "grad_norm")


@pytest.mark.parametrize("two_name, one_name", [("episodes", "episodes"), ("episodes-fsdp", "episodes-full"),
                                                ("episodes-resumed", "episodes")])
def test_episode_grpo_two_processes_equal_one(two_process_runs, one_process, setup, two_name, one_name):
    """Whole conversations under torchrun: the same episodes (metrics are global sums) and the same
    weights as one process, with LoRA replicas, with FSDP2 full fine-tuning, and resumed by both
    ranks after step 1."""
    from safetensors.torch import load_file

    two, one = read_metrics(two_process_runs[two_name]), read_metrics(one_process[one_name])
    assert [record["step"] for record in two] == [1, 2]
    for key in EPISODE_METRICS:
        assert [record[key] for record in two] == pytest.approx([record[key] for record in one], rel=1e-4,
                                                                abs=1e-6), key
    assert one[0]["episode/turns_mean"] > 1 and one[0]["reward/std"] > 0  # real episodes, with spread
    if two_name == "episodes-resumed":
        assert "at step 1" in (two_process_runs[two_name] / "log.txt").read_text()
    expected = trained_tensors(one_process[one_name])
    moved = (load_file(setup[0] / "model.safetensors") if two_name == "episodes-fsdp" else
             {name: torch.zeros_like(tensor) for name, tensor in expected.items() if "lora_B" in name})
    # Looser than per-turn GRPO: each rank pads its episodes (several hundred tokens) to its own
    # longest, which changes float summation orders, and AdamW's first steps magnify the relative
    # difference of near-zero gradients (seen: 3e-5 on weights of size 0.2 that moved by ~1e-2).
    assert_same_weights(trained_tensors(two_process_runs[two_name]), expected, moved=moved, rtol=1e-3, atol=1e-4)


def test_fsdp_two_processes_equal_full_fine_tuning_on_one(two_process_runs, one_process, setup):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    tiny_base, _ = setup
    initial = load_file(tiny_base / "model.safetensors")
    assert_same_weights(trained_tensors(two_process_runs["fsdp"]), trained_tensors(one_process["full"]), moved=initial)
    # The checkpoint is an ordinary model directory (rank 0 gathered the shards).
    from grpo.checkpoint import latest_checkpoint

    checkpoint = latest_checkpoint(two_process_runs["fsdp"])
    model = AutoModelForCausalLM.from_pretrained(checkpoint / "model", use_safetensors=True)
    assert model.config.hidden_size == TRAINER_TINY_MODEL.hidden_size
    assert "FSDP2" in (two_process_runs["fsdp"] / "log.txt").read_text()

    # Resumed by both ranks from a gathered checkpoint (weights before sharding, then the
    # whole optimizer state sharded): the same 2-step result.
    resumed = two_process_runs["fsdp-resumed"]
    assert_same_weights(trained_tensors(resumed), trained_tensors(one_process["full"]))
    assert "at step 1" in (resumed / "log.txt").read_text()


def test_sft_fsdp_two_processes_equal_full_fine_tuning_on_one(two_process_runs, one_process, setup):
    from safetensors.torch import load_file

    tiny_base, _ = setup
    two, one = read_metrics(two_process_runs["sft-fsdp"]), read_metrics(one_process["sft-full"])
    assert [record["loss"] for record in two] == pytest.approx([record["loss"] for record in one], rel=1e-4)
    assert two[-1]["val_loss"] == pytest.approx(one[-1]["val_loss"], rel=1e-4)
    assert_same_weights(trained_tensors(two_process_runs["sft-fsdp"]), trained_tensors(one_process["sft-full"]),
                        moved=load_file(tiny_base / "model.safetensors"))


# ---------------------------------------------------------------------------------------------
# The worker torchrun starts (python -m torch.distributed.run ... tests/test_distributed.py SPEC)
# ---------------------------------------------------------------------------------------------


def worker(spec_path: str) -> None:
    """Run each [entry, argv] of the spec in turn, in one process group (opened once here; the
    trainers use a group that exists and leave it open)."""
    import torch.distributed as dist

    import sft.train

    dist.init_process_group("gloo")
    try:
        for entry, argv in json.loads(Path(spec_path).read_text()):
            {"grpo": run_grpo, "sft": sft.train.main}[entry](argv)
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    worker(sys.argv[1])
