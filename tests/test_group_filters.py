"""Tests for :mod:`mmrl.group_filters`: DAPO dynamic sampling and overlong shaping, GFPO (fixed and
adaptive k), SRPO history resampling, and exact state_dict round trips through JSON."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from mmrl.advantages import AdvantageParams, compute_advantages
from mmrl.group_filters import (
    AdaptiveK,
    DynamicSamplingStats,
    SRPOHistory,
    fill_batch,
    gfpo_keep,
    informative_groups,
    mask_rewards,
    overlong_penalty,
    truncated_mask,
)

NAN = math.nan
EPS = 1e-4


def t(values, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def ids(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def json_round_trip(state: dict) -> dict:
    return json.loads(json.dumps(state))


# ==================================================================================================
# DAPO dynamic sampling
# ==================================================================================================


def test_informative_groups_hand_values():
    # g0 [0, 1] mixed → True; g1 [1, 1] equal → False; g2 [1, nan] one valid → False; g3 [nan] → False;
    # g4 3 × 0.1 (fp32, equal) → False; g5 [0, 0, 1e-7] → True (any difference counts)
    rewards = t([0, 1, 1, 1, 1, NAN, NAN, 0.1, 0.1, 0.1, 0, 0, 1e-7])
    group_id = ids([0, 0, 1, 1, 2, 2, 3, 4, 4, 4, 5, 5, 5])
    assert informative_groups(rewards, group_id).tolist() == [True, False, False, False, False, True]
    # num_groups can name groups with no sample at all (uninformative)
    assert informative_groups(t([0, 1]), ids([0, 0]), num_groups=3).tolist() == [True, False, False]


class FakeGenerator:
    """Chunks of groups of 4 with preset rewards; counts its calls."""

    def __init__(self, chunks: list[list[list[float]]]):
        self.chunks = chunks
        self.calls = 0

    def __call__(self):
        groups = self.chunks[self.calls % len(self.chunks)]
        self.calls += 1
        rewards = t([r for group in groups for r in group])
        group_id = ids([g for g, group in enumerate(groups) for _ in group])
        return rewards, group_id, f"chunk{self.calls - 1}"


MIXED, ZEROS, ONES = [0.0, 1.0, 0.0, 1.0], [0.0] * 4, [1.0] * 4


def test_fill_batch_collects_only_informative_groups():
    gen = FakeGenerator([[ZEROS, MIXED, ONES], [MIXED, ONES, [0.0, 0.0, 0.0, 0.5]], [MIXED, MIXED, MIXED]])
    out = fill_batch(gen, target_groups=4, max_sample_batches=5)
    # chunk0 keeps its group 1; chunk1 its groups 0 and 2; chunk2 group 0 (its groups 1 and 2 are surplus)
    assert gen.calls == 3 and out.full and out.num_groups == 4
    assert [(payload, index.tolist()) for payload, index in out.parts] == [
        ("chunk0", [4, 5, 6, 7]),
        ("chunk1", [0, 1, 2, 3, 8, 9, 10, 11]),
        ("chunk2", [0, 1, 2, 3]),
    ]
    assert out.group_id.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert out.rewards.tolist() == MIXED + MIXED + [0.0, 0.0, 0.0, 0.5] + MIXED
    assert informative_groups(out.rewards, out.group_id).all()
    assert out.stats.state_dict() == {
        "batches_generated": 3, "prompts_drawn": 9, "groups_kept": 4,
        "groups_dropped": 3, "groups_surplus": 2, "bound_hits": 0,
    }


def test_fill_batch_never_returns_a_zero_variance_group():
    g = torch.Generator().manual_seed(0)

    def generate():
        group_id = torch.arange(12) // 4
        rewards = (torch.rand(12, generator=g) < 0.3).float()  # 0/1 accuracy: many constant groups
        rewards[torch.rand(12, generator=g) < 0.1] = NAN
        return rewards, group_id, None

    for _ in range(20):
        out = fill_batch(generate, target_groups=5, max_sample_batches=50)
        assert out.full
        assert informative_groups(out.rewards, out.group_id).all()
        assert sorted(set(out.group_id.tolist())) == list(range(5))


def test_fill_batch_stops_at_its_bound_with_a_warning(caplog):
    gen = FakeGenerator([[ZEROS, ONES], [ONES, MIXED]])
    stats = DynamicSamplingStats()
    with caplog.at_level(logging.WARNING, logger="mmrl.group_filters"):
        out = fill_batch(gen, target_groups=3, max_sample_batches=3, stats=stats)
    assert gen.calls == 3  # chunk0, chunk1, chunk0 again
    assert not out.full and out.num_groups == 1
    assert out.rewards.tolist() == MIXED and out.group_id.tolist() == [0] * 4
    assert stats.bound_hits == 1 and stats.prompts_drawn == 6 and stats.groups_dropped == 5
    message = caplog.records[-1].getMessage()
    assert caplog.records[-1].levelno == logging.WARNING
    assert "max_sample_batches=3" in message and "1 of 3" in message and "6 prompts drawn" in message


def test_fill_batch_with_nothing_informative_returns_empty(caplog):
    gen = FakeGenerator([[ZEROS, ONES]])
    with caplog.at_level(logging.WARNING, logger="mmrl.group_filters"):
        out = fill_batch(gen, target_groups=2, max_sample_batches=2)
    assert out.num_groups == 0 and out.parts == [] and out.rewards.numel() == 0
    assert "0 of 2" in caplog.text


def test_fill_batch_no_warning_when_target_met_on_last_batch(caplog):
    gen = FakeGenerator([[ZEROS], [MIXED]])
    with caplog.at_level(logging.WARNING, logger="mmrl.group_filters"):
        out = fill_batch(gen, target_groups=1, max_sample_batches=2)
    assert out.full and caplog.records == []


@pytest.mark.parametrize("target, bound", [(0, 1), (1, 0), (2, -1)])
def test_fill_batch_rejects_bad_bounds(target, bound):
    with pytest.raises(ValueError):
        fill_batch(FakeGenerator([[MIXED]]), target_groups=target, max_sample_batches=bound)


def test_dynamic_sampling_stats_round_trip():
    stats = DynamicSamplingStats(batches_generated=3, prompts_drawn=9, groups_dropped=2, bound_hits=1)
    restored = DynamicSamplingStats()
    restored.load_state_dict(json_round_trip(stats.state_dict()))
    assert restored == stats
    assert stats.metrics()["dynamic_sampling/prompts_drawn"] == 9.0


# ==================================================================================================
# DAPO overlong shaping
# ==================================================================================================


def test_overlong_penalty_boundaries():
    # L_max = 20, L_cache = 4: free up to 16, then −(len − 16)/4, −1 at 20 and beyond
    lengths = ids([0, 15, 16, 17, 18, 19, 20, 21, 100])
    close = torch.testing.assert_close
    close(overlong_penalty(lengths, 20, 4), t([0, 0, 0, -0.25, -0.5, -0.75, -1, -1, -1]))
    close(overlong_penalty(lengths, 20, 4, penalty_factor=0.5), t([0, 0, 0, -0.125, -0.25, -0.375, -0.5, -0.5, -0.5]))
    # the cache may be the whole budget: linear from length 0
    close(overlong_penalty(ids([0, 5, 10]), 10, 10), t([0, -0.5, -1]))


def test_overlong_penalty_keeps_missing_rewards_missing():
    shaped = t([1.0, NAN]) + overlong_penalty(ids([18, 18]), 20, 4)
    assert shaped[0].item() == 0.5 and math.isnan(shaped[1].item())


@pytest.mark.parametrize("cache, factor", [(0, 1.0), (21, 1.0), (4, -1.0), (4, math.inf)])
def test_overlong_penalty_rejects_bad_settings(cache, factor):
    with pytest.raises(ValueError):
        overlong_penalty(ids([1]), 20, cache, factor)


def test_truncated_mask():
    truncated = torch.tensor([False, True, False])
    assert truncated_mask(truncated).tolist() == [True, False, True]
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.float32)
    out = truncated_mask(truncated, mask)
    assert out.dtype == mask.dtype
    assert out.tolist() == [[1, 1, 0], [0, 0, 0], [1, 0, 0]]


# ==================================================================================================
# GFPO
# ==================================================================================================


def test_gfpo_keep_shortest_with_index_ties():
    # lengths [5, 3, 9, 3, 7, 1]: order 1 (idx 5), 3 (idx 1), 3 (idx 3: tie → lower index first), 5, 7, 9
    rewards, lengths, group_id = t([1.0] * 6), ids([5, 3, 9, 3, 7, 1]), ids([0] * 6)
    assert gfpo_keep(rewards, lengths, group_id, 2).nonzero().flatten().tolist() == [1, 5]
    assert gfpo_keep(rewards, lengths, group_id, 3).nonzero().flatten().tolist() == [1, 3, 5]
    assert gfpo_keep(rewards, lengths, group_id, 10).all()


def test_gfpo_keep_reward_per_token():
    # r / len = [0.1, 0, 0.25, 0.25, missing, 0.5] → order idx 5, 2, 3 (tie → index), 0, 1, then 4 (missing)
    rewards, lengths = t([1.0, 0.0, 1.0, 1.0, NAN, 0.5]), ids([10, 2, 4, 4, 1, 1])
    keep = gfpo_keep(rewards, lengths, ids([0] * 6), 3, metric="reward_per_token")
    assert keep.nonzero().flatten().tolist() == [2, 3, 5]
    keep = gfpo_keep(rewards, lengths, ids([0] * 6), 5, metric="reward_per_token")
    assert keep.nonzero().flatten().tolist() == [0, 1, 2, 3, 5]  # the missing one is the one left out


def test_gfpo_missing_rewards_sort_last_by_length_too():
    # idx 0 is the shortest but has no reward: the valid ones go first
    keep = gfpo_keep(t([NAN, 1.0, 0.0, 1.0]), ids([1, 5, 6, 7]), ids([0] * 4), 2)
    assert keep.tolist() == [False, True, True, False]


@pytest.mark.parametrize("metric", ["length", "reward_per_token"])
def test_gfpo_keeps_exactly_k_per_group_interleaved(metric):
    g = torch.Generator().manual_seed(1)
    group_id = torch.randperm(30, generator=g) % 5  # 5 groups of 6, interleaved
    rewards = torch.rand(30, generator=g)
    lengths = torch.randint(1, 8, (30,), generator=g)  # many ties
    k = ids([1, 2, 3, 6, 4])
    keep = gfpo_keep(rewards, lengths, group_id, k, metric=metric)
    kept = torch.zeros(5, dtype=torch.long).index_add_(0, group_id, keep.long())
    assert kept.tolist() == [1, 2, 3, 6, 4]
    assert torch.equal(keep, gfpo_keep(rewards, lengths, group_id, k, metric=metric))  # deterministic
    # every kept sample is at least as good as every dropped one of its group
    score = lengths.double() if metric == "length" else -rewards.double() / lengths
    for group in range(5):
        members = group_id == group
        if (members & ~keep).any():
            assert score[members & keep].max() <= score[members & ~keep].min()


def test_gfpo_advantages_from_the_kept_subset():
    # keep the 3 shortest of [r=1 len 2, r=0 len 3, r=1 len 9, r=0 len 1]: idx 3, 0, 1 → rewards [1, 0, 0]
    # mean 1/3; unbiased std √((4/9 + 1/9 + 1/9) / 2) = √(1/3); the dropped idx 2 gets 0
    rewards, lengths = t([1.0, 0.0, 1.0, 0.0]), ids([2, 3, 9, 1])
    keep = gfpo_keep(rewards, lengths, ids([0] * 4), 3)
    out = compute_advantages("grpo", mask_rewards(rewards, keep), ids([0] * 4), AdvantageParams())
    s = math.sqrt(1 / 3) + EPS
    torch.testing.assert_close(out, t([(2 / 3) / s, (-1 / 3) / s, 0.0, (-1 / 3) / s]))


def test_gfpo_validation():
    with pytest.raises(ValueError, match="metric"):
        gfpo_keep(t([1.0]), ids([1]), ids([0]), 1, metric="entropy")
    with pytest.raises(ValueError, match="k must be >= 1"):
        gfpo_keep(t([1.0]), ids([1]), ids([0]), 0)
    with pytest.raises(ValueError, match="shape"):
        gfpo_keep(t([1.0, 2.0]), ids([1, 2]), ids([0, 1]), ids([1]))


def test_adaptive_k_harder_prompts_keep_more():
    # group means 0, 0.25, 0.5, 1 (fresh buffer). Linear quantiles of [0, 0.25, 0.5, 1]:
    # q25 at position 0.75 → 0.1875; q50 at 1.5 → 0.375; q75 at 2.25 → 0.625.
    # buckets (thresholds strictly below): 0 → 0, 0.25 → 1, 0.5 → 2, 1 → 3
    adaptive = AdaptiveK(k_per_bucket=(4, 3, 2, 1))
    rewards = t([0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 1, 1, 1, 1])
    group_id = torch.arange(16) // 4
    k = adaptive.assign([10, 11, 12, 13], rewards, group_id)
    assert k.tolist() == [4, 3, 2, 1]
    assert adaptive.last_thresholds == pytest.approx((0.1875, 0.375, 0.625))
    assert adaptive.metrics(k)["gfpo/k_mean"] == 2.5


def test_adaptive_k_paper_defaults_and_ties():
    adaptive = AdaptiveK()  # (8, 8, 6, 4) hardest → easiest, quartiles
    # every prompt unsolved: all thresholds 0, no estimate is above them → hardest bucket
    assert adaptive.assign(["a", "b"], t([0.0] * 8), torch.arange(8) // 4).tolist() == [8, 8]
    # a group without any valid reward: hardest k, and it is not recorded
    assert adaptive.assign(["c"], t([NAN, NAN]), ids([0, 0])).tolist() == [8]
    assert adaptive.state_dict()["buffer"] == [0.0, 0.0]


def test_adaptive_k_ema_and_window():
    adaptive = AdaptiveK(window=3, ema_decay=0.5)
    adaptive.assign(["a"], t([1.0, 1.0]), ids([0, 0]))  # first sighting: 1
    adaptive.assign(["a"], t([0.0, 0.0]), ids([0, 0]))  # 0.5 · 1 + 0.5 · 0 = 0.5
    adaptive.assign(["b", "a"], t([0.0, 1.0]), ids([0, 1]))  # b: 0; a: 0.5 · 0.5 + 0.5 · 1 = 0.75
    state = adaptive.state_dict()
    assert state["buffer"] == [0.5, 0.0, 0.75]  # window 3: the first estimate (1.0) fell out
    assert state["estimates"] == [["a", 0.75], ["b", 0.0]]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"k_per_bucket": (4, 6, 8, 8)},  # must not increase
        {"k_per_bucket": (8, 6, 4)},  # one per bucket
        {"quantiles": (0.5, 0.25, 0.75)},
        {"quantiles": (0.0, 0.5, 1.0)},
        {"window": 0},
        {"ema_decay": 1.0},
    ],
)
def test_adaptive_k_validation(kwargs):
    with pytest.raises(ValueError):
        AdaptiveK(**kwargs)


def test_adaptive_k_state_dict_continues_identically():
    g = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(8):
        keys = torch.randint(0, 6, (4,), generator=g).tolist()
        keys = [key if key % 2 else f"p{key}" for key in keys]  # int and str keys
        batches.append((keys, (torch.rand(16, generator=g) < 0.5).float(), torch.arange(16) // 4))
    original = AdaptiveK(window=10, ema_decay=0.3)
    for batch in batches[:4]:
        original.assign(*batch)
    restored = AdaptiveK()
    restored.load_state_dict(json_round_trip(original.state_dict()))
    assert restored.state_dict() == original.state_dict()
    for batch in batches[4:]:
        assert torch.equal(original.assign(*batch), restored.assign(*batch))
        assert original.last_thresholds == restored.last_thresholds
    assert restored.state_dict() == original.state_dict()


# ==================================================================================================
# SRPO history resampling
# ==================================================================================================


def test_srpo_drops_exactly_the_all_correct_prompts():
    history = SRPOHistory(threshold=1.0)
    # batch 1: prompts 0 (all correct), 1 (mixed), 2 (all wrong), "x" (correct + one missing),
    #          3 (all missing: not judged), 4 (all correct so far), 5 (0.99 < threshold)
    history.record(
        [0, 1, 2, "x", 3, 4, 5],
        t([1, 1, 1, 1, 0, 1, 0, 0, 0, 1, NAN, NAN, NAN, 1, 1, 0.99, 1]),
        ids([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]),
    )
    # batch 2: prompt 4 again, now with a wrong rollout → not all-correct over the epoch
    history.record([4], t([1, 0]), ids([0, 0]))
    assert history.counts()["srpo/all_correct"] == 2.0
    assert history.end_epoch() == frozenset({0, "x"})
    assert history.drop_set() == frozenset({0, "x"})
    assert history.next_epoch_keep([0, 1, 2, 3, 4, 5, "x", 9]) == [False, True, True, True, True, True, False, True]
    assert history.counts() == {
        "srpo/recorded": 0.0, "srpo/all_correct": 0.0, "srpo/dropped": 2.0, "srpo/dropped_total": 2.0, "srpo/epoch": 1.0,
    }
    # next epoch: prompt 0 was not rolled out, so it comes back the epoch after
    history.record([1], t([1, 1]), ids([0, 0]))
    assert history.end_epoch() == frozenset({1})
    assert history.next_epoch_keep([0, 1]) == [True, False]


def test_srpo_keeps_everything_rather_than_an_empty_epoch(caplog):
    history = SRPOHistory()
    history.record([0, 1], t([1, 1, 1, 1]), ids([0, 0, 1, 1]))
    history.end_epoch()
    with caplog.at_level(logging.WARNING, logger="mmrl.group_filters"):
        assert history.next_epoch_keep([0, 1]) == [True, True]
    assert "all-correct" in caplog.text


def test_srpo_state_dict_continues_identically():
    original = SRPOHistory(threshold=0.5)
    original.record([3, "a", 7], t([1, 1, 0, 1, 1, 1]), ids([0, 0, 1, 1, 2, 2]))
    original.end_epoch()
    original.record(["a", 8], t([1, 1, 0, 0]), ids([0, 0, 1, 1]))  # mid-epoch checkpoint
    restored = SRPOHistory()
    restored.load_state_dict(json_round_trip(original.state_dict()))
    assert restored.state_dict() == original.state_dict()
    assert restored.drop_set() == original.drop_set() == frozenset({3, 7})
    for history in (original, restored):
        history.record([3], t([1, 0.2]), ids([0, 0]))
        history.end_epoch()
    assert restored.drop_set() == original.drop_set() == frozenset({"a"})
    assert restored.state_dict() == original.state_dict()


def test_prompt_keys_must_be_int_or_str():
    with pytest.raises(TypeError):
        SRPOHistory().record([(1, 2)], t([1.0]), ids([0]))
    with pytest.raises(TypeError):
        AdaptiveK().assign([1.5], t([1.0]), ids([0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(4)
    group_id = torch.randperm(40, generator=g) % 8
    rewards = (torch.rand(40, generator=g) < 0.5).float()
    lengths = torch.randint(1, 6, (40,), generator=g)
    for metric in ("length", "reward_per_token"):
        on_cpu = gfpo_keep(rewards, lengths, group_id, 3, metric=metric)
        on_cuda = gfpo_keep(rewards.cuda(), lengths.cuda(), group_id.cuda(), 3, metric=metric)
        assert torch.equal(on_cuda.cpu(), on_cpu)
    assert torch.equal(informative_groups(rewards.cuda(), group_id.cuda()).cpu(), informative_groups(rewards, group_id))


def test_fill_batch_keep_going_hook_for_several_processes():
    # another process still needs groups for three more rounds: this (full) one generates along, all surplus
    others_need = iter([True, True, True, False])
    calls = []

    def any_process_needs_more(need_more: bool) -> bool:
        calls.append(need_more)
        return need_more or next(others_need)

    gen = FakeGenerator([[MIXED, MIXED]])
    out = fill_batch(gen, target_groups=2, max_sample_batches=10, keep_going=any_process_needs_more)
    assert out.full and out.num_groups == 2 and len(out.parts) == 1
    assert calls == [True, False, False, False, False]
    assert gen.calls == 4 and out.stats.groups_surplus == 6
