"""Terms added to the policy objective, as registered components.

A term is built from the config by its factory (``None`` when the config leaves it off), declares what it
needs the trainer to prepare (``needs``: e.g. ``"logps:ref"`` — log-probs under the frozen reference, which
makes the trainer build a reference model; ``"views:masked"`` — PAPO's masked-input view), and returns its
contribution to one micro-batch's loss. Adding a term is one registered factory; the trainer is not edited.

Every term aggregates through :attr:`MicroBatch.aggregate`, which normalises by the *whole mini-batch's*
token and sequence counts summed over processes (see :func:`mmrl.algorithms.aggregate_loss`), so
micro-batching and the number of processes never change the gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from mmrl import algorithms
from mmrl.config import TrainConfig
from mmrl.registry import build_enabled, registrar
from mmrl.step import StepBatch

Tensor = torch.Tensor


@dataclass
class MicroBatch:
    """What a loss term sees for one micro-batch."""

    batch: StepBatch  # the micro-batch's samples (logps, views, masks sliced alike)
    logp: Tensor  # [b, T] log-probs under the model being trained (with gradient)
    entropy: Tensor | None  # [b, T] full-distribution entropies, when the policy computes them
    mask: Tensor  # [b, T] the loss mask on the training device
    model: torch.nn.Module
    policy: Any
    rollout_step: int
    max_steps: int
    # (per-token values, mask, name of the normaliser) -> globally normalised scalar
    aggregate: Callable[[Tensor, Tensor, str], Tensor]


class LossTerm(Protocol):
    needs: frozenset[str]

    def __call__(self, mb: MicroBatch) -> tuple[Tensor, dict[str, Tensor]]: ...


TermFactory = Callable[[TrainConfig], "LossTerm | None"]
LOSS_TERMS: dict[str, TermFactory] = {}


register_loss_term = registrar(LOSS_TERMS, "loss term")


def build_loss_terms(cfg: TrainConfig) -> dict[str, LossTerm]:
    """Every registered loss term the config turns on, by name (registration order)."""
    return build_enabled(LOSS_TERMS, cfg)


# ---------------------------------------------------------------------------------------------- KL to reference


@dataclass
class KLPenalty:
    """β · KL(π ‖ π_ref), per token with the configured estimator, aggregated like the policy loss."""

    beta: float
    estimator: str
    clamp: bool
    needs: frozenset[str] = frozenset({"logps:ref"})

    def __call__(self, mb: MicroBatch) -> tuple[Tensor, dict[str, Tensor]]:
        ref = mb.batch.logps["ref"].to(mb.logp.device)
        kl = algorithms.kl_estimate(mb.logp, ref, self.estimator, clamp=self.clamp)
        term = self.beta * mb.aggregate(kl, mb.mask, "loss")
        return term, {"kl": algorithms.masked_mean(kl.detach(), mb.mask)}


@register_loss_term("kl")
def _kl(cfg: TrainConfig) -> KLPenalty | None:
    alg = cfg.algorithm
    if alg.beta <= 0 or getattr(alg, "kl_in_reward", False):
        return None
    return KLPenalty(alg.beta, alg.kl_estimator, getattr(alg, "kl_clamp", False))


# ---------------------------------------------------------------------------------------------- entropy bonus


@dataclass
class EntropyBonus:
    """− c · H: rewards keeping the token distribution broad (verl's ``entropy_coeff``)."""

    coef: float
    needs: frozenset[str] = frozenset({"entropy:grad"})  # the full distribution's entropy, with gradient

    def __call__(self, mb: MicroBatch) -> tuple[Tensor, dict[str, Tensor]]:
        if mb.entropy is None:
            raise ValueError("algorithm.entropy_coef > 0 needs a policy whose log_probs() returns entropies")
        return -self.coef * mb.aggregate(mb.entropy, mb.mask, "loss"), {}


@register_loss_term("entropy_bonus")
def _entropy(cfg: TrainConfig) -> EntropyBonus | None:
    coef = getattr(cfg.algorithm, "entropy_coef", 0.0)
    return EntropyBonus(coef) if coef > 0 else None
