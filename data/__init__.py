"""The data layer: sources -> neutral conversations -> per-turn samples -> token ids + loss masks -> batches.

    data.types       Conversation, Turn, Sample, target_of (the shared contract)
    data.format      the completion format <think>...</think> + <tool_call>/<answer> (shared with rewards)
    data.loaders     APIGen-MT, tau-bench, ALMITA CSV and "synthetic:<split>" -> Conversations + LoadStats
    data.samples     one Sample per assistant action; split by conversation
    data.render      Sample -> Rendered(input_ids, loss_mask, ...) through the chat template; prompt-only rendering
    data.tokenizer   a small byte-level BPE tokenizer for the built-in tiny models
    data.batching    seeded, shuffled, rank-sharded batch indices and the one collate function
    data.inspect     `python -m data.inspect PATH` prints what a dataset holds
    data.synthetic   the built-in synthetic customer-service world

Nothing is imported here, so `import data.types` stays cheap (no torch, no transformers).
"""
