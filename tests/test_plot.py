"""eval.plot: the run's curves and the think-length histograms, from synthetic logs."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="matplotlib is an optional extra (pip install -e '.[plot]')")

from eval.plot import main, moving_average, plot_run, read_metrics, read_think_lengths, series  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the PNG signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def write_metrics(path: Path, steps: int = 60) -> None:
    lines = []
    for step in range(1, steps + 1):
        progress = step / steps
        lines.append({
            "step": step, "time": 1000.0 + step,
            "reward/mean": 1.0 + 1.5 * progress, "reward/std": 0.5 - 0.3 * progress,
            "reward/accuracy": 0.2 + progress, "reward/format": min(1.0, 0.5 + progress),
            "reward/length": 0.9 if step != 7 else float("nan"),
            "reward/zero_variance_group_share": 0.5 * (1 - progress), "reward/few_scored_group_share": 0.0,
            "completion/length_mean": 80 - 20 * progress, "completion/length_max": 128.0,
            "completion/truncated_share": 0.2 * (1 - progress), "loss": 0.1,
        })
    # a resumed run logs steps 59-60 again: the later records must win
    lines.append({"step": 59, "reward/mean": 9.0})
    with path.open("w") as handle:
        for line in lines:
            handle.write(json.dumps(line) + "\n")  # NaN is written as NaN, as RunLogger does


def write_predictions(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for checkpoint, words in (("base", [0, 0, 1, None]), ("RL", [20, 25, 31, 18])):
        for split in ("test", "ood_test"):
            with (folder / f"predictions-{checkpoint}-{split}.jsonl").open("w") as handle:
                for count in words:
                    handle.write(json.dumps({"checkpoint": checkpoint, "split": split, "think_words": count}) + "\n")


def test_read_metrics_keeps_the_last_record_of_a_step(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl")
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(1, 61))
    assert rows[58] == {"step": 59, "reward/mean": 9.0}
    steps, values = series(rows, ("reward/length",))
    assert 7 not in steps and 59 not in steps and len(steps) == 58  # NaN and the missing key are dropped
    assert series(rows, ("nope", "reward/mean"))[1][58] == 9.0
    assert series(rows, ("nope",)) is None


def test_moving_average():
    assert moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert moving_average([5.0], 3) == [5.0]
    assert moving_average([], 3) == []


def test_plot_run_writes_readable_pngs(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    write_metrics(run / "metrics.jsonl")
    write_predictions(run / "eval")
    written = plot_run(run, tmp_path / "plots")
    names = sorted(path.name for path in written)
    assert names == ["completion_length.png", "rewards.png", "think_length.png", "zero_variance.png"]
    for path in written:
        width, height = png_size(path)
        assert width >= 500 and height >= 300, path


def test_think_lengths_per_split_and_checkpoint(tmp_path):
    write_predictions(tmp_path)
    lengths = read_think_lengths(tmp_path)
    assert lengths["test"]["RL"] == [20, 25, 31, 18]
    assert lengths["ood_test"]["base"] == [0, 0, 1]  # None (no think block) is left out


def test_finds_nested_grpo_logs_and_skips_others(tmp_path):
    (tmp_path / "grpo").mkdir()
    write_metrics(tmp_path / "grpo" / "metrics.jsonl", steps=5)
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    written = plot_run(tmp_path)
    assert {path.name for path in written} == {"rewards.png", "completion_length.png", "zero_variance.png"}
    assert all(path.parent == tmp_path / "plots" for path in written)


def test_cli(tmp_path, capsys):
    write_metrics(tmp_path / "metrics.jsonl", steps=3)
    assert main([str(tmp_path), "--out", str(tmp_path / "figures")]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 3 and all(Path(p).is_file() for p in printed)


def test_nothing_to_plot_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert "nothing to plot" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="not a directory"):
        plot_run(tmp_path / "missing")


def test_bad_jsonl_names_file_and_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "reward/mean": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        plot_run(tmp_path)
