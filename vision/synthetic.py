"""Offline, procedurally generated visual reasoning tasks with exactly verifiable answers.

Every task draws its images with PIL from a small JSON-able *scene* (the full set of parameters that
determine the picture), so a dataset can be built anywhere without network access and every answer is
known exactly. Rows follow EasyR1's layout::

    {"images": [PIL.Image (RGB)], "problem": "<image>How many red shapes are there?", "answer": "3",
     "task": "count_shapes", "choices": ["0", "1", "2", "3", "4"]}

Tasks (``make_synthetic(name, ..., **task_options)``):

``count_shapes``
    Circles, squares and triangles on a coarse grid (no overlaps); "How many red shapes are there?"
    (or, with ``by_shape=True``, "How many red circles are there?"). Options: ``max_count`` (4),
    ``max_distractors`` (4), ``num_colours`` (4), ``grid`` (4 cells per side), ``by_shape`` (False).
``colour_at_position``
    The image is a ``grid`` x ``grid`` board of flat colour fills; "What colour is the top-left square?".
    Options: ``grid`` (2), ``num_colours`` (4), ``shapes`` (False: draw a shape per cell and ask for the
    shape instead), ``noise`` (0.0: blend fraction of uniform pixel noise).
``single_shape``
    One large circle/square/triangle in one colour at a jittered position; "What colour is the circle?"
    (or, with ``ask="shape"``, "What shape is in the image?"). Options: ``ask`` ("colour"), ``num_colours``
    (4). The easiest task: the offline demo's tiny model learns it.
``arithmetic``
    ``style="dots"``: two groups of dots (left / right half), asks for their sum; ``style="digits"``: an
    expression such as "3 + 4" written large, asks for its value. Options: ``style``, ``ops`` ("+", any
    of "+-*"), ``max_operand`` (4 for dots, 9 for digits).

Determinism and split guarantee. Row ``i`` is generated from its own ``random.Random`` seeded by a SHA-256
of (task, split, seed, i): the same arguments give pixel-identical rows, rows do not depend on
``num_samples`` (a longer dataset extends a shorter one) and train/test use unrelated streams. The split is
made over *pictures*: :func:`scene_key` is the canonical string of the parameters that draw the image (the
question's target, e.g. which cell or colour is asked about, is left out) and :func:`scene_split` hashes it
into a fixed partition (one fifth "test", the rest "train"); each split resamples scenes that fall in the
other's partition. So no held-out picture is ever drawn in train, whatever the seeds or the question asked
of it (``noise`` is drawn per row and not part of the key: a board is held out with every noise pattern).
Held-out rows are also distinct pictures where the task's picture space allows: row ``i`` redraws (up to
``_DISTINCT_TRIES`` times) a picture already used by rows ``< i`` — still deterministic, and still
prefix-stable because row ``i`` only looks at earlier rows. When a small space runs out (e.g.
``colour_at_position`` at its defaults has 51 held-out boards) rows reuse pictures, with new questions first,
and a warning states the true number of distinct pictures. Pictures that differ only by a jitter step are
different pictures here: ``single_shape`` train and held-out both contain e.g. a red circle, at different
positions or sizes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")
_TEST_BUCKETS = 5  # scene-key hash % 5 == 0 -> held-out; 80/20 keeps train large
_MAX_RESAMPLES = 1000
_DISTINCT_TRIES = 64  # in-split redraws of an already used held-out picture before a repeat is accepted
_MIN_IMAGE_SIZE = 32

# Clearly distinct, saturated colours; order matters because `num_colours` takes a prefix.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 215, 20),
    "purple": (135, 45, 175),
    "orange": (245, 135, 20),
    "pink": (245, 125, 190),
    "brown": (125, 75, 30),
    "gray": (128, 128, 128),
    "black": (0, 0, 0),
}
SHAPES = ("circle", "square", "triangle")
_WHITE = (255, 255, 255)
_INK = ("red", "green", "blue", "purple", "orange", "black")  # legible on white (yellow/pink are not)
_OP_SYMBOL = {"+": "+", "-": "-", "*": "x"}  # "x" renders in every font, the multiplication sign may not
_OP_WORD = {"+": "plus", "-": "minus", "*": "times"}


@dataclass(frozen=True)
class SyntheticTask:
    """One task: option defaults plus pure functions from (options, rng) to a scene and a picture."""

    name: str
    defaults: Mapping[str, Any]
    check: Callable[[dict[str, Any]], None]  # raises ValueError on a bad value; may fill derived defaults
    sample: Callable[[random.Random, dict[str, Any]], dict[str, Any]]  # scene incl. "question"/"answer"
    render: Callable[[dict[str, Any], int, dict[str, Any], random.Random], Image.Image]
    choices: Callable[[dict[str, Any]], list[str] | None]
    # Scene fields that only shape the question, never the picture (given the scene): left out of the
    # split key so that one picture cannot be asked about in train and in test.
    asked: Callable[[Mapping[str, Any]], tuple[str, ...]] = lambda scene: ()


def _digest_int(*parts: Any) -> int:
    # sha256 rather than hash(): Python's str hash is salted per process and would break determinism.
    text = "|".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def scene_key(name: str, scene: Mapping[str, Any]) -> str:
    """Canonical string of the parameters that draw a scene's picture; equal keys mean the same picture.

    "question", "answer" and, for a registered task, the fields only its question uses (which cell or colour
    is asked about) are left out: the same board asked about another cell is the same image."""
    task = SYNTHETIC_TASKS.get(name)
    drop = {"question", "answer", *(task.asked(scene) if task is not None else ())}
    return json.dumps({"task": name, **{k: v for k, v in scene.items() if k not in drop}},
                      sort_keys=True, separators=(",", ":"))


def scene_split(name: str, scene: Mapping[str, Any]) -> str:
    """The split a scene's picture belongs to: a fixed hash partition, independent of seeds and questions."""
    return "test" if _digest_int("split", scene_key(name, scene)) % _TEST_BUCKETS == 0 else "train"


