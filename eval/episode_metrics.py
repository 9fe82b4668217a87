"""Whole-episode metrics: success rate, tau-bench's pass^k, paired differences, and results.md (pure Python).

The input is one record per episode (a line of an episodes JSONL written by `eval.episodes`):
its "task_id", "success" (tau-bench's rule: the final database is the gold one and every required
output was said), and what happened in it ("turns", "invalid_actions", "policy_violations",
"tokens", "sampled_tokens", "truncated", "user_done", "db_match").

**pass^k** (tau-bench: Yao et al. 2024, "τ-bench: A Benchmark for Tool-Agent-User Interaction in
Real-World Domains") is the chance that k independent trials of a task *all* succeed, averaged
over tasks: reliability, where pass@k (at least one of k succeeds) measures coverage.  With n_t
trials of task t, c_t of them successes, the unbiased estimator is

    pass^k = mean over tasks t of  C(c_t, k) / C(n_t, k)          (1 <= k <= n_t)

C(c, k) / C(n, k) is the share of the k-subsets of the n trials made of successes only; its
expectation over n trials that succeed with probability p_t is p_t^k, so the mean over tasks is
unbiased for E_t[p_t^k] (the plug-in (c/n)^k is not).  C(c, k) / C(n, k) = prod_{i<k} (c-i)/(n-i),
so pass^k never rises with k, and pass^1 is the mean per-task success rate.  Example, c=2 of n=4:
pass^1 = 1/2, pass^2 = 1/6, pass^3 = pass^4 = 0.

**Standard errors** are over tasks: se = stdev(per-task value) / sqrt(tasks), sample stdev, None
with fewer than 2 tasks.  They say how much a number would move with another draw of tasks and
of their trials; they do not measure the spread between training seeds.

**Paired differences** compare two checkpoints on the tasks both ran, as `eval.metrics.paired_difference`
does for turns: d_t = rate_after(t) - rate_before(t), where rate is the task's success (greedy:
0 or 1) or its share of successful sampled trials; delta = mean(d), se = stdev(d) / sqrt(tasks).
Tasks both checkpoints always pass or always fail add nothing to se, which is why it is smaller
than either rate's own standard error.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

from eval.metrics import format_value

# Per-episode counts averaged by `summarize`: (record key, summary key).
EPISODE_MEANS: tuple[tuple[str, str], ...] = (
    ("turns", "turns_mean"),
    ("invalid_actions", "invalid_actions_mean"),
    ("policy_violations", "policy_violations_mean"),
    ("tokens", "tokens_mean"),
    ("sampled_tokens", "sampled_tokens_mean"),
    ("truncated", "truncated_share"),
    ("user_done", "user_done_share"),
    ("db_match", "db_match_share"),
)


def pass_hat_k(successes: int, trials: int, k: int) -> float:
    """C(successes, k) / C(trials, k): the chance that k of the trials drawn without replacement all succeeded."""
    if not 0 <= successes <= trials:
        raise ValueError(f"pass^k needs 0 <= successes <= trials, got {successes} of {trials}")
    if not 1 <= k <= trials:
        raise ValueError(f"pass^k needs 1 <= k <= trials ({trials}), got k={k}")
    return math.comb(successes, k) / math.comb(trials, k)


def outcomes_by_task(records: Iterable[Mapping[str, Any]]) -> dict[str, list[bool]]:
    """{task id: [success of each trial]}, tasks in order of first appearance."""
    outcomes: dict[str, list[bool]] = {}
    for record in records:
        outcomes.setdefault(record["task_id"], []).append(bool(record["success"]))
    return outcomes


def pass_hat(outcomes: Mapping[str, Sequence[bool]], k: int) -> float:
    """pass^k over tasks: the mean of pass_hat_k(c_t, n_t, k) (every task needs at least k trials)."""
    if not outcomes:
        raise ValueError("pass^k of no task")
    return sum(pass_hat_k(sum(trials), len(trials), k) for trials in outcomes.values()) / len(outcomes)


def mean_and_se(values: Sequence[float]) -> tuple[float | None, float | None]:
    """The mean and its standard error stdev / sqrt(n) (sample stdev; se None when n < 2)."""
    n = len(values)
    if n == 0:
        return None, None
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((value - mean) ** 2 for value in values) / (n - 1) / n)


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One evaluation's numbers (greedy, or sampled): success rate with its standard error over
    tasks, pass^k for k = 1 .. the fewest trials any task has, and the per-episode means."""
    records = list(records)
    if not records:
        return {"episodes": 0, "tasks": 0}
    outcomes = outcomes_by_task(records)
    rates = [sum(trials) / len(trials) for trials in outcomes.values()]
    success, success_se = mean_and_se(rates)
    fewest = min(len(trials) for trials in outcomes.values())
    summary: dict[str, Any] = {
        "episodes": len(records),
        "tasks": len(outcomes),
        "trials_per_task": fewest if fewest == max(len(trials) for trials in outcomes.values()) else None,
        "success_rate": success,  # the mean per-task rate: pass^1
        "success_se": success_se,
        "pass_hat": {str(k): pass_hat(outcomes, k) for k in range(1, fewest + 1)},
        "tasks_always_solved": sum(all(trials) for trials in outcomes.values()),
        "tasks_never_solved": sum(not any(trials) for trials in outcomes.values()),
    }
    for key, name in EPISODE_MEANS:
        summary[name] = sum(float(record[key]) for record in records) / len(records)
    summary["tokens_max"] = max(int(record["tokens"]) for record in records)
    errors: dict[str, int] = {}
    for record in records:
        for kind, count in record.get("errors", {}).items():
            errors[kind] = errors.get(kind, 0) + count
    summary["errors"] = errors
    return summary


