"""Experiment: does PAPO do what the paper says on the offline task? GRPO vs PAPO, same settings, 3 seeds.

For each seed and method: the tiny Qwen2.5-VL, the same 25-step SFT cold start, 200 steps of RL from
``configs/vision/papo_grpo_tiny.yaml`` (PAPO on or off — nothing else differs), then on the held-out split:

- accuracy (greedy decoding), and
- perception KL: for the greedy completions, the mean per-token k3 estimate of KL(π(o|q,I) ‖ π(o|q,I_masked))
  with a fixed mask stream (14-px patches, p = 0.6), the same measurement for both methods.

Prints a markdown table; only with ``--write`` is it written to ``docs/papo_results.md``. Per-run results go
to ``--out`` (default ``runs/papo_vs_grpo``, not tracked). Runs take minutes each on a CPU.

    python bench/papo_vs_grpo.py [--seeds 0 1 2] [--steps 200] [--jobs 2] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "papo_results.md"


def run_one(method: str, seed: int, steps: int, out: Path) -> dict:
    import torch
    from accelerate.utils import set_seed

    from mmrl import Trainer, load_config
    from mmrl.algorithms import masked_mean, perception_kl
    from mmrl.policy import Sampling
    from vision import task as vision_task

    cfg = load_config(ROOT / "configs/vision/papo_grpo_tiny.yaml", [
        f"seed={seed}", f"max_steps={steps}", f"papo.enabled={'true' if method == 'papo' else 'false'}",
        f"output_dir={out}", "logging.progress_bar=false", "save_final=false"], section_types=vision_task.SECTION_TYPES)
    set_seed(seed)
    task = vision_task.build(cfg)
    vision_task.cold_start(cfg, task, show_progress=False)
    trainer = Trainer(cfg, task.policy, task.train_dataset, task.eval_dataset)
    before = trainer.evaluate()["accuracy"]
    history = trainer.train()
    after = trainer.evaluate()["accuracy"]

    # Held-out perception KL, measured the same way for both methods.
    policy, model = task.policy, task.policy.model
    model.eval()
    generator = torch.Generator().manual_seed(1234)
    kls = []
    with torch.no_grad():
        records = [task.eval_dataset[i] for i in range(len(task.eval_dataset))]
        for start in range(0, len(records), 64):
            rollout = policy.generate(model, records[start:start + 64], 1, Sampling(temperature=0.0, max_new_tokens=8))
            masked, _ = policy.masked_view(rollout, generator)
            logp, _ = policy.log_probs(model, rollout)
            masked_logp, _ = policy.log_probs(model, masked)
            kls.append(masked_mean(perception_kl(logp, masked_logp), rollout.completion_mask.float()).item())
    rewards = [r["reward"] for r in history]
    return {"method": method, "seed": seed, "acc_before": before, "acc_after": after,
            "heldout_perception_kl": sum(kls) / len(kls),
            "train_reward_last20": sum(rewards[-20:]) / len(rewards[-20:]),
            "train_perception_kl_last20": (sum(r["papo/perception_kl"] for r in history[-20:]) / 20
                                           if "papo/perception_kl" in history[-1] else None)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (each gets cores/jobs threads)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs/papo_vs_grpo")
    parser.add_argument("--write", action="store_true", help="write the table to docs/papo_results.md")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.one:  # a single run in a subprocess
        method, seed = args.one[0], int(args.one[1])
        result = run_one(method, seed, args.steps, args.out / f"{method}_seed{seed}")
        (args.out / f"{method}_seed{seed}.json").write_text(json.dumps(result))
        return

    args.out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 2) // args.jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    pending = [(m, s) for s in args.seeds for m in ("grpo", "papo")]
    running: list[subprocess.Popen] = []
    while pending or running:
        while pending and len(running) < args.jobs:
            method, seed = pending.pop(0)
            cmd = [sys.executable, __file__, "--steps", str(args.steps), "--out", str(args.out), "--one", method, str(seed)]
            running.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        running[0].wait()
        if running[0].returncode != 0:
            raise SystemExit(f"run failed: {running[0].args}")
        running.pop(0)

    results = [json.loads((args.out / f"{m}_seed{s}.json").read_text()) for s in args.seeds for m in ("grpo", "papo")]
    lines = ["| method | seed | held-out acc. before RL | after RL | held-out perception KL | train reward (last 20) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['method'].upper()} | {r['seed']} | {100 * r['acc_before']:.1f}% | {100 * r['acc_after']:.1f}% | "
                     f"{r['heldout_perception_kl']:.4f} | {r['train_reward_last20']:.3f} |")
    for method in ("grpo", "papo"):
        rows = [r for r in results if r["method"] == method]
        acc = [100 * r["acc_after"] for r in rows]
        kl = [r["heldout_perception_kl"] for r in rows]
        spread = f" ± {statistics.stdev(acc):.1f}" if len(acc) > 1 else ""
        lines.append(f"| **{method.upper()} mean** | {len(rows)} seeds | | **{statistics.mean(acc):.1f}%**{spread} | "
                     f"**{statistics.mean(kl):.4f}** | |")
    table = "\n".join(lines)
    print(table)
    if not args.write:
        return
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        "# GRPO vs PAPO on the offline task (measured)\n\n"
        f"`python bench/papo_vs_grpo.py --seeds {' '.join(map(str, args.seeds))} --steps {args.steps} --write`: tiny Qwen2.5-VL, "
        "`synthetic:single_shape`, 25-step SFT cold start, then RL with `configs/vision/papo_grpo_tiny.yaml` "
        "with PAPO on or off (nothing else differs). Perception KL: mean per-token k3 KL between the policy given "
        "the real and the masked image (14-px patches, p = 0.6, fixed mask stream), on the held-out split's greedy "
        "completions.\n\n" + table + "\n")


if __name__ == "__main__":
    main()
