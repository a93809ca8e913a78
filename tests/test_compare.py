"""``mmrl compare``: the table's numbers from hand-made run folders, errors before anything runs, reuse and
resumption of runs (with a stand-in for the training subprocess), and one real two-preset sweep."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from mmrl import compare
from mmrl.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs/vision/demo.yaml")


def fake_run(directory: Path, before: float, after: float, rewards: list[float], lengths: list[float],
             times: list[float], updates: int = 1) -> None:
    """A run folder as ``mmrl train`` leaves it: ``summary.json`` and ``metrics.jsonl`` with ``updates``
    optimizer rows per rollout step (``step_time`` grows within the step) and one evaluation row."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "summary.json").write_text(json.dumps({"accuracy_before": before, "accuracy_after": after,
                                                        "wall_time_s": 1.0}))
    rows, step = [], 0
    for i, (reward, length, seconds) in enumerate(zip(rewards, lengths, times), 1):
        for u in range(1, updates + 1):
            step += 1
            rows.append({"step": step, "rollout_step": i, "reward": reward, "completions/mean_length": length,
                         "step_time": seconds * u / updates})
        if i == len(rewards) // 2:
            rows.append({"step": step, "eval/accuracy": 0.9})  # no reward: not a point of the curve
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def constant_run(directory: Path, after: float, reward: float, length: float, time: float) -> None:
    fake_run(directory, 0.25, after, [reward] * 20, [length] * 20, [time] * 20)


def record(output_dir: Path, preset: str, seed: int, status: str = "finished") -> dict:
    directory = compare.run_dir(output_dir, preset, seed)
    out = {"preset": preset, "seed": seed, "status": status, "dir": str(directory), "returncode": None,
           "log": str(directory / compare.RUN_LOG)}
    if status == "failed":
        return {**out, "returncode": 1}
    return {**out, **compare.run_numbers(directory)}


# ---------------------------------------------------------------------------------------------- numbers


def test_run_numbers_use_last_update_of_each_rollout_step(tmp_path):
    # 20 rollout steps, 2 updates each: the last 10% is 2 steps; step_time is the rollout step's full time
    fake_run(tmp_path, 0.25, 0.5, [0.0] * 18 + [0.4, 0.6], [5.0] * 18 + [10.0, 12.0], [1.0] * 19 + [9.0], updates=2)
    numbers = compare.run_numbers(tmp_path)
    assert numbers["steps"] == 20 and [s for s, _ in numbers["curve"]] == list(range(1, 21))
    assert numbers["final_reward"] == pytest.approx(0.5)
    assert numbers["mean_length"] == pytest.approx(11.0)
    assert numbers["step_time"] == pytest.approx(1.0)  # the median, not 0.5 (the first update's time)
    assert (numbers["accuracy_before"], numbers["accuracy_after"]) == (0.25, 0.5)


def test_table_numbers_from_hand_made_runs(tmp_path):
    fake_run(compare.run_dir(tmp_path, "grpo", 0), 0.25, 0.5, [0.0] * 18 + [0.4, 0.6], [5.0] * 18 + [10.0, 12.0],
             [0.5] * 20, updates=2)
    fake_run(compare.run_dir(tmp_path, "grpo", 1), 0.25, 0.7, [0.0] * 18 + [0.6, 0.8], [5.0] * 18 + [12.0, 14.0],
             [1.5] * 20)
    for seed in (0, 1):
        constant_run(compare.run_dir(tmp_path, "dapo", seed), [0.55, 0.75][seed], 0.2, 8.0, 2.0)
    constant_run(compare.run_dir(tmp_path, "gspo", 0), 0.4, 0.3, 6.0, 1.0)
    runs = [record(tmp_path, p, s) for p in ("grpo", "dapo") for s in (0, 1)]
    runs += [record(tmp_path, "gspo", 0), record(tmp_path, "gspo", 1, status="failed")]
    table = compare.aggregate(runs, ["grpo", "dapo", "gspo"])
    assert table["dapo"]["vs_grpo"] == pytest.approx(0.05) and table["gspo"]["vs_grpo"] == pytest.approx(-0.2)
    assert table["gspo"]["failed"] == [1] and table["gspo"]["seeds_finished"] == 1
    lines = compare.markdown("mmrl compare x.yaml --presets grpo,dapo,gspo", table, runs).splitlines()
    assert lines[3] == "mmrl compare x.yaml --presets grpo,dapo,gspo"
    assert lines[6] == ("| preset | seeds | held-out acc. before (%) | held-out acc. after (%) | vs grpo (points) "
                        "| final reward | mean length (tokens) | step time (s) |")
    assert lines[8] == "| grpo | 2/2 | 25.0 ± 0.0 | 60.0 ± 14.1 | — | 0.600 ± 0.141 | 12.0 ± 1.4 | 1.00 ± 0.71 |"
    assert lines[9] == "| dapo | 2/2 | 25.0 ± 0.0 | 65.0 ± 14.1 | +5.0 | 0.200 ± 0.000 | 8.0 ± 0.0 | 2.00 ± 0.00 |"
    assert lines[10] == "| gspo | 1/2 | 25.0 | 40.0 | -20.0 (not better) | 0.300 | 6.0 | 1.00 |"
    failed = compare.run_dir(tmp_path, "gspo", 1) / "train.log"
    assert f"- gspo seed 1: exit code 1, log `{failed}`" in lines


