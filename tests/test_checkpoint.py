"""Tests for grpo.checkpoint: atomic publishing, pruning, `latest`, trainer state and RNG round trips.

No model is needed here: `write_checkpoint` takes any function that fills a directory.  The
trainers' own checkpoints (adapter loadable by peft, resume) are tested in test_grpo_trainer.py
and test_sft.py.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from grpo.checkpoint import (
    STATE_FILE,
    checkpoints_dir,
    latest_checkpoint,
    list_checkpoints,
    load_trainer_state,
    rng_state,
    save_trainer_state,
    set_rng_state,
    write_checkpoint,
)


def writer(payload: str):
    """A write_fn that stores `payload` and a trainer state, like save_training_checkpoint does."""

    def write(directory: Path) -> None:
        (directory / "weights.txt").write_text(payload)
        save_trainer_state(directory, {"step": int(payload)})

    return write


def names(run_dir: Path) -> list[str]:
    return [path.name for path in list_checkpoints(run_dir)]


def test_write_checkpoint_publishes_and_points_latest(tmp_path):
    path = write_checkpoint(tmp_path, 7, writer("7"))
    assert path == checkpoints_dir(tmp_path) / "step-000007"
    assert (path / "weights.txt").read_text() == "7"
    assert (checkpoints_dir(tmp_path) / "latest").read_text().strip() == "step-000007"
    assert latest_checkpoint(tmp_path) == path
    # Nothing temporary is left behind after a successful write.
    assert sorted(p.name for p in checkpoints_dir(tmp_path).iterdir()) == ["latest", "step-000007"]


def test_failing_write_leaves_previous_latest_and_nothing_published(tmp_path):
    first = write_checkpoint(tmp_path, 1, writer("1"))

    def crash(directory: Path) -> None:
        (directory / "weights.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_checkpoint(tmp_path, 2, crash)
    assert latest_checkpoint(tmp_path) == first
    assert (checkpoints_dir(tmp_path) / "latest").read_text().strip() == "step-000001"
    assert not (checkpoints_dir(tmp_path) / "step-000002").exists()
    # The half-written temporary directory is cleaned up, not left to accumulate.
    assert sorted(p.name for p in checkpoints_dir(tmp_path).iterdir()) == ["latest", "step-000001"]


def test_leftover_temporary_directories_are_ignored(tmp_path):
    """A process killed mid-write (no chance to clean up) leaves a .tmp directory, maybe complete."""
    good = write_checkpoint(tmp_path, 3, writer("3"))
    root = checkpoints_dir(tmp_path)
    stale = root / ".tmp-step-000009-12345"
    stale.mkdir()
    save_trainer_state(stale, {"step": 9})
    assert latest_checkpoint(tmp_path) == good
    assert names(tmp_path) == ["step-000003"]
    # Even without the pointer file, only published step-* directories count.
    (root / "latest").unlink()
    assert latest_checkpoint(tmp_path) == good


def test_latest_falls_back_when_pointer_names_an_incomplete_directory(tmp_path):
    write_checkpoint(tmp_path, 1, writer("1"))
    second = write_checkpoint(tmp_path, 2, writer("2"))
    root = checkpoints_dir(tmp_path)
    (root / "latest").write_text("step-000005\n")  # e.g. deleted by hand
    assert latest_checkpoint(tmp_path) == second
    (root / "step-000004").mkdir()  # a directory without trainer state is not a checkpoint
    assert latest_checkpoint(tmp_path) == second
    assert latest_checkpoint(tmp_path / "elsewhere") is None


def test_keep_last_prunes_oldest(tmp_path):
    for step in (2, 4, 6, 8):
        write_checkpoint(tmp_path, step, writer(str(step)), keep_last=2)
    assert names(tmp_path) == ["step-000006", "step-000008"]
    write_checkpoint(tmp_path, 10, writer("10"), keep_last=0)  # 0 keeps everything
    assert names(tmp_path) == ["step-000006", "step-000008", "step-000010"]


def test_keep_last_never_deletes_the_checkpoint_just_written(tmp_path):
    """A fresh run (no --resume) into a directory with later steps of an old run: the new
    checkpoint must survive pruning and be `latest`."""
    for step in (20, 40):
        write_checkpoint(tmp_path, step, writer(str(step)), keep_last=2)
    new = write_checkpoint(tmp_path, 2, writer("2"), keep_last=1)
    assert new.is_dir()
    assert latest_checkpoint(tmp_path) == new
    assert (new / "weights.txt").read_text() == "2"


def test_resaving_a_step_replaces_it(tmp_path):
    write_checkpoint(tmp_path, 5, writer("5"))
    path = write_checkpoint(tmp_path, 5, lambda d: (writer("5")(d), (d / "extra.txt").write_text("x")))
    assert (path / "extra.txt").is_file()
    assert names(tmp_path) == ["step-000005"]


def test_trainer_state_round_trip_with_weights_only(tmp_path):
    parameter = torch.nn.Parameter(torch.randn(3))
    optimizer = torch.optim.AdamW([parameter], lr=0.1)
    parameter.grad = torch.ones(3)
    optimizer.step()
    generator = torch.Generator().manual_seed(3)
    state = {"step": 4, "optimizer": optimizer.state_dict(), "rng": rng_state(), "generator": generator.get_state(),
             "data_stats": {"train_samples": 8, "data": "x.json"}}
    save_trainer_state(tmp_path, state)
    # load_trainer_state uses weights_only=True; loading it by hand that way must work too.
    raw = torch.load(tmp_path / STATE_FILE, weights_only=True)
    loaded = load_trainer_state(tmp_path)
    assert raw["step"] == loaded["step"] == 4
    assert loaded["data_stats"] == {"train_samples": 8, "data": "x.json"}
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    fresh.load_state_dict(loaded["optimizer"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


def test_rng_state_round_trip_restores_python_and_torch_streams(tmp_path):
    save_trainer_state(tmp_path, {"rng": rng_state()})
    expected = (random.random(), torch.rand(2))
    random.random(), torch.rand(5)  # move both streams on
    set_rng_state(load_trainer_state(tmp_path)["rng"])
    again = (random.random(), torch.rand(2))
    assert again[0] == expected[0]
    assert torch.equal(again[1], expected[1])
