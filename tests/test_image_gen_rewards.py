"""Procedural prompts, the spec renderer and the rule / CLIP rewards of :mod:`image_gen`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from image_gen.prompts import (
    CATEGORIES,
    PALETTE,
    class_for_spec,
    make_prompts,
    num_classes,
    render_spec,
    spec_for_class,
    split_of_spec,
)
from image_gen.rewards import (
    CLIPReward,
    colour_fraction,
    connected_components,
    dry_run,
    geneval_rules,
    object_count,
    object_shape,
    quantise_clip,
    relative_position,
)
from mmrl.rewards import available_rewards

RULES = [colour_fraction, object_count, relative_position, object_shape, geneval_rules]


def _spec(*objs: tuple[str, str, int], relation: str | None = None) -> dict:
    return {"objects": [{"colour": c, "shape": s, "count": k} for c, s, k in objs], "relation": relation}


def _score(fn, image, spec) -> float | None:
    return fn(["p"], [image], spec=[spec])[0]


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255.0


# --- prompts ---------------------------------------------------------------------------------------


def test_make_prompts_deterministic_and_well_formed():
    a, b = make_prompts(40, seed=7), make_prompts(40, seed=7)
    assert a == b
    assert a != make_prompts(40, seed=8)
    assert {r["category"] for r in a} == set(CATEGORIES)
    for r in a:
        assert r["prompt"] and r["class_id"] == class_for_spec(r["spec"])
    assert make_prompts(3, categories=["counting"])[0]["spec"]["objects"][0]["count"] >= 2
    pos = make_prompts(5, categories=["position"])
    assert all(r["spec"]["relation"] in r["prompt"] for r in pos)


def test_train_test_disjoint_even_up_to_equivalent_scenes():
    train = make_prompts(600, seed=0, split="train")
    test = make_prompts(600, seed=0, split="test")
    canon = lambda s: json.dumps(s, sort_keys=True)  # noqa: E731
    assert not {canon(r["spec"]) for r in train} & {canon(r["spec"]) for r in test}
    assert not {r["class_id"] for r in train} & {r["class_id"] for r in test}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}  # no caption text shared either
    # "a left of b" and "b right of a" are one scene: same split
    left = _spec(("red", "circle", 1), ("blue", "square", 1), relation="left of")
    right = _spec(("blue", "square", 1), ("red", "circle", 1), relation="right of")
    assert split_of_spec(left) == split_of_spec(right)
    for cat in CATEGORIES:
        assert make_prompts(1, categories=[cat], split="test")


def test_class_ids_round_trip():
    n = num_classes()
    assert n > 100
    for cid in range(0, n, 7):
        assert class_for_spec(spec_for_class(cid)) == cid
    pair = _spec(("red", "circle", 1), ("blue", "square", 1))
    swapped = _spec(("blue", "square", 1), ("red", "circle", 1))
    assert class_for_spec(pair) == class_for_spec(swapped)
    with pytest.raises(KeyError):
        class_for_spec(_spec(("red", "circle", 9)))


# --- rewards on rendered known-answer images -----------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64])
def test_render_spec_scores_one_on_its_own_spec(size):
    for r in make_prompts(24, seed=size):
        img = render_spec(r["spec"], size=size, seed=3)
        assert img.size == (size, size)
        for fn in RULES:
            value = _score(fn, img, r["spec"])
            if fn is relative_position and r["spec"]["relation"] is None:
                assert value is None
            else:
                assert value == pytest.approx(1.0), (fn.__name__, r["prompt"])


def test_mismatching_specs_score_lower():
    base = _spec(("red", "circle", 1), ("blue", "square", 1), relation="left of")
    img = render_spec(base, seed=1)
    swapped = dict(base, relation="right of")
    assert _score(relative_position, img, swapped) == 0.0
    assert _score(geneval_rules, img, swapped) < 1.0
    wrong_colour = _spec(("green", "circle", 1), ("blue", "square", 1), relation="left of")
    assert _score(colour_fraction, img, wrong_colour) < 0.6
    assert _score(relative_position, img, wrong_colour) == 0.0  # absent object: failure, not missing
    three = render_spec(_spec(("green", "triangle", 3)), seed=2)
    assert _score(object_count, three, _spec(("green", "triangle", 2))) == pytest.approx(0.5)
    assert _score(object_count, three, _spec(("green", "triangle", 4))) == pytest.approx(0.5)
    assert _score(object_shape, three, _spec(("green", "square", 3))) == 0.0
    blank = Image.new("RGB", (32, 32), (255, 255, 255))
    assert _score(colour_fraction, blank, base) == 0.0
    assert _score(object_count, blank, base) == 0.5  # off by one object per colour
    assert _score(geneval_rules, blank, base) < 0.5
    flooded = Image.new("RGB", (32, 32), PALETTE["red"])
    assert _score(colour_fraction, flooded, _spec(("red", "circle", 1))) < 0.1


def _draw_squares(boxes: list[tuple[int, int, int, int, str]], size: int = 32) -> Image.Image:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for x0, y0, x1, y1, colour in boxes:
        draw.rectangle((x0, y0, x1, y1), fill=PALETTE[colour])
    return img


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_object_count_on_separated_shapes(k):
    boxes = [(2 + 8 * i, 4, 7 + 8 * i, 9, "red") for i in range(k)]
    img = _draw_squares(boxes)
    assert _score(object_count, img, _spec(("red", "square", k))) == 1.0
    assert _score(object_count, img, _spec(("red", "square", k + 1))) == 0.5


def test_touching_shapes_of_different_colours_are_separate_objects():
    img = _draw_squares([(4, 4, 11, 11, "red"), (12, 4, 19, 11, "blue")])  # share an edge
    spec = _spec(("red", "square", 1), ("blue", "square", 1), relation="left of")
    assert _score(object_count, img, spec) == 1.0
    assert _score(relative_position, img, spec) == 1.0
    same = _draw_squares([(4, 4, 11, 11, "red"), (12, 4, 19, 11, "red")])
    assert _score(object_count, same, _spec(("red", "square", 2))) == 0.5  # merged into one


def test_connected_components_known_answers():
    mask = np.zeros((8, 8), dtype=bool)
    mask[0, 0] = mask[1, 1] = True  # diagonal neighbours: not 4-connected
    mask[3:8, 3] = mask[7, 3:8] = mask[3:8, 7] = True  # a U: one component
    labels, n = connected_components(mask)
    assert n == 3
    assert labels[0, 0] != labels[1, 1] and len(np.unique(labels[3:8, 3])) == 1
    assert (labels[~mask] == 0).all()
    spiral = np.zeros((15, 15), dtype=bool)
    spiral[0, :] = spiral[:, 14] = spiral[14, :] = spiral[2:, 0] = spiral[2, :13] = spiral[2:13, 12] = True
    assert connected_components(spiral)[1] == 1
    assert connected_components(np.zeros((4, 4), dtype=bool))[1] == 0


def test_tensor_and_pil_inputs_agree():
    rows = make_prompts(6, seed=5)
    images = [render_spec(r["spec"], seed=i) for i, r in enumerate(rows)]
    images[0] = images[0].rotate(90)  # something imperfect, so values are not all 1
    specs = [rows[1]["spec"]] + [r["spec"] for r in rows[1:]]
    for fn in RULES:
        pil = fn(["p"] * 6, images, spec=specs)
        ten = fn(["p"] * 6, [_to_tensor(im) for im in images], spec=specs)
        assert pil == ten


def test_none_spec_is_missing_never_nan():
    img = render_spec(_spec(("red", "circle", 1)))
    for fn in (colour_fraction, object_count, object_shape, geneval_rules):
        out = fn(["p", "q"], [img, img], spec=[None, _spec(("red", "circle", 1))])
        assert out[0] is None and out[1] is not None and not math.isnan(out[1])
    assert set(["colour_fraction", "object_count", "relative_position", "geneval_rules"]) <= set(
        available_rewards()
    )


def test_dry_run_names_the_broken_reward():
    img, spec = render_spec(_spec(("red", "circle", 1))), _spec(("red", "circle", 1))
    ok = dry_run(["colour_fraction", geneval_rules], "a red circle", img, spec)
    assert ok == {"colour_fraction": 1.0, "geneval_rules": 1.0}

    def boom(prompts, completions, **kw):
        raise ZeroDivisionError("x")

    def too_many(prompts, completions, **kw):
        return [1.0, 2.0]

    def text(prompts, completions, **kw):
        return ["good"]

    for fn in (boom, too_many, text):
        with pytest.raises(RuntimeError, match=fn.__name__):
            dry_run([fn], "a red circle", img, spec)


# --- CLIP --------------------------------------------------------------------------------------------




def test_clip_reward_on_tiny_random_clip(tiny_clip):
    rows = make_prompts(4, seed=0)
    images = [render_spec(r["spec"], seed=i) for i, r in enumerate(rows)]
    prompts = [r["prompt"] for r in rows]
    raw = CLIPReward(tiny_clip, device="cpu")
    scores = raw(prompts, images)
    assert len(scores) == 4 and all(-1.0 <= s <= 1.0 for s in scores)
    assert raw(prompts, [_to_tensor(im) for im in images]) == pytest.approx(scores, abs=1e-5)
    q = CLIPReward(tiny_clip, device="cpu", quantize=True)
    expected = [-1.0 if s < 0 else 0.5 if s < 0.3 else 1.0 if s < 0.6 else 1.5 for s in scores]
    assert q(prompts, images) == pytest.approx(expected)
    assert raw([], []) == []


def test_clip_quantisation_is_ar_grpos_step_map():
    scores = torch.tensor([-0.5, -1e-6, 0.0, 0.29, 0.3, 0.59, 0.6, 0.99, 1.0])
    assert quantise_clip(scores).tolist() == [-1.0, -1.0, 0.5, 0.5, 1.0, 1.0, 1.5, 1.5, 1.5]
    with pytest.raises(ValueError, match="3 thresholds need 4 levels"):
        quantise_clip(scores, (0.0, 0.3, 0.6), (0.0, 1.0))


def test_clip_reward_builds_from_a_config_entry(tiny_clip):
    from mmrl.rewards import build_reward

    fn = build_reward("clip_score_quantized", {"model": tiny_clip, "device": "cpu"})
    assert fn is build_reward("clip_score_quantized", {"model": tiny_clip, "device": "cpu"})  # cached
    assert fn.quantize and fn.__name__ == "clip_score_quantized"
    with pytest.raises(TypeError, match="bad args.*modle"):
        build_reward("clip_score", {"modle": tiny_clip})
