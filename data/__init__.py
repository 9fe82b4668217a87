"""The data layer: sources -> neutral conversations -> per-turn samples -> token ids + loss masks -> batches.

    data.types       Conversation, Turn, Sample, target_of (the shared contract)
    data.format      the completion format <think>...</think> + <tool_call>/<answer> (shared with rewards)
    data.loaders     any file (format detected) or "synthetic:<split>" -> Conversations + LoadStats
    data.source_*    one parser per source format: apigen (APIGen-MT), tau (tau-bench), almita (ALMITA CSV)
    data.rows        what the parsers share: DataError, LoadStats, tool schemas, the row loop
    data.samples     one Sample per assistant action; split by conversation
    data.chat_text   the prompt text: the tokenizer's chat template (probed for what it shows) or the project's ChatML
    data.render      Sample -> Rendered(input_ids, loss_mask, ...) through the chat template; prompt-only rendering
    data.tokenizer   a small byte-level BPE tokenizer for the built-in tiny models
    data.batching    seeded, shuffled, rank-sharded batch indices and the one collate function
    data.inspect     `python -m data.inspect PATH` prints what a dataset holds
    data.synthetic   the built-in synthetic customer-service world

Only the light, pure-Python entry points are re-exported here (`from data import load_dataset`), so
`import data.types` stays cheap: rendering, tokenizers and batching are imported from their modules.
"""

from data.loaders import DataError, LoadStats, load_conversations, load_dataset
from data.samples import conversation_samples, make_samples, split_conversations
from data.source_apigen import parse_apigen_rows
from data.types import Conversation, Sample, Turn, target_of

__all__ = [
    "Conversation", "DataError", "LoadStats", "Sample", "Turn", "conversation_samples", "load_conversations",
    "load_dataset", "make_samples", "parse_apigen_rows", "split_conversations", "target_of",
]
