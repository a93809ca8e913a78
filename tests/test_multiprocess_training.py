"""Multi-process training on CPU: real processes under ``accelerate launch`` (gloo).

**Launching.** ``accelerate launch --cpu --num_processes 2`` starts *one* process (its CPU path is the simple
launcher, which runs several only through ``mpirun``). Two CPU processes take the torchrun launcher
(``--multi_gpu``) with ``ACCELERATE_USE_CPU=1`` in the environment; without that variable each process
finds no GPU and runs alone as process 0 of 1. :func:`launch` does this, on a free port.

**2 processes = 1 process over the same global batch** (:func:`test_two_processes_match_one_process`).
Under N processes each process samples its own ``P`` prompts (``PromptSampler`` seeded ``seed + rank``), so
groups never span processes; token/sequence counts for the loss normaliser are summed over processes
(``Trainer._global_counts``) and each process's loss is multiplied by N because DDP averages gradients. Then
the global loss — and its gradient — is that of one process holding all N·P prompts:

- ``grpo``: Σ_i mean_t(ℓ_i) / global sequences;  ``bnpo``/``dapo``: Σ ℓ·mask / global tokens;
  ``dr_grpo``: Σ ℓ·mask / (global sequences · max_new_tokens); the KL term is aggregated the same way.

To compare, both runs must train on the same samples: generation is replaced by *fixed rollouts* (each
record's completions are a deterministic function of the record and the sample's index in its group; the
reward is a hash of the completion; see ``tests/fixed_rollout_driver.py``). The 1-process run has
``prompts_per_step = 2P`` and a sampler that is the union of the two processes' samplers (seeds ``seed`` and
``seed + 1``, batches concatenated in rank order), so its batch is the concatenation of the two processes'
batches — checked from the prompt ids each process wrote. Group advantages are per group, so they agree; one
mini-batch per rollout (``mini_batch_size`` = the whole rollout: a shuffle over local groups cannot equal a
shuffle over global ones), several micro-batches per process (gradient accumulation with ``no_sync``).
Every loss type is trained 3 steps with a KL term (β=0.04), and the per-step loss, policy loss, KL, gradient
norm and reward and the final weights must agree within float tolerance.

**accelerate config files** (:func:`test_accelerate_config_trains_on_two_cpu_processes`):
``configs/accelerate/ddp.yaml`` trains 2 steps of the vision demo on 2 CPU processes. accelerate starts FSDP
only on accelerators (``configs/accelerate/README.md``): the trainer's FSDP runs set accelerate's state to
FSDP on CPU processes and let accelerate shard the model as on GPUs
(:func:`test_the_trainer_under_fsdp_trains_like_ddp_resumes_exactly_and_skips_non_finite_updates`); the
log-prob head and the checkpoints are also checked under torch's own sharding (the ``fsdp_*_driver`` files).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.launching import accelerate_command, free_port

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "fixed_rollout_driver.py"
LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
COMPARED = ("loss", "policy_loss", "kl", "grad_norm", "reward")
# P prompts per process, G samples, micro-batches of one group; fixed rollouts of up to 8 tokens
COMMON = ["max_steps=3", "group_size=4", "micro_batch_size=4", "sampling.max_new_tokens=8",
          "data.max_train_samples=24", "data.max_eval_samples=4", "optim.lr=1e-3", "algorithm.beta=0.04",
          "algorithm.adv_scale=batch"]  # batch-level statistics: the advantages need every process's rewards
P = 2


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def launch(args: list[str], processes: int, config_file: Path | None = None,
           timeout: int = 600) -> subprocess.CompletedProcess:
    """``accelerate launch`` of ``args`` (a script and its arguments, or ``-m module ...``) on ``processes``
    CPU processes: the torchrun launcher with ``ACCELERATE_USE_CPU=1`` (see the module docstring)."""
    cmd, env = accelerate_command(args, processes, _env(), config_file)
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def test_two_processes_match_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, str(DRIVER), "--out", str(one), "--emulate", "2", *COMMON,
                    f"prompts_per_step={2 * P}"], cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=600)
    launch([str(DRIVER), "--out", str(two), *COMMON, f"prompts_per_step={P}"], processes=2)
    for loss_type in LOSS_TYPES:
        # the same prompts: the 1-process batch is the concatenation of the two processes' batches
        ranks = [json.loads((two / loss_type / f"prompts-{r}.json").read_text()) for r in (0, 1)]
        union = json.loads((one / loss_type / "prompts-0.json").read_text())
        assert len(union) == 3 and all(len(step) == 2 * P for step in union)
        assert union == [a + b for a, b in zip(*ranks)], loss_type
        assert ranks[0] != ranks[1]  # two real processes, each with its own prompts
        history = {name: json.loads((run / loss_type / "history.json").read_text()) for name, run in
                   (("one", one), ("two", two))}
        assert len(history["one"]) == len(history["two"]) == 3
        for key in COMPARED:
            a = [row[key] for row in history["one"]]
            b = [row[key] for row in history["two"]]
            assert torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-6), (loss_type, key, a, b)
        assert any(abs(row["loss"]) > 1e-3 for row in history["one"])  # something was trained
        initial, w1, w2 = (torch.load(run / loss_type / name) for run, name in
                           ((one, "initial.pt"), (one, "weights.pt"), (two, "weights.pt")))
        moved = max(float((w1[k] - initial[k]).abs().max()) for k in w1)
        worst = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
        assert moved > 1e-3, loss_type
        # moved ~3e-3 in 3 steps; they agree to ~1e-5 — Adam divides by √v, so a float-rounding difference
        # in a near-zero gradient component can move its weight by a visible fraction of lr
        assert worst < 5e-5, (loss_type, worst, moved)
        for k in w1:
            assert torch.allclose(w1[k], w2[k], rtol=1e-4, atol=5e-5), (loss_type, k)


def test_accelerate_config_trains_on_two_cpu_processes(tmp_path):
    out = launch(["-m", "mmrl.cli", "train", "configs/vision/demo.yaml", "max_steps=2", "prompts_per_step=2",
                  "group_size=4", "micro_batch_size=8", "data.max_train_samples=24", "data.max_eval_samples=8",
                  "eval.batch_size=8", "cold_start.steps=0", "save_steps=0", "logging.report_to=[jsonl]",
                  "logging.progress_bar=false", "mixed_precision='no'", f"output_dir={tmp_path / 'ddp'}"],
                 processes=2, config_file=ROOT / "configs/accelerate/ddp.yaml")
    assert out.stdout.count("reward curve:") == 1  # the CLI's last line, printed by the main process only
    rows = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [row["rollout_step"] for row in rows] == [1, 2]  # one main process logs (two lone ones would both)
    assert (tmp_path / "ddp" / "checkpoint-2").is_dir()


def _reports(stdout: str) -> list[dict]:
    """Every ``REPORT {json}`` the ranks printed. Two processes share the stdout pipe, so one rank's line can
    run into the other's (``{...}REPORT {...}``): each object is decoded from its marker on."""
    decoder, found, start = json.JSONDecoder(), [], stdout.find("REPORT ")
    while start != -1:
        report, end = decoder.raw_decode(stdout, start + len("REPORT "))
        found.append(report)
        start = stdout.find("REPORT ", end)
    return found


