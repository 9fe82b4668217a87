"""Inspect a dataset: what the loaders read, which samples it yields, how long its prompts are.

    python -m data.inspect PATH [--format apigen|tau|almita] [--json] [--dump FILE.jsonl]
                                [--on-error raise|skip] [--include-failed] [--tokenizer PATH] [--seed N]

PATH is a file (APIGen-MT JSON, tau-bench trajectories, ALMITA CSV; the format is detected from
the content unless --format is given) or a `synthetic:<split>` spec (train, test, ood_test,
coldstart; generated with --seed).  Examples:

    python -m data.inspect ../shared/data/tau-bench-airline/trajectories.json
    python -m data.inspect synthetic:train --json
    python -m data.inspect data.csv --format almita --on-error skip --dump samples.jsonl
    python -m data.inspect synthetic:test --tokenizer ../shared/tokenizers/qwen3

Without --json: a readable table (conversations, samples, tool-call vs answer samples, samples per
tool, prompt lengths in tokens with --tokenizer, skipped rows with their reasons).  With --json:
one JSON object with at least `conversations`, `samples`, `tool_call_samples`, `answer_samples`,
`skipped` and `tools` (tool name -> number of tool-call samples).  --dump writes one JSON line per
sample: {"conversation": i, "turn": j, "target": {...}, "context_turns": n} (plus the conversation
id and the reasoning).  A malformed row stops with exit status 1 and a one-line message naming the
file, the row and the field (--on-error raise, the default); --on-error skip drops and counts it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from data.loaders import FORMATS, DataError, LoadStats, load_dataset
from data.rows import ON_ERROR
from data.samples import make_samples
from data.types import Conversation, Sample

QUIRKS = ("undeclared_tool_calls", "double_encoded_arguments", "empty_observations", "ends_on_observation",
          "consecutive_assistant_turns", "empty_assistant_turns", "parallel_tool_calls")


def percentiles(values: list[int]) -> dict[str, int]:
    """Nearest-rank percentiles: p-th = the ceil(p/100 * n)-th smallest value."""
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda p: ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]  # noqa: E731
    return {"p50": pick(50), "p90": pick(90), "p99": pick(99), "max": ordered[-1]}


def summarize(conversations: list[Conversation], stats: LoadStats, samples: list[Sample],
              tokenizer: Any = None) -> dict[str, Any]:
    """Everything the table and the JSON show."""
    tool_calls = [sample for sample in samples if sample.target["kind"] == "tool_call"]
    tools = Counter(sample.target["name"] for sample in tool_calls)
    summary: dict[str, Any] = {
        "source": stats.source,
        "format": stats.format,
        "rows": stats.rows,
        "conversations": len(conversations),
        "samples": len(samples),
        "tool_call_samples": len(tool_calls),
        "answer_samples": len(samples) - len(tool_calls),
        "samples_with_reasoning": sum(1 for sample in samples if sample.reasoning),
        "skipped": stats.skipped,
        "skipped_reasons": list(stats.skipped_reasons),
        "filtered_failed": stats.filtered_failed,
        "tools": dict(sorted(tools.items(), key=lambda item: (-item[1], item[0]))),
        "undeclared_tools": dict(stats.undeclared_tools),
        "quirks": {name: getattr(stats, name) for name in QUIRKS},
        "context_turns": percentiles([len(sample.context) for sample in samples]),
    }
    if tokenizer is not None:
        from data.render import completion_ids, render_prompt

        summary["context_tokens"] = percentiles([len(render_prompt(sample, tokenizer).input_ids) for sample in samples])
        summary["completion_tokens"] = percentiles([len(completion_ids(sample, tokenizer)) for sample in samples])
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """The readable report."""
    lines = [f"source         {summary['source']}  (format {summary['format']})"]
    rows = [
        ("rows read", summary["rows"]),
        ("conversations", summary["conversations"]),
        ("samples", summary["samples"]),
        ("  tool calls", summary["tool_call_samples"]),
        ("  answers", summary["answer_samples"]),
        ("  with reasoning", summary["samples_with_reasoning"]),
        ("skipped rows", summary["skipped"]),
    ]
    if summary["filtered_failed"]:
        rows.append(("failed (reward < 1), left out", summary["filtered_failed"]))
    rows += [(name.replace("_", " "), count) for name, count in summary["quirks"].items() if count]
    width = max(len(name) for name, _ in rows)
    lines += [f"{name.ljust(width)}  {value:>8}" for name, value in rows]
    for key, title in (("context_turns", "context turns"), ("context_tokens", "prompt tokens"),
                       ("completion_tokens", "completion tokens")):
        if summary.get(key):
            lines.append(f"{title.ljust(width)}  " + "  ".join(f"{name} {value}" for name, value in summary[key].items()))
    if summary["tools"]:
        lines.append("")
        lines.append("tool-call samples per tool" + (" (* = not declared in its row)" if summary["undeclared_tools"] else ""))
        name_width = max(len(name) for name in summary["tools"]) + 2
        for name, count in summary["tools"].items():
            mark = " *" if name in summary["undeclared_tools"] else ""
            lines.append(f"  {(name + mark).ljust(name_width)}  {count:>6}")
    if summary["skipped_reasons"]:
        lines.append("")
        lines.append("skipped rows")
        lines += [f"  {reason}" for reason in summary["skipped_reasons"]]
    return "\n".join(lines)


def dump_samples(conversations: list[Conversation], path: str | Path, *, only_with_reasoning: bool = False) -> int:
    """One JSON line per sample; returns the number written."""
    written = 0
    with open(path, "w", encoding="utf-8") as handle:
        for index, conversation in enumerate(conversations):
            for sample in make_samples([conversation], only_with_reasoning=only_with_reasoning):
                record = {"conversation": index, "turn": sample.turn_index, "target": sample.target,
                          "context_turns": len(sample.context), "conversation_id": sample.conversation_id,
                          "reasoning": sample.reasoning}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                written += 1
    return written


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m data.inspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="a dataset file, or synthetic:train|test|ood_test|coldstart")
    parser.add_argument("--format", choices=FORMATS, default=None, help="force a format (default: detect from content)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--dump", metavar="FILE.jsonl", help="write one JSON line per sample")
    parser.add_argument("--on-error", choices=ON_ERROR, default="raise", help="malformed rows: stop (default) or skip and count")
    parser.add_argument("--include-failed", action="store_true", help="tau-bench: keep trajectories with reward < 1")
    parser.add_argument("--tokenizer", metavar="PATH", help="a tokenizer directory: report prompt lengths in tokens")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic world (synthetic:<split> only)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        conversations, stats = load_dataset(args.path, seed=args.seed, on_error=args.on_error,
                                            include_failed=args.include_failed, format=args.format)
        tokenizer = None
        if args.tokenizer:
            from data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(args.tokenizer)
        samples = make_samples(conversations)
        summary = summarize(conversations, stats, samples, tokenizer)
        if args.dump:
            dump_samples(conversations, args.dump)
    except (DataError, FileNotFoundError, ValueError, ImportError, OSError) as error:
        message = " ".join(str(error).split())  # one line, whatever the source wrote
        print(f"error: {message}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2, ensure_ascii=False) if args.json else format_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
