"""The sampler's KV-cache decoders: prefill the prompts once, then one token per row per step.

`grpo.rollout.generate` samples G completions per prompt (row b*G + g is sample g of prompt b)
and drives a decoder through three calls: `prefill` -> logits [B*G, V] of every row's first
token, `step(tokens)` -> logits [n, V] of the next token of each of the n running rows, and
`keep(rows)` when rows stop (they leave the decode batch and the cache).

How a prompt's cache is shared among its G samples depends on the architecture:

- Shared-prefix attention (default for the decoder-only families in
  `grpo.hf_compat.SHARED_PREFIX_MODEL_TYPES` with full attention in every layer): the prompt's keys and values stay stored once per prompt,
  [B, kv_heads, P, head_dim]; only generated tokens have per-row keys and values, written into a
  preallocated buffer [rows, kv_heads, max_new_tokens, head_dim].  Attention of a decode query q
  is computed in two parts and merged exactly (the "flash-decoding" log-sum-exp merge):

      prompt part, batched per prompt:   s1 = q K_prompt^T / sqrt(d) + pad bias,  o1 = softmax(s1) V_prompt
      generated part, per row:           s2 = q K_gen^T / sqrt(d),                o2 = softmax(s2) V_gen
      l_i = logsumexp(s_i),  out = (e^{l1} o1 + e^{l2} o2) / (e^{l1} + e^{l2})

  so the G samples read their prompt's keys once per step instead of G times, the prompt cache
  is never copied, and no cache grows by concatenation.

  The prefill itself is shared too: when every prompt of the batch starts with the same C tokens
  (prompts of one domain share their system prompt and tool list: about 60% of an evaluation
  batch's prompt tokens in the synthetic world, 1,983 of tau-bench airline's 2,000-6,600), those C
  tokens run once, as one row, and their keys and values are repeated for every prompt before
  each prompt's own remaining tokens run (`common_prefix_length`; positions continue from C).
- Otherwise the prompt cache is repeated G times along the batch axis (`repeat_interleave`, no
  second prefill) and decoding uses transformers' `DynamicCache`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from grpo.hf_compat import cache_argument, position_ids_from_mask, supports_shared_prefix

SHARED_PREFIX_ATTENTION = "grpo_shared_prefix"


# ----------------------------------------------------------------------------------------------
# Decoders: prefill once, then one token per row per step
# ----------------------------------------------------------------------------------------------


class RepeatedCacheDecoder:
    """Prompt cache repeated G times along the batch axis; transformers' DynamicCache and masks."""

    def __init__(self, causal_lm: torch.nn.Module, group_size: int, max_new_tokens: int) -> None:
        self.causal_lm, self.group_size, self.max_new_tokens = causal_lm, group_size, max_new_tokens

    def prefill(self, prompt_ids: Tensor, prompt_mask: Tensor) -> Tensor:
        """Logits [B*G, V] of the first generated token of every row."""
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.causal_lm.config)
        logits = self.causal_lm(input_ids=prompt_ids, attention_mask=prompt_mask,
                                position_ids=position_ids_from_mask(prompt_mask),
                                **cache_argument(self.causal_lm, self.cache), use_cache=True,
                                logits_to_keep=1).logits[:, -1]
        self.cache.batch_repeat_interleave(self.group_size)
        num_rows = prompt_ids.shape[0] * self.group_size
        # Attention over [prompt | generated]; after s generated tokens a step reads P + s columns.
        self.attention = torch.cat([prompt_mask.repeat_interleave(self.group_size, dim=0),
                                    prompt_mask.new_ones((num_rows, self.max_new_tokens))], dim=1)
        self.next_position = prompt_mask.sum(-1).repeat_interleave(self.group_size)
        self.prompt_length, self.generated = prompt_ids.shape[1], 0
        return logits.repeat_interleave(self.group_size, dim=0)

    def step(self, tokens: Tensor) -> Tensor:
        """Feed one token per decode row; logits [n, V] of the next one."""
        self.generated += 1
        logits = self.causal_lm(input_ids=tokens.unsqueeze(-1),
                                attention_mask=self.attention[:, :self.prompt_length + self.generated],
                                position_ids=self.next_position.unsqueeze(-1),
                                **cache_argument(self.causal_lm, self.cache), use_cache=True,
                                logits_to_keep=1).logits[:, -1]
        self.next_position = self.next_position + 1
        return logits

    def keep(self, rows: Tensor) -> None:
        """Keep only these decode rows (indices into the current decode batch)."""
        self.cache.batch_select_indices(rows)
        self.attention, self.next_position = self.attention[rows], self.next_position[rows]


