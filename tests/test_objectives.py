"""Tests for :mod:`mmrl.objectives`' policy objectives and registry: hand-computed values (with padding and
sequences of different lengths) for every objective, their gradients, presets and parameter checks. The
loss-normalisation, KL-clamp, TIS/MIS and entropy helpers are in ``tests/test_objectives_weights.py``."""

from __future__ import annotations

import math

import pytest
import torch

from mmrl import algorithms
from mmrl.algorithms import aggregate_loss, policy_loss
from mmrl.objectives import (
    OBJECTIVE_PRESETS,
    OBJECTIVES,
    ObjectiveParams,
    get_objective,
    objective_spec,
    preset_params,
    register_objective,
)

F64 = torch.float64
LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
# Policy-ratio objectives (compared to the sampling policy); dpo, a pairwise loss against the reference,
# has its own tests (tests/test_preference.py).
RATIO_OBJECTIVES = sorted(n for n in OBJECTIVES if objective_spec(n).compares_to == "old")


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def close(actual, expected, tol: float = 1e-6) -> None:
    actual = torch.as_tensor(actual)
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=tol, rtol=tol)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def inputs_from_log_ratio(log_ratio, old_logp=None):
    """(logp with grad, old_logp) with logp − old_logp = log_ratio."""
    log_ratio = t(log_ratio)
    old = torch.full_like(log_ratio, -1.0) if old_logp is None else t(old_logp)
    return (old + log_ratio).requires_grad_(True), old


def run(objective, logp, old, adv, mask, **params):
    return get_objective(objective)(logp, old, t(adv), mask, ObjectiveParams(**params))


# ==================================================================================================
# ppo: dual-clip and TRL's delta (the plain clipped loss is covered by tests/test_algorithms.py)
# ==================================================================================================
#
# ε = 0.2 (clip range [0.8, 1.2]), C = 3. Row 0, A = −1, r = [5, 2, 0.5]; row 1, A = +2, r = [5, 1, pad].
#   row 0: −min(r·A, clip(r)·A) = [5, 2, 0.8];  dual-clip caps A < 0 at −A·C = 3 → [3, 2, 0.8]
#   row 1: −min(2r, 2·clip(r)) = [−2.4, −2]  (A > 0: untouched)

PPO_LOG_RATIO = [[math.log(5.0), math.log(2.0), math.log(0.5)], [math.log(5.0), 0.0, math.log(100.0)]]
PPO_ADV = [-1.0, 2.0]
PPO_MASK = t([[1, 1, 1], [1, 1, 0]])


@pytest.mark.parametrize("option", [{"dual_clip": 3.0}, {"delta": 3.0}])
def test_ppo_dual_clip_and_delta_hand_values(option):
    logp, old = inputs_from_log_ratio(PPO_LOG_RATIO)
    per_token, metrics = run("ppo", logp, old, PPO_ADV, PPO_MASK, epsilon=0.2, **option)
    close(per_token * PPO_MASK, [[3.0, 2.0, 0.8], [-2.4, -2.0, 0.0]])
    close(metrics["clip_ratio/low_mean"], 1 / 5)  # row 0 token 2: r = 0.5 < 0.8, A < 0
    close(metrics["clip_ratio/high_mean"], 1 / 5)  # row 1 token 0: r = 5 > 1.2, A > 0
    close(metrics["clip_ratio/region_mean"], 2 / 5)
    key = "clip_ratio/dual_mean" if "dual_clip" in option else "clip_ratio/delta_mean"
    close(metrics[key], 1 / 5)  # row 0 token 0: A < 0 and r = 5 > 3
    close(metrics["ratio_min"], 0.5)
    close(metrics["ratio_max"], 5.0)  # the padding's r = 100 is ignored
    (per_token * PPO_MASK).sum().backward()
    # capped (row 0 token 0) and clipped (row 0 token 2, row 1 token 0) tokens have no gradient
    close(logp.grad, [[0.0, 2.0, 0.0], [0.0, -2.0, 0.0]])


@pytest.mark.parametrize("ratio", [3.5, 10.0, 1e4])
def test_dual_clip_caps_loss_exactly_at_minus_a_c(ratio):
    logp, old = inputs_from_log_ratio([[math.log(ratio)] * 2])
    per_token, _ = run("ppo", logp, old, [-0.7], t([[1, 1]]), dual_clip=3.0)
    close(per_token, [[2.1, 2.1]], tol=1e-12)  # −A·C = 0.7 · 3
    per_token.sum().backward()
    assert torch.equal(logp.grad, torch.zeros_like(logp.grad))
    unclipped, _ = run("ppo", logp, old, [-0.7], t([[1, 1]]))
    close(unclipped, [[0.7 * ratio] * 2], tol=1e-9)  # without dual-clip the loss grows with r


