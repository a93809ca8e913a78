"""Kill-and-resume: a real ``mmrl train`` subprocess is killed with SIGKILL mid-run and resumed with
``--resume latest``; its per-step metrics, summary and final weights must equal an uninterrupted run's
bit for bit (CPU). Every stateful option joins the harness with one line in :data:`CASES`.

Each case runs the same command three times: uninterrupted (A), killed (B), and B resumed. Both runs save
every step (``save_steps=1``) so that a kill lands anywhere: mid-step, mid-save, between saves.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.launching import accelerate_command, default_env

ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = ("step_time", "tokens_per_second", "timing/", "wall_time_s")

# Small versions of the shipped demos: a few steps, small batches, short completions.
# (The vision demo's cold start stays: without it every reward is 0 and nothing would be trained.)
VISION_SMALL = ["max_steps=5", "prompts_per_step=2", "group_size=4", "micro_batch_size=8",
                "data.max_train_samples=24", "data.max_eval_samples=8", "eval.batch_size=8"]
IMAGE_GEN_SMALL = ["max_steps=5", "prompts_per_step=2", "group_size=4", "micro_batch_size=8",
                   "data.num_train=16", "data.num_eval=8", "eval.batch_size=8"]


@dataclass
class Case:
    config: str
    overrides: list[str]
    processes: int = 1  # > 1: under `accelerate launch`
    kill_after: int = 2  # SIGKILL once this checkpoint exists (the run is then inside the next step)
    extra: list[str] = field(default_factory=list)


CASES = {
    "vision_demo": Case("configs/vision/demo.yaml", VISION_SMALL),
    # LoRA: the checkpoint holds the adapter; the KL reference is the base with the adapter disabled. (An
    # adapter on the random tiny model learns the answer format too slowly for the accuracy reward to vary.)
    "lora": Case("configs/vision/demo.yaml", VISION_SMALL + [
        "model.lora.r=4", "algorithm.beta=0.05", "optim.lr=3e-3",
        'rewards=[{name: "examples/custom_reward.py:length_penalty"}]']),
    # KL reference after a cold start + several updates per rollout + sampled, periodic evaluation
    "vision_kl_ref_sampled_eval": Case("configs/vision/demo.yaml", VISION_SMALL + [
        "algorithm.beta=0.05", "algorithm.ppo_epochs=2", "mini_batch_size=4", "eval.temperature=1.0",
        "eval.every_steps=2", "optim.scheduler=linear", "optim.warmup_steps=2"]),
    "papo_linear_gamma": Case("configs/vision/papo_grpo_tiny.yaml", VISION_SMALL + [
        "papo.gamma_schedule=linear", "papo.gamma=0.05", "optim.lr=3e-3"]),
    "image_gen_demo": Case("configs/image_gen/demo.yaml", IMAGE_GEN_SMALL),
    "two_processes": Case("configs/vision/demo.yaml", VISION_SMALL + ["algorithm.beta=0.05"], processes=2),
    # GFPO with adaptive k (a streaming difficulty estimate per prompt: state that must be checkpointed)
    "gfpo_adaptive": Case("configs/vision/demo.yaml", VISION_SMALL + [
        "group_size=8", "micro_batch_size=16", "filters.gfpo_k=4", "filters.gfpo_adaptive=true",
        "filters.gfpo_k_per_bucket=[6,4,2]", "filters.gfpo_quantiles=[0.34,0.67]"]),
    "gspo_preset_overlong": Case("configs/vision/demo.yaml", VISION_SMALL + [
        "preset=gspo", "algorithm.ppo_epochs=2", "mini_batch_size=4", "filters.overlong_cache_length=4",
        "filters.mask_truncated=true"]),
    # DAPO dynamic sampling: several generation rounds per step, counters per process
    "dapo_dynamic_sampling": Case("configs/vision/demo.yaml", VISION_SMALL + [
        "filters.dynamic_sampling=true", "filters.max_sample_batches=3"]),
    # two processes: the same number of rounds on both, trimmed to the smaller number of groups
    "dynamic_sampling_two_processes": Case("configs/vision/demo.yaml", VISION_SMALL + [
        "filters.dynamic_sampling=true", "filters.max_sample_batches=2"], processes=2),
    # a reference that changes (refreshed every 2 updates), KL in the reward, top-entropy tokens
    "ref_sync_kl_in_reward": Case("configs/vision/demo.yaml", VISION_SMALL + [
        "algorithm.beta=0.05", "algorithm.kl_in_reward=true", "algorithm.ref_sync_steps=2",
        "filters.top_entropy_fraction=0.5"]),
    # semi-online DPO: rollouts from the reference, which is re-synced to the policy at update 2 (before the
    # kill) and must come back as the synced weights, not the initial ones
    "dpo_semi_online": Case("configs/vision/demo.yaml", VISION_SMALL + [
        "preset=dpo_semi", "algorithm.ref_sync_steps=2", "algorithm.dpo_nll_coef=0.1"]),
    # SRPO history resampling: 4 prompts, 2 per step, so an epoch (and its drop set) turns over every 2 steps
    "srpo_history": Case("configs/vision/demo.yaml", VISION_SMALL + [
        "filters.history_resampling=true", "data.max_train_samples=4"]),
    # data.stages: a stage switch at step 3 (after the resume), then a seeded mixture, with SRPO per source
    "srpo_stages": Case("configs/vision/demo.yaml", VISION_SMALL + [
        "data.max_train_samples=4", "filters.history_resampling=true",
        'data.stages=[{steps: 3, train: "synthetic:single_shape"}, '
        '{mix: {"synthetic:single_shape": 0.5, "synthetic:colour_at_position": 0.5}}]']),
}


def _command(case: Case, output_dir: Path, *extra: str) -> list[str]:
    args = ["-m", "mmrl.cli", "train", case.config, *case.overrides, f"output_dir={output_dir}", "save_steps=1",
            "logging.report_to=[jsonl]", "logging.progress_bar=false", "mixed_precision='no'", *extra]
    if case.processes == 1:
        return [sys.executable, *args]
    return accelerate_command(args, case.processes, _env())[0]  # really N processes (tests/launching.py)


def _env() -> dict[str, str]:
    # ACCELERATE_USE_CPU: the harness is about CPU bit-exactness; several CPU processes need it too
    return {**default_env(), "ACCELERATE_USE_CPU": "1"}


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def _kill_when_saved(cmd: list[str], output_dir: Path, step: int) -> None:
    """Start ``cmd``; SIGKILL its whole process group as soon as ``latest`` names checkpoint-``step``."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    pointer = output_dir / "latest"
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            if pointer.is_file() and pointer.read_text().strip() == f"checkpoint-{step}":
                break
            if proc.poll() is not None:
                pytest.fail(f"the run ended (code {proc.returncode}) before checkpoint-{step}: "
                            f"{proc.stderr.read()[-3000:]}")
            time.sleep(0.02)
        else:
            pytest.fail(f"checkpoint-{step} never appeared")
        assert proc.poll() is None, "the run had already finished: this would not test a kill"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def _rows(output_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(TIMING_KEYS)} for r in rows]


