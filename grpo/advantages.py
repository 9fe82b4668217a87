"""Group-relative advantages: how GRPO turns the rewards of G sampled completions into a signal.

The math
--------
Rewards come as a matrix ``r`` of shape [B, G]: B prompts (groups), G completions per prompt.
A reward is *scored* when it is finite; NaN (and +-inf) mean "unscored" (the reward could not be
computed) and never enter any statistic.  For group b with scored set S_b, n_b = |S_b|:

    mean_b = (1 / n_b) * sum_{j in S_b} r_bj
    std_b  = sqrt( sum_{j in S_b} (r_bj - mean_b)^2 / (n_b - 1) )        (unbiased sample std)

and for completion i of group b:

    scale = "group":  A_bi = (r_bi - mean_b) / (std_b     + eps)          (GRPO, DeepSeekMath)
    scale = "batch":  A_bi = (r_bi - mean_b) / (std_batch + eps)          (group mean, batch std)
    scale = "none":   A_bi =  r_bi - mean_b                               (Dr. GRPO)

where std_batch is the unbiased std of *all* scored rewards of the batch (every group together,
around the batch mean).  eps = 1e-4 is added to the std, outside the square root.

Three rules make a completion's advantage exactly 0 (it then contributes no policy gradient):

    1. its reward is unscored (not finite);
    2. its group has fewer than two scored completions (no spread to learn from);
    3. all scored rewards of its group are equal (a "zero-variance group").

Relation to Hugging Face TRL 1.16 (``GRPOTrainer._generate_and_score_completions`` with
``multi_objective_aggregation="sum_then_normalize"``): the same group mean (``nanmean``), the same
unbiased std that skips NaN (``nanstd``), the same ``std + 1e-4`` placement, the same batch-level
std (``nanstd`` of the whole batch) with a per-group mean, and NaN advantages turned into 0.
Deliberate deviations, all on degenerate inputs:

  * +-inf rewards are treated as unscored, like NaN.  TRL lets an infinite reward poison its
    group's mean and std (its advantages become NaN and then 0 for the whole group).
  * A zero-variance group gets exactly 0.  TRL computes (r - mean) / (0 + 1e-4), which is 0 only
    up to the rounding error of the mean (e.g. ~1e-13 for three rewards of 0.1).
  * Rule 2 under scale="batch" and "none": TRL gives a lone scored completion r - mean = 0 as
    well, so this only makes the rule explicit.
  * The statistics are computed in float64 (float32 on Apple MPS) and the advantages returned
    in float32, or in the rewards' dtype when wider; an advantage beyond the output dtype's
    range (rewards near 1e38) saturates to its largest finite value instead of inf.

Nothing here is learned or differentiable: the advantages are constants of the policy loss, so
the result is detached from any graph ``rewards`` may belong to.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

AdvantageScale = Literal["group", "batch", "none"]
ADVANTAGE_SCALES: tuple[str, ...] = ("group", "batch", "none")


def _as_reward_matrix(rewards: Tensor) -> Tensor:
    """Validate ``rewards`` as a [B, G] real matrix and return it detached."""
    if not isinstance(rewards, Tensor):
        try:
            rewards = torch.as_tensor(rewards)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"rewards must be a [B, G] tensor of numbers; got {type(rewards).__name__}") from error
    if rewards.dim() != 2:
        raise ValueError(
            f"rewards must have shape [B, G] (prompts x completions per prompt); got shape {tuple(rewards.shape)}"
        )
    if rewards.is_complex() or rewards.dtype == torch.bool:
        raise TypeError(f"rewards must be real numbers; got dtype {rewards.dtype}")
    return rewards.detach()


def _output_dtype(rewards: Tensor) -> torch.dtype:
    """float32, or the rewards' own dtype when wider."""
    return torch.promote_types(rewards.dtype, torch.float32) if rewards.is_floating_point() else torch.float32


def _statistics_dtype(rewards: Tensor) -> torch.dtype:
    """float64 wherever the device has it: rewards are a tiny [B, G] matrix, and float32 sums
    overflow or round on large or nearly equal rewards.  (Apple's MPS has no float64.)"""
    return torch.float32 if rewards.device.type == "mps" else torch.float64


