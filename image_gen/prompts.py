"""Procedural, verifiable text-to-image prompts (GenEval-like) and a renderer that satisfies them.

Every prompt comes with a structured ``spec`` so that rule rewards (:mod:`image_gen.rewards`) can check
an image without any detector::

    {"objects": [{"colour": "red", "shape": "circle", "count": 1}, ...], "relation": None | "left of" | ...}

A relation ``r`` reads "objects[0] r objects[1]". Two-object specs always use two *different* colours,
because the rewards find objects by colour: that keeps every spec checkable from pixels alone.

Specs are enumerated once, in a fixed order, so the index of a spec is a stable ``class_id`` that a
class-conditional tiny model can use. The train/test split is made over *equivalence groups* of specs
("a left of b" is the same scene as "b right of a"), so a test scene never appears in training, even
phrased differently. Everything is offline and deterministic by seed.
"""

from __future__ import annotations

import hashlib
import json
import random
from functools import lru_cache
from typing import Any

from PIL import Image, ImageDraw

#: Flat RGB values used by :func:`render_spec`; the rewards classify pixels against the same palette.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 20),
    "purple": (140, 40, 190),
    "orange": (250, 140, 0),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
CATEGORIES: tuple[str, ...] = (
    "single_object",
    "two_objects",
    "counting",
    "colours",
    "position",
    "colour_attribution",
)
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
MAX_COUNT = 4
TEST_EVERY = 5  # one equivalence group in five (per spec family) goes to the test split


def _obj(colour: str, shape: str, count: int = 1) -> dict[str, Any]:
    return {"colour": colour, "shape": shape, "count": count}


def normalize_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Canonical form: ints for counts, ``relation`` present, unordered pairs sorted by palette order.

    Two objects without a relation are an unordered pair, so ``{a, b}`` and ``{b, a}`` are one class.
    """
    objects = [_obj(str(o["colour"]), str(o["shape"]), int(o.get("count", 1))) for o in spec["objects"]]
    relation = spec.get("relation")
    if relation is None and len(objects) == 2:
        objects.sort(key=lambda o: (COLOURS.index(o["colour"]), SHAPES.index(o["shape"])))
    return {"objects": objects, "relation": relation}


def _key(spec: dict[str, Any]) -> str:
    return json.dumps(normalize_spec(spec), sort_keys=True)


def _group_key(spec: dict[str, Any]) -> str:
    """Key shared by equivalent scenes: "b right of a" is stored as "a left of b"."""
    spec = normalize_spec(spec)
    rel = spec["relation"]
    if rel in ("right of", "below"):
        spec = {"objects": spec["objects"][::-1], "relation": INVERSE_RELATION[rel]}
    return json.dumps(spec, sort_keys=True)


@lru_cache(maxsize=1)
def _families() -> dict[str, list[dict[str, Any]]]:
    """Spec families in a fixed order; their concatenation defines the class ids."""
    singles = [{"objects": [_obj(c, s)], "relation": None} for c in COLOURS for s in SHAPES]
    counting = [
        {"objects": [_obj(c, s, k)], "relation": None}
        for k in range(2, MAX_COUNT + 1)
        for c in COLOURS
        for s in SHAPES
    ]
    items = [(c, s) for c in COLOURS for s in SHAPES]
    pairs = [
        {"objects": [_obj(*a), _obj(*b)], "relation": None}
        for i, a in enumerate(items)
        for b in items[i + 1 :]
        if a[0] != b[0]
    ]
    positions = [
        {"objects": [_obj(*a), _obj(*b)], "relation": r}
        for a in items
        for b in items
        if a[0] != b[0]
        for r in RELATIONS
    ]
    return {"single": singles, "counting": counting, "pair": pairs, "position": positions}


@lru_cache(maxsize=1)
def _all_specs() -> tuple[list[dict[str, Any]], dict[str, int]]:
    specs = [normalize_spec(s) for fam in _families().values() for s in fam]
    return specs, {_key(s): i for i, s in enumerate(specs)}


def num_classes() -> int:
    """Number of distinct (category-free) specs."""
    return len(_all_specs()[0])


def spec_for_class(class_id: int) -> dict[str, Any]:
    """The spec with this class id (a fresh copy, safe to mutate)."""
    specs = _all_specs()[0]
    if not 0 <= class_id < len(specs):
        raise IndexError(f"class_id {class_id} out of range [0, {len(specs)})")
    return json.loads(json.dumps(specs[class_id]))


def class_for_spec(spec: dict[str, Any]) -> int:
    """Class id of a spec (any equivalent ordering of an unordered pair works); KeyError if unknown."""
    index = _all_specs()[1]
    key = _key(spec)
    if key not in index:
        raise KeyError(f"spec {spec!r} is not in the enumerated grammar")
    return index[key]


@lru_cache(maxsize=1)
def _split_of_group() -> dict[str, str]:
    """Stratified by family: groups sorted by a hash, every TEST_EVERY-th is test. Stratifying
    guarantees every category has test specs, hashing keeps the choice unbiased but fixed."""
    out: dict[str, str] = {}
    for fam in _families().values():
        groups = sorted({_group_key(s) for s in fam}, key=lambda g: hashlib.sha256(g.encode()).hexdigest())
        for i, g in enumerate(groups):
            out[g] = "test" if i % TEST_EVERY == 0 else "train"
    return out


def split_of_spec(spec: dict[str, Any]) -> str:
    """``"train"`` or ``"test"``: equivalent scenes always share a split."""
    return _split_of_group()[_group_key(spec)]


def _pool(category: str) -> list[dict[str, Any]]:
    fam = _families()
    if category in ("single_object", "colours"):
        # Both ask for one coloured object; they share specs (and class ids) and differ in phrasing.
        return fam["single"]
    if category == "counting":
        return fam["counting"]
    if category == "two_objects":
        return fam["pair"]
    if category == "colour_attribution":
        # Different shapes, so the prompt binds each colour to a shape that must be told apart.
        return [s for s in fam["pair"] if s["objects"][0]["shape"] != s["objects"][1]["shape"]]
    if category == "position":
        return fam["position"]
    raise ValueError(f"unknown category {category!r}; choose from {CATEGORIES}")


def category_specs(category: str, split: str | None = None) -> list[dict[str, Any]]:
    """Every spec a category draws from (normalised copies, fixed order); ``split`` None means both.

    For evaluation suites that enumerate prompts instead of sampling them with :func:`make_prompts`.
    """
    if split not in (None, "train", "test"):
        raise ValueError(f"split must be None, 'train' or 'test', got {split!r}")
    return [normalize_spec(s) for s in _pool(category) if split is None or split_of_spec(s) == split]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(o: dict[str, Any]) -> str:
    if o["count"] == 1:
        return f"{_article(o['colour'])} {o['colour']} {o['shape']}"
    return f"{NUMBER_WORDS[o['count']]} {o['colour']} {o['shape']}s"


def spec_to_prompt(spec: dict[str, Any], category: str | None = None) -> str:
    """English prompt for a spec; ``colour_attribution`` uses an explicit binding phrasing."""
    objs = spec["objects"]
    if spec.get("relation"):
        return f"{_phrase(objs[0])} {spec['relation']} {_phrase(objs[1])}"
    if category == "colour_attribution" and len(objs) == 2:
        return " and ".join(f"{_article(o['shape'])} {o['shape']} that is {o['colour']}" for o in objs)
    return " and ".join(_phrase(o) for o in objs)


def make_prompts(
    n: int, seed: int = 0, categories: list[str] | tuple[str, ...] | None = None, split: str = "train"
) -> list[dict[str, Any]]:
    """``n`` rows ``{"prompt", "spec", "category", "class_id"}``: categories cycle (balanced), specs
    are drawn with ``random.Random(seed)`` from the chosen split, so the same arguments give the same rows."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    cats = list(categories) if categories else list(CATEGORIES)
    pools = {c: [s for s in _pool(c) if split_of_spec(s) == split] for c in cats}
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        cat = cats[i % len(cats)]
        spec = normalize_spec(rng.choice(pools[cat]))
        rows.append(
            {
                "prompt": spec_to_prompt(spec, cat),
                "spec": spec,
                "category": cat,
                "class_id": class_for_spec(spec),
            }
        )
    return rows


