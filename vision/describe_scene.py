"""The ``describe_scene`` synthetic task: "Describe the image." over a few coloured shapes on a 3 x 3 grid.

A long-form task with an exact ground truth: the row's ``scene`` column holds every object (colour, shape,
grid cell), so a reward can check each claim a free-text description makes (:mod:`vision.claims`). The
``answer`` is a canonical full description, e.g.::

    There are two shapes. A red circle is in the top-left. A blue square is in the center.

which is what a supervised cold start teaches. Options (``make_synthetic("describe_scene", ...)``):
``min_objects`` (1), ``max_objects`` (4), ``num_colours`` (4).

Importing this module registers the task in :data:`vision.synthetic.SYNTHETIC_TASKS` (nothing in
``vision/synthetic.py`` names it): :func:`vision.data.load_rows` and :func:`vision.task.validate` import it
where ``synthetic:NAME`` sources are resolved, and ask :func:`make_synthetic` for the scene column
(:data:`SCENE_COLUMN_TASKS`). The split guarantee is :mod:`vision.synthetic`'s: scenes are drawn until
:func:`vision.synthetic.scene_split` puts them in the requested split. A scene holds only what a
description can state (objects and cells); the small position jitter of each shape is drawn from the row's
generator at render time, so two rows with equal scenes are the same item and always share a split.
"""

from __future__ import annotations

import random
from typing import Any

from PIL import Image, ImageDraw

from vision.synthetic import (
    PALETTE,
    SHAPES,
    SYNTHETIC_TASKS,
    SyntheticTask,
    _check_int,
    _draw_shape,
)

TASK = "describe_scene"
QUESTION = "Describe the image."
GRID = 3  # fixed: every cell has a plain-language name (POSITION_NAMES)
#: Synthetic tasks whose rewards read the row's scene: the loaders ask make_synthetic for that column.
SCENE_COLUMN_TASKS = frozenset({TASK})

#: Name of each grid cell (row, col), as the canonical description and the claim parser use them.
POSITION_NAMES: dict[tuple[int, int], str] = {
    (0, 0): "top-left", (0, 1): "top", (0, 2): "top-right",
    (1, 0): "left", (1, 1): "center", (1, 2): "right",
    (2, 0): "bottom-left", (2, 1): "bottom", (2, 2): "bottom-right",
}
# How the canonical description places a shape in each cell ("at the top", "on the left", ...).
_POSITION_PHRASES: dict[str, str] = {
    "top-left": "in the top-left", "top": "at the top", "top-right": "in the top-right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom-left": "in the bottom-left", "bottom": "at the bottom", "bottom-right": "in the bottom-right",
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def _check(o: dict[str, Any]) -> None:
    _check_int(o, "num_colours", 2, len(PALETTE) - 1)  # black stays out: it reads as an outline
    _check_int(o, "max_objects", 1, GRID * GRID)
    _check_int(o, "min_objects", 1, o["max_objects"])


def objects_of(scene: dict[str, Any]) -> list[dict[str, Any]]:
    """The scene's objects ``{"colour", "shape", "row", "col"}`` (a row's ``scene`` column)."""
    return list(scene.get("objects") or [])


def describe(scene: dict[str, Any]) -> str:
    """The canonical full description: the object count, then each object with its cell, top to bottom."""
    objects = objects_of(scene)
    n = len(objects)
    count = NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)
    parts = [f"There is {count} shape." if n == 1 else f"There are {count} shapes."]
    for obj in objects:
        where = _POSITION_PHRASES[POSITION_NAMES[(obj["row"], obj["col"])]]
        parts.append(f"A {obj['colour']} {obj['shape']} is {where}.")
    return " ".join(parts)


def _sample(rng: random.Random, o: dict[str, Any]) -> dict[str, Any]:
    colours = list(PALETTE)[: o["num_colours"]]
    n = rng.randint(o["min_objects"], o["max_objects"])
    cells = sorted(rng.sample(range(GRID * GRID), n))  # one object per cell: positions are unambiguous
    objects = [{"colour": rng.choice(colours), "shape": rng.choice(SHAPES), "row": cell // GRID,
                "col": cell % GRID} for cell in cells]
    scene: dict[str, Any] = {"grid": GRID, "objects": objects, "question": QUESTION}
    scene["answer"] = describe(scene)
    return scene


def render_scene(scene: dict[str, Any], size: int, rng: random.Random | None = None) -> Image.Image:
    """The picture of a scene; ``rng`` jitters each shape inside its cell (None: centred)."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    cell = size / GRID
    for obj in objects_of(scene):
        dx, dy = (rng.randint(-2, 2), rng.randint(-2, 2)) if rng is not None else (0, 0)
        cx, cy = (obj["col"] + 0.5 + dx / 20) * cell, (obj["row"] + 0.5 + dy / 20) * cell
        _draw_shape(draw, obj["shape"], cx, cy, 0.33 * cell, PALETTE[obj["colour"]])
    return img


def _render(scene: dict[str, Any], size: int, o: dict[str, Any], rng: random.Random) -> Image.Image:
    return render_scene(scene, size, rng)


# setdefault: re-importing this module (e.g. by file path) must not replace the registered task.
SYNTHETIC_TASKS.setdefault(TASK, SyntheticTask(
    TASK, {"min_objects": 1, "max_objects": 4, "num_colours": 4}, _check, _sample, _render, lambda o: None))
