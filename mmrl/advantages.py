"""Outcome advantage estimators over groups of different sizes, selected by name.

Every estimator has one signature::

    fn(rewards: Tensor[N], group_id: LongTensor[N], params: AdvantageParams) -> Tensor[N]

``rewards`` holds one scalar per sampled completion; NaN means *missing* (no reward function produced a
value). ``group_id`` maps each sample to its prompt's group, ``0 .. num_groups − 1``, in any order; groups
may have different sizes (after a GFPO filter keeps k of G, or when dynamic sampling concatenates
chunks). The result is one advantage per sample, in ``rewards``' dtype; the trainer broadcasts it over
the completion's tokens.

Shared semantics (every estimator):

* a missing reward gets advantage exactly 0 and is left out of every statistic (group mean, group std,
  batch std), as :func:`mmrl.algorithms.group_advantages` always did and as TRL does with ``nanmean``;
* a baseline-subtracting estimator gives exactly 0 to a group whose valid rewards are all equal or that
  has fewer than two valid rewards (there is nothing to compare against). Exactness does not rely on the
  mean rounding back to the common value: constancy is tested as ``min == max`` over the group, so
  8 × 2.6 or 3 × 0.1 in fp32 (and 3 × 0.1 in fp64, whose mean is not 0.1) give 0, not ±2e-3.
  Statistics are computed in the rewards' dtype, at least fp32; for every non-constant group the
  ``grpo`` values are bit for bit those of the code before this module;
* fully vectorised with segment sums (``index_add_``) and segment min/max (``scatter_reduce_``), on
  whatever device the inputs are on; host synchronisations: reading ``group_id``'s range, and
  selecting the valid rewards for a batch std.

Registered estimators (:data:`ADVANTAGE_ESTIMATORS`):

``grpo``
    GRPO (Shao et al., 2024, DeepSeekMath): ``(r − mean_g) / (std_g + eps)`` with ``params.scale``:
    ``"group"`` (the paper), ``"batch"`` (TRL ``scale_rewards="batch"``: the std of every valid reward in
    the batch, the "Lite PPO" recommendation of Liu et al. 2025, "Tricks or Traps?") or ``"none"``
    (Dr. GRPO, Liu et al. 2025, "Understanding R1-Zero-Like Training"; verl
    ``norm_adv_by_std_in_grpo=False``). std is the unbiased sample std (verl, EasyR1 and TRL all
    use ``torch.std``'s unbiased default). ``eps`` defaults to TRL's 1e-4; verl and EasyR1 use 1e-6.
``rloo``
    REINFORCE Leave-One-Out (Kool et al., 2019; Ahmadian et al., 2024, "Back to Basics"):
    ``A_i = r_i − mean of the other valid rewards of its group`` = ``n/(n−1)·(r_i − mean_g)``. No
    scaling, as verl and EasyR1 (TRL's ``normalize_advantages`` option is not offered).
``reinforce_pp``
    REINFORCE++ (Hu, 2025, arXiv 2501.03262) with outcome rewards: the reward whitened across the
    whole batch, ``(r − mean_batch) / (std_batch + eps)``; no group baseline, so a constant group is
    *not* zero here (it is pushed up or down relative to the batch).
``reinforce_pp_baseline``
    REINFORCE++-baseline (same paper; verl ``reinforce_plus_plus_baseline``): subtract the group mean,
    then divide by the batch std of the centred values. A constant group stays exactly 0.

Where the reference implementations differ, and what we follow:

* **Groups with one sample.** verl's loop versions give such a group mean 0 and std 1, so its
  advantage is the raw reward (grpo, rloo, reinforce_pp_baseline); EasyR1 asserts ``n > 1``; TRL's
  ``nanstd`` / leave-one-out divisor give NaN, which its ``nan_to_num`` turns into 0. We give 0 too.
* **Constant groups.** verl, EasyR1 and TRL compute ``(r − mean) / (0 + eps)`` with an inexact mean,
  so a constant group of non-binary rewards can get non-zero advantages: 8 × 2.6 in fp32 gives
  |A| ≈ 0.19 with eps 1e-6 (verl, EasyR1) and ≈ 2.4e-3 with 1e-4 (TRL, and this project before).
* **Whitening unit.** verl and EasyR1 whiten REINFORCE++ returns per *token*
  (``masked_whiten(returns, response_mask)``), so a long completion weighs more in the mean and
  variance, and ``rsqrt(var + 1e-8)`` instead of ``1/(std + eps)``. Our estimators are per sample (each
  completion weighs once), which is what the trainer's per-sample advantage needs and keeps the
  estimator independent of completion lengths; with ``gamma = 1`` and no per-token KL reward the per-token
  returns are constant over a completion, so only the weighting differs. A per-token KL-in-reward
  variant would need a token-level estimator; it is not this module's job.
* **Re-centring after the baseline.** verl's baseline variant re-subtracts the (token-weighted) batch
  mean after the group mean. With each sample weighing once, the group-centred values already have
  batch mean exactly 0 in exact arithmetic, so we only divide (by ``sqrt(Σ c² / (n − 1)) + eps``,
  Bessel-corrected over the valid samples) and constant groups stay exactly 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Tensor = torch.Tensor

ADVANTAGE_SCALES = ("group", "batch", "none")
DEFAULT_EPS = 1e-4  # TRL's GRPO default; verl/EasyR1 use 1e-6


@dataclass(frozen=True)
class AdvantageParams:
    """Options shared by the advantage estimators (each uses the ones it needs).

    ``scale``: ``grpo`` only — ``group`` | ``batch`` | ``none`` (see the module docstring).
    ``eps``: added to the std before dividing (``grpo``, ``reinforce_pp``, ``reinforce_pp_baseline``).
    """

    scale: str = "group"
    eps: float = DEFAULT_EPS

    def __post_init__(self) -> None:
        if self.scale not in ADVANTAGE_SCALES:
            raise ValueError(f"unknown advantage scale {self.scale!r}; valid: {list(ADVANTAGE_SCALES)}")
        if not (isinstance(self.eps, (int, float)) and 0.0 <= float(self.eps) < float("inf")):
            raise ValueError(f"eps must be a finite number >= 0, got {self.eps!r}")


AdvantageEstimator = Callable[[Tensor, Tensor, AdvantageParams], Tensor]

ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}


def register_advantage_estimator(name: str) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator: register ``fn(rewards, group_id, params) -> advantages`` under ``name``."""

    def decorator(fn: AdvantageEstimator) -> AdvantageEstimator:
        if name in ADVANTAGE_ESTIMATORS and ADVANTAGE_ESTIMATORS[name] is not fn:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return decorator


