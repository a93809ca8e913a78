"""PAPO's implicit perception loss as a term of the one trainer's loss (Wang et al., 2025).

The policy supplies a *counterfactual view* of a rollout — the same completions conditioned on degraded
inputs (for a VLM: the images with random patches blacked out; see :class:`MaskedViewPolicy`). The term

    − γ·KL_prcp + η₁·H_orig + η₂·H_mask

is added to the policy loss, with KL_prcp = KL(π(o|q,I) ‖ π(o|q,I_masked)) estimated per token
(:func:`mmrl.algorithms.perception_kl`) and aggregated like the policy loss, and H the sampled-token
entropy estimate (mean −logp). Subtracting the KL rewards answers that depend on the input the mask
destroys. Samples without a view (e.g. text-only prompts) get no perception term.

``masked_grad: false`` (the paper's default) scores the masked view without gradient: the KL gradient then
flows only through the original-view log-probs and η₂ has no effect on the update (the official code
behaves this way too, their issue #20). ``masked_grad: true`` back-propagates through both views, at the
cost of the masked forward's activations.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from mmrl import algorithms
from mmrl.config import PAPOConfig, TrainConfig
from mmrl.loss_terms import MicroBatch, register_loss_term
from mmrl.policy import Rollout

logger = logging.getLogger(__name__)

Tensor = torch.Tensor


@runtime_checkable
class MaskedViewPolicy(Protocol):
    """What a policy adds to support PAPO."""

    def masked_view(self, rollout: Rollout, generator: torch.Generator) -> tuple[Rollout, Tensor]:
        """The rollout with degraded conditioning (same completions), and a bool ``[B]`` marking the
        samples that have a view. One mask per prompt, shared by its whole group; drawn from ``generator``."""
        ...


def perception_term(logp: Tensor, masked_logp: Tensor, mask: Tensor, has_view: Tensor, cfg: PAPOConfig,
                    gamma: float, loss_type: str = "grpo", max_completion_length: int | None = None,
                    aggregate: Callable[[Tensor, Tensor], Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The PAPO addition to the loss for one micro-batch, and its monitors. ``aggregate`` reduces a
    per-token term over the view's tokens the way the policy loss is reduced (default: ``loss_type``'s
    aggregation over this micro-batch alone).

    As in the official code, both entropy weights follow γ's schedule: η·γ_t/γ₀ (they are regularisers of
    the perception term and fade with it)."""
    if aggregate is None:
        def aggregate(values: Tensor, m: Tensor) -> Tensor:
            return algorithms.aggregate_loss(values, m, loss_type, max_completion_length)
    view_mask = mask * has_view.to(mask.dtype).unsqueeze(-1)
    kl = algorithms.perception_kl(logp, masked_logp, cfg.kl_estimator)
    kl_in_loss = kl if cfg.kl_token_clip is None else kl.clamp(max=cfg.kl_token_clip)
    term = -gamma * aggregate(kl_in_loss, view_mask)
    eta_scale = gamma / cfg.gamma if cfg.gamma > 0 else 1.0
    if cfg.eta_orig:
        term = term + cfg.eta_orig * eta_scale * aggregate(-logp, view_mask)
    if cfg.eta_mask:
        term = term + cfg.eta_mask * eta_scale * aggregate(-masked_logp, view_mask)
    metrics = {
        "papo/perception_kl": algorithms.masked_mean(kl.detach(), view_mask),
        "papo/entropy_orig": algorithms.masked_mean(-logp.detach(), view_mask),
        "papo/entropy_masked": algorithms.masked_mean(-masked_logp.detach(), view_mask),
    }
    return term, metrics


@dataclass
class PerceptionLoss:
    """PAPO as a loss term of the one trainer: needs the policy's masked view of each rollout."""

    cfg: PAPOConfig
    needs: frozenset[str] = frozenset({"views:masked"})

    def __call__(self, mb: MicroBatch) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        gamma = algorithms.scheduled_weight(cfg.gamma, mb.rollout_step, mb.max_steps, cfg.gamma_schedule,
                                            cfg.anneal_fraction)
        view, has_view = mb.batch.views["masked"]
        # One batched extra forward per micro-batch (no gradient unless papo.masked_grad).
        with contextlib.nullcontext() if cfg.masked_grad else torch.no_grad():
            masked_logp, _ = mb.policy.log_probs(mb.model, view)
        term, metrics = perception_term(mb.logp, masked_logp, mb.mask, has_view.to(mb.mask.device), cfg, gamma,
                                        aggregate=lambda values, m: mb.aggregate(values, m, "view:masked"))
        metrics["papo/gamma"] = torch.tensor(gamma)
        return term, metrics


@register_loss_term("perception")
def _perception(cfg: TrainConfig) -> PerceptionLoss | None:
    return PerceptionLoss(cfg.papo) if cfg.papo.enabled else None


class CollapseMonitor:
    """Warns on PAPO's early signs of "KL hacking" (the paper's collapse mode): the perception KL falling
    sharply, or the entropies under both views climbing together. Compares the latest window of steps
    with the one before it."""

    def __init__(self, window: int = 10, kl_drop: float = 0.5, entropy_rise: float = 1.5):
        self.window = window
        self.kl_drop = kl_drop
        self.entropy_rise = entropy_rise
        self.history: deque[tuple[float, float, float]] = deque(maxlen=2 * window)
        self.warnings = 0

    def update(self, kl: float, entropy_orig: float, entropy_masked: float, step: int) -> list[str]:
        self.history.append((kl, entropy_orig, entropy_masked))
        if len(self.history) < 2 * self.window:
            return []
        rows = list(self.history)
        before = [sum(c) / self.window for c in zip(*rows[: self.window])]
        now = [sum(c) / self.window for c in zip(*rows[self.window:])]
        messages = []
        if before[0] > 1e-6 and now[0] < self.kl_drop * before[0]:
            messages.append(f"perception KL fell from {before[0]:.4g} to {now[0]:.4g} over {self.window} steps")
        if all(b > 1e-6 and n > self.entropy_rise * b for b, n in zip(before[1:], now[1:])):
            messages.append(f"entropy rose under both views ({before[1]:.3g}→{now[1]:.3g} original, "
                            f"{before[2]:.3g}→{now[2]:.3g} masked)")
        for message in messages:
            logger.warning("step %d: possible PAPO KL-hacking collapse: %s (consider a smaller papo.gamma or "
                           "the double-entropy terms)", step, message)
        if messages:
            self.warnings += 1
            self.history.clear()  # one warning per episode, not one per step
        return messages

    def state_dict(self) -> dict:
        return {"history": [list(row) for row in self.history], "warnings": self.warnings}

    def load_state_dict(self, state: dict) -> None:
        self.history.clear()
        self.history.extend(tuple(row) for row in state["history"])
        self.warnings = int(state["warnings"])
