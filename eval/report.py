"""The report of an evaluation run: results.md's tables and the paired differences between checkpoints."""

from __future__ import annotations

from typing import Any

from eval.metrics import format_paired_table, format_table, paired_difference


def paired_differences(predictions_of: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, dict[str, Any]]:
    """Per split, each checkpoint minus the one before it (in --checkpoint order) on the same turns."""
    paired: dict[str, dict[str, Any]] = {}
    for split, by_name in predictions_of.items():
        names = list(by_name)
        paired[split] = {f"{after} - {before}": paired_difference(by_name[before], by_name[after])
                         for before, after in zip(names, names[1:])}
    return paired


def results_markdown(results: dict[str, dict[str, dict[str, Any]]], splits: dict[str, dict[str, Any]],
                     paired: dict[str, dict[str, Any]] | None = None) -> str:
    """results.md: one table per split, one row per checkpoint, with the number of turns behind it,
    then (with two or more checkpoints) each checkpoint's paired difference from the one before."""
    parts = ["# Evaluation: the paper's per-turn table", ""]
    for split, rows in results.items():
        spec = splits.get(split, {}).get("spec", split)
        parts.append(format_table(rows, title=f"{split} ({spec})"))
        skipped = {name: row["counts"].get("skipped_too_long", 0) for name, row in rows.items()}
        if any(skipped.values()):
            parts.append("Skipped as too long: " + ", ".join(f"{name} {count}" for name, count in skipped.items()) + "\n")
        if paired and paired.get(split):
            parts.append(format_paired_table(paired[split], title=f"{split}: paired differences (mean ± standard error "
                                                                  "over the same turns)"))
    parts.append("P/R = precision/recall of the action kind; name acc. and param. match are over gold tool turns "
                 "(param. match: of those with the right name, exact arguments); similarity over gold answers "
                 "predicted as answers; '-' = no turn to measure.\n")
    return "\n".join(parts)
