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
from dataclasses import dataclass, replace
from pathlib import Path

from mmrl.config import TrainConfig
from mmrl.data import Stage, Stages
from vision import benchmarks as _benchmarks  # noqa: F401  (registers the benchmark_accuracy reward)
from vision import describe_scene as _describe_scene  # noqa: F401  (registers synthetic:describe_scene)
from vision import factuality as _factuality  # noqa: F401  (registers the factuality rewards)
from vision import rewards as _rewards  # noqa: F401  (registers the vision reward functions)
from vision.data import BENCHMARK_PREFIX, VisionDataConfig, VisionDataset, build_datasets, stage_sources
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
    train_dataset: VisionDataset | Stages  # Stages when data.stages is set
    eval_dataset: Sequence[dict] | None  # a VisionDataset, or BenchmarkRecords for data.eval "benchmark:NAME"


def build(cfg: TrainConfig) -> VisionTask:
    model, processor = load_model_and_processor(cfg.model, gradient_checkpointing=cfg.gradient_checkpointing is True)
    stages = cfg.data.stages
    # With stages, "the" training set (cold start, prompt checks) is the first stage's first source.
    train, evaluation = build_datasets(replace(cfg.data, train=next(iter(stage_sources(stages[0]))))
                                       if stages else cfg.data)
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
    return VisionTask(policy, build_stages(cfg.data, train, limits) if stages else train, evaluation)


def build_stages(data: VisionDataConfig, first: VisionDataset, limits: PromptLimits | None = None) -> Stages:
    """The :class:`~mmrl.data.Stages` of ``data.stages``; every source is built once (``first`` is the
    first stage's first source), with the section's other keys and the prompt checks ``limits``."""
    built = {next(iter(stage_sources(data.stages[0]))): first}

    def dataset(source: str) -> VisionDataset:
        if source not in built:
            built[source] = build_datasets(replace(data, train=source, eval=None, stages=[]))[0]
            built[source].limits = limits
        return built[source]

    stages = []
    for stage in data.stages:
        weights = stage_sources(stage)
        stages.append(Stage(stage.get("steps"), {source: dataset(source) for source in weights}, weights))
        logger.info("stage %d: %s for %s steps (%s prompts)", len(stages) - 1, weights,
                    stage.get("steps") or "the remaining", {s: len(built[s]) for s in weights})
    return Stages(stages)


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
    if cfg.model.lora is not None and cfg.algorithm.beta > 0:
        logger.warning("model.lora: the cold start trains the adapter, and the KL reference is the base with the "
                       "adapter disabled, i.e. the model before the cold start")
    train = task.train_dataset  # with stages: the first stage's first source
    train = train.first_dataset() if isinstance(train, Stages) else train
    return run_sft(policy.model, policy.processor, train, cfg.cold_start,
                   Path(cfg.output_dir) / "sft", seed=cfg.seed, show_progress=show_progress)


