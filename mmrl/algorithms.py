"""The RL math, as small pure functions over tensors.

Shapes: per-token tensors are ``[B, T]`` (B = sampled completions, T = completion tokens, right-padded)
with a ``mask`` of the same shape (1 = real token); per-sample tensors are ``[B]``. Every function is
vectorised over the batch and runs on whatever device its inputs are on.

Advantage estimators, KL estimators, loss aggregations and policy objectives (:mod:`mmrl.objectives`,
re-exported here as :data:`OBJECTIVES`) are registered by name (as in verl's ``core_algos.py``), so a
config can pick them and later algorithms can add their own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from mmrl.advantages import (  # noqa: F401  (re-exported: the registry lives in mmrl.advantages)
    ADVANTAGE_ESTIMATORS,
    ADVANTAGE_SCALES,
    AdvantageParams,
    compute_advantages,
    grpo_advantages,
    register_advantage_estimator,
)

if TYPE_CHECKING:
    from mmrl.objectives import ObjectiveParams

Tensor = torch.Tensor

# The objective registry lives in mmrl.objectives (which imports this module); these names are re-exported
# lazily so that ``mmrl.algorithms.OBJECTIVES`` works whichever module is imported first.
_OBJECTIVE_EXPORTS = ("OBJECTIVES", "ObjectiveParams", "get_objective", "register_objective")


def __getattr__(name: str) -> Any:
    if name in _OBJECTIVE_EXPORTS:
        from mmrl import objectives

        return getattr(objectives, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------------
# Masked reductions
# --------------------------------------------------------------------------------------------------


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` where ``mask`` is set (0 when nothing is set)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


# --------------------------------------------------------------------------------------------------
# Group advantages (GRPO; Dr. GRPO)
# --------------------------------------------------------------------------------------------------


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """GRPO's group-relative advantages for equal-size, contiguous groups.

    ``rewards`` is ``[P*G]`` with each prompt's ``G = group_size`` samples contiguous. Each reward is
    centred on its group's mean; then divided by the group's std (``"group"``, GRPO), by the std of
    all rewards in the batch (``"batch"``), or left unscaled (``"none"``, Dr. GRPO). std is the unbiased
    sample std, as in TRL. A group whose rewards are all equal gets advantage exactly 0.

    NaN rewards (no reward function produced a value) are left out of their group's statistics and
    get advantage 0, so a failed scorer never pushes the policy either way.

    Delegates to the ``grpo`` estimator of :mod:`mmrl.advantages` with ``group_id = arange(N) // G``;
    use that module directly for groups of different sizes and the other estimators.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; valid: {list(ADVANTAGE_SCALES)}")
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards must be 1-D with a multiple of group_size={group_size} entries, got shape {tuple(rewards.shape)}"
        )
    group_id = torch.arange(rewards.numel(), device=rewards.device) // group_size
    return grpo_advantages(rewards, group_id, AdvantageParams(scale=scale, eps=eps))


# --------------------------------------------------------------------------------------------------
# KL estimators (Schulman, "Approximating KL divergence")
# --------------------------------------------------------------------------------------------------


def _kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return logp - ref_logp


def _kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return 0.5 * (logp - ref_logp) ** 2


def _kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1.0


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": _kl_k1, "k2": _kl_k2, "k3": _kl_k3}

KL_LOG_RATIO_CLAMP = 20.0  # verl's kl_penalty_forward ("low_var_kl" / "k3"), and EasyR1's compute_kl
KL_K3_CLAMP = 10.0


def _kl_k3_clamped(logp: Tensor, ref_logp: Tensor) -> Tensor:
    log_ratio = (ref_logp - logp).clamp(-KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)
    return (torch.exp(log_ratio) - log_ratio - 1.0).clamp(-KL_K3_CLAMP, KL_K3_CLAMP)


