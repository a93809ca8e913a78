"""AR-GRPO end to end through the one trainer and the CLI: the shipped tiny generator, rule rewards,
sample grids, the diversity metric, and bad input."""

from __future__ import annotations

import json
import math

import pytest

from mmrl.cli import main
from mmrl.config import load_config


def test_image_gen_cli_run_writes_grids_and_metrics(tmp_path, capsys):
    code = main(["train", "configs/image_gen/demo.yaml", f"output_dir={tmp_path}", "max_steps=3",
                 "data.num_eval=18", "logging.progress_bar=false", "logging.report_to=[jsonl]"])
    assert code == 0
    out = capsys.readouterr().out
    # the demo evaluates new samples of its training classes: never called "held-out"
    assert "eval-set (training conditions, new samples) geneval_rules before RL" in out and "after RL" in out
    assert "held-out" not in out
    for name in ("samples_before.png", "samples_after.png", "reward_curve.png", "metrics.jsonl", "summary.json"):
        assert (tmp_path / name).exists(), name
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    assert 0.0 < rows[0]["completions/group_diversity"] <= 1.0
    assert rows[0]["completions/mean_length"] == 64  # 8x8 image tokens, always all of them
    assert (tmp_path / "checkpoint-3" / "model" / "model.safetensors").exists()


def test_reward_rises_with_ar_grpo(tmp_path):
    from image_gen import task as image_task
    from mmrl.trainer import Trainer

    cfg = load_config("configs/image_gen/demo.yaml", [
        f"output_dir={tmp_path}", "max_steps=40", "optim.lr=3e-4", "model.logprob_mode=cfg",
        "logging.progress_bar=false", "save_final=false"], section_types=image_task.SECTION_TYPES)
    task = image_task.build(cfg)
    history = Trainer(cfg, task.policy, task.train_dataset).train()
    rewards = [row["reward"] for row in history]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last > first + 0.02, (first, last)


def test_unknown_class_id_is_a_clear_error():
    from image_gen import task as image_task
    from mmrl.policy import Sampling

    cfg = load_config("configs/image_gen/demo.yaml", ["data.prompts=classes", "data.class_ids=[3, 99]"],
                      section_types=image_task.SECTION_TYPES)
    with pytest.raises(ValueError, match=r"class_ids \[99\] outside the model's classes 0..17"):
        image_task.build(cfg)
    cfg = load_config("configs/image_gen/demo.yaml", ["data.prompts=classes", "data.class_ids=[3]"],
                      section_types=image_task.SECTION_TYPES)
    built = image_task.build(cfg)
    with pytest.raises(ValueError, match="class_id=99"):
        built.policy.generate(built.policy.model, [{"prompt": "x", "class_id": 99}], 2, Sampling())


def test_broken_reward_fails_at_start_up(tmp_path):
    from image_gen import task as image_task

    unknown = load_config("configs/image_gen/demo.yaml", ["rewards=[{name: object_count}, {name: nonexistent_reward}]"],
                          section_types=image_task.SECTION_TYPES)
    with pytest.raises(KeyError, match="nonexistent_reward"):
        image_task.build(unknown)
    bad = tmp_path / "bad_reward.py"
    bad.write_text("def broken(prompts, completions, **kw):\n    raise RuntimeError('model file missing')\n")
    raising = load_config("configs/image_gen/demo.yaml", [f"rewards=[{{name: '{bad}:broken'}}]"],
                          section_types=image_task.SECTION_TYPES)
    with pytest.raises(RuntimeError, match="dry-run"):
        image_task.build(raising)


def test_nan_reward_for_an_image_is_missing_counted_and_training_goes_on(tmp_path):
    """A reward that returns NaN for some images: those are missing (advantage 0), the fraction is logged."""
    reward_file = tmp_path / "flaky.py"
    reward_file.write_text(
        "def flaky(prompts, completions, **kw):\n"
        "    return [float('nan') if i % 4 == 0 else float(c[0].mean()) for i, c in enumerate(completions)]\n")
    code = main(["train", "configs/image_gen/demo.yaml", f"output_dir={tmp_path / 'run'}", "max_steps=2",
                 f"rewards=[{{name: {reward_file}:flaky}}]", f"eval.reward={reward_file}:flaky",
                 "eval.before_training=false", "data.num_eval=8", "logging.progress_bar=false",
                 "logging.report_to=[jsonl]", "save_final=false"])
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    assert all(row["reward_missing_frac"] == 0.25 for row in rows)  # every 4th image of 64
    assert all(math.isfinite(row["loss"]) and math.isfinite(row["reward"]) for row in rows)
