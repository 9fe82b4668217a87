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

How the prompt cache is shared (step 3) depends on the architecture (`grpo.decoders`): with
shared-prefix attention each prompt's keys and values are stored once and its G samples attend
to them as one batch (the prompts' common first tokens are prefilled once, too); otherwise the
prompt cache is repeated G times.  fp32 LoRA adapters are folded into the base weights for the
rollout (`grpo.lora_fold`).

`sampling_logprobs` are log-probabilities of the sampled tokens under the distribution actually
sampled from (after temperature, top-k, top-p, and the stop-token ban while fewer than
`min_new_tokens` tokens exist).  With top_k = 0 and top_p = 1 they equal the policy's
`token_logprobs` at the same temperature.  Under `greedy` they are log softmax(z / temperature) of
the argmax token (a confidence, not the log of the point mass).

The model runs in eval mode under `torch.inference_mode()`; every module's training flag is
restored afterwards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from grpo.decoders import RepeatedCacheDecoder, SharedPrefixDecoder, common_prefix_length
from grpo.hf_compat import causal_lm_of
from grpo.lora_fold import rollout_mode
from grpo.policy import model_dtype_device


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


def sample_tokens(logits: Tensor, config: SamplingConfig, generator: torch.Generator | Sequence[torch.Generator] | None,
                  banned_token_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One token per row of `logits` [n, V] and its log-prob under the sampling distribution.

    `generator` is one generator for the whole batch, or a sequence of n, one per row (row i's
    number drawn from generator[i]: a row's draws then do not depend on the other rows).
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
    uniform = _uniforms(logits.shape[0], generator, logits.device)
    tokens = torch.searchsorted(cumulative, uniform * total, right=True)
    tokens = torch.minimum(tokens, (cumulative < total).sum(-1, keepdim=True)).squeeze(-1)
    return tokens, log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def row_generators(generator: torch.Generator | Sequence[torch.Generator] | None, rows: Tensor
                   ) -> torch.Generator | list[torch.Generator] | None:
    """What `sample_tokens` takes for the batch rows `rows` (indices into the caller's full batch):
    the one shared generator as it is, or the running rows' own generators."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    return [generator[row] for row in rows.tolist()]


def _uniforms(rows: int, generator: torch.Generator | Sequence[torch.Generator] | None, device: torch.device) -> Tensor:
    """[rows, 1] float64 uniform numbers, drawn on the generator's own device (a CPU generator may
    drive a GPU rollout): from one generator, or one number from each of `rows` generators."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.rand((rows, 1), generator=generator, dtype=torch.float64,
                          device=generator.device if generator is not None else device).to(device)
    if len(generator) != rows:
        raise ValueError(f"{len(generator)} generators for {rows} rows: pass one per row")
    return torch.cat([torch.rand((1, 1), generator=each, dtype=torch.float64, device=each.device).to(device)
                      for each in generator])


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
             generator: torch.Generator | Sequence[torch.Generator] | None = None) -> tuple[Rollout, dict[str, float]]:
    """Sample `config.group_size` completions for each prompt (token id lists); see the module docstring.

    `generator`: one for the whole batch, or one per output row (prompt-major, num_prompts *
    group_size of them), each row drawing only from its own while it runs.

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
            tokens, token_logprobs = sample_tokens(logits, config, row_generators(generator, rows), banned)
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