_CLAMPED_KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k3": _kl_k3_clamped}


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: str = "k3", clamp: bool = False) -> Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from log-probs of tokens sampled from π.

    ``k1`` = logp − ref (unbiased, high variance), ``k2`` = (logp − ref)²/2, ``k3`` = e^(ref−logp) −
    (ref − logp) − 1 (unbiased, always ≥ 0; the GRPO paper's choice).

    ``clamp=True`` applies verl's clamps (``kl_penalty_forward``, mode ``low_var_kl``/``k3``; EasyR1's
    ``compute_kl`` is the same): for k3 the log-ratio is clamped to ±20 before ``exp`` and the estimate to
    [−10, 10] (its gradient is then 0 where a clamp is active). verl clamps neither k1 nor k2, so neither
    do we. ``clamp=False`` (the default) is TRL's unclamped k3.
    """
    try:
        fn = KL_ESTIMATORS[estimator]
    except KeyError:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid: {sorted(KL_ESTIMATORS)}") from None
    if clamp:
        fn = _CLAMPED_KL_ESTIMATORS.get(estimator, fn)
    return fn(logp, ref_logp)


# --------------------------------------------------------------------------------------------------
# Loss aggregation: how per-token terms become one scalar
# --------------------------------------------------------------------------------------------------


Normaliser = float | Tensor | None


def _normaliser(value: float | Tensor, like: Tensor) -> Tensor:
    # Global counts may arrive as Python numbers or (all-reduced) tensors; never divide by less than 1.
    return torch.as_tensor(value, dtype=like.dtype, device=like.device).clamp(min=1.0)


def _agg_sequence_mean(per_token: Tensor, mask: Tensor, max_completion_length: int | None,
                       global_tokens: Normaliser, global_sequences: Normaliser) -> Tensor:
    # GRPO (paper): each sequence's token mean, then the mean over sequences.
    mask = mask.to(per_token.dtype)
    sequence_means = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    if global_sequences is None:
        return sequence_means.mean()
    return sequence_means.sum() / _normaliser(global_sequences, per_token)


def _agg_token_mean(per_token: Tensor, mask: Tensor, max_completion_length: int | None,
                    global_tokens: Normaliser, global_sequences: Normaliser) -> Tensor:
    # BNPO / DAPO: every valid token in the batch weighs the same (long answers are not down-weighted).
    mask = mask.to(per_token.dtype)
    tokens = mask.sum().clamp(min=1.0) if global_tokens is None else _normaliser(global_tokens, per_token)
    return (per_token * mask).sum() / tokens


def _agg_constant_normaliser(per_token: Tensor, mask: Tensor, max_completion_length: int | None,
                             global_tokens: Normaliser, global_sequences: Normaliser) -> Tensor:
    # Dr. GRPO: divide by a constant (B · max length) so the loss has no length bias at all.
    total = (per_token * mask.to(per_token.dtype)).sum()
    if global_sequences is None:
        length = max_completion_length if max_completion_length is not None else per_token.shape[-1]
        return total / (per_token.shape[0] * length)
    if max_completion_length is None:
        raise ValueError("dr_grpo with global counts needs max_completion_length (micro-batches may be "
                         "padded to different lengths, so the local T is not a constant)")
    return total / (_normaliser(global_sequences, per_token) * max_completion_length)


AggregationFn = Callable[[Tensor, Tensor, "int | None", Normaliser, Normaliser], Tensor]

LOSS_AGGREGATIONS: dict[str, AggregationFn] = {
    "grpo": _agg_sequence_mean,
    "bnpo": _agg_token_mean,
    "dapo": _agg_token_mean,
    "dr_grpo": _agg_constant_normaliser,
}

# Which global count each aggregation divides by.
_GLOBAL_COUNT_NEEDED = {"grpo": "global_sequences", "bnpo": "global_tokens", "dapo": "global_tokens",
                        "dr_grpo": "global_sequences"}


def aggregate_loss(
    per_token: Tensor,
    mask: Tensor,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    global_tokens: float | Tensor | None = None,
    global_sequences: float | Tensor | None = None,
) -> Tensor:
    """Reduce a ``[B, T]`` per-token term to a scalar the way ``loss_type`` prescribes.

    Without global counts (the default) the batch given is the whole batch: ``grpo`` = mean over the B
    sequences of each one's token mean, ``bnpo``/``dapo`` = mean over its valid tokens, ``dr_grpo`` = sum
    over B · ``max_completion_length`` (T when not given).

    **Global normalisation** (verl's ``agg_loss`` with ``global_batch_info``): pass the mini-batch's counts
    from :func:`global_counts` (summed over its micro-batches, and all-reduced over processes) and this
    returns the micro-batch's *local sum* over the *global* normaliser, so the values of the micro-batches
    add up to exactly the whole mini-batch's aggregated loss, and so do their gradients:

    - ``bnpo``, ``dapo``: Σ loss·mask / ``global_tokens`` (both become the mini-batch's token mean; TRL's
      ``bnpo`` is instead the mean of per-micro-batch token means, see :func:`micro_batch_weight`);
    - ``grpo``: Σ_i mean_t(loss_i) / ``global_sequences``;
    - ``dr_grpo``: Σ loss·mask / (``global_sequences`` · ``max_completion_length``), which is then required.

    The micro-batch losses are then summed (not averaged) into the gradient. Under DDP, which *averages*
    gradients over the ``world_size`` processes, the trainer multiplies each process's loss by
    ``world_size`` so that the averaged gradient is the gradient of the global loss (verl's ``* dp_size``).
    Normalisers below 1 are treated as 1 (an all-padding mini-batch gives 0, not NaN).
    """
    try:
        fn = LOSS_AGGREGATIONS[loss_type]
    except KeyError:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {sorted(LOSS_AGGREGATIONS)}") from None
    if global_tokens is not None or global_sequences is not None:
        needed = _GLOBAL_COUNT_NEEDED.get(loss_type)
        given = {"global_tokens": global_tokens, "global_sequences": global_sequences}
        if needed is not None and given[needed] is None:
            raise ValueError(f"loss_type {loss_type!r} with global normalisation needs {needed}")
    return fn(per_token, mask, max_completion_length, global_tokens, global_sequences)


def global_counts(mask: Tensor, count_empty_sequences: bool = True) -> tuple[Tensor, Tensor]:
    """(valid tokens, sequences) of ``mask``, as fp32 tensors on its device, ready to be summed over the
    micro-batches of a mini-batch and all-reduced (SUM) over processes, then handed to
    :func:`aggregate_loss`.

    Sequences are the rows of ``mask``, including all-padding rows (TRL's convention, and what
    :func:`aggregate_loss` divides by without global counts, so local and global results agree).
    ``count_empty_sequences=False`` counts only rows with a valid token (verl's ``agg_loss``), so that
    samples removed from the loss (e.g. filtered out of their group) do not dilute the mean.
    """
    valid = mask.to(torch.float32)
    tokens = valid.sum()
    if count_empty_sequences:
        sequences = torch.tensor(float(mask.shape[0]), device=mask.device)
    else:
        sequences = (valid.sum(-1) > 0).to(torch.float32).sum()
    return tokens, sequences


def micro_batch_weight(loss_type: str, micro_mask: Tensor, full_mask: Tensor, num_micro: int) -> float | Tensor:
    """Factor for a micro-batch's loss so that accumulated gradients equal the mini-batch loss's.

    ``grpo`` and ``dr_grpo`` average over sequences, so a micro-batch counts by its share of sequences;
    ``dapo`` averages over every token of the mini-batch, so by its share of tokens; ``bnpo`` is the
    mean of per-micro-batch token means (TRL's definition), so each micro-batch weighs the same.
    """
    if loss_type in ("grpo", "dr_grpo"):
        return micro_mask.shape[0] / full_mask.shape[0]
    if loss_type == "dapo":
        return micro_mask.sum() / full_mask.sum().clamp(min=1.0)
    if loss_type == "bnpo":
        return 1.0 / num_micro
    raise ValueError(f"unknown loss_type {loss_type!r}; valid: {sorted(LOSS_AGGREGATIONS)}")


# --------------------------------------------------------------------------------------------------
# Clipped policy-gradient loss (PPO surrogate, GRPO family)
# --------------------------------------------------------------------------------------------------


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    loss_type: str = "grpo",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    max_completion_length: int | None = None,
    objective: str = "ppo",
    params: ObjectiveParams | None = None,
    token_weights: Tensor | None = None,
    global_tokens: float | Tensor | None = None,
    global_sequences: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Policy-ratio objective with GRPO-family aggregation.

    ``objective`` names an entry of :data:`OBJECTIVES` (:mod:`mmrl.objectives`); the default ``"ppo"`` is
    the PPO-clipped surrogate: token ratio r = exp(logp − old_logp), clipped to [1 − ε, 1 + ε_high]
    (ε_high defaults to ε; DAPO's "clip-higher" sets it larger), per-token loss −min(r·A, clip(r)·A).
    ``params`` (:class:`~mmrl.objectives.ObjectiveParams`) carries every objective's settings; when it is
    None it is built from ``epsilon`` and ``epsilon_high`` (which are ignored when ``params`` is given).

    The per-token loss is multiplied by ``token_weights`` when given (e.g. the TIS/MIS weights of
    :func:`mmrl.objectives.mismatch_weights`, as verl's ``rollout_is_weights`` and TRL's
    ``importance_sampling_ratio``), then aggregated by ``loss_type`` (:func:`aggregate_loss`, with the
    global counts when given). Returns the loss and the objective's detached metrics; for ``ppo``:
    ``clip_ratio/low_mean`` (tokens clipped at the lower bound with A < 0), ``clip_ratio/high_mean`` (upper
    bound, A > 0), ``clip_ratio/region_mean`` (either), ``ratio_mean``, ``ratio_min``, ``ratio_max``.
    """
    from mmrl.objectives import ObjectiveParams, get_objective

    fn = get_objective(objective)
    if params is None:
        params = ObjectiveParams(epsilon=epsilon, epsilon_high=epsilon_high)
    per_token, metrics = fn(logp, old_logp, advantages, mask, params)
    if token_weights is not None:
        per_token = per_token * token_weights
    loss = aggregate_loss(per_token, mask, loss_type, max_completion_length, global_tokens, global_sequences)
    return loss, metrics


def group_token_diversity(ids: Tensor, mask: Tensor, group_size: int) -> Tensor:
    """Mean, over pairs of samples of the same group, of the fraction of positions where their tokens
    differ (positions valid in both). 0 means every group sampled identical sequences: mode collapse.
    Returns one value per group ``[P]``."""
    b, t = ids.shape
    ids, valid = ids.view(-1, group_size, t), mask.view(-1, group_size, t).bool()
    both = valid.unsqueeze(2) & valid.unsqueeze(1)  # [P, G, G, T]
    differ = (ids.unsqueeze(2) != ids.unsqueeze(1)) & both
    frac = differ.sum(-1).float() / both.sum(-1).clamp(min=1).float()  # [P, G, G]
    off_diagonal = ~torch.eye(group_size, dtype=torch.bool, device=ids.device)
    pairs = max(group_size * (group_size - 1), 1)
    return (frac * off_diagonal).sum((1, 2)) / pairs


def sampled_token_entropy(logp: Tensor, mask: Tensor) -> Tensor:
    """Entropy estimated from the sampled tokens alone: mean of −logp over valid tokens (a scalar).

    Cheap (needs no full distribution) and what PAPO's double-entropy terms use."""
    return masked_mean(-logp, mask)


# --------------------------------------------------------------------------------------------------
# PAPO: implicit perception loss (Wang et al., 2025)
# --------------------------------------------------------------------------------------------------

PERCEPTION_LOG_RATIO_CLAMP = 20.0
PERCEPTION_KL_MAX = 10.0


def perception_kl(logp: Tensor, masked_logp: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(π(·|q, I) ‖ π(·|q, I_masked)) from tokens sampled with the real image.

    As in PAPO's official code, computed in fp32 on the clamped log-ratio x = clamp(masked_logp − logp, ±20),
    and the estimate clamped to ≤ 10: k1 = −x, k2 = x²/2, k3 = eˣ − x − 1 (the default: every published
    PAPO run uses k3, though the official config dataclass defaults to k1).
    """
    x = (masked_logp.float() - logp.float()).clamp(-PERCEPTION_LOG_RATIO_CLAMP, PERCEPTION_LOG_RATIO_CLAMP)
    if estimator == "k1":
        kl = -x
    elif estimator == "k2":
        kl = 0.5 * x**2
    elif estimator == "k3":
        kl = torch.exp(x) - x - 1.0
    else:
        raise ValueError(f"unknown perception KL estimator {estimator!r}; valid: ['k1', 'k2', 'k3']")
    return kl.clamp(max=PERCEPTION_KL_MAX)


GAMMA_SCHEDULES = ("constant", "linear")


def scheduled_weight(base: float, step: int, total_steps: int, schedule: str = "constant",
                     anneal_fraction: float = 1.0) -> float:
    """A loss weight at ``step`` (0-based): ``constant``, or ``linear`` decay from ``base`` to 0 reached at
    ``anneal_fraction * total_steps`` and held at 0 after (PAPO's γ annealing)."""
    if schedule == "constant":
        return base
    if schedule != "linear":
        raise ValueError(f"unknown schedule {schedule!r}; valid: {list(GAMMA_SCHEDULES)}")
    if not 0.0 < anneal_fraction <= 1.0:
        raise ValueError(f"anneal_fraction must be in (0, 1], got {anneal_fraction}")
    horizon = max(1.0, anneal_fraction * total_steps)
    return base * max(0.0, 1.0 - step / horizon)
