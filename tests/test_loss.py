"""grpo.loss.policy_loss: values by hand, gradients against a naive per-token loop, accumulation."""

from __future__ import annotations

import math

import pytest
import torch

from grpo.loss import LOSS_TYPES, policy_loss

NAN = float("nan")
INF = float("inf")


# --- a tiny example with hand-picked ratios --------------------------------------------------
#
# Two sequences, three positions; the second has two tokens.  Ratios rho = exp(logp - old):
#   sequence 0, A = +1:  rho = 1.5 (clipped high: min(1.5, 1.2) = 1.2), 0.5 (min(0.5, 0.8) = 0.5), 1.1
#   sequence 1, A = -2:  rho = 0.5 (clipped low: min(-1.0, -1.6) = -1.6), 1.5 (min(-3.0, -2.4) = -3.0), pad
# Per-token losses -min(...): [-1.2, -0.5, -1.1] and [1.6, 3.0]; sums -2.8 and 4.6; 5 tokens.

RATIOS = [[1.5, 0.5, 1.1], [0.5, 1.5, 1.0]]


def tiny_example(dtype=torch.float64):
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -4.0]], dtype=dtype)
    old_logprobs = logprobs - torch.log(torch.tensor(RATIOS, dtype=dtype))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages = torch.tensor([1.0, -2.0], dtype=dtype)
    return logprobs, advantages, mask, old_logprobs


@pytest.mark.parametrize(
    "loss_type, options, expected",
    [
        ("grpo", {}, (-2.8 / 3 + 4.6 / 2) / 2),
        ("grpo", {"num_sequences": 4}, (-2.8 / 3 + 4.6 / 2) / 4),
        ("bnpo", {}, (-2.8 + 4.6) / 5),
        ("bnpo", {"num_items": 9}, (-2.8 + 4.6) / 9),  # the step's tokens: the same as dapo
        ("dr_grpo", {}, (-2.8 + 4.6) / (2 * 3)),
        ("dr_grpo", {"max_completion_length": 4, "num_sequences": 3}, (-2.8 + 4.6) / (3 * 4)),
        ("dapo", {}, (-2.8 + 4.6) / 5),
        ("dapo", {"num_items": 9}, (-2.8 + 4.6) / 9),
    ],
)
def test_loss_by_hand(loss_type, options, expected):
    logprobs, advantages, mask, old_logprobs = tiny_example()
    loss, metrics = policy_loss(logprobs, advantages, mask, old_logprobs=old_logprobs, loss_type=loss_type, **options)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert metrics["clip_ratio_low"] == pytest.approx(1 / 5)
    assert metrics["clip_ratio_high"] == pytest.approx(1 / 5)
    assert metrics["clip_ratio"] == pytest.approx(2 / 5)
    assert metrics["ratio_mean"] == pytest.approx((1.5 + 0.5 + 1.1 + 0.5 + 1.5) / 5)
    assert metrics["num_tokens"] == 5
    assert "kl_mean" not in metrics
    assert all(isinstance(value, float) for value in metrics.values())


def test_kl_term_by_hand():
    logprobs, advantages, mask, old_logprobs = tiny_example()
    ref_logprobs = logprobs + 0.5  # ref - logp = 0.5 on every token
    kl = math.exp(0.5) - 0.5 - 1.0
    loss, metrics = policy_loss(
        logprobs, advantages, mask, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, beta=0.1
    )
    assert loss.item() == pytest.approx((-2.8 / 3 + 4.6 / 2) / 2 + 0.1 * kl, rel=1e-12)
    assert metrics["kl_mean"] == pytest.approx(kl)
    # beta = 0 ignores the reference entirely, as TRL does
    loss_without, metrics_without = policy_loss(logprobs, advantages, mask, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs)
    assert loss_without.item() == pytest.approx((-2.8 / 3 + 4.6 / 2) / 2, rel=1e-12)
    assert "kl_mean" not in metrics_without


def test_clip_higher_is_asymmetric():
    # eps_high = 0.6 no longer clips rho = 1.5 with A > 0: that token now costs -1.5 instead of -1.2.
    logprobs, advantages, mask, old_logprobs = tiny_example()
    loss, metrics = policy_loss(
        logprobs, advantages, mask, old_logprobs=old_logprobs, epsilon_high=0.6, loss_type="bnpo"
    )
    assert loss.item() == pytest.approx((-1.5 - 0.5 - 1.1 + 1.6 + 3.0) / 5, rel=1e-12)
    assert metrics["clip_ratio_high"] == 0.0 and metrics["clip_ratio_low"] == pytest.approx(1 / 5)


