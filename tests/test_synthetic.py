"""Tests for vision.synthetic: determinism, split disjointness, answers checked against scenes/pixels."""

from __future__ import annotations

import pytest
from PIL import Image, ImageFont

from vision import synthetic
from vision.synthetic import (
    PALETTE,
    SYNTHETIC_TASKS,
    available_synthetic_tasks,
    make_synthetic,
    scene_key,
    scene_split,
    synthetic_choices,
)

# (task, options) pairs covering every task and the main option branches
CASES = [
    ("count_shapes", {}),
    ("count_shapes", {"by_shape": True, "max_count": 3}),
    ("colour_at_position", {}),
    ("colour_at_position", {"grid": 3, "num_colours": 6}),
    ("colour_at_position", {"shapes": True}),
    ("colour_at_position", {"noise": 0.3}),
    ("arithmetic", {}),
    ("arithmetic", {"style": "digits", "ops": "+-*"}),
    ("arithmetic", {"style": "dots", "ops": "-", "max_operand": 6}),
    ("single_shape", {}),
    ("single_shape", {"ask": "shape", "num_colours": 6}),
]


def _image_bytes(rows: list[dict]) -> list[bytes]:
    return [row["images"][0].tobytes() for row in rows]


def test_registry_lists_required_tasks():
    assert {"count_shapes", "colour_at_position", "arithmetic"} <= set(available_synthetic_tasks())
    assert available_synthetic_tasks() == sorted(SYNTHETIC_TASKS)


@pytest.mark.parametrize("name,opts", CASES)
def test_rows_layout_and_image_format(name, opts):
    rows = make_synthetic(name, num_samples=12, seed=3, image_size=64, **opts)
    assert len(rows) == 12
    choices = synthetic_choices(name, **opts)
    for row in rows:
        assert set(row) == {"images", "problem", "answer", "task", "choices"}
        (image,) = row["images"]
        assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (64, 64)
        assert row["problem"].startswith("<image>") and row["problem"].endswith("?")
        assert row["task"] == name
        assert row["answer"] == row["answer"].strip().lower() and row["answer"]
        assert row["choices"] == choices and row["answer"] in choices


@pytest.mark.parametrize("name,opts", CASES)
def test_deterministic_and_seed_dependent(name, opts):
    a = make_synthetic(name, "test", num_samples=16, seed=7, **opts)
    b = make_synthetic(name, "test", num_samples=16, seed=7, **opts)
    assert [r["answer"] for r in a] == [r["answer"] for r in b]
    assert [r["problem"] for r in a] == [r["problem"] for r in b]
    assert _image_bytes(a) == _image_bytes(b)
    c = make_synthetic(name, "test", num_samples=16, seed=8, **opts)
    assert _image_bytes(a) != _image_bytes(c)
    # rows are seeded per index, so a shorter dataset is a prefix of a longer one
    assert _image_bytes(make_synthetic(name, "test", num_samples=5, seed=7, **opts)) == _image_bytes(a[:5])


@pytest.mark.parametrize("name,opts", CASES)
def test_train_and_test_are_disjoint_by_scene_key(name, opts):
    train = make_synthetic(name, "train", num_samples=150, seed=0, return_scene=True, **opts)
    test = make_synthetic(name, "test", num_samples=60, seed=0, return_scene=True, **opts)
    train_keys = {scene_key(name, r["scene"]) for r in train}
    test_keys = {scene_key(name, r["scene"]) for r in test}
    assert not train_keys & test_keys
    assert all(scene_split(name, r["scene"]) == "train" for r in train)
    assert all(scene_split(name, r["scene"]) == "test" for r in test)
    # and across seeds too: the partition depends on the scene only
    other = make_synthetic(name, "train", num_samples=150, seed=1, return_scene=True, **opts)
    assert not {scene_key(name, r["scene"]) for r in other} & test_keys


@pytest.mark.parametrize("name,opts", CASES)
def test_held_out_pictures_never_drawn_in_train_and_distinct(name, opts):
    # the demo's sizes: 1024 train rows, 256 held-out rows; compared as pixels, whatever the question asked
    train = set(_image_bytes(make_synthetic(name, "train", num_samples=1024, seed=0, image_size=48, **opts)))
    test = _image_bytes(make_synthetic(name, "test", num_samples=256, seed=0, image_size=48, **opts))
    assert not train & set(test)
    if (name, opts) != ("colour_at_position", {}):  # the one case whose held-out space is under 256 boards
        assert len(set(test)) == len(test)


