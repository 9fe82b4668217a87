"""The hand-written sampler: G completions per prompt from one shared prefill.

For a batch of B prompts and a group size G:

1. Left-pad the prompts to one length P.  Positions count only real tokens
   (`position_ids_from_mask`), so padding does not shift a prompt's rotary positions, and the
   attention mask hides the pads.
2. Prefill the B prompts once, keeping only the last position's logits (`logits_to_keep=1`).
3. Share each prompt's KV cache among its G samples (row b*G + g is sample g of prompt b).
4. Decode token by token.  Each step samples one token per running row from
   softmax(filter(z / temperature)), where the filters are top-k then top-p (nucleus), with a
   seeded `torch.Generator`; `greedy` takes argmax z instead.
5. A row stops after a stop token (EOS, end-of-turn) or when its *generated* tokens end with a
   stop sequence (e.g. the ids of "</tool_call>"); tokens of the prompt never stop a row.  The
   stopping token is part of the completion (mask 1).  Rows that stop leave the decode batch (and
   the cache), so finished completions cost nothing more; the loop ends when no row is left or
   after `max_new_tokens`.  A row cut off by `max_new_tokens` has `finished=False`.

How the prompt cache is shared (step 3) depends on the architecture:

- Shared-prefix attention (default for the decoder-only families in `grpo.policy.SHARED_PREFIX_MODEL_TYPES`
  with full attention in every layer): the prompt's keys and values stay stored once per prompt,
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

LoRA: when the policy is a PeftModel whose LoRA weights are fp32, the rollout runs with each
adapter folded into its base weight (W + (alpha/r) B A, a new tensor; the original weight tensor
is put back afterwards, untouched), which removes the adapter's extra matmuls from every step.
bf16 weights are not folded: rounding W + dW to bf16 would lose most of a small dW.

`sampling_logprobs` are log-probabilities of the sampled tokens under the distribution actually
sampled from (after temperature, top-k, top-p, and the stop-token ban while fewer than
`min_new_tokens` tokens exist).  With top_k = 0 and top_p = 1 they equal the policy's
`token_logprobs` at the same temperature.  Under `greedy` they are log softmax(z / temperature) of
the argmax token (a confidence, not the log of the point mass).

The model runs in eval mode under `torch.inference_mode()`; every module's training flag is
restored afterwards.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from grpo.policy import (cache_argument, causal_lm_of, model_dtype_device, position_ids_from_mask,
                         supports_shared_prefix)

SHARED_PREFIX_ATTENTION = "grpo_shared_prefix"


@dataclass
class SamplingConfig:
    """How completions are sampled.  top_k = 0 and top_p = 1 switch those filters off.

    min_new_tokens: stop tokens are banned from sampling while fewer than this many tokens exist,
    and stop sequences are ignored until the completion has this many tokens.

    share_prefix: shared-prefix attention where the architecture allows it (else the repeated
    cache), with the prompts' common first tokens prefilled once; merge_lora: fold fp32 LoRA
    adapters into the base weights for the rollout.  Both only change speed and memory, not what
    is sampled (up to float rounding).
    """

    group_size: int = 8
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    min_new_tokens: int = 0
    share_prefix: bool = True
    merge_lora: bool = True

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise ValueError(f"SamplingConfig.group_size must be >= 1, got {self.group_size}")
        if self.max_new_tokens < 0:
            raise ValueError(f"SamplingConfig.max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.min_new_tokens < 0:
            raise ValueError(f"SamplingConfig.min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"SamplingConfig.temperature must be > 0 (use greedy=True for argmax), "
                             f"got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k must be >= 0 (0 = off), got {self.top_k}")


@dataclass
class Rollout:
    """Completions of a batch of prompts, group axis explicit.  Row b of the prompt tensors is the
    prompt of completions [b, 0..G-1]."""

    prompt_ids: Tensor  # [B, P] long, left-padded prompts
    prompt_mask: Tensor  # [B, P] long, 1 on real prompt tokens
    completion_ids: Tensor  # [B, G, T] long, pad after the stopping token
    completion_mask: Tensor  # [B, G, T] long, 1 on generated tokens up to and including the stopping token
    finished: Tensor  # [B, G] bool, stopped by a stop token/sequence (False = truncated at max_new_tokens)
    sampling_logprobs: Tensor  # [B, G, T] float32, log-prob of each sampled token, 0 where masked

    @property
    def batch_size(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def group_size(self) -> int:
        return self.completion_ids.shape[1]

    @property
    def completion_lengths(self) -> Tensor:
        """[B, G] number of generated tokens (the stopping token included)."""
        return self.completion_mask.sum(-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int, device: torch.device | str = "cpu"
             ) -> tuple[Tensor, Tensor]:
    """Prompts as one [B, P] tensor padded on the left, and its 0/1 mask."""
    longest = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            input_ids[row, longest - len(prompt):] = torch.as_tensor(prompt, dtype=torch.long)
            attention_mask[row, longest - len(prompt):] = 1
    return input_ids.to(device), attention_mask.to(device)


# ----------------------------------------------------------------------------------------------
# Sampling one token
# ----------------------------------------------------------------------------------------------


def filter_logits(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """z / temperature, then top-k, then top-p (nucleus): filtered-out tokens get -inf.

    Top-k keeps the tokens whose scaled logit is at least the k-th largest (ties kept).  Top-p keeps
    the smallest set of most likely tokens whose probability mass reaches top_p: sorted ascending,
    a token is removed when the mass of it and every less likely token is <= 1 - top_p; the most
    likely token is always kept.  These are transformers' TopK/TopP warpers.
    """
    scaled = logits / temperature if temperature != 1.0 else logits
    vocab_size = scaled.shape[-1]
    if 0 < top_k < vocab_size:
        kth_largest = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_index = torch.sort(scaled, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= 1.0 - top_p
        remove_sorted[:, -1] = False
        remove = remove_sorted.scatter(-1, sorted_index, remove_sorted)
        scaled = scaled.masked_fill(remove, float("-inf"))
    return scaled


def sample_tokens(logits: Tensor, config: SamplingConfig, generator: torch.Generator | None,
                  banned_token_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One token per row of `logits` [n, V] and its log-prob under the sampling distribution.

    banned_token_ids (1-D) get probability 0 (used for stop tokens before `min_new_tokens`).
    Sampling draws one uniform number per row and inverts the cumulative distribution: the same
    distribution as `torch.multinomial`, which on the CPU costs ten times more on large vocabularies.
    """
    logits = logits.float()
    if banned_token_ids is not None:
        logits = logits.index_fill(-1, banned_token_ids, float("-inf"))
    if config.greedy:
        tokens = logits.argmax(dim=-1)
        scaled = logits / config.temperature if config.temperature != 1.0 else logits
        token_logits = scaled.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return tokens, token_logits - torch.logsumexp(scaled, dim=-1)
    log_probs = torch.log_softmax(filter_logits(logits, config.temperature, config.top_k, config.top_p), dim=-1)
    # Inverse-CDF draw in float64 (so that tail tokens keep their probability): the first token
    # whose cumulative mass exceeds u * total.  Its probability is > 0, since the cumulative sum
    # rises there; the clamp guards the one draw where u * total rounds up to the total.
    cumulative = log_probs.double().exp_().cumsum_(dim=-1)
    total = cumulative[:, -1:]
    # Drawn on the generator's own device (a CPU generator may drive a GPU rollout).
    uniform = torch.rand((logits.shape[0], 1), generator=generator, dtype=torch.float64,
                         device=generator.device if generator is not None else logits.device).to(logits.device)
    tokens = torch.searchsorted(cumulative, uniform * total, right=True)
    tokens = torch.minimum(tokens, (cumulative < total).sum(-1, keepdim=True)).squeeze(-1)
    return tokens, log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _ends_with_stop_sequence(recent: Tensor, stop_sequences: list[Tensor]) -> Tensor:
    """[n] bool: whether each row of `recent` [n, W] (the last W generated tokens, W at most the
    longest stop sequence) ends with one of `stop_sequences`.  Sequences longer than W cannot have
    been generated yet, so prompt tokens never complete a stop sequence."""
    hit = torch.zeros(recent.shape[0], dtype=torch.bool, device=recent.device)
    for sequence in stop_sequences:
        if len(sequence) <= recent.shape[1]:
            hit |= (recent[:, recent.shape[1] - len(sequence):] == sequence).all(dim=-1)
    return hit


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
        full (not sliding-window) attention in every layer (`grpo.policy.supports_shared_prefix`)."""
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


# ----------------------------------------------------------------------------------------------
# Rollout mode: eval, training flags restored, fp32 LoRA folded into the base weights
# ----------------------------------------------------------------------------------------------


def _foldable_lora_layers(model: torch.nn.Module) -> list[tuple[Any, str]]:
    """Plain LoRA Linear layers with one enabled, unmerged, fp32 adapter (others are left alone)."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # peft not installed: nothing to fold
        return []
    layers = []
    for module in model.modules():
        if not isinstance(module, LoraLinear) or module.disable_adapters or module.merged:
            continue
        active = [name for name in module.active_adapters if name in module.lora_A]
        if len(active) != 1 or active[0] in getattr(module, "lora_variant", {}):
            continue
        if getattr(module, "lora_bias", {}).get(active[0], False):
            continue
        if module.base_layer.weight.dtype != torch.float32 or module.lora_A[active[0]].weight.dtype != torch.float32:
            continue
        layers.append((module, active[0]))
    return layers


