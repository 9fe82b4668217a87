"""Run plumbing shared by the trainers: devices, learning-rate schedule, logs, signals."""

from __future__ import annotations

import functools
import json
import math
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch


def resolve_device(name: str) -> torch.device:
    """--device for a one-process tool (evaluation): what a training run's rank 0 would use."""
    from grpo.distributed import resolve_run_device

    return resolve_run_device(name, local_rank=0)


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
# `--dtype auto` computes in bf16 on a CPU only for models at least this wide: the tiny default
# (hidden 128) spends its time in small operations, where bf16 only adds casts.
AUTO_BF16_MIN_HIDDEN = 512


def resolve_dtype(name: str, device: torch.device) -> torch.dtype | str:
    """A torch dtype for a --dtype name; "auto" stays "auto" (decided per model: `auto_dtype`)."""
    if name == "auto":
        return "auto"
    if name not in DTYPES:
        raise SystemExit(f"--dtype {name!r}: expected one of {sorted(DTYPES)} or auto")
    return DTYPES[name]


@functools.cache
def cpu_bf16_speedup() -> float:
    """How much faster a bf16 matmul runs than an fp32 one on this CPU (measured once per process).

    CPUs with AMX-BF16 run bf16 matmuls about 8x faster than fp32; CPUs without bf16 instructions
    (AVX2-only ones) emulate them hundreds of times slower.  A 256 x 256 product in each dtype
    (a few milliseconds) tells them apart, whatever the CPU reports about itself.
    """
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        left, right = torch.ones(256, 256, dtype=dtype), torch.ones(256, 256, dtype=dtype)
        torch.matmul(left, right)  # warm-up: kernel selection, allocation
        began = time.perf_counter()
        for _ in range(3):
            torch.matmul(left, right)
        timings[dtype] = time.perf_counter() - began
    return timings[torch.float32] / max(timings[torch.bfloat16], 1e-9)


def auto_dtype(device: torch.device | str, hidden_size: int | None = None) -> torch.dtype:
    """`--dtype auto`: bf16 on a GPU that supports it; on a CPU, bf16 where it measures at least 2x
    faster than fp32 (`cpu_bf16_speedup`) and the model is at least `AUTO_BF16_MIN_HIDDEN` wide;
    fp32 otherwise.  bf16 here means the base weights: LoRA weights, optimizer state, log-probs
    and losses stay fp32 (peft keeps adapters in fp32; grpo.policy scores tokens in fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type != "cpu" or (hidden_size or 0) < AUTO_BF16_MIN_HIDDEN:
        return torch.float32
    return torch.bfloat16 if cpu_bf16_speedup() >= 2.0 else torch.float32


def lr_at(step: int, *, lr: float, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Linear warmup over `warmup_steps`, then constant, linear or cosine decay to 0 at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return lr * (1.0 - progress)
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def derived_seed(*parts: int) -> int:
    """A 63-bit seed determined by `parts` alone, e.g. (seed, step, rank) or (seed, step, prompt).

    The trainers draw every random number of a step from generators seeded this way, so a
    resumed run (or a run split over a different number of processes) re-derives exactly the
    streams the uninterrupted run used, and no generator state has to be saved per rank.
    """
    return random.Random(":".join(str(int(part)) for part in parts)).getrandbits(63)


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, checkpoints and exits non-zero.

    A second signal of the same kind while stopping falls back to the default behaviour.  In a
    distributed run the signal may reach the ranks at different moments (torchrun forwards it to
    every worker), so the trainers agree on the flag once per step (`grpo.distributed.any_rank`)
    and all ranks stop after the same step.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None:
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        print(f"\n{self.signal_name} received: finishing this step, then checkpointing and exiting", file=sys.stderr)

    def __bool__(self) -> bool:
        return self.signal_name is not None

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def trim_logs(run_dir: str | Path, step: int, names: tuple[str, ...] = ("metrics.jsonl", "samples.jsonl")) -> None:
    """Keep only the records of steps <= `step` in the run's JSONL logs (called on --resume).

    A run killed after its last checkpoint logged steps that the resumed run repeats, and a
    SIGKILL may cut the last line short; both are dropped so the logs read as one clean run.
    """
    for name in names:
        path = Path(run_dir) / name
        if not path.is_file():
            continue
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if isinstance(record, dict) and int(record.get("step", 0)) <= step:
                kept.append(line)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        tmp.replace(path)


class RunLogger:
    """Metrics to `metrics.jsonl` (one line per logged step), TensorBoard when installed, a text log.

    enabled=False (every rank but 0 of a distributed run) makes every method a no-op and creates
    no file.
    """

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._writer = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = (self.run_dir / "metrics.jsonl").open("a")
        self._text = (self.run_dir / "log.txt").open("a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
            except Exception:  # tensorboard is optional
                self._writer = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **metrics}
        self._metrics.write(json.dumps(record, default=float) + "\n")
        self._metrics.flush()
        if self._writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(key, value, step)

    def text(self, message: str) -> None:
        if not self.enabled:
            return
        self._text.write(message.rstrip() + "\n")
        self._text.flush()

    def write_jsonl(self, name: str, records: list[dict[str, Any]]) -> None:
        if not self.enabled:
            return
        with (self.run_dir / name).open("a") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")

    def close(self) -> None:
        if not self.enabled:
            return
        self._metrics.close()
        self._text.close()
        if self._writer is not None:
            self._writer.close()