def test_small_held_out_space_is_exhausted_then_reported(caplog):
    # grid 2, 4 colours: 256 boards, 49 of them held out; all 49 are used before any repeats, new questions
    # about them come before repeated rows, and the warning states the true counts
    with caplog.at_level("WARNING", logger="vision.synthetic"):
        rows = make_synthetic("colour_at_position", "test", num_samples=256, seed=0, image_size=32,
                              return_scene=True)
    pictures = [scene_key("colour_at_position", r["scene"]) for r in rows]
    assert len(set(pictures[:49])) == 49 and len(set(pictures)) == 49
    assert len({(p, r["problem"]) for p, r in zip(pictures, rows, strict=True)}) == 49 * 4
    assert "256 rows show 49 distinct pictures (196 distinct picture+question pairs)" in caplog.text


def test_scene_key_is_the_picture_not_the_question():
    board = {"grid": 2, "colours": ["red", "red", "blue", "green"], "shapes": None}
    top = {**board, "cell": 0, "question": "What colour is the top-left square?", "answer": "red"}
    bottom = {**board, "cell": 3, "question": "What colour is the bottom-right square?", "answer": "green"}
    assert scene_key("colour_at_position", top) == scene_key("colour_at_position", bottom)
    dots = {"style": "dots", "a": 2, "b": 1, "colour": "red", "left": [0, 1], "right": [4]}
    plus, minus = {**dots, "op": "+", "answer": "3"}, {**dots, "op": "-", "answer": "1"}
    assert scene_key("arithmetic", plus) == scene_key("arithmetic", minus)  # same dots drawn
    digits = {**dots, "style": "digits", "dx": 0, "dy": 0}
    assert scene_key("arithmetic", {**digits, "op": "+"}) != scene_key("arithmetic", {**digits, "op": "-"})


def test_scene_key_ignores_dict_order():
    scene = {"b": 1, "a": [2, 3]}
    assert scene_key("x", scene) == scene_key("x", {"a": [2, 3], "b": 1})
    assert scene_key("x", scene) != scene_key("y", scene)


@pytest.mark.parametrize("opts", [{}, {"by_shape": True}, {"grid": 5, "max_count": 6, "max_distractors": 6}])
def test_count_shapes_answer_matches_scene(opts):
    rows = make_synthetic("count_shapes", num_samples=80, seed=2, return_scene=True, **opts)
    max_count = opts.get("max_count", 4)
    seen = set()
    for row in rows:
        scene = row["scene"]
        objects = scene["objects"]
        want = sum(1 for _, _, colour, shape, _, _ in objects
                   if colour == scene["target"] and scene["target_shape"] in (None, shape))
        assert row["answer"] == str(want) and 0 <= want <= max_count
        assert scene["target"] in row["problem"]
        assert len({(r, c) for r, c, *_ in objects}) == len(objects)  # one shape per cell: no overlap
        assert len(objects) > want  # always at least one distractor
        seen.add(want)
    assert seen == set(range(max_count + 1))  # every count shows up, 0 included


def test_count_shapes_pixels_show_target_colour_at_shape_centres():
    size, grid = 112, 4
    for row in make_synthetic("count_shapes", num_samples=20, seed=5, image_size=size, return_scene=True):
        image = row["images"][0]
        cell = size // grid
        for r, c, colour, _, dx, dy in row["scene"]["objects"]:
            x = int((c + 0.5 + dx / 20) * cell)
            y = int((r + 0.5 + dy / 20) * cell)
            assert image.getpixel((x, y)) == PALETTE[colour]


