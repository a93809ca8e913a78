"""The VLM-as-judge reward on a tiny Qwen2.5-VL saved to disk (no downloads): P(yes) per image."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from PIL import Image

from image_gen.judge import VLMJudgeReward
from mmrl.rewards import compute_rewards
from vision.modeling import VisionModelConfig, load_model_and_processor


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("judge")
    model, processor = load_model_and_processor(VisionModelConfig(min_pixels=3136, max_pixels=12544))
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_judge_scores_are_probabilities_and_batched(judge_dir):
    judge = VLMJudgeReward(str(judge_dir), batch_size=2)
    images = [torch.rand(3, 32, 32), Image.new("RGB", (40, 24), (255, 0, 0)), torch.zeros(3, 32, 32)]
    prompts = ["a red circle", "a red square", "a blue triangle"]
    scores = judge(prompts, images)
    assert len(scores) == 3 and all(0.0 <= s <= 1.0 and not math.isnan(s) for s in scores)
    # Batching does not change a score: the same image alone gives the same value.
    alone = VLMJudgeReward(str(judge_dir), batch_size=1)(prompts[1:2], images[1:2])
    assert alone[0] == pytest.approx(scores[1], abs=1e-5)


def test_judge_question_must_hold_the_prompt(judge_dir):
    with pytest.raises(ValueError, match="prompt"):
        VLMJudgeReward(str(judge_dir), question="Is this good?")


def test_a_hung_judge_is_bounded_by_the_reward_timeout(judge_dir):
    # The judge runs through compute_rewards like any reward, so its per-call timeout covers it: a forward
    # pass that hangs makes the batch's judge rewards missing, and the judge is skipped while it still runs.
    judge = VLMJudgeReward(str(judge_dir), batch_size=2)
    gate, calls = threading.Event(), []
    real_model = judge.model

    def hung_model(**batch):
        calls.append(1)
        gate.wait(5.0)
        return real_model(**batch)

    judge.model = hung_model
    images, prompts = [torch.rand(3, 32, 32)] * 2, ["a red circle"] * 2
    try:
        first = compute_rewards([judge], [1.0], prompts, images, timeout=0.2)
        second = compute_rewards([judge], [1.0], prompts, images, timeout=0.2)
    finally:
        gate.set()
    for out in (first, second):
        assert torch.isnan(out.total).all()
        assert [(f.name, f.kind) for f in out.faults] == [("vlm_judge", "timeout")]
    assert len(calls) == 1
