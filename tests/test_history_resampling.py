"""SRPO history resampling in the prompt sampler (:class:`mmrl.data.PromptSampler` with an
:class:`~mmrl.group_filters.SRPOHistory`): prompts whose every rollout was correct in an epoch leave the
next epoch only, mixed and all-wrong ones stay, and the whole state resumes exactly."""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path

import pytest
import torch

from mmrl.config import ConfigError, TrainConfig, load_config, load_yaml
from mmrl.config_checks import validate_config
from mmrl.data import PromptSampler, make_sampler
from mmrl.group_filters import SRPOHistory
from mmrl.rewards import RewardOutput

GROUP = 3  # rollouts per prompt
VISION_DEMO = Path(__file__).resolve().parents[1] / "configs/vision/demo.yaml"


def dataset(n: int) -> list[dict]:
    return [{"id": i, "prompt": f"question {i}"} for i in range(n)]


def sampler_with_history(n: int = 6, batch_size: int = 2, seed: int = 0) -> PromptSampler:
    return PromptSampler(dataset(n), batch_size, seed, history=SRPOHistory(threshold=1.0))


def outcome(index: int, all_correct: set[int], mixed: set[int]) -> list[float]:
    if index in all_correct:
        return [1.0] * GROUP
    if index in mixed:
        return [1.0] * (GROUP - 1) + [0.0]
    return [0.0] * GROUP


def step(sampler, all_correct: set[int] = frozenset(), mixed: set[int] = frozenset()) -> list[int]:
    """One trainer step by hand: draw a batch, score every rollout, record. Returns the drawn ids."""
    batch = sampler.next_batch()
    drawn = [record["id"] for record in batch]
    assert drawn == sampler.last_indices
    rewards = torch.tensor([r for i in drawn for r in outcome(i, all_correct, mixed)])
    group_id = torch.arange(len(drawn) * GROUP) // GROUP
    sampler.record(rewards, group_id)
    return drawn


def epoch(sampler, batches: int, **outcomes) -> list[int]:
    return [i for _ in range(batches) for i in step(sampler, **outcomes)]


def test_all_correct_prompts_skip_exactly_one_epoch():
    sampler = sampler_with_history()
    first = epoch(sampler, 3, all_correct={1, 3}, mixed={0})
    assert sorted(first) == list(range(6))
    second = epoch(sampler, 2)  # 4 prompts left; every one of them wrong this time
    assert sampler.epoch == 1
    assert sorted(second) == [0, 2, 4, 5]  # 1 and 3 never, mixed (0) and all-wrong stay, each exactly once
    assert sampler.metrics() == {"srpo/dropped": 2.0, "srpo/dropped_total": 2.0, "srpo/all_correct": 0.0}
    third = epoch(sampler, 3)  # 1 and 3 were not rolled out in epoch 1: no record, so they are back
    assert sampler.epoch == 2
    assert sorted(third) == list(range(6))
    assert sampler.metrics()["srpo/dropped"] == 0.0


def test_epoch_order_depends_only_on_seed_and_epoch():
    plain = PromptSampler(dataset(6), 2, seed=0)
    plain_order = [i for _ in range(6) for i in step(plain)]
    srpo = sampler_with_history()
    epoch(srpo, 3, all_correct={1, 3})
    second = epoch(srpo, 2)
    assert second == [i for i in plain_order[6:] if i not in (1, 3)]  # the same order, minus the drops


def test_everything_all_correct_keeps_everything(caplog):
    sampler = sampler_with_history()
    epoch(sampler, 3, all_correct=set(range(6)))
    with caplog.at_level(logging.WARNING, logger="mmrl.group_filters"):
        second = epoch(sampler, 3)
    assert sorted(second) == list(range(6))
    assert "keeping them all" in caplog.text
    assert sampler.metrics()["srpo/dropped"] == 0.0


