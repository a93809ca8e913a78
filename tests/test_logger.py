"""Tests for :mod:`mmrl.logger`: metrics.jsonl rows, TensorBoard sink, report_to checks, reward plot."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mmrl.logger import MetricsLogger, plot_reward_curve, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_jsonl_rows(tmp_path):
    log = MetricsLogger(tmp_path / "run", report_to=["jsonl"])
    log.log({"reward": 0.5, "loss": torch.tensor(1.25), "count": 3, "kl": math.nan}, step=1)
    log.log({"reward": torch.tensor(float("nan")), "grad_norm": math.inf}, step=2)
    log.close()
    path = tmp_path / "run" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    rows = [json.loads(line) for line in lines]  # valid JSON: no bare NaN/Infinity
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()
    assert rows[0] == {"step": 1, "reward": 0.5, "loss": 1.25, "count": 3, "kl": None}
    assert rows[1] == {"step": 2, "reward": None, "grad_norm": None}
    assert read_metrics(path) == rows
    assert log.history == rows


def test_jsonl_written_even_with_none(tmp_path):
    log = MetricsLogger(tmp_path, report_to=["none"])
    log.log({"reward": 1.0}, step=0)
    log.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 0, "reward": 1.0}]


def test_resume_cuts_rows_after_the_checkpoint_step(tmp_path):
    log = MetricsLogger(tmp_path, report_to=["jsonl"])
    for step in (1, 2, 3):
        log.log({"reward": step / 10}, step=step)
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "rew')  # a row torn by SIGKILL mid-write
    log = MetricsLogger(tmp_path, report_to=["jsonl"], resume_step=2)  # the checkpoint was at step 2
    assert log.history == [{"step": 1, "reward": 0.1}, {"step": 2, "reward": 0.2}]
    log.log({"reward": 0.25}, step=3)
    log.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "reward": 0.1}, {"step": 2, "reward": 0.2},
                                                        {"step": 3, "reward": 0.25}]
    assert log.history == read_metrics(tmp_path / "metrics.jsonl")
    log = MetricsLogger(tmp_path, report_to=["jsonl"])  # a fresh run starts a fresh file
    log.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == []


def test_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    log = MetricsLogger(tmp_path, report_to=["jsonl", "tensorboard"])
    log.log({"reward": 0.5, "kl": math.nan, "note": "text"}, step=1)
    log.log({"reward": 0.75}, step=2)
    log.close()
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file was written"
    assert any(e.stat().st_size > 0 for e in events)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert "reward" in acc.Tags()["scalars"]
    assert [(e.step, e.value) for e in acc.Scalars("reward")] == [(1, 0.5), (2, 0.75)]
    assert "kl" not in acc.Tags()["scalars"]  # NaN is not sent


def test_no_tensorboard_unless_requested(tmp_path):
    MetricsLogger(tmp_path, report_to=["jsonl"]).close()
    assert not (tmp_path / "tensorboard").exists()


def test_unknown_report_to(tmp_path):
    with pytest.raises(ValueError) as info:
        MetricsLogger(tmp_path, report_to=["jsonl", "tensorbord"])
    message = str(info.value)
    assert "tensorbord" in message
    for valid in ("jsonl", "tensorboard", "wandb", "none"):
        assert valid in message


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC


def test_plot_reward_curve_png(tmp_path):
    rows = [{"step": i, "reward": 0.1 * i if i != 3 else None} for i in range(1, 15)]
    out = plot_reward_curve(rows, tmp_path / "curve.png", title="test", window=4)
    assert out == tmp_path / "curve.png"
    assert _is_png(out)
    assert out.stat().st_size > 1000


def test_plot_reward_curve_empty_and_other_key(tmp_path):
    assert _is_png(plot_reward_curve([], tmp_path / "empty.png"))
    rows = [{"step": 1, "accuracy": 0.2}, {"step": 2, "accuracy": 0.4}]
    assert _is_png(plot_reward_curve(rows, tmp_path / "acc.png", key="accuracy"))


def test_plot_from_logged_metrics(tmp_path):
    log = MetricsLogger(tmp_path, report_to=["jsonl"])
    for step in range(5):
        log.log({"reward": step / 4}, step=step)
    log.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert _is_png(plot_reward_curve(rows, tmp_path / "reward_curve.png"))