def test_ppo_defaults_unchanged_without_options():
    logp, old = inputs_from_log_ratio(PPO_LOG_RATIO)
    per_token, metrics = run("ppo", logp, old, PPO_ADV, PPO_MASK)
    close(per_token * PPO_MASK, [[5.0, 2.0, 0.8], [-2.4, -2.0, 0.0]])
    assert "clip_ratio/dual_mean" not in metrics and "clip_ratio/delta_mean" not in metrics


# ==================================================================================================
# gspo / gspo_token
# ==================================================================================================
#
# ε = ε_high = 0.2. Row 0 (3 tokens, A = +1): log r [0.3, −0.1, 0.1] → s = e^0.1 = 1.105171, inside →
# loss −1.105171. Row 1 (2 tokens, A = +2): log r [0.6, 0.2] → s = e^0.4 = 1.491825 > 1.2 → loss
# −min(2.98365, 2.4) = −2.4 (clipped). Row 2 (1 token, A = −1): log r [−0.5] → s = e^−0.5 = 0.606531 <
# 0.8 → loss −min(−0.606531, −0.8) = 0.8 (clipped). Padding log r = 5 must not count.
# grpo aggregation: (−1.105171 − 2.4 + 0.8) / 3. Gradient: only row 0 is unclipped, each of its tokens
# gets (1/B)·(−A·s/|y|) = −e^0.1 / 9.

