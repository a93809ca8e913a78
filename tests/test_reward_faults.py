"""Numerical faults in rewards: every kind of bad value is missing (NaN), warned once per (reward, kind) and
then only counted in a checkpointable :class:`RewardFaults`; timeouts never pile up threads; the group
advantages computed from the totals stay finite. Expectations are computed by hand."""

from __future__ import annotations

import inspect
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

import mmrl.rewards as rewards_mod
from mmrl.algorithms import group_advantages
from mmrl.rewards import (
    DEFAULT_REWARD_TIMEOUT_S,
    FAULT_KINDS,
    TOTAL_NAME,
    RewardFaults,
    classify_reward,
    compute_rewards,
)

PROMPTS = ["p0", "p1", "p2", "p3"]
COMPLETIONS = ["a", "b", "c", "d"]
# "good" has weight 2 and values 1..4; "bad" has weight 0.5 and values 10, 20, 30, 40 where not broken.
GOOD = [1.0, 2.0, 3.0, 4.0]
BAD = [10.0, 20.0, 30.0, 40.0]
TOTAL_ALL = [7.0, 14.0, 21.0, 28.0]  # 0.5 * BAD + 2 * GOOD
TOTAL_GOOD_ONLY = [2.0, 4.0, 6.0, 8.0]


def constant(values: list, name: str) -> Callable[..., list]:
    def fn(prompts, completions, **kwargs):
        return list(values)

    fn.__name__ = name
    return fn


def nan_equal(actual: torch.Tensor, expected: list[float]) -> None:
    expected_tensor = torch.tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected_tensor, equal_nan=True, rtol=0, atol=0)


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "mmrl.rewards" and r.levelno == logging.WARNING]


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """Released at teardown, so a "hung" reward's thread ends with its test instead of sleeping 5 s more."""
    event = threading.Event()
    yield event
    event.set()


def wait_until_idle(fn: Callable, limit: float = 5.0) -> None:
    deadline = time.monotonic() + limit
    while id(fn) in rewards_mod._RUNNING and time.monotonic() < deadline:
        time.sleep(0.01)
    assert id(fn) not in rewards_mod._RUNNING


# --------------------------------------------------------------------------- per-value kinds

PER_VALUE = [
    (math.inf, "inf"),
    (-math.inf, "inf"),
    (np.float32("inf"), "inf"),
    (1e39, "inf"),  # finite in Python, infinite in the float32 table
    (10**400, "inf"),  # float() overflows
    (math.nan, "nan"),
    (torch.tensor(float("nan")), "nan"),
    (None, "none"),
    ("n/a", "non_numeric"),
    ("1.5", "non_numeric"),  # text is never a reward, even when it parses
    (object(), "non_numeric"),
    ([1.0], "non_numeric"),
    (1 + 2j, "non_numeric"),
]


@pytest.mark.parametrize(("bad_value", "kind"), PER_VALUE,
                         ids=[f"{k}-{i}" for i, (_, k) in enumerate(PER_VALUE)])
def test_bad_value_is_missing_and_the_rest_combine_exactly(bad_value, kind, caplog):
    values = [10.0, bad_value, 30.0, 40.0]
    faults = RewardFaults()
    out = compute_rewards([constant(values, "bad"), constant(GOOD, "good")], [0.5, 2.0], PROMPTS, COMPLETIONS,
                          faults=faults)
    nan_equal(out.per_function[:, 0], [10.0, math.nan, 30.0, 40.0])
    nan_equal(out.per_function[:, 1], GOOD)
    # Row 1 loses only the bad function's term: 2 * 2.0; the other rows are the full weighted sum.
    nan_equal(out.total, [7.0, 4.0, 21.0, 28.0])
    assert out.failures == {"bad": 1}
    assert [(f.name, f.kind, f.count, f.row) for f in out.faults] == [("bad", kind, 1, 1)]
    assert faults.state_dict() == {"counts": {"bad": {kind: 1}}}
    [message] = warnings_of(caplog)
    assert "'bad'" in message and f"({kind})" in message and "row 1" in message
    assert rewards_mod._short_repr(bad_value)[:50] in message


def test_classify_accepts_numbers_of_every_type():
    assert classify_reward(True) == (1.0, None)
    assert classify_reward(np.int64(3)) == (3.0, None)
    assert classify_reward(torch.tensor(0.25)) == (0.25, None)
    assert classify_reward(-0.0) == (0.0, None)
    assert classify_reward(3.0e38) == (3.0e38, None)  # fits float32 (max ~3.4e38)


def test_value_that_overflows_only_once_weighted_is_inf():
    out = compute_rewards([constant([3.0e38, 1.0, 1.0, 1.0], "big"), constant(GOOD, "good")], [10.0, 2.0],
                          PROMPTS, COMPLETIONS)
    nan_equal(out.per_function[:, 0], [math.nan, 1.0, 1.0, 1.0])
    nan_equal(out.total, [2.0, 14.0, 16.0, 18.0])
    assert [(f.kind, f.row) for f in out.faults] == [("inf", 0)]