# --- rendering -------------------------------------------------------------------------------------


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], rgb: tuple) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "square":
        draw.rectangle(box, fill=rgb)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _relation_holds(rel: str | None, a: tuple[int, int], b: tuple[int, int], margin: int) -> bool:
    if rel is None:
        return True
    dx, dy = b[0] - a[0], b[1] - a[1]
    return {"left of": dx > margin, "right of": -dx > margin, "above": dy > margin, "below": -dy > margin}[
        rel
    ]


def render_spec(spec: dict[str, Any], size: int = 32, seed: int = 0) -> Image.Image:
    """Draw an RGB image satisfying ``spec``: white background, flat-coloured, non-touching shapes.

    Used as training data for a tiny AR prior and as known-answer images for the rewards, so shapes keep
    a 2-pixel gap (one object = one connected component) and a relation holds with a clear margin.
    """
    spec = normalize_spec(spec)
    items = [(o["colour"], o["shape"]) for o in spec["objects"] for _ in range(o["count"])]
    side = max(5, size // 3 if len(items) <= 2 else size // 4)
    gap = 2
    rng = random.Random(seed)
    first_count = spec["objects"][0]["count"]
    for _ in range(2000):
        boxes: list[tuple[int, int]] = []
        for _item in items:
            x, y = rng.randint(1, size - side - 1), rng.randint(1, size - side - 1)
            if all(abs(x - bx) >= side + gap or abs(y - by) >= side + gap for bx, by in boxes):
                boxes.append((x, y))
        if len(boxes) == len(items) and (
            len(spec["objects"]) < 2
            or _relation_holds(spec["relation"], boxes[0], boxes[first_count], side // 2)
        ):
            break
    else:  # pragma: no cover - the layouts above always fit for size >= 24
        raise RuntimeError(f"could not lay out {spec!r} at size {size}")
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for (colour, shape), (x, y) in zip(items, boxes):
        _draw_shape(draw, shape, (x, y, x + side - 1, y + side - 1), PALETTE[colour])
    return img
