"""bench/vs_trl.py: mmrl and TRL's GRPOTrainer side by side, each in its own process.

One real run with the tiny settings (the 0.7M model shape, 56×56 images, 4-token completions, one step):
both sides report, with equal completion-token counts; it writes no tracked file. The rest is fast: the
reward, the summary, and the loud failure when the two sides generate different numbers of tokens."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_benchmarks import load_bench, tracked_outputs

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "vs_trl.py"


def load(name: str):
    return load_bench(ROOT / "bench" / f"{name}.py")


def test_tiny_run_reports_both_sides_with_equal_tokens():
    """The whole pipeline end to end (≈40 s on a loaded 2-core CPU, mostly imports in the two children)."""
    before = tracked_outputs()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, str(SCRIPT), "--steps", "1", "--warmup", "0", "--tokens", "4", "--tiny"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=170)
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    out = run.stdout
    assert re.search(r"step time mmrl/TRL: \d+\.\d+", out) and re.search(r"peak RSS mmrl/TRL: \d+\.\d+", out)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith("| mmrl |") or line.startswith("| TRL |")}
    assert set(rows) == {"mmrl", "TRL"}
    # columns: step, generate, forward, backward, other, images, completion tokens, RSS
    assert rows["mmrl"][6] == rows["TRL"][6] == "64"  # 2 prompts × 8 completions × 4 tokens
    # TRL encodes each completion's copy of its image, twice (generation and forward): 2 × 16; mmrl each of
    # the 2 unique images once per pass (generation, training forward): 2 + 2
    assert int(rows["TRL"][5].split()[0]) == 32
    assert int(rows["mmrl"][5].split()[0]) == 4
    assert "TRL 1." in out
    assert tracked_outputs() == before


def test_reward_reads_both_completion_forms():
    workers = load("_vs_trl_workers")
    text = "<answer>red</answer>"
    assert workers.bench_reward(None, [text]) == workers.bench_reward(None, [[{"role": "assistant", "content": text}]])
    assert all(0.0 <= r <= 1.0 for r in workers.bench_reward(None, ["a", "bb", "ccc"]))


def reply(step_s: float, tokens: int = 64) -> dict:
    return {"step_s": step_s, "phases": {"generate": step_s / 2, "forward": step_s / 4, "backward": step_s / 8},
            "images": {"generate": 16, "forward": 16, "backward": 0, "other": 0}, "completion_tokens": tokens,
            "rss_kb": 1024 * 500}


def test_report_ratios_and_phases():
    bench = load("vs_trl")
    results = {"steps": {"mmrl": [reply(1.0), reply(3.0), reply(2.0)], "trl": [reply(4.0)] * 3,
                         "mmrl_papo": [reply(2.4)] * 3}}
    text = bench.report(results)
    assert "step time mmrl/TRL: 0.500** (2.000 s vs 4.000 s)" in text
    assert "peak RSS mmrl/TRL: 1.000" in text and "PAPO/GRPO step time: 1.200" in text
    assert "| mmrl | 2.000 s | 1.000 s (50%) | 0.500 s (25%) | 0.250 s (12%) | 0.250 s (12%) | 32 (16 + 16 + 0) | 64 |" in text


def test_unequal_completion_tokens_fail_loudly(monkeypatch):
    bench = load("vs_trl")

    class FakeChild:
        def __init__(self, system, spec, log_dir):
            self.system, self.tokens = system, spec["prompts"] * spec["group"] * spec["tokens"]

        def read(self):
            return {"ready": True}

        def step(self):
            return reply(1.0, self.tokens - (self.system == "trl"))

        def close(self):
            pass

    monkeypatch.setattr(bench, "build_model", lambda out_dir, tiny: 1)
    monkeypatch.setattr(bench, "Child", FakeChild)
    with pytest.raises(RuntimeError, match="completion tokens differ"):
        bench.measure(bench.parse_args(["--steps", "1", "--warmup", "0", "--tokens", "4"]), ["mmrl", "trl"])


def test_write_replaces_its_section(tmp_path, monkeypatch):
    bench = load("vs_trl")
    target = tmp_path / "BENCHMARKS.md"
    target.write_text("# Benchmarks\n\nkept\n")
    monkeypatch.setattr(bench, "BENCHMARKS", target)
    versions = {"trl": "1.16.0", "transformers": "5.24.0", "torch": "2"}
    monkeypatch.setattr(bench, "measure", lambda args, systems: {
        "model_params": 4e6, "ready": {"trl": {"versions": versions}},
        "steps": {"mmrl": [reply(1.0)], "trl": [reply(2.0)]}})
    for _ in range(2):
        bench.main(["--steps", "1", "--write"])
    text = target.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n") and text.count("<!-- vs_trl:start -->") == 1
    assert "`python bench/vs_trl.py --steps 1 --write`" in text and "step time mmrl/TRL: 0.500" in text
