"""vision.evaluate: scoring-only mode end to end (exact numbers, unknown ids, missing outputs), run configs
and the CLI, generation with the tiny Qwen2.5-VL (k samples, avg@k / pass@k, a bad image), and a benchmark
as the held-out set evaluated during training."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from test_benchmarks import geometry3k_copy, mathvista_copy  # fixtures in the benchmarks' real schemas

from mmrl.config import ConfigError, EvalConfig, LoggingConfig, RewardConfig, TrainConfig
from mmrl.logger import read_metrics
from mmrl.policy import Sampling
from mmrl.trainer import Trainer
from vision import task
from vision.data import VisionDataConfig
from vision.evaluate import UNMATCHED, cli_main, evaluate, load_eval_config, read_predictions
from vision.modeling import VisionModelConfig, load_model_and_processor
from vision.policy import VisionPolicy
from vision.sft import ColdStartConfig

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

COLOURS = ("red", "green", "blue", "yellow")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def policy():
    model, processor = load_model_and_processor(VisionModelConfig(min_pixels=3136, max_pixels=12544, dtype="float32"))
    return VisionPolicy(model.eval(), processor)


@contextlib.contextmanager
def colour_bias(policy: VisionPolicy, value: float = 30.0):
    """Every sampled token is (almost surely) one of the colour words, so some answers are right."""
    ids = [policy.tokenizer.encode(c) for c in COLOURS]
    assert all(len(i) == 1 for i in ids)

    head = policy.model.get_output_embeddings()
    project = head.forward

    def biased(hidden):  # the head's forward, which generation and scoring both call (vision.output_head)
        output = project(hidden).clone()
        output[..., [i[0] for i in ids]] += value
        return output

    head.forward = biased
    try:
        yield
    finally:
        del head.forward


# ------------------------------------------------------------------------------------------ scoring mode


def test_scoring_only_mode_end_to_end(tmp_path, caplog):
    data = mathvista_copy(tmp_path / "MathVista")  # pids 1..5: choice (B), integer 7 cm, float, list, integer 3
    predictions = write_jsonl(tmp_path / "preds.jsonl", [
        {"id": "1", "outputs": ["The answer is B.", "(A)"]},  # right, wrong
        {"id": 2, "outputs": ["\\boxed{7}", "\\boxed{7 cm}"]},  # an int id; both right
        {"id": "3", "output": None},  # a row without output
        # pid 4: no row at all
        {"id": "5", "outputs": ["\\boxed{2}"]},  # one output of two: the second counts as wrong
        {"id": "999", "output": "B"},  # matches no item
        {"id": "1", "benchmark": "geometry3k", "output": "x"},  # another benchmark's row: not this run's
    ])
    out = tmp_path / "out"
    rc = cli_main(["--benchmarks", "mathvista", "--data", f"mathvista={data}", "--predictions", str(predictions),
                   "--output", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    s = summary["mathvista"]
    # per item avg@2: 1 -> 0.5, 2 -> 1, 3/4/5/999 -> 0; pass@2: items 1 and 2 -> 2 of 6
    assert (s["n"], s["errors"], s["missing"], s["unknown_ids"], s["incomplete"]) == (6, 0, 2, 1, 1)
    assert s["accuracy"] == pytest.approx(1.5 / 6) and s["avg@2"] == pytest.approx(1.5 / 6)
    assert s["pass@2"] == pytest.approx(2 / 6)
    by = s["breakdowns"]
    assert by["question_type"] == {"free_form": {"accuracy": 0.25, "n": 4, "pass@2": 0.25},
                                   "multi_choice": {"accuracy": 0.5, "n": 1, "pass@2": 1.0}}
    assert by["skills"]["arithmetic"] == {"accuracy": pytest.approx(1.5 / 4), "n": 4, "pass@2": 0.5}
    assert by["answer_type"]["integer"]["n"] == 2

    rows = {r["id"]: r for r in read_predictions(out / "predictions.jsonl")}
    assert set(rows) == {"1", "2", "3", "4", "5", "999"}
    assert rows["1"]["correct"] == [True, False] and rows["1"]["extracted"] == ["B", "A"]
    assert rows["2"]["correct"] == [True, True] and rows["2"]["answer"] == "7"
    assert (rows["3"]["error"], rows["4"]["error"], rows["999"]["error"]) == ("no output", "no prediction", "unknown id")
    assert "B. red" in rows["1"]["prompt"] and rows["999"]["outputs"] == ["B"]
    markdown = (out / "summary.md").read_text()
    assert "| mathvista | 6 | 25.0 | 33.3 (k=2) | 0 | 2 | 1 |" in markdown
    assert "| multi_choice | 1 | 50.0 |" in markdown
    warnings = caplog.text
    assert "1 scored wrong for no prediction: 4" in warnings and "1 scored wrong for unknown id: 999" in warnings
    assert "1 items have fewer than 2 outputs" in warnings


def test_scoring_rows_without_benchmark_that_match_nothing(tmp_path):
    predictions = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "single_shape-0", "output": "<answer>blue</answer>"}, {"id": "nope", "output": "red"}])
    summary = evaluate(None, "synthetic_single_shape,synthetic_count_shapes", predictions=str(predictions), limit=2,
                       output=str(tmp_path / "out"))
    assert summary[UNMATCHED] == {"n": 1, "ids": ["nope"]}
    assert summary["synthetic_single_shape"]["missing"] == 1 and summary["synthetic_count_shapes"]["missing"] == 2
    assert summary["synthetic_single_shape"]["unknown_ids"] == 0
    assert "1 prediction rows matched no benchmark item" in (tmp_path / "out" / "summary.md").read_text()


# -------------------------------------------------------------------------------------- config and CLI


def test_run_config_yaml_flags_and_errors(tmp_path, capsys):
    config = tmp_path / "eval.yaml"
    config.write_text("model: tiny-qwen2.5-vl\nbenchmarks: geometry3k, mathvista\nk: 4\ntemperature: 0.7\n"
                      "data: {mathvista: /data/MathVista}\nlimit: 10\n")
    cfg = load_eval_config(config, {"k": 1, "data": {"geometry3k": "/data/geo"}})
    assert cfg.benchmarks == ["geometry3k", "mathvista"] and (cfg.k, cfg.temperature, cfg.limit) == (1, 0.7, 10)
    assert cfg.data == {"mathvista": "/data/MathVista", "geometry3k": "/data/geo"}
    config.write_text("model: x\nbenchmarks: [geometry3k]\ntemprature: 1.0\n")
    with pytest.raises(ConfigError, match="Did you mean 'temperature'"):
        load_eval_config(config)
    with pytest.raises(ConfigError, match="need temperature > 0"):
        load_eval_config(None, {"model": "x", "benchmarks": "geometry3k", "k": 2, "temperature": 0.0})
    with pytest.raises(ConfigError, match="give a model"):
        load_eval_config(None, {"benchmarks": "geometry3k"})
    assert cli_main(["--model", "tiny-qwen2.5-vl", "--benchmarks", "geometry3k,mathvist"]) == 2
    assert "unknown benchmark 'mathvist'" in capsys.readouterr().err
    assert cli_main(["--model", "m", "--benchmarks", "geometry3k", "--data", "geometry3k"]) == 2
    assert "NAME=PATH" in capsys.readouterr().err


def test_shipped_eval_configs_load():
    paths = sorted((Path(__file__).resolve().parents[1] / "configs" / "eval").glob("*.y*ml"))
    assert paths
    for path in paths:
        cfg = load_eval_config(path)
        assert cfg.benchmarks and cfg.model


# ------------------------------------------------------------------------------------ with the tiny model


def test_tiny_model_k_samples_avg_and_pass_at_k(policy, tmp_path):
    out = tmp_path / "out"
    with colour_bias(policy):
        summary = evaluate(policy, ["synthetic_single_shape"], k=2, limit=6, max_new_tokens=1, batch_size=4,
                           output=str(out), progress_bar=False, seed=3)
    s = summary["synthetic_single_shape"]
    rows = read_predictions(out / "predictions.jsonl")
    assert len(rows) == 6 and all(len(r["outputs"]) == 2 and set(r["outputs"]) <= set(COLOURS) for r in rows)
    per_item = torch.tensor([r["correct"] for r in rows], dtype=torch.float)
    assert 0 < per_item.sum() < per_item.numel()  # the numbers below are not all zeros or ones
    assert s["accuracy"] == pytest.approx(per_item.mean().item()) and s["avg@2"] == s["accuracy"]
    assert s["pass@2"] == pytest.approx(per_item.max(dim=1).values.mean().item()) and s["pass@2"] >= s["avg@2"]
    assert (s["n"], s["errors"], s["samples_per_item"]) == (6, 0, 2)
    assert sum(b["n"] for b in s["breakdowns"]["answer"].values()) == 6
    assert json.loads((out / "summary.json").read_text()) == summary
    assert "synthetic_single_shape | 6 |" in (out / "summary.md").read_text()


def test_tiny_model_bad_images_are_counted_errors(policy, tmp_path):
    """An undecodable image fails when its record is built; a 300x1 image fails inside generate (aspect
    ratio), taking its batch down: the batch is retried item by item and only that item is an error."""
    data = geometry3k_copy(tmp_path / "geo", bad_image=True, extreme_image=True)
    summary = evaluate(policy, ["geometry3k"], data={"geometry3k": str(data)}, max_new_tokens=2,
                       output=str(tmp_path / "out"), progress_bar=False)
    s = summary["geometry3k"]
    assert (s["n"], s["errors"], s["accuracy"]) == (3, 2, 0.0)
    rows = read_predictions(tmp_path / "out" / "predictions.jsonl")
    assert rows[0]["error"] is None and len(rows[0]["outputs"]) == 1
    assert rows[1]["error"].startswith("load error: image 0 cannot be decoded")
    assert rows[2]["error"].startswith("generation error: ValueError: image aspect ratio")


def test_benchmark_held_out_set_during_training(tmp_path):
    cfg = TrainConfig(
        output_dir=str(tmp_path), seed=0, max_steps=1, prompts_per_step=2, group_size=2, micro_batch_size=4,
        mixed_precision="no", save_final=False,
        model=VisionModelConfig(min_pixels=3136, max_pixels=12544, dtype="float32"),
        data=VisionDataConfig(train="synthetic:single_shape", eval="benchmark:synthetic_single_shape",
                              template="answer", max_train_samples=8, max_eval_samples=4),
        cold_start=ColdStartConfig(steps=0), rewards=[RewardConfig("format_answer")],
        sampling=Sampling(temperature=1.0, max_new_tokens=2),
        eval=EvalConfig(reward="benchmark_accuracy", every_steps=1, batch_size=4, max_new_tokens=2),
        logging=LoggingConfig(report_to=["jsonl"], progress_bar=False, log_completions=0))
    bundle = task.build(cfg)
    Trainer(cfg, bundle.policy, bundle.train_dataset, bundle.eval_dataset).train()
    logged = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "eval/accuracy" in r]
    assert len(logged) == 1 and logged[0]["eval/num_samples"] == 4.0 and logged[0]["eval/missing"] == 0.0
    assert 0.0 <= logged[0]["eval/accuracy"] <= 1.0
