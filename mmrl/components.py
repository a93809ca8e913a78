"""Step components: reward shaping, group filters and per-token weights, registered by name.

The trainer runs three phases of a rollout step through every component the config turns on, in
registration order (:data:`STEP_COMPONENTS`):

* ``shape(batch)`` — change rewards after they are computed (e.g. DAPO's overlong penalty);
* ``select(batch)`` — group filters before the advantages: take samples out of the loss (``mask_out``)
  and, where their statistics must not count, out of the advantage estimate (NaN reward) — GFPO,
  masking truncated completions;
* ``weigh(batch)`` — after the no-grad preparation: per-token weights and masks (TIS / MIS).

A component declares what it ``needs`` prepared (the vocabulary of :mod:`mmrl.loss_terms`, e.g.
``"logps:sampler"``), reports per-step ``metrics()`` (fixed keys), and, if it carries state from step
to step, ``state_dict()`` / ``load_state_dict()`` — the trainer checkpoints it per process. Adding one is a
registered factory; the trainer is not edited.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mmrl import algorithms, group_filters
from mmrl.config import TrainConfig
from mmrl.objectives import mismatch_weights, top_entropy_mask
from mmrl.registry import build_enabled, registrar
from mmrl.step import StepBatch

Tensor = torch.Tensor


class StepComponent:
    """Base class: every phase is a no-op unless overridden."""

    needs: frozenset[str] = frozenset()

    def shape(self, batch: StepBatch) -> None:
        """Change ``batch.rewards`` (``[B]``, NaN = missing)."""

    def select(self, batch: StepBatch) -> None:
        """Take samples out of the loss / the advantage statistics."""

    def weigh(self, batch: StepBatch) -> None:
        """Add per-token weights (``batch.token_weights``) or token masks (``batch.mask_out``)."""

    def metrics(self) -> dict[str, float]:
        return {}


ComponentFactory = Callable[[TrainConfig], "StepComponent | None"]
STEP_COMPONENTS: dict[str, ComponentFactory] = {}


register_component = registrar(STEP_COMPONENTS, "step component")


def build_components(cfg: TrainConfig) -> dict[str, StepComponent]:
    """Every registered step component the config turns on, by name (registration order)."""
    return build_enabled(STEP_COMPONENTS, cfg)


def completion_lengths(batch: StepBatch) -> Tensor:
    return batch.rollout.completion_mask.sum(dim=1)


def prompt_key(prompt: object) -> str:
    """A short, stable key for a prompt (JSON-able, for components that remember prompts across steps)."""
    return hashlib.sha1(repr(prompt).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- DAPO overlong


@dataclass
class OverlongPenalty(StepComponent):
    """DAPO's soft overlong punishment added to the reward (Yu et al., 2025, eq. 13)."""

    max_length: int
    cache_length: int
    factor: float
    last_mean: float = 0.0

    def shape(self, batch: StepBatch) -> None:
        penalty = group_filters.overlong_penalty(completion_lengths(batch), self.max_length, self.cache_length,
                                                 self.factor).to(batch.rewards)
        batch.rewards = batch.rewards + penalty
        self.last_mean = float(penalty.mean())

    def metrics(self) -> dict[str, float]:
        return {"filters/overlong_penalty_mean": self.last_mean}


@register_component("overlong_penalty")
def _overlong(cfg: TrainConfig) -> OverlongPenalty | None:
    f = cfg.filters
    if not f.overlong_cache_length:
        return None
    return OverlongPenalty(cfg.sampling.max_new_tokens, f.overlong_cache_length, f.overlong_penalty_factor)


# ---------------------------------------------------------------------------------------------- KL in reward


@dataclass
class KLInReward(StepComponent):
    """β·KL(π_old ‖ π_ref) as a reward penalty (verl's ``use_kl_in_reward``): each token's reward is
    −β·kl_t and outcome estimators see the sequence sum, so the reward becomes r − β·Σ_t kl_t (verl's
    GRPO/RLOO sum the token-level rewards the same way). π_old is the policy that sampled the rollout.
    Replaces the KL loss term (``algorithm.kl_in_reward``); a missing reward stays missing."""

    beta: float
    estimator: str
    clamp: bool
    needs: frozenset[str] = frozenset({"logps:old", "logps:ref"})
    last: dict[str, float] = field(default_factory=dict)

    def shape(self, batch: StepBatch) -> None:
        old = batch.logps["old"]
        mask = batch.rollout.completion_mask.to(old)
        kl = algorithms.kl_estimate(old, batch.logps["ref"].to(old), self.estimator, clamp=self.clamp) * mask
        penalty = self.beta * kl.sum(dim=1)
        batch.rewards = batch.rewards - penalty.to(batch.rewards)
        self.last = {"kl": float(kl.sum() / mask.sum().clamp(min=1)), "kl_reward_penalty": float(penalty.mean())}

    def metrics(self) -> dict[str, float]:
        return dict(self.last)


@register_component("kl_in_reward")
def _kl_in_reward(cfg: TrainConfig) -> KLInReward | None:
    alg = cfg.algorithm
    if not alg.kl_in_reward or alg.beta <= 0:
        return None
    return KLInReward(alg.beta, alg.kl_estimator, alg.kl_clamp)


# ---------------------------------------------------------------------------------------------- truncation


@dataclass
class MaskTruncated(StepComponent):
    """Completions that hit the length limit without stopping leave the loss (TRL's
    ``mask_truncated_completions``); as in TRL their rewards still count in the group statistics."""

    last_fraction: float = 0.0

    def select(self, batch: StepBatch) -> None:
        keep = group_filters.truncated_mask(batch.rollout.truncated)
        batch.mask_out(keep)
        self.last_fraction = float((~keep).float().mean())

    def metrics(self) -> dict[str, float]:
        return {"filters/truncated_masked_frac": self.last_fraction}


