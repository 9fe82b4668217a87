"""The SFT loss: token-mean cross-entropy over the loss mask, normalised per optimizer step.

    L = - sum_{micro-batches m} sum_{tokens t in m, mask=1} log p(x_t | x_<t)  /  (mask tokens in the whole step)

so `grad_accum` micro-batches (and N ranks) give exactly the gradient of one large batch.  Only the
hidden states of masked positions are projected onto the vocabulary (no [N, L, V] logits tensor).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F

from grpo import distributed
from grpo.distributed import SINGLE, Distributed
from grpo.hf_compat import PLAIN_HEAD_MODEL_TYPES, causal_lm_of
from grpo.policy import Policy, pad_token_id
from sft.flags import SFTConfig


def masked_nll_sum(model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
    """(sum of -log p over loss-mask tokens, their count) for a right-padded `data.batching.Batch`.

    Token t is predicted from position t-1, so the mask is shifted by one.
    """
    target_mask = batch.loss_mask[:, 1:].bool()
    targets = batch.input_ids[:, 1:][target_mask]  # [K]
    count = int(target_mask.sum())
    causal_lm = causal_lm_of(model)
    if getattr(causal_lm.config, "model_type", None) in PLAIN_HEAD_MODEL_TYPES:
        hidden = causal_lm.get_decoder()(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False,
        ).last_hidden_state
        logits = causal_lm.get_output_embeddings()(hidden[:, :-1][target_mask])  # [K, V]
    else:  # unknown head: let the model compute its logits
        logits = causal_lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids, use_cache=False).logits[:, :-1][target_mask]
    return F.cross_entropy(logits.float(), targets, reduction="sum"), count


def step_loss_tokens(batches: list[Any]) -> int:
    """Loss tokens of micro-`batches` (the mask shifted by one, as masked_nll_sum counts them)."""
    return sum(int(batch.loss_mask[:, 1:].sum()) for batch in batches)


def accumulate_gradients(model: torch.nn.Module, batches: list[Any], device: torch.device, *,
                         normaliser: int | None = None) -> tuple[float, int]:
    """Backward the loss of one optimizer step made of micro-`batches`; returns (loss, normaliser T).

        L = sum_m masked_nll_sum(m) / T,   T = loss tokens of *all* micro-batches of the step

    Each micro-batch's backward adds d(nll_m / T) to the gradients already in `.grad`, so any
    split of the same samples into micro-batches gives the gradient of one large batch (dividing
    each micro-batch by its own token count and averaging would weight short ones up).
    `normaliser` overrides T (a distributed step passes the loss tokens of every rank).
    """
    step_tokens = step_loss_tokens(batches) if normaliser is None else normaliser  # the step's normaliser
    step_loss = 0.0
    for batch in batches:
        nll, _ = masked_nll_sum(model, _to_device(batch, device))
        loss = nll / max(step_tokens, 1)
        loss.backward()
        step_loss += float(loss.detach())
    return step_loss, step_tokens



@torch.no_grad()
def validation_loss(policy: Policy, data: list[Any], config: SFTConfig, device: torch.device,
                    context: Distributed = SINGLE) -> float | None:
    """Token-mean NLL of the held-out samples; ranks take every world_size-th chunk and sum.

    Under FSDP every rank runs as many forward passes (their collectives must pair up): a rank
    out of chunks repeats its first one and discards the result.
    """
    from data.batching import collate

    if not data:
        return None
    policy.model.eval()
    sharded = bool(distributed.fsdp_modules(policy.model))
    size = config.micro_batch * 4
    chunks = [data[start:start + size] for start in range(0, len(data), size)]
    rounds = math.ceil(len(chunks) / context.world_size)
    total, count = 0.0, 0
    for round_index in range(rounds):
        index = round_index * context.world_size + context.rank
        if index >= len(chunks) and not sharded:
            break
        batch = _to_device(collate(chunks[min(index, len(chunks) - 1)], pad_token_id(policy.tokenizer)), device)
        nll, tokens = masked_nll_sum(policy.model, batch)
        if index < len(chunks):
            total, count = total + float(nll), count + tokens
    policy.model.train()
    sums = distributed.all_reduce_numbers(context, {"total": total, "count": count})
    return sums["total"] / max(sums["count"], 1)


def _to_device(batch: Any, device: torch.device) -> Any:
    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name).to(device) for f in dataclasses.fields(batch)})

