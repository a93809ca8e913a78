"""Evaluation is data-parallel under `accelerate launch` (each process takes every N-th item, results are
gathered with accelerate): two CPU processes give the same predictions as one. Runs real subprocesses."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.launching import accelerate_command, default_env
from vision.modeling import VisionModelConfig, load_model_and_processor


def _launch(args: list[str], processes: int, cwd) -> subprocess.CompletedProcess:
    cmd, env = accelerate_command(args, processes, default_env())
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tinyvl")
    model, processor = load_model_and_processor(VisionModelConfig(min_pixels=3136, max_pixels=12544, dtype="float32"))
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_mmrl_eval_on_two_processes_matches_one(model_dir, tmp_path):
    common = ["-m", "mmrl.cli", "eval", "--model", str(model_dir), "--benchmarks", "synthetic_single_shape",
              "--limit", "10", "--max-new-tokens", "4", "--batch-size", "4"]
    _launch([*common, "--output", str(tmp_path / "one")], 1, tmp_path)
    out = _launch([*common, "--output", str(tmp_path / "two")], 2, tmp_path)
    assert out.stdout.count("| synthetic_single_shape | 10 |") == 1  # printed by the main process only
    one, two = ([json.loads(line) for line in (tmp_path / name / "predictions.jsonl").read_text().splitlines()]
                for name in ("one", "two"))
    assert [r["id"] for r in two] == [r["id"] for r in one] and len(two) == 10  # every item once, in order
    assert [r["outputs"] for r in two] == [r["outputs"] for r in one]  # greedy: the same answers
    summaries = [json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "two")]
    assert summaries[0] == summaries[1]


def test_trainer_evaluation_is_sharded_and_gathered(tmp_path):
    script = tmp_path / "eval_once.py"
    script.write_text(textwrap.dedent(f"""
        import json
        from accelerate import PartialState
        from mmrl.config import load_config
        from mmrl.trainer import Trainer
        from vision import task
        cfg = load_config({str(Path(__file__).resolve().parents[1] / "configs/vision/demo.yaml")!r}, [
            "output_dir={tmp_path / 'run'}", "data.max_eval_samples=10", "eval.batch_size=4",
            "sampling.max_new_tokens=4", "eval.max_new_tokens=4", "logging.progress_bar=false",
            "logging.report_to=[jsonl]", "mixed_precision='no'"], section_types=task.SECTION_TYPES)
        built = task.build(cfg)
        trainer = Trainer(cfg, built.policy, built.train_dataset, built.eval_dataset)
        metrics = trainer.evaluate()
        if PartialState().is_main_process:
            print("METRICS " + json.dumps(metrics))
        trainer.close()
    """))
    results = []
    for processes in (1, 2):
        out = _launch([str(script)], processes, tmp_path)
        lines = [line for line in out.stdout.splitlines() if line.startswith("METRICS ")]
        assert len(lines) == 1
        results.append(json.loads(lines[0][len("METRICS "):]))
    assert results[0]["num_samples"] == results[1]["num_samples"] == 10.0
    assert results[0] == results[1]