def _summary(output_dir: Path) -> dict:
    summary = json.loads((output_dir / "summary.json").read_text())
    return {k: v for k, v in summary.items() if not k.startswith(TIMING_KEYS)}


def _final_weights(output_dir: Path) -> dict:
    name = (output_dir / "latest").read_text().strip()
    model_dir = output_dir / name / "model"
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.rglob("*.safetensors"))
    assert files, f"no weights under {model_dir}"
    weights = {}
    for file in files:
        weights.update({f"{file.name}:{k}": v for k, v in load_file(str(file)).items()})
    return weights


# More kill points for a longer trial (docs/faults.md): MMRL_KILL_AT=1,2,3,4 pytest tests/test_resume_kill.py
KILL_AT = [int(k) for k in os.environ.get("MMRL_KILL_AT", "").split(",") if k.strip()] or [None]
_UNINTERRUPTED: dict[str, Path] = {}  # one uninterrupted run per case, shared by its kill points


@pytest.mark.parametrize("kill_at", KILL_AT, ids=lambda k: f"kill_at_{k or 'default'}")
@pytest.mark.parametrize("name", sorted(CASES))
def test_killed_run_resumes_bit_exactly(name, kill_at, tmp_path, tmp_path_factory):
    case = CASES[name]
    kill_at = kill_at or case.kill_after
    if name not in _UNINTERRUPTED:
        _UNINTERRUPTED[name] = tmp_path_factory.mktemp(f"uninterrupted_{name}")
        _run(_command(case, _UNINTERRUPTED[name]))
    uninterrupted, killed = _UNINTERRUPTED[name], tmp_path / "b"
    _kill_when_saved(_command(case, killed), killed, kill_at)
    out = _run(_command(case, killed, "--resume", "latest"))
    assert f"resuming from {killed / f'checkpoint-{kill_at}'}" in out.stdout

    rows_a, rows_b = _rows(uninterrupted), _rows(killed)
    assert [r["step"] for r in rows_b] == [r["step"] for r in rows_a]  # cut back, no duplicated steps
    for a, b in zip(rows_a, rows_b):
        assert a == b, {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
    # not a trivially constant run: rewards vary and the updates move the weights
    assert len({r["reward"] for r in rows_a if "reward" in r}) > 1
    assert any(r.get("policy_loss") for r in rows_a)
    assert _summary(killed) == _summary(uninterrupted)  # accuracy before RL from the checkpoint, whole-run curves
    weights_a, weights_b = _final_weights(uninterrupted), _final_weights(killed)
    assert weights_a.keys() == weights_b.keys()
    changed = [k for k in weights_a if not weights_a[k].equal(weights_b[k])]
    assert not changed, changed[:5]
