"""PAPO on a CPU: GRPO plus PAPO's implicit perception loss, on the offline synthetic task.

What it does
    Loads ``configs/vision/papo_grpo_tiny.yaml`` (preset ``papo_grpo``: the paper's algorithm settings, with
    a learning rate and group size a 0.6M-parameter model can use), builds the tiny Qwen2.5-VL and the
    ``synthetic:single_shape`` data, runs the short SFT cold start, then trains with :class:`mmrl.Trainer`
    with ``papo.enabled``: every step, each prompt's images get one random patch mask (14-px patches,
    p = 0.6, shared by the prompt's whole group), the completions are re-scored under the masked images in
    one extra batched forward, and γ·KL(π(o|q,I) ‖ π(o|q,I_masked)) is subtracted from the loss.
    ``--no-papo`` runs the identical configuration without the perception term, for comparison.

How to run
    python examples/papo_offline.py                    # PAPO, 60 steps
    python examples/papo_offline.py --no-papo          # the same run as plain GRPO
    python examples/papo_offline.py --steps 200 papo.gamma=0.01 papo.eta_orig=0.03   # any config override

What to expect
    A few CPU-minutes. It prints held-out accuracy before and after RL and the perception KL at the start
    and end of training (``papo/perception_kl`` in ``<output-dir>/metrics.jsonl``; with ``--no-papo`` no
    masked pass runs, so no perception KL is logged — see ``bench/papo_vs_grpo.py`` for a comparison that
    measures it for both).
"""

from __future__ import annotations

import argparse
import time

from accelerate.utils import set_seed

from mmrl import Trainer, load_config
from vision import task as vision_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="GRPO/PAPO steps (default 60)")
    parser.add_argument("--no-papo", action="store_true", help="plain GRPO with otherwise identical settings")
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()

    name = "grpo" if args.no_papo else "papo"
    overrides = [f"max_steps={args.steps}", f"seed={args.seed}", f"papo.enabled={str(not args.no_papo).lower()}",
                 f"output_dir={args.output_dir or f'runs/example_{name}_seed{args.seed}'}", *args.overrides]
    cfg = load_config("configs/vision/papo_grpo_tiny.yaml", overrides, section_types=vision_task.SECTION_TYPES)
    set_seed(cfg.seed)
    start = time.perf_counter()
    task = vision_task.build(cfg)
    vision_task.cold_start(cfg, task)
    trainer = Trainer(cfg, task.policy, task.train_dataset, task.eval_dataset)
    before = trainer.evaluate()["accuracy"]
    history = trainer.train()
    after = trainer.evaluate()["accuracy"]
    print(f"{name}: held-out accuracy {100 * before:.1f}% -> {100 * after:.1f}%  ({time.perf_counter() - start:.0f}s)")
    kl = [row["papo/perception_kl"] for row in history if row.get("papo/perception_kl") is not None]
    if kl:
        head, tail = kl[: min(10, len(kl))], kl[-min(10, len(kl)):]
        print(f"perception KL (mean of first / last 10 steps): {sum(head) / len(head):.4f} -> {sum(tail) / len(tail):.4f}")
    print(f"metrics: {cfg.output_dir}/metrics.jsonl   reward curve: {cfg.output_dir}/reward_curve.png")


if __name__ == "__main__":
    main()
