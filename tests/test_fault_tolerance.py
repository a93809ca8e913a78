"""What a run does when things go wrong: a crash during a save, a damaged checkpoint, rotation, a stop
signal, a non-finite loss or gradient, an infinite reward. The bit-exact kill-and-resume trials are in
tests/test_resume_kill.py."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from mmrl import checkpoint
from mmrl.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, verify_checkpoint
from mmrl.config import LoggingConfig, OptimConfig, RewardConfig, TrainConfig
from mmrl.faults import NonFiniteUpdates, StopRequest, UpdateGuard
from mmrl.policy import Sampling
from mmrl.trainer import Trainer
from vision import task
from vision.data import VisionDataConfig
from vision.modeling import VisionModelConfig
from vision.sft import ColdStartConfig

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
ROOT = Path(__file__).resolve().parents[1]


def make_config(output_dir: Path, **changes) -> TrainConfig:
    cfg = TrainConfig(
        output_dir=str(output_dir), seed=0, max_steps=3, prompts_per_step=2, group_size=4, micro_batch_size=8,
        mixed_precision="no", save_steps=1, save_final=True,
        model=VisionModelConfig(min_pixels=3136, max_pixels=12544, dtype="float32"),
        data=VisionDataConfig(train="synthetic:single_shape", template="answer", max_train_samples=16,
                              synthetic_options={"image_size": 56}),
        cold_start=ColdStartConfig(steps=0), rewards=[RewardConfig("accuracy", 1.0)],
        sampling=Sampling(temperature=1.0, max_new_tokens=4), optim=OptimConfig(lr=1e-3),
        logging=LoggingConfig(report_to=["jsonl"], progress_bar=False, log_completions=0))
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


def dense_reward(prompts, completions, **kwargs):
    return [float(sum(map(ord, c)) % 5) / 4 for c in completions]


def make_trainer(cfg: TrainConfig, reward=dense_reward) -> Trainer:
    bundle = task.build(cfg)
    return Trainer(cfg, bundle.policy, bundle.train_dataset, reward_funcs=[reward])


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


# ---------------------------------------------------------------------------------------------- checkpoints


def test_crash_during_save_keeps_previous_checkpoint_and_latest(tmp_path, monkeypatch):
    trainer = make_trainer(make_config(tmp_path, max_steps=2))
    real = checkpoint.write_manifest

    def crash_on_second(root, step):
        if step == 2:
            raise OSError("disk full (simulated)")
        real(root, step)

    monkeypatch.setattr(checkpoint, "write_manifest", crash_on_second)
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1"]
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-1"
    assert not (tmp_path / "checkpoint-2").exists()
    assert (tmp_path / ".tmp-checkpoint-2").is_dir()  # the half-written save, never named like a checkpoint
    verify_checkpoint(tmp_path / "checkpoint-1")

    monkeypatch.setattr(checkpoint, "write_manifest", real)
    resumed = make_trainer(make_config(tmp_path, max_steps=2, resume_from="latest"))
    assert resumed.rollout_step == 1 and not (tmp_path / ".tmp-checkpoint-2").exists()  # stale staging removed
    resumed.train()
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-2"


def test_damaged_checkpoint_is_an_error_naming_the_file(tmp_path):
    make_trainer(make_config(tmp_path, max_steps=1)).train()
    ckpt = tmp_path / "checkpoint-1"
    verify_checkpoint(ckpt)
    weights_file = ckpt / "model" / "model.safetensors"
    original = weights_file.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0x01  # one flipped bit in the weights
    weights_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model/model.safetensors is damaged"):
        verify_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="model.safetensors is damaged"):
        make_trainer(make_config(tmp_path, max_steps=2, resume_from="latest"))
    weights_file.write_bytes(original)
    (ckpt / "scheduler.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="scheduler.pt has 0 bytes"):
        verify_checkpoint(ckpt)
    (ckpt / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match="optimizer.pt is missing"):
        verify_checkpoint(ckpt)


def test_save_total_limit_keeps_the_newest(tmp_path):
    make_trainer(make_config(tmp_path, max_steps=4, save_total_limit=2)).train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-4"


def test_reference_is_saved_once_and_hard_linked(tmp_path):
    make_trainer(make_config(tmp_path, max_steps=2)).train()  # beta 0: no reference in the checkpoint
    assert not (tmp_path / "checkpoint-1" / "reference").exists()
    out = tmp_path / "kl"
    cfg = make_config(out, max_steps=2)
    cfg.algorithm.beta = 0.1
    trainer = make_trainer(cfg)
    start = {k: v.clone() for k, v in trainer.ref_model.state_dict().items()}
    trainer.train()
    one, two = (out / f"checkpoint-{i}" / "reference" / "model.safetensors" for i in (1, 2))
    assert os.path.samefile(one, two)  # the frozen reference is stored once
    resumed_cfg = make_config(out, max_steps=3, resume_from=str(out / "checkpoint-1"))
    resumed_cfg.algorithm.beta = 0.1
    resumed = make_trainer(resumed_cfg)
    for key, value in resumed.ref_model.state_dict().items():
        assert torch.equal(value, start[key]), key  # the reference of the run, not the resumed policy


def test_resume_latest_without_checkpoint_starts_fresh_and_process_count_must_match(tmp_path):
    trainer = make_trainer(make_config(tmp_path, max_steps=1, resume_from="latest"))
    assert trainer.rollout_step == 0 and trainer.resumed_from is None
    trainer.train()
    state_file = tmp_path / "checkpoint-1" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["num_processes"] = 2
    state_file.write_text(json.dumps(state))
    checkpoint.write_manifest(tmp_path / "checkpoint-1", 1)  # a consistent checkpoint from a 2-process run
    with pytest.raises(CheckpointError, match="2 processes"):
        make_trainer(make_config(tmp_path, max_steps=2, resume_from="latest"))


def test_a_sharded_optimizer_state_is_saved_per_process_and_resumes_exactly(tmp_path, monkeypatch):
    """The checkpoint path of DeepSpeed ZeRO (each process saves and loads its own optimizer part), exercised in
    one process; the 2-process DeepSpeed runs: tests/sharded_training_check.py, FSDP's gathering:
    tests/fsdp_checkpoint_driver.py."""
    import mmrl.resumable

    monkeypatch.setattr(mmrl.resumable, "per_process_optimizer_state", lambda accelerator: True)
    straight = make_trainer(make_config(tmp_path / "straight", max_steps=2))
    straight.train()
    files = {p.name for p in (tmp_path / "straight" / "checkpoint-1").iterdir()}
    assert "optimizer-rank-0.pt" in files and "optimizer.pt" not in files
    resumed = make_trainer(make_config(tmp_path / "straight", max_steps=2,
                                       resume_from=str(tmp_path / "straight" / "checkpoint-1")))
    assert resumed.rollout_step == 1
    resumed.train()
    final = weights(resumed)
    assert all(torch.equal(final[k], v) for k, v in weights(straight).items())
    monkeypatch.setattr(mmrl.resumable, "per_process_optimizer_state", lambda accelerator: False)
    with pytest.raises(CheckpointError, match="shards the optimizer state"):  # resumed under another backend
        make_trainer(make_config(tmp_path / "straight", max_steps=3, resume_from="latest"))


# ---------------------------------------------------------------------------------------------- signals


def test_stop_request_first_signal_asks_second_exits():
    script = textwrap.dedent("""
        import os, signal, time
        from mmrl.faults import StopRequest
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.requested and stop.signal_name == "SIGTERM"
            print("first signal recorded", flush=True)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(30)
        print("not reached")
    """)
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 25
    assert out.stdout.strip() == "first signal recorded"
    assert out.returncode == 128 + signal.SIGINT


def test_stop_request_restores_previous_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_finishes_the_step_saves_and_exits_zero(tmp_path):
    out_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "mmrl.cli", "train", "configs/vision/demo.yaml", f"output_dir={out_dir}",
           "max_steps=200", "prompts_per_step=2", "group_size=4", "micro_batch_size=8", "cold_start.steps=0",
           "data.max_train_samples=16", "data.max_eval_samples=4", "eval.batch_size=4", "save_steps=0",
           "logging.report_to=[jsonl]", "logging.progress_bar=false", "mixed_precision='no'"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Resume with:" in stdout and "--resume latest" in stdout
    summary = json.loads((out_dir / "summary.json").read_text())
    step = summary["preempted_at_step"]
    assert 2 <= step < 200 and "accuracy_after" not in summary
    assert latest_checkpoint(out_dir) == out_dir / f"checkpoint-{step}"  # saved although save_steps=0
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, step + 1))  # the step in flight was finished and logged


# ---------------------------------------------------------------------------------------------- numerical faults


def test_update_guard_counts_and_aborts_after_consecutive_skips():
    guard = UpdateGuard(max_consecutive=3)
    assert guard.check(1.0, 2.0, step=0)
    assert not guard.check(math.nan, 2.0, step=1)
    assert not guard.check(1.0, math.inf, step=2)
    assert guard.check(1.0, 2.0, step=3)  # a good update resets the run of skips
    assert guard.state_dict() == {"skipped_total": 2, "consecutive": 0}
    assert not guard.check(1.0, 2.0, step=4, elsewhere_bad=True)  # another process saw a NaN
    assert not guard.check(-math.inf, 2.0, step=5)
    with pytest.raises(NonFiniteUpdates, match="3 optimizer updates in a row"):
        guard.check(math.nan, math.nan, step=6)


def test_only_the_main_process_warns_of_a_skipped_update_but_every_process_counts_it(caplog):
    quiet = UpdateGuard(max_consecutive=0, warn=False)  # another process: all skip together, one says so
    with caplog.at_level("WARNING", logger="mmrl.faults"):
        assert not quiet.check(math.nan, 1.0, step=1)
        assert not caplog.records
        assert not UpdateGuard(max_consecutive=0).check(math.nan, 1.0, step=1)
    assert quiet.skipped_total == 1 and ["optimizer step 1 skipped" in r.getMessage() for r in caplog.records] == [True]


def test_non_finite_loss_skips_the_update_and_never_reaches_the_weights(tmp_path):
    trainer = make_trainer(make_config(tmp_path, max_steps=3, save_steps=0, save_final=False))
    real = trainer.objective
    calls = {"n": 0}

    def nan_on_second_update(*args, **kwargs):
        calls["n"] += 1
        per_token, metrics = real(*args, **kwargs)
        return (per_token * math.nan if calls["n"] == 2 else per_token), metrics

    trainer.objective = nan_on_second_update
    snapshots = []
    original_update = trainer._update

    def update_and_snapshot(*args, **kwargs):
        out = original_update(*args, **kwargs)
        snapshots.append(weights(trainer))
        return out

    trainer._update = update_and_snapshot
    before = weights(trainer)
    rows = trainer.train()
    assert [r["update_skipped"] for r in rows] == [0.0, 1.0, 0.0]
    assert [r["skipped_updates"] for r in rows] == [0.0, 1.0, 1.0]
    assert rows[1]["loss"] is None  # NaN is logged as null
    assert any(not torch.equal(before[k], snapshots[0][k]) for k in before)  # update 1 applied
    assert all(torch.equal(snapshots[0][k], snapshots[1][k]) for k in before)  # update 2 skipped: untouched
    assert all(torch.isfinite(v).all() for v in snapshots[2].values() if v.is_floating_point())
    assert trainer.optimizer.state_dict()["state"][0]["step"] == 2  # Adam saw two updates, not three


def test_abort_after_max_consecutive_skips(tmp_path):
    trainer = make_trainer(make_config(tmp_path, max_steps=5, save_steps=0, save_final=False,
                                       max_consecutive_skips=2))
    real = trainer.objective
    trainer.objective = lambda *a, **k: (lambda out: (out[0] * math.nan, out[1]))(real(*a, **k))
    with pytest.raises(NonFiniteUpdates, match="2 optimizer updates in a row"):
        trainer.train()


def test_infinite_reward_is_missing_and_the_weights_stay_finite(tmp_path):
    def sometimes_inf(prompts, completions, **kwargs):
        return [math.inf if i == 0 else -math.inf if i == 5 else float(len(c) % 3) for i, c in enumerate(completions)]

    trainer = make_trainer(make_config(tmp_path, max_steps=2, save_steps=0, save_final=True), reward=sometimes_inf)
    rows = trainer.train()
    assert [r["reward_missing_total"] for r in rows] == [2.0, 4.0]
    assert all(r["update_skipped"] == 0.0 and math.isfinite(r["loss"]) for r in rows)
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values() if v.is_floating_point())
