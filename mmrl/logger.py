"""Run logging: ``metrics.jsonl`` always, TensorBoard and W&B through ``report_to``, and a reward-curve PNG.

``metrics.jsonl`` holds one JSON object per optimizer step with at least ``step`` and ``reward`` (mean
total reward of the completions that step trained on), so runs can be compared without any tool.

A resumed run passes ``resume_step``: rows after the checkpoint's step (logged by the killed run after its
last save) are cut from ``metrics.jsonl`` and TensorBoard, so the file reads as one uninterrupted run and
``history`` covers the whole run, not only the resumed part.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

REPORTERS = ("jsonl", "tensorboard", "wandb", "none")


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; null reads as "not available"
    return value


class MetricsLogger:
    """Writes scalar metrics to every configured sink. Only the main process should create one."""

    def __init__(self, output_dir: str | Path, report_to: list[str], config: dict | None = None,
                 project: str = "mmrl", run_name: str | None = None, resume_step: int | None = None):
        unknown = [r for r in report_to if r not in REPORTERS]
        if unknown:
            raise ValueError(f"unknown report_to entries {unknown}; valid: {list(REPORTERS)}")
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        # metrics.jsonl is written whatever report_to says: it is the run's record.
        self.jsonl_path = self.output_dir / "metrics.jsonl"
        self.history: list[dict[str, Any]] = []
        if resume_step is not None:
            self.history = _cut_after(self.jsonl_path, resume_step)
        self._jsonl = self.jsonl_path.open("a" if resume_step is not None else "w")
        self._tb = None
        self._wandb = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides the killed run's events after the checkpoint's step.
            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"), purge_step=purge)
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError:
                logger.warning("report_to includes 'wandb' but wandb is not installed; skipping W&B logging")
            else:
                self._wandb = wandb.init(project=project, name=run_name, config=config, dir=str(self.output_dir),
                                         resume="allow" if resume_step is not None else None)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.history.append(row)
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step" and v is not None}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _cut_after(path: Path, step: int) -> list[dict[str, Any]]:
    """Keep the rows of ``path`` with ``step <= step`` (rewriting it atomically); return them. A torn last
    line (the process was killed mid-write) is dropped too."""
    if not path.is_file():
        return []
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                dropped += 1
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                kept.append(row)
            else:
                dropped += 1
    if dropped:
        logger.info("resume: dropped %d rows of %s logged after step %d", dropped, path.name, step)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return kept


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_reward_curve(rows: list[dict[str, Any]], path: str | Path, title: str = "reward",
                      key: str = "reward", window: int = 10) -> Path:
    """Reward per step with a moving average, saved as a PNG (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if points:
        steps, values = zip(*points)
        ax.plot(steps, values, color="tab:blue", alpha=0.35, linewidth=1, label=key)
        w = max(1, min(window, len(values)))
        smooth = [sum(values[max(0, i - w + 1): i + 1]) / len(values[max(0, i - w + 1): i + 1])
                  for i in range(len(values))]
        ax.plot(steps, smooth, color="tab:blue", linewidth=2, label=f"{key} (moving mean, {w} steps)")
        ax.legend(loc="lower right")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