def test_total_that_overflows_float32_is_missing_and_counted():
    # Each weighted term fits float32 (3e38 < 3.4e38); their sum (6e38) does not.
    faults = RewardFaults()
    out = compute_rewards([constant([3.0e38, 1.0, 1.0, 1.0], "x"), constant([3.0e38, 1.0, 2.0, 3.0], "y")],
                          [1.0, 1.0], PROMPTS, COMPLETIONS, faults=faults)
    nan_equal(out.total, [math.nan, 2.0, 3.0, 4.0])
    assert torch.isfinite(out.per_function).all()
    assert out.failures == {}
    assert faults.state_dict() == {"counts": {TOTAL_NAME: {"inf": 1}}}


# --------------------------------------------------------------------------- whole-batch kinds


def test_wrong_length_is_missing_for_the_batch():
    out = compute_rewards([constant([1.0, 2.0], "bad"), constant(GOOD, "good")], [0.5, 2.0],
                          PROMPTS, COMPLETIONS)
    nan_equal(out.per_function[:, 0], [math.nan] * 4)
    nan_equal(out.total, TOTAL_GOOD_ONLY)
    [fault] = out.faults
    assert (fault.kind, fault.count, fault.row) == ("wrong_length", 4, 0)
    assert "2 values for a batch of 4" in fault.value


def test_exception_is_missing_for_the_batch_with_its_traceback(caplog):
    def bad(prompts, completions, **kwargs):
        raise ZeroDivisionError("scorer divided by zero")

    out = compute_rewards([bad, constant(GOOD, "good")], [0.5, 2.0], PROMPTS, COMPLETIONS)
    nan_equal(out.per_function[:, 0], [math.nan] * 4)
    nan_equal(out.total, TOTAL_GOOD_ONLY)
    assert out.failures == {"bad": 4}
    [message] = warnings_of(caplog)
    assert "'bad'" in message and "(exception)" in message
    assert "ZeroDivisionError: scorer divided by zero" in message
    assert "Traceback" in message  # the first warning says where it raised


def test_timeout_is_missing_for_the_batch_and_never_piles_up_threads(gate, caplog):
    calls = []

    def slow(prompts, completions, **kwargs):
        calls.append(1)
        gate.wait(5.0)  # "sleeps" 5 s unless the test releases it
        return BAD

    start = time.monotonic()
    outs = [compute_rewards([slow, constant(GOOD, "good")], [0.5, 2.0], PROMPTS, COMPLETIONS, timeout=0.2)
            for _ in range(3)]
    assert time.monotonic() - start < 4.0  # 0.2 s for the first call, the next two are skipped at once
    for out in outs:
        nan_equal(out.per_function[:, 0], [math.nan] * 4)
        nan_equal(out.total, TOTAL_GOOD_ONLY)
        assert [(f.kind, f.count) for f in out.faults] == [("timeout", 4)]
    assert "still running" in outs[1].faults[0].value
    assert len(calls) == 1  # the hung call was not started again
    assert sum(t.name == "reward-slow" and t.is_alive() for t in threading.enumerate()) == 1
    # Once the stuck call returns, the reward is called normally again.
    gate.set()
    wait_until_idle(slow)
    out = compute_rewards([slow, constant(GOOD, "good")], [0.5, 2.0], PROMPTS, COMPLETIONS, timeout=5.0)
    nan_equal(out.total, TOTAL_ALL)
    assert len(calls) == 2 and out.faults == []


def test_reward_that_raises_its_own_timeout_error_is_an_exception():
    def bad(prompts, completions, **kwargs):
        raise TimeoutError("HTTP judge timed out")

    out = compute_rewards([bad], [1.0], PROMPTS, COMPLETIONS)
    assert [f.kind for f in out.faults] == ["exception"]
    nan_equal(out.total, [math.nan] * 4)


def test_timeouts_are_on_by_default():
    assert DEFAULT_REWARD_TIMEOUT_S == 300.0
    assert inspect.signature(compute_rewards).parameters["timeout"].default == DEFAULT_REWARD_TIMEOUT_S
    with pytest.raises(ValueError, match="timeout"):
        compute_rewards([constant(GOOD, "good")], [1.0], PROMPTS, COMPLETIONS, timeout=-1.0)


# --------------------------------------------------------------------------- warn once, then count


def test_warned_once_per_reward_and_kind_then_only_counted(caplog):
    faults = RewardFaults()
    mixed = constant([math.inf, math.nan, None, "x"], "mixed")
    also = constant([1.0, 2.0, 3.0, -math.inf], "also")
    for _ in range(3):
        out = compute_rewards([mixed, also], [1.0, 1.0], PROMPTS, COMPLETIONS, faults=faults)
    nan_equal(out.total, [1.0, 2.0, 3.0, math.nan])
    messages = warnings_of(caplog)
    assert len(messages) == 5  # (mixed: inf, nan, none, non_numeric) + (also: inf), each once
    pattern = re.compile(r"reward '(\w+)': \d+ value\(s\) missing \((\w+)\)")
    assert sorted(pattern.match(m).groups() for m in messages) == [
        ("also", "inf"), ("mixed", "inf"), ("mixed", "nan"), ("mixed", "non_numeric"), ("mixed", "none")]
    assert faults.state_dict() == {"counts": {"mixed": {"inf": 3, "nan": 3, "none": 3, "non_numeric": 3},
                                              "also": {"inf": 3}}}
    assert faults.total == 15
    metrics = faults.metrics()
    assert metrics["reward_missing_total"] == 15.0
    assert metrics["reward_missing_total/inf"] == 6.0 and metrics["reward_missing_total/none"] == 3.0
    assert metrics["reward_missing_total/timeout"] == 0.0