def validate(cfg: TrainConfig) -> list[str]:
    """Problems of the vision sections (``model``, ``data``, ``cold_start``, ``masking``), one line each, for
    :func:`mmrl.config_checks.validate_config` — found before the model loads, not after it (or after the
    SFT cold start). Loads nothing: names are checked against the real registries and dtype table, paths
    with the loaders' own rule for telling a local path from a hub id."""
    from mmrl.config_checks import Problems, exists
    from vision.benchmarks import available_benchmarks
    from vision.data import LAYOUTS, SFT_TARGETS, STAGE_KEYS, SYNTHETIC_PREFIX, resolve_template
    from vision.masking import STRATEGIES
    from vision.modeling import ADAPTER_CONFIG, BUILTIN_MODELS, _resolve_dtype
    from vision.synthetic import SPLITS, make_synthetic

    p = Problems()
    model, data, sft, masking = cfg.model, cfg.data, cfg.cold_start, cfg.masking
    if model is not None:
        name, builtin = model.name_or_path, list(BUILTIN_MODELS)
        # vision.modeling.load_model_and_processor's rule: anything but "org/name" is a local directory
        local = isinstance(name, str) and name not in builtin and (
            name.startswith((".", "/", "~")) or exists(name) or name.count("/") != 1)
        if not isinstance(name, str) or not name:
            p.add("model.name_or_path", name, f"must be a hub id, a model directory or one of {builtin}")
        elif local and p.path("model.name_or_path", name, "dir", f"hub ids are org/name; built-in {builtin}"):
            if not exists(Path(name).expanduser() / "config.json") and \
                    not exists(Path(name).expanduser() / ADAPTER_CONFIG):
                p.add("model.name_or_path", name, "the directory has no config.json: not a transformers "
                                                  "model (an mmrl checkpoint's model is checkpoint-N/model)")
        try:
            _resolve_dtype(model.dtype)
        except (ValueError, TypeError):
            p.add("model.dtype", model.dtype, "must be one of ['auto', 'float32', 'bfloat16', 'float16']")
        low_ok = p.number("model.min_pixels", model.min_pixels, ge=1, integer=True)
        if p.number("model.max_pixels", model.max_pixels, ge=1, integer=True) and low_ok \
                and model.min_pixels > model.max_pixels:
            p.add("model.min_pixels", model.min_pixels, f"must be <= model.max_pixels={model.max_pixels}")
        p.number("model.seed", model.seed, ge=0, integer=True)
        _check_model_parts(cfg, p)
    if data is not None:
        reported: set[str] = set()  # train and eval from one synthetic task: its option errors once

        def check_source(key: str, source, split: str, train: bool) -> None:
            if not isinstance(source, str) or not source:
                p.add(key, source, "must be a hub dataset id, a local data file or folder, or synthetic:NAME")
            elif source.startswith(SYNTHETIC_PREFIX):
                options = dict(data.synthetic_options) if isinstance(data.synthetic_options, dict) else {}
                count = options.pop("num_samples", None)
                p.number("data.synthetic_options.num_samples", count, ge=1, integer=True, optional=True)
                split_key = f"data.{'train' if train else 'eval'}_split"
                if p.choice(split_key, split, SPLITS, why="the splits of a synthetic task"):
                    try:  # zero rows: checks the task name and its options, draws nothing
                        make_synthetic(source[len(SYNTHETIC_PREFIX):], split, 0, data.seed, **options)
                    except Exception as exc:  # whatever the loader would raise, reported here instead
                        if str(exc) not in reported:
                            reported.add(str(exc))
                            p.add(key, source, f"{exc} (options from data.synthetic_options)")
            elif source.startswith(BENCHMARK_PREFIX):
                if train:
                    p.add(key, source, "'benchmark:NAME' is for data.eval only")
                else:
                    p.choice(key, source, [BENCHMARK_PREFIX + b for b in available_benchmarks()])
            else:
                p.local_or_hub(key, source, why="a hub dataset id is 'org/name'")

        if not data.stages:  # with stages, data.train is not read
            check_source("data.train", data.train, data.train_split, train=True)
        if data.eval is not None:
            check_source("data.eval", data.eval, data.eval_split, train=False)
        for i, stage in enumerate(data.stages):
            key, last = f"data.stages[{i}]", i == len(data.stages) - 1
            if not isinstance(stage, dict):
                p.add(key, stage, "must be a mapping {steps: N, train: SOURCE} or {steps: N, mix: {SOURCE: weight}}")
                continue
            for name in stage:
                if name not in STAGE_KEYS:
                    p.add(f"{key}.{name}", stage[name], f"unknown stage key; valid keys: {list(STAGE_KEYS)}")
            p.number(f"{key}.steps", stage.get("steps"), ge=1, integer=True, optional=last,
                     why="rollout steps of the stage; only the last stage may omit it, to run until the end")
            if ("train" in stage) == ("mix" in stage):
                p.add(key, stage, "needs exactly one of train (a source) or mix ({source: weight, ...})")
            elif "train" in stage:
                check_source(f"{key}.train", stage["train"], data.train_split, train=True)
            elif not isinstance(stage["mix"], dict) or not stage["mix"]:
                p.add(f"{key}.mix", stage["mix"], "must be a non-empty mapping {source: weight, ...}")
            else:
                for source, weight in stage["mix"].items():
                    check_source(f"{key}.mix", source, data.train_split, train=True)
                    p.number(f"{key}.mix[{source!r}]", weight, gt=0, why="the source's share of the records")
        if data.eval_benchmark_path is not None:
            p.path("data.eval_benchmark_path", data.eval_benchmark_path)
        if data.image_dir is not None:
            p.path("data.image_dir", data.image_dir, "dir")
        p.number("data.max_train_samples", data.max_train_samples, ge=1, integer=True, optional=True)
        p.number("data.max_eval_samples", data.max_eval_samples, ge=1, integer=True, optional=True)
        p.number("data.seed", data.seed, ge=0, integer=True)
        p.choice("data.layout", data.layout, LAYOUTS)
        try:
            resolve_template(data.template)
        except (ValueError, TypeError) as exc:
            p.add("data.template", data.template, str(exc))
        p.number("data.max_prompt_length", data.max_prompt_length, ge=1, integer=True, optional=True,
                 why="tokens; null = the model's context length")
    if sft is not None:
        p.number("cold_start.steps", sft.steps, ge=0, integer=True, why="0 = no cold start")
        p.number("cold_start.lr", sft.lr, gt=0)
        p.number("cold_start.batch_size", sft.batch_size, ge=1, integer=True)
        p.choice("cold_start.answer_format", sft.answer_format, SFT_TARGETS)
        p.number("cold_start.max_samples", sft.max_samples, ge=1, integer=True, optional=True)
        p.number("cold_start.warmup_steps", sft.warmup_steps, ge=0, integer=True)
    if masking is not None:
        p.choice("masking.strategy", masking.strategy, STRATEGIES)
        p.number("masking.patch_size", masking.patch_size, ge=1, integer=True)
        p.number("masking.prob", masking.prob, ge=0, le=1)
    return p.lines


