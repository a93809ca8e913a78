"""Group filters and sampling: what happens between rewards and advantages.

Pure functions over ``rewards [N]`` (NaN = missing) and ``group_id [N]`` (sample → its prompt's group,
``0 .. num_groups − 1``) that return masks, plus small stateful helpers whose ``state_dict()`` is plain
JSON-able data, so a resumed run continues exactly. Nothing here touches a model; the trainer wires it.

* **DAPO dynamic sampling** (Yu et al., 2025, arXiv 2503.14476): :func:`informative_groups`,
  :func:`fill_batch`, :class:`DynamicSamplingStats`.
* **DAPO overlong shaping**: :func:`overlong_penalty` (soft length penalty) and :func:`truncated_mask`
  (TRL's ``mask_truncated_completions``; DAPO's "overlong filtering").
* **GFPO** (Shrivastava et al., 2025, arXiv 2508.09726): :func:`gfpo_keep`, :func:`mask_rewards`,
  :class:`AdaptiveK`.
* **SRPO history resampling** (Zhang et al., 2025, arXiv 2504.14286): :class:`SRPOHistory`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mmrl.advantages import check_groups, group_statistics, segment_sum

logger = logging.getLogger(__name__)

Tensor = torch.Tensor
PromptKey = int | str

GFPO_METRICS = ("length", "reward_per_token")


def _check_key(key: Any) -> PromptKey:
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise TypeError(f"prompt keys must be int or str (JSON-able and exact), got {type(key).__name__}")
    return key


# --------------------------------------------------------------------------------------------------
# DAPO dynamic sampling
# --------------------------------------------------------------------------------------------------


def informative_groups(rewards: Tensor, group_id: Tensor, num_groups: int | None = None) -> Tensor:
    """``BoolTensor[num_groups]``: True where a group can teach something, i.e. it has at least two valid
    rewards and they are not all exactly equal (DAPO's dynamic-sampling criterion, ``std > 0``).

    verl's DAPO recipe keeps a group with a single sample; we drop it (its advantage is 0 anyway).
    EasyR1's ``online_filtering`` instead keeps groups whose *mean* lies in ``(filter_low, filter_high)``
    — for 0/1 accuracy the same thing, for graded rewards a different one; we follow DAPO/verl."""
    return ~group_statistics(rewards, group_id, num_groups).constant


@dataclass
class DynamicSamplingStats:
    """Counters of the generate → filter → concatenate loop; ``metrics()`` for the logger.

    ``prompts_drawn``: groups generated; ``groups_dropped``: uninformative ones thrown away;
    ``groups_surplus``: informative ones beyond the target (cut, as verl/EasyR1 cut the batch);
    ``bound_hits``: times the loop stopped at ``max_sample_batches`` short of its target.
    Cumulative when the same object is passed to every :func:`fill_batch` call.
    """

    batches_generated: int = 0
    prompts_drawn: int = 0
    groups_kept: int = 0
    groups_dropped: int = 0
    groups_surplus: int = 0
    bound_hits: int = 0

    def metrics(self, prefix: str = "dynamic_sampling/") -> dict[str, float]:
        return {prefix + name: float(value) for name, value in asdict(self).items()}

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in asdict(self):
            setattr(self, name, int(state.get(name, 0)))


@dataclass
class FilledBatch:
    """What :func:`fill_batch` collected.

    ``parts``: ``(payload, sample_index)`` per generated chunk that contributed, where ``sample_index``
    (LongTensor) lists the chunk's samples to keep, in their original order; ``rewards`` and ``group_id``
    are those samples' rewards and new group ids (``0 .. num_groups − 1``, numbered in chunk order then
    by the chunk's group id), concatenated in the same order as the parts.
    """

    parts: list[tuple[Any, Tensor]]
    rewards: Tensor
    group_id: Tensor
    num_groups: int
    target_groups: int
    stats: DynamicSamplingStats = field(default_factory=DynamicSamplingStats)

    @property
    def full(self) -> bool:
        return self.num_groups >= self.target_groups


GenerateFn = Callable[[], tuple[Tensor, Tensor, Any]]


def fill_batch(
    generate_fn: GenerateFn,
    target_groups: int,
    max_sample_batches: int,
    stats: DynamicSamplingStats | None = None,
    keep_going: Callable[[bool], bool] | None = None,
) -> FilledBatch:
    """DAPO dynamic sampling: generate, keep the informative groups, repeat until ``target_groups`` are
    collected or ``max_sample_batches`` chunks were generated.

    ``generate_fn()`` (a closure over the trainer's sampler and policy) draws prompts, generates and
    scores them, and returns ``(rewards [n], group_id [n], payload)``; ``payload`` is passed back untouched
    (e.g. the chunk's rollout, to be ``select``-ed with each part's ``sample_index``). Only whole groups
    are kept; informative groups beyond the target are cut (as verl and EasyR1 truncate the batch).
    When the bound is hit short of the target, what was collected is returned (possibly nothing) with
    a warning — verl (``max_num_gen_batches``) and EasyR1 (``max_try_make_batch``) raise instead; the
    issue asks to train on what was collected. ``max_sample_batches`` must be >= 1 (their "≤ 0 = no
    limit" is not offered: an all-constant dataset would loop forever).

    ``keep_going(need_more) -> bool``, if given, is called before every generation round with this
    process's ``have < target`` and decides whether to generate another chunk. Under several processes
    pass an all-reduce ("does any process still need more?"), so that every process runs the same
    number of (collective) generation rounds; a process that is already full then just counts the
    extra chunk's informative groups as surplus. The bound applies either way.
    """
    if not isinstance(target_groups, int) or target_groups < 1:
        raise ValueError(f"target_groups must be a positive integer, got {target_groups!r}")
    if not isinstance(max_sample_batches, int) or max_sample_batches < 1:
        raise ValueError(f"max_sample_batches must be a positive integer, got {max_sample_batches!r}")
    stats = stats if stats is not None else DynamicSamplingStats()
    parts: list[tuple[Any, Tensor]] = []
    rewards_out: list[Tensor] = []
    group_out: list[Tensor] = []
    have = generated = drawn = dropped = 0
    while generated < max_sample_batches:
        need_more = have < target_groups
        if not (keep_going(need_more) if keep_going is not None else need_more):
            break
        rewards, group_id, payload = generate_fn()
        generated += 1
        num_groups = check_groups(rewards, group_id)
        informative = informative_groups(rewards, group_id, num_groups)
        chosen = informative & (torch.cumsum(informative.long(), 0) <= target_groups - have)
        n_informative, n_chosen = int(informative.sum()), int(chosen.sum())
        drawn += num_groups
        dropped += num_groups - n_informative
        stats.batches_generated += 1
        stats.prompts_drawn += num_groups
        stats.groups_dropped += num_groups - n_informative
        stats.groups_surplus += n_informative - n_chosen
        stats.groups_kept += n_chosen
        if n_chosen == 0:
            continue
        new_id = have + torch.cumsum(chosen.long(), 0) - 1  # old group id → new group id (where chosen)
        keep = chosen[group_id.long()]
        sample_index = torch.nonzero(keep).flatten()
        parts.append((payload, sample_index))
        rewards_out.append(rewards[sample_index])
        group_out.append(new_id[group_id.long()[sample_index]])
        have += n_chosen
    if have < target_groups:
        stats.bound_hits += 1
        logger.warning(
            "dynamic sampling stopped at max_sample_batches=%d with %d of %d informative groups "
            "(%d prompts drawn, %d dropped for equal rewards); training on what was collected",
            max_sample_batches,
            have,
            target_groups,
            drawn,
            dropped,
        )
    if rewards_out:
        rewards_all, group_all = torch.cat(rewards_out), torch.cat(group_out)
    else:
        rewards_all, group_all = torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return FilledBatch(parts, rewards_all, group_all, have, target_groups, stats)


# --------------------------------------------------------------------------------------------------
# DAPO overlong shaping
# --------------------------------------------------------------------------------------------------


def overlong_penalty(
    lengths: Tensor, max_length: int, cache_length: int, penalty_factor: float = 1.0
) -> Tensor:
    """DAPO's soft overlong punishment, to be added to the reward (float tensor, ≤ 0).

    With ``L_max = max_length`` and ``L_cache = cache_length``: 0 for ``len ≤ L_max − L_cache``;
    ``(L_max − L_cache − len) / L_cache · penalty_factor`` inside the cache window (linear, reaching
    ``−penalty_factor`` at ``len = L_max``); ``−penalty_factor`` beyond ``L_max``. The paper's formula
    (eq. 13) clamps at −1 past ``L_max``; verl's DAPO reward manager
    (``min(−exceed / buffer_len · factor, 0)``) does not clamp, but its lengths never exceed the
    generation limit, so the two agree on every reachable length. ``lengths`` counts completion tokens
    as the loss mask does (EOS included, as verl's ``valid_response_length``). A NaN reward plus the
    penalty stays NaN (missing).
    """
    if not isinstance(cache_length, int) or not 0 < cache_length <= max_length:
        raise ValueError(
            f"cache_length must be an integer in (0, max_length={max_length}], got {cache_length!r}"
        )
    if not (penalty_factor >= 0 and math.isfinite(penalty_factor)):
        raise ValueError(f"penalty_factor must be a finite number >= 0, got {penalty_factor!r}")
    exceed = lengths.to(torch.float64) - float(max_length - cache_length)
    penalty = -(exceed / cache_length).clamp(min=0.0, max=1.0) * penalty_factor
    return penalty.to(torch.get_default_dtype())


def truncated_mask(truncated: Tensor, mask: Tensor | None = None) -> Tensor:
    """Take truncated completions (hit the length limit without EOS) out of the loss.

    Without ``mask``: ``BoolTensor[N]``, True = keep. With a ``[N, T]`` token ``mask``: that mask with
    the truncated rows zeroed (same dtype) — TRL's ``mask_truncated_completions``. As in TRL, truncated
    completions still count in the group statistics of the advantages; to leave them out of those too,
    set their rewards to NaN before the estimator."""
    if truncated.dim() != 1:
        raise ValueError(f"truncated must be 1-D [N], got shape {tuple(truncated.shape)}")
    keep = ~truncated.bool()
    if mask is None:
        return keep
    if mask.dim() < 1 or mask.shape[0] != keep.shape[0]:
        raise ValueError(f"mask must be [N, ...] with N={keep.shape[0]}, got shape {tuple(mask.shape)}")
    return mask * keep.view(-1, *([1] * (mask.dim() - 1))).to(mask.dtype)


# --------------------------------------------------------------------------------------------------
# GFPO: keep the k best of each group
# --------------------------------------------------------------------------------------------------


def gfpo_keep(
    rewards: Tensor, lengths: Tensor, group_id: Tensor, k: int | Tensor, metric: str = "length"
) -> Tensor:
    """``BoolTensor[N]``: the ``k`` best samples of each group (all of a group with ``≤ k`` samples).

    ``metric="length"``: shortest first; ``"reward_per_token"``: highest ``reward / length`` first (the
    paper's token efficiency; lengths clamped to ≥ 1). Samples with a missing reward sort after every
    valid one; ties go to the lower index. ``k`` is an int or a ``LongTensor[num_groups]`` (from
    :class:`AdaptiveK`). The paper computes the advantages from the kept subset's statistics and gives
    the rest advantage 0: feed ``mask_rewards(rewards, keep)`` to the estimator and keep the others out
    of the loss (the trainer's ``loss_mask``)."""
    if metric not in GFPO_METRICS:
        raise ValueError(f"unknown GFPO metric {metric!r}; valid: {list(GFPO_METRICS)}")
    num_groups = check_groups(rewards, group_id)
    if lengths.shape != rewards.shape:
        raise ValueError(f"lengths must have shape {tuple(rewards.shape)}, got {tuple(lengths.shape)}")
    group_id = group_id.long()
    if isinstance(k, Tensor):
        if k.shape != (num_groups,):
            raise ValueError(f"k must be an int or a tensor of shape ({num_groups},), got {tuple(k.shape)}")
        k_per_group = k.to(device=rewards.device, dtype=torch.long)
    else:
        k_per_group = torch.full((num_groups,), int(k), dtype=torch.long, device=rewards.device)
    if num_groups and int(k_per_group.min()) < 1:
        raise ValueError(f"k must be >= 1 for every group, got {k!r}")
    n = rewards.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=rewards.device)
    x = rewards.to(torch.float64)
    missing = torch.isnan(x)
    length = lengths.to(torch.float64)
    if metric == "length":
        score = length  # ascending: shorter is better
    else:
        score = -torch.where(missing, torch.zeros_like(x), x) / length.clamp(min=1.0)
    # Lexicographic order (group, missing, score, index) from three stable sorts, last key first.
    order = torch.sort(score, stable=True).indices
    order = order[torch.sort(missing[order].to(torch.uint8), stable=True).indices]
    order = order[torch.sort(group_id[order], stable=True).indices]
    counts = segment_sum(torch.ones(n, dtype=torch.long, device=x.device), group_id, num_groups)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(n, dtype=torch.long, device=x.device)
    rank[order] = torch.arange(n, device=x.device) - starts[group_id[order]]
    return rank < k_per_group[group_id]


def mask_rewards(rewards: Tensor, keep: Tensor) -> Tensor:
    """``rewards`` with the samples outside ``keep`` set to NaN (missing), so every estimator computes
    the kept subset's statistics and gives the others advantage 0 (GFPO)."""
    return torch.where(keep, rewards, torch.full_like(rewards, float("nan")))


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation quantile of sorted values (numpy's default), in plain Python (exact resume)."""
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


class AdaptiveK:
    """Adaptive-difficulty GFPO: how many samples each group keeps, from a streaming difficulty estimate.

    The paper (§ Adaptive Difficulty GFPO) takes a prompt's difficulty to be the mean reward of its
    sampled group, tracks the distribution of difficulties with a streaming t-digest, buckets prompts
    by its quartiles (very hard < Q1 ≤ hard < Q2 ≤ medium < Q3 ≤ easy) and keeps k = 8, 8, 6, 4 of
    G = 16 — harder prompts keep more. What we implement:

    * estimate: the group's mean valid reward; with ``ema_decay > 0`` it is smoothed per prompt key,
      ``d ← decay · d_prev + (1 − decay) · mean`` (the first sighting takes the mean). ``ema_decay = 0``
      (default) is the paper's rule;
    * distribution: the last ``window`` estimates (a FIFO buffer, exact quantiles by linear
      interpolation) instead of a t-digest over all history — exact, small and JSON-serialisable; the
      current batch's estimates enter the buffer before the thresholds are read, so step 1 works;
    * bucket: the number of thresholds the estimate is strictly above, so a tie goes to the harder
      bucket (keeps more); ``k_per_bucket`` runs hardest → easiest and must not increase;
    * a group with no valid reward has no estimate: it gets the hardest bucket's k and is not recorded.
    """

    def __init__(
        self,
        k_per_bucket: Sequence[int] = (8, 8, 6, 4),
        quantiles: Sequence[float] = (0.25, 0.5, 0.75),
        window: int = 2048,
        ema_decay: float = 0.0,
    ):
        self.k_per_bucket = tuple(int(k) for k in k_per_bucket)
        self.quantiles = tuple(float(q) for q in quantiles)
        if len(self.k_per_bucket) != len(self.quantiles) + 1:
            raise ValueError(
                f"k_per_bucket needs len(quantiles) + 1 = {len(self.quantiles) + 1} entries, "
                f"got {len(self.k_per_bucket)}"
            )
        if min(self.k_per_bucket) < 1 or any(a < b for a, b in zip(self.k_per_bucket, self.k_per_bucket[1:])):
            raise ValueError(
                f"k_per_bucket must be >= 1 and non-increasing (hardest first), got {self.k_per_bucket}"
            )
        increasing = all(a < b for a, b in zip(self.quantiles, self.quantiles[1:]))
        if not increasing or any(not 0.0 < q < 1.0 for q in self.quantiles):
            raise ValueError(f"quantiles must be strictly increasing in (0, 1), got {self.quantiles}")
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive integer, got {window!r}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay!r}")
        self.window = window
        self.ema_decay = float(ema_decay)
        self._buffer: list[float] = []
        self._estimate: dict[PromptKey, float] = {}
        self.last_thresholds: tuple[float, ...] = ()

    def thresholds(self) -> tuple[float, ...]:
        """The current bucket boundaries (quantiles of the buffer); empty before anything was seen."""
        if not self._buffer:
            return ()
        ordered = sorted(self._buffer)
        return tuple(_quantile(ordered, q) for q in self.quantiles)

    def assign(self, prompt_keys: Sequence[PromptKey], rewards: Tensor, group_id: Tensor) -> Tensor:
        """Update the estimates with this batch and return ``k`` per group (``LongTensor[num_groups]``);
        ``prompt_keys[g]`` is group g's prompt (e.g. its dataset index)."""
        stats = group_statistics(rewards, group_id, len(prompt_keys))
        means = stats.mean.tolist()
        counts = stats.count.tolist()
        estimates: list[float | None] = []
        for key, mean, count in zip(prompt_keys, means, counts):
            key = _check_key(key)
            if count < 1:
                estimates.append(None)
                continue
            previous = self._estimate.get(key)
            if previous is None or self.ema_decay == 0.0:
                value = mean
            else:
                value = self.ema_decay * previous + (1.0 - self.ema_decay) * mean
            if self.ema_decay > 0.0:
                self._estimate[key] = value
            estimates.append(value)
        self._buffer.extend(v for v in estimates if v is not None)
        del self._buffer[: max(0, len(self._buffer) - self.window)]
        self.last_thresholds = self.thresholds()
        ks = [
            self.k_per_bucket[0 if v is None else sum(v > t for t in self.last_thresholds)] for v in estimates
        ]
        return torch.tensor(ks, dtype=torch.long, device=rewards.device)

    def metrics(self, k: Tensor, prefix: str = "gfpo/") -> dict[str, float]:
        """``k_mean`` of a batch's assignment and the current thresholds, for the logger."""
        out = {prefix + "k_mean": float(k.float().mean()) if k.numel() else 0.0}
        out.update(
            {f"{prefix}difficulty_q{int(q * 100)}": t  # fixed keys: NaN before anything was seen
             for q, t in zip(self.quantiles, self.last_thresholds or (math.nan,) * len(self.quantiles))}
        )
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "k_per_bucket": list(self.k_per_bucket),
            "quantiles": list(self.quantiles),
            "window": self.window,
            "ema_decay": self.ema_decay,
            "buffer": list(self._buffer),
            "estimates": [[key, value] for key, value in self._estimate.items()],  # keeps int keys ints
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__init__(
            state["k_per_bucket"], state["quantiles"], int(state["window"]), float(state["ema_decay"])
        )
        self._buffer = [float(v) for v in state["buffer"]]
        self._estimate = {_check_key(key): float(value) for key, value in state["estimates"]}
        self.last_thresholds = self.thresholds()


# --------------------------------------------------------------------------------------------------
# SRPO history resampling
# --------------------------------------------------------------------------------------------------


class SRPOHistory:
    """SRPO's epoch-level history resampling: prompts whose every rollout was correct during an epoch
    leave the next epoch; prompts with mixed or all-wrong outcomes stay.

    ``record()`` after scoring each batch (a rollout is correct when ``reward >= threshold``; missing
    rewards are ignored, and a prompt with no valid reward in the epoch is not judged, so it stays);
    a prompt seen several times in one epoch must be all-correct every time. ``end_epoch()`` at each
    epoch boundary turns the epoch's all-correct prompts into the drop set, which ``next_epoch_keep`` /
    ``drop_set`` expose. As in the paper a prompt is dropped for one epoch only: it is not rolled out
    in that epoch, so it has no record and returns in the epoch after. Prompts of a batch that
    straddles the boundary are recorded into whichever epoch is open when ``record`` is called.
    """

    def __init__(self, threshold: float = 1.0):
        if not math.isfinite(threshold):
            raise ValueError(f"threshold must be finite, got {threshold!r}")
        self.threshold = float(threshold)
        self.epoch = 0
        self._current: dict[PromptKey, bool] = {}  # key → all rollouts correct so far this epoch
        self._drop: frozenset[PromptKey] = frozenset()
        self.total_dropped = 0

    def record(self, prompt_keys: Sequence[PromptKey], rewards: Tensor, group_id: Tensor) -> None:
        """Record one scored batch; ``prompt_keys[g]`` is group g's prompt."""
        stats = group_statistics(rewards, group_id, len(prompt_keys))
        judged = (stats.count >= 1).tolist()
        all_correct = (stats.minimum >= self.threshold).tolist()  # min over valid rewards only
        for key, seen, correct in zip(prompt_keys, judged, all_correct):
            key = _check_key(key)
            if seen:
                self._current[key] = self._current.get(key, True) and bool(correct)

    def end_epoch(self) -> frozenset[PromptKey]:
        """Close the epoch: its all-correct prompts become the next epoch's drop set (returned)."""
        self._drop = frozenset(key for key, correct in self._current.items() if correct)
        self.total_dropped += len(self._drop)
        self._current = {}
        self.epoch += 1
        return self._drop

    def drop_set(self) -> frozenset[PromptKey]:
        """Prompts to leave out of the current (next) epoch."""
        return self._drop

    def next_epoch_keep(self, prompt_keys: Sequence[PromptKey]) -> list[bool]:
        """Keep flag per candidate prompt of the epoch. If every candidate would be dropped, all are kept
        (with a warning) rather than leaving an empty epoch."""
        keep = [_check_key(key) not in self._drop for key in prompt_keys]
        if prompt_keys and not any(keep):
            logger.warning(
                "SRPO: every one of %d prompts was all-correct last epoch; keeping them all", len(keep)
            )
            return [True] * len(keep)
        return keep

    def counts(self, prefix: str = "srpo/") -> dict[str, float]:
        """For the logger: prompts judged so far this epoch, how many are all-correct so far, the size of
        the drop set in force, and the total dropped over all epochs."""
        return {
            prefix + "recorded": float(len(self._current)),
            prefix + "all_correct": float(sum(self._current.values())),
            prefix + "dropped": float(len(self._drop)),
            prefix + "dropped_total": float(self.total_dropped),
            prefix + "epoch": float(self.epoch),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "epoch": self.epoch,
            "current": [[key, correct] for key, correct in self._current.items()],
            "drop": sorted(self._drop, key=lambda key: (isinstance(key, str), key)),
            "total_dropped": self.total_dropped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.threshold = float(state["threshold"])
        self.epoch = int(state["epoch"])
        self._current = {_check_key(key): bool(correct) for key, correct in state["current"]}
        self._drop = frozenset(_check_key(key) for key in state["drop"])
        self.total_dropped = int(state["total_dropped"])
