"""vision.benchmarks: every loader on a small local copy in its benchmark's real schema (parquet with
embedded image bytes as HF datasets writes it, jsonl with image paths, a save_to_disk folder), the
registry's errors, the benchmark_accuracy reward and a benchmark as the training held-out set.

Also the scripts in ``bench/``: none writes a tracked file unless given ``--write``."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import datasets
import pytest
from PIL import Image

from mmrl.data import BadSample
from vision.benchmarks import (
    BenchmarkError,
    BenchmarkRecords,
    available_benchmarks,
    benchmark_accuracy,
    get_benchmark,
    grade_answer,
    item_record,
    load_benchmark,
)
from vision.data import VisionDataConfig, build_datasets

RED, BLUE, GREEN = (220, 30, 30), (30, 70, 220), (30, 160, 50)
IMAGE = datasets.Image()
TEXT = datasets.Value("string")


def png(colour=RED, size=(28, 20)) -> dict:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def write_parquet(path: Path, rows: list[dict], features: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows, features=datasets.Features(features)).to_parquet(str(path))
    return path


def image_parts(record: dict) -> int:
    return sum(p["type"] == "image" for m in record["prompt"] if m["role"] == "user" for p in m["content"])


# ------------------------------------------------------------------------------------------ fixtures
# Each writes the benchmark's columns (see vision/benchmarks/specs.py for the sources) in its Hub layout.


def mathvista_copy(root: Path) -> Path:
    meta = {"category": TEXT, "context": TEXT, "grade": TEXT, "img_height": datasets.Value("int64"),
            "img_width": datasets.Value("int64"), "language": TEXT, "skills": datasets.Sequence(TEXT),
            "source": TEXT, "split": TEXT, "task": TEXT}
    features = {"pid": TEXT, "question": TEXT, "image": TEXT, "decoded_image": IMAGE, "choices": datasets.Sequence(TEXT),
                "unit": TEXT, "precision": datasets.Value("float64"), "answer": TEXT, "question_type": TEXT,
                "answer_type": TEXT, "metadata": meta, "query": TEXT}

    def row(pid, question, answer, qtype, atype, choices=None, unit=None, precision=None, image=RED, skills=("arithmetic",)):
        return {"pid": pid, "question": question, "image": f"images/{pid}.png",
                "decoded_image": png(image) if image else None, "choices": choices, "unit": unit,
                "precision": precision, "answer": answer, "question_type": qtype, "answer_type": atype,
                "metadata": {"category": "math-targeted-vqa", "context": "bar chart", "grade": "daily life",
                             "img_height": 20, "img_width": 28, "language": "english", "skills": list(skills),
                             "source": "FigureQA", "split": "testmini", "task": "figure question answering"},
                "query": "Hint: ...\nQuestion: " + question}

    rows = [row("1", "Which colour is the bar?", "red", "multi_choice", "text", ["blue", "red", "green"],
                skills=("arithmetic", "statistical")),
            row("2", "How long is the side?", "7", "free_form", "integer", unit="cm"),
            row("3", "What is the ratio?", "1.5", "free_form", "float", precision=1.0, skills=("algebraic",)),
            row("4", "Which values?", "[1, 2]", "free_form", "list", precision=float("nan")),
            row("5", "How many bars?", "3", "free_form", "integer", image=None)]  # image from the path column
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (30, 30), GREEN).save(root / "images" / "5.png")
    write_parquet(root / "data" / "testmini-00000-of-00001.parquet", rows, features)
    write_parquet(root / "data" / "test-00000-of-00001.parquet", rows[:1], features)  # another split
    return root


def geometry3k_copy(root: Path, bad_image: bool = False, extreme_image: bool = False) -> Path:
    """Two test items; ``bad_image``: the second image is not an image; ``extreme_image``: a third item whose
    image decodes but has an aspect ratio Qwen's resizing rejects (it fails inside generation)."""
    features = {"images": datasets.Sequence(IMAGE), "problem": TEXT, "answer": TEXT}
    test = [{"images": [png(RED)], "problem": "<image>Find x. Round to the nearest tenth.", "answer": "2\\sqrt{3}"},
            {"images": [{"bytes": b"not a png", "path": None} if bad_image else png(BLUE)],
             "problem": "In the figure <image> find y.", "answer": "15"}]
    if extreme_image:
        test.append({"images": [png(GREEN, size=(300, 1))], "problem": "<image>Find z.", "answer": "1"})
    write_parquet(root / "data" / "test-00000-of-00001.parquet", test, features)
    write_parquet(root / "data" / "train-00000-of-00001.parquet", test[:1] * 3, features)
    return root


