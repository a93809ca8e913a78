"""Preference optimisation on the trainer's group sampling: DPO / IPO over on-policy pairs.

Semi-online and online DPO (Lanchantin et al., 2025, "Bridging Offline and Online Reinforcement Learning
for LLMs"; Tajwar et al., 2024): from each group of ``G`` sampled completions, the best and the worst by
reward form a pair (:func:`preference_pairs`; a group whose rewards are all equal gives no pair and is
counted), and the ``dpo`` objective trains on those pairs against a reference model that is re-synced
to the policy every ``s`` steps (``algorithm.ref_sync_steps: s`` with ``ref_sync_alpha: 1``):

* ``s = 1`` — online: the reference is the policy before each update, and rollouts come from it;
* ``s > 1`` — semi-online: rollouts come from the reference's weights (``algorithm.rollout_model:
  reference``), synced with the policy every ``s`` steps;
* ``s = 0`` (never) — offline: pairs are sampled from the initial model throughout, against it as
  reference; or from a fixed dataset of ``chosen`` / ``rejected`` completions (``algorithm.pairs: dataset``).

The pieces are registered components like every other algorithm option: the ``dpo`` objective
(:data:`mmrl.objectives.OBJECTIVES`, compares to ``logps:ref``, pairwise) and the ``preference`` advantage
estimator (+1 for a group's best, −1 for its worst), which tells the objective which row of a pair is
the chosen one. The loss follows TRL's ``DPOTrainer.dpo_loss`` (``sigmoid`` with cDPO label smoothing,
``ipo`` on length-averaged log-probs) and its ``rpo_alpha`` NLL term — except that the NLL term is the
mean over pairs of each chosen completion's token mean, where TRL takes one mean over every chosen token
of the batch: our per-pair weighting stays the same under micro-batching and across processes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmrl.advantages import AdvantageParams, group_statistics, register_advantage_estimator
from mmrl.algorithms import masked_mean
from mmrl.objectives import ObjectiveParams, ObjectiveSpec, register_objective
from mmrl.rewards import register_reward

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------------------
# Pairs from groups
# --------------------------------------------------------------------------------------------------


def preference_pairs(rewards: Tensor, group_id: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per group, the index of the best and of the worst completion by reward (missing rewards ignored).

    Returns ``(chosen [P'], rejected [P'], paired [num_groups] bool)`` for the ``P'`` groups that form a
    pair, in group order: a group with fewer than two valid rewards, or all of them equal, forms none. Ties
    for best or worst go to the lowest index (deterministic)."""
    stats = group_statistics(rewards, group_id)
    num = stats.num_groups
    values = stats.values
    position = torch.arange(rewards.shape[0], device=rewards.device)
    big = rewards.shape[0]

    def first_where(hit: Tensor) -> Tensor:
        # the lowest sample index of each group where ``hit`` holds (big when none)
        candidates = torch.where(hit, position, torch.full_like(position, big))
        out = torch.full((num,), big, dtype=torch.long, device=rewards.device)
        return out.scatter_reduce(0, stats.group_id, candidates, reduce="amin")

    g = stats.group_id
    chosen = first_where(stats.valid & (values == stats.maximum[g]))
    rejected = first_where(stats.valid & (values == stats.minimum[g]))
    paired = ~stats.constant
    return chosen[paired], rejected[paired], paired


@register_advantage_estimator("preference")
def preference_advantages(rewards: Tensor, group_id: Tensor, params: AdvantageParams) -> Tensor:
    """+1 for each group's best completion, −1 for its worst (first index among ties), 0 for the rest and
    for groups without reward spread: which completion DPO's pair prefers (``params`` is unused)."""
    chosen, rejected, _ = preference_pairs(rewards, group_id)
    out = torch.zeros_like(rewards)
    out[chosen] = 1.0
    out[rejected] = -1.0
    return out


# --------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------