def _fsdp_reports(mode: str) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(ROOT / "tests" / "fsdp_logprob_driver.py"), mode]
    out = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    return _reports(out.stdout)


def test_fsdp2_log_probs_and_gradients_match_unsharded():
    """FSDP2 keeps the root module's parameters (the output head, tied to the embeddings) unsharded from the
    forward until the backward, so the head applied outside the forward sees the full weight."""
    reports = _fsdp_reports("fsdp2")
    assert len(reports) == 2
    for report in reports:
        assert "error" not in report, report
        assert report["scoring_max_abs_err"] < 1e-5 and report["train_logp_max_abs_err"] < 1e-5
        assert report["grad_max_rel_err"] < 1e-4


def test_fsdp1_log_probs_and_gradients_match_unsharded():
    reports = _fsdp_reports("fsdp1")
    assert len(reports) == 2
    assert all("error" not in report for report in reports), reports
    assert all(r["scoring_max_abs_err"] < 1e-5 and r["grad_max_rel_err"] < 1e-4 for r in reports), reports


def test_the_trainer_under_fsdp_trains_like_ddp_resumes_exactly_and_skips_non_finite_updates(tmp_path):
    """``mmrl train`` under FSDP2 and FSDP1 (accelerate's own sharding; its state set to FSDP, which accelerate
    only picks on accelerators) against DDP, 2 CPU processes each: rewards and gradient norms per step equal,
    weights close, the same checkpoint layout, exact resume, a NaN micro-batch skipped
    (tests/sharded_training_check.py)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import sharded_training_check

    report = sharded_training_check.main(["--backends", *sharded_training_check.FSDP, "--out", str(tmp_path)])
    for backend in sharded_training_check.FSDP:
        assert report[f"{backend}: 2 steps + resume to 4 vs 4 straight (max difference)"] == 0.0
        assert report[f"{backend}: weights vs DDP after 2 steps (relative to the largest weight)"] < 1e-4


def test_a_lora_adapter_under_fsdp2_trains_like_ddp_and_resumes_exactly(tmp_path):
    """The same check with a LoRA adapter and a KL term (the reference: the adapter disabled) in every run."""
    sys.path.insert(0, str(ROOT / "tests"))
    import sharded_training_check

    report = sharded_training_check.main(["--backends", "fsdp2", "--lora", "--out", str(tmp_path)])
    assert report["fsdp2: 2 steps + resume to 4 vs 4 straight (max difference)"] == 0.0
    assert report["fsdp2: weights vs DDP after 2 steps (relative to the largest weight)"] < 1e-4


@pytest.mark.parametrize("mode", ["fsdp2", "fsdp1"])
def test_fsdp_checkpoints_gather_the_whole_weights_and_optimizer_state_and_load_them_back(mode, tmp_path):
    """What the trainer's checkpoints do under FSDP (mmrl.processes.full_state_dict / full_optimizer_state and
    mmrl.checkpoint.load_model_weights), on 2 processes sharded with torch as accelerate does."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "tests" / "fsdp_checkpoint_driver.py"), mode, str(tmp_path / "model")]
    out = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    reports = {r["rank"]: r for r in _reports(out.stdout)}
    assert set(reports) == {0, 1} and all("error" not in r for r in reports.values()), reports
    main = reports[0]
    assert main["optimizer_vs_unsharded"] == 0.0 and main["optimizer_reloaded_vs_unsharded"] == 0.0, main
    assert main["gathered_vs_unsharded"] == 0.0 and main["reloaded_vs_unsharded"] == 0.0, main
    assert main["perturbed_vs_unsharded"] > 0.5  # the shards really were overwritten before the load
