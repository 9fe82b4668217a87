"""`python -m data.inspect`: table, --json, --dump, error modes, --include-failed, --tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data.inspect import main, percentiles
from data.render import render_prompt
from data.samples import make_samples
from data.tokenizer import load_tokenizer, tokenizer_corpus, train_tokenizer
from data.loaders import load_conversations

REPO = Path(__file__).resolve().parents[1]
TOOLS = json.dumps([{"name": "get_order", "description": "d", "parameters": {"type": "object", "properties": {}}}])


def row(*entries: tuple[str, str]) -> dict:
    return {"system": "Be helpful.", "tools": TOOLS, "conversations": [{"from": f, "value": v} for f, v in entries]}


def call(name: str, **arguments) -> tuple[str, str]:
    return ("function_call", json.dumps({"name": name, "arguments": arguments}))


ROWS = [
    row(("human", "Where is A1?"), call("get_order", order_id="A1"), ("observation", "shipped"), ("gpt", "Shipped.")),
    row(("human", "Cancel A2"), call("cancel_order", order_id="A2"), ("observation", "done"),
        call("get_order", order_id="A2"), ("observation", "cancelled"), ("gpt", "Done."), ("human", "thanks")),
]
BAD_ROW = {"system": "s", "tools": TOOLS, "conversations": [{"from": "human", "value": "x"}, {"from": "gpt"}, {"from": "alien", "value": "?"}]}


@pytest.fixture
def apigen_file(tmp_path: Path) -> Path:
    path = tmp_path / "apigen.json"
    path.write_text(json.dumps(ROWS))
    return path


def run_json(capsys, *argv: str) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_summary_hand_counted(capsys, apigen_file: Path):
    summary = run_json(capsys, str(apigen_file))
    assert summary["format"] == "apigen"
    assert (summary["conversations"], summary["samples"]) == (2, 5)
    assert (summary["tool_call_samples"], summary["answer_samples"]) == (3, 2)
    assert summary["tools"] == {"get_order": 2, "cancel_order": 1}
    assert summary["skipped"] == 0 and summary["undeclared_tools"] == {"cancel_order": 1}
    assert summary["context_turns"] == {"p50": 3, "p90": 5, "p99": 5, "max": 5}  # sorted contexts 1, 1, 3, 3, 5


def test_table_is_readable(capsys, apigen_file: Path):
    assert main([str(apigen_file)]) == 0
    table = capsys.readouterr().out
    assert "conversations" in table and "tool-call samples per tool" in table
    lines = {line.split()[0]: line.split()[-1] for line in table.splitlines() if line.strip()}
    assert lines["conversations"] == "2" and lines["samples"] == "5"
    assert "cancel_order *" in table  # undeclared tools are marked


def test_dump_one_line_per_sample(tmp_path: Path, apigen_file: Path, capsys):
    dump = tmp_path / "samples.jsonl"
    assert main([str(apigen_file), "--dump", str(dump)]) == 0
    records = [json.loads(line) for line in dump.read_text().splitlines()]
    assert [(r["conversation"], r["turn"], r["context_turns"]) for r in records] == [(0, 1, 1), (0, 3, 3), (1, 1, 1), (1, 3, 3), (1, 5, 5)]
    assert records[0]["target"] == {"kind": "tool_call", "name": "get_order", "arguments": {"order_id": "A1"}}
    assert records[4]["target"] == {"kind": "answer", "text": "Done."}


def test_malformed_row_raise_and_skip(tmp_path: Path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(ROWS + [BAD_ROW]))
    assert main([str(path)]) == 1
    error = capsys.readouterr().err
    assert error == f"error: {path}: row 2: field 'conversations[2].from': unknown speaker 'alien' " \
                    "(expected one of ['assistant', 'function_call', 'gpt', 'human', 'observation', 'user'])\n"
    summary = run_json(capsys, str(path), "--on-error", "skip")
    assert summary["skipped"] == 1 and summary["conversations"] == 2
    assert summary["skipped_reasons"] == ["row 2: field 'conversations[2].from': unknown speaker 'alien' "
                                          "(expected one of ['assistant', 'function_call', 'gpt', 'human', 'observation', 'user'])"]
    assert main([str(path), "--on-error", "skip"]) == 0
    assert "skipped rows" in capsys.readouterr().out


def test_command_line_exit_status_and_one_line_message(tmp_path: Path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([BAD_ROW]))
    result = subprocess.run([sys.executable, "-m", "data.inspect", str(path)], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "row 0: field 'conversations[2].from'" in result.stderr


def test_include_failed_and_forced_format(tmp_path: Path, capsys):
    def trajectory(reward, task_id):
        return {"task_id": task_id, "trial": 0, "reward": reward, "traj": [
            {"role": "system", "content": "policy"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello."}]}

    path = tmp_path / "traj.json"
    path.write_text(json.dumps([trajectory(1.0, 1), trajectory(0.0, 2), trajectory(0.0, 3)]))
    kept = run_json(capsys, str(path))
    assert (kept["format"], kept["conversations"], kept["filtered_failed"]) == ("tau", 1, 2)
    everything = run_json(capsys, str(path), "--include-failed")
    assert everything["conversations"] == 3 and everything["answer_samples"] == 3
    assert main([str(path), "--format", "apigen"]) == 1  # forced to the wrong format: a clear error
    assert "field 'conversations'" in capsys.readouterr().err


def test_tokenizer_lengths(tmp_path: Path, apigen_file: Path, capsys):
    conversations, _ = load_conversations(apigen_file)
    train_tokenizer(tokenizer_corpus(conversations), vocab_size=300, out_dir=tmp_path / "tok")
    summary = run_json(capsys, str(apigen_file), "--tokenizer", str(tmp_path / "tok"))
    tokenizer = load_tokenizer(tmp_path / "tok")
    lengths = [len(render_prompt(sample, tokenizer).input_ids) for sample in make_samples(conversations)]
    assert summary["context_tokens"] == percentiles(lengths) and summary["context_tokens"]["max"] == max(lengths)
    assert main([str(apigen_file), "--tokenizer", str(tmp_path / "missing")]) == 1


def test_synthetic_spec(capsys):
    summary = run_json(capsys, "synthetic:coldstart")
    assert summary["conversations"] > 0 and summary["samples_with_reasoning"] > 0
    assert main(["synthetic:nonsense"]) == 1
    assert "unknown synthetic split" in capsys.readouterr().err


def test_percentiles_nearest_rank():
    assert percentiles(list(range(1, 101))) == {"p50": 50, "p90": 90, "p99": 99, "max": 100}
    assert percentiles([7]) == {"p50": 7, "p90": 7, "p99": 7, "max": 7}
    assert percentiles([]) == {}