@contextlib.contextmanager
def rollout_mode(model: torch.nn.Module, *, fold_lora: bool) -> Iterator[None]:
    """Eval mode (training flags of every module restored on exit) and, with `fold_lora`, fp32
    LoRA adapters folded into new base weight tensors (the original tensors are put back)."""
    training_flags = [(module, module.training) for module in model.modules()]
    folded: list[tuple[Any, Tensor]] = []
    model.eval()
    try:
        if fold_lora:
            with torch.no_grad():
                for layer, adapter in _foldable_lora_layers(model):
                    original = layer.base_layer.weight.data
                    layer.base_layer.weight.data = original + layer.get_delta_weight(adapter)
                    folded.append((layer, original))
                    # The layer now computes base_layer(x) only; peft's private flag avoids
                    # enable_adapters(), which would also flip requires_grad on the adapter.
                    layer._disable_adapters = True
        yield
    finally:
        for layer, original in folded:
            layer.base_layer.weight.data = original
            layer._disable_adapters = False
        for module, training in training_flags:
            module.training = training


# ----------------------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------------------


def _validate(prompts: Sequence[Sequence[int]], stop_token_ids: Sequence[int],
              stop_sequences: Sequence[Sequence[int]], vocab_size: int | None) -> None:
    if len(prompts) == 0:
        raise ValueError("generate needs at least one prompt")
    for index, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {index} is empty: a completion must be conditioned on at least one token")
        if vocab_size is not None and (min(prompt) < 0 or max(prompt) >= vocab_size):
            raise ValueError(f"prompt {index} has token ids outside the model's vocabulary [0, {vocab_size})")
    for index, sequence in enumerate(stop_sequences):
        if len(sequence) == 0:
            raise ValueError(f"stop sequence {index} is empty")
    for token in stop_token_ids:
        if vocab_size is not None and not 0 <= token < vocab_size:
            raise ValueError(f"stop token id {token} is outside the model's vocabulary [0, {vocab_size})")


