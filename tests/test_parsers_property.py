"""Property-based tests (hypothesis): parsers fed random input never fail with an unhandled exception.

* The config parser — ``load_config`` on random YAML mappings and random ``key=value`` overrides,
  ``apply_overrides`` on random strings — raises only :class:`ConfigError` (or ``FileNotFoundError``), and
  a config that loads can always be validated: ``config_problems`` returns lines, it never crashes.
* The answer and reward parsers (:mod:`vision.rewards`, :mod:`vision.grading`, the benchmark reward, the
  image-generation rule rewards) return normally on random text / images, with values in their documented
  range.

Example counts are modest so the file runs in seconds; the math-verify paths get fewer examples.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import fields, is_dataclass

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import image_gen.task as image_gen_task
import vision.task as vision_task
from image_gen import rewards as gen_rewards
from image_gen.evaluate import check_image
from image_gen.prompts import CATEGORIES, PALETTE, category_specs, render_spec
from mmrl.config import ConfigError, TrainConfig, apply_overrides, load_config, schema_keys
from mmrl.config_checks import FOREIGN_KEYS, config_problems, validate_config
from vision import grading
from vision import rewards as vr
from vision.benchmarks import benchmark_accuracy

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MEDIUM = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TASKS = {"vision": vision_task, "image_gen": image_gen_task}

# --------------------------------------------------------------------------------------------------
# Config parser
# --------------------------------------------------------------------------------------------------

# Strings that reach interesting branches: registry names, path shapes (NUL byte, over-long, ~), YAML quirks.
WORDS = ["grpo", "dapo", "k3", "k9", "group", "constant", "cosine_with_min_lr", "reduce_lr_on_plateau",
         "jsonl", "wandb", "accuracy", "geneval_rules", "vlm_judge", "clip_score", "x.py:fn", "./r.py:f",
         "auto", "bf16", "latest", "tiny", "tiny_t2i", "tiny-qwen2.5-vl", "Qwen/Qwen2.5-VL-3B-Instruct",
         "./nope", "/", "~", "~nobody/x", "a\x00b", "a" * 300, "synthetic:single_shape", "synthetic:nope",
         "benchmark:mathvista", "procedural", "file", "classes", "random_patch", "answer", "{question}",
         "{name}", "{", "1e-6", "no", ""]
SCALARS = (st.none() | st.booleans() | st.integers(-10**6, 10**6)
           | st.sampled_from([10**30, -(10**400), 2**32]) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=12) | st.sampled_from(WORDS))
ANY_VALUE = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                         | st.dictionaries(st.text(max_size=6) | st.sampled_from(WORDS), inner, max_size=3),
                         max_leaves=6)


def _leaf_types(cls: type, section_types: dict | None = None, prefix: str = "") -> dict[str, typing.Any]:
    hints = typing.get_type_hints(cls)
    out: dict[str, typing.Any] = {}
    for f in fields(cls):
        tp = (section_types or {}).get(f.name, hints[f.name])
        if is_dataclass(tp):
            out.update(_leaf_types(tp, None, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = tp
    return out


def _typed(tp: typing.Any) -> st.SearchStrategy:
    """Mostly well-typed values (so many configs load and reach validation), sometimes anything."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*[st.none() if a is type(None) else _typed(a) for a in args])
    if tp is float:
        base = (st.floats(allow_nan=True, allow_infinity=True) | st.integers(-100, 100)
                | st.sampled_from([0, 1, -1, 0.5, 1.5, 2**32, 10**30, -(10**400), "1e-6"]))
    elif tp is int:
        base = st.integers(-3, 300) | st.sampled_from([-1, 0, 1, 2, 2**32, 10**30])
    elif tp is bool:
        base = st.booleans()
    elif tp is str:
        base = st.sampled_from(WORDS) | st.text(max_size=20)
    elif origin in (list, tuple):
        item = args[0] if args else typing.Any
        if is_dataclass(item):  # rewards
            args = st.dictionaries(st.sampled_from(["model", "x", "path"]), SCALARS, max_size=2)
            entry = st.fixed_dictionaries({"name": st.sampled_from(WORDS) | st.text(max_size=8)},
                                          optional={"weight": _typed(float), "args": args})
            base = st.lists(entry, max_size=3)
        else:
            base = st.lists(_typed(item), max_size=3)
    elif tp is dict or origin is dict:
        base = st.dictionaries(st.text(max_size=8) | st.sampled_from(["num_samples", "image_size", "seed"]),
                               SCALARS, max_size=3)
    else:
        base = ANY_VALUE
    return base | ANY_VALUE if tp is not bool else base | SCALARS


