"""`--model tiny`: a small Qwen3-architecture model with random weights and the project's own
tokenizer, trained on the built-in synthetic data, saved once as an ordinary Hugging Face model
directory so that every later stage loads it like any other local model.

`TinyModelConfig` and `build_tiny_model` define that model (also built directly by the tests);
its weights depend only on the seed.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TINY_MARKER = "tiny_model.json"


@dataclass
class TinyModelConfig:
    """A small Qwen3-architecture model (random weights) for tests and `--model tiny`."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    max_position_embeddings: int = 2048
    head_dim: int | None = None  # None: hidden_size // num_heads
    tie_word_embeddings: bool = True


def build_tiny_model(tokenizer: Any, config: TinyModelConfig = TinyModelConfig(), *, seed: int = 0):
    """A randomly initialised `Qwen3ForCausalLM` whose vocabulary is the tokenizer's.

    The weights depend only on `seed`; the global torch RNG is left untouched.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if config.hidden_size % config.num_heads and config.head_dim is None:
        raise ValueError(f"hidden_size {config.hidden_size} is not divisible by num_heads {config.num_heads}; set head_dim")
    if config.num_heads % config.num_kv_heads:
        raise ValueError(f"num_heads {config.num_heads} is not a multiple of num_kv_heads {config.num_kv_heads}")
    eos_token_id = tokenizer.eos_token_id
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_token_id
    qwen3_config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings,
        head_dim=config.head_dim or config.hidden_size // config.num_heads,
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(qwen3_config)
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.pad_token_id = pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


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
