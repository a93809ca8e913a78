"""``examples/minimal_grpo.py``, the newcomer's recipe, runs as written (a few steps, offline)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_minimal_grpo_runs_end_to_end(tmp_path):
    out = subprocess.run([sys.executable, "examples/minimal_grpo.py", "--steps", "2", "--output-dir", str(tmp_path)],
                         cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    before = re.search(r"held-out accuracy before RL: ([\d.]+)%", out.stdout)
    after = re.search(r"held-out accuracy after RL:  ([\d.]+)%", out.stdout)
    assert before and after and 0 <= float(after.group(1)) <= 100
    assert re.search(r"reward: first step [\d.]+, last step [\d.]+", out.stdout)
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2  # one row per GRPO step
    assert (tmp_path / "checkpoint-2" / "model").is_dir()