def _nested(pairs: list[tuple[str, typing.Any]]) -> dict:
    raw: dict = {}
    for dotted, value in pairs:
        node = raw
        *parents, last = dotted.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[last] = value
    return raw


@st.composite
def raw_configs(draw: st.DrawFn) -> tuple[str, dict]:
    task = draw(st.sampled_from(sorted(TASKS)))
    types_ = _leaf_types(TrainConfig, TASKS[task].SECTION_TYPES)
    keys = draw(st.lists(st.sampled_from(sorted(types_)), max_size=8, unique=True))
    pairs = [(k, draw(_typed(types_[k]))) for k in keys]
    if draw(st.booleans()):  # an unknown key, foreign or random, in some section
        section = draw(st.sampled_from(["", "optim.", "sampling.", "model.", "data.", "nope."]))
        name = draw(st.sampled_from(sorted(FOREIGN_KEYS)) | st.text(min_size=1, max_size=10))
        pairs.append((section + name, draw(ANY_VALUE)))
    if draw(st.booleans()):
        presets = st.sampled_from(["grpo", "papo_grpo", "papo_dapo", "dr_grpo", "nope"]) | SCALARS
        pairs.append(("preset", draw(presets)))
    return task, _nested(pairs)


def _validates_or_reports(cfg: TrainConfig, task: str) -> None:
    lines = config_problems(cfg, TASKS[task].validate)
    assert isinstance(lines, list) and all(isinstance(line, str) and "=" in line for line in lines)
    try:
        validate_config(cfg, task_checks=TASKS[task].validate)
    except ConfigError as exc:
        assert lines and str(len(lines)) in str(exc).splitlines()[0]
    else:
        assert not lines


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    return tmp_path_factory.mktemp("configs") / "random.yaml"


@FAST
@given(raw_configs())
def test_load_config_on_random_yaml_raises_only_config_errors(config_file, task_and_raw):
    task, raw = task_and_raw
    config_file.write_text(yaml.safe_dump(raw, allow_unicode=True))
    try:
        cfg = load_config(config_file, section_types=TASKS[task].SECTION_TYPES)
    except ConfigError as exc:
        assert str(exc)
        event("rejected at load")
        return
    event("loaded and validated")
    assert isinstance(cfg, TrainConfig)
    _validates_or_reports(cfg, task)


SCHEMA = sorted(set(schema_keys(TrainConfig, vision_task.SECTION_TYPES))
                | set(schema_keys(TrainConfig, image_gen_task.SECTION_TYPES)))
LEAF_TYPES = {**_leaf_types(TrainConfig, image_gen_task.SECTION_TYPES),
              **_leaf_types(TrainConfig, vision_task.SECTION_TYPES)}


@st.composite
def typed_override(draw: st.DrawFn) -> str:
    key = draw(st.sampled_from(sorted(LEAF_TYPES)))
    value = draw(_typed(LEAF_TYPES[key]))
    return f"{key}={yaml.safe_dump([value], default_flow_style=True, width=10**6).strip()[1:-1]}"


OVERRIDE = (typed_override()
            | st.builds(lambda k, v: f"{k}={v}",
                        st.sampled_from([*SCHEMA, *sorted(FOREIGN_KEYS)]) | st.text(max_size=10),
                        st.text(max_size=20) | st.sampled_from(WORDS))
            | st.text(max_size=30))


@FAST
@given(st.sampled_from(sorted(TASKS)), st.lists(OVERRIDE, max_size=4))
def test_random_overrides_raise_only_config_errors(task, overrides):
    try:
        cfg = load_config(None, overrides, section_types=TASKS[task].SECTION_TYPES)
    except ConfigError as exc:
        assert str(exc)
        event("rejected at load")
        return
    event("loaded and validated")
    _validates_or_reports(cfg, task)