def get_advantage_estimator(name: str) -> AdvantageEstimator:
    """The estimator registered as ``name``; an unknown name lists the valid ones."""
    try:
        return ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown advantage estimator {name!r}; valid: {sorted(ADVANTAGE_ESTIMATORS)}"
        ) from None


def compute_advantages(
    name: str, rewards: Tensor, group_id: Tensor, params: AdvantageParams | None = None
) -> Tensor:
    """Per-sample advantages from the estimator registered as ``name`` (default params if ``None``)."""
    return get_advantage_estimator(name)(
        rewards, group_id, params if params is not None else AdvantageParams()
    )


# --------------------------------------------------------------------------------------------------
# Segment statistics over groups
# --------------------------------------------------------------------------------------------------


def work_dtype(values: Tensor) -> torch.dtype:
    """Statistics in at least fp32; fp64 input stays fp64 (rewards like 1000.0 vs 1000.001 need it).

    Deliberately not fp64 for fp32 input: exact zeros come from ``min == max``, and fp32 statistics
    keep today's advantages bit for bit for 0/1 and graded rewards (so existing runs and benchmarks
    do not move); fp64 would also be unavailable on MPS."""
    return torch.promote_types(values.dtype, torch.float32)


def check_groups(rewards: Tensor, group_id: Tensor) -> int:
    """Validate ``rewards [N]`` / ``group_id [N]`` and return the number of groups (max id + 1)."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be a floating-point tensor, got {rewards.dtype}")
    if group_id.dim() != 1 or group_id.shape[0] != rewards.shape[0]:
        raise ValueError(
            f"group_id must be 1-D with one entry per reward ({rewards.shape[0]}), "
            f"got shape {tuple(group_id.shape)}"
        )
    if group_id.dtype.is_floating_point or group_id.dtype == torch.bool or group_id.dtype.is_complex:
        raise ValueError(f"group_id must be an integer tensor, got {group_id.dtype}")
    if group_id.device != rewards.device:
        raise ValueError(f"group_id is on {group_id.device} but rewards on {rewards.device}")
    if group_id.numel() == 0:
        return 0
    low, high = (int(v) for v in torch.stack(torch.aminmax(group_id)).tolist())
    if low < 0:
        raise ValueError(f"group_id must be >= 0, got a minimum of {low}")
    return high + 1


@dataclass
class GroupStats:
    """Per-sample validity and per-group statistics of the valid rewards (work dtype).

    ``values``: rewards in the work dtype with missing ones set to 0; ``valid``: not NaN;
    ``count``/``total``/``mean``/``minimum``/``maximum``: per group, over valid rewards only (mean 0,
    min +inf and max −inf for a group with none); ``constant``: fewer than two valid rewards, or all of
    them exactly equal.
    """

    group_id: Tensor
    valid: Tensor
    values: Tensor
    count: Tensor
    total: Tensor
    mean: Tensor
    minimum: Tensor
    maximum: Tensor
    constant: Tensor

    @property
    def num_groups(self) -> int:
        return self.count.shape[0]


def segment_sum(values: Tensor, group_id: Tensor, num_groups: int) -> Tensor:
    """Sum of ``values`` per group: ``out[g] = Σ_{i: group_id[i] = g} values[i]``."""
    out = torch.zeros(num_groups, dtype=values.dtype, device=values.device)
    return out.index_add_(0, group_id, values)


def group_statistics(rewards: Tensor, group_id: Tensor, num_groups: int | None = None) -> GroupStats:
    """Count, sum, mean, min and max of each group's valid (non-NaN) rewards, vectorised."""
    inferred = check_groups(rewards, group_id)
    if num_groups is None:
        num_groups = inferred
    elif num_groups < inferred:
        raise ValueError(f"num_groups={num_groups} but group_id contains {inferred - 1}")
    dtype = work_dtype(rewards)
    group_id = group_id.long()
    x = rewards.to(dtype)
    valid = ~torch.isnan(x)
    values = torch.where(valid, x, torch.zeros_like(x))
    count = segment_sum(valid.to(dtype), group_id, num_groups)
    total = segment_sum(values, group_id, num_groups)
    mean = total / count.clamp(min=1.0)
    inf = torch.full_like(x, float("inf"))
    minimum = torch.full((num_groups,), float("inf"), dtype=dtype, device=x.device)
    minimum = minimum.scatter_reduce(0, group_id, torch.where(valid, x, inf), reduce="amin")
    maximum = torch.full((num_groups,), float("-inf"), dtype=dtype, device=x.device)
    maximum = maximum.scatter_reduce(0, group_id, torch.where(valid, x, -inf), reduce="amax")
    constant = (count < 2) | (minimum == maximum)
    return GroupStats(group_id, valid, values, count, total, mean, minimum, maximum, constant)


