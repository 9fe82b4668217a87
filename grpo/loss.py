"""The GRPO policy loss: a clipped surrogate on completion tokens, optional k3 KL, four normalisers.

The math
--------
N sequences (completions), each with T token positions; ``mask[i, t]`` is 1 on the tokens the loss
is taken on (the policy's own completion tokens) and 0 on padding.  For token t of sequence i:

    rho_it  = exp(logp_it - logp_old_it)                                 (importance ratio)
    KL_it   = exp(ref_it - logp_it) - (ref_it - logp_it) - 1             (k3 estimator, >= 0)
    l_it    = -min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i) + beta KL_it

A_i is the sequence's advantage (``grpo.advantages``), shared by all its tokens.  With
``old_logprobs=None`` (one gradient step per rollout, mu = 1), logp_old = logp.detach(): rho = 1
in value, and the gradient is the plain policy gradient -A_i * d logp_it.  eps_high defaults to
eps_low (symmetric clipping; DAPO's "clip higher" sets it larger).

The loss of one call is L = sum_{i,t} mask_it l_it / D_i, with n_i = sum_t mask_it and:

    "grpo"    : D_i = max(n_i, 1) * S      mean over each sequence's tokens, then over sequences
    "bnpo"    : D_i = M                    mean over all tokens of the batch (the optimizer step)
    "dr_grpo" : D_i = S * L_max            Dr. GRPO: a constant, no length normalisation
    "dapo"    : D_i = M                    DAPO: token mean over the whole optimizer step

S = ``num_sequences`` (default N), L_max = ``max_completion_length`` (default T), M = ``num_items``
(default max(sum_i n_i, 1)).  The trainer splits one optimizer step into micro-batches and sums
their gradients; passing the step's totals as S (grpo, dr_grpo) and M (bnpo, dapo), and the same
L_max to every micro-batch, makes the summed losses and gradients equal those of one call on the
whole step, for micro-batches of any sizes.  So "bnpo" (the batch's token mean) equals "dapo"
here: the batch is the whole optimizer step.  TRL's "bnpo" divides by the tokens of each
accumulation micro-batch instead, and so changes with the micro-batch size; ours does not.

A sequence whose mask is all zero (a zero-length completion) contributes 0 to the numerator and
still counts in S, so it dilutes "grpo" and "dr_grpo" exactly as TRL does; it never yields NaN.
Masked positions never reach the arithmetic: their log-ratios are replaced by 0 before the exp,
so garbage there (padding log-probs of -inf or NaN) gives neither NaN nor gradient.

Metrics (python floats, computed without gradient, token means over this call's mask):
``clip_ratio_low`` (rho < 1 - eps_low with A < 0: the ratio is held up), ``clip_ratio_high``
(rho > 1 + eps_high with A > 0), ``clip_ratio`` (either: tokens whose gradient is cut),
``ratio_mean``, ``kl_mean`` (only when beta > 0), and ``num_tokens`` (sum of the mask).

Relation to the papers
----------------------
"grpo" is DeepSeekMath's GRPO objective, 1/G sum_i 1/|o_i| sum_t (...), with the KL inside the
per-sequence token mean as there and the same k3 estimator, averaged over the step's prompts too.
"dr_grpo" and "dapo" are the aggregations of the Dr. GRPO and DAPO papers; eps_high is DAPO's
"clip higher".  The paper this project reproduces (Rawat et al.) uses beta = 0 and eps = 0.2.

Relation to Hugging Face TRL 1.16 (``GRPOTrainer._compute_loss``)
-----------------------------------------------------------------
The per-token term, the k3 KL without importance correction (TRL's default
``use_bias_correction_kl=False``), the four aggregations and the clip metrics equal TRL's.
Deviations:

  * Accumulation: TRL divides "grpo", "bnpo" and "dr_grpo" by the number of accumulation steps,
    which equals one large batch only when every micro-batch holds the same number of sequences;
    ``num_sequences`` makes it exact for any split.  TRL's "dapo" normaliser is
    ``num_items_in_batch`` (the loss tokens of the generation batch), which is ``num_items`` here.
  * Garbage on masked positions cannot produce NaN here (TRL multiplies by the mask, so an inf
    log-prob on padding would).
  * No sequence-level importance sampling (GSPO), no two-sided ``delta`` clipping, no entropy
    masking, no vLLM importance correction, no other loss types: one GRPO with the flags above.
  * Computation is in float32 or wider (bf16 log-probs are upcast), for a stable exp and min.
"""