class _GeneratedKeyValues:
    """The per-row keys and values of generated tokens, in buffers preallocated to max_new_tokens.

    It stands in for a transformers Cache during decode steps: each attention layer calls
    `update(key, value, layer_idx)` with the new token's key and value and receives the keys and
    values of every token generated so far (the prompt's are in `_PromptGroups`).
    """

    def __init__(self, num_layers: int, capacity: int) -> None:
        self.capacity, self.length = capacity, 0
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any
               ) -> tuple[Tensor, Tensor]:
        if self.keys[layer_idx] is None:
            rows, kv_heads, _, head_dim = key_states.shape
            self.keys[layer_idx] = key_states.new_empty((rows, kv_heads, self.capacity, head_dim))
            self.values[layer_idx] = value_states.new_empty((rows, kv_heads, self.capacity, value_states.shape[-1]))
        self.keys[layer_idx][:, :, self.length] = key_states[:, :, 0]
        self.values[layer_idx][:, :, self.length] = value_states[:, :, 0]
        end = self.length + 1
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def keep(self, rows: Tensor) -> None:
        self.keys = [None if buffer is None else buffer.index_select(0, rows) for buffer in self.keys]
        self.values = [None if buffer is None else buffer.index_select(0, rows) for buffer in self.values]


@dataclass
class _PromptGroups:
    """The prompts' keys and values, once per prompt, and where each decode row sits in the
    [prompts, G] grid.  Passed to the attention function as the keyword `prompt_groups`."""

    keys: list[Tensor]  # per layer [B', kv_heads, P, head_dim]
    values: list[Tensor]  # per layer [B', kv_heads, P, head_dim]
    pad_bias: Tensor  # [B', 1, 1, P] float32, 0 on prompt tokens, -inf on pads
    group_size: int
    slots: Tensor | None  # [n] grid slot (prompt * G + sample) of each decode row; None = every slot in order
    calls: int = 0


def shared_prefix_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                            attention_mask: Any, dropout: float = 0.0, scaling: float | None = None,
                            prompt_groups: _PromptGroups | None = None, **kwargs: Any) -> tuple[Tensor, None]:
    """Decode attention of one new token per row over [its prompt | its generated tokens].

    query [n, heads, 1, d]; key/value [n, kv_heads, t, d]: the row's generated tokens (the new one
    included); `prompt_groups` holds the prompts' keys and values (the attention mask is unused:
    every generated token of a running row is visible, prompt pads are in the groups' bias).
    Returns [n, 1, heads, d].  Heads are grouped by key/value head (grouped-query attention: head
    h reads kv head h // (heads / kv_heads)).
    """
    groups = prompt_groups
    if not isinstance(groups, _PromptGroups) or query.shape[2] != 1:
        raise RuntimeError("shared_prefix_attention only serves the rollout's one-token decode steps")
    groups.calls += 1
    rows, heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    per_kv = heads // kv_heads
    scaling = head_dim ** -0.5 if scaling is None else scaling
    prompt_keys, prompt_values = groups.keys[module.layer_idx], groups.values[module.layer_idx]
    num_prompts, group_size = prompt_keys.shape[0], groups.group_size
    query = query.view(rows, kv_heads, per_kv, head_dim)

    # Prompt part: the queries of one prompt's rows form one batch against that prompt's keys.
    grid_query = query
    if groups.slots is not None:
        grid_query = query.new_zeros((num_prompts * group_size, kv_heads, per_kv, head_dim))
        grid_query.index_copy_(0, groups.slots, query)
    grid_query = grid_query.view(num_prompts, group_size, kv_heads, per_kv, head_dim).transpose(1, 2)
    grid_query = grid_query.reshape(num_prompts, kv_heads, group_size * per_kv, head_dim)
    prompt_scores = torch.matmul(grid_query, prompt_keys.transpose(-1, -2)).float() * scaling + groups.pad_bias
    prompt_lse = torch.logsumexp(prompt_scores, dim=-1, keepdim=True)
    prompt_out = torch.matmul((prompt_scores - prompt_lse).exp().to(prompt_values.dtype), prompt_values)

    def to_rows(grid: Tensor) -> Tensor:  # [B', kv_heads, G * per_kv, x] -> [n, kv_heads, per_kv, x]
        grid = grid.view(num_prompts, kv_heads, group_size, per_kv, -1).transpose(1, 2)
        grid = grid.reshape(num_prompts * group_size, kv_heads, per_kv, grid.shape[-1])
        return grid if groups.slots is None else grid.index_select(0, groups.slots)

    prompt_out, prompt_lse = to_rows(prompt_out), to_rows(prompt_lse)

    # Generated part: each row against its own generated tokens.
    generated_scores = torch.matmul(query, key.transpose(-1, -2)).float() * scaling
    generated_lse = torch.logsumexp(generated_scores, dim=-1, keepdim=True)
    generated_out = torch.matmul((generated_scores - generated_lse).exp().to(value.dtype), value)

    # Exact merge of the two softmax blocks.
    total_lse = torch.logaddexp(prompt_lse, generated_lse)
    output = prompt_out.float() * (prompt_lse - total_lse).exp() + generated_out.float() * (generated_lse - total_lse).exp()
    return output.to(query.dtype).reshape(rows, 1, heads, head_dim), None


