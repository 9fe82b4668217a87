"""`--model tiny`: a small Qwen3-architecture model with random weights and the project's own
tokenizer, trained on the built-in synthetic data, saved once as an ordinary Hugging Face model
directory so that every later stage loads it like any other local model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from grpo.policy import TinyModelConfig, build_tiny_model

TINY_MARKER = "tiny_model.json"


def prepare_tiny_base(
    directory: str | Path,
    *,
    seed: int = 0,
    vocab_size: int = 4096,
    model_config: TinyModelConfig | None = None,
    data_spec: str = "synthetic:train",
) -> Path:
    """Build (or reuse, if already built with the same settings) a tiny base model in `directory`.

    The tokenizer is trained on the training conversations of `data_spec` only (never on test data).
    """
    from data import load_dataset
    from data.tokenizer import tokenizer_corpus, train_tokenizer

    directory = Path(directory)
    model_config = model_config or TinyModelConfig()
    settings = {"seed": seed, "vocab_size": vocab_size, "data": data_spec, "model": dataclasses.asdict(model_config)}
    marker = directory / TINY_MARKER
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return directory
    conversations, _ = load_dataset(data_spec, seed=seed)
    tokenizer = train_tokenizer(tokenizer_corpus(conversations), vocab_size=vocab_size)
    model = build_tiny_model(tokenizer, model_config, seed=seed)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    marker.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return directory