def _finish(advantages: Tensor, zero: Tensor, like: Tensor) -> Tensor:
    """Exact zeros where ``zero`` is set, cast back to the rewards' dtype."""
    return torch.where(zero, torch.zeros_like(advantages), advantages).to(like.dtype)


def _centred(stats: GroupStats) -> Tensor:
    """Each valid reward minus its group's mean; 0 for missing rewards."""
    g = stats.group_id
    return torch.where(stats.valid, stats.values - stats.mean[g], torch.zeros_like(stats.values))


def _batch_std(values: Tensor, valid: Tensor) -> Tensor:
    """Unbiased std of the ``valid`` entries of ``values`` (``torch.std``, as the code before the
    registry and TRL's ``nanstd``); 0 with fewer than two."""
    selected = values[valid]
    return selected.std() if selected.numel() > 1 else values.new_zeros(())


def _rms_about_zero(values: Tensor, valid: Tensor) -> Tensor:
    """``sqrt(Σ v² / (n − 1))`` over the ``valid`` entries: the unbiased std of values whose mean is 0 by
    construction (group-centred values, each sample weighing once)."""
    n = valid.sum()
    squares = torch.where(valid, values**2, torch.zeros_like(values))
    return (squares.sum() / (n - 1).clamp(min=1)).sqrt()