def _check_int(opts: dict[str, Any], key: str, lo: int, hi: int) -> None:
    value = opts[key]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"option {key}={value!r} must be an integer in [{lo}, {hi}]")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
                fill: tuple[int, int, int], outline: tuple[int, int, int] | None = None) -> None:
    width = max(1, round(r / 8)) if outline else 0
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=width)
    elif shape == "square":
        s = 0.85 * r  # a full-radius square looks much heavier than the circle next to it
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill, outline=outline, width=width)
    else:
        points = [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
        draw.polygon(points, fill=fill, outline=outline, width=width)


# ----------------------------------------------------------------------------------------- count_shapes


def _count_check(o: dict[str, Any]) -> None:
    _check_int(o, "grid", 2, 8)
    _check_int(o, "num_colours", 2, len(PALETTE))
    _check_int(o, "max_count", 1, o["grid"] ** 2 - 1)
    _check_int(o, "max_distractors", 1, o["grid"] ** 2 - o["max_count"])


def _count_sample(rng: random.Random, o: dict[str, Any]) -> dict[str, Any]:
    colours = list(PALETTE)[: o["num_colours"]]
    target = rng.choice(colours)
    target_shape = rng.choice(SHAPES) if o["by_shape"] else None
    count = rng.randint(0, o["max_count"])  # uniform answers, so "always say 2" earns little reward
    n_distract = rng.randint(1, o["max_distractors"])  # >= 1 so a count of 0 is never an empty canvas
    if target_shape is None:
        kinds = [(target, rng.choice(SHAPES)) for _ in range(count)]
        others = [c for c in colours if c != target]
        kinds += [(rng.choice(others), rng.choice(SHAPES)) for _ in range(n_distract)]
    else:
        kinds = [(target, target_shape)] * count
        others = [(c, s) for c in colours for s in SHAPES if (c, s) != (target, target_shape)]
        kinds += [rng.choice(others) for _ in range(n_distract)]
    cells = rng.sample(range(o["grid"] ** 2), len(kinds))
    # [row, col, colour, shape, dx, dy]; jitter in 1/20ths of a cell stays inside the cell
    objects = sorted([*divmod(cell, o["grid"]), colour, shape, rng.randint(-2, 2), rng.randint(-2, 2)]
                     for cell, (colour, shape) in zip(cells, kinds, strict=True))
    noun = f"{target_shape}s" if target_shape else "shapes"
    return {"grid": o["grid"], "target": target, "target_shape": target_shape, "objects": objects,
            "question": f"How many {target} {noun} are there?", "answer": str(count)}


def _count_render(scene: dict[str, Any], size: int, o: dict[str, Any], rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (size, size), _WHITE)
    draw = ImageDraw.Draw(img)
    cell = size // scene["grid"]
    margin = (size - cell * scene["grid"]) // 2
    for row, col, colour, shape, dx, dy in scene["objects"]:
        cx = margin + (col + 0.5 + dx / 20) * cell
        cy = margin + (row + 0.5 + dy / 20) * cell
        _draw_shape(draw, shape, cx, cy, 0.35 * cell, PALETTE[colour])  # diameter ~70% of a cell
    return img


# ----------------------------------------------------------------------------------- colour_at_position


def _position_phrase(row: int, col: int, grid: int) -> str:
    if grid == 2:
        return f"the {('top', 'bottom')[row]}-{('left', 'right')[col]} square"
    if grid == 3:
        if row == col == 1:
            return "the center square"
        return f"the {('top', 'middle', 'bottom')[row]}-{('left', 'middle', 'right')[col]} square"
    return f"the square in row {row + 1}, column {col + 1} (counting from the top-left)"


def _cell_box(row: int, col: int, grid: int, size: int) -> tuple[int, int, int, int]:
    """Inclusive pixel box of a board cell; integer bounds so the cells tile the image exactly."""
    return col * size // grid, row * size // grid, (col + 1) * size // grid - 1, (row + 1) * size // grid - 1


def _board_check(o: dict[str, Any]) -> None:
    _check_int(o, "grid", 2, 6)
    _check_int(o, "num_colours", 2, len(PALETTE))
    if not isinstance(o["shapes"], bool):
        raise ValueError(f"option shapes={o['shapes']!r} must be a bool")
    if isinstance(o["noise"], bool) or not isinstance(o["noise"], int | float) or not 0 <= o["noise"] <= 1:
        raise ValueError(f"option noise={o['noise']!r} must be a number in [0, 1]")


def _board_sample(rng: random.Random, o: dict[str, Any]) -> dict[str, Any]:
    grid, palette = o["grid"], list(PALETTE)[: o["num_colours"]]
    colours = [rng.choice(palette) for _ in range(grid * grid)]  # repeats allowed: position must matter
    shapes = [rng.choice(SHAPES) for _ in range(grid * grid)] if o["shapes"] else None
    cell = rng.randrange(grid * grid)
    where = _position_phrase(*divmod(cell, grid), grid)
    if shapes is None:
        question, answer = f"What colour is {where}?", colours[cell]
    else:
        question, answer = f"What shape is in {where}?", shapes[cell]
    return {"grid": grid, "colours": colours, "shapes": shapes, "cell": cell,
            "question": question, "answer": answer}


def _board_render(scene: dict[str, Any], size: int, o: dict[str, Any], rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (size, size), _WHITE)
    draw = ImageDraw.Draw(img)
    grid = scene["grid"]
    gap = max(1, size // 64)  # thin white seams keep equal-coloured neighbours readable as separate cells
    for idx, colour in enumerate(scene["colours"]):
        row, col = divmod(idx, grid)
        x0, y0, x1, y1 = _cell_box(row, col, grid, size)
        draw.rectangle([x0 + gap, y0 + gap, x1 - gap, y1 - gap], fill=PALETTE[colour])
        if scene["shapes"] is not None:
            _draw_shape(draw, scene["shapes"][idx], (x0 + x1) / 2, (y0 + y1) / 2, 0.3 * (x1 - x0),
                        _WHITE, outline=(0, 0, 0))
    if o["noise"] > 0:
        # randbytes draws from this row's Random, so noise is reproducible and no global RNG is touched
        noise = Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3))
        img = Image.blend(img, noise, float(o["noise"]))
    return img


