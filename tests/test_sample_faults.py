"""Per-sample faults are skipped samples, not failed runs: images the model cannot size and prompts longer than
data.max_prompt_length raise BadSample when the record is read (vision.prompt_limits), the sampler counts them;
data.truncate_prompts cuts the text to fit instead; the image-token arithmetic matches the real processor."""

from __future__ import annotations

import io
import logging

import pytest
from PIL import Image
from test_trainer import make_config  # the tiny, fast training config

from mmrl.data import BadSample
from mmrl.trainer import Trainer
from vision import task
from vision.data import VisionDataConfig, VisionDataset
from vision.modeling import VisionModelConfig, load_model_and_processor
from vision.policy import VisionPolicy
from vision.prompt_limits import CheckedRecords, PromptLimits, image_token_count

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

ANSWER_SUFFIX = "Answer with <answer>...</answer>."


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _row(question: str = "What colour is the square?", size: tuple[int, int] = (56, 56)) -> dict:
    return {"images": [_png(*size)], "problem": f"<image>{question}", "answer": "red"}


@pytest.fixture(scope="module")
def tiny():
    model, processor = load_model_and_processor(VisionModelConfig(min_pixels=3136, max_pixels=12544, dtype="float32"))
    return model, processor, VisionPolicy(model, processor)


def _real_length(policy: VisionPolicy, record: dict) -> int:
    return policy.encode_prompts([record]).tensors["input_ids"].shape[1]


# ------------------------------------------------------------------------------------------- image sizing


def test_extreme_aspect_ratio_row_is_skipped_in_training(tmp_path, caplog):
    cfg = make_config(tmp_path, max_steps=2)
    rows = [_row(size=(1, 5000)) if i == 1 else _row() for i in range(4)]  # 2 steps x 2 prompts: all 4 drawn
    bundle = task.build(cfg)
    dataset = VisionDataset(rows, VisionDataConfig(template="answer"), name="faulty", limits=bundle.train_dataset.limits)
    trainer = Trainer(cfg, bundle.policy, dataset)
    with caplog.at_level(logging.WARNING, logger="mmrl.data"):
        history = trainer.train()
    assert len(history) == 2
    assert trainer.sampler.skipped >= 1
    messages = [r.getMessage() for r in caplog.records if "skipping sample" in r.getMessage()]
    assert messages and all("row 1 of faulty" in m and "aspect ratio" in m and "1x5000" in m for m in messages)


@pytest.mark.parametrize("size, reason", [((1, 5000), "aspect ratio"), ((0, 0), "empty"), ((0, 40), "empty")])
def test_unsizeable_images_are_bad_samples(size, reason):
    limits = PromptLimits(min_pixels=3136, max_pixels=12544)
    with pytest.raises(BadSample, match=reason):
        limits.image_tokens([Image.new("RGB", (56, 56)), Image.new("RGB", size)])


def test_tiny_images_are_upscaled_not_refused():
    limits = PromptLimits(min_pixels=3136, max_pixels=12544)
    assert limits.image_tokens([Image.new("RGB", (1, 1)), Image.new("RGB", (3, 27))]) == [4, 6]


@pytest.mark.parametrize("sizes", [[(56, 56)], [(1, 1)], [(10, 1990), (300, 77)], [(3, 600), (1000, 1000), (29, 57)],
                                   [(640, 480), (28, 28), (200, 1), (3, 27)]])
def test_image_token_arithmetic_matches_the_processor(tiny, sizes):
    _, processor, policy = tiny
    limits = PromptLimits.from_processor(processor, max_prompt_length=10**6)
    images = [Image.new("RGB", s) for s in sizes]
    counts = limits.image_tokens(images)
    parts = [{"type": "image"} for _ in images]
    grids = policy.encode_prompts([{"prompt": [{"role": "user", "content": parts}],
                                    "images": images}]).lists["image_grid_thw"][0]
    merge = processor.image_processor.merge_size ** 2
    assert counts == [int(g.prod()) // merge for g in grids]
    for (w, h), count in zip(sizes, counts):
        assert count == image_token_count(h, w, 28, 3136, 12544)
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": "How many? 日本語 text"}]
    record = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}],
              "images": images}
    assert limits.prompt_length(record["prompt"], counts) == _real_length(policy, record)