def _check_model_parts(cfg: TrainConfig, p) -> None:
    """``model.lora`` values and what they cannot be combined with; ``model.gradient_checkpointing``."""
    model, lora = cfg.model, cfg.model.lora
    parts = model.gradient_checkpointing
    if cfg.gradient_checkpointing is True and parts.vision is False and parts.language is False:
        p.add("gradient_checkpointing", True, "model.gradient_checkpointing turns it off for both the vision and "
                                              "the language part: set gradient_checkpointing: false")
    if lora is None:
        return
    p.number("model.lora.r", lora.r, ge=1, integer=True, why="the adapter's rank")
    p.number("model.lora.alpha", lora.alpha, gt=0, why="the adapter's scale is alpha / r")
    p.number("model.lora.dropout", lora.dropout, ge=0, lt=1)
    targets = lora.target_modules
    if targets is not None and (not isinstance(targets, list) or not targets
                                or not all(isinstance(t, str) and t for t in targets)):
        p.add("model.lora.target_modules", targets, "must be a non-empty list of linear-layer names (e.g. q_proj, "
                                                    "v_proj), or null for every linear layer of the language model")
    alg = cfg.algorithm
    kl = isinstance(alg.beta, (int, float)) and alg.beta > 0
    if kl and isinstance(alg.ref_sync_steps, int) and alg.ref_sync_steps > 0:
        p.add("algorithm.ref_sync_steps", alg.ref_sync_steps,
              "with model.lora the KL reference is the base model with the adapter disabled and cannot be "
              "refreshed: set it to 0 (or train without model.lora)")
