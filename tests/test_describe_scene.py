"""The describe_scene synthetic task: rows with a scene column, the canonical description, and the split
guarantee (no scene and no image shared between train and test)."""

from __future__ import annotations

import pytest

from vision.claims import SceneGraphVerifier
from vision.data import VisionDataConfig, load_rows
from vision.describe_scene import POSITION_NAMES, QUESTION, TASK, describe, render_scene
from vision.synthetic import PALETTE, available_synthetic_tasks, make_synthetic, scene_key, scene_split


def test_registered_and_rows_carry_the_scene():
    assert TASK in available_synthetic_tasks()
    rows = load_rows(f"synthetic:{TASK}", "train", num_samples=6, seed=1)  # the loader adds the scene column
    for row in rows:
        scene = row["scene"]
        assert row["problem"] == "<image>" + QUESTION and row["task"] == TASK and "choices" not in row
        assert row["answer"] == describe(scene) == scene["answer"]
        assert 1 <= len(scene["objects"]) <= 4
        cells = [(o["row"], o["col"]) for o in scene["objects"]]
        assert len(set(cells)) == len(cells) and all(c in POSITION_NAMES for c in cells)
        assert row["images"][0].size == (112, 112)


def test_canonical_description_is_fully_supported():
    rows = make_synthetic(TASK, "train", 20, seed=0, return_scene=True, max_objects=6)
    verdicts = SceneGraphVerifier().verify([r["answer"] for r in rows], [r["scene"] for r in rows], [None] * 20)
    for row, verdict in zip(rows, verdicts, strict=True):
        objects = row["scene"]["objects"]
        kinds = {(o["colour"], o["shape"]) for o in objects}  # "a red circle" twice is one claim
        assert verdict.num_claims == 1 + len(kinds) + len(objects)  # the count, existences, cells
        assert all(verdict.supported) and verdict.relevance == 1.0


def test_example_description_text():
    scene = {"objects": [{"colour": "red", "shape": "circle", "row": 0, "col": 0},
                         {"colour": "blue", "shape": "square", "row": 1, "col": 1}]}
    assert describe(scene) == ("There are two shapes. A red circle is in the top-left. "
                               "A blue square is in the center.")


def test_render_draws_each_object_in_its_cell():
    scene = {"objects": [{"colour": "green", "shape": "square", "row": 2, "col": 0}]}
    img = render_scene(scene, 90)
    assert img.getpixel((15, 75)) == PALETTE["green"] and img.getpixel((45, 45)) == (255, 255, 255)


def test_train_and_test_share_no_scene_and_no_image():
    train = make_synthetic(TASK, "train", 300, seed=0, return_scene=True)
    test = make_synthetic(TASK, "test", 100, seed=0, return_scene=True)
    train_keys = {scene_key(TASK, r["scene"]) for r in train}
    test_keys = {scene_key(TASK, r["scene"]) for r in test}
    assert not train_keys & test_keys
    assert {scene_split(TASK, r["scene"]) for r in train} == {"train"}
    assert {scene_split(TASK, r["scene"]) for r in test} == {"test"}
    assert not {r["images"][0].tobytes() for r in train} & {r["images"][0].tobytes() for r in test}


def test_deterministic_and_options_checked():
    a = make_synthetic(TASK, "train", 5, seed=3)
    b = make_synthetic(TASK, "train", 5, seed=3)
    assert [r["answer"] for r in a] == [r["answer"] for r in b]
    assert [r["images"][0].tobytes() for r in a] == [r["images"][0].tobytes() for r in b]
    with pytest.raises(ValueError, match="max_objects"):
        make_synthetic(TASK, "train", 1, max_objects=10)
    with pytest.raises(TypeError, match="unknown option"):
        make_synthetic(TASK, "train", 1, grid=4)


def test_training_config_validates():
    from mmrl.config import RewardConfig, TrainConfig
    from vision import task

    cfg = TrainConfig(data=VisionDataConfig(train=f"synthetic:{TASK}", eval=f"synthetic:{TASK}"),
                      rewards=[RewardConfig("factuality"), RewardConfig("factuality_claims", 0.0)])
    assert task.validate(cfg) == []
