"""Benchmark: PAPO step time / GRPO step time on the tiny offline config, measured side by side.

PAPO adds one forward pass per step (the completions re-scored under masked images, no gradient), batched
per micro-batch like every other forward. Target: ratio <= 1.3. Two trainers start from the same weights
and the same data; their steps alternate (GRPO, PAPO, GRPO, ...) so machine load affects both alike, and
the median of per-step wall times is compared. Prints a table row; only with ``--write`` is it appended
to BENCHMARKS.md.

    python bench/papo_step_time.py [--rounds 20] [--warmup 3] [--write]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _sections  # noqa: E402

from mmrl.config import load_config
from mmrl.trainer import Trainer
from vision import task as vision_task

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"
SECTION = "papo_step_time"
HEADING = """## PAPO / GRPO step time

`python bench/papo_step_time.py --write` (one row per run): `configs/vision/papo_grpo_tiny.yaml`, the same
weights, one GRPO and one PAPO step alternating, medians after warm-up. Target ≤ 1.3.

| date | what | measured | ratio | machine |
|---|---|---|---|---|"""


def build_trainer(papo: bool, base, out_dir: str) -> Trainer:
    cfg = load_config(ROOT / "configs/vision/papo_grpo_tiny.yaml", [
        f"output_dir={out_dir}", f"papo.enabled={str(papo).lower()}", "max_steps=1", "save_final=false",
        "logging.progress_bar=false", "logging.report_to=[jsonl]", "cold_start.steps=0"],
        section_types=vision_task.SECTION_TYPES)
    task = vision_task.build(cfg)
    task.policy.model.load_state_dict(base.state_dict())  # identical starting weights
    trainer = Trainer(cfg, task.policy, task.train_dataset)
    trainer.config.max_steps = 0  # one_step() raises it by one per call
    return trainer


def one_step(trainer: Trainer) -> float:
    trainer.config.max_steps += 1
    history = trainer.train()
    return history[-1]["step_time"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="add the result row to its table in BENCHMARKS.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        base_cfg = load_config(ROOT / "configs/vision/papo_grpo_tiny.yaml", section_types=vision_task.SECTION_TYPES)
        from vision.modeling import load_model_and_processor

        base, _ = load_model_and_processor(base_cfg.model)
        grpo = build_trainer(False, copy.deepcopy(base), f"{tmp}/grpo")
        papo = build_trainer(True, copy.deepcopy(base), f"{tmp}/papo")
        times: dict[str, list[float]] = {"grpo": [], "papo": []}
        for i in range(args.warmup + args.rounds):
            for name, trainer in (("grpo", grpo), ("papo", papo)):
                t = one_step(trainer)
                if i >= args.warmup:
                    times[name].append(t)
    g, p = statistics.median(times["grpo"]), statistics.median(times["papo"])
    ratio = p / g
    line = (f"| {datetime.date.today()} | PAPO / GRPO step time, tiny offline config (P=8, G=8, 64 completions) | "
            f"GRPO {g:.3f} s, PAPO {p:.3f} s (medians of {args.rounds} alternating steps) | **{ratio:.2f}** "
            f"(target ≤ 1.3) | {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__} |")
    print(line)
    if args.write:
        BENCHMARKS.write_text(_sections.append_row(BENCHMARKS.read_text(), SECTION, HEADING, line))
        print(f"updated {BENCHMARKS}")

if __name__ == "__main__":
    main()
