"""Tests for the loss helpers around the objectives: global loss normalisation (micro-batches sum to the
mini-batch loss and gradient), verl's KL clamps, TIS/MIS mismatch weights, the top-entropy token mask and
the entropy bonus — hand-computed values with padding and sequences of different lengths."""

from __future__ import annotations

import math

import pytest
import torch

from mmrl.algorithms import aggregate_loss, global_counts, kl_estimate, policy_loss
from mmrl.objectives import (
    MISMATCH_MODES,
    OBJECTIVES,
    entropy_bonus,
    mismatch_weights,
    preset_params,
    top_entropy_mask,
)

F64 = torch.float64
LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def close(actual, expected, tol: float = 1e-6) -> None:
    actual = torch.as_tensor(actual)
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=tol, rtol=tol)


def random_case(seed: int, batch: int = 8, length: int = 7, spread: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    old = -3.0 * torch.rand(batch, length, generator=g, dtype=F64) - 0.1
    logp = old + spread * torch.randn(batch, length, generator=g, dtype=F64)
    advantages = torch.randn(batch, generator=g, dtype=F64)
    advantages[0] = 0.0
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).to(F64)
    mask[1] = 0.0  # an empty completion
    mask = mask * (torch.rand(batch, length, generator=g) > 0.1).to(F64)  # holes (tool/loss masks)
    return logp, old, advantages, mask


# ==================================================================================================
# global loss normalisation
# ==================================================================================================

PER_TOKEN = t([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 99.0, 99.0], [5.0, 99.0, 99.0, 99.0]])
AGG_MASK = t([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])


def test_global_counts_hand_values():
    tokens, sequences = global_counts(AGG_MASK)
    assert (tokens.item(), sequences.item()) == (7.0, 3.0)
    with_empty = torch.cat([AGG_MASK, torch.zeros(1, 4, dtype=F64)])
    assert global_counts(with_empty)[1].item() == 4.0
    assert global_counts(with_empty, count_empty_sequences=False)[1].item() == 3.0


@pytest.mark.parametrize(
    "loss_type, expected_parts",
    [
        # micro-batches: row 0 (4 tokens, sum 10) and rows 1–2 (3 tokens, sums 30 and 5); 7 tokens, 3 rows
        ("grpo", (2.5 / 3, (15.0 + 5.0) / 3)),
        ("bnpo", (10 / 7, 35 / 7)),
        ("dapo", (10 / 7, 35 / 7)),
        ("dr_grpo", (10 / 30, 35 / 30)),  # max_completion_length 10
    ],
)
def test_global_aggregation_hand_values(loss_type, expected_parts):
    parts = [aggregate_loss(PER_TOKEN[sl], AGG_MASK[sl], loss_type, 10, global_tokens=7.0, global_sequences=3)
             for sl in (slice(0, 1), slice(1, 3))]
    close(torch.stack(parts), expected_parts)
    close(sum(parts), aggregate_loss(PER_TOKEN, AGG_MASK, loss_type, 10))


def test_global_aggregation_errors():
    with pytest.raises(ValueError, match="max_completion_length"):
        aggregate_loss(PER_TOKEN, AGG_MASK, "dr_grpo", None, global_tokens=7, global_sequences=3)
    with pytest.raises(ValueError, match="global_tokens"):
        aggregate_loss(PER_TOKEN, AGG_MASK, "dapo", global_sequences=3)
    with pytest.raises(ValueError, match="global_sequences"):
        aggregate_loss(PER_TOKEN, AGG_MASK, "grpo", global_tokens=torch.tensor(7.0))
    assert aggregate_loss(PER_TOKEN, torch.zeros_like(AGG_MASK), "dapo", global_tokens=0.0).item() == 0.0


SPLITS = [(8,), (4, 4), (2, 2, 2, 2), (3, 1, 4)]


def split_slices(sizes):
    start = 0
    for size in sizes:
        yield slice(start, start + size)
        start += size


