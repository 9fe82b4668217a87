"""A small byte-level BPE tokenizer for the built-in tiny models.

`train_tokenizer` learns a byte-level BPE vocabulary (the `tokenizers` library, GPT-2 style
pre-tokenisation, so any text round-trips) with every `data.format.SPECIAL_TOKENS` entry as one
atomic token that is never split or merged: the chat tokens `<|endoftext|>`, `<|im_start|>`,
`<|im_end|>` and the tag tokens `<think>`, `</think>`, `<tool_call>`, ... .  As in Qwen3, the chat
tokens are "special" (dropped by `decode(..., skip_special_tokens=True)`) while the tag tokens are
ordinary added tokens (kept by that decode, since the reward parser needs them).  EOS is
`<|im_end|>` (generation ends with the assistant turn), PAD is `<|endoftext|>`.  The tokenizer has
no chat template, so `data.chat_text` uses the project's own ChatML template with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator

from data.format import IM_END, IM_START, SPECIAL_TOKENS
from data.types import Conversation

PAD_TOKEN = "<|endoftext|>"
CHAT_TOKENS: tuple[str, ...] = (PAD_TOKEN, IM_START, IM_END)


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 4096, out_dir: str | Path | None = None) -> Any:
    """Train a byte-level BPE tokenizer of `vocab_size` entries (special tokens and the 256 byte
    tokens included) on `texts`; returns a `PreTrainedTokenizerFast`, saved to `out_dir` with
    `save_pretrained` when given.  Deterministic for the same texts in the same order."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} (256 bytes + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        # ids 0..len-1 in SPECIAL_TOKENS order; the trainer marks them all special, never merged
        special_tokens=[AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    # Re-register the tag tokens as ordinary added tokens (same ids): still atomic, but kept by
    # decode(skip_special_tokens=True), as in Qwen3.
    backend.add_tokens([AddedToken(token, special=False, normalized=False)
                        for token in SPECIAL_TOKENS if token not in CHAT_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=IM_END, pad_token=PAD_TOKEN, clean_up_tokenization_spaces=False,
    )
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def load_tokenizer(path: str | Path) -> Any:
    """A tokenizer saved with `save_pretrained` (ours, Qwen3's, any local Hugging Face one)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    return AutoTokenizer.from_pretrained(str(path))


def tokenizer_corpus(conversations: Iterable[Conversation]) -> Iterator[str]:
    """The texts to train the tokenizer on: each conversation rendered whole in the project's
    ChatML template, every assistant action as its completion (think block + action block), so
    that system prompts, tool schemas, JSON arguments and tags all shape the vocabulary."""
    from data.chat_text import chatml_conversation_text

    for conversation in conversations:
        yield chatml_conversation_text(conversation)