def _group_statistics(rewards: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-group statistics over scored (finite) rewards.

    Returns (scored, count, mean, std, constant):
      scored   [B, G] bool  - the reward is finite
      count    [B, 1]       - number of scored rewards in the group
      mean     [B, 1]       - their mean (0 where count == 0)
      std      [B, 1]       - their unbiased std (0 where count < 2)
      constant [B, 1] bool  - the group has >= 2 scored rewards and all are equal
    """
    scored = torch.isfinite(rewards)
    count = scored.sum(dim=-1, keepdim=True).to(rewards.dtype)
    zeros = torch.zeros_like(rewards)
    mean = torch.where(scored, rewards, zeros).sum(dim=-1, keepdim=True) / count.clamp(min=1)
    centered = torch.where(scored, rewards - mean, zeros)
    variance = centered.square().sum(dim=-1, keepdim=True) / (count - 1).clamp(min=1)
    std = variance.sqrt()
    # Equality tested on the values themselves, not on std == 0: the rounding error of the mean
    # would otherwise leave a tiny std that eps does not fully absorb.
    if rewards.shape[-1] == 0:  # amax/amin refuse an empty dimension
        return scored, count, mean, std, count >= 2
    highest = torch.where(scored, rewards, torch.full_like(rewards, -math.inf)).amax(dim=-1, keepdim=True)
    lowest = torch.where(scored, rewards, torch.full_like(rewards, math.inf)).amin(dim=-1, keepdim=True)
    constant = (count >= 2) & (highest == lowest)
    return scored, count, mean, std, constant


def group_advantages(rewards: Tensor, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """Advantages [B, G] of rewards [B, G] (NaN or +-inf = unscored); see the module docstring.

    scale: "group" (divide by the group's std + eps), "batch" (by the batch's std + eps) or
    "none" (Dr. GRPO, no division).  Never returns NaN; unscored rewards, groups with fewer than
    two scored rewards and zero-variance groups get exactly 0.  The result is a new tensor of
    dtype float32 (or the rewards' dtype when wider) on the device of ``rewards``, which is
    not modified.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}; got {scale!r}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0; got {eps!r}")
    rewards = _as_reward_matrix(rewards)
    matrix = rewards.to(_statistics_dtype(rewards))
    scored, count, mean, group_std, constant = _group_statistics(matrix)

    centered = matrix - mean
    if scale == "group":
        scaled = centered / (group_std + eps)
    elif scale == "batch":
        all_scored = matrix[scored]
        # With fewer than two scored rewards in the batch, every group has fewer than two as
        # well, so the value of the batch std does not matter (rule 2 zeroes everything).
        batch_std = all_scored.std(correction=1) if all_scored.numel() >= 2 else matrix.new_zeros(())
        scaled = centered / (batch_std + eps)
    else:
        scaled = centered

    has_signal = scored & (count >= 2) & ~constant
    # torch.where also discards the inf/NaN that the unselected branch holds for unscored
    # rewards or a zero denominator (eps = 0).
    advantages = torch.where(has_signal, scaled, torch.zeros_like(scaled)).to(_output_dtype(rewards))
    # Only absurd rewards (beyond ~1e38 for float32 output) get here: saturate, never NaN.
    return torch.nan_to_num(advantages, nan=0.0)


def most_varied_groups(rewards: Tensor, keep: int) -> Tensor:
    """Indices (ascending) of the `keep` groups of rewards [B, G] whose scored rewards vary most.

    The ranking key is the group's unbiased std over its scored rewards (0 for a zero-variance
    group, -1 for a group with fewer than two scored rewards); ties go to the earlier group.  Used
    by GRPO's optional group selection (--oversample): a zero-variance group yields no gradient,
    and after the division by the group std a group whose rewards differ only a little pushes as
    hard as one whose completions differ in what the reward cares about most.  This generalises
    DAPO's dynamic sampling (drop groups whose rewards are all equal) to continuous rewards.
    """
    rewards = _as_reward_matrix(rewards)
    if not 0 <= keep <= rewards.shape[0]:
        raise ValueError(f"keep must be in [0, {rewards.shape[0]}] (the number of groups); got {keep}")
    key = torch.nan_to_num(group_reward_std(rewards), nan=-1.0)
    order = torch.sort(-key, stable=True).indices
    return order[:keep].sort().values


def group_reward_std(rewards: Tensor) -> Tensor:
    """Per-group unbiased std [B] of the scored rewards of rewards [B, G]: exactly 0 for a
    zero-variance group, NaN for a group with fewer than two scored rewards."""
    rewards = _as_reward_matrix(rewards)
    _scored, count, _mean, std, constant = _group_statistics(rewards.to(_statistics_dtype(rewards)))
    std = torch.where(constant, torch.zeros_like(std), std)
    return torch.where(count < 2, torch.full_like(std, math.nan), std).squeeze(-1)


def advantage_stats(rewards: Tensor) -> dict[str, float | int]:
    """Diagnostics of a reward matrix [B, G], as python floats for logging.

    zero_variance_group_share: share of the B groups with >= 2 scored rewards, all equal (they
        produce no gradient).  Always per group, whatever the advantage scale.  TRL's
        ``frac_reward_zero_std`` differs: it tests the std actually used (the batch std under
        scale="batch") with ``torch.isclose`` tolerance, and counts completions, not groups.
    few_scored_group_share: share of groups with fewer than two scored rewards (no gradient either).
    unscored_count: number of non-finite (NaN, +-inf) rewards (an int).
    reward_mean, reward_std: mean and unbiased std of all scored rewards (NaN when undefined:
        no scored reward for the mean, fewer than two for the std, as TRL's nanmean/nanstd).
    """
    rewards = _as_reward_matrix(rewards)
    matrix = rewards.to(_statistics_dtype(rewards))
    scored, count, _mean, _std, constant = _group_statistics(matrix)
    num_groups = matrix.shape[0]
    all_scored = matrix[scored]
    return {
        "zero_variance_group_share": constant.sum().item() / num_groups if num_groups else 0.0,
        "few_scored_group_share": (count < 2).sum().item() / num_groups if num_groups else 0.0,
        "unscored_count": int((~scored).sum().item()),
        "reward_mean": all_scored.mean().item() if all_scored.numel() >= 1 else math.nan,
        "reward_std": all_scored.std(correction=1).item() if all_scored.numel() >= 2 else math.nan,
    }