# ------------------------------------------------------------------------------------------- prompt length


def test_long_prompt_row_is_skipped_and_counted(tmp_path, caplog):
    cfg = make_config(tmp_path, max_steps=2, data__max_prompt_length=100)
    rows = [_row("Describe it. " + "very " * 150 + "long.") if i == 2 else _row() for i in range(4)]
    bundle = task.build(cfg)
    dataset = VisionDataset(rows, VisionDataConfig(template="answer"), name="long", limits=bundle.train_dataset.limits)
    with pytest.raises(BadSample, match=r"row 2 of long: prompt is \d+ tokens > data.max_prompt_length 100"):
        dataset[2]
    trainer = Trainer(cfg, bundle.policy, dataset)
    with caplog.at_level(logging.WARNING, logger="mmrl.data"):
        trainer.train()
    assert trainer.sampler.skipped >= 1
    assert any("row 2 of long: prompt is" in r.getMessage() for r in caplog.records)


def test_truncate_prompts_keeps_the_row_within_the_limit(tiny, caplog):
    _, processor, policy = tiny
    limits = PromptLimits.from_processor(processor, max_prompt_length=100, truncate=True)
    dataset = VisionDataset([_row(), _row("Start of a long text. " + "very " * 150 + "long. What colour is it?")],
                            VisionDataConfig(template="answer", system_prompt="Be brief."), name="long", limits=limits)
    short = dataset[0]
    assert _real_length(policy, short) <= 100
    with caplog.at_level(logging.WARNING, logger="vision.prompt_limits"):
        record = dataset[1]
    assert any("row 1 of long: prompt truncated from" in r.getMessage() for r in caplog.records)
    assert 90 <= _real_length(policy, record) <= 100
    user = record["prompt"][-1]["content"]
    assert [p["type"] for p in user] == ["image", "text"]  # the image is kept
    assert record["prompt"][0] == {"role": "system", "content": "Be brief."}
    text = user[1]["text"]
    assert text.endswith(f"What colour is it?\n{ANSWER_SUFFIX}") and not text.startswith("Start")
    assert len(record["images"]) == 1


def test_truncation_that_cannot_fit_is_a_bad_sample(tiny):
    _, processor, _ = tiny
    limits = PromptLimits.from_processor(processor, max_prompt_length=15, truncate=True)
    dataset = VisionDataset([_row(size=(300, 300))], VisionDataConfig(template="answer"), limits=limits)
    with pytest.raises(BadSample, match="even with its text truncated"):
        dataset[0]


def test_build_sets_limits_on_train_and_eval_and_warns_about_the_context(tmp_path, caplog):
    cfg = make_config(tmp_path, data__eval="synthetic:single_shape", data__max_eval_samples=4)
    bundle = task.build(cfg)
    limits = bundle.train_dataset.limits
    assert limits.max_prompt_length == 2048  # the tiny model's context length
    assert bundle.eval_dataset.limits is limits
    assert (limits.min_pixels, limits.max_pixels, limits.factor) == (3136, 12544, 28)
    cfg = make_config(tmp_path, data__max_prompt_length=2040, sampling__max_new_tokens=16)
    with caplog.at_level(logging.WARNING, logger="vision.task"):
        assert task.build(cfg).train_dataset.limits.max_prompt_length == 2040
    assert any("exceeds the model's context length 2048" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="max_prompt_length must be positive"):
        task.build(make_config(tmp_path, data__max_prompt_length=0))


def test_evaluation_counts_a_too_long_record_as_a_load_error(tmp_path):
    cfg = make_config(tmp_path, max_steps=1)
    bundle = task.build(cfg)
    limits = PromptLimits.from_processor(bundle.policy.processor, max_prompt_length=100)
    records = [VisionDataset([_row(), _row("very " * 150)], VisionDataConfig(template="answer"))[i] for i in (0, 1)]
    checked = CheckedRecords(records, limits)
    with pytest.raises(BadSample, match="row 1 of dataset: prompt is"):
        checked[1]
    trainer = Trainer(cfg, bundle.policy, bundle.train_dataset)
    result = trainer.evaluate(checked, reward="accuracy")
    assert result["load_errors"] == 1.0 and result["num_samples"] == 2.0
