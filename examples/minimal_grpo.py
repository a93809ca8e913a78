"""The shortest path: GRPO on a vision-language model with a format and an accuracy reward.

    python examples/minimal_grpo.py [--steps 30]      # offline: tiny Qwen2.5-VL, procedural images, CPU

For a real model set ``name_or_path`` (e.g. "Qwen/Qwen2.5-VL-3B-Instruct") and ``train`` (e.g.
"hiyouga/geometry3k"). The tiny random model first needs the supervised cold start to write answers at all.
"""

import argparse

from mmrl import RewardConfig, TrainConfig, Trainer
from mmrl.config import OptimConfig
from mmrl.policy import Sampling
from vision import rewards  # noqa: F401  (registers "accuracy" and "format_answer")
from vision.data import VisionDataConfig, build_datasets
from vision.modeling import VisionModelConfig, load_model_and_processor
from vision.policy import VisionPolicy
from vision.sft import ColdStartConfig, run_sft

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--output-dir", default="runs/minimal_grpo")
args = parser.parse_args()

config = TrainConfig(
    output_dir=args.output_dir, max_steps=args.steps, prompts_per_step=8, group_size=8, micro_batch_size=64,
    model=VisionModelConfig(name_or_path="tiny-qwen2.5-vl", min_pixels=56 * 56, max_pixels=112 * 112),
    data=VisionDataConfig(train="synthetic:single_shape", eval="synthetic:single_shape", template="answer",
                          max_train_samples=1024, max_eval_samples=256),
    rewards=[RewardConfig("accuracy", 1.0), RewardConfig("format_answer", 0.1)],
    sampling=Sampling(temperature=1.0, max_new_tokens=8),
    optim=OptimConfig(lr=3e-4),
)
model, processor = load_model_and_processor(config.model)
train, held_out = build_datasets(config.data)
run_sft(model, processor, train, ColdStartConfig(steps=25, lr=2e-3, batch_size=16, answer_format="answer"),
        output_dir=f"{args.output_dir}/sft")  # the tiny model learns the answer format first

trainer = Trainer(config, VisionPolicy(model, processor), train, held_out)
print(f"held-out accuracy before RL: {trainer.evaluate()['accuracy']:.1%}")
history = trainer.train()
print(f"held-out accuracy after RL:  {trainer.evaluate()['accuracy']:.1%}")
print(f"reward: first step {history[0]['reward']:.3f}, last step {history[-1]['reward']:.3f}")
