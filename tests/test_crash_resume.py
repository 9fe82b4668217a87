"""Crashes for real: training subprocesses killed with SIGKILL, stopped with SIGTERM, then resumed.

Each run is a real child process (`Runs.start`) that parses the command line of `grpo.train` /
`sft.train` and trains, for GRPO with a scripted reward that has spread inside groups (the tiny
model's text earns the same reward everywhere from the real one, and nothing would train).  The
children are forked from a multiprocessing fork server that imported torch, transformers and
peft once (7 s that every plain `python -m ...` child would pay again); they are killed with
real signals all the same.  Every run is deterministic (--deterministic, one thread, a checkpoint
after every step), so a killed run resumed with --resume must end with exactly the weights of an
uninterrupted run, which runs in the test process.

Kill moments (a seeded random delay where one is used, so a failure reproduces):

- during start-up, before any checkpoint exists (the resume starts from step 0);
- at a random moment of the steps after the first checkpoint (rollout, backward, logging);
- while a checkpoint is being written (the moment its `.tmp-step-*` directory appears);
- SFT at a random moment of its steps.

After each kill the newest checkpoint, if any, must load completely (trainer state with
weights_only, weights, config, lineage): never a corrupt `latest`.  SIGTERM: the run finishes its
step, checkpoints it, exits with status 1 and says how to resume; resumed, it equals the
uninterrupted run too.  SIGINT goes through the same handler (tested in-process).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GRPO_STEPS, SFT_STEPS = 6, 6


# ---------------------------------------------------------------------------------------------
# The runs
# ---------------------------------------------------------------------------------------------


def scripted_rewards(texts: list[str], targets: list[dict]) -> list:
    from rewards.score import RewardResult

    results = []
    for text in texts:
        value = float(sum(map(ord, text)) % 7) / 3.0
        results.append(RewardResult(total=value, components={"accuracy": value - 1.0}, success=value > 1.5, kind="answer"))
    return results


def run_entry(entry: str, argv: list[str]) -> None:
    """What the subprocess runs: the entry point's command line (GRPO with the scripted reward)."""
    if entry == "sft":
        import sft.train

        sft.train.main(argv)
        return
    from grpo.config import parse_config
    from grpo.trainer import GRPOConfig, train

    train(parse_config(GRPOConfig, argv), reward_fn=scripted_rewards)


def grpo_argv(setup: tuple[Path, Path], out: Path, **overrides) -> list[str]:
    tiny_base, data = setup
    values = {"model": tiny_base, "data": data / "train.json", "out": out, "group-size": 2, "prompts-per-step": 2,
              "rollout-batch-prompts": 2, "max-new-tokens": 6, "lora-r": 4, "lora-alpha": 8, "similarity": "lexical",
              "save-every": 1, "keep-checkpoints": 2, "sample-every": 1, "lr": 1e-2, "seed": 3, "threads": 1,
              "max-steps": GRPO_STEPS, "beta": 0.05, "device": "cpu"}
    values.update(overrides)
    return command_line(values)


def sft_argv(setup: tuple[Path, Path], out: Path, **overrides) -> list[str]:
    tiny_base, data = setup
    values = {"model": tiny_base, "data": data / "train.json", "out": out, "stage": "base", "lora-r": 4,
              "lora-alpha": 8, "micro-batch": 2, "grad-accum": 2, "max-steps": SFT_STEPS, "lr": 1e-2,
              "warmup-steps": 2, "eval-every": 0, "val-fraction": 0.2, "log-every": 1, "max-samples": 16, "seed": 2,
              "threads": 1, "save-every": 1, "keep-checkpoints": 2, "device": "cpu"}
    values.update(overrides)
    return command_line(values)


def command_line(values: dict) -> list[str]:
    argv = ["--deterministic"]
    for key, value in values.items():
        argv += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    return argv


