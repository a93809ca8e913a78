"""Writing your own reward functions, and three ways to hand them to the trainer.

What it does
    Defines two reward functions with TRL's signature ``fn(prompts, completions, **columns) -> list[float | None]``
    and trains the offline tiny Qwen2.5-VL (see ``examples/offline_grpo.py``) on ``synthetic:single_shape``
    ("What colour is the circle?") with them, next to the built-in accuracy reward:

    * ``concise_colour`` — 1.0 when the completion's answer names the right colour *and* the whole
      completion is short (at most ``SHORT_CHARS`` characters); registered under that name with
      ``@mmrl.register_reward("concise_colour")``, so configs and ``Trainer`` can refer to it by name;
    * ``length_penalty`` — 0 for a completion up to ``SHORT_CHARS`` characters, falling linearly to -1 at
      twice that; not registered, passed to the trainer as a plain callable.

    The rewards are combined as a weighted sum::

        Trainer(cfg, policy, train, eval,
                reward_funcs=[accuracy, length_penalty, "concise_colour"],   # callables or registry names
                reward_weights=[1.0, 0.2, 0.5])

    ``reward_funcs`` given to the ``Trainer`` replace ``cfg.rewards``. Before training, the script prints
    what each function returns for a few hand-written completions, so the reward shapes can be checked
    without a model.

Writing a reward function
    * ``prompts[i]`` and ``completions[i]`` belong to sample ``i`` of the rollout (the completions of one
      prompt's group are consecutive). For the vision task a completion is the decoded text.
    * Every other dataset column arrives as a keyword argument with one value per sample: here
      ``answer`` (the gold colour), ``task`` and ``choices``. Accept ``**kwargs`` so that unused columns
      are ignored.
    * Return one float per completion, or ``None`` for "no opinion" (the weighted sum skips it). A
      function that raises is logged and treated as missing for that batch; training goes on.

Using the functions from a YAML config (``mmrl train``)
    A registered name works once the module defining it has been imported; a ``path/to/file.py:function``
    entry imports the file itself (the path is relative to the working directory)::

        rewards:
          - {name: accuracy, weight: 1.0}
          - {name: examples/custom_reward.py:length_penalty, weight: 0.2}

    e.g. ``mmrl train configs/vision/demo.yaml
    'rewards=[{name: accuracy}, {name: examples/custom_reward.py:length_penalty, weight: 0.2}]'``.

How to run
    python examples/custom_reward.py                # 10 GRPO steps
    python examples/custom_reward.py --steps 5      # a quick check

What to expect
    One to a few minutes on a 2-core CPU (the cold start and the four evaluations are a good part of it);
    ten steps are too few for large changes, this example is about the plumbing. The script prints the reward table for the hand-written completions, the held-out accuracy and
    ``concise_colour`` score before and after RL, and the mean of every reward function over the first
    and last training steps (from ``<output-dir>/metrics.jsonl``, keys ``rewards/<name>/mean``).
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from pathlib import Path
from typing import Any

from accelerate.utils import set_seed

import mmrl
from mmrl.config import EvalConfig, LoggingConfig, OptimConfig
from vision import task
from vision.data import VisionDataConfig
from vision.modeling import VisionModelConfig
from vision.rewards import accuracy, completion_text, extract_answer
from vision.sft import ColdStartConfig

SHORT_CHARS = 24  # "<answer>yellow</answer>" is 23 characters


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


@mmrl.register_reward("concise_colour")
def concise_colour(prompts: list, completions: list, answer: list[str] | None = None,
                   **kwargs: Any) -> list[float | None]:
    """1.0 if the ``<answer>`` block names the gold colour and the completion has at most ``SHORT_CHARS``
    characters, else 0.0; ``None`` (no opinion) where a sample has no gold answer."""
    golds = answer if answer is not None else [None] * len(completions)
    scores: list[float | None] = []
    for completion, gold in zip(completions, golds, strict=True):
        if not gold:
            scores.append(None)
            continue
        text = completion_text(completion).strip()
        predicted = extract_answer(text)
        names_colour = predicted is not None and str(gold).lower() in _words(predicted)
        scores.append(1.0 if names_colour and len(text) <= SHORT_CHARS else 0.0)
    return scores


def length_penalty(prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
    """0.0 up to ``SHORT_CHARS`` characters, then linearly down to -1.0 at ``2 * SHORT_CHARS`` and beyond."""
    excess = [max(0, len(completion_text(c).strip()) - SHORT_CHARS) / SHORT_CHARS for c in completions]
    return [-min(1.0, x) if x > 0 else 0.0 for x in excess]


def show_reward_table() -> None:
    """Score a few hand-written completions for a prompt whose gold answer is "red"."""
    completions = ["<answer>red</answer>", "<answer>blue</answer>", "<answer>red</answer> red red red red",
                   "red", "I think the circle is red. <answer>red</answer>"]
    prompts = [[{"role": "user", "content": "What colour is the circle?"}]] * len(completions)
    columns = {"answer": ["red"] * len(completions)}
    table = {name: fn(prompts, completions, **columns)
             for name, fn in (("accuracy", accuracy), ("length_penalty", length_penalty),
                              ("concise_colour", mmrl.get_reward("concise_colour")))}
    print(f"{'completion (gold: red)':<50}" + "".join(f"{name:>16}" for name in table))
    for i, completion in enumerate(completions):
        print(f"{completion!r:<50}" + "".join(f"{values[i]:>16.2f}" for values in table.values()))


def build_config(steps: int, output_dir: str, seed: int, progress_bar: bool) -> mmrl.TrainConfig:
    """Like examples/offline_grpo.py, with completions long enough (16 tokens) for length to matter."""
    return mmrl.TrainConfig(
        output_dir=output_dir, seed=seed, max_steps=steps, prompts_per_step=8, group_size=8, micro_batch_size=64,
        model=VisionModelConfig(name_or_path="tiny-qwen2.5-vl", min_pixels=56 * 56, max_pixels=112 * 112),
        data=VisionDataConfig(train="synthetic:single_shape", eval="synthetic:single_shape", template="answer",
                              max_train_samples=1024, max_eval_samples=128),
        cold_start=ColdStartConfig(steps=25, lr=2e-3, batch_size=16, answer_format="answer"),
        sampling=mmrl.Sampling(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=16),
        optim=OptimConfig(lr=3e-4),
        eval=EvalConfig(reward="accuracy", batch_size=64),
        logging=LoggingConfig(report_to=["jsonl"], log_completions=0, progress_bar=progress_bar),
    )


def mean_of(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else float("nan")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="GRPO rollout steps")
    parser.add_argument("--output-dir", default="runs/examples/custom_reward")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    show_reward_table()

    start = time.perf_counter()
    cfg = build_config(args.steps, args.output_dir, args.seed, not args.no_progress)
    set_seed(cfg.seed)
    bundle = task.build(cfg)  # policy (model + processor) and datasets from the config's task sections
    sft = task.cold_start(cfg, bundle, show_progress=cfg.logging.progress_bar)  # TRL SFTTrainer, in place
    if sft:  # empty when cold_start.steps is 0
        print(f"cold start: {cfg.cold_start.steps} SFT steps, final loss {sft['sft/final_loss']:.3f}")

    trainer = mmrl.Trainer(cfg, bundle.policy, bundle.train_dataset, bundle.eval_dataset,
                           reward_funcs=[accuracy, length_penalty, "concise_colour"],
                           reward_weights=[1.0, 0.2, 0.5])
    before = {name: trainer.evaluate(reward=name)["accuracy"] for name in ("accuracy", "concise_colour")}
    history = trainer.train()
    after = {name: trainer.evaluate(reward=name)["accuracy"] for name in ("accuracy", "concise_colour")}

    for name in before:
        print(f"held-out {name:<15} before RL {100 * before[name]:5.1f}%   after RL {100 * after[name]:5.1f}%")
    k = max(1, min(10, len(history) // 2))
    for name in trainer.reward_names:
        key = f"rewards/{name}/mean"
        print(f"training reward {name:<15} first {k} steps {mean_of(history[:k], key):+.3f}   "
              f"last {k} steps {mean_of(history[-k:], key):+.3f}")
    print(f"metrics: {Path(cfg.output_dir) / 'metrics.jsonl'}   time: {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