def paired_success(before: Sequence[Mapping[str, Any]], after: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """after - before in per-task success rate on the tasks both ran (see the module docstring)."""
    first, second = outcomes_by_task(before), outcomes_by_task(after)
    common = [task for task in first if task in second]
    differences = [sum(second[task]) / len(second[task]) - sum(first[task]) / len(first[task]) for task in common]
    delta, se = mean_and_se(differences)
    return {"tasks": len(common), "delta": delta, "se": se, "better": sum(d > 0 for d in differences),
            "worse": sum(d < 0 for d in differences)}


# ----------------------------------------------------------------------------------------------
# results.md
# ----------------------------------------------------------------------------------------------


def _rate(summary: Mapping[str, Any] | None, digits: int = 3) -> str:
    if not summary or summary.get("success_rate") is None:
        return "-"
    se = summary.get("success_se")
    return format_value(summary["success_rate"], digits) + ("" if se is None else f" ± {format_value(se, digits)}")


def _pair(parts: tuple[Mapping[str, Any] | None, Mapping[str, Any] | None], key: str, digits: int) -> str:
    """"greedy / sampled" for one per-episode mean ("-" for a mode that did not run)."""
    return " / ".join(format_value(part.get(key) if part else None, digits) for part in parts)


def format_split_table(rows: Mapping[str, Mapping[str, Any]], k: int, *, title: str) -> str:
    """One row per checkpoint: greedy success, sampled pass^1..pass^k (pass^1 ± se), then per
    episode (greedy / sampled) turns, invalid actions, refused violations, tokens, truncated share."""
    header = (["Checkpoint", "Greedy success", "pass^1"] + [f"pass^{j}" for j in range(2, k + 1)]
              + ["Turns", "Invalid", "Refused", "Tokens", "Truncated", "Tasks"])
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    for name, result in rows.items():
        greedy, sampled = result.get("greedy"), result.get("sampled")
        passes = (sampled or {}).get("pass_hat", {})
        cells = [name, _rate(greedy), _rate(sampled)] + [format_value(passes.get(str(j))) for j in range(2, k + 1)]
        both = (greedy, sampled)
        cells += [_pair(both, "turns_mean", 1), _pair(both, "invalid_actions_mean", 2),
                  _pair(both, "policy_violations_mean", 2), _pair(both, "tokens_mean", 0),
                  _pair(both, "truncated_share", 2),
                  str(max((part or {}).get("tasks", 0) for part in both))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_paired_table(pairs: Mapping[str, Mapping[str, Any]], *, title: str) -> str:
    """One row per "after - before": greedy and sampled success, delta ± se (tasks better / worse)."""
    lines = [f"### {title}", "", "| Comparison | Greedy success | Sampled success (per-task rate) | Tasks |",
             "|:---|---:|---:|---:|"]
    for name, pair in pairs.items():
        cells = [name]
        for mode in ("greedy", "sampled"):
            value = pair.get(mode)
            if not value or value.get("delta") is None:
                cells.append("-")
                continue
            cells.append(f"{value['delta']:+.3f} ± {format_value(value['se'])} "
                         f"({value['better']} better / {value['worse']} worse)")
        cells.append(str(max((pair.get(mode) or {}).get("tasks", 0) for mode in ("greedy", "sampled"))))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def results_markdown(results: Mapping[str, Mapping[str, Mapping[str, Any]]], paired: Mapping[str, Mapping[str, Any]],
                     *, k: int, temperature: float, greedy: bool = True,
                     splits: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """results.md: per split, the checkpoints' table, how many tasks doing nothing passes (`splits`:
    {split: {"tasks", "trivial_tasks"}}), and (two or more checkpoints) the paired differences."""
    parts = ["# Evaluation of whole episodes (synthetic world)", ""]
    modes = (["greedy"] if greedy else []) + ([f"{k} sampled episodes per task at temperature {temperature:g}"]
                                              if k else [])
    for split, rows in results.items():
        parts.append(format_split_table(rows, k, title=f"{split}: {', '.join(modes)}"))
        info = (splits or {}).get(split)
        if info:
            parts.append(f"{len(info['trivial_tasks'])} of these {info['tasks']} tasks need no change and no stated "
                         "output: a policy that changes nothing passes them (a floor of "
                         f"{len(info['trivial_tasks']) / max(info['tasks'], 1):.3f}, not skill).\n")
        if paired.get(split):
            parts.append(format_paired_table(paired[split], title=f"{split}: paired differences (mean ± standard "
                                                                  "error over the same tasks)"))
    parts.append("Success: tau-bench's rule (final database = gold, every required output said); ± one standard "
                 "error over tasks.  pass^k: the chance that k sampled episodes of a task all succeed, averaged over "
                 "tasks (unbiased estimator C(c,k)/C(n,k)).  Turns, Invalid (unparseable, unknown tool, bad "
                 "arguments), Refused (policy violations the environment refused), Tokens (whole episode, first "
                 "prompt included), Truncated (share stopped by --max-episode-tokens): means per episode, "
                 "greedy / sampled.\n")
    return "\n".join(parts)