# ------------------------------------------------------------------------------------------- arithmetic


def _arith_check(o: dict[str, Any]) -> None:
    if o["style"] not in ("dots", "digits"):
        raise ValueError(f"option style={o['style']!r}; valid styles: ['digits', 'dots']")
    if not isinstance(o["ops"], str) or not o["ops"] or set(o["ops"]) - set(_OP_SYMBOL):
        raise ValueError(f"option ops={o['ops']!r} must be a non-empty string of {sorted(_OP_SYMBOL)}")
    if o["max_operand"] is None:
        o["max_operand"] = 4 if o["style"] == "dots" else 9
    _check_int(o, "max_operand", 1, 6 if o["style"] == "dots" else 99)  # dots: 6 slots per half


def _operands(o: dict[str, Any]):
    for op in sorted(set(o["ops"])):
        for a in range(1, o["max_operand"] + 1):
            for b in range(1, (a if op == "-" else o["max_operand"]) + 1):  # "-" never goes negative
                yield op, a, b


def _apply(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _arith_sample(rng: random.Random, o: dict[str, Any]) -> dict[str, Any]:
    op = rng.choice(sorted(set(o["ops"])))
    a = rng.randint(1, o["max_operand"])
    b = rng.randint(1, a if op == "-" else o["max_operand"])
    colour = rng.choice(_INK)
    scene: dict[str, Any] = {"style": o["style"], "op": op, "a": a, "b": b, "colour": colour,
                             "answer": str(_apply(op, a, b))}
    if o["style"] == "dots":
        scene["left"], scene["right"] = sorted(rng.sample(range(6), a)), sorted(rng.sample(range(6), b))
        if op == "+":
            scene["question"] = "How many dots are there in the left group plus the right group?"
        else:
            scene["question"] = (f"What is the number of dots in the left group {_OP_WORD[op]} "
                                 "the number of dots in the right group?")
    else:
        scene["dx"], scene["dy"] = rng.randint(-3, 3), rng.randint(-3, 3)  # 1/40ths of the image
        scene["question"] = "What is the result of the expression in the image?"
    return scene


def _text_mask(text: str, size: int) -> Image.Image:
    """An "L" mask of `text` about 80% of the image wide; FreeType default font, bitmap fallback."""
    px = max(8, int(0.4 * size))
    try:
        font = ImageFont.load_default(size=px)  # scalable font needs Pillow >= 10.1 built with FreeType
        left, top, right, bottom = font.getbbox(text)
        if right - left > 0.8 * size:
            font = ImageFont.load_default(size=max(8, int(px * 0.8 * size / (right - left))))
            left, top, right, bottom = font.getbbox(text)
        mask = Image.new("L", (right - left, bottom - top), 0)
        ImageDraw.Draw(mask).text((-left, -top), text, fill=255, font=font)
        return mask
    except (TypeError, ImportError, OSError, AttributeError):
        bitmap = ImageFont.load_default()
        left, top, right, bottom = bitmap.getbbox(text)
        mask = Image.new("L", (right - left, bottom - top), 0)
        ImageDraw.Draw(mask).text((-left, -top), text, fill=255, font=bitmap)
        scale = max(1, int(0.8 * size / mask.width))  # nearest-neighbour keeps the bitmap glyphs crisp
        return mask.resize((mask.width * scale, mask.height * scale), Image.Resampling.NEAREST)


def _arith_render(scene: dict[str, Any], size: int, o: dict[str, Any], rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (size, size), _WHITE)
    draw = ImageDraw.Draw(img)
    fill = PALETTE[scene["colour"]]
    if scene["style"] == "dots":
        draw.line([(size / 2, size * 0.05), (size / 2, size * 0.95)], fill=(160, 160, 160),
                  width=max(1, size // 56))
        slot_w, slot_h = size / 4, size / 3  # each half holds a 2 x 3 grid of dot slots
        for half, slots in ((0, scene["left"]), (1, scene["right"])):
            for slot in slots:
                row, col = divmod(slot, 2)
                cx, cy = half * size / 2 + (col + 0.5) * slot_w, (row + 0.5) * slot_h
                _draw_shape(draw, "circle", cx, cy, 0.3 * min(slot_w, slot_h), fill)
        return img
    text = f"{scene['a']} {_OP_SYMBOL[scene['op']]} {scene['b']}"
    mask = _text_mask(text, size)
    x = (size - mask.width) // 2 + scene["dx"] * size // 40
    y = (size - mask.height) // 2 + scene["dy"] * size // 40
    img.paste(Image.new("RGB", mask.size, fill), (x, y), mask)
    return img


# ----------------------------------------------------------------------------------------- single_shape


def _single_check(o: dict[str, Any]) -> None:
    if o["ask"] not in ("colour", "shape"):
        raise ValueError(f"option ask={o['ask']!r}; valid: ['colour', 'shape']")
    _check_int(o, "num_colours", 2, len(PALETTE) - 1)  # black is the outline colour, never a fill


def _single_sample(rng: random.Random, o: dict[str, Any]) -> dict[str, Any]:
    # One object, so the answer depends on the image but not on where to look: the easiest visual
    # question, and the one a sub-million-parameter model learns in a few hundred steps.
    colour = rng.choice(list(PALETTE)[: o["num_colours"]])
    shape = rng.choice(SHAPES)
    scene = {"colour": colour, "shape": shape, "dx": rng.randint(-3, 3), "dy": rng.randint(-3, 3),
             "scale": rng.randint(0, 2)}
    if o["ask"] == "colour":
        scene.update(question=f"What colour is the {shape}?", answer=colour)
    else:
        scene.update(question="What shape is in the image?", answer=shape)
    return scene


def _single_render(scene: dict[str, Any], size: int, o: dict[str, Any], rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (size, size), _WHITE)
    radius = size * (0.22 + 0.04 * scene["scale"])
    cx = size / 2 + scene["dx"] * size / 32
    cy = size / 2 + scene["dy"] * size / 32
    _draw_shape(ImageDraw.Draw(img), scene["shape"], cx, cy, radius, PALETTE[scene["colour"]])
    return img


# --------------------------------------------------------------------------------------------- registry

SYNTHETIC_TASKS: dict[str, SyntheticTask] = {
    "count_shapes": SyntheticTask(
        "count_shapes",
        {"max_count": 4, "max_distractors": 4, "num_colours": 4, "grid": 4, "by_shape": False},
        _count_check, _count_sample, _count_render,
        lambda o: [str(n) for n in range(o["max_count"] + 1)],
        lambda scene: ("target", "target_shape"),
    ),
    "colour_at_position": SyntheticTask(
        "colour_at_position",
        {"grid": 2, "num_colours": 4, "shapes": False, "noise": 0.0},
        _board_check, _board_sample, _board_render,
        lambda o: list(SHAPES) if o["shapes"] else list(PALETTE)[: o["num_colours"]],
        lambda scene: ("cell",),
    ),
    "single_shape": SyntheticTask(
        "single_shape",
        {"ask": "colour", "num_colours": 4},
        _single_check, _single_sample, _single_render,
        lambda o: list(PALETTE)[: o["num_colours"]] if o["ask"] == "colour" else list(SHAPES),
    ),
    "arithmetic": SyntheticTask(
        "arithmetic",
        {"style": "dots", "ops": "+", "max_operand": None},
        _arith_check, _arith_sample, _arith_render,
        lambda o: [str(v) for v in sorted({_apply(op, a, b) for op, a, b in _operands(o)})],
        # dots draw the two groups, not the operator: "+" and "-" on the same dots are one picture
        lambda scene: ("op",) if scene.get("style") == "dots" else (),
    ),
}


def available_synthetic_tasks() -> list[str]:
    """Names accepted by :func:`make_synthetic`, sorted."""
    return sorted(SYNTHETIC_TASKS)


def _task_and_options(name: str, task_options: Mapping[str, Any]) -> tuple[SyntheticTask, dict[str, Any]]:
    if name not in SYNTHETIC_TASKS:
        raise ValueError(f"unknown synthetic task {name!r}; available: {available_synthetic_tasks()}")
    task = SYNTHETIC_TASKS[name]
    unknown = sorted(set(task_options) - set(task.defaults))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for synthetic task {name!r}; "
                        f"valid options: {sorted(task.defaults)}")
    opts = {**task.defaults, **task_options}
    task.check(opts)
    return task, opts


def synthetic_choices(name: str, **task_options: Any) -> list[str] | None:
    """The closed answer set of a task under these options (e.g. colour words, "0".."max_count")."""
    task, opts = _task_and_options(name, task_options)
    return task.choices(opts)


def _draw_scene(task: SyntheticTask, opts: dict[str, Any], rng: random.Random, split: str,
                used: dict[str, set[str]] | None) -> dict[str, Any]:
    """A scene of `split`; with `used` (held-out rows so far), preferably a new picture, else a new question."""
    repeat: tuple[dict[str, Any], str, str] | None = None  # best candidate among already used pictures
    tries = 0
    for _ in range(_MAX_RESAMPLES):
        scene = task.sample(rng, opts)
        if scene_split(task.name, scene) != split:
            continue
        if used is None:
            return scene
        picture = scene_key(task.name, scene)
        row_key = f"{picture}|{scene['question']}"
        if picture not in used["pictures"]:
            break
        # a used picture asked something new still adds a held-out item; a repeated row adds nothing
        if repeat is None or (repeat[2] in used["rows"] and row_key not in used["rows"]):
            repeat = (scene, picture, row_key)
        tries += 1
        if tries >= _DISTINCT_TRIES:
            scene, picture, row_key = repeat
            break
    else:  # only reachable when the options leave almost no distinct scenes
        if repeat is None:
            raise RuntimeError(f"could not draw a {split!r} scene for {task.name!r} with options {opts}")
        scene, picture, row_key = repeat
    if used is not None:
        used["pictures"].add(picture)
        used["rows"].add(row_key)
    return scene


def make_synthetic(name: str, split: str = "train", num_samples: int = 256, seed: int = 0,
                   image_size: int = 112, *, return_scene: bool = False,
                   **task_options: Any) -> list[dict[str, Any]]:
    """Build `num_samples` rows of task `name`; `return_scene=True` adds each row's scene under "scene"."""
    task, opts = _task_and_options(name, task_options)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {list(SPLITS)}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
        raise ValueError(f"num_samples must be a non-negative integer, got {num_samples!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be an integer >= {_MIN_IMAGE_SIZE}, got {image_size!r}")
    choices = task.choices(opts)
    rows: list[dict[str, Any]] = []
    used: dict[str, set[str]] | None = {"pictures": set(), "rows": set()} if split == "test" else None
    for index in range(num_samples):
        rng = random.Random(_digest_int("mmrl-synthetic", name, split, seed, index))
        scene = _draw_scene(task, opts, rng, split, used)
        row: dict[str, Any] = {"images": [task.render(scene, image_size, opts, rng)],
                               "problem": "<image>" + scene["question"], "answer": scene["answer"],
                               "task": name}
        if choices is not None:
            row["choices"] = list(choices)
        if return_scene:
            row["scene"] = scene
        rows.append(row)
    if used is not None and len(used["pictures"]) < num_samples:
        logger.warning("held-out split of %r (options %s): %d rows show %d distinct pictures (%d distinct "
                       "picture+question pairs); the task's held-out picture space is that small",
                       name, opts, num_samples, len(used["pictures"]), len(used["rows"]))
    return rows
