"""Plots of a GRPO run and of evaluation outputs, as PNG files that read without the logs.

    python -m eval.plot runs/pipeline                      # finds metrics.jsonl and eval outputs
    python -m eval.plot runs/grpo --eval-dir runs/eval --out figures/

From a run's `metrics.jsonl` (one JSON object per logged step, written by grpo.runtime.RunLogger):

    rewards.png            the composite reward and its components over steps (the paper's
                           Figure 1: conditional accuracy, format, thinking length)
    completion_length.png  mean and longest completion (tokens) and the share cut at the limit
    zero_variance.png      share of groups whose G rewards are all equal (advantage 0, no gradient)

From evaluation prediction files (`predictions-<checkpoint>-<split>.jsonl`, written by eval.run):

    think_length.png       the distribution of think-block length in words, per checkpoint,
                           one panel per split

matplotlib is an optional dependency (`pip install -e '.[plot]'`); it is imported only when a plot
is drawn, through the object-oriented API with the Agg canvas (no pyplot state, no display).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Sequence

METRICS_FILE = "metrics.jsonl"
PREDICTIONS_GLOB = "predictions-*.jsonl"

# (label, candidate keys in metrics.jsonl): the first key present is used.
REWARD_SERIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("total reward R", ("reward/mean",)),
    ("conditional accuracy R_acc", ("reward/accuracy",)),
    ("format R_fmt", ("reward/format",)),
    ("thinking length R_len", ("reward/length",)),
)
ZERO_VARIANCE_KEYS = ("reward/zero_variance_group_share", "reward/zero_variance_share", "zero_variance_group_share")
FEW_SCORED_KEYS = ("reward/few_scored_group_share",)
LENGTH_MEAN_KEYS = ("completion/length_mean",)
LENGTH_MAX_KEYS = ("completion/length_max",)
TRUNCATED_KEYS = ("completion/truncated_share",)
REWARD_STD_KEYS = ("reward/std",)


def _figure(**kwargs: Any) -> Any:
    """A matplotlib Figure on the Agg canvas, or a clear error when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ModuleNotFoundError as error:
        raise ImportError(
            "eval.plot needs matplotlib, an optional dependency: pip install matplotlib "
            "(or pip install -e '.[plot]')"
        ) from error
    figure = Figure(**kwargs)
    FigureCanvasAgg(figure)
    return figure


# ---------------------------------------------------------------------------------------------
# Reading the logs
# ---------------------------------------------------------------------------------------------


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every JSON object of a JSONL file; a bad line raises an error naming the file and line."""
    path = Path(path)
    rows = []
    with path.open() as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not a JSON object ({error.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The logged steps of a metrics.jsonl, sorted by step, one record per step.

    A resumed run logs the steps after its last checkpoint a second time; the last record of a
    step wins, because it belongs to the run that went on.
    """
    by_step: dict[int, dict[str, Any]] = {}
    for row in read_jsonl(path):
        if "step" in row and isinstance(row["step"], (int, float)):
            by_step[int(row["step"])] = row
    return [by_step[step] for step in sorted(by_step)]


def series(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> tuple[list[int], list[float]] | None:
    """(steps, values) of the first key in `keys` that any row has; non-finite values are dropped."""
    for key in keys:
        if any(key in row for row in rows):
            steps, values = [], []
            for row in rows:
                value = row.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    steps.append(int(row["step"]))
                    values.append(float(value))
            return steps, values
    return None


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start): m_i = mean(v_{i-w+1..i})."""
    averaged, running = [], 0.0
    for index, value in enumerate(values):
        running += value
        if index >= window:
            running -= values[index - window]
        averaged.append(running / min(index + 1, window))
    return averaged


def smoothing_window(count: int) -> int:
    """About a tenth of the run, between 1 (no smoothing) and 25 steps."""
    return max(1, min(25, count // 10))


# ---------------------------------------------------------------------------------------------
# Training curves
# ---------------------------------------------------------------------------------------------


def _plot_line(axes: Any, steps: list[int], values: list[float], label: str, color: str | None = None) -> None:
    """The raw per-step values (thin) and, for long runs, their moving average (bold)."""
    window = smoothing_window(len(values))
    if window > 1:
        axes.plot(steps, values, color=color, alpha=0.3, linewidth=1, label=f"{label} (per step)")
        axes.plot(steps, moving_average(values, window), color=color, linewidth=2,
                  label=f"{label} ({window}-step mean)")
    else:
        axes.plot(steps, values, color=color, linewidth=1.5, marker="o" if len(values) <= 30 else None,
                  markersize=3, label=label)


def plot_rewards(rows: Sequence[dict[str, Any]], path: Path, *, title_prefix: str = "") -> Path | None:
    """The paper's Figure 1: each reward component over training steps, one panel each."""
    available = [(label, found) for label, keys in REWARD_SERIES if (found := series(rows, keys)) and found[0]]
    if not available:
        return None
    columns = 2 if len(available) > 1 else 1
    rows_of_panels = math.ceil(len(available) / columns)
    figure = _figure(figsize=(6 * columns, 3.6 * rows_of_panels), layout="constrained")
    colors = ["tab:blue", "tab:green", "tab:orange", "tab:purple"]
    std = series(rows, REWARD_STD_KEYS)
    for index, (label, (steps, values)) in enumerate(available):
        axes = figure.add_subplot(rows_of_panels, columns, index + 1)
        _plot_line(axes, steps, values, label, colors[index % len(colors)])
        if label.startswith("total") and std and std[0] == steps:
            low = [v - s for v, s in zip(values, std[1])]
            high = [v + s for v, s in zip(values, std[1])]
            axes.fill_between(steps, low, high, color=colors[0], alpha=0.12, label="± std over completions")
        axes.set_title(label)
        axes.set_xlabel("optimizer step")
        axes.set_ylabel("mean over the step's completions")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    figure.suptitle(f"{title_prefix}GRPO reward components over training (R = w_acc R_acc + w_fmt R_fmt + w_len R_len)")
    figure.savefig(path, dpi=110)
    return path


