"""Prompt batches for the trainer: a seeded, resumable sampler over any ``Sequence`` of records.

A dataset is any object with ``__len__`` and ``__getitem__`` returning one *record* (a dict). The
trainer never looks inside a record except to hand it to the policy and its columns to the reward
functions. A dataset may raise :class:`BadSample` for an item it cannot load (a corrupt image, say):
the sampler skips it with a warning and counts it; a batch in which every item is bad is an error.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmrl.group_filters import SRPOHistory

logger = logging.getLogger(__name__)

Tensor = torch.Tensor


class BadSample(Exception):
    """Raised by a dataset's ``__getitem__`` for one item that cannot be used (e.g. unreadable image)."""


class PromptSampler:
    """Yields batches of records in a seeded random order, epoch after epoch.

    State (epoch, position) is small and exact, so a checkpoint can resume mid-epoch. The order of an
    epoch depends only on (seed, epoch).

    With ``history`` (an :class:`~mmrl.group_filters.SRPOHistory`; SRPO's history resampling) the trainer
    reports each scored batch with :meth:`record`; at each epoch boundary the prompts whose every rollout
    was correct during the epoch are skipped (lazily, while drawing) for the next epoch. Keys are dataset
    indices. The skip set in force is part of :meth:`state_dict`, together with the position.
    """

    def __init__(self, dataset: Sequence[dict], batch_size: int, seed: int, shuffle: bool = True,
                 history: SRPOHistory | None = None, history_reward: str = "accuracy"):
        if len(dataset) == 0:
            raise ValueError("the training dataset is empty")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.history = history
        self.history_reward = history_reward  # the reward column record() reads from a RewardOutput
        self.epoch = 0
        self.position = 0
        self.skipped = 0  # bad samples skipped so far (cumulative)
        self.last_indices: list[int] = []  # dataset indices of the records of the last batch, in order
        self._skip: frozenset[int] = frozenset()  # SRPO: indices left out of the current epoch
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.dataset)))
        # Hash (seed, epoch) so that nearby seeds do not share epoch orders (seed 1 epoch 0 ≠ seed 0 epoch 1).
        digest = hashlib.sha256(f"{self.seed}:{self.epoch}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:7], "big"))
        return torch.randperm(len(self.dataset), generator=g).tolist()

    def _new_epoch(self) -> None:
        self.epoch += 1
        self.position = 0
        self._order = self._make_order()
        if self.history is not None:
            self.history.end_epoch()
            keep = self.history.next_epoch_keep(range(len(self.dataset)))  # all kept if all would go
            self._skip = frozenset(i for i, k in enumerate(keep) if not k)

    def _next_index(self) -> int:
        while True:
            if self.position >= len(self._order):
                self._new_epoch()
            index = self._order[self.position]
            self.position += 1
            if index not in self._skip:
                return index

    def take(self, count: int) -> tuple[list[dict], list[int]]:
        """The next ``count`` loadable records and their dataset indices. A bad item is skipped (counted,
        logged) and replaced by the next one; after ``2 * count`` tries (at least ``count + 8``) fewer
        are returned, and none at all is an error."""
        records: list[dict] = []
        indices: list[int] = []
        attempts = 0
        max_attempts = max(2 * count, count + 8)
        while len(records) < count:
            if attempts >= max_attempts:
                if records:
                    break  # a partial batch is still a valid batch of groups
                raise RuntimeError(
                    f"every one of {attempts} consecutive samples failed to load (see warnings above); "
                    "check the dataset's images/paths"
                )
            attempts += 1
            index = self._next_index()
            try:
                records.append(self.dataset[index])
                indices.append(index)
            except BadSample as exc:
                self.skipped += 1
                logger.warning("skipping sample %d: %s (skipped so far: %d)", index, exc, self.skipped)
        return records, indices

    def next_batch(self, step: int | None = None) -> list[dict]:
        """The next ``batch_size`` loadable records (see :meth:`take`); their dataset indices are in
        ``last_indices``. ``step`` (the rollout step) is ignored: a :class:`StagedSampler` needs it."""
        batch, self.last_indices = self.take(self.batch_size)
        return batch

    def record(self, rewards: Any, group_id: Tensor, keys: Sequence[int] | None = None) -> None:
        """SRPO: report the last batch's outcomes (no-op without history). ``rewards`` is a ``[N]`` tensor
        (NaN = missing) or a :class:`~mmrl.rewards.RewardOutput`, whose ``history_reward`` column is read;
        ``group_id[n]`` is sample n's group, group g being ``keys[g]`` (default ``last_indices``)."""
        if self.history is None:
            return
        values = rewards if isinstance(rewards, Tensor) else reward_column(rewards, self.history_reward)
        self.history.record(list(self.last_indices if keys is None else keys), values, group_id)

    def metrics(self) -> dict[str, float]:
        """SRPO counters for the logger (empty without history): prompts left out of the current epoch,
        all epochs' drops together, and prompts all-correct so far in the current epoch."""
        if self.history is None:
            return {}
        counts = self.history.counts()
        return {"srpo/dropped": float(len(self._skip)), "srpo/dropped_total": counts["srpo/dropped_total"],
                "srpo/all_correct": counts["srpo/all_correct"]}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self.epoch, "position": self.position, "skipped": self.skipped,
                                 "seed": self.seed}
        if self.history is not None:
            state["history"] = self.history.state_dict()
            state["skip"] = sorted(self._skip)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.skipped = int(state.get("skipped", 0))
        self._order = self._make_order()
        if self.history is not None:
            if "history" not in state:
                raise ValueError("the sampler state has no SRPO history: it was saved without "
                                 "filters.history_resampling")
            self.history.load_state_dict(state["history"])
            self._skip = frozenset(int(i) for i in state["skip"])


