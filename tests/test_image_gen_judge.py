"""The VLM-as-judge reward on a tiny Qwen2.5-VL saved to disk (no downloads): P(yes) per image."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from image_gen.judge import VLMJudgeReward
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
