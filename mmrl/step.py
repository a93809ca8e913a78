"""The batch that flows through one rollout step, and the mini-batches the optimiser sees.

A :class:`StepBatch` starts as the sampled :class:`~mmrl.policy.Rollout` and gathers, phase by phase,
everything the update needs: rewards, advantages, the loss mask (completion tokens times every
multiplicative mask a component adds), named per-token weights (e.g. TIS), named log-probs (``old``,
``ref``, ``sampler``) and named counterfactual views (e.g. PAPO's ``masked``). Components read and add
entries by name, so a new option never needs a new trainer argument.

Groups stay whole: :meth:`StepBatch.minibatches` shuffles *groups*, never samples, so a prompt's
completions always share a mini-batch — what pairs (DPO), group filters and per-group encoding need.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch

from mmrl.policy import Rollout

Tensor = torch.Tensor


@dataclass
class StepBatch:
    """One rollout step's samples and everything computed for them (``B`` samples, ``T`` completion tokens)."""

    rollout: Rollout
    group_id: Tensor  # [B] long: the prompt group of each sample (0 .. num_groups-1, contiguous groups)
    rewards: Tensor | None = None  # [B] combined reward (NaN = missing)
    advantages: Tensor | None = None  # [B]
    loss_mask: Tensor | None = None  # [B, T] float: completion tokens × every multiplicative mask
    token_weights: dict[str, Tensor] = field(default_factory=dict)  # [B, T] each, multiplied into the loss
    logps: dict[str, Tensor] = field(default_factory=dict)  # [B, T] each: "old", "ref", "sampler", ...
    views: dict[str, tuple[Rollout, Tensor]] = field(default_factory=dict)  # name -> (rollout, has_view [B])
    entropies: dict[str, Tensor] = field(default_factory=dict)  # [B, T] each, e.g. "old" (pre-update policy)

    def __post_init__(self) -> None:
        if self.loss_mask is None:
            self.loss_mask = self.rollout.completion_mask.float()

    @classmethod
    def from_rollout(cls, rollout: Rollout) -> StepBatch:
        group_id = torch.arange(rollout.batch_size) // rollout.group_size
        return cls(rollout=rollout, group_id=group_id)

    @property
    def size(self) -> int:
        return self.rollout.batch_size

    @property
    def num_groups(self) -> int:
        return int(self.group_id.max()) + 1 if self.group_id.numel() else 0

    def mask_out(self, keep: Tensor) -> None:
        """Multiply a ``[B]`` (per sample) or ``[B, T]`` (per token) keep-mask into the loss mask."""
        keep = keep.to(self.loss_mask.device, self.loss_mask.dtype)
        self.loss_mask = self.loss_mask * (keep.unsqueeze(-1) if keep.dim() == 1 else keep)

    def token_weight(self) -> Tensor | None:
        """The product of every named per-token weight (``None`` when there is none)."""
        weight = None
        for value in self.token_weights.values():
            weight = value if weight is None else weight * value
        return weight

    def select(self, index: Tensor) -> StepBatch:
        """The samples ``index`` (a 1-D long tensor, CPU), with every per-sample entry sliced alike."""

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[index.to(t.device)]

        return replace(
            self,
            rollout=self.rollout.select(index),
            group_id=self.group_id[index],
            rewards=pick(self.rewards),
            advantages=pick(self.advantages),
            loss_mask=pick(self.loss_mask),
            token_weights={k: pick(v) for k, v in self.token_weights.items()},
            logps={k: pick(v) for k, v in self.logps.items()},
            entropies={k: pick(v) for k, v in self.entropies.items()},
            views={k: (view.select(index), has[index]) for k, (view, has) in self.views.items()},
        )

    def minibatches(self, size: int, generator: torch.Generator) -> Iterator[Tensor]:
        """Sample indices of shuffled mini-batches of about ``size`` samples made of whole groups.

        The groups are drawn in a random order from ``generator``; a mini-batch takes whole groups until it
        holds ``size`` samples (the last may hold fewer). Within a group, samples keep their order."""
        order = torch.randperm(self.num_groups, generator=generator)
        members = [torch.nonzero(self.group_id == g).flatten() for g in range(self.num_groups)]
        chunk: list[Tensor] = []
        count = 0
        for g in order.tolist():
            chunk.append(members[g])
            count += members[g].numel()
            if count >= size:
                yield torch.cat(chunk)
                chunk, count = [], 0
        if chunk:
            yield torch.cat(chunk)

    def micro_batches(self, size: int) -> list[Tensor]:
        """Consecutive index slices of at most ``size`` samples (gradient accumulation inside a mini-batch)."""
        return list(torch.arange(self.size).split(size))
