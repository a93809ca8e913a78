"""GRPO for Qwen2.5-VL-3B-Instruct on Geometry3K, through the Python API. GPU only; needs the Hub.

What it does
    Loads ``configs/vision/grpo_qwen2_5_vl_3b_geo3k.yaml`` (EasyR1's Geometry3K recipe: 32 prompts x 5
    completions per step, ``\\boxed{}`` answers rewarded with ``0.9 * accuracy + 0.1 * format``, KL 0.01
    to the starting model, clip-higher 0.28), applies ``key=value`` overrides from the command line,
    builds the policy and datasets with :func:`vision.task.build`, measures held-out accuracy on the test
    split, trains with :class:`mmrl.Trainer` and measures it again. It is what
    ``mmrl train configs/vision/grpo_qwen2_5_vl_3b_geo3k.yaml`` does, as a script you can change.

    Model and data come from the Hugging Face Hub: ``Qwen/Qwen2.5-VL-3B-Instruct`` (about 7.5 GB) and
    ``hiyouga/geometry3k``. On a machine without network access this example cannot run: it stops with
    an error saying what could not be fetched. Download both beforehand (``huggingface-cli download``)
    and point the config at local copies if needed::

        python examples/qwen2_5_vl_3b_geometry3k.py model.name_or_path=/models/Qwen2.5-VL-3B-Instruct \\
            data.train=/data/geometry3k data.eval=/data/geometry3k

How to run
    One GPU (the config is sized for one 80 GB card)::

        python examples/qwen2_5_vl_3b_geometry3k.py
        python examples/qwen2_5_vl_3b_geometry3k.py max_steps=20 eval.max_new_tokens=1024 output_dir=runs/geo_try

    Several GPUs: data parallel through ``accelerate``; every process samples its own
    ``prompts_per_step`` prompts, so the prompts per optimizer step grow with the number of processes
    (lower ``prompts_per_step``/``mini_batch_size`` to keep the recipe's global batch)::

        accelerate launch --num_processes 4 examples/qwen2_5_vl_3b_geometry3k.py prompts_per_step=8 mini_batch_size=20

    Other knobs: ``--config`` for another YAML file, ``--skip-eval-before`` to start training at once,
    ``--print-config`` to show the resolved configuration and exit (works offline). Any config key can
    be overridden, e.g. ``optim.lr=2e-6``, ``algorithm.beta=0``, ``logging.report_to=[jsonl,wandb]``.

What to expect
    Held-out accuracy of the base model is printed first (one greedy pass over the 601 test problems),
    then the training progress bar, then the accuracy after RL. Metrics go to
    ``<output_dir>/metrics.jsonl`` (and TensorBoard), the reward curve to ``<output_dir>/reward_curve.png``,
    checkpoints every 50 steps to ``<output_dir>/checkpoint-<N>/``. A full run (300 steps) takes many
    hours on one H100; check that things work with ``max_steps=2 data.max_eval_samples=16`` first.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "vision" / "grpo_qwen2_5_vl_3b_geo3k.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="GRPO for Qwen2.5-VL-3B-Instruct on Geometry3K (GPU; downloads model and data from the Hub).",
        epilog="examples:\n  python examples/qwen2_5_vl_3b_geometry3k.py max_steps=20 output_dir=runs/geo_try\n"
               "  accelerate launch --num_processes 4 examples/qwen2_5_vl_3b_geometry3k.py "
               "prompts_per_step=8 mini_batch_size=20",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. max_steps=20 optim.lr=2e-6 data.max_eval_samples=64")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
    parser.add_argument("--skip-eval-before", action="store_true", help="do not evaluate before training")
    parser.add_argument("--skip-eval-after", action="store_true", help="do not evaluate after training")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    # Heavy imports after argument parsing, so that --help is instant.
    import logging

    import yaml
    from accelerate import PartialState
    from accelerate.utils import set_seed

    import mmrl
    from mmrl.config import ConfigError, load_config, to_dict
    from vision import task

    state = PartialState()  # process rank under `accelerate launch`; a single process otherwise
    main_process = state.is_main_process
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    try:
        cfg = load_config(args.config, args.overrides, section_types=task.SECTION_TYPES)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        if main_process:
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0

    start = time.perf_counter()
    set_seed(cfg.seed)
    try:
        bundle = task.build(cfg)  # model + processor (policy), train and eval datasets
    except (OSError, RuntimeError) as exc:
        # OSError: transformers cannot reach the Hub for the model; RuntimeError: datasets cannot load the data.
        print(f"error: could not load model {cfg.model.name_or_path!r} or dataset {cfg.data.train!r} "
              f"({type(exc).__name__}: {exc})\nThis example downloads both from the Hugging Face Hub. On a machine "
              "without network access, download them elsewhere and pass local paths, e.g. "
              "model.name_or_path=/path/to/Qwen2.5-VL-3B-Instruct data.train=/path/to/geometry3k "
              "data.eval=/path/to/geometry3k", file=sys.stderr)
        return 1
    task.cold_start(cfg, bundle, show_progress=cfg.logging.progress_bar)  # a no-op unless cold_start.steps > 0

    trainer = mmrl.Trainer(cfg, bundle.policy, bundle.train_dataset, bundle.eval_dataset)
    evaluating = bundle.eval_dataset is not None
    before = trainer.evaluate() if evaluating and not args.skip_eval_before else None
    if before is not None and main_process:
        print(f"held-out {cfg.eval.reward} before RL: {100 * before['accuracy']:.1f}% "
              f"({int(before['num_samples'])} problems)", flush=True)

    trainer.train()

    after = trainer.evaluate() if evaluating and not args.skip_eval_after else None
    if main_process:
        if after is not None:
            line = f"held-out {cfg.eval.reward} after RL:  {100 * after['accuracy']:.1f}%"
            if before is not None:
                line += f"  [{100 * (after['accuracy'] - before['accuracy']):+.1f} points]"
            print(line)
        out = Path(cfg.output_dir)
        print(f"reward curve: {out / 'reward_curve.png'}   metrics: {out / 'metrics.jsonl'}   "
              f"time: {(time.perf_counter() - start) / 60:.1f} min")
    trainer.close()  # ends the process group under `accelerate launch` (a gloo process can abort at exit without it)
    return 0


if __name__ == "__main__":
    sys.exit(main())