from __future__ import annotations

import math
import numbers
from typing import Literal

import torch
from torch import Tensor

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo")


def _check_token_matrix(name: str, value: Tensor | None, shape: torch.Size) -> None:
    """Raise a clear error unless ``value`` is a floating tensor of the given [N, T] shape."""
    if value is None:
        return
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [N, T]; got {type(value).__name__}")
    if value.shape != shape:
        raise ValueError(f"{name} must have the shape of logprobs {tuple(shape)} ([N, T]); got {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor (log-probabilities); got dtype {value.dtype}")


def _check_arguments(
    logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    old_logprobs: Tensor | None,
    ref_logprobs: Tensor | None,
    beta: float,
    epsilon_low: float,
    epsilon_high: float,
    loss_type: str,
    max_completion_length: int | None,
    num_items: float | None,
    num_sequences: int | None,
) -> None:
    """Validate every argument of ``policy_loss`` before any arithmetic, naming the bad one."""
    if not isinstance(logprobs, Tensor) or logprobs.dim() != 2:
        shape = tuple(logprobs.shape) if isinstance(logprobs, Tensor) else type(logprobs).__name__
        raise ValueError(f"logprobs must be a tensor of shape [N, T]; got {shape}")
    _check_token_matrix("logprobs", logprobs, logprobs.shape)
    _check_token_matrix("old_logprobs", old_logprobs, logprobs.shape)
    _check_token_matrix("ref_logprobs", ref_logprobs, logprobs.shape)
    if not isinstance(mask, Tensor) or mask.shape != logprobs.shape:
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must have the shape of logprobs {tuple(logprobs.shape)} ([N, T]); got {shape}")
    if mask.numel() and not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask must hold only 0 and 1 (1 = a loss token)")
    num_rows = logprobs.shape[0]
    if not isinstance(advantages, Tensor) or advantages.shape != (num_rows,):
        shape = tuple(advantages.shape) if isinstance(advantages, Tensor) else type(advantages).__name__
        raise ValueError(f"advantages must have shape [N] = ({num_rows},), one per sequence; got {shape}")
    if advantages.numel():
        non_finite = (~torch.isfinite(advantages)).nonzero().flatten()
        if non_finite.numel():
            raise ValueError(f"advantages must be finite; rows {non_finite.tolist()[:10]} are not")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}; got {loss_type!r}")
    if not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta must be a finite number >= 0; got {beta!r}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError(f"beta = {beta} > 0 needs ref_logprobs (the reference policy's log-probs)")
    if not (math.isfinite(epsilon_low) and 0 <= epsilon_low < 1):
        raise ValueError(f"epsilon_low must be in [0, 1); got {epsilon_low!r}")
    if not (math.isfinite(epsilon_high) and epsilon_high >= 0):
        raise ValueError(f"epsilon_high must be a finite number >= 0; got {epsilon_high!r}")
    if max_completion_length is not None and not (
        isinstance(max_completion_length, numbers.Integral) and max_completion_length >= 1
    ):
        raise ValueError(f"max_completion_length must be an int >= 1; got {max_completion_length!r}")
    if num_items is not None and not (math.isfinite(float(num_items)) and float(num_items) > 0):
        raise ValueError(f"num_items must be > 0 (the loss-token count of the optimizer step); got {num_items!r}")
    if num_sequences is not None and not (isinstance(num_sequences, numbers.Integral) and num_sequences >= 1):
        raise ValueError(f"num_sequences must be an int >= 1 (sequences in the optimizer step); got {num_sequences!r}")


