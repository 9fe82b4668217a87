"""grpo.advantages: hand-computed groups, TRL 1.16's formula, and properties (hypothesis)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grpo.advantages import advantage_stats, group_advantages, most_varied_groups

NAN = float("nan")
INF = float("inf")


def sample_std(values: list[float]) -> float:
    """Unbiased sample std, written out."""
    mean = sum(values) / len(values)
    return math.sqrt(sum((value - mean) ** 2 for value in values) / (len(values) - 1))


# --- by hand -------------------------------------------------------------------------------


def test_group_scale_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    # group 0: mean 2.5, unbiased std sqrt((2.25 + 0.25 + 0.25 + 2.25) / 3) = sqrt(5/3)
    std0 = math.sqrt(5.0 / 3.0)
    # group 1: mean 0.25, unbiased std sqrt((3 * 0.0625 + 0.5625) / 3) = sqrt(0.25) = 0.5
    std1 = 0.5
    expected = torch.tensor(
        [
            [-1.5 / (std0 + 1e-4), -0.5 / (std0 + 1e-4), 0.5 / (std0 + 1e-4), 1.5 / (std0 + 1e-4)],
            [-0.25 / (std1 + 1e-4), -0.25 / (std1 + 1e-4), 0.75 / (std1 + 1e-4), -0.25 / (std1 + 1e-4)],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(group_advantages(rewards), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(group_advantages(rewards, scale="group", eps=0.0)[1, 2], torch.tensor(1.5, dtype=torch.float64))


def test_batch_scale_uses_group_mean_and_batch_std():
    rewards = torch.tensor([[0.0, 1.0], [2.0, 6.0]], dtype=torch.float64)
    # all rewards: mean 2.25; squared deviations 5.0625 + 1.5625 + 0.0625 + 14.0625 = 20.75
    batch_std = math.sqrt(20.75 / 3.0)
    expected = torch.tensor(
        [[-0.5, 0.5], [-2.0, 2.0]], dtype=torch.float64
    ) / (batch_std + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, scale="batch"), expected, rtol=0, atol=1e-12)


def test_none_scale_is_dr_grpo_centering():
    rewards = torch.tensor([[3.0, 1.0, 2.0], [10.0, -10.0, 3.0]])
    expected = torch.tensor([[1.0, -1.0, 0.0], [9.0, -11.0, 2.0]])
    torch.testing.assert_close(group_advantages(rewards, scale="none"), expected)


def test_nan_rewards_are_left_out_and_get_zero():
    rewards = torch.tensor([[1.0, NAN, 3.0, 5.0]], dtype=torch.float64)
    # scored 1, 3, 5: mean 3, unbiased std 2
    expected = torch.tensor([[-2.0 / (2.0 + 1e-4), 0.0, 0.0, 2.0 / (2.0 + 1e-4)]], dtype=torch.float64)
    torch.testing.assert_close(group_advantages(rewards), expected, rtol=0, atol=1e-12)


def test_batch_std_skips_unscored_rewards():
    rewards = torch.tensor([[0.0, NAN, 1.0], [2.0, 6.0, INF]], dtype=torch.float64)
    batch_std = sample_std([0.0, 1.0, 2.0, 6.0])
    expected = torch.tensor([[-0.5, 0.0, 0.5], [-2.0, 2.0, 0.0]], dtype=torch.float64) / (batch_std + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, scale="batch"), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_infinite_rewards_are_unscored(scale):
    with_inf = torch.tensor([[1.0, INF, 3.0, -INF, 2.0], [0.0, 1.0, 0.5, 2.0, 4.0]])
    with_nan = torch.where(torch.isinf(with_inf), torch.full_like(with_inf, NAN), with_inf)
    advantages = group_advantages(with_inf, scale=scale)
    torch.testing.assert_close(advantages, group_advantages(with_nan, scale=scale))
    assert advantages[0, 1] == 0 and advantages[0, 3] == 0
    assert torch.isfinite(advantages).all()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_one_scored_completion_and_all_unscored_groups_get_zero(scale):
    rewards = torch.tensor([[NAN, 7.0, NAN], [NAN, NAN, NAN], [1.0, 2.0, 4.0]])
    advantages = group_advantages(rewards, scale=scale)
    assert torch.equal(advantages[:2], torch.zeros(2, 3))
    assert (advantages[2] != 0).all()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_zero_variance_group_is_exactly_zero(scale):
    # 0.1 * 3 / 3 != 0.1 in floating point: a naive (r - mean) / (std + eps) is ~1e-13, not 0.
    rewards = torch.tensor([[0.1, 0.1, 0.1], [0.0, 1.0, 2.0], [0.7, NAN, 0.7]], dtype=torch.float64)
    advantages = group_advantages(rewards, scale=scale)
    assert torch.equal(advantages[0], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(advantages[2], torch.zeros(3, dtype=torch.float64))


def test_single_completion_groups_and_empty_inputs():
    assert torch.equal(group_advantages(torch.tensor([[1.0], [2.0]])), torch.zeros(2, 1))
    assert group_advantages(torch.zeros(0, 4)).shape == (0, 4)
    assert group_advantages(torch.zeros(3, 0)).shape == (3, 0)


def test_dtype_device_and_inputs_untouched():
    rewards = torch.tensor([[1, 2, 3]], dtype=torch.int64)
    assert group_advantages(rewards).dtype == torch.float32
    half = torch.tensor([[1.0, 2.0, NAN]], dtype=torch.bfloat16)
    assert group_advantages(half).dtype == torch.float32
    original = torch.tensor([[1.0, NAN, 3.0]], requires_grad=True)
    snapshot = original.detach().clone()
    advantages = group_advantages(original)
    assert not advantages.requires_grad
    assert torch.equal(original.detach().isnan(), snapshot.isnan())
    assert torch.equal(original.detach().nan_to_num(), snapshot.nan_to_num())


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(2, 2), scale="global")
    with pytest.raises(ValueError, match=r"\[B, G\]"):
        group_advantages(torch.zeros(8))
    with pytest.raises(ValueError, match="eps"):
        group_advantages(torch.zeros(2, 2), eps=-1.0)
    with pytest.raises(TypeError, match="rewards"):
        group_advantages(object())


def test_most_varied_groups_by_hand():
    rewards = torch.tensor([
        [1.0, 1.0, 1.0, 1.0],  # zero variance: key 0
        [0.0, 2.0, 0.0, 2.0],  # std 1.155
        [0.0, 1.0, 0.0, 1.0],  # std 0.577
        [math.nan, 1.0, math.nan, math.nan],  # one scored reward: key -1
        [0.0, 0.0, 0.0, 3.0],  # std 1.5
    ])
    assert most_varied_groups(rewards, 2).tolist() == [1, 4]
    assert most_varied_groups(rewards, 4).tolist() == [0, 1, 2, 4]
    assert most_varied_groups(rewards, 5).tolist() == [0, 1, 2, 3, 4]
    assert most_varied_groups(rewards, 0).tolist() == []
    ties = torch.tensor([[0.0, 1.0], [5.0, 6.0], [2.0, 3.0]])
    assert most_varied_groups(ties, 2).tolist() == [0, 1]  # equal spread: the earlier groups
    with pytest.raises(ValueError, match="keep must be in"):
        most_varied_groups(rewards, 6)


def test_advantage_stats_by_hand():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 2.0, NAN], [5.0, NAN, INF], [3.0, 3.0, 4.0]])
    stats = advantage_stats(rewards)
    scored = [1.0, 1.0, 1.0, 0.0, 2.0, 5.0, 3.0, 3.0, 4.0]
    assert stats["zero_variance_group_share"] == pytest.approx(0.25)
    assert stats["few_scored_group_share"] == pytest.approx(0.25)
    assert stats["unscored_count"] == 3
    assert stats["reward_mean"] == pytest.approx(sum(scored) / len(scored))
    assert stats["reward_std"] == pytest.approx(sample_std(scored), rel=1e-6)
    assert all(isinstance(value, (float, int)) for value in stats.values())


def test_advantage_stats_undefined_moments_are_nan():
    stats = advantage_stats(torch.tensor([[NAN, NAN]]))
    assert math.isnan(stats["reward_mean"]) and math.isnan(stats["reward_std"])
    assert stats["unscored_count"] == 2 and stats["few_scored_group_share"] == 1.0


# --- TRL 1.16's formula, re-derived (GRPOTrainer, sum_then_normalize) -----------------------


def trl_1_16_advantages(rewards: torch.Tensor, scale: str) -> torch.Tensor:
    """TRL 1.16: nanmean per group, nanstd (Bessel, NaN below two values), std + 1e-4, nan -> 0."""

    def nanstd(values: torch.Tensor, dim=None) -> torch.Tensor:
        mean = torch.nanmean(values, dim=dim, keepdim=True)
        variance = torch.nanmean((values - mean) ** 2, dim=dim, keepdim=True)
        count = (~torch.isnan(values)).sum(dim=dim, keepdim=True).to(values.dtype)
        correction = torch.where(count > 1, count / (count - 1), torch.full_like(variance, NAN))
        return (variance * correction).sqrt()

    mean = torch.nanmean(rewards, dim=1, keepdim=True)
    std = nanstd(rewards, dim=1) if scale != "batch" else nanstd(rewards.flatten()).reshape(1, 1)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


reward_values = st.one_of(
    st.integers(-8, 8).map(lambda value: value / 4.0),  # exact in binary: equal values stay equal
    st.just(NAN),
)


@st.composite
def reward_matrices(draw, max_groups: int = 5, max_group_size: int = 6):
    groups = draw(st.integers(1, max_groups))
    group_size = draw(st.integers(1, max_group_size))
    rows = [[draw(reward_values) for _ in range(group_size)] for _ in range(groups)]
    return torch.tensor(rows, dtype=torch.float64)


@settings(max_examples=150, deadline=None)
@given(rewards=reward_matrices(), scale=st.sampled_from(["group", "batch", "none"]))
def test_equals_trl_1_16_on_nan_rewards(rewards, scale):
    # Differences only where TRL leaves rounding noise in zero-variance groups (forced to 0 here).
    torch.testing.assert_close(group_advantages(rewards, scale=scale), trl_1_16_advantages(rewards, scale), rtol=0, atol=1e-9)


# --- properties ------------------------------------------------------------------------------


def reference_row(values: list[float], scale: str, batch_std: float, eps: float) -> list[float]:
    """Advantages of one group written as the definition reads, unscored values skipped."""
    scored = [value for value in values if math.isfinite(value)]
    if len(scored) < 2 or max(scored) == min(scored):
        return [0.0] * len(values)
    mean = sum(scored) / len(scored)
    denominator = {"group": sample_std(scored) + eps, "batch": batch_std + eps, "none": 1.0}[scale]
    return [(value - mean) / denominator if math.isfinite(value) else 0.0 for value in values]


@settings(max_examples=150, deadline=None)
@given(rewards=reward_matrices(), scale=st.sampled_from(["group", "batch", "none"]))
def test_matches_definition_row_by_row(rewards, scale):
    all_scored = [value for value in rewards.flatten().tolist() if math.isfinite(value)]
    batch_std = sample_std(all_scored) if len(all_scored) >= 2 else 0.0
    expected = torch.tensor(
        [reference_row(row, scale, batch_std, 1e-4) for row in rewards.tolist()], dtype=torch.float64
    )
    advantages = group_advantages(rewards, scale=scale)
    assert advantages.shape == rewards.shape
    assert torch.isfinite(advantages).all()
    torch.testing.assert_close(advantages, expected, rtol=0, atol=1e-9)


@settings(max_examples=150, deadline=None)
@given(rewards=reward_matrices(), scale=st.sampled_from(["group", "none"]), data=st.data())
def test_shift_invariance_per_group(rewards, scale, data):
    shifts = torch.tensor(
        [[float(data.draw(st.integers(-100, 100)))] for _ in range(rewards.shape[0])], dtype=torch.float64
    )
    torch.testing.assert_close(
        group_advantages(rewards + shifts, scale=scale), group_advantages(rewards, scale=scale), rtol=0, atol=1e-9
    )


@settings(max_examples=100, deadline=None)
@given(rewards=reward_matrices(), shift=st.integers(-100, 100))
def test_batch_scale_is_invariant_to_one_shift_of_the_batch(rewards, shift):
    torch.testing.assert_close(
        group_advantages(rewards + shift, scale="batch"), group_advantages(rewards, scale="batch"), rtol=0, atol=1e-9
    )


@settings(max_examples=150, deadline=None)
@given(rewards=reward_matrices(), factor=st.sampled_from([0.5, 2.0, 8.0, 1000.0]), scale=st.sampled_from(["group", "batch"]))
def test_scale_invariance_without_eps(rewards, factor, scale):
    # eps breaks exact scale invariance (it is a fixed offset on the std), so test with eps = 0.
    torch.testing.assert_close(
        group_advantages(rewards * factor, scale=scale, eps=0.0),
        group_advantages(rewards, scale=scale, eps=0.0),
        rtol=1e-9,
        atol=1e-9,
    )


@settings(max_examples=100, deadline=None)
@given(rewards=reward_matrices(), factor=st.sampled_from([0.5, 2.0, 8.0]))
def test_none_scale_is_linear(rewards, factor):
    torch.testing.assert_close(
        group_advantages(rewards * factor, scale="none"), factor * group_advantages(rewards, scale="none"), rtol=0, atol=1e-9
    )


@settings(max_examples=150, deadline=None)
@given(rewards=reward_matrices(), scale=st.sampled_from(["group", "batch", "none"]))
def test_scored_advantages_sum_to_zero_and_unit_std(rewards, scale):
    advantages = group_advantages(rewards, scale=scale, eps=0.0)
    assert torch.equal(advantages[torch.isnan(rewards)], torch.zeros_like(advantages[torch.isnan(rewards)]))
    for row_rewards, row_advantages in zip(rewards, advantages):
        scored = torch.isfinite(row_rewards)
        assert abs(row_advantages[scored].sum().item()) < 1e-9
        informative = scored.sum() >= 2 and row_rewards[scored].unique().numel() > 1
        if scale == "group" and informative:
            assert row_advantages[scored].std(correction=1).item() == pytest.approx(1.0, rel=1e-9)
        if not informative:
            assert torch.equal(row_advantages, torch.zeros_like(row_advantages))


@settings(max_examples=100, deadline=None)
@given(
    rewards=st.lists(
        st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=6),
        min_size=1,
        max_size=4,
    ).filter(lambda rows: len({len(row) for row in rows}) == 1),
    scale=st.sampled_from(["group", "batch", "none"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_never_nan_on_arbitrary_floats(rewards, scale, dtype):
    advantages = group_advantages(torch.tensor(rewards, dtype=dtype), scale=scale)
    assert advantages.shape == (len(rewards), len(rewards[0]))
    assert advantages.dtype == dtype
    assert not torch.isnan(advantages).any()


def test_huge_float32_rewards_do_not_overflow_the_statistics():
    # float32 sums would overflow here (3e38 + 3e38 = inf) and give NaN; float64 statistics do not.
    rewards = torch.tensor([[3e38, 3e38, -3e38]], dtype=torch.float32)
    expected = torch.tensor([[1.0, 1.0, -2.0]]) / math.sqrt(3.0)
    torch.testing.assert_close(group_advantages(rewards, eps=0.0), expected)
    saturated = group_advantages(rewards, scale="none")  # 4e38 is past float32's range
    assert torch.isfinite(saturated).all() and saturated[0, 2] == torch.finfo(torch.float32).min
