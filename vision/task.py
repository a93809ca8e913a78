"""The vision task as the CLI wires it: config sections, and building policy + datasets from a config.

Used by ``mmrl train`` / ``mmrl sft`` (via :data:`mmrl.cli.TASKS`) and usable from Python::

    from mmrl.config import load_config
    from vision import task
    cfg = load_config("configs/vision/demo.yaml", section_types=task.SECTION_TYPES)
    bundle = task.build(cfg)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mmrl.config import TrainConfig
from vision import benchmarks as _benchmarks  # noqa: F401  (registers the benchmark_accuracy reward)
from vision import rewards as _rewards  # noqa: F401  (registers the vision reward functions)
from vision.data import BENCHMARK_PREFIX, VisionDataConfig, VisionDataset, build_datasets
from vision.masking import MaskingConfig
from vision.modeling import VisionModelConfig, load_model_and_processor
from vision.policy import VisionPolicy
from vision.prompt_limits import CheckedRecords, PromptLimits, context_length
from vision.sft import ColdStartConfig, run_sft

logger = logging.getLogger(__name__)

SECTION_TYPES = {"model": VisionModelConfig, "data": VisionDataConfig, "cold_start": ColdStartConfig,
                 "masking": MaskingConfig}


@dataclass
class VisionTask:
    policy: VisionPolicy
    train_dataset: VisionDataset
    eval_dataset: Sequence[dict] | None  # a VisionDataset, or BenchmarkRecords for data.eval "benchmark:NAME"


def build(cfg: TrainConfig) -> VisionTask:
    model, processor = load_model_and_processor(cfg.model)
    train, evaluation = build_datasets(cfg.data)
    if (cfg.data.eval or "").startswith(BENCHMARK_PREFIX) and cfg.eval.reward != "benchmark_accuracy":
        # Benchmark records carry answer_type/choices; only benchmark_accuracy grades with the benchmark's rule.
        logger.warning("data.eval is %s but eval.reward is %r; set eval.reward: benchmark_accuracy to grade it "
                       "with the benchmark's rule", cfg.data.eval, cfg.eval.reward)
    logger.info("model %s (%.2fM parameters); %d training prompts, %s held-out", cfg.model.name_or_path,
                sum(p.numel() for p in model.parameters()) / 1e6, len(train),
                len(evaluation) if evaluation is not None else "no")
    limits = prompt_limits(cfg, model, processor)
    train.limits = limits
    if isinstance(evaluation, VisionDataset):
        evaluation.limits = limits
    elif evaluation is not None:  # benchmark records: the same checks, so a bad item is a load error there too
        evaluation = CheckedRecords(evaluation, limits)
    policy = VisionPolicy(model, processor, cfg.logprob_chunk_size, masking=cfg.masking)
    return VisionTask(policy, train, evaluation)


def prompt_limits(cfg: TrainConfig, model, processor) -> PromptLimits:
    """The per-record checks for ``cfg.data`` (see :mod:`vision.prompt_limits`): images sized with the
    processor's pixel bounds, prompts at most ``data.max_prompt_length`` tokens (default: the model's context
    length). Warns when that limit plus ``sampling.max_new_tokens`` does not fit in the context."""
    limit, context = cfg.data.max_prompt_length, context_length(model)
    if limit is not None and limit <= 0:
        raise ValueError(f"data.max_prompt_length must be positive, got {limit}")
    max_new = cfg.sampling.max_new_tokens
    if limit is not None and context is not None and limit + max_new > context:
        logger.warning("data.max_prompt_length %d + sampling.max_new_tokens %d = %d exceeds the model's context "
                       "length %d: a long prompt's completion may run past it", limit, max_new, limit + max_new,
                       context)
    return PromptLimits.from_processor(processor, limit if limit is not None else context, cfg.data.truncate_prompts)


def cold_start(cfg: TrainConfig, task: VisionTask, show_progress: bool = True) -> dict[str, float]:
    """Supervised cold start (TRL SFTTrainer) on the training prompts; no-op when ``cold_start.steps == 0``."""
    if cfg.cold_start.steps <= 0:
        return {}
    policy = task.policy
    return run_sft(policy.model, policy.processor, task.train_dataset, cfg.cold_start,
                   Path(cfg.output_dir) / "sft", seed=cfg.seed, show_progress=show_progress)