def test_without_a_counter_every_call_warns(caplog):
    # compute_rewards stays pure: no hidden state remembers earlier calls; the trainer's counter does.
    for _ in range(2):
        compute_rewards([constant([None, 1.0, 1.0, 1.0], "r")], [1.0], PROMPTS, COMPLETIONS)
    assert len(warnings_of(caplog)) == 2


def test_metric_keys_are_fixed():
    expected = {"reward_missing_total", *(f"reward_missing_total/{k}" for k in FAULT_KINDS)}
    faults = RewardFaults()
    assert set(faults.metrics()) == expected and not any(faults.metrics().values())
    compute_rewards([constant([None] * 4, "r")], [1.0], PROMPTS, COMPLETIONS, faults=faults)
    assert set(faults.metrics()) == expected


def test_state_dict_round_trip_continues_the_counts_exactly(caplog):
    faults = RewardFaults()
    fn = constant([math.inf, None, 1.0, 2.0], "r")
    compute_rewards([fn], [1.0], PROMPTS, COMPLETIONS, faults=faults)
    compute_rewards([fn], [1.0], PROMPTS, COMPLETIONS, faults=faults)
    state = json.loads(json.dumps(faults.state_dict()))  # what a checkpoint holds
    assert state == {"counts": {"r": {"inf": 2, "none": 2}}}

    resumed = RewardFaults()
    resumed.load_state_dict(state)
    assert resumed.metrics() == faults.metrics()
    compute_rewards([fn], [1.0], PROMPTS, COMPLETIONS, faults=resumed)
    compute_rewards([fn], [1.0], PROMPTS, COMPLETIONS, faults=faults)
    assert resumed.state_dict() == faults.state_dict() == {"counts": {"r": {"inf": 3, "none": 3}}}
    assert resumed.total == 6
    # The saved state is a copy, not a view of the live counts.
    assert state == {"counts": {"r": {"inf": 2, "none": 2}}}


@pytest.mark.parametrize("state", [{"counts": {"r": {"bogus": 1}}}, {"counts": {"r": {"inf": -1}}},
                                   {"counts": {"r": {"inf": 1.5}}}, {"counts": {"r": {"inf": True}}}])
def test_bad_state_is_refused(state):
    with pytest.raises(ValueError, match="reward-fault"):
        RewardFaults().load_state_dict(state)


# --------------------------------------------------------------------------- what the advantages see


def test_group_advantages_from_faulty_rewards_are_finite():
    # Groups of 2. Group 0: both rows valid (bad is inf in row 1: total = 2 * 2.0 = 4). Group 1: row 2 has
    # every function missing (NaN total), row 3 valid.
    bad = constant([10.0, math.inf, None, 40.0], "bad")
    good = constant([1.0, 2.0, math.nan, 4.0], "good")
    out = compute_rewards([bad, good], [0.5, 2.0], PROMPTS, COMPLETIONS)
    nan_equal(out.total, [7.0, 4.0, math.nan, 28.0])
    adv = group_advantages(out.total, group_size=2)
    assert torch.isfinite(adv).all()
    # Group 0: mean 5.5, centred ±1.5, unbiased std sqrt(4.5); eps 1e-4. Group 1: one valid sample → 0, and
    # the all-missing sample gets exactly 0 (it pushes the policy neither way).
    a = 1.5 / (math.sqrt(4.5) + 1e-4)
    torch.testing.assert_close(adv, torch.tensor([a, -a, 0.0, 0.0]))
    assert group_advantages(torch.full((4,), math.nan), group_size=2).tolist() == [0.0] * 4


# --------------------------------------------------------------------------- the image-gen start-up check


def test_dry_run_bounds_time_and_refuses_infinite_rewards(gate):
    from image_gen.rewards import dry_run

    def hangs(prompts, completions, **kwargs):
        gate.wait(5.0)
        return [1.0]

    with pytest.raises(RuntimeError, match="'hangs' did not finish"):
        dry_run([hangs], "a red circle", torch.rand(3, 8, 8), None, timeout=0.2)
    with pytest.raises(RuntimeError, match="'infinite'.*finite"):
        dry_run([constant([math.inf], "infinite")], "a red circle", torch.rand(3, 8, 8), None)
    image = torch.rand(3, 8, 8)
    assert dry_run([constant([None], "silent")], "a red circle", image, None) == {"silent": None}
