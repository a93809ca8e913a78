"""The trainer under sharded backends, end to end on 2 CPU processes, against DDP (configs/accelerate/README.md).

Launches ``mmrl train`` on the vision demo without a cold start, with the reward :func:`distinct_characters`
(so that advantages are not all zero on the untrained model), under DDP and each backend asked for, and checks:

1. the same training: rewards and gradient norms per step equal DDP's to 1e-5; weights close (Adam's first
   steps magnify float-rounding differences of the gradient reduction: the printed figure is the largest
   difference relative to the largest weight);
2. exact resume: 2 steps, then a resumed run to 4, against 4 steps straight — identical weights;
3. a non-finite update (the objective returns NaN for one micro-batch) is skipped and counted, and the
   weights stay finite.

Backends:

- ``fsdp2``, ``fsdp1`` (``configs/accelerate/fsdp2.yaml``, ``fsdp.yaml``): accelerate turns an FSDP launch into
  FSDP only on accelerators; on CPU processes it trains as DDP. These runs therefore set accelerate's state to
  FSDP right after the trainer makes its ``Accelerator`` (``--force-fsdp``, test-only), so that ``prepare``
  shards the model exactly as it does on GPUs (``fully_shard`` / ``FullyShardedDataParallel`` over the
  model's ``_no_split_modules``); the check asserts the parameters really are sharded. FSDP1 runs with
  ``fsdp_sync_module_states: false`` (its plugin looks for a GPU to broadcast from; every process builds
  the same weights from the seed anyway). Needs nothing beyond the project's dependencies.
- ``zero2``, ``zero3``, ``zero3_partitioned`` (ZeRO-3 with every parameter partitioned: the tiny model's
  parameters are all below the size ZeRO-3 partitions by default): need ``deepspeed``, which is not a
  dependency — install it aside (e.g. a venv on top of the project's, ``pip install --no-build-isolation
  deepspeed``) and run this file with that interpreter.

    python tests/sharded_training_check.py [--backends fsdp2 fsdp1 zero2 zero3 zero3_partitioned] [--lora] [--out DIR]

With ``--lora`` every run (DDP included) trains a LoRA adapter with a KL term, and the adapter's weights are
compared (FSDP1 refuses an adapter: ``mmrl.processes.unsupported_setup``).

``tests/test_multiprocess_training.py`` runs the FSDP backends, ``tests/test_processes.py`` the DeepSpeed ones
where ``deepspeed`` is importable. Internally the file is also the command the launches run (``--as-cli``:
``mmrl``'s command line, optionally with FSDP forced and a NaN injected).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = {"ddp": "ddp.yaml", "fsdp2": "fsdp2.yaml", "fsdp1": "fsdp.yaml", "zero2": "deepspeed_zero2.yaml",
            "zero3": "deepspeed_zero3.yaml", "zero3_partitioned": None}  # written by partitioned_zero3_config
FSDP = ("fsdp2", "fsdp1")
DEEPSPEED = ("zero2", "zero3", "zero3_partitioned")
# ZeRO-3 keeps parameters under stage3_param_persistence_threshold (1e5 elements) whole, i.e. all of the tiny
# model's: this variant partitions every one, as ZeRO-3 does a real model's (set in a DeepSpeed JSON file,
# which accelerate's YAML keys cannot express).
PARTITIONED_ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                     "gradient_clipping": "auto", "gradient_accumulation_steps": "auto",
                     "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto"}


def partitioned_zero3_config(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "zero3_partitioned.json").write_text(json.dumps(PARTITIONED_ZERO3))
    yaml = directory / "zero3_partitioned.yaml"
    yaml.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\nnum_machines: 1\n"
                    "num_processes: 2\nmachine_rank: 0\nrdzv_backend: static\nsame_network: true\nuse_cpu: false\n"
                    f"deepspeed_config:\n  deepspeed_config_file: {directory / 'zero3_partitioned.json'}\n"
                    "  zero3_init_flag: false\n")
    return yaml


def distinct_characters(prompts, completions, **kwargs) -> list[float]:
    """Reward: distinct characters in the completion / 10 (varies between samples of an untrained model)."""
    return [len(set(str(c))) / 10.0 for c in completions]


def force_fsdp() -> None:
    """Make the trainer's ``Accelerator`` an FSDP one on CPU processes (accelerate only does so on accelerators:
    ``AcceleratorState`` picks FSDP inside its ``MULTI_GPU/...`` branch). The plugin is accelerate's own, from
    the launch's ``FSDP_*`` environment; the sharding itself is accelerate's ``prepare``. Refuses to train if the
    model did not come out sharded."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    import mmrl.trainer
    from mmrl.processes import fsdp_sharded

    make = mmrl.trainer.make_accelerator

    def make_fsdp_accelerator(**kwargs):
        accelerator = make(**kwargs)
        # AcceleratorState copies the process state's fields whenever it is constructed again (accelerate does
        # so internally): set both. accelerate's CPU processes say "cpu:0", FSDP1 compares that with its
        # parameters' "cpu" and stops.
        for state in (accelerator.state, PartialState()):
            state.distributed_type = DistributedType.FSDP
            state.device = torch.device("cpu")
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
        return accelerator

    mmrl.trainer.make_accelerator = make_fsdp_accelerator
    init = mmrl.trainer.Trainer.__init__

    def init_and_check(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if not fsdp_sharded(self.model):
            raise SystemExit(f"--force-fsdp: the model is not sharded ({type(self.model).__name__})")
        print(f"sharded: {type(self.model).__name__}, {self.accelerator.distributed_type}", flush=True)

    mmrl.trainer.Trainer.__init__ = init_and_check
    apply_update = mmrl.trainer.Trainer._apply_update

    def apply_update_under_fsdp(self, sums):
        # the forced state must hold for the whole run (clipping, for one, asks it which norm to take)
        assert self.accelerator.distributed_type == DistributedType.FSDP, self.accelerator.distributed_type
        return apply_update(self, sums)

    mmrl.trainer.Trainer._apply_update = apply_update_under_fsdp


def as_cli(argv: list[str]) -> int:
    """``mmrl`` with ``--force-fsdp`` (see :func:`force_fsdp`) and, for ``--nan-at N``, the N-th objective call
    (a micro-batch) returning NaN."""
    if argv[:1] == ["--force-fsdp"]:
        force_fsdp()
        argv = argv[1:]
    if argv[:1] == ["--nan-at"]:
        import mmrl.trainer

        nan_at, argv, real = int(argv[1]), argv[2:], mmrl.trainer.get_objective

        def objective_with_a_nan(name):
            objective, calls = real(name), [0]

            def call(*args, **kwargs):
                calls[0] += 1
                per_token, metrics = objective(*args, **kwargs)
                return (per_token * math.nan if calls[0] == nan_at else per_token), metrics
            return call

        mmrl.trainer.get_objective = objective_with_a_nan
    from mmrl.cli import main

    return main(argv)


def launch(backend: str, output: Path, steps: int, *extra: str, nan_at: int | None = None) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if backend not in DEEPSPEED:
        env["ACCELERATE_USE_CPU"] = "1"  # CPU processes need it for DDP/FSDP (see configs/accelerate/README.md)
    config = (ROOT / "configs" / "accelerate" / BACKENDS[backend] if BACKENDS[backend]
              else partitioned_zero3_config(output.parent / "configs"))
    if backend == "fsdp1":  # the plugin would look for a GPU to broadcast the weights from
        text = config.read_text().replace("fsdp_sync_module_states: true", "fsdp_sync_module_states: false")
        config = output.parent / "configs" / config.name
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(text)
    # (a DeepSpeed JSON file and accelerate's --mixed_precision may not be given together)
    precision = ["--mixed_precision", "no"] if BACKENDS[backend] else []
    options = (["--force-fsdp"] if backend in FSDP else []) + (["--nan-at", str(nan_at)] if nan_at else [])
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--num_processes", "2", *precision, __file__, "--as-cli", *options, "train", "configs/vision/demo.yaml",
               f"max_steps={steps}", "cold_start.steps=0", "mixed_precision='no'", "optim.lr=1e-2", "micro_batch_size=16",
               "save_steps=1", f"rewards=[{{name: {__file__}:distinct_characters, weight: 1.0}}]",
               "logging.progress_bar=false", f"output_dir={output}", *extra]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{backend} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    if backend in FSDP:
        assert result.stdout.count("sharded: ") == 2, result.stdout[-3000:]  # both processes hold shards
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def weights(run: Path, step: int) -> dict:
    """The checkpoint's trained weights: the model's, or a LoRA adapter's."""
    from safetensors.torch import load_file

    directory = run / f"checkpoint-{step}" / "model"
    adapter = directory / "adapter_model.safetensors"
    weights = load_file(str(adapter if adapter.exists() else directory / "model.safetensors"))
    assert weights, f"no weights in {directory}"
    return weights


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", choices=[*FSDP, *DEEPSPEED], default=[*FSDP, *DEEPSPEED])
    parser.add_argument("--lora", action="store_true",
                        help="train a LoRA adapter (model.lora, r=4) in every run, DDP included, with a KL term (β=0.04: "
                             "the reference is the model with its adapter disabled)")
    parser.add_argument("--out", type=Path, default=None, help="where the runs go (default: a temporary directory)")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="mmrl-sharded-"))
    options = ["model.lora={r: 4, alpha: 8}", "algorithm.beta=0.04"] if args.lora else []
    report: dict = {}
    ddp = launch("ddp", out / "ddp", 4, *options)
    reference = weights(out / "ddp", 2)
    for backend in args.backends:
        straight = launch(backend, out / backend, 4, *options)
        for mine, theirs in zip(straight, ddp, strict=True):
            for key in ("reward", "grad_norm"):
                assert abs(mine[key] - theirs[key]) <= 1e-5 * max(1.0, abs(theirs[key])), (backend, key, mine, theirs)
        at_two = weights(out / backend, 2)
        assert set(at_two) == set(reference), (backend, sorted(set(at_two) ^ set(reference))[:5])  # same layout
        scale = max(v.abs().max().item() for v in reference.values())
        report[f"{backend}: weights vs DDP after 2 steps (relative to the largest weight)"] = max(
            (at_two[k] - reference[k]).abs().max().item() for k in reference) / scale
        resumed = out / f"{backend}-resumed"
        launch(backend, resumed, 2, *options)
        launch(backend, resumed, 4, *options, f"resume_from={resumed / 'checkpoint-2'}")
        final, expected = weights(resumed, 4), weights(out / backend, 4)
        difference = max((final[k] - expected[k]).abs().max().item() for k in expected)
        assert difference == 0.0, (backend, "resume", difference)
        report[f"{backend}: 2 steps + resume to 4 vs 4 straight (max difference)"] = difference
        skipped = launch(backend, out / f"{backend}-nan", 2, *options, nan_at=1)
        assert skipped[0]["update_skipped"] == 1.0 and skipped[-1]["skipped_updates"] == 1.0, skipped
        assert all(v.isfinite().all() for v in weights(out / f"{backend}-nan", 2).values())
        report[f"{backend}: NaN micro-batch"] = "update skipped and counted, weights finite"
    for line in report.items():
        print(*line, sep=": ")
    return report


if __name__ == "__main__":
    if sys.argv[1:2] == ["--as-cli"]:
        sys.exit(as_cli(sys.argv[2:]))
    main()