def policy_loss(
    logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    num_items: float | None = None,
    num_sequences: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The GRPO loss of one (micro-)batch and its metrics; see the module docstring for the math.

    logprobs [N, T]: the current policy's log-probs of the sampled tokens (with gradient).
    advantages [N]: one advantage per sequence.  mask [N, T]: 1 on loss tokens, 0 elsewhere.
    old_logprobs [N, T]: the sampling policy's log-probs (None: logprobs.detach(), on-policy).
    ref_logprobs [N, T]: the reference policy's log-probs, needed when beta > 0.
    max_completion_length: L_max of "dr_grpo" (default T; pass the generation budget so every
        micro-batch uses the same one).  num_items: the loss tokens of the whole optimizer step
        for "dapo".  num_sequences: the sequences of the whole optimizer step for "grpo" and
        "dr_grpo".  Each is ignored by the loss types that do not use it.

    Returns (loss, metrics): a scalar tensor in float32 or wider, and python floats.  The inputs
    are not modified.
    """
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    _check_arguments(
        logprobs, advantages, mask, old_logprobs, ref_logprobs, beta, epsilon_low, epsilon_high,
        loss_type, max_completion_length, num_items, num_sequences,
    )
    num_rows, num_positions = logprobs.shape
    work_dtype = torch.promote_types(logprobs.dtype, torch.float32)
    logprobs = logprobs.to(work_dtype)
    old_logprobs = logprobs.detach() if old_logprobs is None else old_logprobs.detach().to(work_dtype)
    is_token = mask.to(torch.bool)
    token_weight = is_token.to(work_dtype)
    zeros = torch.zeros_like(logprobs)
    advantage = advantages.detach().to(device=logprobs.device, dtype=work_dtype).unsqueeze(1)  # [N, 1]

    # Zero the log-ratio off the mask before exp: padding may hold -inf/NaN, and exp(inf) * 0
    # would be NaN in both the value and the gradient.
    log_ratio = torch.where(is_token, logprobs - old_logprobs, zeros)
    ratio = torch.exp(log_ratio)
    clipped_ratio = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    per_token_loss = -torch.minimum(ratio * advantage, clipped_ratio * advantage)
    per_token_kl = None
    if beta > 0:
        ref_minus_policy = torch.where(is_token, ref_logprobs.detach().to(work_dtype) - logprobs, zeros)
        per_token_kl = torch.exp(ref_minus_policy) - ref_minus_policy - 1.0
        per_token_loss = per_token_loss + beta * per_token_kl
    per_token_loss = torch.where(is_token, per_token_loss, zeros)

    tokens_per_row = token_weight.sum(dim=1)  # [N]
    tokens_in_call = tokens_per_row.sum()
    sequences_in_step = num_rows if num_sequences is None else num_sequences
    if loss_type == "grpo":
        per_sequence_mean = per_token_loss.sum(dim=1) / tokens_per_row.clamp(min=1.0)
        loss = per_sequence_mean.sum() / max(int(sequences_in_step), 1)
    elif loss_type == "dr_grpo":
        length_budget = num_positions if max_completion_length is None else max_completion_length
        longest = int(tokens_per_row.max().item()) if num_rows else 0
        if longest > length_budget:
            raise ValueError(
                f"dr_grpo: a sequence has {longest} loss tokens, more than max_completion_length = "
                f"{length_budget}; pass the generation budget as max_completion_length"
            )
        loss = per_token_loss.sum() / (max(int(sequences_in_step), 1) * max(int(length_budget), 1))
    else:  # "dapo", "bnpo": the token mean of the whole step
        step_tokens = tokens_in_call.clamp(min=1.0) if num_items is None else float(num_items)
        loss = per_token_loss.sum() / step_tokens

    metrics = _metrics(ratio, advantage, token_weight, per_token_kl, epsilon_low, epsilon_high)
    return loss, metrics


@torch.no_grad()
def _metrics(
    ratio: Tensor,
    advantage: Tensor,
    token_weight: Tensor,
    per_token_kl: Tensor | None,
    epsilon_low: float,
    epsilon_high: float,
) -> dict[str, float]:
    """Token means over the mask of the clip indicators, the ratio and the KL (see module docstring)."""
    num_tokens = token_weight.sum()
    denominator = num_tokens.clamp(min=1.0)

    def token_mean(values: Tensor) -> float:
        return ((values.to(token_weight.dtype) * token_weight).sum() / denominator).item()

    clipped_low = (ratio < 1.0 - epsilon_low) & (advantage < 0)
    clipped_high = (ratio > 1.0 + epsilon_high) & (advantage > 0)
    metrics = {
        "clip_ratio_low": token_mean(clipped_low),
        "clip_ratio_high": token_mean(clipped_high),
        "clip_ratio": token_mean(clipped_low | clipped_high),
        "ratio_mean": token_mean(ratio),
        "num_tokens": num_tokens.item(),
    }
    if per_token_kl is not None:
        metrics["kl_mean"] = token_mean(per_token_kl)
    return metrics