@FAST
@given(st.lists(st.text(max_size=40) | OVERRIDE, max_size=5))
def test_apply_overrides_on_random_strings(overrides):
    raw = {"seed": 1, "rewards": [{"name": "accuracy"}], "optim": {"lr": 1e-6}}
    try:
        out = apply_overrides(raw, overrides)
    except ConfigError as exc:
        assert str(exc)
        return
    assert isinstance(out, dict)


def test_yaml_errors_in_overrides_and_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        apply_overrides({}, ["optim.lr=[1e-5"])
    path = tmp_path / "broken.yaml"
    path.write_text("optim: {lr: [\n")
    with pytest.raises(ConfigError, match="not a readable YAML file"):
        load_config(path)
    with pytest.raises(ConfigError, match="too large"):
        load_config(None, [f"optim.lr={10**400}"])
    with pytest.raises(ConfigError, match="expected a list of 2 values"):
        load_config(None, ["optim.betas=[0.9]"])
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(None, ["preset=[grpo]"])


# --------------------------------------------------------------------------------------------------
# Answer and reward parsers
# --------------------------------------------------------------------------------------------------

# Random text around the markers the parsers look for, so their branches are reached.
TOKENS = ["<answer>", "</answer>", "<think>", "</think>", "\\boxed{", "\\boxed ", "{", "}", "\\", "$",
          "\\frac{1}{2}", "The answer is ", "Answer: ", "(B)", "B.", " A ", "c", "%", "1,000", "-3.5", "1/0",
          "0/0", "1e999", "\n", "**", "\\text{", "°", "^2", "cm", "option C", " ", "x = 5", "NaN", "inf"]
TEXT = (st.text(max_size=40)
        | st.lists(st.sampled_from(TOKENS) | st.text(max_size=4), max_size=10).map("".join))
GOLD = TEXT | st.none() | st.integers(-10, 10) | st.floats(allow_nan=True, allow_infinity=True)
CHOICES = st.lists(TEXT, max_size=5)
# TRL's conversational completion: messages whose content is text or a list of typed parts.
PART = st.fixed_dictionaries({"type": st.sampled_from(["text", "image"]), "text": TEXT | st.none()})
MESSAGE = st.fixed_dictionaries({"role": st.just("assistant"), "content": TEXT | st.lists(PART, max_size=2)})


def _in_unit(values: list, n: int, may_be_missing: bool = True) -> None:
    assert isinstance(values, list) and len(values) == n
    for v in values:
        if v is None:
            assert may_be_missing
        else:
            assert isinstance(v, float) and 0.0 <= v <= 1.0


@FAST
@given(TEXT)
def test_text_extraction(text):
    boxed = vr.extract_boxed(text)
    assert boxed is None or (isinstance(boxed, str) and "\\boxed" in text)
    answer = vr.extract_answer(text)
    assert answer is None or isinstance(answer, str)
    assert isinstance(vr.normalize_answer(text), str)
    final = grading.extract_final_answer(text)
    assert final is None or (isinstance(final, str) and final)


@FAST
@given(TEXT | st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True))
def test_parse_number(value):
    parsed = vr.parse_number(value)
    if parsed is not None:
        number, is_percent = parsed
        assert isinstance(number, float) and math.isfinite(number) and isinstance(is_percent, bool)


@FAST
@given(TEXT, GOLD)
def test_numbers_match(prediction, gold):
    assert vr.numbers_match(prediction, gold) in (None, True, False)


@FAST
@given(TEXT, st.sampled_from(["ABCDE", "ABCD", "AB", "ABCDEFGHIJ"]),
       st.dictionaries(st.sampled_from("ABCDE"), TEXT))
def test_extract_choice(text, letters, options):
    letter = vr.extract_choice(text, letters, options)
    assert letter is None or letter in letters or letter in options


