"""Benchmark: host memory (process RSS) over the RL steps of the offline vision demo.

Runs ``--steps`` rollout steps of ``configs/vision/demo.yaml`` in this process through the public API
(config → ``task.build`` → ``Trainer(...).train()``), with only the RL loop: no cold start, no held-out
evaluation, no checkpoints, no progress bar, outputs in a temporary directory. The process RSS is read
after every rollout step; reported: RSS at the end of warm-up, RSS at the last step, and the least-squares
slope over steps ``warmup..steps`` in MiB per 100 steps. Target (issue 9): ≈ +2 MiB / 100 steps, no more.

Prints a one-line table. Only with ``--write`` does it replace its section of BENCHMARKS.md (between
``<!-- memory_slope:start -->`` and ``<!-- memory_slope:end -->``, appended if absent).

    python bench/memory_slope.py [--steps 200] [--warmup 20] [--config configs/vision/demo.yaml] [--write]
                                 [key=value ...]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benches' shared helpers
import _sections  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"
SECTION = "memory_slope"
# Only the RL loop: checkpoints, evaluation and the progress bar are off (the cold start is simply not run).
RL_ONLY = ["save_steps=0", "save_final=false", "logging.progress_bar=false", "eval.before_training=false",
           "eval.after_training=false", "eval.every_steps=0"]


def rss_mib() -> float:
    """Resident set size of this process, in MiB (psutil when installed, else /proc/self/statm)."""
    try:
        import psutil
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return psutil.Process().memory_info().rss / 2**20


def slope_per_100(samples: dict[int, float], first: int, last: int) -> float:
    """Least-squares slope of RSS (MiB) against step over steps ``first..last`` (inclusive), per 100 steps."""
    points = [(s, v) for s, v in sorted(samples.items()) if first <= s <= last]
    if len(points) < 2:
        raise ValueError(f"need at least two samples in steps {first}..{last}, got {len(points)}")
    mx = sum(s for s, _ in points) / len(points)
    my = sum(v for _, v in points) / len(points)
    sxx = sum((s - mx) ** 2 for s, _ in points)
    sxy = sum((s - mx) * (v - my) for s, v in points)
    return 100 * sxy / sxx


class StepRSS:
    """RSS after every rollout step of ``trainer``: wraps its one-step method on the instance when it has
    one (the trainer itself is not modified); otherwise a thread polls ``trainer.rollout_step``."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.samples: dict[int, float] = {int(trainer.rollout_step): rss_mib()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        step = getattr(trainer, "_rollout_step", None)
        if callable(step):
            self.mode = "per-step hook"

            def wrapped(*args, **kwargs):
                out = step(*args, **kwargs)
                self.samples[int(trainer.rollout_step)] = rss_mib()
                return out

            trainer._rollout_step = wrapped
        else:
            self.mode = "polling rollout_step every 10 ms"
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()

    def _poll(self) -> None:
        seen = int(self.trainer.rollout_step)
        while not self._stop.wait(0.01):
            now = int(self.trainer.rollout_step)
            if now != seen:
                self.samples[now] = rss_mib()
                seen = now

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def measure(config: str, steps: int, overrides: list[str], cold_start: bool = False) -> tuple[dict[int, float], str]:
    """Run ``steps`` RL steps of ``config``; returns {rollout step: RSS MiB} (step 0 = before training)."""
    from accelerate.utils import set_seed

    from mmrl.cli import _load
    from mmrl.trainer import Trainer

    if not Path(config).exists() and (ROOT / config).exists():  # repo-relative, from any working directory
        config = str(ROOT / config)
    with tempfile.TemporaryDirectory(prefix="memory_slope_") as tmp:
        cfg, module = _load(config, [*RL_ONLY, f"max_steps={steps}", f"output_dir={tmp}", *overrides])
        set_seed(cfg.seed)
        task = module.build(cfg)
        if cold_start and hasattr(module, "cold_start"):
            module.cold_start(cfg, task, show_progress=False)
        trainer = Trainer(cfg, task.policy, task.train_dataset, task.eval_dataset)
        recorder = StepRSS(trainer)
        try:
            trainer.train()
        finally:
            recorder.close()
    return recorder.samples, recorder.mode


def update_section(text: str, body: str, name: str = SECTION) -> str:
    return _sections.update_section(text, body, name)

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="RL rollout steps")
    parser.add_argument("--warmup", type=int, default=20, help="steps before the slope is fitted")
    parser.add_argument("--config", default="configs/vision/demo.yaml")
    parser.add_argument("--cold-start", action="store_true", help="run the config's SFT cold start first")
    parser.add_argument("--write", action="store_true", help="replace this benchmark's section of BENCHMARKS.md")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for mmrl train")
    args = parser.parse_args(argv)
    if not 0 <= args.warmup < args.steps:
        parser.error(f"need 0 <= --warmup < --steps, got warmup {args.warmup}, steps {args.steps}")
    return args


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    import torch

    samples, mode = measure(args.config, args.steps, args.overrides, args.cold_start)
    if max(samples) < args.steps:
        raise SystemExit(f"training stopped after rollout step {max(samples)} of {args.steps}; no result")
    warm, last = samples[args.warmup], samples[max(samples)]
    slope = slope_per_100(samples, args.warmup, args.steps)
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    header = (f"| date | config | steps | RSS after step {args.warmup} | after step {args.steps} | "
              f"slope, steps {args.warmup}–{args.steps} | machine |")
    row = (f"| {datetime.date.today()} | `{args.config}` (RL only) | {args.steps} | {warm:.1f} MiB | {last:.1f} MiB | "
           f"**{slope:+.2f} MiB / 100 steps** | {machine} |")
    print(header)
    print(row)
    if args.write:
        command = shlex.join(["python", "bench/memory_slope.py", *(argv if argv is not None else sys.argv[1:])])
        body = (f"## Host memory over RL steps\n\n`{command}`: {args.steps} rollout steps of `{args.config}` "
                f"in one process ({'after' if args.cold_start else 'no'} cold start; no evaluation or checkpoints; "
                "outputs in a temporary directory), "
                f"process RSS read after every step ({mode}); slope = least-squares fit over steps "
                f"{args.warmup}–{args.steps}. Target: ≈ +2 MiB / 100 steps, no more.\n\n"
                f"{header}\n|---|---|---|---|---|---|---|\n{row}")
        text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
        BENCHMARKS.write_text(update_section(text, body))
        print(f"updated {BENCHMARKS}")
    return {"rss_warmup_mib": warm, "rss_last_mib": last, "slope_mib_per_100": slope}


if __name__ == "__main__":
    main()