@register_component("mask_truncated")
def _truncated(cfg: TrainConfig) -> MaskTruncated | None:
    return MaskTruncated() if cfg.filters.mask_truncated else None


# ---------------------------------------------------------------------------------------------- GFPO


@dataclass
class GFPO(StepComponent):
    """Group Filtered Policy Optimization (Shrivastava et al., 2025): sample G, keep the k best of each
    group by ``metric`` (shortest, or highest reward per token); the advantages come from the kept
    subset's statistics and the others leave the loss entirely. With ``adaptive`` the k of a group
    depends on its prompt's difficulty (streaming quantiles of mean group reward; harder keeps more)."""

    k: int
    metric: str
    adaptive: group_filters.AdaptiveK | None = None
    last: dict[str, float] = field(default_factory=dict)

    def select(self, batch: StepBatch) -> None:
        rewards = batch.rewards
        if self.adaptive is not None:  # difficulty from the full group, before filtering
            firsts = torch.unique_consecutive(batch.group_id, return_counts=True)[1].cumsum(0) - 1
            keys = [prompt_key(batch.rollout.prompts[int(i)]) for i in firsts]
            k = self.adaptive.assign(keys, rewards, batch.group_id)
        else:
            k = self.k
        keep = group_filters.gfpo_keep(rewards, completion_lengths(batch).to(rewards), batch.group_id, k, self.metric)
        batch.rewards = group_filters.mask_rewards(rewards, keep)
        batch.mask_out(keep)
        kept_lengths = completion_lengths(batch)[keep].float()
        self.last = {"filters/gfpo_kept_frac": float(keep.float().mean()),
                     "filters/gfpo_kept_mean_length": float(kept_lengths.mean()) if keep.any() else 0.0}
        if self.adaptive is not None:  # k per group and the difficulty thresholds in force
            self.last.update(self.adaptive.metrics(torch.as_tensor(k), prefix="filters/gfpo_"))

    def metrics(self) -> dict[str, float]:
        return dict(self.last)

    def state_dict(self) -> dict:
        return {} if self.adaptive is None else self.adaptive.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.adaptive is not None:
            self.adaptive.load_state_dict(state)


@register_component("gfpo")
def _gfpo(cfg: TrainConfig) -> GFPO | None:
    f = cfg.filters
    if f.gfpo_k is None:
        return None
    adaptive = (group_filters.AdaptiveK(k_per_bucket=tuple(f.gfpo_k_per_bucket), quantiles=tuple(f.gfpo_quantiles))
                if f.gfpo_adaptive else None)
    return GFPO(f.gfpo_k, f.gfpo_metric, adaptive)


# ---------------------------------------------------------------------------------------------- TIS / MIS


@dataclass
class MismatchCorrection(StepComponent):
    """Rollout/training mismatch (Yao et al., 2025, "Your efficient RL framework secretly brings you
    off-policy RL training"): weight each token's loss by the truncated ratio π_old/π_sampler (TIS) or
    drop tokens/sequences whose ratio is out of range (MIS) — TRL's four modes. ``π_old`` is the trainer's
    model at rollout time, ``π_sampler`` what the sampler reported (``Rollout.sampler_logp``): another
    engine, another precision, or — in image generation with ``logprob_mode: cond`` — the CFG-guided
    distribution the tokens were actually drawn from."""

    mode: str
    cap: float
    low: float | None
    high: float | None
    needs: frozenset[str] = frozenset({"logps:old", "logps:sampler"})
    last: dict[str, float] = field(default_factory=dict)

    def weigh(self, batch: StepBatch) -> None:
        old = batch.logps["old"]
        sampler = batch.logps["sampler"].to(old)
        mask = batch.loss_mask.to(old)
        weights, keep, metrics = mismatch_weights(old, sampler, mask, self.mode, cap=self.cap, low=self.low,
                                                  high=self.high)
        batch.token_weights["mismatch"] = weights.detach()
        batch.mask_out(keep)
        self.last = {k: float(v) for k, v in metrics.items()}

    def metrics(self) -> dict[str, float]:
        return dict(self.last)


@register_component("mismatch")
def _mismatch(cfg: TrainConfig) -> MismatchCorrection | None:
    m = cfg.mismatch
    if m.mode is None:
        return None
    return MismatchCorrection(m.mode, m.cap, m.low, m.high)


# ---------------------------------------------------------------------------------------------- top entropy


@dataclass
class TopEntropy(StepComponent):
    """Train on the top ``fraction`` of tokens by entropy ("Beyond the 80/20 Rule", Wang et al., 2025):
    the rest leave the loss. Entropies are the pre-update policy's, ranked over the whole rollout batch
    (so micro-batching cannot change which tokens train); the paper and TRL rank inside each training
    forward — with one update per rollout the values are the same, only the ranking scope differs."""

    fraction: float
    needs: frozenset[str] = frozenset({"entropy:old"})
    last_fraction: float = 0.0

    def weigh(self, batch: StepBatch) -> None:
        before = batch.loss_mask > 0
        keep = top_entropy_mask(batch.entropies["old"].to(batch.loss_mask), before.float(), self.fraction)
        batch.mask_out(keep)
        self.last_fraction = float(keep.sum() / before.sum().clamp(min=1))

    def metrics(self) -> dict[str, float]:
        return {"filters/top_entropy_kept_frac": self.last_fraction}


@register_component("top_entropy")
def _top_entropy(cfg: TrainConfig) -> TopEntropy | None:
    q = cfg.filters.top_entropy_fraction
    return None if q is None else TopEntropy(q)