def run_in_process(entry: str, argv: list[str]) -> None:
    """The same run in the test process (no start-up cost); process-wide torch settings restored."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        run_entry(entry, argv)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def child_main(entry: str, argv: list[str], output: str) -> None:
    """A child's whole life: stdout and stderr into `output`; a SystemExit message there too and
    exit status 1, as `python -m grpo.train` would do."""
    with open(output, "w") as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
    try:
        run_entry(entry, argv)
    except SystemExit as exit:
        print(exit.code, file=sys.stderr, flush=True)
        os._exit(1 if isinstance(exit.code, str) else int(exit.code or 0))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class Child:
    """A training child process: `.process` (multiprocessing.Process) and its output file."""

    def __init__(self, process, output: Path) -> None:
        self.process, self.output = process, output

    def running(self) -> bool:
        return self.process.is_alive()

    def signal(self, signum: int) -> None:
        os.kill(self.process.pid, signum)

    def wait(self, timeout: float = 120.0) -> tuple[int, str]:
        self.process.join(timeout)
        assert self.process.exitcode is not None, "the child did not end"
        return self.process.exitcode, self.output.read_text()


@pytest.fixture(scope="module")
def start():
    """start(entry, argv, output) -> Child, forked from a server that preloaded the heavy imports."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "transformers", "peft", "grpo.trainer", "sft.trainer",
                                    "tests.test_crash_resume"])
    # Start the server (and its imports) in the background while the uninterrupted runs train.
    warm_up = threading.Thread(target=lambda: context.Process(target=time.sleep, args=(0,)).start())
    warm_up.start()

    def launch(entry: str, argv: list[str], output: Path) -> Child:
        warm_up.join()
        process = context.Process(target=child_main, args=(entry, argv, str(output)), daemon=True)
        process.start()
        return Child(process, output)

    return launch


def wait_for(condition, child: Child, timeout: float = 120.0, interval: float = 0.01) -> bool:
    """Poll `condition()` until true (True) or the child ended / the time ran out (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if not child.running():
            return False
        time.sleep(interval)
    return False


def metric_lines(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def writing_checkpoint(out: Path) -> bool:
    root = out / "checkpoints"
    return root.is_dir() and any(name.startswith(".tmp-step-") for name in os.listdir(root))


def kill(child: Child) -> None:
    child.signal(signal.SIGKILL)
    status, _ = child.wait()
    assert status == -signal.SIGKILL


def trained_tensors(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from grpo.checkpoint import latest_checkpoint

    checkpoint = latest_checkpoint(out)
    return load_file(checkpoint / "adapter" / "adapter_model.safetensors")


def assert_checkpoint_complete(out: Path) -> int | None:
    """The newest checkpoint loads in full; returns its step (None: no checkpoint yet)."""
    from safetensors.torch import load_file

    from grpo.checkpoint import latest_checkpoint, load_trainer_state
    from grpo.policy import read_lineage

    checkpoint = latest_checkpoint(out)
    if checkpoint is None:
        return None
    state = load_trainer_state(checkpoint)  # weights_only=True
    assert state["step"] == int(checkpoint.name.split("-")[1]) and state["optimizer"]["state"] is not None
    assert load_file(checkpoint / "adapter" / "adapter_model.safetensors")
    assert json.loads((checkpoint / "config.json").read_text())["seed"] in (2, 3)
    assert read_lineage(checkpoint)["adapters"]
    return int(state["step"])


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    assert any(float(tensor.abs().max()) > 0 for name, tensor in expected.items() if "lora_B" in name)  # it trained
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.fixture(scope="module")
def setup(tiny_base, small_data) -> tuple[Path, Path]:
    """The trainer tests' tiny model and data (tests/conftest.py)."""
    return tiny_base, small_data


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("uninterrupted")
    run_in_process("grpo", grpo_argv(setup, root / "grpo"))
    run_in_process("sft", sft_argv(setup, root / "sft"))
    return {"grpo": root / "grpo", "sft": root / "sft"}


# ---------------------------------------------------------------------------------------------
# SIGKILL, then --resume
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("moment", ["startup", "random", "checkpoint-write"])
def test_grpo_killed_and_resumed_equals_uninterrupted(moment, setup, start, uninterrupted, tmp_path):
    out = tmp_path / "run"
    child = start("grpo", grpo_argv(setup, out), tmp_path / "output.txt")
    if moment == "startup":
        assert wait_for(lambda: (tmp_path / "output.txt").is_file(), child)
        time.sleep(0.2)  # loading the model and data: nothing written yet
    elif moment == "random":
        assert wait_for(lambda: metric_lines(out) >= 1, child), child.output.read_text()[-3000:]
        time.sleep(random.Random(7).uniform(0.0, 1.2))  # somewhere in steps 2..4: rollout, backward or a save
    else:
        assert wait_for(lambda: metric_lines(out) >= 2, child), child.output.read_text()[-3000:]
        assert wait_for(lambda: writing_checkpoint(out), child, interval=0.0005), "no checkpoint write was caught"
    assert child.running(), "the run ended before it could be killed"
    kill(child)

    step = assert_checkpoint_complete(out)
    if moment == "startup":
        assert step is None
    elif moment == "random":  # a kill right after step 1's metrics line may precede its checkpoint
        assert step is None or 1 <= step < GRPO_STEPS
    else:
        assert 1 <= step < GRPO_STEPS
    run_in_process("grpo", grpo_argv(setup, out, resume=True))
    assert_same_weights(trained_tensors(out), trained_tensors(uninterrupted["grpo"]))
    # The logs read as one run: the killed run's lines after its checkpoint were dropped.
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == list(
        range(1, GRPO_STEPS + 1))
    leftovers = [path.name for path in (out / "checkpoints").iterdir() if path.name.startswith(".")]
    assert leftovers == [], leftovers  # the killed writer's temporary directory was removed