def reward_column(rewards: Any, name: str) -> Tensor:
    """The ``[N]`` values of reward function ``name`` in a :class:`~mmrl.rewards.RewardOutput`."""
    if name not in rewards.names:
        raise ValueError(f"filters.history_reward={name!r} is not one of the rewards {list(rewards.names)}")
    return rewards.per_function[:, rewards.names.index(name)]


def _derived_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:7], "big")


# --------------------------------------------------------------------------------------------------
# Staged schedules (SRPO's two-stage cross-domain training, and any other curriculum of datasets)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """``steps`` rollout steps (``None``: until the end of training; the last stage only) on ``datasets``
    (by name). With several datasets each record's source is drawn with probability proportional to its
    entry in ``weights`` (default: equal weights)."""

    steps: int | None
    datasets: Mapping[str, Sequence[dict]]
    weights: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or self.steps <= 0):
            raise ValueError(f"a stage's steps must be a positive integer or None, got {self.steps!r}")
        if not self.datasets:
            raise ValueError("a stage needs at least one dataset")
        weights = dict(self.weights) if self.weights is not None else {name: 1.0 for name in self.datasets}
        if set(weights) != set(self.datasets):
            raise ValueError(f"a stage's weights {sorted(weights)} must name exactly its datasets "
                             f"{sorted(self.datasets)}")
        for name, weight in weights.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
                    math.isfinite(weight) and weight > 0):
                raise ValueError(f"the weight of {name!r} must be a positive number, got {weight!r}")
        object.__setattr__(self, "weights", {name: float(weights[name]) for name in self.datasets})


class Stages(Sequence[Stage]):
    """A schedule of :class:`Stage` s, in order; pass it to the Trainer as the training dataset. Every stage
    but the last has a number of steps; the last one runs until the end (if it has steps too, it simply
    continues past them)."""

    def __init__(self, stages: Iterable[Stage]):
        self._stages = tuple(stages)
        if not self._stages:
            raise ValueError("a staged schedule needs at least one stage")
        for i, stage in enumerate(self._stages[:-1]):
            if stage.steps is None:
                raise ValueError(f"stage {i} has no steps: only the last stage may run until the end")

    def __len__(self) -> int:
        return len(self._stages)

    def __getitem__(self, index):  # type: ignore[override]
        return self._stages[index]

    def stage_at(self, step: int) -> int:
        """The stage of rollout step ``step`` (0-based)."""
        end = 0
        for i, stage in enumerate(self._stages[:-1]):
            end += stage.steps  # type: ignore[operator]  (only the last may be None)
            if step < end:
                return i
        return len(self._stages) - 1

    def first_dataset(self) -> Sequence[dict]:
        """The first stage's first dataset (e.g. what a supervised cold start trains on)."""
        return next(iter(self._stages[0].datasets.values()))