SEQ_LOG_RATIO = [[0.3, -0.1, 0.1], [0.6, 0.2, 5.0], [-0.5, 5.0, 5.0]]
SEQ_MASK = t([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
SEQ_ADV = [1.0, 2.0, -1.0]


@pytest.mark.parametrize("objective", ["gspo", "gspo_token"])
def test_gspo_hand_values(objective):
    logp, old = inputs_from_log_ratio(SEQ_LOG_RATIO)
    per_token, metrics = run(objective, logp, old, SEQ_ADV, SEQ_MASK, epsilon=0.2)
    s0 = math.exp(0.1)
    close(per_token, [[-s0, -s0, -s0], [-2.4, -2.4, 0.0], [0.8, 0.0, 0.0]])
    loss = aggregate_loss(per_token, SEQ_MASK, "grpo")
    close(loss, (-s0 - 2.4 + 0.8) / 3)
    loss.backward()
    close(logp.grad, [[-s0 / 9] * 3, [0.0] * 3, [0.0] * 3])
    close(metrics["clip_ratio/low_mean"], 1 / 3)  # fractions of sequences
    close(metrics["clip_ratio/high_mean"], 1 / 3)
    close(metrics["clip_ratio/region_mean"], 2 / 3)
    close(metrics["ratio_mean"], (s0 + math.exp(0.4) + math.exp(-0.5)) / 3)
    close(metrics["ratio_min"], math.exp(-0.5))
    close(metrics["ratio_max"], math.exp(0.4))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gspo_token_matches_gspo_value_and_gradient(loss_type):
    logp, old, adv, mask = random_case(3)
    grads, losses = [], []
    for objective in ("gspo", "gspo_token"):
        x = logp.clone().requires_grad_(True)
        params = ObjectiveParams(epsilon=0.05, epsilon_high=0.08)
        loss, _ = policy_loss(x, old, adv, mask, loss_type, objective=objective, params=params,
                              max_completion_length=16)
        loss.backward()
        losses.append(loss)
        grads.append(x.grad)
    close(losses[0], losses[1], tol=1e-10)
    close(grads[0], grads[1], tol=1e-10)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gspo_equals_ppo_when_every_ratio_is_one(loss_type):
    logp, _, adv, mask = random_case(4)
    results = {}
    for objective in ("ppo", "gspo"):
        x = logp.clone().requires_grad_(True)
        loss, _ = policy_loss(x, logp.detach(), adv, mask, loss_type, objective=objective,
                              max_completion_length=9)
        loss.backward()
        results[objective] = (loss, x.grad)
    close(results["gspo"][0], results["ppo"][0], tol=1e-10)
    close(results["gspo"][1], results["ppo"][1], tol=1e-10)


def test_gspo_gradient_differs_from_ppo_off_policy():
    # no clipping (wide range); row 0: 3 tokens, A = +1; row 1: 2 tokens, A = −0.5; grpo aggregation
    log_ratio = [[0.2, -0.3, 0.4], [0.1, -0.2, 9.0]]
    mask = t([[1, 1, 1], [1, 1, 0]])
    adv = [1.0, -0.5]
    grads = {}
    for objective in ("ppo", "gspo"):
        logp, old = inputs_from_log_ratio(log_ratio)
        loss, _ = policy_loss(logp, old, t(adv), mask, "grpo", epsilon=10.0, objective=objective)
        loss.backward()
        grads[objective] = logp.grad
    # PPO: token t gets −A·r_t / (|y|·B); GSPO: every token gets −A·s / (|y|·B), s = e^(mean log r)
    ppo = [[-math.exp(x) / 6 for x in (0.2, -0.3, 0.4)], [0.5 * math.exp(x) / 4 for x in (0.1, -0.2)] + [0.0]]
    s0, s1 = math.exp(0.1), math.exp(-0.05)
    close(grads["ppo"], ppo)
    close(grads["gspo"], [[-s0 / 6] * 3, [0.5 * s1 / 4] * 2 + [0.0]])
    assert not torch.allclose(grads["ppo"], grads["gspo"])
    # same direction: descending raises the log-probs of the A > 0 sequence and lowers the A < 0 one
    valid = mask.bool()
    assert (torch.sign(grads["ppo"]) == torch.sign(grads["gspo"]))[valid].all()
    assert (grads["gspo"][0] < 0).all() and (grads["gspo"][1, :2] > 0).all()


# ==================================================================================================
# gmpo
# ==================================================================================================
#
# ε = ε_high = 0.4 (preset). Row 0 (A = +1): log r [0.6, −0.8, 0.2] → A > 0 caps above at 0.4 (−0.8 is
# left free) → [0.4, −0.8, 0.2], mean −0.2/3 → ratio e^(−1/15) = 0.935507, loss −0.935507.
# Row 1 (A = −2, 2 tokens): log r [−0.6, 0.9] → A < 0 floors at −0.4 → [−0.4, 0.9], mean 0.25 → ratio
# e^0.25, loss 2·e^0.25 = 2.568051. Row 2 (A = 0, 1 token): loss 0.
# Gradient (grpo, /B = 3): row 0 tokens 1, 2: −A·ratio/|y|/3 = −e^(−1/15)/9 (token 0 clipped: 0);
# row 1 token 1: 2·e^0.25/2/3 = e^0.25/3 (token 0 clipped: 0).


def test_gmpo_hand_values():
    logp, old = inputs_from_log_ratio([[0.6, -0.8, 0.2], [-0.6, 0.9, 7.0], [0.5, 7.0, 7.0]])
    per_token, metrics = run("gmpo", logp, old, [1.0, -2.0, 0.0], SEQ_MASK, epsilon=0.4, epsilon_high=0.4)
    r0, r1 = math.exp(-1 / 15), math.exp(0.25)
    close(per_token, [[-r0] * 3, [2 * r1, 2 * r1, 0.0], [0.0] * 3])
    loss = aggregate_loss(per_token, SEQ_MASK, "grpo")
    close(loss, (-r0 + 2 * r1) / 3)
    loss.backward()
    close(logp.grad, [[0.0, -r0 / 9, -r0 / 9], [0.0, r1 / 3, 0.0], [0.0] * 3])
    close(metrics["clip_ratio/high_mean"], 1 / 6)  # tokens: row 0 token 0 (A > 0, log r > 0.4)
    close(metrics["clip_ratio/low_mean"], 1 / 6)  # row 1 token 0 (A < 0, log r < −0.4)
    close(metrics["clip_ratio/region_mean"], 2 / 6)
    close(metrics["ratio_max"], math.exp(0.5))  # row 2's ratio (A = 0: no clip)
    close(metrics["ratio_min"], r0)


# ==================================================================================================
# cispo
# ==================================================================================================
#
# ε_high = 0.2 → weight cap 1.2, no lower bound. Row 0 (A = +1): logp [−1, −2, −0.5], r [1.5, 0.5, 1]
# → w [1.2, 0.5, 1] → loss −w·A·logp = [1.2, 1.0, 0.5]. Row 1 (A = −2): logp [−0.25, −3, pad],
# r [2, 0.1] → w [1.2, 0.1] → loss [−1.2·(−2)·(−0.25), −0.1·(−2)·(−3)] = [−0.6, −0.6].
# dapo aggregation: 1.5 / 5 = 0.3; ∂/∂logp = −w·A / 5 = [[−0.24, −0.1, −0.2], [0.48, 0.04, 0]].

CISPO_LOGP = [[-1.0, -2.0, -0.5], [-0.25, -3.0, -1.0]]
CISPO_RATIO = [[1.5, 0.5, 1.0], [2.0, 0.1, 50.0]]
CISPO_MASK = t([[1, 1, 1], [1, 1, 0]])


def cispo_inputs():
    logp = t(CISPO_LOGP).requires_grad_(True)
    return logp, logp.detach() - torch.log(t(CISPO_RATIO))


def test_cispo_hand_values_and_clipped_tokens_keep_gradient():
    logp, old = cispo_inputs()
    per_token, metrics = run("cispo", logp, old, [1.0, -2.0], CISPO_MASK, epsilon_high=0.2)
    close(per_token, [[1.2, 1.0, 0.5], [-0.6, -0.6, 0.0]])
    loss = aggregate_loss(per_token, CISPO_MASK, "dapo")
    close(loss, 0.3)
    loss.backward()
    close(logp.grad, [[-0.24, -0.1, -0.2], [0.48, 0.04, 0.0]])
    assert logp.grad[0, 0] != 0 and logp.grad[1, 0] != 0  # capped at 1.2, still a gradient
    close(metrics["clip_ratio/high_mean"], 2 / 5)
    close(metrics["clip_ratio/low_mean"], 0.0)
    close(metrics["ratio_mean"], (1.5 + 0.5 + 1.0 + 2.0 + 0.1) / 5)
    close(metrics["ratio_min"], 0.1)
    close(metrics["ratio_max"], 2.0)


def test_cispo_optional_lower_bound():
    # cispo_epsilon_low = 0.6 → weights ≥ 0.4: row 1 token 1 (r = 0.1) → −0.4·(−2)·(−3) = −2.4
    logp, old = cispo_inputs()
    per_token, metrics = run("cispo", logp, old, [1.0, -2.0], CISPO_MASK, epsilon_high=0.2,
                             cispo_epsilon_low=0.6)
    close(per_token, [[1.2, 1.0, 0.5], [-0.6, -2.4, 0.0]])
    close(metrics["clip_ratio/low_mean"], 1 / 5)
    close(metrics["clip_ratio/region_mean"], 3 / 5)


# ==================================================================================================
# sapo
# ==================================================================================================
#
# f(r) = σ(τ(r − 1))·4/τ, loss −f(r)·A; τ = 1 for A > 0, 1.05 otherwise.
# Row 0 (A = +1): r [1, 2] → [−σ(0)·4, −σ(1)·4] = [−2, −2.924234]. Row 1 (A = −1): r [1, 0.5] →
# [σ(0)·4/1.05, σ(−0.525)·4/1.05] = [1.904762, 1.415939]. ∂loss/∂logp = −A·4σ(1−σ)·r.


def test_sapo_hand_values():
    logp, old = inputs_from_log_ratio([[0.0, math.log(2.0), 3.0], [0.0, math.log(0.5), 3.0]])
    mask = t([[1, 1, 0], [1, 1, 0]])
    per_token, metrics = run("sapo", logp, old, [1.0, -1.0], mask)
    s1, sn = sigmoid(1.0), sigmoid(-0.525)
    close(per_token, [[-2.0, -4 * s1, 0.0], [2 / 1.05, 4 * sn / 1.05, 0.0]])
    per_token.sum().backward()
    close(logp.grad, [[-1.0, -4 * s1 * (1 - s1) * 2.0, 0.0], [1.0, 4 * sn * (1 - sn) * 0.5, 0.0]])
    close(metrics["sapo/gate_grad_mean"], (1.0 + 4 * s1 * (1 - s1) + 1.0 + 4 * sn * (1 - sn)) / 4)
    close(metrics["ratio_max"], 2.0)
    close(metrics["ratio_min"], 0.5)


# ==================================================================================================
# every objective: on-policy gradient, padding, empty batches, registry
# ==================================================================================================


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


@pytest.mark.parametrize("objective", RATIO_OBJECTIVES)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_on_policy_gradient_equals_ppo(objective, loss_type):
    """At r = 1 every objective's gradient is the policy gradient −A·∇log π (aggregated the same way)."""
    logp, _, adv, mask = random_case(5)
    grads = []
    for name in ("ppo", objective):
        x = logp.clone().requires_grad_(True)
        loss, _ = policy_loss(x, logp.detach(), adv, mask, loss_type, objective=name, max_completion_length=7)
        loss.backward()
        grads.append(x.grad)
    close(grads[1], grads[0], tol=1e-10)


@pytest.mark.parametrize("objective", RATIO_OBJECTIVES)
def test_padding_values_do_not_matter(objective):
    logp, old, adv, mask = random_case(6)
    junk_logp = torch.where(mask.bool(), logp, torch.full_like(logp, -1e4))
    junk_old = torch.where(mask.bool(), old, torch.full_like(old, 30.0))
    out = {}
    for name, (lp, od) in {"clean": (logp, old), "junk": (junk_logp, junk_old)}.items():
        x = lp.clone().requires_grad_(True)
        loss, metrics = policy_loss(x, od, adv, mask, "grpo", objective=objective)
        loss.backward()
        out[name] = (loss, x.grad, metrics)
    close(out["junk"][0], out["clean"][0], tol=1e-10)
    close(out["junk"][1], out["clean"][1], tol=1e-10)
    for key, value in out["clean"][2].items():
        close(out["junk"][2][key], value, tol=1e-10)
        assert not value.requires_grad


@pytest.mark.parametrize("objective", RATIO_OBJECTIVES)
def test_all_padding_batch_is_zero_and_finite(objective):
    logp, old, adv, _ = random_case(7)
    mask = torch.zeros_like(logp)
    for loss_type in LOSS_TYPES:
        loss, metrics = policy_loss(logp, old, adv, mask, loss_type, objective=objective)
        assert loss.item() == 0.0
        assert all(torch.isfinite(v).all() for v in metrics.values())


def test_unknown_objective_lists_valid_names():
    logp, old, adv, mask = random_case(0)
    for call in (lambda: get_objective("grpo_plus"),
                 lambda: policy_loss(logp, old, adv, mask, objective="grpo_plus")):
        with pytest.raises(ValueError) as info:
            call()
        assert "'grpo_plus'" in str(info.value)
        for name in ("ppo", "gspo", "gspo_token", "gmpo", "cispo", "sapo"):
            assert name in str(info.value)


def test_registry_is_reexported_and_extensible():
    assert algorithms.OBJECTIVES is OBJECTIVES
    assert algorithms.ObjectiveParams is ObjectiveParams

    @register_objective("test_reinforce")
    def reinforce(logp, old_logp, advantages, mask, params):
        return -advantages.unsqueeze(-1) * logp, {}

    try:
        logp, old, adv, mask = random_case(1)
        loss, _ = policy_loss(logp, old, adv, mask, "dapo", objective="test_reinforce")
        close(loss, aggregate_loss(-adv.unsqueeze(-1) * logp, mask, "dapo"))
        with pytest.raises(ValueError, match="already registered"):
            register_objective("test_reinforce")(lambda *a: None)
    finally:
        del OBJECTIVES["test_reinforce"]


@pytest.mark.parametrize("bad", [
    {"epsilon": -0.1}, {"epsilon_high": -0.01}, {"epsilon": math.nan}, {"dual_clip": 1.0}, {"dual_clip": 0.5},
    {"delta": 0.9}, {"tau_pos": 0.0}, {"tau_neg": -1.0}, {"cispo_epsilon_low": -1.0},
])
def test_invalid_params_raise(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        ObjectiveParams(**bad)


def test_presets():
    assert set(OBJECTIVE_PRESETS) == set(RATIO_OBJECTIVES)  # dpo: presets dpo, dpo_online, dpo_semi, dpo_offline
    gspo = preset_params("gspo")
    assert (gspo.epsilon, gspo.epsilon_high) == (3e-4, 4e-4)
    assert preset_params("gmpo").upper_epsilon == 0.4
    assert preset_params("gspo", epsilon_high=1e-3).epsilon_high == 1e-3  # user overrides win
    assert preset_params("sapo").tau_neg == 1.05
    assert OBJECTIVE_PRESETS["cispo"]["loss_type"] == "dapo"
    with pytest.raises(ValueError, match="valid"):
        preset_params("nope")


def test_policy_loss_params_and_token_weights():
    logp, old, adv, mask = random_case(2)
    params = ObjectiveParams(epsilon=0.1, epsilon_high=0.3)
    per_token, _ = get_objective("ppo")(logp, old, adv, mask, params)
    weights = torch.rand(logp.shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    loss, _ = policy_loss(logp, old, adv, mask, "grpo", epsilon=0.9, params=params, token_weights=weights)
    close(loss, aggregate_loss(per_token * weights, mask, "grpo"), tol=1e-12)  # params win over epsilon=