def generate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], config: SamplingConfig, *,
             pad_token_id: int, stop_token_ids: Sequence[int], stop_sequences: Sequence[Sequence[int]] = (),
             generator: torch.Generator | None = None) -> tuple[Rollout, dict[str, float]]:
    """Sample `config.group_size` completions for each prompt (token id lists); see the module docstring.

    Returns the Rollout and metrics: `rollout/tokens` (generated tokens, stopping tokens
    included), `rollout/tokens_per_s` (over prefill and decode), `rollout/prefill_s`,
    `rollout/decode_s`, `rollout/steps` (decode forward passes run).
    """
    causal_lm = causal_lm_of(model)
    vocab_size = getattr(causal_lm.config, "vocab_size", None)
    _validate(prompts, stop_token_ids, stop_sequences, vocab_size)
    _, device = model_dtype_device(causal_lm)
    group_size, max_new_tokens = config.group_size, config.max_new_tokens
    num_prompts, num_rows = len(prompts), len(prompts) * config.group_size

    prompt_ids, prompt_mask = left_pad(prompts, pad_token_id, device)
    completion_ids = torch.full((num_rows, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    completion_mask = torch.zeros((num_rows, max_new_tokens), dtype=torch.long, device=device)
    sampling_logprobs = torch.zeros((num_rows, max_new_tokens), dtype=torch.float32, device=device)
    finished = torch.zeros(num_rows, dtype=torch.bool, device=device)
    stop_ids = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=device)
    stop_tensors = [torch.tensor(list(sequence), dtype=torch.long, device=device) for sequence in stop_sequences]
    longest_stop = max((len(sequence) for sequence in stop_tensors), default=0)
    metrics = {"rollout/tokens": 0.0, "rollout/tokens_per_s": 0.0, "rollout/prefill_s": 0.0,
               "rollout/decode_s": 0.0, "rollout/steps": 0.0}

    def pack() -> Rollout:
        shape = (num_prompts, group_size, max_new_tokens)
        return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                       completion_ids=completion_ids.view(shape), completion_mask=completion_mask.view(shape),
                       finished=finished.view(num_prompts, group_size),
                       sampling_logprobs=sampling_logprobs.view(shape))

    if max_new_tokens == 0:
        return pack(), metrics

    shared = config.share_prefix and SharedPrefixDecoder.supports(causal_lm)
    decoder_class = SharedPrefixDecoder if shared else RepeatedCacheDecoder
    with rollout_mode(model, fold_lora=config.merge_lora), torch.inference_mode():
        start = time.perf_counter()
        decoder = decoder_class(causal_lm, group_size, max_new_tokens)
        if shared:
            logits = decoder.prefill(prompt_ids, prompt_mask, common=common_prefix_length(prompts))
        else:
            logits = decoder.prefill(prompt_ids, prompt_mask)
        prefill_end = time.perf_counter()

        rows = torch.arange(num_rows, device=device)  # decode-batch row -> output row
        steps = 0
        for step in range(max_new_tokens):
            banned = stop_ids if step < config.min_new_tokens and stop_ids.numel() else None
            tokens, token_logprobs = sample_tokens(logits, config, generator, banned)
            completion_ids[rows, step] = tokens
            completion_mask[rows, step] = 1
            sampling_logprobs[rows, step] = token_logprobs

            stopped = torch.isin(tokens, stop_ids) if stop_ids.numel() else torch.zeros_like(tokens, dtype=torch.bool)
            if stop_tensors and step + 1 >= config.min_new_tokens:
                window_start = max(0, step + 1 - longest_stop)
                stopped |= _ends_with_stop_sequence(completion_ids[rows, window_start:step + 1], stop_tensors)
            if step + 1 == max_new_tokens:
                finished[rows] = stopped
                break
            if stopped.any():
                finished[rows[stopped]] = True
                keep = (~stopped).nonzero().squeeze(-1)
                if keep.numel() == 0:
                    break
                # Finished rows leave the decode batch and the cache: they cost nothing more.
                decoder.keep(keep)
                rows, tokens = rows[keep], tokens[keep]
            logits = decoder.step(tokens)
            steps += 1
        decode_end = time.perf_counter()

    generated = float(completion_mask.sum())
    metrics.update({
        "rollout/tokens": generated,
        "rollout/tokens_per_s": generated / max(decode_end - start, 1e-9),
        "rollout/prefill_s": prefill_end - start,
        "rollout/decode_s": decode_end - prefill_end,
        "rollout/steps": float(steps),
    })
    return pack(), metrics


def decode_completions(tokenizer: Any, completion_ids: torch.Tensor, completion_mask: torch.Tensor, stop_ids: set[int]) -> list[str]:
    """Text of each completion [N, T] without its final stop token (the parser sees what the model wrote)."""
    texts = []
    for ids, mask in zip(completion_ids.tolist(), completion_mask.tolist()):
        kept = [token for token, keep in zip(ids, mask) if keep]
        if kept and kept[-1] in stop_ids:
            kept = kept[:-1]
        texts.append(tokenizer.decode(kept, skip_special_tokens=False))
    return texts