@FAST
@given(TEXT, CHOICES)
def test_extract_choice_letter(output, choices):
    letter = grading.extract_choice_letter(output, choices)
    allowed = "".join(chr(ord("A") + i) for i in range(min(len(choices) or 10, 26)))
    assert letter is None or (len(letter) == 1 and letter in allowed)


@MEDIUM
@given(st.lists(TEXT | st.lists(MESSAGE, max_size=2), min_size=1, max_size=4), st.data())
def test_format_rewards_and_numeric(completions, data):
    n = len(completions)
    answers = data.draw(st.lists(GOLD, min_size=n, max_size=n))
    for fn in (vr.format_think_answer, vr.format_answer, vr.format_boxed):
        values = fn([""] * n, completions, answer=answers)
        _in_unit(values, n, may_be_missing=False)
        assert set(values) <= {0.0, 1.0}
    _in_unit(vr.numeric([""] * n, completions, answer=answers), n)
    choices = data.draw(st.lists(CHOICES | st.none(), min_size=n, max_size=n))
    _in_unit(vr.multiple_choice([""] * n, completions, answer=answers, choices=choices), n)


@SLOW
@given(st.lists(TEXT, min_size=1, max_size=3), st.data())
def test_accuracy_rewards(completions, data):
    n = len(completions)
    answers = data.draw(st.lists(TEXT | st.none(), min_size=n, max_size=n))
    for fn in (vr.accuracy, vr.r1_default, vr.r1_default_boxed):
        _in_unit(fn([""] * n, completions, answer=answers), n)


@SLOW
@given(TEXT, TEXT, st.sampled_from(grading.ANSWER_TYPES), CHOICES | st.none(),
       st.none() | st.integers(0, 4) | st.just(float("nan")),
       st.none() | st.sampled_from(["cm", "°", "", "$", "\\"]))
def test_grade(output, answer, answer_type, choices, precision, unit):
    result = grading.grade(output, answer, answer_type, choices, precision, unit, timeout_seconds=1)
    assert isinstance(result.correct, bool)
    assert result.extracted is None or isinstance(result.extracted, str)
    if result.extracted is None:
        assert not result.correct


@SLOW
@given(st.lists(TEXT, min_size=1, max_size=3), st.data())
def test_benchmark_accuracy(completions, data):
    n = len(completions)
    column = st.lists(TEXT | st.none(), min_size=n, max_size=n)
    kinds = data.draw(st.lists(st.sampled_from([*grading.ANSWER_TYPES, None]), min_size=n, max_size=n))
    _in_unit(benchmark_accuracy([""] * n, completions, answer=data.draw(column), answer_type=kinds,
                                choices=data.draw(st.lists(CHOICES | st.none(), min_size=n, max_size=n))), n)


# --- image generation: rule rewards on random images ---------------------------------------------

SPECS = [(category, spec) for category in CATEGORIES for spec in category_specs(category)[:12]]
COLOURS = np.array([*PALETTE.values(), (255, 255, 255), (0, 0, 0)], dtype=np.uint8)


@st.composite
def images(draw: st.DrawFn):
    """A random grid of palette colours (what the rules classify), or the rendering of a real spec."""
    if draw(st.booleans()):
        _, spec = draw(st.sampled_from(SPECS))
        return render_spec(spec, size=draw(st.sampled_from([24, 32])), seed=draw(st.integers(0, 9)))
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    picks = np.random.default_rng(draw(st.integers(0, 2**16))).integers(0, len(COLOURS), (h, w))
    image = COLOURS[picks]
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255.0 if draw(st.booleans()) else image


@MEDIUM
@given(st.lists(st.tuples(images(), st.sampled_from(SPECS)), min_size=1, max_size=3))
def test_image_rule_rewards(samples):
    completions = [image for image, _ in samples]
    specs = [spec for _, (_, spec) in samples]
    n = len(samples)
    for fn in (gen_rewards.geneval_rules, gen_rewards.colour_fraction, gen_rewards.object_count,
               gen_rewards.relative_position, gen_rewards.object_shape):
        _in_unit(fn([""] * n, completions, spec=specs), n)
    for image, (category, spec) in samples:
        assert check_image(image, spec, category) in (True, False)