def dpo_loss(chosen_logratio: Tensor, rejected_logratio: Tensor, beta: float, loss: str = "sigmoid",
             label_smoothing: float = 0.0) -> Tensor:
    """Per-pair DPO loss from the policy/reference log-ratios of the chosen and rejected completions.

    With ``h = chosen_logratio − rejected_logratio`` (= (log π_c − log π_r) − (log π_ref,c − log π_ref,r)):
    ``sigmoid`` (DPO, Rafailov et al. 2023; cDPO with label smoothing ε): −(1−ε)·log σ(β·h) − ε·log σ(−β·h);
    ``ipo`` (Azar et al. 2023, eq. 17): (h − 1/(2β))² — pass length-averaged log-ratios, as TRL does."""
    h = chosen_logratio - rejected_logratio
    if loss == "sigmoid":
        return -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    if loss == "ipo":
        return (h - 1.0 / (2.0 * beta)) ** 2
    raise ValueError(f"unknown DPO loss {loss!r}; valid: sigmoid, ipo")


@register_objective("dpo", ObjectiveSpec(compares_to="ref", pairwise=True))
def dpo_objective(logp: Tensor, ref_logp: Tensor, advantages: Tensor, mask: Tensor,
                  params: ObjectiveParams) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO on adjacent pairs of rows: rows ``2k`` and ``2k+1`` are one pair, the one with the larger
    advantage (the ``preference`` estimator: +1 / −1) is the chosen completion.

    A sequence's log-ratio is Σ_t (log π − log π_ref) over its valid tokens (the mean for ``ipo``). The pair's
    loss (:func:`dpo_loss`) is put on every valid token of both rows, so the ``grpo`` aggregation (mean over
    sequences of token means) gives the mean over pairs; with ``dpo_nll_coef`` = α, each chosen token also
    carries −2α·log π, i.e. + α · (mean over pairs of the chosen completion's mean token NLL).

    Metrics (means over pairs): ``dpo/reward_accuracy`` (β·h_c > β·h_r, TRL's ``rewards/accuracies``),
    ``dpo/margin`` (β·(h_c − h_r)), ``dpo/chosen_logratio`` and ``dpo/rejected_logratio`` (h_c, h_r),
    ``dpo/nll`` (chosen mean token NLL).
    """
    if logp.shape[0] % 2:
        raise ValueError(f"dpo needs rows in (chosen, rejected) pairs; got an odd batch of {logp.shape[0]} "
                         "(micro_batch_size must be even)")
    mask = mask.to(logp.dtype)
    lengths = mask.sum(dim=1)
    logratio = ((logp - ref_logp) * mask).sum(dim=1)
    if params.dpo_loss == "ipo":
        logratio = logratio / lengths.clamp(min=1.0)
    pair = logratio.view(-1, 2)
    adv = advantages.view(-1, 2)
    chosen_row = (adv[:, 1] > adv[:, 0]).long()  # 0 or 1: the chosen row within each pair
    chosen = pair.gather(1, chosen_row.unsqueeze(1)).squeeze(1)
    rejected = pair.gather(1, (1 - chosen_row).unsqueeze(1)).squeeze(1)
    per_pair = dpo_loss(chosen, rejected, params.dpo_beta, params.dpo_loss, params.dpo_label_smoothing)
    per_token = per_pair.repeat_interleave(2).unsqueeze(-1) * mask
    is_chosen = torch.zeros_like(pair).scatter_(1, chosen_row.unsqueeze(1), 1.0).flatten()
    nll = -masked_mean(logp, mask, dim=1)  # per row
    if params.dpo_nll_coef:
        per_token = per_token - 2.0 * params.dpo_nll_coef * logp * mask * is_chosen.unsqueeze(-1)
    with torch.no_grad():
        beta = params.dpo_beta
        metrics = {
            "dpo/reward_accuracy": (chosen > rejected).float().mean() if chosen.numel() else chosen.new_zeros(()),
            "dpo/margin": (beta * (chosen - rejected)).mean() if chosen.numel() else chosen.new_zeros(()),
            "dpo/chosen_logratio": chosen.mean() if chosen.numel() else chosen.new_zeros(()),
            "dpo/rejected_logratio": rejected.mean() if chosen.numel() else chosen.new_zeros(()),
            "dpo/nll": (nll * is_chosen).sum() / is_chosen.sum().clamp(min=1.0),
        }
    return per_token, {k: v.detach() for k, v in metrics.items()}


@register_reward("preference_label")
def preference_label(prompts: list, completions: list, **columns) -> list[float | None]:
    """The dataset's own preference (the ``preference`` column: 1 chosen, 0 rejected), for offline DPO from
    a fixed preference dataset (``algorithm.pairs: dataset``); missing where a row has none."""
    labels = columns.get("preference") or [None] * len(completions)
    return [None if label is None else float(label) for label in labels]