# ------------------------------------------------------------------------------------------- registry


def test_registry_names_and_unknown_benchmark():
    names = available_benchmarks()
    for name in ("geometry3k", "mathvista", "mathverse", "logicvista", "wemath", "clevr_count", "mmk12", "mmmu",
                 "synthetic_single_shape", "synthetic_count_shapes", "synthetic_arithmetic",
                 "synthetic_colour_at_position"):
        assert name in names
    with pytest.raises(BenchmarkError, match=r"Did you mean 'mathvista'\?.*'geometry3k'"):
        get_benchmark("mathvist")
    with pytest.raises(BenchmarkError, match="does not exist"):
        load_benchmark("mathvista", "/nonexistent/MathVista")


def test_describe_scene_is_no_benchmark_whatever_the_import_order():
    # describe_scene registers itself as a synthetic task when imported; imported before vision.benchmarks
    # it used to become "synthetic_describe_scene", a benchmark exact-matching a free-text description
    import os
    import subprocess
    import sys

    code = ("import vision.describe_scene, vision.benchmarks as b; names = b.available_benchmarks(); "
            "assert 'synthetic_describe_scene' not in names and 'synthetic_count_shapes' in names, names")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "synthetic_describe_scene" not in available_benchmarks()


def test_offline_error_names_the_local_copy_option(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'AI4Math/MathVista' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(BenchmarkError) as info:
        load_benchmark("mathvista")
    message = str(info.value)
    assert "AI4Math/MathVista" in message and "testmini" in message and "ConnectionError" in message
    assert "--data mathvista=/path/to/MathVista" in message


def test_mmmu_hub_load_concatenates_the_30_subject_configs(monkeypatch):
    calls = []

    def fake_load(hub_id, config, split):
        calls.append((hub_id, config, split))
        return datasets.Dataset.from_list([{"id": f"validation_{config}_1", "question": "Why?", "options": "['a', 'b']",
                                            "answer": "A", "question_type": "multiple-choice", "subfield": "x"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    data = load_benchmark("mmmu", limit=40)
    assert len(calls) == 30 and {c[0] for c in calls} == {"MMMU/MMMU"} and {c[2] for c in calls} == {"validation"}
    assert len(data) == 30 and data[29].categories["subject"] == "Sociology"
    assert data[0].id == "validation_Accounting_1" and data[0].categories["subject"] == "Accounting"


# -------------------------------------------------------------------------------------------- loaders


def test_geometry3k_reads_only_the_test_split(tmp_path):
    data = load_benchmark("geometry3k", geometry3k_copy(tmp_path))
    assert len(data) == 2  # train-*.parquet is not read
    first, second = data[0], data[1]
    assert (first.id, first.answers, first.answer_type) == ("0", ("2\\sqrt{3}",), "math")
    record = item_record(data, second)
    assert [p["type"] for p in record["prompt"][0]["content"]] == ["text", "image", "text"]
    assert record["prompt"][0]["content"][0]["text"] == "In the figure"
    assert record["images"][0].getpixel((0, 0)) == BLUE and record["answer_type"] == "math"
    assert grade_answer("so y = \\boxed{15}", second.answers, second.answer_type).correct


def test_mathvista_schema(tmp_path):
    data = load_benchmark("mathvista", mathvista_copy(tmp_path))
    assert len(data) == 5  # testmini only
    mc, integer, flt, lst, by_path = (data[i] for i in range(5))
    assert (mc.id, mc.answers, mc.answer_type, mc.choices) == ("1", ("B",), "choice", ("blue", "red", "green"))
    assert "A. blue\nB. red\nC. green" in mc.question
    assert mc.categories["skills"] == ["arithmetic", "statistical"] and mc.categories["context"] == "bar chart"
    for output, right in (("The answer is B.", True), ("\\boxed{red}", True), ("\\boxed{A}", False)):
        assert grade_answer(output, mc.answers, mc.answer_type, mc.choices).correct is right
    assert (integer.answer_type, integer.unit, integer.precision) == ("number", "cm", None)
    assert "(Unit: cm)" in integer.question and "single integer" in integer.question
    assert (flt.answer_type, flt.precision) == ("number", 1)
    assert grade_answer("\\boxed{1.53}", flt.answers, "number", precision=flt.precision).correct
    assert (lst.answer_type, lst.precision) == ("list", None)  # NaN precision means none
    record = item_record(data, by_path)
    assert record["images"][0].size == (30, 30) and record["images"][0].getpixel((1, 1)) == GREEN


def test_mathverse_schema_skips_text_only_file(tmp_path):
    meta = {"split": TEXT, "source": TEXT, "subject": TEXT, "subfield": TEXT}
    features = {"sample_index": TEXT, "problem_index": TEXT, "problem_version": TEXT, "question": TEXT, "image": IMAGE,
                "answer": TEXT, "question_type": TEXT, "metadata": meta, "query_wo": TEXT, "query_cot": TEXT,
                "question_for_eval": TEXT}

    def row(index, version, question, answer, qtype, image=True):
        return {"sample_index": index, "problem_index": "1", "problem_version": version, "question": question,
                "image": png() if image else None, "answer": answer, "question_type": qtype,
                "metadata": {"split": "testmini", "source": "GeoQA", "subject": "plane geometry", "subfield": "angle"},
                "query_wo": "According to the question shown in the image, answer with the option letter.",
                "query_cot": "...", "question_for_eval": question}

    rows = [row("1", "Text Dominant", "Find the angle.\nChoices:\nA:30°\nB:45°\nC:60°\nD:90°", "B", "multi-choice"),
            row("2", "Vision Only", "", "C", "multi-choice"),
            row("3", "Text Lite", "Find the ratio of AB to BC.", "\\frac{3}{4}", "free-form")]
    write_parquet(tmp_path / "testmini.parquet", rows, features)
    write_parquet(tmp_path / "testmini_text_only.parquet", [row("9", "Text Only", "x?", "1", "free-form", False)],
                  features)
    data = load_benchmark("mathverse", tmp_path)
    assert [data[i].id for i in range(len(data))] == ["1", "2", "3"]
    text_dominant, vision_only, free = data[0], data[1], data[2]
    assert text_dominant.choices == ("30°", "45°", "60°", "90°") and text_dominant.answer_type == "choice"
    assert text_dominant.question.startswith("Find the angle.\nA. 30°\nB. 45°")
    assert vision_only.choices is None and vision_only.answer_type == "choice"
    assert vision_only.question.startswith("According to the question shown in the image")
    assert free.answer_type == "math" and free.categories["problem_version"] == "Text Lite"
    assert grade_answer("\\boxed{0.75}", free.answers, free.answer_type).correct


def test_logicvista_wemath_clevr_mmk12(tmp_path):
    write_parquet(tmp_path / "logicvista" / "test.parquet",
                  [{"question": "Which shape comes next?\nA. circle\nB. square\nC. triangle\nD. star", "image": png(),
                    "answer": "C", "skill": "inductive"}],
                  {"question": TEXT, "image": IMAGE, "answer": TEXT, "skill": TEXT})
    item = load_benchmark("logicvista", tmp_path / "logicvista")[0]
    assert (item.id, item.answer_type, item.choices, item.categories) == (
        "0", "choice", ("circle", "square", "triangle", "star"), {"skill": "inductive"})

    wemath_rows = [{"ID": "1", "split": "testmini", "knowledge concept": "Angles", "question": "What is the angle?",
                    "option": "A. 30°; B. 45°; C. 60°; D. No correct answer", "answer": answer, "image_path": png(),
                    "key": key, "question number": 1, "knowledge concept description": "..."}
                   for key, answer in (("2steps_1", "A"), ("2steps_multi", "B"))]
    write_parquet(tmp_path / "wemath" / "testmini-00000-of-00001.parquet", wemath_rows,
                  {"ID": TEXT, "split": TEXT, "knowledge concept": TEXT, "question": TEXT, "option": TEXT,
                   "answer": TEXT, "image_path": IMAGE, "key": TEXT, "question number": datasets.Value("int64"),
                   "knowledge concept description": TEXT})
    wemath = load_benchmark("wemath", tmp_path / "wemath")
    assert [wemath[i].id for i in range(2)] == ["1@2steps_1", "1@2steps_multi"]
    assert wemath[1].choices == ("30°", "45°", "60°", "No correct answer") and wemath[1].answer == "B"
    assert wemath[0].categories == {"knowledge concept": "Angles", "steps": "2steps"}

    # clevr_count as one jsonl file with image paths relative to it
    (tmp_path / "clevr" / "imgs").mkdir(parents=True)
    Image.new("RGB", (40, 30), BLUE).save(tmp_path / "clevr" / "imgs" / "a.png")
    (tmp_path / "clevr" / "test.jsonl").write_text(json.dumps(
        {"images": ["imgs/a.png"], "problem": "<image>How many objects are there?", "answer": "3"}) + "\n")
    clevr = load_benchmark("clevr_count", tmp_path / "clevr" / "test.jsonl")
    record = item_record(clevr, clevr[0])
    assert clevr[0].answer_type == "number" and record["images"][0].size == (40, 30)
    assert grade_answer("There are <answer>3</answer>", clevr[0].answers, "number").correct

    # MMK12 as a save_to_disk DatasetDict
    mmk12 = datasets.Dataset.from_list(
        [{"id": "mmk12-7", "subject": "physics", "question": "Which is larger?\nA. 1\nB. 2\nC. 3\nD. 4", "answer": "D",
          "image": png(GREEN)}], features=datasets.Features({"id": TEXT, "subject": TEXT, "question": TEXT,
                                                              "answer": TEXT, "image": IMAGE}))
    datasets.DatasetDict({"test": mmk12}).save_to_disk(str(tmp_path / "mmk12"))
    item = load_benchmark("mmk12", tmp_path / "mmk12")[0]
    assert (item.id, item.answer, item.choices, item.categories) == ("mmk12-7", "D", ("1", "2", "3", "4"),
                                                                    {"subject": "physics"})


def test_mmmu_images_by_reference_and_list_answers(tmp_path):
    features = {"id": TEXT, "question": TEXT, "options": TEXT, "explanation": TEXT,
                **{f"image_{k}": IMAGE for k in range(1, 8)}, "img_type": TEXT, "answer": TEXT,
                "topic_difficulty": TEXT, "question_type": TEXT, "subfield": TEXT}

    def row(item_id, question, options, answer, qtype, images):
        return {"id": item_id, "question": question, "options": options, "explanation": "", "img_type": "['Tables']",
                "answer": answer, "topic_difficulty": "Easy", "question_type": qtype, "subfield": "Sub",
                **{f"image_{k}": images.get(k) for k in range(1, 8)}}

    write_parquet(tmp_path / "Accounting" / "validation-00000-of-00001.parquet", [
        row("validation_Accounting_1", "<image 1> Compare with <image 2>. Which is bigger? See <image 1> again.",
            "['$63,020', '$58,410']", "A", "multiple-choice", {1: png(RED), 2: png(BLUE)})], features)
    write_parquet(tmp_path / "Math" / "validation-00000-of-00001.parquet", [
        row("validation_Math_3", "<image 1> What is x?", "[]", "['1.5', '1.50']", "open", {1: png(GREEN)}),
        row("validation_Math_4", "What is <image 2>?", "[]", "2", "open", {1: png(GREEN)})], features)
    write_parquet(tmp_path / "Math" / "dev-00000-of-00001.parquet", [
        row("dev_Math_1", "x?", "[]", "1", "open", {})], features)
    data = load_benchmark("mmmu", tmp_path)
    assert len(data) == 3  # the dev file is another split
    mc, open_q = data[0], data[1]
    assert mc.question.startswith("<image> Compare with <image>. Which is bigger? See (image 1) again.\nA. $63,020")
    record = item_record(data, mc)
    assert image_parts(record) == 2 and [im.getpixel((0, 0)) for im in record["images"]] == [RED, BLUE]
    assert mc.categories["subject"] == "Accounting" and mc.choices == ("$63,020", "$58,410")
    assert (open_q.answers, open_q.answer_type, open_q.categories["subject"]) == (("1.5", "1.50"), "number", "Math")
    with pytest.raises(BadSample, match="image_2 is empty"):
        data[2]


# ------------------------------------------------------------------------------------- records, rewards


def test_bad_image_is_a_bad_sample(tmp_path):
    data = load_benchmark("geometry3k", geometry3k_copy(tmp_path, bad_image=True))
    item_record(data, data[0])  # the good one loads
    with pytest.raises(BadSample, match="cannot be decoded"):
        item_record(data, data[1])
    with pytest.raises(BadSample, match="geometry3k item '1'"):
        BenchmarkRecords(data)[1]


def test_benchmark_accuracy_reward_grades_with_each_items_rule(tmp_path):
    data = load_benchmark("mathvista", mathvista_copy(tmp_path))
    records = [item_record(data, data[i]) for i in (0, 2, 2)]
    columns = {k: [r[k] for r in records] for k in records[0] if k not in ("prompt", "images")}
    completions = ["I pick (B)", "<answer>1.46</answer>", "<answer>1.7</answer>"]
    assert benchmark_accuracy([r["prompt"] for r in records], completions, **columns) == [1.0, 1.0, 0.0]
    # a record without benchmark columns has no opinion
    assert benchmark_accuracy([None], ["B"], answer=["B"]) == [None]


def test_benchmark_as_training_held_out_set(tmp_path):
    cfg = VisionDataConfig(train="synthetic:single_shape", eval="benchmark:mathvista",
                           eval_benchmark_path=str(mathvista_copy(tmp_path)), max_eval_samples=3,
                           max_train_samples=4, template="answer", system_prompt="Be brief.")
    _, held_out = build_datasets(cfg)
    assert isinstance(held_out, BenchmarkRecords) and len(held_out) == 3
    record = held_out[0]
    assert record["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert record["prompt"][1]["content"][-1]["text"].endswith("Answer with <answer>...</answer>.")
    assert (record["answer"], record["answer_type"], record["choices"]) == ("B", "choice", ["blue", "red", "green"])
    columns = {k: [v] for k, v in record.items() if k not in ("prompt", "images")}
    assert benchmark_accuracy([None, None], ["<answer>B</answer>", "<answer>red</answer>"],
                              **{k: v * 2 for k, v in columns.items()}) == [1.0, 1.0]


# ----------------------------------------------------------------------------------- bench/ scripts

ROOT = Path(__file__).resolve().parents[1]
BENCH_SCRIPTS = sorted(p for p in (ROOT / "bench").glob("*.py") if not p.name.startswith("_"))  # _x.py: shared helpers


def load_bench(path: Path):
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tracked_outputs() -> dict[str, bytes]:
    """The tracked files a benchmark may write when asked: BENCHMARKS.md and docs/."""
    files = [ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("**/*"))]
    return {str(f): f.read_bytes() for f in files if f.is_file()}


@pytest.mark.parametrize("script", BENCH_SCRIPTS, ids=lambda p: p.name)
def test_bench_scripts_write_only_when_asked(script):
    bench = load_bench(script)
    assert hasattr(bench, "parse_args"), f"{script.name}: expose parse_args(argv) with a --write flag"
    assert bench.parse_args([]).write is False
    assert bench.parse_args(["--write"]).write is True


def test_memory_slope_fit_and_section():
    bench = load_bench(ROOT / "bench" / "memory_slope.py")
    rss = {step: 700.0 + 0.02 * step + (0.5 if step % 2 else -0.5) * (step < 5) for step in range(0, 201)}
    assert bench.slope_per_100(rss, 20, 200) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="two samples"):
        bench.slope_per_100(rss, 200, 200)
    text = "# Benchmarks\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"
    once = bench.update_section(text, "## Memory\n\nfirst")
    assert once.startswith(text) and once.count("<!-- memory_slope:start -->") == 1 and "first" in once
    twice = bench.update_section(once + "tail\n", "## Memory\n\nsecond")
    assert "first" not in twice and "second" in twice and twice.startswith(text) and twice.endswith("tail\n")
    assert twice.count("<!-- memory_slope:end -->") == 1
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "10", "--warmup", "10"])


def test_memory_slope_smoke_writes_nothing_without_write(tmp_path, monkeypatch):
    """Two real RL steps of the demo config, shrunk: numbers come back, no tracked file changes."""
    bench = load_bench(ROOT / "bench" / "memory_slope.py")
    target = tmp_path / "BENCHMARKS.md"
    monkeypatch.setattr(bench, "BENCHMARKS", target)
    monkeypatch.chdir(tmp_path)
    before = tracked_outputs()
    result = bench.main(["--steps", "2", "--warmup", "1", "prompts_per_step=2", "group_size=2",
                         "data.max_train_samples=8", "data.max_eval_samples=4", "logging.report_to=[jsonl]"])
    assert result["rss_last_mib"] > 0 and result["rss_warmup_mib"] > 0
    assert not target.exists() and list(tmp_path.iterdir()) == []
    assert tracked_outputs() == before


def test_memory_slope_write_replaces_its_section(tmp_path, monkeypatch):
    bench = load_bench(ROOT / "bench" / "memory_slope.py")
    target = tmp_path / "BENCHMARKS.md"
    target.write_text("# Benchmarks\n\n| date | what |\n|---|---|\n| x | y |\n")
    monkeypatch.setattr(bench, "BENCHMARKS", target)
    monkeypatch.setattr(bench, "measure", lambda config, steps, overrides, cold_start=False: (
        {s: 600.0 + 0.05 * s for s in range(steps + 1)}, "fake"))
    for _ in range(2):
        bench.main(["--steps", "40", "--warmup", "10", "--write"])
    text = target.read_text()
    assert text.startswith("# Benchmarks\n\n| date | what |\n|---|---|\n| x | y |\n")
    assert text.count("<!-- memory_slope:start -->") == 1 and text.count("<!-- memory_slope:end -->") == 1
    assert "`python bench/memory_slope.py --steps 40 --warmup 10 --write`" in text
    assert "600.5 MiB | 602.0 MiB | **+5.00 MiB / 100 steps**" in text


def test_history_rows_go_into_their_own_section_not_the_end_of_the_file():
    """papo_step_time / cfg_kv_cache keep one row per run: rows are added inside their section, so a later
    section of BENCHMARKS.md never ends up with another benchmark's rows under it."""
    sections = load_bench(ROOT / "bench" / "_sections.py")
    heading = "## PAPO\n\n| date | ratio |\n|---|---|"
    text = sections.append_row("# Benchmarks\n", "papo", heading, "| d1 | 1.0 |")
    text = sections.update_section(text, "## Other\n\n| x |\n|---|\n| 9 |", "other")  # a section after it
    text = sections.append_row(text, "papo", heading, "| d2 | 1.1 |")
    papo = text.split("<!-- papo:start -->")[1].split("<!-- papo:end -->")[0]
    assert papo.strip().splitlines()[-2:] == ["| d1 | 1.0 |", "| d2 | 1.1 |"] and papo.count("## PAPO") == 1
    assert text.rstrip().endswith("<!-- other:end -->") and "| d2 |" not in text.split("<!-- other:start -->")[1]
