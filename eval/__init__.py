"""Evaluation: the paper's per-turn table, and plots.

    eval.metrics   TurnRecord, aggregate(records) -> the table's numbers, format_table(rows) -> Markdown
                   (pure Python: no torch, no model)
    eval.run       evaluate(policy, samples, ...) and `python -m eval.run --checkpoint NAME=PATH ... --data SPEC`
    eval.plot      plot_run(run_dir, out_dir) and `python -m eval.plot RUN_DIR`: reward components,
                   completion length, zero-variance groups, think-length distributions (matplotlib)

Nothing is imported here, so `import eval.metrics` stays free of torch.
"""
