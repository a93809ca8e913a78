"""Tests for :mod:`mmrl.advantages`: hand-computed values for every estimator, with missing rewards,
groups of different sizes in any order, and constant groups that must give exactly 0."""

from __future__ import annotations

import math

import pytest
import torch

from mmrl import algorithms
from mmrl.advantages import (
    ADVANTAGE_ESTIMATORS,
    ADVANTAGE_SCALES,
    AdvantageParams,
    compute_advantages,
    get_advantage_estimator,
    group_statistics,
    register_advantage_estimator,
)

NAN = math.nan
EPS = 1e-4  # AdvantageParams' default (TRL's)
ESTIMATORS = ("grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
BASELINE_ESTIMATORS = ("grpo", "rloo", "reinforce_pp_baseline")  # those with a group baseline


def close(actual: torch.Tensor, expected, tol: float = 1e-6) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


def adv(name: str, rewards, group_id, **params) -> torch.Tensor:
    return compute_advantages(
        name, torch.as_tensor(rewards, dtype=torch.float32), torch.as_tensor(group_id), AdvantageParams(**params)
    )


# A shared batch: four groups of different sizes, interleaved, with missing rewards.
#   position:  0    1    2    3    4    5    6    7    8
#   group:     1    0    2    0    3    0    1    3    0
#   reward:    0    1    4   nan  nan   3    1   nan   5
# group 0 = [1, nan, 3, 5] → valid [1, 3, 5]: n 3, mean 3, unbiased std √((4 + 0 + 4) / 2) = 2
# group 1 = [0, 1]         → n 2, mean 0.5, unbiased std √((0.25 + 0.25) / 1) = √0.5
# group 2 = [4]            → one valid reward: nothing to compare against → 0
# group 3 = [nan, nan]     → no valid reward → 0
GROUPS = [1, 0, 2, 0, 3, 0, 1, 3, 0]
REWARDS = [0.0, 1.0, 4.0, NAN, NAN, 3.0, 1.0, NAN, 5.0]


# ==================================================================================================
# grpo
# ==================================================================================================


def test_grpo_group_scale_hand_values():
    s = math.sqrt(0.5)
    expected = [-0.5 / (s + EPS), -2 / (2 + EPS), 0, 0, 0, 0, 0.5 / (s + EPS), 0, 2 / (2 + EPS)]
    close(adv("grpo", REWARDS, GROUPS), expected)


def test_grpo_none_scale_is_centred_only():
    close(adv("grpo", REWARDS, GROUPS, scale="none"), [-0.5, -2, 0, 0, 0, 0, 0.5, 0, 2])


def test_grpo_batch_scale_hand_values():
    # batch std over every valid reward [0, 1, 4, 3, 1, 5]: mean 14/6 = 7/3;
    # squared deviations 49/9 + 16/9 + 25/9 + 4/9 + 16/9 + 64/9 = 174/9; unbiased var = 174/9/5 = 174/45
    s = math.sqrt(174 / 45)
    expected = [-0.5 / (s + EPS), -2 / (s + EPS), 0, 0, 0, 0, 0.5 / (s + EPS), 0, 2 / (s + EPS)]
    close(adv("grpo", REWARDS, GROUPS, scale="batch"), expected)


def test_grpo_custom_eps():
    close(adv("grpo", [0.0, 1.0, 2.0], [0, 0, 0], eps=0.5), [-1 / 1.5, 0.0, 1 / 1.5])


def test_grpo_matches_group_advantages_for_equal_contiguous_groups():
    g = torch.Generator().manual_seed(3)
    rewards = torch.rand(24, generator=g)
    rewards[[2, 9, 10]] = NAN
    for scale in ADVANTAGE_SCALES:
        via_ids = compute_advantages("grpo", rewards, torch.arange(24) // 6, AdvantageParams(scale=scale))
        assert torch.equal(algorithms.group_advantages(rewards, 6, scale), via_ids)


def _dense_grpo_reference(rewards: torch.Tensor, group_size: int, scale: str) -> torch.Tensor:
    # The [P, G] formula used before the registry (fp32 statistics, NaN left out), without its zeroing.
    grouped = rewards.view(-1, group_size)
    valid = ~torch.isnan(grouped)
    filled = torch.where(valid, grouped, torch.zeros_like(grouped))
    count = valid.sum(dim=1, keepdim=True)
    mean = filled.sum(dim=1, keepdim=True) / count.clamp(min=1)
    centred = torch.where(valid, grouped - mean, torch.zeros_like(grouped))
    if scale == "group":
        std = ((centred**2).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()
    elif scale == "batch":
        std = rewards[~torch.isnan(rewards)].std()
    else:
        return centred.flatten()
    return (centred / (std + EPS)).flatten()


@pytest.mark.parametrize("scale", ADVANTAGE_SCALES)
def test_grpo_bit_identical_to_the_dense_formula_for_varying_groups(scale):
    # Runs and benchmarks made before the registry must not move: same fp32 arithmetic, same bits.
    g = torch.Generator().manual_seed(11)
    for _ in range(50):
        rewards = (torch.rand(64, generator=g) < 0.5).float() * torch.randint(1, 4, (64,), generator=g) * 0.7
        rewards[torch.rand(64, generator=g) < 0.15] = NAN
        new = algorithms.group_advantages(rewards, 8, scale)
        ref = _dense_grpo_reference(rewards, 8, scale)
        varying = ~group_statistics(rewards, torch.arange(64) // 8).constant.repeat_interleave(8)
        valid = ~torch.isnan(rewards)
        assert torch.equal(new[varying & valid], ref[varying & valid])


# ==================================================================================================
# rloo
# ==================================================================================================


def test_rloo_hand_values():
    # group 0 [1, nan, 3, 5]: A_i = r_i − (9 − r_i)/2 → 1 − 4 = −3, 3 − 3 = 0, 5 − 2 = 3
    # group 1 [0, 1]: A = r − other → −1, +1; groups 2 and 3 → 0
    close(adv("rloo", REWARDS, GROUPS), [-1, -3, 0, 0, 0, 0, 1, 0, 3])


def test_rloo_four_samples_formula():
    # [2, 4, 6, 8]: sum 20; A_i = r_i − (20 − r_i)/3 → 2 − 6, 4 − 16/3, 6 − 14/3, 8 − 4
    # = n/(n−1)·(r − mean) = 4/3 · (−3, −1, 1, 3)
    close(adv("rloo", [2.0, 4.0, 6.0, 8.0], [0, 0, 0, 0]), [-4.0, -4 / 3, 4 / 3, 4.0])


def test_rloo_sums_to_zero_per_group():
    g = torch.Generator().manual_seed(5)
    rewards, group_id = torch.rand(40, generator=g), torch.randint(0, 6, (40,), generator=g)
    out = compute_advantages("rloo", rewards, group_id)
    sums = torch.zeros(6).index_add_(0, group_id, out)
    close(sums, torch.zeros(6), tol=1e-5)


# ==================================================================================================
# reinforce_pp / reinforce_pp_baseline
# ==================================================================================================


def test_reinforce_pp_whitens_across_the_batch():
    # valid rewards [1, 3, 5, 2, 2]: mean 13/5 = 2.6; deviations −1.6, 0.4, 2.4, −0.6, −0.6;
    # squares 2.56 + 0.16 + 5.76 + 0.36 + 0.36 = 9.2; unbiased var 9.2/4 = 2.3
    s = math.sqrt(2.3) + EPS
    out = adv("reinforce_pp", [1.0, NAN, 3.0, 5.0, 2.0, 2.0], [0, 0, 0, 0, 1, 1])
    close(out, [-1.6 / s, 0.0, 0.4 / s, 2.4 / s, -0.6 / s, -0.6 / s])
    # no group baseline: the constant group [2, 2] is pushed down relative to the batch, not zeroed
    assert (out[4:] < 0).all()


def test_reinforce_pp_ignores_groups():
    rewards = [1.0, NAN, 3.0, 5.0, 2.0, 2.0]
    assert torch.equal(adv("reinforce_pp", rewards, [0, 0, 0, 0, 1, 1]), adv("reinforce_pp", rewards, [0, 1, 2, 3, 4, 5]))


def test_reinforce_pp_baseline_hand_values():
    # group 0 [0, 1, nan] → centred [−0.5, 0.5, 0]; group 1 [2, 2] → [0, 0]; group 2 [1, 3, 5] → [−2, 0, 2];
    # group 3 [7] → 0. Valid samples n = 8; Σ c² = 0.25 + 0.25 + 4 + 4 = 8.5; std = √(8.5 / 7)
    rewards = [0.0, 1.0, NAN, 2.0, 2.0, 1.0, 3.0, 5.0, 7.0]
    group_id = [0, 0, 0, 1, 1, 2, 2, 2, 3]
    s = math.sqrt(8.5 / 7) + EPS
    close(adv("reinforce_pp_baseline", rewards, group_id), [-0.5 / s, 0.5 / s, 0, 0, 0, -2 / s, 0, 2 / s, 0])


# ==================================================================================================
# shared semantics
# ==================================================================================================


@pytest.mark.parametrize("name", BASELINE_ESTIMATORS)
@pytest.mark.parametrize("scale", ADVANTAGE_SCALES)
def test_constant_fp32_groups_are_exactly_zero(name, scale):
    # 8 × 2.6 and 3 × 0.1 are not exact in binary: an fp32 mean rounds (the old code gave |A| ≈ 2e-3)
    rewards = torch.tensor([2.6] * 8 + [0.1] * 3 + [0.0, 1.0, 0.7], dtype=torch.float32)
    group_id = torch.tensor([0] * 8 + [1] * 3 + [2] * 3)
    out = compute_advantages(name, rewards, group_id, AdvantageParams(scale=scale))
    assert torch.equal(out[:11], torch.zeros(11))
    assert (out[11:] != 0).all()


@pytest.mark.parametrize("name", BASELINE_ESTIMATORS)
def test_constant_fp64_group_is_exactly_zero(name):
    # in float64, 0.1 + 0.1 + 0.1 = 0.30000000000000004 and its mean is not 0.1: min == max catches it
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.3, 0.7], dtype=torch.float64)
    out = compute_advantages(name, rewards, torch.tensor([0, 0, 0, 1, 1]))
    assert out.dtype == torch.float64
    assert torch.equal(out[:3], torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("name", ESTIMATORS)
def test_whole_batch_constant_is_zero(name):
    rewards = torch.full((6,), 2.6)
    out = compute_advantages(name, rewards, torch.tensor([0, 0, 1, 1, 1, 2]))
    assert torch.equal(out, torch.zeros(6))


def test_group_advantages_constant_fp32_regression():
    # issue 10: a constant fp32 group of 8 × 2.6 gave |A| ≈ 2e-3 instead of 0
    for scale in ADVANTAGE_SCALES:
        assert torch.equal(algorithms.group_advantages(torch.full((16,), 2.6), 8, scale), torch.zeros(16))


@pytest.mark.parametrize("name", ESTIMATORS)
def test_missing_rewards_get_zero_and_no_nan(name):
    out = adv(name, REWARDS, GROUPS)
    missing = torch.isnan(torch.tensor(REWARDS))
    assert not torch.isnan(out).any()
    assert torch.equal(out[missing], torch.zeros(int(missing.sum())))


@pytest.mark.parametrize("name", ESTIMATORS)
def test_all_missing_is_zero(name):
    assert torch.equal(adv(name, [NAN] * 4, [0, 0, 1, 1]), torch.zeros(4))


@pytest.mark.parametrize("name", ESTIMATORS)
def test_permuting_samples_permutes_advantages(name):
    g = torch.Generator().manual_seed(7)
    rewards = torch.rand(30, generator=g).round(decimals=1)
    rewards[torch.rand(30, generator=g) < 0.2] = NAN
    group_id = torch.randint(0, 7, (30,), generator=g)
    perm = torch.randperm(30, generator=g)
    base = compute_advantages(name, rewards, group_id)
    permuted = compute_advantages(name, rewards[perm], group_id[perm])
    close(permuted, base[perm], tol=1e-6)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_dtype_kept_and_fp64_agrees(name):
    r64 = torch.tensor(REWARDS, dtype=torch.float64)
    out64 = compute_advantages(name, r64, torch.tensor(GROUPS))
    out32 = compute_advantages(name, r64.float(), torch.tensor(GROUPS))
    assert out64.dtype == torch.float64 and out32.dtype == torch.float32
    torch.testing.assert_close(out64, out32.double(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_empty_batch(name):
    out = compute_advantages(name, torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,)


def test_group_statistics_hand_values():
    stats = group_statistics(torch.tensor(REWARDS), torch.tensor(GROUPS))
    close(stats.count, [3, 2, 1, 0])
    close(stats.mean, [3, 0.5, 4, 0])
    close(stats.minimum[:3], [1, 0, 4])
    close(stats.maximum[:3], [5, 1, 4])
    assert stats.constant.tolist() == [False, False, True, True]


# ==================================================================================================
# registry and validation
# ==================================================================================================


def test_registry_names_and_reexports():
    assert set(ESTIMATORS) <= set(ADVANTAGE_ESTIMATORS)
    assert algorithms.ADVANTAGE_ESTIMATORS is ADVANTAGE_ESTIMATORS
    assert algorithms.ADVANTAGE_SCALES == ("group", "batch", "none")


def test_unknown_estimator_lists_valid_names():
    with pytest.raises(ValueError) as info:
        get_advantage_estimator("gae")
    assert "'gae'" in str(info.value)
    for name in ESTIMATORS:
        assert name in str(info.value)


def test_register_custom_estimator():
    @register_advantage_estimator("_test_raw")
    def raw(rewards, group_id, params):
        return torch.nan_to_num(rewards)

    try:
        close(compute_advantages("_test_raw", torch.tensor([1.0, NAN]), torch.tensor([0, 0])), [1.0, 0.0])
        with pytest.raises(ValueError, match="already registered"):
            register_advantage_estimator("_test_raw")(lambda r, g, p: r)
    finally:
        ADVANTAGE_ESTIMATORS.pop("_test_raw")


def test_params_validation():
    with pytest.raises(ValueError, match="'std'"):
        AdvantageParams(scale="std")
    with pytest.raises(ValueError, match="eps"):
        AdvantageParams(eps=-1.0)


@pytest.mark.parametrize(
    "rewards, group_id, match",
    [
        (torch.zeros(2, 2), torch.zeros(4, dtype=torch.long), "1-D"),
        (torch.zeros(4), torch.zeros(3, dtype=torch.long), "one entry per reward"),
        (torch.zeros(4), torch.zeros(4), "integer"),
        (torch.zeros(2), torch.tensor([0, -1]), ">= 0"),
        (torch.zeros(2, dtype=torch.long), torch.tensor([0, 0]), "floating-point"),
    ],
)
def test_bad_inputs_raise(rewards, group_id, match):
    with pytest.raises(ValueError, match=match):
        compute_advantages("grpo", rewards, group_id)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ESTIMATORS)
def test_cuda_matches_cpu(name):
    rewards, group_id = torch.tensor(REWARDS), torch.tensor(GROUPS)
    on_cpu = compute_advantages(name, rewards, group_id)
    on_cuda = compute_advantages(name, rewards.cuda(), group_id.cuda())
    assert on_cuda.device.type == "cuda"
    torch.testing.assert_close(on_cuda.cpu(), on_cpu)
