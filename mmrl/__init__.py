"""mmrl: reinforcement-learning fine-tuning of multimodal models with one trainer.

The shared core lives here: the RL math (:mod:`mmrl.algorithms`), reward registry
(:mod:`mmrl.rewards`), the policy interface (:mod:`mmrl.policy`), typed configs (:mod:`mmrl.config`)
and :class:`mmrl.Trainer`. Tasks live in sibling packages: :mod:`vision` (Qwen-VL reasoning) and
:mod:`image_gen` (autoregressive image generation); they import ``mmrl``, never the reverse.
"""

from mmrl.config import (
    AlgorithmConfig,
    EvalConfig,
    LoggingConfig,
    OptimConfig,
    RewardConfig,
    TrainConfig,
    load_config,
)
from mmrl.evaluation import evaluate_policy
from mmrl.policy import Policy, Rollout, SampleInputs, Sampling
from mmrl.rewards import compute_rewards, get_reward, register_reward
from mmrl.trainer import Trainer

__version__ = "0.1.0"

__all__ = [
    "AlgorithmConfig", "EvalConfig", "LoggingConfig", "OptimConfig", "Policy", "RewardConfig", "Rollout",
    "SampleInputs", "Sampling", "TrainConfig", "Trainer", "compute_rewards", "evaluate_policy", "get_reward",
    "load_config", "register_reward",
]