def plot_completion_length(rows: Sequence[dict[str, Any]], path: Path, *, title_prefix: str = "") -> Path | None:
    """Mean and longest completion length over steps, and the share of completions truncated."""
    mean, longest, truncated = series(rows, LENGTH_MEAN_KEYS), series(rows, LENGTH_MAX_KEYS), series(rows, TRUNCATED_KEYS)
    if not (mean and mean[0]):
        return None
    has_truncated = bool(truncated and truncated[0])
    figure = _figure(figsize=(12 if has_truncated else 6.5, 3.8), layout="constrained")
    axes = figure.add_subplot(1, 2 if has_truncated else 1, 1)
    _plot_line(axes, *mean, "mean length", "tab:blue")
    if longest and longest[0]:
        _plot_line(axes, *longest, "longest", "tab:red")
    axes.set_title("Completion length")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("tokens per completion")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    if has_truncated:
        right = figure.add_subplot(1, 2, 2)
        _plot_line(right, *truncated, "truncated at max_new_tokens", "tab:gray")
        right.set_title("Completions cut at the token limit")
        right.set_xlabel("optimizer step")
        right.set_ylabel("share of completions")
        right.set_ylim(-0.02, 1.02)
        right.grid(alpha=0.3)
        right.legend(fontsize="small")
    figure.suptitle(f"{title_prefix}Completion length during GRPO")
    figure.savefig(path, dpi=110)
    return path


def plot_zero_variance(rows: Sequence[dict[str, Any]], path: Path, *, title_prefix: str = "") -> Path | None:
    """Share of groups with all-equal rewards (and with < 2 scored rewards): groups that teach nothing."""
    zero = series(rows, ZERO_VARIANCE_KEYS)
    if not (zero and zero[0]):
        return None
    figure = _figure(figsize=(6.5, 3.8), layout="constrained")
    axes = figure.add_subplot(1, 1, 1)
    _plot_line(axes, *zero, "zero-variance groups", "tab:red")
    few = series(rows, FEW_SCORED_KEYS)
    if few and few[0] and any(few[1]):
        _plot_line(axes, *few, "groups with < 2 scored rewards", "tab:gray")
    axes.set_title(f"{title_prefix}Groups with no learning signal (all G rewards equal -> advantage 0)")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("share of the step's groups")
    axes.set_ylim(-0.02, 1.02)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------------------------------------
# Evaluation outputs
# ---------------------------------------------------------------------------------------------


def read_think_lengths(eval_dir: str | Path) -> dict[str, dict[str, list[int]]]:
    """{split: {checkpoint: [think words of each prediction]}} from the prediction files of eval.run.

    Each line names its "checkpoint" and "split"; predictions without a think block (None) are
    left out.  Checkpoints keep the order in which their files sort.
    """
    lengths: dict[str, dict[str, list[int]]] = {}
    for path in sorted(Path(eval_dir).glob(PREDICTIONS_GLOB)):
        for row in read_jsonl(path):
            checkpoint = str(row.get("checkpoint", path.stem))
            split = str(row.get("split", "?"))
            words = row.get("think_words")
            bucket = lengths.setdefault(split, {}).setdefault(checkpoint, [])
            if isinstance(words, (int, float)) and not isinstance(words, bool) and math.isfinite(words):
                bucket.append(int(words))
    return lengths