MIN_COMMON_PREFIX = 16  # shorter common prefixes are not worth a forward pass of their own


def common_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """How many first tokens every prompt shares, leaving each prompt at least one token of its own
    (the prefill must end on a prompt's own last token to give its first logits)."""
    limit = min(len(prompt) for prompt in prompts) - 1
    if len(prompts) < 2 or limit <= 0:
        return 0
    heads = torch.tensor([list(prompt[:limit]) for prompt in prompts], dtype=torch.long)
    same = (heads == heads[:1]).all(dim=0)  # [limit]: column agrees across prompts
    return int(same.long().cumprod(0).sum())


class SharedPrefixDecoder:
    """Prompt keys/values stored once per prompt; generated ones per row (see the module docstring)."""

    def __init__(self, causal_lm: torch.nn.Module, group_size: int, max_new_tokens: int) -> None:
        from transformers import AttentionInterface

        AttentionInterface.register(SHARED_PREFIX_ATTENTION, shared_prefix_attention)
        self.causal_lm, self.group_size, self.max_new_tokens = causal_lm, group_size, max_new_tokens

    @staticmethod
    def supports(causal_lm: torch.nn.Module) -> bool:
        """Decoder-only families known to route attention through transformers' interface, with
        full (not sliding-window) attention in every layer (`grpo.hf_compat.supports_shared_prefix`)."""
        return supports_shared_prefix(causal_lm)

    def prefill(self, prompt_ids: Tensor, prompt_mask: Tensor, common: int = 0) -> Tensor:
        """Logits [B*G, V] of every row's first token.  With `common` >= MIN_COMMON_PREFIX (the
        length every prompt starts with, `common_prefix_length`), those tokens run once."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.causal_lm.config)
        if common >= MIN_COMMON_PREFIX and prompt_ids.shape[0] > 1:
            prompt_ids, prompt_mask = self._prefill_common(cache, prompt_ids, prompt_mask, common)
            logits = self.causal_lm(input_ids=prompt_ids[:, common:], attention_mask=prompt_mask,
                                    position_ids=position_ids_from_mask(prompt_mask)[:, common:],
                                    **cache_argument(self.causal_lm, cache), use_cache=True,
                                    logits_to_keep=1).logits[:, -1]
        else:
            logits = self.causal_lm(input_ids=prompt_ids, attention_mask=prompt_mask,
                                    position_ids=position_ids_from_mask(prompt_mask),
                                    **cache_argument(self.causal_lm, cache), use_cache=True,
                                    logits_to_keep=1).logits[:, -1]
        pad_bias = torch.zeros(prompt_mask.shape, dtype=torch.float32, device=prompt_mask.device)
        pad_bias = pad_bias.masked_fill(prompt_mask == 0, float("-inf"))[:, None, None, :]
        self.groups = _PromptGroups(keys=[layer.keys for layer in cache.layers],
                                    values=[layer.values for layer in cache.layers],
                                    pad_bias=pad_bias, group_size=self.group_size, slots=None)
        self.num_layers = len(cache.layers)
        self.generated = _GeneratedKeyValues(self.num_layers, self.max_new_tokens)
        self.next_position = prompt_mask.sum(-1).repeat_interleave(self.group_size)
        return logits.repeat_interleave(self.group_size, dim=0)

    def _prefill_common(self, cache: Any, prompt_ids: Tensor, prompt_mask: Tensor, common: int
                        ) -> tuple[Tensor, Tensor]:
        """Run the `common` shared first tokens once into `cache`, repeat their keys and values
        for every prompt, and return the prompts re-laid-out as [common | own tokens left-padded]
        (ids and mask, [B, common + S]) for the second pass over the own tokens."""
        num_prompts = prompt_ids.shape[0]
        lengths = prompt_mask.sum(-1)
        longest = int(lengths.max())
        shared = prompt_ids[lengths.argmax(), prompt_ids.shape[1] - longest:][:common].unsqueeze(0)  # [1, C]
        positions = torch.arange(common, device=prompt_ids.device).unsqueeze(0)
        self.causal_lm(input_ids=shared, position_ids=positions, **cache_argument(self.causal_lm, cache),
                       use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(num_prompts)
        # Each prompt's own tokens are the last (length - C) of its row (prompts are left-padded).
        own = lengths - common
        width = int(own.max())
        columns = torch.arange(width, device=prompt_ids.device)
        own_mask = (columns.unsqueeze(0) >= width - own.unsqueeze(1)).to(prompt_mask.dtype)  # [B, S]
        own_ids = prompt_ids[:, prompt_ids.shape[1] - width:].masked_fill(own_mask == 0, 0)
        ids = torch.cat([shared.expand(num_prompts, -1), own_ids], dim=1)
        mask = torch.cat([prompt_mask.new_ones((num_prompts, common)), own_mask], dim=1)
        return ids, mask

    def step(self, tokens: Tensor) -> Tensor:
        config = self.causal_lm.config
        previous_attention = config._attn_implementation
        config._attn_implementation = SHARED_PREFIX_ATTENTION
        calls_before = self.groups.calls
        try:
            # No attention mask: transformers skips building one for a registered custom attention,
            # and the prompt groups reach the attention function as a keyword argument.
            logits = self.causal_lm(input_ids=tokens.unsqueeze(-1), attention_mask=None,
                                    position_ids=self.next_position.unsqueeze(-1),
                                    **cache_argument(self.causal_lm, self.generated), use_cache=True,
                                    logits_to_keep=1, prompt_groups=self.groups).logits[:, -1]
        finally:
            config._attn_implementation = previous_attention
        if self.groups.calls - calls_before != self.num_layers:
            raise RuntimeError(f"{type(self.causal_lm).__name__} did not route its attention through the "
                               f"shared-prefix attention; use SamplingConfig(share_prefix=False)")
        self.generated.length += 1
        self.next_position = self.next_position + 1
        return logits

    def keep(self, rows: Tensor) -> None:
        groups = self.groups
        slots = rows if groups.slots is None else groups.slots.index_select(0, rows)
        self.generated.keep(rows)
        self.next_position = self.next_position[rows]
        # Drop prompts none of whose samples still run, and renumber the slots of the rest.
        prompt_of_row = torch.div(slots, groups.group_size, rounding_mode="floor")
        live_prompts = torch.unique(prompt_of_row)
        if live_prompts.numel() < groups.keys[0].shape[0]:
            renumber = torch.full((groups.keys[0].shape[0],), -1, dtype=torch.long, device=slots.device)
            renumber[live_prompts] = torch.arange(live_prompts.numel(), device=slots.device)
            slots = renumber[prompt_of_row] * groups.group_size + slots % groups.group_size
            groups.keys = [keys.index_select(0, live_prompts) for keys in groups.keys]
            groups.values = [values.index_select(0, live_prompts) for values in groups.values]
            groups.pad_bias = groups.pad_bias.index_select(0, live_prompts)
        full_grid = slots.numel() == groups.keys[0].shape[0] * groups.group_size
        groups.slots = None if full_grid else slots