def test_table_without_grpo_has_no_comparison_column(tmp_path):
    constant_run(compare.run_dir(tmp_path, "dapo", 0), 0.5, 0.2, 8.0, 2.0)
    runs = [record(tmp_path, "dapo", 0)]
    text = compare.markdown("cmd", compare.aggregate(runs, ["dapo"]), runs)
    assert "vs grpo" not in text and "| dapo | 1/1 | 25.0 | 50.0 | 0.200 | 8.0 | 2.00 |" in text


# ---------------------------------------------------------------------------------------------- errors


def test_unknown_preset_fails_before_anything_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(compare, "execute", lambda *a: pytest.fail("a run started"))
    out = tmp_path / "cmp"
    code = main(["compare", DEMO, "--presets", "grpo,dapoo", "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "'dapoo' (did you mean 'dapo'?)" in err and "Valid presets:" in err and "'grpo'" in err
    assert not out.exists()


def test_bad_config_or_owned_override_fails_before_anything_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(compare, "execute", lambda *a: pytest.fail("a run started"))
    out = tmp_path / "cmp"
    assert main(["compare", DEMO, "optim.lrr=1", "--presets", "grpo,dapo", "--output-dir", str(out)]) == 2
    assert "optim.lrr" in capsys.readouterr().err
    assert main(["compare", DEMO, "seed=3", "--presets", "grpo", "--output-dir", str(out)]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert main(["compare", DEMO, "--presets", "grpo", "--seeds", "0,x", "--output-dir", str(out)]) == 2
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- reuse, resume


class FakeTrain:
    """Stands in for the ``mmrl train`` subprocess: records each command and writes a finished run (or
    fails for the (preset, seed) pairs in ``fail``)."""

    def __init__(self, fail: tuple = ()):
        self.commands: list[list[str]] = []
        self.fail = fail

    def __call__(self, command: list[str], log_path: Path, echo: bool) -> int:
        self.commands.append(command)
        values = dict(a.split("=", 1) for a in command if "=" in a)
        if (values["preset"], int(values["seed"])) in self.fail:
            return 1
        constant_run(Path(values["output_dir"]), 0.5, 0.2, 8.0, 2.0)
        return 0

    def presets(self) -> list[str]:
        return sorted(dict(a.split("=", 1) for a in c if "=" in a)["preset"] for c in self.commands)


def sweep(out: Path, force: bool = False) -> int:
    return compare.sweep(DEMO, ["max_steps=2"], ["grpo", "dapo"], [0, 1], out, "cmd", force=force)


def test_finished_runs_are_reused_and_the_rest_resume(tmp_path, monkeypatch):
    fake = FakeTrain()
    monkeypatch.setattr(compare, "execute", fake)
    out = tmp_path / "cmp"
    constant_run(compare.run_dir(out, "grpo", 0), 0.5, 0.2, 8.0, 2.0)  # finished by an earlier sweep
    stopped = compare.run_dir(out, "dapo", 1)
    constant_run(stopped, 0.5, 0.2, 8.0, 2.0)
    (stopped / "summary.json").write_text(json.dumps({"preempted_at_step": 1}))  # stopped: not finished
    assert sweep(out) == 0
    # the preempted run and the missing ones train, each continuing from its newest checkpoint if it has one
    assert fake.presets() == ["dapo", "dapo", "grpo"]
    assert all(c[-2:] == ["--resume", "latest"] for c in fake.commands)
    assert all(c[c.index("train") + 1] == DEMO and "max_steps=2" in c for c in fake.commands)
    runs = json.loads((out / "compare.json").read_text())["runs"]
    assert [(r["preset"], r["seed"], r["status"]) for r in runs] == [
        ("grpo", 0, "reused"), ("grpo", 1, "finished"), ("dapo", 0, "finished"), ("dapo", 1, "finished")]
    assert (out / "compare.md").read_text().startswith("# mmrl compare\n\n```\ncmd\n```")
    assert (out / "reward_curves.png").stat().st_size > 1000

    fake.commands.clear()
    assert sweep(out) == 0  # everything finished: nothing runs
    assert fake.commands == []
    assert sweep(out, force=True) == 0  # --force trains all four again, from scratch
    assert len(fake.commands) == 4 and all("--resume" not in c for c in fake.commands)


def test_failed_run_is_recorded_not_fatal(tmp_path, monkeypatch):
    fake = FakeTrain(fail=(("grpo", 1),))
    monkeypatch.setattr(compare, "execute", fake)
    out = tmp_path / "cmp"
    assert sweep(out) == 1
    assert len(fake.commands) == 4  # the sweep went on after the failure
    table = json.loads((out / "compare.json").read_text())["presets"]
    assert table["grpo"]["seeds_finished"] == 1 and table["grpo"]["failed"] == [1]
    text = (out / "compare.md").read_text()
    assert "| grpo | 1/2 |" in text and "- grpo seed 1: exit code 1, log" in text


def test_a_run_trained_with_another_config_is_not_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "execute", lambda *a: pytest.fail("a run started"))
    out = tmp_path / "cmp"
    directory = compare.run_dir(out, "dapo", 1)
    constant_run(directory, 0.5, 0.2, 8.0, 2.0)
    config = compare.validate(DEMO, ["max_steps=5"], ["dapo"], out)["dapo"]
    (directory / "config.json").write_text(json.dumps({**config, "seed": 1}))
    with pytest.raises(compare.ConfigError, match="max_steps: 5 in the run, 2 now"):
        sweep(out)


def test_an_unfinished_run_of_another_config_starts_again(tmp_path, monkeypatch, capsys):
    fake = FakeTrain()
    monkeypatch.setattr(compare, "execute", fake)
    out = tmp_path / "cmp"
    directory = compare.run_dir(out, "grpo", 0)
    directory.mkdir(parents=True)
    config = compare.validate(DEMO, ["max_steps=5"], ["grpo"], out)["grpo"]
    (directory / "config.json").write_text(json.dumps(config))  # crashed before its summary
    (directory / "checkpoint-1").mkdir()
    assert sweep(out) == 0
    assert "the stopped attempt had another config (max_steps: 5 in the run, 2 now); starting again" \
        in capsys.readouterr().out
    assert not (directory / "checkpoint-1").exists() and len(fake.commands) == 4


CHILD = """
import signal, sys, time
def stop(signum, frame):
    print("stopping after a checkpoint", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
time.sleep(60)
"""


def test_a_signal_to_the_sweep_reaches_the_run_once(tmp_path):
    log = tmp_path / "train.log"

    def send_when_ready() -> None:
        deadline = time.monotonic() + 60
        # the log's first line is the command, which contains the word too: wait for the line itself
        while "\nready\n" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)  # the sweep's own process, as a scheduler would

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=send_when_ready, daemon=True).start()
    with pytest.raises(compare.SweepStopped, match="SIGTERM.*exited with code 0"):
        compare.execute([sys.executable, "-c", CHILD], log, echo=False)
    assert "stopping after a checkpoint" in log.read_text()
    assert signal.getsignal(signal.SIGTERM) is before