def plot_think_lengths(lengths: dict[str, dict[str, list[int]]], path: Path) -> Path | None:
    """Histograms of think length (words) per checkpoint, one panel per split."""
    if not any(values for by_checkpoint in lengths.values() for values in by_checkpoint.values()):
        return None
    splits = sorted(lengths)
    figure = _figure(figsize=(6.5 * len(splits), 4), layout="constrained")
    for index, split in enumerate(splits):
        axes = figure.add_subplot(1, len(splits), index + 1)
        longest = max((max(v) for v in lengths[split].values() if v), default=0)
        bins = list(range(0, longest + 2, max(1, math.ceil((longest + 1) / 40))))
        if len(bins) < 2:
            bins = [0, 1]
        for checkpoint, values in lengths[split].items():
            if not values:
                continue
            mean = sum(values) / len(values)
            axes.hist(values, bins=bins, histtype="step", linewidth=1.8,
                      label=f"{checkpoint} (mean {mean:.1f}, n={len(values)})")
        axes.set_title(f"Think length on {split}")
        axes.set_xlabel("words inside <think>")
        axes.set_ylabel("number of predictions")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    figure.suptitle("Reasoning length per checkpoint (evaluation, one prediction per test turn)")
    figure.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------------------------------------
# Whole runs
# ---------------------------------------------------------------------------------------------


def _has_reward_log(path: Path) -> bool:
    with path.open() as handle:
        return any('"reward/' in line for line in handle)


def find_metrics_files(run_dir: str | Path) -> list[Path]:
    """`run_dir/metrics.jsonl`, else the GRPO logs (those with reward keys) up to two levels below."""
    run_dir = Path(run_dir)
    direct = run_dir / METRICS_FILE
    if direct.is_file():
        return [direct]
    nested = sorted(run_dir.glob(f"*/{METRICS_FILE}")) + sorted(run_dir.glob(f"*/*/{METRICS_FILE}"))
    return [path for path in nested if _has_reward_log(path)]


def find_eval_dir(run_dir: str | Path) -> Path | None:
    """The folder holding eval.run's prediction files: run_dir itself, run_dir/eval, or one below."""
    run_dir = Path(run_dir)
    for candidate in [run_dir, run_dir / "eval", *sorted(p for p in run_dir.glob("*") if p.is_dir())]:
        if any(candidate.glob(PREDICTIONS_GLOB)):
            return candidate
    return None


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None, *, eval_dir: str | Path | None = None) -> list[Path]:
    """Draw every plot the run's logs allow; returns the PNG paths written (default out: RUN_DIR/plots).

    With several GRPO logs below `run_dir` (e.g. one per seed), each gets its own files, prefixed
    with its folder name.  Raises FileNotFoundError when there is nothing to plot.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a directory")
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    metrics_files = find_metrics_files(run_dir)
    eval_folder = Path(eval_dir) if eval_dir is not None else find_eval_dir(run_dir)
    if eval_dir is not None and not eval_folder.is_dir():
        raise FileNotFoundError(f"--eval-dir {eval_dir} is not a directory")
    if not metrics_files and eval_folder is None:
        raise FileNotFoundError(f"nothing to plot in {run_dir}: no {METRICS_FILE} with rewards and no {PREDICTIONS_GLOB}")
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for metrics_path in metrics_files:
        rows = read_metrics(metrics_path)
        several = len(metrics_files) > 1
        prefix = f"{metrics_path.parent.relative_to(run_dir).as_posix().replace('/', '-')}-" if several else ""
        title = f"{metrics_path.parent.name}: " if several else ""
        for draw, name in ((plot_rewards, "rewards.png"), (plot_completion_length, "completion_length.png"),
                           (plot_zero_variance, "zero_variance.png")):
            path = draw(rows, out / f"{prefix}{name}", title_prefix=title)
            if path is not None:
                written.append(path)
    if eval_folder is not None:
        path = plot_think_lengths(read_think_lengths(eval_folder), out / "think_length.png")
        if path is not None:
            written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a GRPO run directory (or a pipeline run holding one)")
    parser.add_argument("--eval-dir", default=None, help="folder with eval.run's predictions-*.jsonl "
                        "(default: found in RUN_DIR, RUN_DIR/eval or one level below)")
    parser.add_argument("--out", default=None, help="where to write the PNG files (default: RUN_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        written = plot_run(args.run_dir, args.out, eval_dir=args.eval_dir)
    except (ImportError, FileNotFoundError, ValueError) as error:
        parser.exit(2, f"eval.plot: {error}\n")
    if not written:
        print(f"eval.plot: the logs in {args.run_dir} hold none of the plotted metrics")
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
