"""The collect phase of a rollout step: generate → decode → rewards, repeated until the batch is full.

A *collector* decides how many chunks of prompts to generate and which groups of each to keep:

* :class:`CollectOnce` (default): one chunk of ``prompts_per_step`` prompts, every group kept;
* :class:`DynamicSampling` (DAPO, Yu et al., 2025, ``filters.dynamic_sampling``): groups whose rewards are
  all equal teach nothing (every advantage is 0) and are dropped; further chunks are generated until
  ``prompts_per_step`` informative groups are collected or ``filters.max_sample_batches`` chunks were
  generated — then the step trains on what it has, with a warning (verl and EasyR1 raise instead).

Both return a :class:`Collected`: the kept samples as one :class:`~mmrl.step.StepBatch`, and everything
that was generated (for the logged reward and length metrics, which describe the policy, not the filter).
Under several processes every process runs the same number of generation rounds (an all-reduce decides
whether anyone still needs more), and the trainer then trims every process to the smallest number of
groups, so that all of them run the same number of (collective) updates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mmrl import algorithms, group_filters
from mmrl.config import TrainConfig
from mmrl.objectives import objective_spec
from mmrl.policy import Policy, Rollout, Sampling
from mmrl.preference import preference_pairs
from mmrl.rewards import RewardOutput
from mmrl.step import StepBatch

Tensor = torch.Tensor


@dataclass
class Chunk:
    """One generation round: a rollout, its decoded completions and their rewards."""

    rollout: Rollout
    completions: list
    rewards: RewardOutput
    generate_s: float = 0.0  # seconds spent sampling (drawing prompts + generate)


@dataclass
class Collected:
    batch: StepBatch  # the kept samples (rewards set; group ids 0 .. n-1)
    completions: list  # decoded completions of the kept samples
    generated: Rollout  # every sample generated this step
    generated_rewards: RewardOutput
    generated_completions: list


def join(rollouts: list[Rollout]) -> Rollout:
    return rollouts[0] if len(rollouts) == 1 else Rollout.concat(rollouts)


def assemble(chunks: list[Chunk], parts: list[tuple[int, Tensor]], rewards: Tensor, group_id: Tensor) -> Collected:
    """The :class:`Collected` of ``chunks`` keeping, per ``(chunk index, sample index)`` part, those samples."""
    if parts:
        kept = [chunks[c].rollout.select(index) for c, index in parts]
        completions = [chunks[c].completions[i] for c, index in parts for i in index.tolist()]
    else:  # nothing informative at all: an empty batch (no update this step)
        kept, completions = [chunks[0].rollout.select(torch.zeros(0, dtype=torch.long))], []
    batch = StepBatch(rollout=join(kept), group_id=group_id.long())
    batch.rewards = rewards
    return Collected(batch, completions, join([c.rollout for c in chunks]),
                     chunks[0].rewards if len(chunks) == 1 else RewardOutput.concat([c.rewards for c in chunks]),
                     [x for c in chunks for x in c.completions])


class CollectOnce:
    """One chunk, every group kept."""

    def collect(self, generate: Callable[[], Chunk], target_groups: int,
                keep_going: Callable[[bool], bool]) -> Collected:
        chunk = generate()
        group_id = torch.arange(chunk.rollout.batch_size) // chunk.rollout.group_size
        return assemble([chunk], [(0, torch.arange(chunk.rollout.batch_size))], chunk.rewards.total, group_id)

    def metrics(self) -> dict[str, float]:
        return {}


class DynamicSampling:
    """DAPO's dynamic sampling over :func:`mmrl.group_filters.fill_batch`; its counters are per-process
    state (checkpointed) and logged as ``dynamic_sampling/*`` (cumulative)."""

    def __init__(self, max_sample_batches: int, reward: str | None = None):
        self.max_sample_batches = max_sample_batches
        self.reward = reward  # judge "all equal" on this reward function (verl's filter_groups.metric); None: total
        self.stats = group_filters.DynamicSamplingStats()
        self.last_rounds = 0

    def collect(self, generate: Callable[[], Chunk], target_groups: int,
                keep_going: Callable[[bool], bool]) -> Collected:
        chunks: list[Chunk] = []

        def generate_fn() -> tuple[Tensor, Tensor, Any]:
            chunk = generate()
            chunks.append(chunk)
            group_id = torch.arange(chunk.rollout.batch_size) // chunk.rollout.group_size
            judged = chunk.rewards.total if self.reward is None else self._column(chunk.rewards)
            return judged, group_id, len(chunks) - 1

        before = self.stats.batches_generated
        filled = group_filters.fill_batch(generate_fn, target_groups, self.max_sample_batches, self.stats,
                                          keep_going)
        self.last_rounds = self.stats.batches_generated - before
        # the kept samples' combined rewards (the filter may have judged one reward function)
        totals = [chunks[c].rewards.total[index] for c, index in filled.parts]
        rewards = torch.cat(totals) if totals else filled.rewards
        return assemble(chunks, filled.parts, rewards, filled.group_id)

    def _column(self, rewards: RewardOutput) -> Tensor:
        if self.reward not in rewards.names:
            raise ValueError(f"filters.dynamic_sampling_reward={self.reward!r} is not one of the rewards "
                             f"{list(rewards.names)}")
        return rewards.per_function[:, rewards.names.index(self.reward)]

    def metrics(self) -> dict[str, float]:
        return {**self.stats.metrics(), "dynamic_sampling/rounds": float(self.last_rounds)}

    def state_dict(self) -> dict:
        return self.stats.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stats.load_state_dict(state)


class PreferencePairs:
    """A pairwise objective's collect phase (DPO, :mod:`mmrl.preference`): the inner collector's groups,
    each cut to its best and worst completion by reward, as adjacent (chosen, rejected) rows — so a group
    of ``G`` costs two rows in every later pass (reference scoring, training forward). Groups without
    reward spread form no pair (``dpo/groups_without_pair``; with ``filters.dynamic_sampling`` more are
    generated until the batch is full, exactly DAPO's filter)."""

    def __init__(self, inner: CollectOnce | DynamicSampling):
        self.inner = inner
        self.last: dict[str, float] = {}

    def collect(self, generate: Callable[[], Chunk], target_groups: int,
                keep_going: Callable[[bool], bool]) -> Collected:
        collected = self.inner.collect(generate, target_groups, keep_going)
        batch = collected.batch
        chosen, rejected, paired = preference_pairs(batch.rewards, batch.group_id)
        index = torch.stack([chosen, rejected], dim=1).flatten()
        pairs = batch.select(index)
        pairs.group_id = torch.arange(chosen.numel()).repeat_interleave(2)
        margin = batch.rewards[chosen] - batch.rewards[rejected]
        self.last = {"dpo/pairs": float(chosen.numel()), "dpo/groups_without_pair": float((~paired).sum()),
                     "dpo/reward_margin": float(margin.mean()) if margin.numel() else 0.0,
                     "dpo/reward_chosen": float(batch.rewards[chosen].mean()) if margin.numel() else 0.0,
                     "dpo/reward_rejected": float(batch.rewards[rejected].mean()) if margin.numel() else 0.0}
        collected.batch = pairs
        collected.completions = [collected.completions[i] for i in index.tolist()]
        return collected

    def metrics(self) -> dict[str, float]:
        return {**self.inner.metrics(), **self.last}

    def state_dict(self) -> dict:
        return self.inner.state_dict() if hasattr(self.inner, "state_dict") else {}

    def load_state_dict(self, state: dict) -> None:
        if hasattr(self.inner, "load_state_dict"):
            self.inner.load_state_dict(state)


def build_collector(cfg: TrainConfig) -> CollectOnce | DynamicSampling | PreferencePairs:
    collector: CollectOnce | DynamicSampling = CollectOnce()
    if cfg.filters.dynamic_sampling:
        collector = DynamicSampling(cfg.filters.max_sample_batches, cfg.filters.dynamic_sampling_reward)
    return PreferencePairs(collector) if objective_spec(cfg.algorithm.objective).pairwise else collector


# --------------------------------------------------------------------------------------------------
# Where a group's completions come from
# --------------------------------------------------------------------------------------------------


def sampled_rollout(policy: Policy, model: torch.nn.Module, records: list[dict], group_size: int,
                    sampling: Sampling) -> Rollout:
    """``group_size`` completions per record, sampled from ``model`` (the default)."""
    return policy.generate(model, records, group_size, sampling)


def dataset_pairs_rollout(policy: Policy, model: torch.nn.Module, records: list[dict], group_size: int,
                          sampling: Sampling) -> Rollout:
    """Offline DPO from a preference dataset: each record's ``chosen`` and ``rejected`` completions as its
    group of 2, teacher-forced (nothing is sampled), with a ``preference`` column (1 for chosen, 0 for
    rejected) that the ``preference_label`` reward returns."""
    if not hasattr(policy, "rollout_from_completions"):
        raise ValueError(f"algorithm.pairs: dataset needs {type(policy).__name__}.rollout_from_completions")
    missing = [i for i, r in enumerate(records) if r.get("chosen") is None or r.get("rejected") is None]
    if missing:
        raise ValueError(f"algorithm.pairs: dataset needs 'chosen' and 'rejected' in every record; rows at "
                         f"batch positions {missing[:5]} lack them")
    stripped = [{k: v for k, v in r.items() if k not in ("chosen", "rejected")} for r in records]
    rollout = policy.rollout_from_completions(stripped, [[r["chosen"], r["rejected"]] for r in records],
                                              sampling)
    rollout.columns["preference"] = [1.0, 0.0] * len(records)
    return rollout


ROLLOUT_SOURCES: dict[str, Callable[..., Rollout]] = {"sampled": sampled_rollout, "dataset": dataset_pairs_rollout}


def keep_groups(collected: Collected, num_groups: int) -> Collected:
    """``collected`` with only its first ``num_groups`` groups kept (the trim to the smallest process)."""
    batch = collected.batch
    if num_groups >= batch.num_groups:
        return collected
    index = torch.nonzero(batch.group_id < num_groups).flatten()
    collected.batch = batch.select(index)
    collected.completions = [collected.completions[i] for i in index.tolist()]
    return collected


def generation_metrics(rollout: Rollout, rewards: RewardOutput) -> dict[str, float]:
    """Reward and length statistics of generated samples, per reward function too."""
    lengths = rollout.completion_mask.sum(dim=1).float()
    total = rewards.total
    valid = ~torch.isnan(total)
    grouped = torch.nan_to_num(total, nan=0.0).view(-1, rollout.group_size)
    m: dict[str, float] = {
        "reward": float(total[valid].mean()) if valid.any() else float("nan"),
        "reward_std": float(total[valid].std()) if valid.sum() > 1 else 0.0,
        "frac_reward_zero_std": float((grouped.std(dim=1) < 1e-6).float().mean()),
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": float(rollout.truncated.float().mean()),
        "completions/total_tokens": float(lengths.sum()),
        # Token-level diversity within each group: falling towards 0 shows collapse at a glance.
        "completions/group_diversity": float(algorithms.group_token_diversity(
            rollout.completion_ids, rollout.completion_mask, rollout.group_size).mean()),
        "reward_missing_frac": float((~valid).float().mean()),
    }
    for j, name in enumerate(rewards.names):
        column = rewards.per_function[:, j]
        ok = ~torch.isnan(column)
        m[f"rewards/{name}/mean"] = float(column[ok].mean()) if ok.any() else float("nan")
        m[f"rewards/{name}/std"] = float(column[ok].std()) if ok.sum() > 1 else 0.0
        m[f"rewards/{name}/failures"] = float(rewards.failures.get(name, 0))
    return m
