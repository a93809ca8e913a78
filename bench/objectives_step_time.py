"""Benchmark: step time of every registered objective relative to ``ppo`` on the tiny offline config.

One trainer per objective (``mmrl.objectives.OBJECTIVES``), all built from ``configs/vision/demo.yaml`` with
only the RL loop (no cold start, no evaluation, no checkpoints, no progress bar, outputs in a temporary
directory), from the same starting weights and the same data. Each objective gets its preset's algorithm
settings (``mmrl.config.PRESETS[name]``: clip range and aggregation), passed as overrides because the demo
file's own ``algorithm:`` values would win over a ``preset:``. The steps are interleaved: every round runs
one step of each objective, in an order rotated by one each round, so machine noise falls on all of them
alike; after ``--warmup`` rounds the median of each objective's per-step wall time (the trainer's
``step_time``: collect → rewards → advantages → preparation → update) is compared with ``ppo``'s.
Expectation (issue 10): all within a few percent — the objectives differ only in a few element-wise ops
on ``[B, T]`` tensors. With the demo's one update per rollout no old-log-prob pass runs for any of them;
pass ``mini_batch_size=32`` to time two updates per rollout (then every objective scores the rollout once
more, alike).

Prints a table. Only with ``--write`` does it replace its section of BENCHMARKS.md (between
``<!-- objectives_step_time:start -->`` and ``<!-- objectives_step_time:end -->``, appended if absent).

    python bench/objectives_step_time.py [--rounds 20] [--warmup 3] [--write] [key=value ...]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benches' shared helpers
import _sections  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"
SECTION = "objectives_step_time"
CONFIG = "configs/vision/demo.yaml"
RL_ONLY = ["cold_start.steps=0", "save_steps=0", "save_final=false", "logging.progress_bar=false",
           "logging.report_to=[jsonl]", "logging.log_completions=0", "eval.before_training=false",
           "eval.after_training=false", "eval.every_steps=0"]


def objective_names() -> list[str]:
    """Every registered objective, ``ppo`` (the reference) first."""
    from mmrl.objectives import OBJECTIVES

    return ["ppo", *sorted(name for name in OBJECTIVES if name != "ppo")]


def preset_overrides(objective: str) -> list[str]:
    """``algorithm.*`` overrides selecting ``objective`` with its preset's values (``ppo``: the defaults)."""
    from mmrl.config import PRESETS

    values = PRESETS.get(objective, {}).get("algorithm", {}) if objective != "ppo" else {}
    values = {"objective": objective, **values}
    return [f"algorithm.{key}={value}" for key, value in values.items()]


def build_trainer(objective: str, base_state: dict, out_dir: str, overrides: list[str]):
    from mmrl.config import load_config
    from mmrl.trainer import Trainer
    from vision import task as vision_task

    cfg = load_config(ROOT / CONFIG, [*RL_ONLY, f"output_dir={out_dir}", "max_steps=1",
                                      *preset_overrides(objective), *overrides],
                      section_types=vision_task.SECTION_TYPES)
    bundle = vision_task.build(cfg)
    bundle.policy.model.load_state_dict(base_state)  # identical starting weights for every objective
    trainer = Trainer(cfg, bundle.policy, bundle.train_dataset)
    trainer.config.max_steps = 0  # one_step() raises it by one per call
    return trainer


def one_step(trainer) -> tuple[float, float]:
    """One more rollout step; its wall time (s) and mean completion length (tokens)."""
    trainer.config.max_steps += 1
    row = trainer.train()[-1]
    return row["step_time"], row["completions/mean_length"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="measured rounds (one step of each objective)")
    parser.add_argument("--warmup", type=int, default=3, help="rounds run first and not measured")
    parser.add_argument("--write", action="store_true", help="replace this benchmark's section of BENCHMARKS.md")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=f"config overrides on {CONFIG}")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        parser.error(f"need --rounds >= 1 and --warmup >= 0, got {args.rounds} and {args.warmup}")
    return args


def update_section(text: str, body: str, name: str = SECTION) -> str:
    return _sections.update_section(text, body, name)

def measure(rounds: int, warmup: int, overrides: list[str]) -> dict[str, dict[str, float]]:
    """{objective: {"step_s": median step time, "length": median mean completion length}}."""
    import torch

    from mmrl.config import load_config
    from vision import task as vision_task
    from vision.modeling import load_model_and_processor

    torch.manual_seed(0)
    names = objective_names()
    base_cfg = load_config(ROOT / CONFIG, [*RL_ONLY, *overrides], section_types=vision_task.SECTION_TYPES)
    base, _ = load_model_and_processor(base_cfg.model)
    state = copy.deepcopy(base.state_dict())
    times: dict[str, list[float]] = {name: [] for name in names}
    lengths: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="objectives_step_time_") as tmp:
        trainers = {name: build_trainer(name, state, f"{tmp}/{name}", overrides) for name in names}
        for r in range(warmup + rounds):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:  # rotated order: no objective always runs first
                step_s, length = one_step(trainers[name])
                if r >= warmup:
                    times[name].append(step_s)
                    lengths[name].append(length)
    return {name: {"step_s": statistics.median(times[name]), "length": statistics.median(lengths[name])}
            for name in names}


def table(results: dict[str, dict[str, float]]) -> str:
    reference = results["ppo"]["step_s"]
    lines = ["| objective | step time (median) | / ppo | completion length (median, tokens) |",
             "|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| `{name}` | {r['step_s']:.3f} s | **{r['step_s'] / reference:.3f}** | {r['length']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    args = parse_args(argv)
    import torch

    results = measure(args.rounds, args.warmup, args.overrides)
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    rows = table(results)
    print(rows)
    print(machine)
    if args.write:
        command = shlex.join(["python", "bench/objectives_step_time.py",
                              *(argv if argv is not None else sys.argv[1:])])
        extra = f" plus `{' '.join(args.overrides)}`" if args.overrides else ""
        body = (f"## Step time of each objective relative to `ppo`\n\n"
                f"`{command}` ({datetime.date.today()}; {machine}): `{CONFIG}`{extra}, RL loop only (no cold "
                f"start, evaluation or checkpoints), one trainer per objective from the same weights and data, "
                f"each with its preset's clip range and aggregation; one step of each objective per round in a "
                f"rotated order, {args.warmup} warm-up rounds, medians of {args.rounds} rounds. "
                f"Expectation: all within a few percent of `ppo`.\n\n{rows}")
        text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
        BENCHMARKS.write_text(update_section(text, body))
        print(f"updated {BENCHMARKS}")
    return results


if __name__ == "__main__":
    main()