class StagedSampler:
    """Batches from a :class:`Stages` schedule: one :class:`PromptSampler` per (stage, dataset), the stage
    chosen by the rollout step given to :meth:`next_batch`. In a mixture each record's source is drawn from
    a generator seeded by (seed, stage, batches drawn in the stage), so the state is a few counters and a
    resumed run draws exactly the same batches. SRPO history resampling, when on, runs inside each
    (stage, dataset) sampler: its prompts are judged and dropped among that dataset's own.

    The same surface as :class:`PromptSampler`: ``epoch`` (the most epochs any dataset of the current stage
    has started), ``skipped``, ``last_indices`` (``"name:index"``), ``record``, ``metrics``, state dicts.
    """

    def __init__(self, stages: Stages, batch_size: int, seed: int,
                 history: Callable[[], SRPOHistory | None] = lambda: None, history_reward: str = "accuracy"):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.stages = stages
        self.batch_size = batch_size
        self.seed = seed
        self.history_reward = history_reward
        self.samplers: list[dict[str, PromptSampler]] = [
            {name: PromptSampler(dataset, batch_size, _derived_seed(seed, i, name), history=history(),
                                 history_reward=history_reward)
             for name, dataset in stage.datasets.items()}
            for i, stage in enumerate(stages)]
        self.stage = 0  # the stage of the last batch
        self.batches = 0  # batches drawn so far (the step when next_batch is given none)
        self._mix_draws = [0] * len(stages)  # batches drawn in each stage: seeds its mixture draw
        self.last_indices: list[str] = []
        self._parts: list[tuple[PromptSampler, int, int]] = []  # (sampler, first group, end) of the last batch

    @property
    def epoch(self) -> int:
        return max(s.epoch for s in self.samplers[self.stage].values())

    @property
    def skipped(self) -> int:
        return sum(s.skipped for stage in self.samplers for s in stage.values())

    def _counts(self, stage: int) -> dict[str, int]:
        names = list(self.samplers[stage])
        if len(names) == 1:
            return {names[0]: self.batch_size}
        g = torch.Generator().manual_seed(_derived_seed(self.seed, "mix", stage, self._mix_draws[stage]))
        weights = self.stages[stage].weights
        probs = torch.tensor([weights[name] for name in names], dtype=torch.float64)  # type: ignore[index]
        picks = torch.multinomial(probs, self.batch_size, replacement=True, generator=g).tolist()
        return {name: picks.count(j) for j, name in enumerate(names)}

    def next_batch(self, step: int | None = None) -> list[dict]:
        """The next batch of stage ``stages.stage_at(step)`` (``step`` defaults to the batches drawn)."""
        self.stage = stage = self.stages.stage_at(self.batches if step is None else step)
        counts = self._counts(stage)
        self._mix_draws[stage] += 1
        self.batches += 1
        batch: list[dict] = []
        self.last_indices, self._parts = [], []
        for name, sampler in self.samplers[stage].items():
            if counts[name] == 0:
                continue
            records, indices = sampler.take(counts[name])
            sampler.last_indices = indices
            self._parts.append((sampler, len(batch), len(batch) + len(records)))
            batch.extend(records)
            self.last_indices.extend(f"{name}:{index}" for index in indices)
        return batch

    def record(self, rewards: Any, group_id: Tensor) -> None:
        """SRPO: hand each dataset's groups of the last batch to its sampler (no-op without history)."""
        for sampler, start, end in self._parts:
            if sampler.history is None:
                continue
            values = rewards if isinstance(rewards, Tensor) else reward_column(rewards, self.history_reward)
            rows = (group_id >= start) & (group_id < end)
            sampler.record(values[rows], group_id[rows] - start)

    def metrics(self) -> dict[str, float]:
        """``data/stage`` and the current stage's SRPO counters, summed over its datasets."""
        out = {"data/stage": float(self.stage)}
        for sampler in self.samplers[self.stage].values():
            for key, value in sampler.metrics().items():
                out[key] = out.get(key, 0.0) + value
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "stage": self.stage, "batches": self.batches, "mix_draws": list(self._mix_draws),
                "samplers": [{name: s.state_dict() for name, s in stage.items()} for stage in self.samplers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shape = [sorted(stage) for stage in state["samplers"]]
        if shape != [sorted(stage) for stage in self.samplers]:
            raise ValueError(f"the sampler state has stages {shape}, this run {[sorted(s) for s in self.samplers]}")
        self.seed = int(state["seed"])
        self.stage = int(state["stage"])
        self.batches = int(state["batches"])
        self._mix_draws = [int(n) for n in state["mix_draws"]]
        for stage, saved in zip(self.samplers, state["samplers"]):
            for name, sampler in stage.items():
                sampler.load_state_dict(saved[name])


def make_sampler(train_dataset: Sequence[dict] | Stages, cfg: Any, process_index: int = 0) -> PromptSampler | StagedSampler:
    """The trainer's prompt sampler for ``cfg`` (a :class:`~mmrl.config.TrainConfig`): a
    :class:`StagedSampler` for a :class:`Stages` schedule, else a :class:`PromptSampler`; with SRPO
    history resampling when ``filters.history_resampling`` is on. Each process has its own seed."""
    f = cfg.filters
    seed = cfg.seed + process_index

    def history() -> SRPOHistory | None:
        return SRPOHistory(f.history_threshold) if f.history_resampling else None

    if isinstance(train_dataset, Stages):
        return StagedSampler(train_dataset, cfg.prompts_per_step, seed, history=history,
                             history_reward=f.history_reward)
    return PromptSampler(train_dataset, cfg.prompts_per_step, seed, history=history(),
                         history_reward=f.history_reward)