def test_missing_rewards_do_not_judge_a_prompt():
    sampler = sampler_with_history(n=4, batch_size=2)
    first, second = [r["id"] for r in sampler.next_batch()]
    rewards = torch.full((2 * GROUP,), float("nan"))
    rewards[:GROUP] = 1.0  # the first prompt all-correct, the second never scored
    sampler.record(rewards, torch.arange(2 * GROUP) // GROUP)
    step(sampler)  # the other two: all wrong
    batch = step(sampler)  # epoch 1
    assert sampler.history.drop_set() == frozenset({first})
    assert first not in batch and len(batch) == 2
    assert second in batch + step(sampler)


def test_state_dict_mid_epoch_resumes_identically():
    original = sampler_with_history(n=7, batch_size=3, seed=4)
    epoch(original, 3, all_correct={2, 5}, mixed={0})  # 9 draws: into epoch 1 already
    step(original, all_correct={4})
    state = json.loads(json.dumps(original.state_dict()))  # as the checkpoint stores it
    assert state["skip"] and "history" in state
    resumed = PromptSampler(dataset(7), 3, seed=0, history=SRPOHistory())
    resumed.load_state_dict(state)
    for _ in range(8):
        kinds = {"all_correct": {1, 4, 6}, "mixed": {2}}
        assert step(resumed, **kinds) == step(original, **kinds)
        assert resumed.metrics() == original.metrics()
        assert resumed.epoch == original.epoch


def test_without_history_record_is_a_no_op_and_no_metrics():
    sampler = PromptSampler(dataset(4), 2, seed=0)
    epoch(sampler, 2, all_correct={0, 1, 2, 3})
    assert sampler.metrics() == {}
    assert "history" not in sampler.state_dict()
    assert sorted(epoch(sampler, 2)) == [0, 1, 2, 3]


def test_history_state_missing_from_the_checkpoint_is_an_error():
    state = PromptSampler(dataset(4), 2, seed=0).state_dict()
    with pytest.raises(ValueError, match="history_resampling"):
        sampler_with_history(n=4).load_state_dict(state)


def test_record_reads_the_configured_reward_column():
    sampler = PromptSampler(dataset(2), 2, seed=0, history=SRPOHistory(threshold=0.5), history_reward="accuracy")
    sampler.next_batch()
    accuracy = torch.tensor([1.0, 0.7, 0.0, 1.0])  # group 0 correct at threshold 0.5, group 1 not
    fmt = torch.zeros(4)
    rewards = RewardOutput(per_function=torch.stack([fmt, accuracy], dim=1), total=accuracy,
                           names=["format_answer", "accuracy"])
    sampler.record(rewards, torch.tensor([0, 0, 1, 1]))
    assert sampler.metrics()["srpo/all_correct"] == 1.0
    sampler.history_reward = "nope"
    with pytest.raises(ValueError, match="'nope' is not one of the rewards"):
        sampler.record(rewards, torch.tensor([0, 0, 1, 1]))


def test_make_sampler_follows_the_config():
    cfg = TrainConfig()
    cfg.prompts_per_step = 2
    assert make_sampler(dataset(4), cfg).history is None
    cfg.filters.history_resampling = True
    cfg.filters.history_threshold = 0.5
    sampler = make_sampler(dataset(4), cfg, process_index=1)
    assert sampler.history is not None and sampler.history.threshold == 0.5
    assert sampler.seed == cfg.seed + 1 and sampler.batch_size == 2


def _vision_config(overrides: list[str]):
    module = importlib.import_module("vision.task")
    assert load_yaml(VISION_DEMO)["task"] == "vision"
    return load_config(VISION_DEMO, overrides, section_types=module.SECTION_TYPES), module


def test_unknown_history_reward_is_named():
    cfg, module = _vision_config(["filters.history_resampling=true", "filters.history_reward=acuracy"])
    with pytest.raises(ConfigError) as info:
        validate_config(cfg, task_checks=module.validate)
    message = str(info.value)
    assert "filters.history_reward='acuracy': must be one of ['accuracy', 'format_answer']" in message
    assert "did you mean 'accuracy'?" in message


def test_history_reward_is_not_checked_when_off():
    cfg, module = _vision_config(["filters.history_reward=whatever"])
    validate_config(cfg, task_checks=module.validate)


def test_history_threshold_must_be_finite():
    cfg, module = _vision_config(["filters.history_resampling=true", "filters.history_threshold=.inf"])
    with pytest.raises(ConfigError, match=r"filters.history_threshold=inf: must be a finite number"):
        validate_config(cfg, task_checks=module.validate)
