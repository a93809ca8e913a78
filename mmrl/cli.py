"""The ``mmrl`` command.

    mmrl train CONFIG.yaml [key=value ...]   cold start (if configured) → held-out eval → GRPO → eval
    mmrl train CONFIG.yaml --resume [latest|DIR]   continue a killed or preempted run exactly
    mmrl sft   CONFIG.yaml [key=value ...]   supervised cold start only; saves a model loadable by path
    mmrl rewards                            list registered reward functions
    mmrl compare CONFIG --presets a,b --seeds 0,1   one run per preset and seed; table + reward plot (mmrl.compare)
    mmrl eval --model M --benchmarks a,b ...  VLM benchmarks (vision.evaluate; `mmrl eval -h`)
    mmrl eval-gen --model M --suite ...       image-generation evaluation (image_gen.evaluate)

This module (and :data:`TASKS`) is the one place that knows about the task packages; it imports
them by name only when a config asks for them.
"""

from __future__ import annotations

import argparse
import builtins
import importlib
import json
import logging
import sys
import time
from pathlib import Path

from mmrl import __version__, compare
from mmrl.checkpoint import CheckpointError
from mmrl.config import ConfigError, load_config, load_yaml, to_dict
from mmrl.config_checks import validate_config
from mmrl.processes import end_processes

logger = logging.getLogger("mmrl")

# task name -> module providing SECTION_TYPES, build(cfg) and optionally cold_start(cfg, task)
TASKS = {"vision": "vision.task", "image_gen": "image_gen.task"}
# command -> module with ``cli_main(argv) -> int`` that parses its own flags
EVAL_COMMANDS = {"eval": ("vision.evaluate", "evaluate a VLM on multimodal benchmarks (or re-score predictions)"),
                 "eval-gen": ("image_gen.evaluate", "evaluate an image generator (GenEval-like suite, FID/IS/KID, CLIP)")}


def _task_module(name: str):
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; available tasks: {sorted(TASKS)}")
    return importlib.import_module(TASKS[name])


def _load(config_path: str, overrides: list[str]):
    raw = load_yaml(config_path)
    task_name = raw.get("task", "vision")
    for item in overrides:  # `task=...` on the command line decides the schema too
        if item.startswith("task="):
            task_name = item.partition("=")[2]
    module = _task_module(task_name)
    cfg = load_config(config_path, overrides, section_types=module.SECTION_TYPES)
    # Every range, name and path, before any model loads or any cold start runs (one error lists them all).
    validate_config(cfg, task_checks=getattr(module, "validate", None))
    return cfg, module


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("mmrl").setLevel(logging.INFO)
    for name in ("vision", "image_gen"):
        logging.getLogger(name).setLevel(logging.INFO)


def _fmt(value: float) -> str:
    return f"{100 * value:.1f}%"


def _resume_point(cfg) -> Path | None:
    """The checkpoint this run continues from (``None``: a fresh run), decided before anything heavy runs."""
    from mmrl.checkpoint import resolve_resume, verify_checkpoint

    if not cfg.resume_from:
        return None
    path = resolve_resume(cfg.resume_from, Path(cfg.output_dir))
    if path is None:
        print(f"--resume latest: no checkpoint in {cfg.output_dir} yet; starting a new run")
        cfg.resume_from = None
        return None
    verify_checkpoint(path)  # a damaged file is reported now, not after the model has loaded
    cfg.resume_from = str(path)
    return path


