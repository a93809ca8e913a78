"""The ``mmrl`` command: config errors as one clear line (exit code 2), reward listing, and tiny real
``train`` / ``sft`` runs through :func:`mmrl.cli.main`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mmrl.cli import main
from vision.modeling import VisionModelConfig, load_model_and_processor

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

TINY = {
    "task": "vision",
    "seed": 0,
    "max_steps": 2,
    "prompts_per_step": 2,
    "group_size": 4,
    "micro_batch_size": 8,
    "mixed_precision": "no",
    "model": {"name_or_path": "tiny-qwen2.5-vl", "min_pixels": 3136, "max_pixels": 12544},
    "data": {"train": "synthetic:single_shape", "eval": "synthetic:single_shape", "template": "answer",
             "max_train_samples": 32, "max_eval_samples": 16, "synthetic_options": {"image_size": 56}},
    "cold_start": {"steps": 0, "lr": 2.0e-3, "batch_size": 8, "answer_format": "answer"},
    "rewards": [{"name": "accuracy", "weight": 1.0}, {"name": "format_answer", "weight": 0.1}],
    "sampling": {"temperature": 1.0, "max_new_tokens": 6},
    "optim": {"lr": 5.0e-4},
    "eval": {"reward": "accuracy", "batch_size": 16},
    "logging": {"report_to": ["jsonl"], "log_completions": 0, "progress_bar": False},
}


def write_config(tmp_path: Path, **changes) -> Path:
    config = json.loads(json.dumps(TINY))
    config["output_dir"] = str(tmp_path / "run")
    config.update(changes)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------------------------------------- errors


def test_unknown_override_key_names_nearest(tmp_path, capsys):
    code, out, err = run_main(capsys, "train", str(write_config(tmp_path)), "optim.lrr=1")
    assert code == 2
    assert "optim.lrr" in err and "'lr'" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_unknown_yaml_key_names_nearest(tmp_path, capsys):
    path = write_config(tmp_path)
    config = yaml.safe_load(path.read_text())
    config["max_step"] = config.pop("max_steps")
    path.write_text(yaml.safe_dump(config))
    code, _, err = run_main(capsys, "train", str(path))
    assert code == 2
    assert "max_step" in err and "Did you mean 'max_steps'" in err


def test_unknown_key_in_task_section(tmp_path, capsys):
    code, _, err = run_main(capsys, "sft", str(write_config(tmp_path)), "model.name_or_pth=x")
    assert code == 2
    assert "model.name_or_pth" in err and "'name_or_path'" in err


def test_bad_value_type(tmp_path, capsys):
    code, _, err = run_main(capsys, "train", str(write_config(tmp_path)), "max_steps=many")
    assert code == 2
    assert "max_steps" in err and "integer" in err


def test_missing_model_path(tmp_path, capsys):
    missing = tmp_path / "no_model_here"
    code, _, err = run_main(capsys, "train", str(write_config(tmp_path)), f"model.name_or_path={missing}")
    assert code == 2
    assert str(missing) in err and "does not exist" in err
    assert err.startswith("mmrl: error:") and "Traceback" not in err


def test_unknown_task_lists_tasks(tmp_path, capsys):
    code, _, err = run_main(capsys, "train", str(write_config(tmp_path, task="imagegen")))
    assert code == 2
    assert "imagegen" in err and "vision" in err
    code, _, err = run_main(capsys, "train", str(write_config(tmp_path)), "task=robotics")
    assert code == 2
    assert "robotics" in err and "vision" in err


def test_missing_config_file(tmp_path, capsys):
    code, _, err = run_main(capsys, "train", str(tmp_path / "nope.yaml"))
    assert code == 2
    assert "nope.yaml" in err


def test_sft_without_steps_is_an_error(tmp_path, capsys):
    code, _, err = run_main(capsys, "sft", str(write_config(tmp_path)))
    assert code == 2
    assert "cold_start.steps" in err


def test_verbose_reraises(tmp_path, capsys):
    with pytest.raises(ValueError, match="optim.lrr"):
        main(["-v", "train", str(write_config(tmp_path)), "optim.lrr=1"])


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


# ---------------------------------------------------------------------------------------------- commands


def test_rewards_lists_registered(capsys):
    code, out, _ = run_main(capsys, "rewards")
    assert code == 0
    names = out.split()
    assert "accuracy" in names and "r1_default" in names and "format_answer" in names
    assert names == sorted(names)


def test_train_tiny_run(tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, err = run_main(capsys, "train", str(write_config(tmp_path)), "max_steps=2", "cold_start.steps=2",
                              "data.max_train_samples=32", "data.max_eval_samples=16", f"output_dir={out_dir}")
    assert code == 0, err
    assert "held-out accuracy before RL" in out and "held-out accuracy after RL" in out
    assert "cold start: 2 SFT steps" in out
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all("reward" in r for r in rows)
    summary = json.loads((out_dir / "summary.json").read_text())
    for key in ("accuracy_before", "accuracy_after", "accuracy_gain", "sft/final_loss", "wall_time_s"):
        assert key in summary, key
    assert 0.0 <= summary["accuracy_before"] <= 1.0 and 0.0 <= summary["accuracy_after"] <= 1.0
    assert (out_dir / "reward_curve.png").stat().st_size > 1000
    config = json.loads((out_dir / "config.json").read_text())
    assert config["max_steps"] == 2 and config["cold_start"]["steps"] == 2
    assert config["data"]["max_eval_samples"] == 16
    assert (out_dir / "checkpoint-2" / "model" / "config.json").is_file()  # save_final


def test_sft_writes_model_loadable_by_path(tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, err = run_main(capsys, "sft", str(write_config(tmp_path)), "cold_start.steps=2",
                              f"output_dir={out_dir}")
    assert code == 0, err
    sft_dir = out_dir / "sft"
    assert str(sft_dir) in out
    model, processor = load_model_and_processor(VisionModelConfig(name_or_path=str(sft_dir), dtype="float32"))
    fresh, _ = load_model_and_processor(VisionModelConfig(dtype="float32"))
    trained, initial = model.state_dict(), fresh.state_dict()
    assert set(trained) == set(initial)
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)  # SFT changed the weights
    assert type(processor).__name__.startswith("ImageOnly")
    assert not (out_dir / "metrics.jsonl").exists()  # no RL


def test_console_script_is_installed():
    exe = shutil.which("mmrl") or str(Path(sys.executable).parent / "mmrl")
    assert Path(exe).exists(), "the `mmrl` console script is not installed (pip install -e .)"
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "sft" in result.stdout and "rewards" in result.stdout