def test_on_policy_gradient_is_minus_advantage_over_length():
    # old = None: rho = 1 in value, d(loss)/d(logp_it) = -A_i / (n_i * N) for "grpo".
    logprobs, advantages, mask, _ = tiny_example()
    logprobs = logprobs.clone().requires_grad_(True)
    loss, metrics = policy_loss(logprobs, advantages, mask)
    loss.backward()
    assert loss.item() == pytest.approx(-(1.0 - 2.0) / 2)
    expected = torch.tensor([[-1 / 6, -1 / 6, -1 / 6], [1 / 2, 1 / 2, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logprobs.grad, expected)
    assert metrics["ratio_mean"] == 1.0 and metrics["clip_ratio"] == 0.0


# --- gradients against a naive per-token implementation ---------------------------------------


def naive_loss(logprobs, advantages, mask, old_logprobs, ref_logprobs, beta, eps_low, eps_high, loss_type,
               max_completion_length, num_items, num_sequences):
    """The definition, one token at a time in python, on 0-dim tensors (autograd follows)."""
    rows, positions = logprobs.shape
    sequence_sums, token_counts = [], []
    for i in range(rows):
        terms = []
        for t in range(positions):
            if mask[i, t] == 0:
                continue
            ratio = torch.exp(logprobs[i, t] - old_logprobs[i, t])
            clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
            term = -torch.min(ratio * advantages[i], clipped * advantages[i])
            if beta > 0:
                delta = ref_logprobs[i, t] - logprobs[i, t]
                term = term + beta * (torch.exp(delta) - delta - 1)
            terms.append(term)
        sequence_sums.append(sum(terms) if terms else torch.zeros((), dtype=logprobs.dtype))
        token_counts.append(len(terms))
    total = sum(sequence_sums)
    sequences = num_sequences if num_sequences is not None else rows
    if loss_type == "grpo":
        return sum(s / max(n, 1) for s, n in zip(sequence_sums, token_counts)) / sequences
    if loss_type == "dr_grpo":
        return total / (sequences * (max_completion_length or positions))
    return total / (num_items if num_items is not None else max(sum(token_counts), 1))


def random_batch(seed: int, rows: int = 6, positions: int = 7, off_policy: float = 0.6):
    generator = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(rows, positions, generator=generator, dtype=torch.float64) * 3
    old_logprobs = logprobs + off_policy * torch.randn(rows, positions, generator=generator, dtype=torch.float64)
    ref_logprobs = logprobs + 0.5 * torch.randn(rows, positions, generator=generator, dtype=torch.float64)
    lengths = torch.randint(1, positions + 1, (rows,), generator=generator)
    lengths[1] = 0  # one zero-length completion
    mask = (torch.arange(positions).unsqueeze(0) < lengths.unsqueeze(1)).long()
    advantages = torch.randn(rows, generator=generator, dtype=torch.float64)
    return logprobs, advantages, mask, old_logprobs, ref_logprobs


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("epsilon_high", [None, 0.28])
@pytest.mark.parametrize("options", [{}, {"max_completion_length": 9, "num_items": 40, "num_sequences": 10}])
def test_gradient_matches_naive_loop(loss_type, beta, epsilon_high, options):
    logprobs, advantages, mask, old_logprobs, ref_logprobs = random_batch(seed=7)
    fast_input = logprobs.clone().requires_grad_(True)
    naive_input = logprobs.clone().requires_grad_(True)
    loss, metrics = policy_loss(
        fast_input, advantages, mask, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, beta=beta,
        epsilon_low=0.2, epsilon_high=epsilon_high, loss_type=loss_type, **options,
    )
    expected = naive_loss(
        naive_input, advantages, mask, old_logprobs, ref_logprobs, beta, 0.2,
        0.2 if epsilon_high is None else epsilon_high, loss_type, options.get("max_completion_length"),
        options.get("num_items"), options.get("num_sequences"),
    )
    # the batch really exercises both clip sides, else the comparison would prove little
    assert metrics["clip_ratio_low"] > 0 and metrics["clip_ratio_high"] > 0
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast_input.grad, naive_input.grad, rtol=1e-10, atol=1e-12)
    assert (fast_input.grad[mask == 0] == 0).all()
    # clipped tokens carry no surrogate gradient: with beta = 0 their gradient is exactly 0
    if beta == 0:
        eps_high = 0.2 if epsilon_high is None else epsilon_high
        ratio = torch.exp(logprobs - old_logprobs)
        side = advantages.unsqueeze(1)
        cut = ((ratio < 0.8) & (side < 0)) | ((ratio > 1 + eps_high) & (side > 0))
        assert (fast_input.grad[cut & (mask == 1)] == 0).all()
        assert (fast_input.grad[~cut & (mask == 1)] != 0).all()


# --- gradient accumulation equals one large batch --------------------------------------------


def micro_batches(tensors, boundaries):
    """Split rows at the boundaries and trim each part to its own longest completion, as a
    trainer padding per micro-batch would."""
    mask = tensors[2]
    parts = []
    for start, stop in zip(boundaries[:-1], boundaries[1:]):
        width = max(int(mask[start:stop].sum(dim=1).max()), 1)
        parts.append([tensor[start:stop, :width] if tensor.dim() == 2 else tensor[start:stop] for tensor in tensors])
    return parts


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_accumulation_equals_one_large_batch(loss_type, beta):
    logprobs, advantages, mask, old_logprobs, ref_logprobs = random_batch(seed=3, rows=7, positions=8)
    step = {"num_sequences": 7, "num_items": int(mask.sum()), "max_completion_length": 8}
    whole_input = logprobs.clone().requires_grad_(True)
    whole_loss, _ = policy_loss(
        whole_input, advantages, mask, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, beta=beta,
        loss_type=loss_type, **step,
    )
    whole_loss.backward()

    accumulated_input = logprobs.clone().requires_grad_(True)
    parts = micro_batches([accumulated_input, advantages, mask, old_logprobs, ref_logprobs], [0, 2, 3, 7])
    summed_loss = torch.zeros((), dtype=torch.float64)
    for part_logprobs, part_advantages, part_mask, part_old, part_ref in parts:
        part_loss, _ = policy_loss(
            part_logprobs, part_advantages, part_mask, old_logprobs=part_old, ref_logprobs=part_ref, beta=beta,
            loss_type=loss_type, **step,
        )
        part_loss.backward()  # one backward per micro-batch, gradients add up in .grad
        summed_loss = summed_loss + part_loss.detach()
    torch.testing.assert_close(summed_loss, whole_loss.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(accumulated_input.grad, whole_input.grad, rtol=1e-10, atol=1e-12)


def test_default_normalisers_are_not_accumulation_invariant():
    # Without the step totals, micro-batches of unequal size do not add up to the large batch:
    # this is the bug num_sequences / num_items exist for.
    logprobs, advantages, mask, old_logprobs, _ = random_batch(seed=3, rows=7, positions=8)
    for loss_type in LOSS_TYPES:
        whole, _ = policy_loss(logprobs, advantages, mask, old_logprobs=old_logprobs, loss_type=loss_type,
                               max_completion_length=8)
        parts = micro_batches([logprobs, advantages, mask, old_logprobs], [0, 2, 3, 7])
        summed = sum(
            policy_loss(p_logprobs, p_adv, p_mask, old_logprobs=p_old, loss_type=loss_type, max_completion_length=8)[0]
            for p_logprobs, p_adv, p_mask, p_old in parts
        )
        assert not math.isclose(summed.item(), whole.item(), rel_tol=1e-3), loss_type


# --- zero-length completions and garbage on padding ------------------------------------------


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_zero_length_rows_and_padding_garbage_give_no_nan(loss_type):
    logprobs, advantages, mask, old_logprobs, ref_logprobs = random_batch(seed=11)
    # padding log-probs are garbage: -inf, NaN and +inf must not leak into the value or gradient
    garbage = torch.tensor([-INF, NAN, INF], dtype=torch.float64)
    fill = garbage[torch.arange(mask.numel()) % 3].reshape(mask.shape)
    logprobs = torch.where(mask.bool(), logprobs, fill).requires_grad_(True)
    old_logprobs = torch.where(mask.bool(), old_logprobs, fill.flip(1))
    ref_logprobs = torch.where(mask.bool(), ref_logprobs, fill.flip(0))
    loss, metrics = policy_loss(
        logprobs, advantages, mask, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, beta=0.1, loss_type=loss_type
    )
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logprobs.grad).all()
    assert (logprobs.grad[1] == 0).all()  # the zero-length row
    assert (logprobs.grad[mask == 0] == 0).all()
    assert all(math.isfinite(value) for value in metrics.values())

    # the same batch without its zero-length row: "bnpo"/"dapo" are unchanged; "grpo"/"dr_grpo"
    # see the row only through the sequence count (it counts in N, as in TRL)
    keep = [0, 2, 3, 4, 5]
    kept_loss, _ = policy_loss(
        logprobs.detach()[keep], advantages[keep], mask[keep], old_logprobs=old_logprobs[keep],
        ref_logprobs=ref_logprobs[keep], beta=0.1, loss_type=loss_type, max_completion_length=7,
        num_sequences=6,
    )
    assert kept_loss.item() == pytest.approx(loss.item(), rel=1e-12)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_all_rows_empty_or_no_rows(loss_type):
    logprobs = torch.full((3, 4), NAN, requires_grad=True)
    loss, metrics = policy_loss(logprobs, torch.ones(3), torch.zeros(3, 4), loss_type=loss_type)
    loss.backward()
    assert loss.item() == 0.0 and (logprobs.grad == 0).all()
    assert metrics["num_tokens"] == 0.0 and metrics["clip_ratio"] == 0.0
    empty, empty_metrics = policy_loss(torch.zeros(0, 5), torch.zeros(0), torch.zeros(0, 5), loss_type=loss_type)
    assert empty.item() == 0.0 and empty_metrics["num_tokens"] == 0.0


# --- contract details --------------------------------------------------------------------------


def test_inputs_are_not_modified_and_types():
    logprobs, advantages, mask, old_logprobs, ref_logprobs = random_batch(seed=5)
    originals = [tensor.clone() for tensor in (logprobs, advantages, mask, old_logprobs, ref_logprobs)]
    loss, metrics = policy_loss(
        logprobs.clone().requires_grad_(True), advantages, mask.bool(), old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs, beta=0.1,
    )
    for original, tensor in zip(originals, (logprobs, advantages, mask, old_logprobs, ref_logprobs)):
        assert torch.equal(original, tensor)
    assert loss.dim() == 0 and loss.requires_grad
    assert set(metrics) == {"clip_ratio_low", "clip_ratio_high", "clip_ratio", "ratio_mean", "kl_mean", "num_tokens"}


def test_bfloat16_logprobs_are_upcast_and_mask_dtypes_agree():
    logprobs, advantages, mask, old_logprobs = tiny_example(dtype=torch.float32)
    reference, _ = policy_loss(logprobs, advantages, mask, old_logprobs=old_logprobs)
    for mask_variant in (mask.bool(), mask.float(), mask.int()):
        same, _ = policy_loss(logprobs, advantages, mask_variant, old_logprobs=old_logprobs)
        assert same.item() == reference.item()
    low_precision, _ = policy_loss(logprobs.bfloat16(), advantages, mask, old_logprobs=old_logprobs.bfloat16())
    assert low_precision.dtype == torch.float32


def test_old_logprobs_gradient_is_ignored():
    # old and ref log-probs are constants of the objective: no gradient flows into them
    logprobs, advantages, mask, old_logprobs, ref_logprobs = random_batch(seed=2)
    old_logprobs = old_logprobs.clone().requires_grad_(True)
    ref_logprobs = ref_logprobs.clone().requires_grad_(True)
    loss, _ = policy_loss(logprobs.clone().requires_grad_(True), advantages, mask, old_logprobs=old_logprobs,
                          ref_logprobs=ref_logprobs, beta=0.1)
    loss.backward()
    assert old_logprobs.grad is None and ref_logprobs.grad is None


@pytest.mark.parametrize(
    "change, message",
    [
        ({"advantages": torch.zeros(2, 1)}, "advantages must have shape"),
        ({"advantages": torch.tensor([0.0, NAN])}, r"rows \[1\]"),
        ({"mask": torch.ones(2, 4)}, "mask must have the shape"),
        ({"mask": torch.full((2, 3), 2)}, "only 0 and 1"),
        ({"logprobs": torch.zeros(6)}, "logprobs must be a tensor of shape"),
        ({"old_logprobs": torch.zeros(3, 3)}, "old_logprobs must have the shape"),
        ({"loss_type": "ppo"}, "loss_type"),
        ({"beta": 0.1}, "needs ref_logprobs"),
        ({"beta": -1.0}, "beta"),
        ({"epsilon_low": 1.5}, "epsilon_low"),
        ({"epsilon_high": -0.1}, "epsilon_high"),
        ({"num_items": 0}, "num_items"),
        ({"num_sequences": 0}, "num_sequences"),
        ({"max_completion_length": 0}, "max_completion_length"),
        ({"loss_type": "dr_grpo", "max_completion_length": 2}, "more than max_completion_length"),
    ],
)
def test_bad_arguments_are_named(change, message):
    logprobs, advantages, mask, old_logprobs = tiny_example(dtype=torch.float32)
    arguments = {"logprobs": logprobs, "advantages": advantages, "mask": mask, "old_logprobs": old_logprobs, **change}
    with pytest.raises((ValueError, TypeError), match=message):
        policy_loss(arguments.pop("logprobs"), arguments.pop("advantages"), arguments.pop("mask"), **arguments)