# ---------------------------------------------------------------------------------------------- end to end

TINY = ["prompts_per_step=2", "group_size=4", "micro_batch_size=8", "cold_start.steps=0",
        "data.max_train_samples=16", "data.max_eval_samples=4", "eval.batch_size=4", "logging.report_to=[jsonl]",
        "mixed_precision='no'", "save_final=false", "filters.max_sample_batches=2"]


def test_compare_end_to_end(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", DEMO, *TINY, "--presets", "grpo,dapo", "--seeds", "0", "--output-dir", str(out),
                 "--max-steps", "2"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "[1/2] grpo seed 0: done" in printed and "[2/2] dapo seed 0: done" in printed
    text = (out / "compare.md").read_text()
    assert text in printed
    assert f"mmrl compare {DEMO} prompts_per_step=2" in text and "--presets grpo,dapo --seeds 0" in text
    assert "| grpo | 1/1 |" in text and "| dapo | 1/1 |" in text
    result = json.loads((out / "compare.json").read_text())
    for run in result["runs"]:
        assert run["status"] == "finished" and run["steps"] == 2
        for key in compare.NUMBERS:
            assert math.isfinite(run[key]), key
        assert "held-out accuracy after RL" in Path(run["log"]).read_text()
        config = json.loads((Path(run["dir"]) / "config.json").read_text())
        assert config["preset"] == run["preset"] and config["max_steps"] == 2
    assert result["runs"][1]["preset"] == "dapo"
    assert json.loads((Path(result["runs"][1]["dir"]) / "config.json").read_text())["algorithm"]["epsilon_high"] == 0.28
    assert (out / "reward_curves.png").stat().st_size > 1000
