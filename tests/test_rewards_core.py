"""Tests for :mod:`mmrl.rewards`: weighted combination with TRL's missing-reward semantics, failures,
timeouts, and resolving rewards by name or by file."""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch

import mmrl.rewards as rewards_mod
from mmrl.rewards import available_rewards, compute_rewards, get_reward, register_reward, reward_name

PROMPTS = ["p0", "p1", "p2", "p3"]
COMPLETIONS = ["a", "b", "c", "d"]


@pytest.fixture(autouse=True)
def isolated_registry(monkeypatch):
    """Each test registers into its own copy of the registry, so names never leak between tests."""
    monkeypatch.setattr(rewards_mod, "_REGISTRY", dict(rewards_mod._REGISTRY))


def constant(values):
    def fn(prompts, completions, **kwargs):
        return list(values)

    return fn


def nan_equal(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), equal_nan=True)


# --------------------------------------------------------------------------- weighted sum


def test_weighted_sum():
    out = compute_rewards([constant([1, 0, 1, 0]), constant([0.5, 0.5, 1.0, 0.0])], [2.0, 0.5],
                          PROMPTS, COMPLETIONS)
    nan_equal(out.total, [2.25, 0.25, 2.5, 0.0])
    assert out.per_function.shape == (4, 2)
    nan_equal(out.per_function[:, 1], [0.5, 0.5, 1.0, 0.0])
    assert out.failures == {}
    assert out.total.dtype == torch.float32


def test_missing_entries_follow_trl_semantics():
    first = constant([1.0, None, math.nan, None])
    second = constant([0.5, 2.0, None, math.nan])
    out = compute_rewards([first, second], [1.0, 2.0], PROMPTS, COMPLETIONS, names=["first", "second"])
    # a missing entry is skipped; the other function still counts; all missing → NaN
    nan_equal(out.total, [2.0, 4.0, math.nan, math.nan])
    nan_equal(out.per_function[:, 0], [1.0, math.nan, math.nan, math.nan])
    assert out.failures == {"first": 3, "second": 2}
    assert out.names == ["first", "second"]


def test_non_numeric_entry_is_missing():
    out = compute_rewards([constant([1, "n/a", True, 0.25])], [1.0], PROMPTS, COMPLETIONS)
    nan_equal(out.total, [1.0, math.nan, 1.0, 0.25])


def test_columns_are_passed_as_keywords():
    seen = {}

    def reward(prompts, completions, answer, **kwargs):
        seen.update(prompts=prompts, completions=completions, answer=answer, extra=sorted(kwargs))
        return [float(c == a) for c, a in zip(completions, answer)]

    out = compute_rewards([reward], [1.0], PROMPTS, COMPLETIONS,
                          columns={"answer": ["a", "x", "c", "y"], "image_id": [0, 0, 1, 1]})
    nan_equal(out.total, [1.0, 0.0, 1.0, 0.0])
    assert seen["prompts"] == PROMPTS and seen["completions"] == COMPLETIONS
    assert seen["extra"] == ["image_id"]
    assert out.names == ["reward"]


def test_raising_reward_is_missing_for_the_batch(caplog):
    def broken(prompts, completions, **kwargs):
        raise RuntimeError("scorer crashed")

    out = compute_rewards([broken, constant([1, 0, 1, 0])], [1.0, 1.0], PROMPTS, COMPLETIONS)
    nan_equal(out.per_function[:, 0], [math.nan] * 4)
    nan_equal(out.total, [1.0, 0.0, 1.0, 0.0])
    assert out.failures == {"broken": 4}
    assert "scorer crashed" in caplog.text


def test_only_reward_raising_gives_nan_total():
    def broken(prompts, completions, **kwargs):
        raise ValueError("bad")

    out = compute_rewards([broken], [1.0], PROMPTS, COMPLETIONS)
    assert torch.isnan(out.total).all()
    assert out.failures == {"broken": 4}


def test_timed_out_reward_is_missing_and_counted(caplog):
    release = threading.Event()

    def slow(prompts, completions, **kwargs):
        release.wait(timeout=10)  # "sleeps" until the test lets it go, so no thread outlives the test
        return [1.0] * len(completions)

    try:
        start = time.monotonic()
        out = compute_rewards([slow, constant([0.0, 1.0, 0.0, 1.0])], [1.0, 1.0], PROMPTS, COMPLETIONS,
                              timeout=0.2)
        elapsed = time.monotonic() - start
    finally:
        release.set()
    assert elapsed < 5.0
    nan_equal(out.per_function[:, 0], [math.nan] * 4)
    nan_equal(out.total, [0.0, 1.0, 0.0, 1.0])
    assert out.failures == {"slow": 4}
    assert "timed out" in caplog.text


def test_fast_reward_within_timeout():
    out = compute_rewards([constant([1, 2, 3, 4])], [1.0], PROMPTS, COMPLETIONS, timeout=5.0)
    nan_equal(out.total, [1.0, 2.0, 3.0, 4.0])
    assert out.failures == {}


@pytest.mark.parametrize("returned", [[1.0, 2.0], [1.0] * 5, None, 1.0, "abcd"])
def test_wrong_length_is_missing_for_the_batch_and_names_the_function(returned, caplog):
    def miscounted(prompts, completions, **kwargs):
        return returned

    out = compute_rewards([constant([0.0, 1.0, 2.0, 3.0]), miscounted], [1.0, 1.0], PROMPTS, COMPLETIONS)
    nan_equal(out.per_function[:, 1], [math.nan] * 4)
    nan_equal(out.total, [0.0, 1.0, 2.0, 3.0])
    assert out.failures == {"miscounted": 4}
    assert "'miscounted'" in caplog.text and "wrong_length" in caplog.text


