"""``mmrl eval --judge``: the rules grade first, the judge reads only outputs in which they find no answer, and
the summary counts how many answers it read (``judged``); a garbage judge (the tiny random model) reads none."""

from __future__ import annotations

import json

import pytest

from vision.evaluate import cli_main, evaluate
from vision.synthetic import make_synthetic

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

BENCH = "synthetic_single_shape"


def predictions(tmp_path):
    gold = [r["answer"] for r in make_synthetic("single_shape", split="test", num_samples=3, seed=0)]
    wrong = next(c for c in ("red", "green", "blue", "yellow") if c != gold[2])
    rows = [
        {"id": "single_shape-0", "output": f"<answer>{gold[0]}</answer>"},  # the rules read it
        {"id": "single_shape-1", "output": f"Looking closely at the picture, I am confident it is {gold[1]} overall"},
        {"id": "single_shape-2", "output": f"Looking closely at the picture, I would say it looks {wrong} to me"},
    ]
    path = tmp_path / "preds.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, gold


def test_fake_judge_reads_only_what_the_rules_cannot(tmp_path):
    path, gold = predictions(tmp_path)
    seen = []

    def judge(texts, images):
        seen.extend(texts)
        assert images == [None] * len(texts)
        replies = []
        for text in texts:
            colour = next((c for c in ("red", "green", "blue", "yellow") if f"it is {c}" in text), None)
            replies.append(f"ANSWER: {colour}" if colour else "I don't know")  # garbage for the third
        return replies

    summary = evaluate(None, BENCH, predictions=str(path), limit=3, output=str(tmp_path / "out"), judge=judge)
    s = summary[BENCH]
    assert len(seen) == 2  # item 0 was decided by the rules
    assert s["judged"] == 1 and s["accuracy"] == pytest.approx(2 / 3)
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["judged"] for r in rows] == [[False], [True], [False]]
    assert [r["extracted"] for r in rows] == [[gold[0]], [gold[1]], [None]]


def test_without_judge_the_free_form_answers_are_wrong(tmp_path):
    path, _ = predictions(tmp_path)
    s = evaluate(None, BENCH, predictions=str(path), limit=3, output=None)[BENCH]
    assert s["judged"] == 0 and s["accuracy"] == pytest.approx(1 / 3)


def test_tiny_local_model_judge_from_the_cli(tmp_path):
    path, _ = predictions(tmp_path)
    out = tmp_path / "out"
    rc = cli_main(["--benchmarks", BENCH, "--predictions", str(path), "--limit", "3", "--output", str(out),
                   "--judge", "tiny-qwen2.5-vl"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())[BENCH]
    assert s["judged"] == 0 and s["accuracy"] == pytest.approx(1 / 3)  # random weights: garbage, no answers