def test_sft_killed_and_resumed_equals_uninterrupted(setup, start, uninterrupted, tmp_path):
    out = tmp_path / "run"
    child = start("sft", sft_argv(setup, out), tmp_path / "output.txt")
    assert wait_for(lambda: metric_lines(out) >= 1, child), child.output.read_text()[-3000:]
    time.sleep(random.Random(11).uniform(0.0, 0.5))
    assert child.running(), "the run ended before it could be killed"
    kill(child)
    assert 1 <= assert_checkpoint_complete(out) < SFT_STEPS
    run_in_process("sft", sft_argv(setup, out, resume=True))
    assert_same_weights(trained_tensors(out), trained_tensors(uninterrupted["sft"]))


# ---------------------------------------------------------------------------------------------
# SIGTERM / SIGINT: finish the step, checkpoint, exit non-zero
# ---------------------------------------------------------------------------------------------


def test_sigterm_finishes_the_step_checkpoints_and_exits_nonzero(setup, start, uninterrupted, tmp_path):
    out = tmp_path / "run"
    child = start("grpo", grpo_argv(setup, out, **{"max-steps": 40}), tmp_path / "output.txt")
    assert wait_for(lambda: metric_lines(out) >= 1, child), child.output.read_text()[-3000:]
    child.signal(signal.SIGTERM)
    status, stderr = child.wait()
    assert status == 1, stderr[-3000:]
    assert "SIGTERM received: finishing this step" in stderr
    step = metric_lines(out)  # every step it started, it finished and logged
    assert 1 <= step < GRPO_STEPS
    assert f"stopped by SIGTERM at step {step}; resume with --resume --out {out}" in stderr
    assert assert_checkpoint_complete(out) == step  # the checkpoint of exactly the steps taken

    run_in_process("grpo", grpo_argv(setup, out, resume=True, **{"max-steps": GRPO_STEPS}))
    assert_same_weights(trained_tensors(out), trained_tensors(uninterrupted["grpo"]))


def test_sigint_sets_the_stop_flag_instead_of_raising():
    from grpo.runtime import StopRequest

    with StopRequest() as stop:
        assert not stop
        os.kill(os.getpid(), signal.SIGINT)  # delivered to this (main) thread before kill returns
        time.sleep(0.01)
        assert stop and stop.signal_name == "SIGINT"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the previous handler is back


# ---------------------------------------------------------------------------------------------
# The pieces that make a kill harmless
# ---------------------------------------------------------------------------------------------


def test_a_killed_resave_is_put_back_and_temporaries_are_removed(tmp_path):
    """Killed between moving an old copy of a step aside and publishing the new copy: the old
    copy is complete and comes back; a half-written temporary directory goes."""
    from grpo.checkpoint import checkpoints_dir, latest_checkpoint, remove_stale_temporaries, save_trainer_state

    root = checkpoints_dir(tmp_path)
    (root / "step-000004").mkdir(parents=True)
    save_trainer_state(root / "step-000004", {"step": 4})
    aside = root / ".replaced-step-000005-999"
    aside.mkdir()
    save_trainer_state(aside, {"step": 5})
    (root / ".tmp-step-000006-999").mkdir()
    (root / ".latest-999").write_text("step-000006\n")
    (root / "latest").write_text("step-000005\n")
    assert latest_checkpoint(tmp_path).name == "step-000004"  # before the repair: the step before
    assert remove_stale_temporaries(tmp_path) == [".latest-999", ".tmp-step-000006-999"]
    assert sorted(path.name for path in root.iterdir()) == ["latest", "step-000004", "step-000005"]
    assert latest_checkpoint(tmp_path).name == "step-000005"


def test_trim_logs_drops_steps_after_the_checkpoint_and_a_cut_line(tmp_path):
    from grpo.runtime import trim_logs

    lines = [json.dumps({"step": step, "loss": 1.0}) for step in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 5, "lo')
    trim_logs(tmp_path, 2)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]

