"""Run logging: ``metrics.jsonl`` always, TensorBoard and W&B through ``report_to``, and a reward-curve PNG.

``metrics.jsonl`` holds one JSON object per optimizer step with at least ``step`` and ``reward`` (mean
total reward of the completions that step trained on), so runs can be compared without any tool.
"""

from __future__ import annotations

import json
import logging
import math
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
                 project: str = "mmrl", run_name: str | None = None, resume: bool = False):
        unknown = [r for r in report_to if r not in REPORTERS]
        if unknown:
            raise ValueError(f"unknown report_to entries {unknown}; valid: {list(REPORTERS)}")
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        # metrics.jsonl is written whatever report_to says: it is the run's record.
        self.jsonl_path = self.output_dir / "metrics.jsonl"
        self._jsonl = self.jsonl_path.open("a" if resume else "w")
        self._tb = None
        self._wandb = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"))
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError:
                logger.warning("report_to includes 'wandb' but wandb is not installed; skipping W&B logging")
            else:
                self._wandb = wandb.init(project=project, name=run_name, config=config, dir=str(self.output_dir))
        self.history: list[dict[str, Any]] = []

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
