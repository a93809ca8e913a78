"""Tests for :mod:`mmrl.algorithms`: hand-computed values, and agreement with TRL's GRPO loss."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from mmrl.algorithms import (
    ADVANTAGE_SCALES,
    aggregate_loss,
    group_advantages,
    kl_estimate,
    masked_mean,
    micro_batch_weight,
    policy_loss,
    sampled_token_entropy,
)

EPS = 1e-4  # group_advantages' default eps (TRL's 1e-4)
LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")


def close(actual: torch.Tensor, expected, tol: float = 1e-6) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


# ==================================================================================================
# group_advantages
# ==================================================================================================


def test_group_scale_hand_values():
    # groups of 3: [0, 1, 2] (mean 1, unbiased std 1), [3, 3, 3] (constant), [0, 0, 3] (mean 1, std √3)
    rewards = torch.tensor([0.0, 1.0, 2.0, 3.0, 3.0, 3.0, 0.0, 0.0, 3.0])
    adv = group_advantages(rewards, group_size=3, scale="group")
    s3 = math.sqrt(3.0)
    expected = [
        -1 / (1 + EPS), 0.0, 1 / (1 + EPS),
        0.0, 0.0, 0.0,
        -1 / (s3 + EPS), -1 / (s3 + EPS), 2 / (s3 + EPS),
    ]
    close(adv, expected)
    assert adv.shape == rewards.shape


def test_group_scale_pairs_unbiased_std():
    # pairs: [1, 2] → centred ∓0.5, unbiased std √0.5 (a biased std would give 0.5 and advantages ∓1)
    adv = group_advantages(torch.tensor([1.0, 2.0, 4.0, 0.0]), group_size=2, scale="group")
    s = math.sqrt(0.5)
    s2 = math.sqrt(8.0)  # [4, 0]: centred ±2, var = 8 / 1
    close(adv, [-0.5 / (s + EPS), 0.5 / (s + EPS), 2 / (s2 + EPS), -2 / (s2 + EPS)])


def test_group_scale_custom_eps():
    adv = group_advantages(torch.tensor([0.0, 1.0, 2.0]), group_size=3, scale="group", eps=0.5)
    close(adv, [-1 / 1.5, 0.0, 1 / 1.5])


def test_batch_scale_hand_values():
    # group-centred: [-1, 0, 1, 0, 0, 0]; std of all six rewards (mean 2): sqrt((4+1+0+1+1+1)/5) = sqrt(1.6)
    rewards = torch.tensor([0.0, 1.0, 2.0, 3.0, 3.0, 3.0])
    adv = group_advantages(rewards, group_size=3, scale="batch")
    s = math.sqrt(1.6)
    close(adv, [-1 / (s + EPS), 0.0, 1 / (s + EPS), 0.0, 0.0, 0.0])


def test_none_scale_is_group_centred_only():
    rewards = torch.tensor([0.0, 1.0, 5.0, 3.0, 3.0, 3.0, 10.0, 0.0, 2.0])
    adv = group_advantages(rewards, group_size=3, scale="none")
    close(adv, [-2.0, -1.0, 3.0, 0.0, 0.0, 0.0, 6.0, -4.0, -2.0])


@pytest.mark.parametrize("scale", ADVANTAGE_SCALES)
@pytest.mark.parametrize("value", [0.0, 1.0, 0.1, -7.3, 1e6 + 0.1])
def test_zero_variance_group_is_exactly_zero(scale, value):
    rewards = torch.full((8,), value)
    adv = group_advantages(rewards, group_size=4, scale=scale)
    assert torch.equal(adv, torch.zeros(8))


@pytest.mark.parametrize("scale", ADVANTAGE_SCALES)
def test_constant_group_next_to_varying_group(scale):
    # 0.1 is not exact in binary: the group mean may round, but the advantage must still be exactly 0
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.0, 1.0, 0.5])
    adv = group_advantages(rewards, group_size=3, scale=scale)
    assert torch.equal(adv[:3], torch.zeros(3))
    assert (adv[3:] != 0).sum() == 2


def test_nan_rewards_group_scale_hand_values():
    # group [1, nan, 3, 5]: statistics over [1, 3, 5] → mean 3, unbiased std 2
    rewards = torch.tensor([1.0, math.nan, 3.0, 5.0])
    adv = group_advantages(rewards, group_size=4, scale="group")
    close(adv, [-2 / (2 + EPS), 0.0, 0.0, 2 / (2 + EPS)])
    assert not torch.isnan(adv).any()


def test_nan_rewards_none_scale_hand_values():
    rewards = torch.tensor([math.nan, 2.0, 4.0, 1.0, math.nan, math.nan])
    adv = group_advantages(rewards, group_size=3, scale="none")
    # group 1: mean over [2, 4] = 3; group 2: a single valid reward → nothing to compare against → 0
    close(adv, [0.0, -1.0, 1.0, 0.0, 0.0, 0.0])


def test_nan_rewards_batch_scale_hand_values():
    values = [1.0, math.nan, 3.0, 5.0, 0.0, 0.0, 1.0, 1.0]
    adv = group_advantages(torch.tensor(values), group_size=4, scale="batch")
    batch_std = statistics.stdev([v for v in values if not math.isnan(v)])  # NaN left out, unbiased
    expected = [-2.0, 0.0, 0.0, 2.0, -0.5, -0.5, 0.5, 0.5]
    close(adv, [e / (batch_std + EPS) for e in expected])


@pytest.mark.parametrize("scale", ADVANTAGE_SCALES)
def test_all_nan_group_gives_zero_not_nan(scale):
    rewards = torch.tensor([math.nan, math.nan, 0.0, 1.0])
    adv = group_advantages(rewards, group_size=2, scale=scale)
    assert not torch.isnan(adv).any()
    assert torch.equal(adv[:2], torch.zeros(2))
    assert adv[2] < 0 < adv[3]


@pytest.mark.parametrize(
    "rewards, group_size",
    [
        (torch.zeros(2, 4), 4),  # 2-D
        (torch.zeros(5), 2),  # not a multiple of the group size
        (torch.zeros(()), 1),  # 0-D
    ],
)
def test_bad_shapes_raise(rewards, group_size):
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(rewards, group_size=group_size)


def test_unknown_scale_names_valid_values():
    with pytest.raises(ValueError) as info:
        group_advantages(torch.zeros(4), group_size=2, scale="std")
    message = str(info.value)
    assert "'std'" in message
    for valid in ("group", "batch", "none"):
        assert valid in message


@pytest.mark.parametrize("scale", ADVANTAGE_SCALES)
def test_float64_keeps_dtype_and_values(scale):
    rewards64 = torch.tensor([0.0, 1.0, 2.0, 3.0, 3.0, 3.0, 0.0, 0.0, 3.0], dtype=torch.float64)
    adv64 = group_advantages(rewards64, group_size=3, scale=scale)
    adv32 = group_advantages(rewards64.float(), group_size=3, scale=scale)
    assert adv64.dtype == torch.float64
    assert adv32.dtype == torch.float32
    torch.testing.assert_close(adv64, adv32.double(), atol=1e-6, rtol=1e-6)


def test_advantages_sum_to_zero_per_group():
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(40, generator=g)
    adv = group_advantages(rewards, group_size=8, scale="group").view(5, 8)
    close(adv.sum(dim=1), torch.zeros(5), tol=1e-5)


# ==================================================================================================
# kl_estimate
# ==================================================================================================

LOG_P = math.log(0.5)
LOG_REF = math.log(0.25)


@pytest.mark.parametrize(
    "estimator, expected",
    [
        ("k1", math.log(2.0)),  # log 0.5 − log 0.25
        ("k2", 0.5 * math.log(2.0) ** 2),
        ("k3", 0.5 + math.log(2.0) - 1.0),  # r = ref/p = 0.5: r − log r − 1
    ],
)
def test_kl_estimators_hand_values(estimator, expected):
    out = kl_estimate(torch.tensor([LOG_P]), torch.tensor([LOG_REF]), estimator)
    close(out, [expected])


def test_kl_default_is_k3():
    logp, ref = torch.tensor([LOG_P]), torch.tensor([LOG_REF])
    close(kl_estimate(logp, ref), kl_estimate(logp, ref, "k3"))


def test_kl_identical_policies_is_zero():
    logp = torch.log(torch.tensor([0.1, 0.5, 0.9]))
    for estimator in ("k1", "k2", "k3"):
        close(kl_estimate(logp, logp.clone(), estimator), torch.zeros(3))


def test_k3_nonnegative_on_random_inputs():
    g = torch.Generator().manual_seed(1)
    logp = -5 * torch.rand(64, 32, generator=g)
    ref = -5 * torch.rand(64, 32, generator=g)
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    assert (kl_estimate(logp, ref, "k2") >= 0).all()


def test_kl_unknown_estimator():
    with pytest.raises(ValueError) as info:
        kl_estimate(torch.zeros(1), torch.zeros(1), "k4")
    assert "'k4'" in str(info.value)
    for valid in ("k1", "k2", "k3"):
        assert valid in str(info.value)


# ==================================================================================================
# masked reductions, aggregation, entropy
# ==================================================================================================


def test_masked_mean_hand_values():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    close(masked_mean(values, mask), 3.0)  # (1 + 2 + 4 + 5) / 4
    close(masked_mean(values, mask, dim=-1), [1.5, 4.5])
    close(masked_mean(values, torch.zeros(2, 3)), 0.0)
    close(masked_mean(values, torch.tensor([[1, 1, 1], [0, 0, 0]]), dim=1), [2.0, 0.0])
    bool_mask = torch.tensor([[True, False, False], [False, False, True]])
    close(masked_mean(values, bool_mask), 50.5)


# per-token terms and mask shared by the aggregation tests
PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 99.0, 99.0], [5.0, 99.0, 99.0, 99.0]])
AGG_MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])


@pytest.mark.parametrize(
    "loss_type, max_len, expected",
    [
        ("grpo", None, (2.5 + 15.0 + 5.0) / 3),  # mean over sequences of per-sequence token means
        ("bnpo", None, 45.0 / 7),  # all valid tokens weigh the same
        ("dapo", None, 45.0 / 7),
        ("dr_grpo", None, 45.0 / (3 * 4)),  # constant: B · T
        ("dr_grpo", 10, 45.0 / (3 * 10)),  # constant: B · max_completion_length
    ],
)
def test_aggregate_loss_hand_values(loss_type, max_len, expected):
    close(aggregate_loss(PER_TOKEN, AGG_MASK, loss_type, max_len), expected)


def test_aggregate_loss_all_masked_is_zero():
    for loss_type in LOSS_TYPES:
        out = aggregate_loss(PER_TOKEN, torch.zeros_like(AGG_MASK), loss_type)
        assert out.item() == 0.0 and not torch.isnan(out)


def test_aggregate_loss_unknown_type():
    with pytest.raises(ValueError) as info:
        aggregate_loss(PER_TOKEN, AGG_MASK, "gspo")
    for valid in LOSS_TYPES:
        assert valid in str(info.value)


def test_sampled_token_entropy_hand_values():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.1], [1.0, 0.5, 0.9]]))
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    expected = (math.log(2) + math.log(4) + 0.0 + math.log(2)) / 4
    close(sampled_token_entropy(logp, mask), expected)
    close(sampled_token_entropy(logp, torch.zeros(2, 3)), 0.0)


# ==================================================================================================
# policy_loss: a hand-computed 2 × 3 example
# ==================================================================================================
#
# ratios r = exp(logp − old):  row 0 [1.0, 1.5, 0.5] with A = +1;  row 1 [1.1, 0.7, 2.0] with A = −2
# mask: row 0 all valid; row 1's last token is padding. ε = 0.2 → clip range [0.8, 1.2].
#   row 0: min(r·A, clip(r)·A) = [1.0, 1.2, 0.5]     → per-token loss [−1.0, −1.2, −0.5]
#   row 1: min(r·A, clip(r)·A) = [−2.2, −1.6, −4.0]  → per-token loss [2.2, 1.6, (4.0 masked)]
# sums: row 0 −2.7 over 3 tokens, row 1 3.8 over 2 tokens; total 1.1 over 5 tokens.

RATIOS = torch.tensor([[1.0, 1.5, 0.5], [1.1, 0.7, 2.0]])
OLD_LOGP = torch.log(torch.tensor([[0.3, 0.2, 0.6], [0.5, 0.4, 0.25]]))
LOGP = OLD_LOGP + torch.log(RATIOS)
ADV = torch.tensor([1.0, -2.0])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


@pytest.mark.parametrize(
    "loss_type, max_len, expected",
    [
        ("grpo", None, (-2.7 / 3 + 3.8 / 2) / 2),  # = 0.5
        ("bnpo", None, 1.1 / 5),
        ("dapo", None, 1.1 / 5),
        ("dr_grpo", None, 1.1 / (2 * 3)),
        ("dr_grpo", 10, 1.1 / (2 * 10)),
    ],
)
def test_policy_loss_hand_values(loss_type, max_len, expected):
    loss, _ = policy_loss(LOGP, OLD_LOGP, ADV, MASK, loss_type, epsilon=0.2, max_completion_length=max_len)
    close(loss, expected, tol=1e-5)


def test_policy_loss_clip_metrics_hand_values():
    _, metrics = policy_loss(LOGP, OLD_LOGP, ADV, MASK, "grpo", epsilon=0.2)
    # low: r < 0.8 with A < 0 → row 1 token 1 (0.7). high: r > 1.2 with A > 0 → row 0 token 1 (1.5).
    # row 1 token 2 (r = 2.0, A < 0) is neither, and it is padding anyway.
    close(metrics["clip_ratio/low_mean"], 1 / 5, tol=1e-6)
    close(metrics["clip_ratio/high_mean"], 1 / 5, tol=1e-6)
    close(metrics["clip_ratio/region_mean"], 2 / 5, tol=1e-6)
    close(metrics["ratio_mean"], (1.0 + 1.5 + 0.5 + 1.1 + 0.7) / 5, tol=1e-6)
    for value in metrics.values():
        assert not value.requires_grad


def test_policy_loss_clip_higher():
    # ε_high = 0.6 → upper bound 1.6: row 0's r = 1.5 is no longer clipped (DAPO clip-higher)
    loss, metrics = policy_loss(LOGP, OLD_LOGP, ADV, MASK, "grpo", epsilon=0.2, epsilon_high=0.6)
    close(loss, (-3.0 / 3 + 3.8 / 2) / 2, tol=1e-5)
    close(metrics["clip_ratio/high_mean"], 0.0)
    close(metrics["clip_ratio/low_mean"], 1 / 5, tol=1e-6)
    close(metrics["clip_ratio/region_mean"], 1 / 5, tol=1e-6)
    # ε_high = None means symmetric clipping
    loss_sym, _ = policy_loss(LOGP, OLD_LOGP, ADV, MASK, "grpo", epsilon=0.2, epsilon_high=None)
    loss_explicit, _ = policy_loss(LOGP, OLD_LOGP, ADV, MASK, "grpo", epsilon=0.2, epsilon_high=0.2)
    close(loss_sym, loss_explicit.item())


def test_policy_loss_on_policy_is_minus_mean_advantage():
    # logp == old: ratio 1, nothing clipped, loss = −A averaged as the aggregation prescribes
    logp = torch.log(torch.tensor([[0.5, 0.2, 0.9], [0.4, 0.4, 0.4]]))
    loss, metrics = policy_loss(logp, logp.clone(), torch.tensor([0.5, -1.5]), MASK, "grpo")
    close(loss, -(0.5 - 1.5) / 2)
    close(metrics["ratio_mean"], 1.0)
    close(metrics["clip_ratio/region_mean"], 0.0)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_policy_gradient_direction(loss_type, sign):
    logp = torch.log(torch.tensor([[0.3, 0.2, 0.6], [0.5, 0.4, 0.25]])).requires_grad_(True)
    advantages = torch.tensor([sign * 1.0, sign * 0.5])
    loss, _ = policy_loss(logp, logp.detach(), advantages, MASK, loss_type)
    loss.backward()
    grad = logp.grad
    valid = MASK.bool()
    assert torch.equal(grad[~valid], torch.zeros_like(grad[~valid]))  # padding gets no gradient
    # a gradient-descent step logp − lr·grad raises the log-prob of tokens with positive advantage
    if sign > 0:
        assert (grad[valid] < 0).all()
    else:
        assert (grad[valid] > 0).all()
    stepped = logp.detach() - 0.1 * grad
    delta = (stepped - logp.detach())[valid]
    assert ((delta > 0) if sign > 0 else (delta < 0)).all()


def test_clipped_tokens_get_no_gradient():
    logp = LOGP.clone().requires_grad_(True)
    loss, _ = policy_loss(logp, OLD_LOGP, ADV, MASK, "bnpo", epsilon=0.2)
    loss.backward()
    # row 0 token 1: r = 1.5 > 1.2 with A > 0; row 1 token 1: r = 0.7 < 0.8 with A < 0 → clipped, flat
    assert logp.grad[0, 1] == 0.0
    assert logp.grad[1, 1] == 0.0
    # row 0 token 2: r = 0.5 < 0.8 with A > 0 → the unclipped term is the minimum, gradient flows
    assert logp.grad[0, 2] != 0.0
    # row 1 token 0: inside the clip range
    assert logp.grad[1, 0] != 0.0


# ==================================================================================================
# Agreement with TRL's GRPOTrainer
# ==================================================================================================
#
# Reference transcribed from TRL 1.16.0, ``trl/trainer/grpo_trainer.py``, ``GRPOTrainer._compute_loss``,
# for ``importance_sampling_level="token"``, ``beta=0``, ``delta=None``, no entropy mask, no vLLM
# importance-sampling correction, one process, ``gradient_accumulation_steps=1`` and
# ``steps_per_generation=1`` (so DAPO's ``num_items_in_batch`` is the number of completion tokens in
# the batch). ``GRPOTrainer.__init__`` sets ``epsilon_low = args.epsilon`` and
# ``epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon``.


def trl_reference_loss(per_token_logps, old_per_token_logps, advantages, mask, loss_type, epsilon,
                       epsilon_high, max_completion_length):
    epsilon_low = epsilon
    epsilon_high = epsilon_high if epsilon_high is not None else epsilon
    advantages = advantages.unsqueeze(1)
    log_ratio = per_token_logps - old_per_token_logps
    log_importance_weights = log_ratio
    coef_1 = torch.exp(log_importance_weights)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss1 = coef_1 * advantages
    per_token_loss2 = coef_2 * advantages
    per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    elif loss_type == "dapo":
        num_items_in_batch = mask.sum()
        num_processes, gradient_accumulation_steps, steps_per_generation = 1, 1, 1
        normalizer = num_items_in_batch.clamp(min=1.0) / num_processes
        normalizer = normalizer * gradient_accumulation_steps / steps_per_generation
        loss = (per_token_loss * mask).sum() / normalizer
    else:
        raise ValueError(loss_type)

    def global_masked_mean(x):
        return (x * mask).sum() / mask.sum().float().clamp(min=1.0)

    is_low_clipped = (coef_1 < 1 - epsilon_low) & (advantages < 0)
    is_high_clipped = (coef_1 > 1 + epsilon_high) & (advantages > 0)
    is_region_clipped = is_low_clipped | is_high_clipped
    metrics = {
        "clip_ratio/low_mean": global_masked_mean(is_low_clipped.float()),
        "clip_ratio/high_mean": global_masked_mean(is_high_clipped.float()),
        "clip_ratio/region_mean": global_masked_mean(is_region_clipped.float()),
    }
    return loss, metrics


def random_case(seed: int, batch: int = 6, length: int = 9, spread: float = 0.4):
    g = torch.Generator().manual_seed(seed)
    old = -4.0 * torch.rand(batch, length, generator=g, dtype=torch.float64)
    logp = old + spread * torch.randn(batch, length, generator=g, dtype=torch.float64)
    advantages = torch.randn(batch, generator=g, dtype=torch.float64)
    advantages[0] = 0.0  # a zero-variance group's sample
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).double()
    mask[1] = 0.0  # an all-zero row (e.g. an empty completion)
    # a few holes, as a tool/loss mask would make
    mask = mask * (torch.rand(batch, length, generator=g) > 0.1).double()
    return logp, old, advantages, mask


TRL_CASES = [
    ("grpo", 0.2, None, None),
    ("grpo", 0.2, 0.28, None),
    ("bnpo", 0.2, None, None),
    ("bnpo", 0.1, 0.3, None),
    ("dapo", 0.2, 0.28, None),
    ("dapo", 0.3, None, None),
    ("dr_grpo", 0.2, None, 9),  # max_completion_length = T
    ("dr_grpo", 0.2, 0.28, 32),  # max_completion_length > T
]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("loss_type, epsilon, epsilon_high, max_len", TRL_CASES)
def test_policy_loss_matches_trl_reference(seed, loss_type, epsilon, epsilon_high, max_len):
    logp, old, advantages, mask = random_case(seed)
    ours_in = logp.clone().requires_grad_(True)
    ref_in = logp.clone().requires_grad_(True)
    loss, metrics = policy_loss(ours_in, old, advantages, mask, loss_type, epsilon, epsilon_high, max_len)
    ref_loss, ref_metrics = trl_reference_loss(ref_in, old, advantages, mask, loss_type, epsilon, epsilon_high,
                                               max_len)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    for key, value in ref_metrics.items():
        torch.testing.assert_close(metrics[key].double(), value.double(), atol=1e-6, rtol=1e-6)
    # the gradients (what training actually uses) agree too
    loss.backward()
    ref_loss.backward()
    torch.testing.assert_close(ours_in.grad, ref_in.grad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_clip_metrics_nonzero_in_random_cases(seed):
    # guard that the agreement test above exercises clipping at all (spread 0.4 in log space)
    logp, old, advantages, mask = random_case(seed)
    _, metrics = policy_loss(logp, old, advantages, mask, "grpo", 0.2, 0.28)
    assert metrics["clip_ratio/low_mean"] > 0
    assert metrics["clip_ratio/high_mean"] > 0


def _trl_stub(loss_type: str, epsilon: float, epsilon_high: float | None, max_len: int | None,
              logp: torch.Tensor):
    """The attributes TRL's ``_compute_loss`` reads, for one process and no optional features."""
    ident = lambda x, **_: x  # noqa: E731
    return SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=0.0,
        loss_type=loss_type,
        epsilon_low=epsilon,
        epsilon_high=epsilon if epsilon_high is None else epsilon_high,
        max_completion_length=max_len,
        args=SimpleNamespace(delta=None, steps_per_generation=1, use_bias_correction_kl=False),
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        accelerator=SimpleNamespace(num_processes=1, gather=ident, gather_for_metrics=ident, reduce=ident),
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )


TRL_STUB_VERSION = "1.16."  # the TRL whose GRPOTrainer._compute_loss _trl_stub provides for


@pytest.mark.parametrize("loss_type, epsilon, epsilon_high, max_len", TRL_CASES)
def test_policy_loss_matches_trl_code(loss_type, epsilon, epsilon_high, max_len):
    """Runs TRL's own ``GRPOTrainer._compute_loss`` on a stub trainer (no model needed)."""
    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    logp, old, advantages, mask = random_case(7)
    batch, length = mask.shape
    stub = _trl_stub(loss_type, epsilon, epsilon_high, max_len or length, logp)
    inputs = {
        "prompt_ids": torch.zeros(batch, 2, dtype=torch.long),
        "prompt_mask": torch.ones(batch, 2, dtype=torch.long),
        "completion_ids": torch.zeros(batch, length, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old,
        "num_items_in_batch": mask.sum(),
    }
    try:
        trl_loss = trl_grpo.GRPOTrainer._compute_loss(stub, None, inputs)
    except (AttributeError, KeyError, TypeError) as exc:
        import trl

        # The stub was written against TRL 1.16 (what the project installs): there a failure is a failure. Another
        # TRL may have moved its internals, which says nothing about our loss.
        if trl.__version__.startswith(TRL_STUB_VERSION):
            raise
        pytest.skip(f"TRL {trl.__version__}'s _compute_loss needs more than the stub (for {TRL_STUB_VERSION}) provides: {exc!r}")
    loss, metrics = policy_loss(logp, old, advantages, mask, loss_type, epsilon, epsilon_high, max_len)
    torch.testing.assert_close(loss, trl_loss, atol=1e-6, rtol=1e-6)
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert metrics[key].item() == pytest.approx(stub._metrics["train"][key][-1], abs=1e-6)


# ==================================================================================================
# micro_batch_weight: accumulated micro-batch losses equal the mini-batch loss
# ==================================================================================================

SPLITS = [(3, 1, 4), (1, 1, 6), (8,), (5, 3)]


def _micro_accumulate(logp, old, advantages, mask, loss_type, sizes, max_len=None, epsilon_high=None):
    total = torch.zeros((), dtype=logp.dtype)
    start = 0
    for size in sizes:
        sl = slice(start, start + size)
        start += size
        loss, _ = policy_loss(logp[sl], old[sl], advantages[sl], mask[sl], loss_type, 0.2, epsilon_high, max_len)
        total = total + loss * micro_batch_weight(loss_type, mask[sl], mask, len(sizes))
    assert start == mask.shape[0]
    return total


@pytest.mark.parametrize("sizes", SPLITS)
@pytest.mark.parametrize("loss_type, max_len", [("grpo", None), ("dr_grpo", None), ("dr_grpo", 16), ("dapo", None)])
def test_micro_batches_accumulate_to_full_loss(sizes, loss_type, max_len):
    logp, old, advantages, mask = random_case(11, batch=8, length=7)
    full_in = logp.clone().requires_grad_(True)
    micro_in = logp.clone().requires_grad_(True)
    full, _ = policy_loss(full_in, old, advantages, mask, loss_type, 0.2, 0.28, max_len)
    accumulated = _micro_accumulate(micro_in, old, advantages, mask, loss_type, sizes, max_len, 0.28)
    torch.testing.assert_close(accumulated, full, atol=1e-10, rtol=1e-9)
    full.backward()
    accumulated.backward()
    torch.testing.assert_close(micro_in.grad, full_in.grad, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("sizes", SPLITS)
def test_bnpo_micro_batches_are_mean_of_token_means(sizes):
    logp, old, advantages, mask = random_case(12, batch=8, length=7)
    accumulated = _micro_accumulate(logp, old, advantages, mask, "bnpo", sizes)
    means, start = [], 0
    for size in sizes:
        sl = slice(start, start + size)
        start += size
        ratio = torch.exp(logp[sl] - old[sl])
        adv = advantages[sl].unsqueeze(1)
        per_token = -torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
        means.append((per_token * mask[sl]).sum() / mask[sl].sum().clamp(min=1.0))
    torch.testing.assert_close(accumulated, torch.stack(means).mean(), atol=1e-10, rtol=1e-9)


def test_micro_batch_weight_values():
    full = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]]).float()
    part = full[:1]
    assert micro_batch_weight("grpo", part, full, 3) == pytest.approx(1 / 4)
    assert micro_batch_weight("dr_grpo", full[1:], full, 2) == pytest.approx(3 / 4)
    assert float(micro_batch_weight("dapo", part, full, 3)) == pytest.approx(3 / 6)
    assert float(micro_batch_weight("dapo", full[3:], full, 3)) == 0.0
    assert micro_batch_weight("bnpo", part, full, 4) == pytest.approx(1 / 4)
    with pytest.raises(ValueError, match="loss_type"):
        micro_batch_weight("ppo", part, full, 1)