# --------------------------------------------------------------------------------------------------
# Estimators
# --------------------------------------------------------------------------------------------------


@register_advantage_estimator("grpo")
def grpo_advantages(rewards: Tensor, group_id: Tensor, params: AdvantageParams) -> Tensor:
    """GRPO: ``(r − mean_group) / (std + eps)``, std per ``params.scale`` (group | batch | none)."""
    stats = group_statistics(rewards, group_id)
    g = stats.group_id
    centred = _centred(stats)
    if params.scale == "group":
        var = segment_sum(centred**2, g, stats.num_groups) / (stats.count - 1.0).clamp(min=1.0)
        advantages = centred / (var.sqrt()[g] + params.eps)
    elif params.scale == "batch":
        # The std of all valid rewards in the batch (TRL scale_rewards="batch"), not of the centred values.
        advantages = centred / (_batch_std(stats.values, stats.valid) + params.eps)
    else:
        advantages = centred
    return _finish(advantages, stats.constant[g] | ~stats.valid, rewards)


@register_advantage_estimator("rloo")
def rloo_advantages(rewards: Tensor, group_id: Tensor, params: AdvantageParams) -> Tensor:
    """RLOO: ``r_i − (Σ_group r − r_i) / (n − 1)`` over the group's n valid rewards; unscaled."""
    stats = group_statistics(rewards, group_id)
    g = stats.group_id
    others = (stats.total[g] - stats.values) / (stats.count[g] - 1.0).clamp(min=1.0)
    return _finish(stats.values - others, stats.constant[g] | ~stats.valid, rewards)


@register_advantage_estimator("reinforce_pp")
def reinforce_pp_advantages(rewards: Tensor, group_id: Tensor, params: AdvantageParams) -> Tensor:
    """REINFORCE++: rewards whitened over every valid sample of the batch (no group baseline)."""
    stats = group_statistics(rewards, group_id)
    if rewards.numel() == 0:
        return rewards.clone()
    valid = stats.valid
    n = valid.sum()
    mean = stats.values.sum() / n.clamp(min=1)
    std = _batch_std(stats.values, valid)
    # The whole batch is one "group" here: fewer than two valid rewards, or all equal, gives exactly 0.
    batch_constant = (n < 2) | (stats.minimum.min() == stats.maximum.max())
    advantages = (stats.values - mean) / (std + params.eps)
    return _finish(advantages, batch_constant | ~valid, rewards)


@register_advantage_estimator("reinforce_pp_baseline")
def reinforce_pp_baseline_advantages(rewards: Tensor, group_id: Tensor, params: AdvantageParams) -> Tensor:
    """REINFORCE++-baseline: group-mean baseline, then divided by the batch std of the centred values."""
    stats = group_statistics(rewards, group_id)
    g = stats.group_id
    zero = stats.constant[g] | ~stats.valid
    centred = torch.where(zero, torch.zeros_like(stats.values), _centred(stats))
    # Batch mean of group-centred values is 0 by construction (each sample weighs once): divide only.
    std = _rms_about_zero(centred, stats.valid)
    return _finish(centred / (std + params.eps), zero, rewards)
