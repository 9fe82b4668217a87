"""Token log-probabilities under a policy: what the GRPO ratio and KL term are computed from.

`token_logprobs` returns log pi(y_t | x, y_<t) of completion tokens at a sampling
temperature tau (logits divided by tau, as TRL does), projecting only the hidden states that
predict completion tokens onto the vocabulary.  `grouped_token_logprobs` returns the same
values for G completions of each prompt while running each prompt through the model once
(its completions attend to its keys and values): B*P + B*G*T tokens instead of B*G*(P + T).
The GRPO trainer uses it for every forward of a step (GRPOConfig.share_prefix, on by default)
on the families in `grpo.hf_compat.SHARED_PREFIX_MODEL_TYPES` with full attention in every
layer; other models get the unshared computation.

Both work on a PeftModel (LoRA active unless inside `grpo.policy.reference_mode`) and on a plain
model.  The sampler shares prompt keys and values the same way at decode time (`grpo.decoders`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import Tensor

from grpo.hf_compat import (PLAIN_HEAD_MODEL_TYPES, cache_argument, causal_lm_of, position_ids_from_mask,
                            supports_shared_prefix)

GROUPED_PREFIX_ATTENTION = "grpo_grouped_prefix"


# ----------------------------------------------------------------------------------------------
# Token log-probabilities
# ----------------------------------------------------------------------------------------------


def _logprobs_and_entropy(logits: Tensor, targets: Tensor, temperature: float,
                          want_entropy: bool) -> tuple[Tensor, Tensor | None]:
    """log softmax(z / tau)[y] = z_y / tau - logsumexp(z / tau), in fp32, without a [.., V] log-softmax.

    Entropy H = logsumexp(z') - sum_v p_v z'_v (z' = z / tau) is a diagnostic and carries no gradient.
    """
    scaled = logits.float()
    if temperature != 1.0:
        scaled = scaled / temperature
    log_normaliser = torch.logsumexp(scaled, dim=-1)
    logprobs = scaled.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_normaliser
    entropy = None
    if want_entropy:
        with torch.no_grad():
            probs = torch.softmax(scaled.detach(), dim=-1)
            entropy = log_normaliser.detach() - (probs * scaled.detach()).sum(-1)
    return logprobs, entropy


def token_logprobs(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, *, completion_start: int,
                   temperature: float = 1.0, position_ids: Tensor | None = None, return_entropy: bool = False,
                   chunk_size: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probabilities [N, T] of the tokens `input_ids[:, completion_start:]` (T = L - completion_start).

    logp[n, t] = log softmax(z[n, completion_start + t - 1] / temperature)[input_ids[n, completion_start + t]]

    Only the hidden states at positions completion_start - 1 .. L - 2 are projected onto the
    vocabulary, so at most [N, T, V] logits exist at once, and [N, chunk_size, V] when
    `chunk_size` is set (then, with gradients on, each chunk's logits are recomputed in the
    backward pass instead of being stored).  `position_ids` default to positions that count only
    real tokens (left padding safe).  Works on a PeftModel (LoRA active unless inside
    `reference_mode`) and on a plain model.  With `return_entropy`, also the per-token entropy of
    the same distribution (detached).  Values at masked positions are computed but meaningless.
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and attention_mask must both be [N, L]; got {tuple(input_ids.shape)} "
                         f"and {tuple(attention_mask.shape)}")
    sequence_length = input_ids.shape[1]
    if not 1 <= completion_start <= sequence_length:
        raise ValueError(f"completion_start must be in [1, {sequence_length}] (at least one prompt token), "
                         f"got {completion_start}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    targets = input_ids[:, completion_start:]

    causal_lm = causal_lm_of(model)
    if getattr(causal_lm.config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        # Unknown head (soft-capping, scaling, ...): let the model compute its own logits.
        keep = torch.arange(completion_start - 1, sequence_length - 1, device=input_ids.device)
        logits = causal_lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False, logits_to_keep=keep).logits
        logprobs, entropy = _logprobs_and_entropy(logits, targets, temperature, return_entropy)
        return (logprobs, entropy) if return_entropy else logprobs

    hidden = causal_lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                     position_ids=position_ids, use_cache=False).last_hidden_state
    hidden = hidden[:, completion_start - 1: sequence_length - 1]
    return _score_hidden(causal_lm, hidden, targets, temperature, return_entropy, chunk_size)


def _score_hidden(causal_lm: torch.nn.Module, hidden: Tensor, targets: Tensor, temperature: float,
                  return_entropy: bool, chunk_size: int | None) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probs [N, T] (and entropies) of `targets` [N, T] from the hidden states [N, T, H] that
    predict them, through the model's output head, `chunk_size` positions at a time (each chunk's
    logits recomputed in the backward pass when gradients are on)."""
    lm_head = causal_lm.get_output_embeddings()
    num_targets = targets.shape[1]

    def score(hidden_chunk: Tensor, target_chunk: Tensor) -> tuple[Tensor, Tensor | None]:
        return _logprobs_and_entropy(lm_head(hidden_chunk), target_chunk, temperature, return_entropy)

    step = chunk_size or max(num_targets, 1)
    recompute = chunk_size is not None and torch.is_grad_enabled() and hidden.requires_grad
    logprob_chunks, entropy_chunks = [], []
    for start in range(0, num_targets, step):
        hidden_chunk, target_chunk = hidden[:, start:start + step], targets[:, start:start + step]
        if recompute:
            from torch.utils.checkpoint import checkpoint

            chunk_logprobs, chunk_entropy = checkpoint(score, hidden_chunk, target_chunk, use_reentrant=False)
        else:
            chunk_logprobs, chunk_entropy = score(hidden_chunk, target_chunk)
        logprob_chunks.append(chunk_logprobs)
        entropy_chunks.append(chunk_entropy)
    if not logprob_chunks:  # T == 0
        empty = hidden.new_zeros(targets.shape[0], 0, dtype=torch.float32)
        return (empty, empty.clone()) if return_entropy else empty
    logprobs = torch.cat(logprob_chunks, dim=1) if len(logprob_chunks) > 1 else logprob_chunks[0]
    if not return_entropy:
        return logprobs
    entropy = torch.cat(entropy_chunks, dim=1) if len(entropy_chunks) > 1 else entropy_chunks[0]
    return logprobs, entropy


# ----------------------------------------------------------------------------------------------
# Shared-prefix log-probabilities: each prompt computed once for its group of completions
# ----------------------------------------------------------------------------------------------


class _PromptPrefix:
    """The prompts' keys and values (one copy per prompt, with their autograd history) and the
    masks the completion tokens attend with; reaches the attention function as the keyword
    `prompt_prefix`.  Deliberately not a dataclass: FSDP rebuilds dataclass and list keyword
    arguments before each layer's forward, and `calls` must count on the caller's object."""

    def __init__(self, keys: list[Tensor], values: list[Tensor], prompt_mask: Tensor, completion_mask: Tensor,
                 group_size: int) -> None:
        self.keys = keys  # per layer [B, kv_heads, P, head_dim]
        self.values = values  # per layer [B, kv_heads, P, head_dim]
        self.prompt_mask = prompt_mask  # [B, P] bool, True on real prompt tokens
        self.completion_mask = completion_mask  # [B*G, T'] bool, True on real completion tokens (own keys)
        self.group_size = group_size
        self.calls = 0  # attention calls served: one per layer when the model routes attention here


def grouped_prefix_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                             attention_mask: Any, dropout: float = 0.0, scaling: float | None = None,
                             prompt_prefix: _PromptPrefix | None = None, **kwargs: Any) -> tuple[Tensor, None]:
    """Attention of completion tokens over [their prompt | their own completion so far].

    query [B*G, heads, T', d]; key/value [B*G, kv_heads, T', d]: the completions' own tokens (row
    b*G + g is sample g of prompt b); the prompts' keys/values [B, kv_heads, P, d] come in
    `prompt_prefix`.  Completion token t of a row sees the real tokens of its prompt and its own
    real tokens 0..t (the `attention_mask` argument is unused).  Returns [B*G, T', heads, d].

    Each row's keys are [prompt keys ; own keys], built by one concatenation from a broadcast view
    of the prompt's (no second prompt forward, and the gradient of all G copies sums into the one
    prompt forward), then a fused `scaled_dot_product_attention` with a boolean mask.  The copy
    is G * P * kv_heads * d per layer, small beside the G * P tokens of activations it replaces,
    and the fused kernel stores no [T', P + T'] score matrix for the backward pass.
    """
    prefix = prompt_prefix
    if not isinstance(prefix, _PromptPrefix):
        raise RuntimeError("grouped_prefix_attention needs the prompt_prefix keyword (see grouped_token_logprobs)")
    prefix.calls += 1
    rows, heads, length, head_dim = query.shape
    kv_heads = key.shape[1]
    prompt_keys, prompt_values = prefix.keys[module.layer_idx], prefix.values[module.layer_idx]
    num_prompts, group_size, prompt_length = prompt_keys.shape[0], prefix.group_size, prompt_keys.shape[2]
    # The CPU kernel handles grouped-query heads itself; CUDA kernels with a mask would fall back to
    # the unfused path, so there every kv head is repeated for the query heads it serves.
    repeats = 1 if query.device.type == "cpu" else heads // kv_heads

    def rows_of(prompt_part: Tensor, own_part: Tensor) -> Tensor:  # -> [B*G, kv_heads * repeats, P + T', d]
        prompt_part = prompt_part[:, None, :, None].expand(num_prompts, group_size, kv_heads, repeats,
                                                           prompt_length, prompt_part.shape[-1])
        own_part = own_part.reshape(num_prompts, group_size, kv_heads, 1, length, own_part.shape[-1]).expand(
            -1, -1, -1, repeats, -1, -1)
        joined = torch.cat([prompt_part, own_part], dim=4)
        return joined.view(rows, kv_heads * repeats, prompt_length + length, joined.shape[-1])

    causal = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
    own_visible = causal[None] & prefix.completion_mask[:, None, :]  # [B*G, T', T']
    prompt_visible = prefix.prompt_mask.repeat_interleave(group_size, dim=0)[:, None, :].expand(rows, length, -1)
    mask = torch.cat([prompt_visible, own_visible], dim=-1)[:, None]  # [B*G, 1, T', P + T']
    output = torch.nn.functional.scaled_dot_product_attention(
        query, rows_of(prompt_keys, key), rows_of(prompt_values, value), attn_mask=mask, dropout_p=dropout,
        scale=scaling, enable_gqa=repeats * kv_heads != heads)
    return output.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def _attention_implementation(config: Any, name: str) -> Iterator[None]:
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def grouped_token_logprobs(model: torch.nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                           completion_mask: Tensor, *, temperature: float = 1.0, return_entropy: bool = False,
                           chunk_size: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probabilities [B, G, T] of G completions per prompt, computing each prompt once.

    logp[b, g, t] = log softmax(z / temperature)[completion_ids[b, g, t]], z the logits after
    prompt b (left-padded, `prompt_mask` [B, P]) and completion tokens 0..t-1 of sample g.  This
    equals `token_logprobs` on the G rows [prompt_b ; completion_bg] (same positions, same masks),
    but runs about B*P + B*G*T tokens through the model instead of B*G*(P + T):

    1. The prompts go through the decoder once, with gradient when it is on (LoRA changes the
       prompts' keys and values), keeping every layer's keys and values.  The hidden state of a
       prompt's last token predicts the first completion token of all its G samples.
    2. The completions (tokens 0..T-2; the last one predicts nothing) go through the decoder as
       B*G rows at positions prompt_length + 0, 1, ...  In each layer `grouped_prefix_attention`
       lets them attend to [their prompt's keys and values ; their own], so the gradient of every
       completion's attention flows back into the one prompt forward (autograd sums the G
       contributions).

    completion_mask [B, G, T]: 1 on real tokens.  Completion keys where it is 0 are hidden and
    positions count only real tokens, exactly as in `token_logprobs`.  Families outside
    `supports_shared_prefix` are computed the unshared way (rows repeated), with the same result.
    Values at masked positions are computed but meaningless; with `return_entropy`, also the
    detached per-token entropy [B, G, T].
    """
    if prompt_ids.dim() != 2 or prompt_mask.shape != prompt_ids.shape:
        raise ValueError(f"prompt_ids and prompt_mask must both be [B, P]; got {tuple(prompt_ids.shape)} and "
                         f"{tuple(prompt_mask.shape)}")
    if completion_ids.dim() != 3 or completion_mask.shape != completion_ids.shape:
        raise ValueError(f"completion_ids and completion_mask must both be [B, G, T]; got "
                         f"{tuple(completion_ids.shape)} and {tuple(completion_mask.shape)}")
    if completion_ids.shape[0] != prompt_ids.shape[0]:
        raise ValueError(f"{prompt_ids.shape[0]} prompts but completions for {completion_ids.shape[0]} "
                         f"(completion_ids must be [B, G, T] with B = prompts)")
    empty_prompts = (prompt_mask.sum(-1) == 0).nonzero().flatten()
    if empty_prompts.numel():
        raise ValueError(f"prompts {empty_prompts.tolist()[:10]} have no real token (prompt_mask all 0): the first "
                         f"completion token must be conditioned on at least one")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    num_prompts, group_size, num_targets = completion_ids.shape
    causal_lm = causal_lm_of(model)

    if not supports_shared_prefix(causal_lm):
        rows = num_prompts * group_size
        input_ids = torch.cat([prompt_ids.repeat_interleave(group_size, dim=0), completion_ids.reshape(rows, -1)], 1)
        attention_mask = torch.cat([prompt_mask.repeat_interleave(group_size, dim=0),
                                    completion_mask.reshape(rows, -1).to(prompt_mask.dtype)], dim=1)
        return _grouped(token_logprobs(model, input_ids, attention_mask, completion_start=prompt_ids.shape[1],
                                       temperature=temperature, return_entropy=return_entropy, chunk_size=chunk_size),
                        num_prompts, group_size)

    from transformers import AttentionInterface

    decoder = causal_lm.get_decoder()
    # FSDP: every rank must run as many forward passes (each gathers the layers' shards), and
    # whether prompts are unpadded depends on each rank's data, so sharded models keep the batch.
    from grpo.distributed import fsdp_modules

    prompt_last, prompt_keys, prompt_values = _prompt_forward(decoder, causal_lm.config, prompt_ids, prompt_mask,
                                                              unpad=not fsdp_modules(model))
    # The last prompt position is a real token (left padding): it predicts completion token 0.
    last_prompt_hidden = prompt_last.repeat_interleave(group_size, dim=0)  # [B*G, 1, H]
    rows = num_prompts * group_size
    flat_ids = completion_ids.reshape(rows, num_targets)
    flat_mask = completion_mask.reshape(rows, num_targets)
    hidden = last_prompt_hidden
    if num_targets > 1:
        inputs, input_mask = flat_ids[:, :-1], flat_mask[:, :-1].bool()
        positions = prompt_mask.sum(-1).repeat_interleave(group_size)[:, None] + input_mask.long().cumsum(-1) - 1
        prefix = _PromptPrefix(keys=prompt_keys, values=prompt_values,
                               prompt_mask=prompt_mask.bool(), completion_mask=input_mask, group_size=group_size)
        AttentionInterface.register(GROUPED_PREFIX_ATTENTION, grouped_prefix_attention)
        with _attention_implementation(causal_lm.config, GROUPED_PREFIX_ATTENTION):
            completion_hidden = decoder(input_ids=inputs, attention_mask=None, position_ids=positions.clamp(min=0),
                                        use_cache=False, prompt_prefix=prefix).last_hidden_state
        if prefix.calls != len(prompt_keys):
            raise RuntimeError(f"{type(causal_lm).__name__} did not route its attention through the shared-prefix "
                               f"attention; compute log-probs with token_logprobs (share_prefix off)")
        hidden = torch.cat([last_prompt_hidden, completion_hidden], dim=1)
    return _grouped(_score_hidden(causal_lm, hidden, flat_ids, temperature, return_entropy, chunk_size),
                    num_prompts, group_size)


# Prompts whose left padding is more than this share of the [B, P] prompt cells run one at a time.
UNPAD_PROMPTS_ABOVE = 0.1


def _prompt_forward(decoder: torch.nn.Module, config: Any, prompt_ids: Tensor, prompt_mask: Tensor, *,
                    unpad: bool = True) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """The prompts through the decoder (with gradient when it is on): the last position's hidden
    state [B, 1, H] and every layer's keys and values [B, kv_heads, P, head_dim].

    Left-padded prompts of very different lengths waste much of a batched forward on padding (the
    positions through every matmul, and attention quadratic in the padded length).  When the
    padding is more than UNPAD_PROMPTS_ABOVE of the prompt cells, each prompt runs alone on its
    real tokens, and its keys and values are left-padded with zeros afterwards, where the
    completions' attention masks them exactly as it masks padding.  The positions count real
    tokens either way, so the values are those of the batched forward (up to float rounding).
    unpad=False always runs the padded batch (FSDP, where ranks must run equal numbers of passes).
    """
    from transformers import DynamicCache

    num_prompts, prompt_length = prompt_ids.shape
    lengths = [int(n) for n in prompt_mask.sum(-1)]
    left_padded = all(bool(prompt_mask[b, prompt_length - n:].all()) for b, n in enumerate(lengths))
    padding_share = 1.0 - sum(lengths) / max(num_prompts * prompt_length, 1)
    if not unpad or num_prompts == 1 or not left_padded or padding_share <= UNPAD_PROMPTS_ABOVE:
        cache = DynamicCache(config=config)
        hidden = decoder(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids_from_mask(prompt_mask),
                         use_cache=True, **cache_argument(decoder, cache)).last_hidden_state
        return hidden[:, -1:], [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]
    last, keys, values = [], [], []
    for b, length in enumerate(lengths):
        ids = prompt_ids[b:b + 1, prompt_length - length:]
        cache = DynamicCache(config=config)
        hidden = decoder(input_ids=ids, attention_mask=torch.ones_like(ids),
                         position_ids=torch.arange(length, device=ids.device)[None], use_cache=True,
                         **cache_argument(decoder, cache)).last_hidden_state
        last.append(hidden[:, -1:])
        pad = (0, 0, prompt_length - length, 0)  # left-pad the sequence dimension (2) with zeros
        keys.append([torch.nn.functional.pad(layer.keys, pad) for layer in cache.layers])
        values.append([torch.nn.functional.pad(layer.values, pad) for layer in cache.layers])
    layers = range(len(keys[0]))
    return (torch.cat(last), [torch.cat([k[i] for k in keys]) for i in layers],
            [torch.cat([v[i] for v in values]) for i in layers])


def _grouped(result: Tensor | tuple[Tensor, Tensor], num_prompts: int, group_size: int
             ) -> Tensor | tuple[Tensor, Tensor]:
    """[B*G, T] (or a pair of them) as [B, G, T]."""
    if isinstance(result, tuple):
        return tuple(part.view(num_prompts, group_size, -1) for part in result)  # type: ignore[return-value]
    return result.view(num_prompts, group_size, -1)