def cmd_train(args: argparse.Namespace) -> int:
    from accelerate.utils import get_int_from_env, set_seed

    from mmrl.checkpoint import isolated_rng
    from mmrl.trainer import Trainer

    overrides = list(args.overrides) + ([f"resume_from={args.resume}"] if args.resume else [])
    cfg, module = _load(args.config, overrides)
    resume = _resume_point(cfg)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # Under `accelerate launch` every process runs this; one prints and writes the run's files.
    # (The launcher's rank variable, not accelerate's state: creating that here would fix its settings
    # before the trainer's Accelerator reads them, e.g. ACCELERATE_USE_CPU.)
    main_process = get_int_from_env(["RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"], 0) == 0
    print = builtins.print if main_process else _quiet  # noqa: A001
    if main_process:
        (output_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
    set_seed(cfg.seed)
    start = time.perf_counter()
    task = module.build(cfg)
    summary: dict[str, float | str] = {"config": args.config}
    if resume is None and hasattr(module, "cold_start"):
        sft = module.cold_start(cfg, task, show_progress=cfg.logging.progress_bar)
        summary.update(sft)
        if sft:
            print(f"cold start: {int(sft['sft/steps'])} SFT steps, final loss {sft['sft/final_loss']:.3f}")
    trainer = Trainer(cfg, task.policy, task.train_dataset, task.eval_dataset)
    evaluating = task.eval_dataset is not None
    label = getattr(task, "eval_label", "held-out")  # a task says when its evaluation set is not held out
    if resume is not None:
        # What the killed run measured before training (cold start, accuracy before RL) comes from the
        # checkpoint: measuring it again now would measure the partly trained model.
        summary.update(trainer.run_info)
        print(f"resuming from {resume} (rollout step {trainer.rollout_step} of {cfg.max_steps})")
    else:
        if hasattr(module, "save_samples"):  # tasks whose outputs are better looked at than read
            with isolated_rng(cfg.seed):  # never shifts the training run's random streams
                print(f"samples before RL: {module.save_samples(cfg, task, output_dir / 'samples_before.png')}")
        if evaluating and cfg.eval.before_training:
            before = trainer.evaluate()
            summary["accuracy_before"] = before["accuracy"]
            print(f"{label} {cfg.eval.reward} before RL: {_fmt(before['accuracy'])} "
                  f"({int(before['num_samples'])} samples)")
        trainer.run_info = {k: v for k, v in summary.items() if k != "config"}
    history = trainer.train()
    if trainer.preempted:
        summary["preempted_at_step"] = trainer.rollout_step
        summary["wall_time_s"] = time.perf_counter() - start
        _write_summary(output_dir, summary, main_process)
        print(f"stopped at rollout step {trainer.rollout_step} of {cfg.max_steps}; checkpoint saved. Resume with:\n"
              f"  mmrl train {args.config} {' '.join(args.overrides)} --resume latest".rstrip())
        return 0
    if evaluating and cfg.eval.after_training:
        after = trainer.evaluate()
        summary["accuracy_after"] = after["accuracy"]
        line = f"{label} {cfg.eval.reward} after RL:  {_fmt(after['accuracy'])} ({int(after['num_samples'])} samples)"
        if "accuracy_before" in summary:
            delta = after["accuracy"] - summary["accuracy_before"]
            summary["accuracy_gain"] = delta
            line += f"  [{'+' if delta >= 0 else ''}{100 * delta:.1f} points]"
        print(line)
    if hasattr(module, "save_samples"):
        with isolated_rng(cfg.seed):
            print(f"samples after RL:  {module.save_samples(cfg, task, output_dir / 'samples_after.png')}")
    if history:  # the whole run's history, a resumed run's included
        first = [r["reward"] for r in history[:10] if r.get("reward") is not None]
        last = [r["reward"] for r in history[-10:] if r.get("reward") is not None]
        if first and last:
            summary["reward_first10"] = sum(first) / len(first)
            summary["reward_last10"] = sum(last) / len(last)
            print(f"mean training reward: first 10 steps {summary['reward_first10']:.3f} → "
                  f"last 10 steps {summary['reward_last10']:.3f}")
    summary["wall_time_s"] = time.perf_counter() - start
    _write_summary(output_dir, summary, main_process)
    print(f"reward curve: {output_dir / 'reward_curve.png'}   metrics: {output_dir / 'metrics.jsonl'}   "
          f"time: {summary['wall_time_s']:.0f}s")
    return 0


def _quiet(*args, **kwargs) -> None:
    """``print`` on the processes other than the main one."""


def _write_summary(output_dir: Path, summary: dict, main_process: bool) -> None:
    if main_process:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=1))


def cmd_sft(args: argparse.Namespace) -> int:
    from accelerate.utils import set_seed

    cfg, module = _load(args.config, args.overrides)
    if not hasattr(module, "cold_start"):
        raise ConfigError(f"task {cfg.task!r} has no supervised cold start")
    if cfg.cold_start.steps <= 0:
        raise ConfigError("cold_start.steps must be > 0 for `mmrl sft` (e.g. add cold_start.steps=100)")
    set_seed(cfg.seed)
    task = module.build(cfg)
    cfg.cold_start.save = True
    metrics = module.cold_start(cfg, task, show_progress=cfg.logging.progress_bar)
    out = Path(cfg.output_dir) / "sft"
    print(f"SFT done: final loss {metrics['sft/final_loss']:.3f}; model saved to {out} "
          f"(use it with model.name_or_path={out})")
    return 0


def cmd_rewards(args: argparse.Namespace) -> int:
    from mmrl.rewards import available_rewards

    for module in TASKS.values():
        importlib.import_module(module)
    print("\n".join(available_rewards()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmrl", description="RL fine-tuning of multimodal models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level from every library")
    parser.add_argument("--version", action="version", version=f"mmrl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_text in (("train", cmd_train, "GRPO-family RL training (with optional SFT cold start)"),
                                ("sft", cmd_sft, "supervised cold start only (TRL SFTTrainer)")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", help="YAML config file, e.g. configs/vision/demo.yaml")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-5 output_dir=runs/x")
        p.set_defaults(fn=fn, resume=None)
        if name == "train":
            p.add_argument("--resume", nargs="?", const="latest", metavar="latest|DIR",
                           help="continue a run: 'latest' (the default when the flag is bare) is the newest "
                                "checkpoint in output_dir (a new run if there is none); or a checkpoint folder")
    p = sub.add_parser("rewards", help="list registered reward functions")
    p.set_defaults(fn=cmd_rewards)
    compare.add_parser(sub)
    for name, (_module, help_text) in EVAL_COMMANDS.items():  # listed here; their flags are their own
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _forward(command: str, argv: list[str], verbose: bool) -> int:
    module = importlib.import_module(EVAL_COMMANDS[command][0])
    try:
        code = module.cli_main(argv)
    except (ConfigError, FileNotFoundError, KeyError, ValueError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"mmrl {command}: error: {message}", file=sys.stderr)
        if verbose:
            raise
        return 2
    if code == 0:
        end_processes()  # see end_processes: a gloo process can abort at exit without it
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    verbose = bool(argv) and argv[0] in ("-v", "--verbose")
    rest = argv[1:] if verbose else argv
    if rest and rest[0] in EVAL_COMMANDS:
        _setup_logging(verbose)
        return _forward(rest[0], rest[1:], verbose)
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        code = args.fn(args)
    except (ConfigError, CheckpointError, FileNotFoundError, KeyError, ValueError) as exc:
        # Bad input: one clear line, no traceback (run with -v ... or python -m for details).
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"mmrl: error: {message}", file=sys.stderr)
        if args.verbose:
            raise
        return 2
    if not code:
        end_processes()
    return code


if __name__ == "__main__":
    sys.exit(main())
