"""Prompt batches for the trainer: a seeded, resumable sampler over any ``Sequence`` of records.

A dataset is any object with ``__len__`` and ``__getitem__`` returning one *record* (a dict). The
trainer never looks inside a record except to hand it to the policy and its columns to the reward
functions. A dataset may raise :class:`BadSample` for an item it cannot load (a corrupt image, say):
the sampler skips it with a warning and counts it; a batch in which every item is bad is an error.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)


class BadSample(Exception):
    """Raised by a dataset's ``__getitem__`` for one item that cannot be used (e.g. unreadable image)."""


class PromptSampler:
    """Yields batches of records in a seeded random order, epoch after epoch.

    State (epoch, position) is small and exact, so a checkpoint can resume mid-epoch.
    """

    def __init__(self, dataset: Sequence[dict], batch_size: int, seed: int, shuffle: bool = True):
        if len(dataset) == 0:
            raise ValueError("the training dataset is empty")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self.skipped = 0  # bad samples skipped so far (cumulative)
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.dataset)))
        # Hash (seed, epoch) so that nearby seeds do not share epoch orders (seed 1 epoch 0 ≠ seed 0 epoch 1).
        digest = hashlib.sha256(f"{self.seed}:{self.epoch}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:7], "big"))
        return torch.randperm(len(self.dataset), generator=g).tolist()

    def _next_index(self) -> int:
        if self.position >= len(self._order):
            self.epoch += 1
            self.position = 0
            self._order = self._make_order()
        index = self._order[self.position]
        self.position += 1
        return index

    def next_batch(self) -> list[dict]:
        """The next ``batch_size`` loadable records. A bad item is skipped (counted, logged) and replaced
        by the next one; after ``2 * batch_size`` tries (at least ``batch_size + 8``) a partial batch is
        returned, and a batch with no loadable item at all is an error."""
        batch: list[dict] = []
        attempts = 0
        max_attempts = max(2 * self.batch_size, self.batch_size + 8)
        while len(batch) < self.batch_size:
            if attempts >= max_attempts:
                if batch:
                    break  # a partial batch is still a valid batch of groups
                raise RuntimeError(
                    f"every one of {attempts} consecutive samples failed to load (see warnings above); "
                    "check the dataset's images/paths"
                )
            attempts += 1
            index = self._next_index()
            try:
                batch.append(self.dataset[index])
            except BadSample as exc:
                self.skipped += 1
                logger.warning("skipping sample %d: %s (skipped so far: %d)", index, exc, self.skipped)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "skipped": self.skipped, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.skipped = int(state.get("skipped", 0))
        self._order = self._make_order()