@pytest.mark.parametrize("sizes", SPLITS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batches_with_global_counts_equal_full_batch(sizes, loss_type):
    logp, old, adv, mask = random_case(11)
    per_token_full = -(logp - old) * adv.unsqueeze(-1)
    # counts summed over micro-batches, as the trainer (then all-reduced over processes) would
    counts = [global_counts(mask[sl]) for sl in split_slices(sizes)]
    tokens, sequences = sum(c[0] for c in counts), sum(c[1] for c in counts)
    x_full = logp.clone().requires_grad_(True)
    x_micro = logp.clone().requires_grad_(True)
    full = aggregate_loss(-(x_full - old) * adv.unsqueeze(-1), mask, loss_type, 16)
    total = sum(aggregate_loss(-(x_micro[sl] - old[sl]) * adv[sl].unsqueeze(-1), mask[sl], loss_type, 16,
                               tokens, sequences) for sl in split_slices(sizes))
    close(total, full)
    close(full, aggregate_loss(per_token_full, mask, loss_type, 16))
    full.backward()
    total.backward()
    close(x_micro.grad, x_full.grad)


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_policy_loss_micro_batches_with_global_counts(objective, loss_type):
    logp, old, adv, mask = random_case(12)
    params = preset_params(objective, epsilon=0.1, epsilon_high=0.15)
    x_full, x_micro = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    full, _ = policy_loss(x_full, old, adv, mask, loss_type, objective=objective, params=params)
    tokens, sequences = global_counts(mask)
    total = sum(
        policy_loss(x_micro[sl], old[sl], adv[sl], mask[sl], loss_type, objective=objective, params=params,
                    global_tokens=tokens, global_sequences=sequences)[0]
        for sl in split_slices((2, 2, 2, 2))
    )
    close(total, full)
    full.backward()
    total.backward()
    close(x_micro.grad, x_full.grad)


# ==================================================================================================
# KL clamps (verl's low_var_kl)
# ==================================================================================================


def test_kl_clamp_hand_values():
    logp = t([0.0, 30.0, math.log(0.5)])
    ref = t([30.0, 0.0, math.log(0.25)])
    # x = ref − logp = [30 → 20, −30 → −20, ln 0.5]
    # k3 = eˣ − x − 1 → [≈4.85e8 → 10, e^−20 + 19 → 10, 0.193147]
    close(kl_estimate(logp, ref, "k3", clamp=True), [10.0, 10.0, 0.5 + math.log(2.0) - 1.0])
    unclamped = kl_estimate(logp, ref, "k3")
    close(unclamped[:2], [math.exp(30.0) - 31.0, math.exp(-30.0) + 29.0], tol=1e-9)
    for estimator in ("k1", "k2"):  # verl clamps only k3
        close(kl_estimate(logp, ref, estimator, clamp=True), kl_estimate(logp, ref, estimator))
    x = logp.clone().requires_grad_(True)
    kl_estimate(x, ref, "k3", clamp=True).sum().backward()
    assert x.grad[0] == 0.0 and x.grad[1] == 0.0 and x.grad[2] != 0.0


# ==================================================================================================
# TIS / MIS weights
# ==================================================================================================
#
# ρ = exp(old − sampler): row 0 [3, 0.5, 1.5]; row 1 [0.2, 1.2, pad (100)]. Sequence ratios (products):
# row 0 3·0.5·1.5 = 2.25, row 1 0.2·1.2 = 0.24.

MM_RATIO = [[3.0, 0.5, 1.5], [0.2, 1.2, 100.0]]
MM_MASK = t([[1, 1, 1], [1, 1, 0]])
MM_DIFFS = [math.log(3), math.log(2), math.log(1.5), math.log(5), math.log(1.2)]  # |old − sampler|


def mm(mode, **kwargs):
    sampler = t([[-1.0, -2.0, -0.5], [-0.3, -1.1, -4.0]])
    return mismatch_weights(sampler + torch.log(t(MM_RATIO)), sampler, MM_MASK, mode, **kwargs)


ALL_KEPT = [[1, 1, 1], [1, 1, 0]]


@pytest.mark.parametrize(
    "mode, kwargs, weights, keep, masked, truncated",
    [
        ("token_truncate", {"cap": 2.0}, [[2.0, 0.5, 1.5], [0.2, 1.2, 0.0]], ALL_KEPT, 0, 1 / 5),
        ("token_truncate", {"cap": 2.0, "low": 0.3}, [[2.0, 0.5, 1.5], [0.3, 1.2, 0.0]], ALL_KEPT, 0, 2 / 5),
        ("token_mask", {"cap": 2.0}, [[0.0, 0.5, 1.5], [0.2, 1.2, 0.0]], [[0, 1, 1], [1, 1, 0]], 1 / 5, 0),
        ("token_mask", {"low": 0.3, "high": 2.0}, [[0.0, 0.5, 1.5], [0.0, 1.2, 0.0]], [[0, 1, 1], [0, 1, 0]],
         2 / 5, 0),
        ("sequence_truncate", {"cap": 2.0}, [[2.0] * 3, [0.24, 0.24, 0.0]], ALL_KEPT, 0, 3 / 5),
        ("sequence_mask", {"low": 0.3, "high": 3.0}, [[2.25] * 3, [0.0] * 3], [[1, 1, 1], [0] * 3], 2 / 5, 0),
        ("sequence_mask", {"cap": 2.0}, [[0.0] * 3, [0.24, 0.24, 0.0]], [[0, 0, 0], [1, 1, 0]], 3 / 5, 0),
    ],
)
def test_mismatch_weights_hand_values(mode, kwargs, weights, keep, masked, truncated):
    w, k, metrics = mm(mode, **kwargs)
    close(w, weights)
    assert torch.equal(k, torch.tensor(keep, dtype=torch.bool))
    close(metrics["mismatch/masked_fraction"], masked)
    close(metrics["mismatch/truncated_fraction"], truncated)
    close(metrics["mismatch/weight_mean"], sum(map(sum, weights)) / 5)
    close(metrics["mismatch/logp_abs_diff_mean"], sum(MM_DIFFS) / 5)
    close(metrics["mismatch/logp_abs_diff_max"], math.log(5))
    sequence = mode.startswith("sequence")
    close(metrics["mismatch/ratio_min"], 0.24 if sequence else 0.2)
    close(metrics["mismatch/ratio_max"], 2.25 if sequence else 3.0)


def test_mismatch_weights_capped_and_detached():
    g = torch.Generator().manual_seed(3)
    old = (-2 * torch.rand(6, 10, generator=g, dtype=F64)).requires_grad_(True)
    sampler = old.detach() + torch.randn(6, 10, generator=g, dtype=F64)
    mask = torch.ones(6, 10, dtype=F64)
    for mode in MISMATCH_MODES:
        w, keep, _ = mismatch_weights(old, sampler, mask, mode, cap=1.5, low=0.5)
        assert not w.requires_grad
        assert (w <= 1.5 + 1e-12).all()
        ratio = torch.exp(old.detach() - sampler)
        if mode == "token_mask":  # exactly the out-of-range tokens are dropped
            assert torch.equal(keep, (ratio >= 0.5) & (ratio <= 1.5))


@pytest.mark.parametrize(
    "kwargs, word",
    [({"cap": 0.9}, "cap"), ({"high": 0.5}, "high"), ({"low": 1.5}, "low"), ({"low": -0.1}, "low")],
)
def test_mismatch_bounds_validated(kwargs, word):
    with pytest.raises(ValueError, match=word):
        mm("token_mask", **kwargs)


def test_mismatch_unknown_mode():
    with pytest.raises(ValueError) as info:
        mm("token_clip")
    for mode in MISMATCH_MODES:
        assert mode in str(info.value)


# ==================================================================================================
# top-entropy mask, entropy bonus
# ==================================================================================================

ENTROPY = t([[0.5, 2.0, 1.0, 9.0], [2.0, 0.1, 9.0, 9.0], [3.0, 2.0, 0.7, 0.2]])
ENTROPY_MASK = t([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])  # 9 valid tokens; padding entropy 9 ignored


@pytest.mark.parametrize(
    "fraction, expected",
    [
        # ceil(0.3·9) = 3: 3.0, then the first two of the three 2.0s in row-major order
        (0.3, [[0, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]]),
        # ceil(0.5·9) = 5: 3.0, the three 2.0s, 1.0
        (0.5, [[0, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]]),
        (0.01, [[0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]),  # at least one token
        (1.0, ENTROPY_MASK.tolist()),
    ],
)
def test_top_entropy_mask_hand_values(fraction, expected):
    out = top_entropy_mask(ENTROPY, ENTROPY_MASK, fraction)
    assert out.dtype == ENTROPY_MASK.dtype
    close(out, expected)
    bool_out = top_entropy_mask(ENTROPY, ENTROPY_MASK.bool(), fraction)
    assert bool_out.dtype == torch.bool and torch.equal(bool_out, out.bool())


def test_top_entropy_mask_edge_cases():
    assert top_entropy_mask(ENTROPY, torch.zeros_like(ENTROPY_MASK), 0.2).sum() == 0
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            top_entropy_mask(ENTROPY, ENTROPY_MASK, bad)


def test_entropy_bonus_hand_values_and_direction():
    entropy = t([[1.0, 2.0, 7.0], [3.0, 7.0, 7.0]]).requires_grad_(True)
    mask = t([[1, 1, 0], [1, 0, 0]])
    close(entropy_bonus(entropy, mask, 0.1, "grpo"), -0.1 * (1.5 + 3.0) / 2)
    close(entropy_bonus(entropy, mask, 0.1, "dapo"), -0.1 * 6.0 / 3)
    close(entropy_bonus(entropy, mask, 0.1, "dapo", global_tokens=6.0), -0.1 * 6.0 / 6)
    entropy_bonus(entropy, mask, 0.1, "dapo").backward()
    # descending the loss raises the entropy of valid tokens; padding gets nothing
    assert (entropy.grad[mask.bool()] < 0).all() and (entropy.grad[~mask.bool()] == 0).all()
