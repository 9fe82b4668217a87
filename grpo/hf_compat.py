"""What the code assumes about Hugging Face transformers models, in one place.

A policy is a transformers causal LM or a peft `PeftModel` around one, and transformers' API moves
between releases.  The trainers, the sampler (`grpo.rollout`, `grpo.decoders`) and the
log-probabilities (`grpo.logprobs`) go through these few shims instead of assuming either:

- `causal_lm_of`: the transformers model inside a PeftModel (its LoRA layers still in place).
- `cache_argument`: the keyword that passes a KV cache (`cache` or `past_key_values`, by release).
- `position_ids_from_mask`: rotary positions that count only real tokens, so left padding does
  not shift a prompt.
- `PLAIN_HEAD_MODEL_TYPES`, `SHARED_PREFIX_MODEL_TYPES`, `supports_shared_prefix`: the families
  whose logits are plain `lm_head(hidden)` and whose attention can be swapped for a registered
  function.  The fast paths (scoring only the positions needed, sharing a prompt's keys and
  values among its G completions) need these; any other model takes the general path, with the
  same result.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import Tensor

# Architectures whose logits are exactly `lm_head(decoder(...).last_hidden_state)` (no soft-capping,
# no logit scaling).  For these `token_logprobs` runs the decoder and the head itself, which lets it
# project (and chunk) only the positions it needs; any other model goes through its own forward
# with `logits_to_keep`.
PLAIN_HEAD_MODEL_TYPES: frozenset[str] = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "olmo2",
    "smollm3", "gpt_neox",
})

# Families whose attention layers pass the cache's keys and values to transformers' attention
# interface and whose logits are plain (a subset of the above): the rollout and the training
# forward can then share each prompt's keys and values among its G completions.
SHARED_PREFIX_MODEL_TYPES: frozenset[str] = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "phi3", "olmo2", "smollm3",
})


def causal_lm_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM inside `model` (a PeftModel's base model keeps its LoRA layers)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def cache_argument(module: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """The keyword that passes a KV cache to `module.forward`: `cache` in transformers releases
    that renamed it (5.2x, where `past_key_values` is deprecated and due to go in 5.40), else
    `past_key_values`."""
    return {_cache_keyword(type(module)): cache}


@functools.cache
def _cache_keyword(module_type: type) -> str:
    parameters = inspect.signature(module_type.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that count only real tokens: for mask [0, 0, 1, 1, 1] -> [0, 0, 0, 1, 2].

    Left padding therefore does not shift a prompt's rotary positions; pad positions get 0 (they
    are masked out as keys and their outputs are never read).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def supports_shared_prefix(model: torch.nn.Module) -> bool:
    """Whether `grouped_token_logprobs` (and the rollout) can share prompt keys and values for this
    model: a decoder-only family known to route attention through transformers' attention
    interface and to compute logits as `lm_head(hidden)`, with full (not sliding-window)
    attention in every layer."""
    config = causal_lm_of(model).config
    if getattr(config, "model_type", None) not in SHARED_PREFIX_MODEL_TYPES:
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(layer_type == "full_attention" for layer_type in layer_types)
    return getattr(config, "sliding_window", None) is None