def test_argument_checks():
    with pytest.raises(ValueError, match="weights"):
        compute_rewards([constant([0] * 4)], [1.0, 2.0], PROMPTS, COMPLETIONS)
    with pytest.raises(ValueError, match="no reward"):
        compute_rewards([], [], PROMPTS, COMPLETIONS)
    with pytest.raises(ValueError, match="prompts"):
        compute_rewards([constant([0] * 4)], [1.0], PROMPTS[:3], COMPLETIONS)
    with pytest.raises(ValueError, match="finite"):
        compute_rewards([constant([0] * 4)], [math.inf], PROMPTS, COMPLETIONS)


# --------------------------------------------------------------------------- resolving rewards


def test_register_and_get_by_name():
    @register_reward("core_test_exact")
    def exact(prompts, completions, **kwargs):
        return [1.0] * len(completions)

    assert get_reward("core_test_exact") is exact
    assert "core_test_exact" in rewards_mod.available_rewards()
    assert reward_name(exact) == "exact"


def test_register_same_function_twice_is_fine():
    def fn(prompts, completions, **kwargs):
        return [0.0] * len(completions)

    register_reward("core_test_same")(fn)
    assert register_reward("core_test_same")(fn) is fn


def test_register_duplicate_name_different_function():
    @register_reward("core_test_dup")
    def first(prompts, completions, **kwargs):
        return [0.0] * len(completions)

    def second(prompts, completions, **kwargs):
        return [1.0] * len(completions)

    with pytest.raises(ValueError, match="core_test_dup"):
        register_reward("core_test_dup")(second)
    assert get_reward("core_test_dup") is first


def test_unknown_name_suggests_nearest():
    @register_reward("core_test_accuracy")
    def acc(prompts, completions, **kwargs):
        return [0.0] * len(completions)

    with pytest.raises(KeyError) as info:
        get_reward("core_test_acuracy")
    message = str(info.value)
    assert "'core_test_acuracy'" in message
    assert "Did you mean 'core_test_accuracy'?" in message


def test_callable_passes_through():
    fn = constant([0.0])
    assert get_reward(fn) is fn


def test_get_reward_from_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(
        "def length_reward(prompts, completions, **kwargs):\n"
        "    return [float(len(c)) for c in completions]\n"
        "\n"
        "THRESHOLD = 3\n"
    )
    fn = get_reward(f"{path}:length_reward")
    assert fn.__name__ == "length_reward"
    assert fn(["p", "q"], ["ab", "abcd"]) == [2.0, 4.0]
    out = compute_rewards([fn], [0.5], ["p", "q"], ["ab", "abcd"])
    nan_equal(out.total, [1.0, 2.0])


def test_file_without_the_function(tmp_path):
    path = tmp_path / "other.py"
    path.write_text("def something(prompts, completions, **kwargs):\n    return []\n")
    with pytest.raises(AttributeError, match="something"):
        get_reward(f"{path}:missing")


def test_missing_reward_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.py"):
        get_reward(f"{tmp_path / 'nowhere.py'}:fn")


def test_two_functions_from_one_registering_file(tmp_path):
    """A reward file is executed once, so a file that registers rewards can be named twice in a config."""
    from mmrl import rewards as rewards_module

    name = f"registered_in_file_{tmp_path.name}"
    path = tmp_path / "my_rewards.py"
    path.write_text(
        "from mmrl.rewards import register_reward\n"
        f"@register_reward({name!r})\n"
        "def first(prompts, completions, **kw):\n    return [1.0] * len(completions)\n"
        "def second(prompts, completions, **kw):\n    return [2.0] * len(completions)\n")
    try:
        first = get_reward(f"{path}:first")
        second = get_reward(f"{path}:second")
        assert first(["p"], ["c"]) == [1.0] and second(["p"], ["c"]) == [2.0]
        assert get_reward(name) is first
    finally:
        rewards_module._REGISTRY.pop(name, None)


def test_build_reward_binds_args_and_builds_factories_once():
    from mmrl.rewards import build_reward, register_reward_factory

    @register_reward("test_scaled_len")
    def scaled_len(prompts, completions, scale=1.0, **kw):
        return [scale * len(c) for c in completions]

    bound = build_reward("test_scaled_len", {"scale": 2.0})
    assert bound(["p", "q"], ["ab", "abc"]) == [4.0, 6.0] and bound.__name__ == "scaled_len"
    assert build_reward("test_scaled_len") is scaled_len

    built = []

    @register_reward_factory("test_threshold")
    def threshold(level: float = 0.5):
        built.append(level)
        return lambda prompts, completions, **kw: [float(len(c) > level) for c in completions]

    a, b = build_reward("test_threshold", {"level": 2}), build_reward("test_threshold", {"level": 2})
    assert a is b and built == [2] and a([""] * 2, ["a", "abc"]) == [0.0, 1.0]
    assert build_reward("test_threshold", {"level": 0}) is not a and built == [2, 0]
    assert "test_threshold" in available_rewards()
    with pytest.raises(TypeError, match=r"reward 'test_threshold': bad args \['lvl'\].*level"):
        build_reward("test_threshold", {"lvl": 1})
    with pytest.raises(ValueError, match="already registered"):
        register_reward_factory("test_scaled_len")(threshold)
