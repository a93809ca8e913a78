"""The registered benchmarks: each maps its dataset's real schema onto :class:`BenchmarkItem`.

Sources checked for each schema (column names, splits, configs) are named next to its adapter. Where a
schema could not be checked against a dataset card or a reference evaluator, the comment says so and the
adapter reads the columns defensively.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Sequence
from typing import Any

from mmrl.data import BadSample
from vision.benchmarks.core import Benchmark, BenchmarkItem, register_benchmark

LETTERS = "ABCDEFGHIJKLMNOP"
CHOICE_HINT = "Answer with the option's letter from the given choices."
# An option line inside question text: "A. 2", "B: 3", "(C) 4", "D、5" (MathVerse, MMK12, We-Math).
_OPTION = re.compile(r"^\s*\(?([A-H])\)?\s*[.:：、)]\s*(.*?)\s*$")
_IMAGE_REF = re.compile(r"<image (\d+)>")


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _number(value: Any) -> int | None:
    # MathVista stores precision as float64, NaN where it does not apply.
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return int(value)


def format_choices(choices: Sequence[str]) -> str:
    return "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))


def parse_options(text: str) -> tuple[str, list[str]]:
    """(stem, option texts) of question text with one "A. ..." option per line (or "; "-separated);
    no options: (text, [])."""
    stem, options = [], {}
    for line in re.split(r"\n|;\s*(?=\(?[A-H]\)?\s*[.:：、)])", text):
        match = _OPTION.match(line)
        if match and (match.group(1) == LETTERS[len(options)]):  # options run A, B, C... in order
            options[match.group(1)] = match.group(2)
        elif not options:
            stem.append(line)
    if len(options) < 2:
        return text.strip(), []
    return "\n".join(stem).strip(), list(options.values())


def _choice_or(answer: str, choices: Sequence[str], fallback: str) -> str:
    # A single option letter is a choice question; anything else (several letters, free text) is not.
    return "choice" if re.fullmatch(r"[A-H]", answer) and (not choices or LETTERS.index(answer) < len(choices)) \
        else fallback


def _row_id(row: dict, index: int, keys: Sequence[str]) -> str:
    for key in keys:
        if row.get(key) not in (None, ""):
            return str(row[key])
    return str(index)


# ------------------------------------------------------------------------------------------ geometry3k
# hiyouga/geometry3k (EasyR1's format; dataset card): splits train/validation/test; columns images (list),
# problem (with one "<image>" placeholder), answer (e.g. "15", "2\\sqrt{3}").


def _geometry3k(row: dict, index: int) -> BenchmarkItem:
    return BenchmarkItem(id=str(index), question=_text(row["problem"]), answers=(_text(row["answer"]),),
                         answer_type="math", images=tuple(row.get("images") or ()))


# ------------------------------------------------------------------------------------------- mathvista
# AI4Math/MathVista dataset card + lmms-eval tasks/mathvista: split testmini; pid, question, image (a path),
# decoded_image (Image), choices (list or None), unit, precision (float64), answer (the option *text* for
# multi_choice), question_type multi_choice/free_form, answer_type text/integer/float/list,
# metadata {category, context, grade, img_height, img_width, language, skills (list), source, split, task}.

_MATHVISTA_HINTS = {"integer": "Answer with a single integer.", "list": "Answer with a Python list, e.g. [1, 2, 3]."}


def _mathvista(row: dict, index: int) -> BenchmarkItem:
    choices = [str(c) for c in row.get("choices") or []]
    answer, precision, unit = _text(row["answer"]), _number(row.get("precision")), _text(row.get("unit")) or None
    question = _text(row["question"]) + (f" (Unit: {unit})" if unit else "")
    if row.get("question_type") == "multi_choice" and answer in choices:
        answer_type, answer = "choice", LETTERS[choices.index(answer)]  # graded by letter, texts as choices
        question += "\n" + format_choices(choices) + "\n" + CHOICE_HINT
    else:
        kind = row.get("answer_type")
        answer_type = {"integer": "number", "float": "number", "list": "list"}.get(kind, "text")
        hint = _MATHVISTA_HINTS.get(kind) or (f"Answer with a number rounded to {precision} decimal place"
                                             f"{'s' if precision > 1 else ''}." if kind == "float" and precision else "")
        question += "\n" + hint if hint else ""
        choices = []
    image = row.get("decoded_image") or row.get("image")
    meta = row.get("metadata") or {}
    categories = {"question_type": row.get("question_type"), "answer_type": row.get("answer_type"),
                  **{k: meta.get(k) for k in ("category", "context", "grade", "language", "skills", "source", "task")}}
    return BenchmarkItem(id=_text(row["pid"]), question=question, answers=(answer,), answer_type=answer_type,
                         images=(image,) if image else (), choices=tuple(choices) or None, precision=precision,
                         unit=unit, categories=categories)


# ------------------------------------------------------------------------------------------- mathverse
# AI4Math/MathVerse dataset card (config testmini, split testmini) + lmms-eval tasks/mathverse: sample_index,
# problem_index, problem_version, question (multi-choice questions list "Choices:\nA:...\nB:..." inline),
# image, answer (the letter for multi-choice), question_type multi-choice/free-form,
# metadata {split, source, subject, subfield}, query_wo, query_cot (question_for_eval only in lmms-lab's copy).
# The "Vision Only" version has an empty question (it is drawn in the image); query_wo then carries the
# instruction, so it is used instead.


def _mathverse(row: dict, index: int) -> BenchmarkItem:
    question, answer = _text(row.get("question")) or _text(row.get("query_wo")), _text(row["answer"])
    stem, choices = parse_options(question.replace("Choices:", "\n"))
    answer_type = _choice_or(answer, choices, "math") if row.get("question_type") == "multi-choice" else "math"
    if answer_type == "choice":
        question = (stem + "\n" + format_choices(choices) if choices else question) + "\n" + CHOICE_HINT
    meta = row.get("metadata") or {}
    return BenchmarkItem(id=_text(row["sample_index"]), question=question, answers=(answer,), answer_type=answer_type,
                         images=(row["image"],) if row.get("image") else (), choices=tuple(choices) or None,
                         categories={"problem_version": row.get("problem_version"),
                                     "question_type": row.get("question_type"),
                                     "subject": meta.get("subject"), "subfield": meta.get("subfield")})


# ------------------------------------------------------------------------------------------ logicvista
# lscpku/LogicVista, split test, as lmms-eval's tasks/logicvista reads it: question (options inline),
# image, answer (option letter(s)). NOT verified against a dataset card: the id and category columns are
# guesses (first present of the names below), and multi-letter answers are graded as text.


def _logicvista(row: dict, index: int) -> BenchmarkItem:
    question, answer = _text(row["question"]), _text(row["answer"])
    _, choices = parse_options(question)
    answer_type = _choice_or(answer, choices, "text")
    categories = {k: row.get(k) for k in ("skill", "category", "reasoning_type") if row.get(k) is not None}
    return BenchmarkItem(id=_row_id(row, index, ("id", "question_id", "index")), question=question + "\n" + CHOICE_HINT,
                         answers=(answer,), answer_type=answer_type, images=(row["image"],) if row.get("image") else (),
                         choices=tuple(choices) or None, categories=categories)


# ---------------------------------------------------------------------------------------------- wemath
# We-Math/We-Math, split testmini, as lmms-eval's tasks/wemath reads it (+ a re-upload's dataset_info.json):
# ID, split, "knowledge concept", question, option (one string, e.g. "A. 3; B. 4; ..." - the separator is
# not verified), answer (letter), image_path (Image), key (1step / 2steps_1 / 3steps_multi...),
# "question number", "knowledge concept description". Several sub-questions share one ID, hence ID + key.


def _wemath(row: dict, index: int) -> BenchmarkItem:
    option, answer = _text(row.get("option")), _text(row["answer"])
    _, choices = parse_options(option)
    key = _text(row.get("key"))
    return BenchmarkItem(id=f"{_text(row['ID'])}@{key}" if key else _text(row["ID"]),
                         question=f"{_text(row['question'])}\n{option}\n{CHOICE_HINT}", answers=(answer,),
                         answer_type=_choice_or(answer, choices, "text"),
                         images=(row["image_path"],) if row.get("image_path") else (), choices=tuple(choices) or None,
                         categories={"knowledge concept": row.get("knowledge concept"),
                                     "steps": key.split("_")[0] if key else None})


# ----------------------------------------------------------------------------------------- clevr_count
# BUAADreamer/clevr_count_70k (EasyR1's example config; dataset viewer): splits train (70k) / test (200);
# columns images, problem ("<image>How many ...?"), answer (an integer).


def _clevr_count(row: dict, index: int) -> BenchmarkItem:
    return BenchmarkItem(id=str(index), question=_text(row["problem"]), answers=(_text(row["answer"]),),
                         answer_type="number", images=tuple(row.get("images") or ()))


# ----------------------------------------------------------------------------------------------- mmk12
# FanqingM/MMK12 (MM-Eureka's eval set; lmms-eval's mmk12 task notes): split test, 2,000 multiple-choice
# questions (500 each math/physics/chemistry/biology); id, subject, question (options inline, one "A. ..."
# per line), answer (the letter), image.


def _mmk12(row: dict, index: int) -> BenchmarkItem:
    question, answer = _text(row["question"]), _text(row["answer"])
    _, choices = parse_options(question)
    answer_type = _choice_or(answer, choices, "math")
    return BenchmarkItem(id=_row_id(row, index, ("id",)), question=question + ("\n" + CHOICE_HINT
                                                                            if answer_type == "choice" else ""),
                         answers=(answer,), answer_type=answer_type, images=(row["image"],) if row.get("image") else (),
                         choices=tuple(choices) or None, categories={"subject": row.get("subject")})


# ------------------------------------------------------------------------------------------------ mmmu
# MMMU/MMMU dataset card + lmms-eval tasks/mmmu: one config per subject (30), split validation; id
# ("validation_<Subject>_<n>"), question with "<image k>" references, options (a *string* repr of a list),
# explanation, image_1..image_7, img_type, answer (a letter; for open questions a value, sometimes a list
# repr of accepted values), topic_difficulty, question_type multiple-choice/open, subfield.

MMMU_SUBJECTS = (
    "Accounting", "Agriculture", "Architecture_and_Engineering", "Art", "Art_Theory", "Basic_Medical_Science",
    "Biology", "Chemistry", "Clinical_Medicine", "Computer_Science", "Design", "Diagnostics_and_Laboratory_Medicine",
    "Economics", "Electronics", "Energy_and_Power", "Finance", "Geography", "History", "Literature", "Manage",
    "Marketing", "Materials", "Math", "Mechanical_Engineering", "Music", "Pharmacy", "Physics", "Psychology",
    "Public_Health", "Sociology",
)


def _literal_list(text: str) -> list[str] | None:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    return [str(v) for v in value] if isinstance(value, list) else None


def _mmmu_images(text: str, row: dict) -> tuple[str, list]:
    """Each ``<image k>`` becomes an ``<image>`` placeholder at its first mention (later mentions stay text)."""
    images: list = []
    seen: dict[str, int] = {}

    def place(match: re.Match) -> str:
        k = match.group(1)
        if k in seen:
            return f"(image {k})"
        source = row.get(f"image_{k}")
        if source is None:
            raise BadSample(f"the question refers to <image {k}> but image_{k} is empty")
        seen[k] = len(images)
        images.append(source)
        return "<image>"

    return _IMAGE_REF.sub(place, text), images


def _mmmu(row: dict, index: int) -> BenchmarkItem:
    item_id, answer = _text(row["id"]), _text(row["answer"])
    options = _literal_list(_text(row.get("options"))) or []
    question = _text(row["question"])
    answers = tuple(_literal_list(answer) or [answer])  # a few answers list every accepted value
    if row.get("question_type") == "multiple-choice" and options:
        question += "\n" + format_choices(options) + "\n" + CHOICE_HINT
        answer_type = "choice"
    else:
        answer_type, options = ("number" if all(_is_number(a) for a in answers) else "text"), []
    question, images = _mmmu_images(question, row)
    subject = re.sub(r"^[a-z]+_|_\d+$", "", item_id)  # validation_Art_Theory_12 -> Art_Theory
    return BenchmarkItem(id=item_id, question=question, answers=answers, answer_type=answer_type, images=tuple(images),
                         choices=tuple(options) or None,
                         categories={"subject": subject, "subfield": row.get("subfield"),
                                     "question_type": row.get("question_type"),
                                     "topic_difficulty": row.get("topic_difficulty")})


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------------------------------- synthetic
# vision.synthetic tasks, held-out ("test") split, seed 0, 112-px images: EasyR1 rows (images, problem,
# answer, task, choices = the closed answer vocabulary, not lettered options).


def _synthetic_adapter(task: str):
    def adapt(row: dict, index: int) -> BenchmarkItem:
        answer = _text(row["answer"])
        return BenchmarkItem(id=f"{task}-{index}", question=_text(row["problem"]), answers=(answer,),
                             answer_type="number" if _is_number(answer) else "text", images=tuple(row["images"]),
                             categories={"answer": answer})
    return adapt


def _synthetic_rows(task: str):
    def make(count: int) -> list[dict]:
        from vision.synthetic import make_synthetic

        return make_synthetic(task, split="test", num_samples=count, seed=0)
    return make


def _register_all() -> None:
    mc = ("question_type",)
    for spec in (
        Benchmark("geometry3k", _geometry3k, "hiyouga/geometry3k", "test", source="hiyouga/geometry3k card; EasyR1"),
        Benchmark("mathvista", _mathvista, "AI4Math/MathVista", "testmini",
                  breakdowns=(*mc, "answer_type", "category", "context", "grade", "language", "skills", "source", "task"),
                  source="AI4Math/MathVista card; lmms-eval tasks/mathvista"),
        Benchmark("mathverse", _mathverse, "AI4Math/MathVerse", "testmini", configs=("testmini",),
                  breakdowns=("problem_version", *mc, "subject", "subfield"), exclude_files=("*text*only*",),
                  source="AI4Math/MathVerse card; lmms-eval tasks/mathverse"),
        Benchmark("logicvista", _logicvista, "lscpku/LogicVista", "test", breakdowns=("skill", "category", "reasoning_type"),
                  source="lmms-eval tasks/logicvista (card not verified)"),
        Benchmark("wemath", _wemath, "We-Math/We-Math", "testmini", breakdowns=("knowledge concept", "steps"),
                  source="lmms-eval tasks/wemath (option format not verified)"),
        Benchmark("clevr_count", _clevr_count, "BUAADreamer/clevr_count_70k", "test",
                  source="EasyR1 examples; dataset viewer"),
        Benchmark("mmk12", _mmk12, "FanqingM/MMK12", "test", breakdowns=("subject",),
                  source="MM-Eureka eval set; lmms-eval mmk12 notes"),
        Benchmark("mmmu", _mmmu, "MMMU/MMMU", "validation", configs=MMMU_SUBJECTS,
                  breakdowns=("subject", *mc, "topic_difficulty", "subfield"), source="MMMU/MMMU card; lmms-eval tasks/mmmu"),
    ):
        register_benchmark(spec)
    from vision.describe_scene import SCENE_COLUMN_TASKS  # cheap: PIL only
    from vision.synthetic import available_synthetic_tasks

    # Scene-column tasks (describe_scene) have no exact answer to match: a description is scored by the
    # factuality reward against the scene, so they are no benchmark here, whatever the import order.
    for task in sorted(set(available_synthetic_tasks()) - SCENE_COLUMN_TASKS):
        register_benchmark(Benchmark(f"synthetic_{task}", _synthetic_adapter(task), None, "test", template="answer",
                                     breakdowns=("answer",), source="vision.synthetic", make_rows=_synthetic_rows(task)))


_register_all()