@pytest.mark.parametrize("grid,size", [(2, 112), (3, 96), (4, 64)])
def test_colour_at_position_centre_pixel_is_answer_colour(grid, size):
    rows = make_synthetic("colour_at_position", num_samples=60, seed=1, image_size=size, grid=grid,
                          num_colours=5, return_scene=True)
    for row in rows:
        row_idx, col_idx = divmod(row["scene"]["cell"], grid)
        centre = ((2 * col_idx + 1) * size // (2 * grid), (2 * row_idx + 1) * size // (2 * grid))
        assert row["images"][0].getpixel(centre) == PALETTE[row["answer"]]
        assert row["answer"] in list(PALETTE)[:5]


def test_colour_at_position_question_names():
    problems = {r["problem"] for r in make_synthetic("colour_at_position", num_samples=60, seed=0)}
    names = {p.split("the ", 1)[1].split(" square")[0] for p in problems}
    assert names == {"top-left", "top-right", "bottom-left", "bottom-right"}
    problems = {r["problem"] for r in make_synthetic("colour_at_position", num_samples=200, seed=0, grid=3)}
    assert any("the center square" in p for p in problems)
    assert any("the top-middle square" in p for p in problems)
    assert any("the middle-left square" in p for p in problems)


def test_colour_at_position_shapes_and_noise():
    for row in make_synthetic("colour_at_position", num_samples=20, seed=0, shapes=True, return_scene=True):
        assert row["problem"].startswith("<image>What shape")
        assert row["answer"] == row["scene"]["shapes"][row["scene"]["cell"]]
    clean = make_synthetic("colour_at_position", num_samples=4, seed=0)
    noisy = make_synthetic("colour_at_position", num_samples=4, seed=0, noise=0.2)
    assert [r["answer"] for r in clean] == [r["answer"] for r in noisy]
    assert _image_bytes(clean) != _image_bytes(noisy)


@pytest.mark.parametrize("opts", [{}, {"style": "digits", "ops": "+-*", "max_operand": 12}, {"ops": "-"}])
def test_arithmetic_answer_matches_operands(opts):
    for row in make_synthetic("arithmetic", num_samples=60, seed=4, return_scene=True, **opts):
        scene = row["scene"]
        a, b, op = scene["a"], scene["b"], scene["op"]
        assert row["answer"] == str({"+": a + b, "-": a - b, "*": a * b}[op])
        assert int(row["answer"]) >= 0
        if scene["style"] == "dots":
            assert (len(scene["left"]), len(scene["right"])) == (a, b)
            assert 1 <= a <= 4 and 1 <= b <= 4


def test_arithmetic_dots_pixels():
    size = 120
    for row in make_synthetic("arithmetic", num_samples=20, seed=0, image_size=size, return_scene=True):
        scene, image = row["scene"], row["images"][0]
        for half, slots in ((0, scene["left"]), (1, scene["right"])):
            for slot in range(6):
                r, c = divmod(slot, 2)
                centre = (int(half * size / 2 + (c + 0.5) * size / 4), int((r + 0.5) * size / 3))
                drawn = image.getpixel(centre) == PALETTE[scene["colour"]]
                assert drawn == (slot in slots)


def test_arithmetic_digits_draws_ink_and_bitmap_fallback(monkeypatch):
    rows = make_synthetic("arithmetic", num_samples=3, seed=0, style="digits")
    for row in rows:
        assert len(row["images"][0].getcolors(1 << 16)) > 2  # some antialiased ink

    bitmap = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)

    def no_freetype(size=None):  # what a Pillow without FreeType does: sizes fail, the bitmap font loads
        if size is not None:
            raise ImportError("no FreeType")
        return bitmap()

    monkeypatch.setattr(synthetic.ImageFont, "load_default", no_freetype)
    fallback = make_synthetic("arithmetic", num_samples=3, seed=0, style="digits")
    assert [r["answer"] for r in fallback] == [r["answer"] for r in rows]
    for row in fallback:
        bbox = Image.eval(row["images"][0].convert("L"), lambda v: 255 - v).getbbox()
        assert bbox is not None and bbox[2] - bbox[0] > 112 // 3  # scaled up, not a tiny bitmap


def test_choices():
    assert synthetic_choices("count_shapes") == ["0", "1", "2", "3", "4"]
    assert synthetic_choices("count_shapes", max_count=2) == ["0", "1", "2"]
    assert synthetic_choices("colour_at_position") == ["red", "green", "blue", "yellow"]
    assert synthetic_choices("colour_at_position", shapes=True) == ["circle", "square", "triangle"]
    assert synthetic_choices("arithmetic") == [str(n) for n in range(2, 9)]
    assert synthetic_choices("arithmetic", ops="-", max_operand=3) == ["0", "1", "2"]


def test_unknown_task_split_and_option_errors_name_valid_ones():
    with pytest.raises(ValueError, match="colour_at_position"):
        make_synthetic("nope")
    with pytest.raises(ValueError, match="colour_at_position"):
        synthetic_choices("nope")
    with pytest.raises(ValueError, match=r"'train', 'test'"):
        make_synthetic("count_shapes", split="validation")
    with pytest.raises(TypeError, match="max_count"):
        make_synthetic("count_shapes", colour_count=3)
    with pytest.raises(TypeError, match="noise"):
        synthetic_choices("colour_at_position", style="dots")
    with pytest.raises(ValueError, match="dots"):
        make_synthetic("arithmetic", style="roman")
    with pytest.raises(ValueError, match="grid"):
        make_synthetic("colour_at_position", grid=1)
    with pytest.raises(ValueError, match="num_colours"):
        make_synthetic("colour_at_position", num_colours=99)
    with pytest.raises(ValueError, match="image_size"):
        make_synthetic("count_shapes", image_size=8)
    with pytest.raises(ValueError, match="num_samples"):
        make_synthetic("count_shapes", num_samples=-1)
