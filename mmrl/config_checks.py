"""Whole-config validation, run by the CLI right after loading and before any model loads.

A typed config can still hold values that fail only later — after the model is on the GPU, or after an
hours-long SFT cold start — or never fail at all (``top_p: 1.5``, ``temperature: -1``, a negative PAPO γ).
:func:`validate_config` checks every range, every name (against the real registries: losses, KL
estimators, rewards, loggers, schedulers) and every file path, collects *all* problems and raises one
:class:`~mmrl.config.ConfigError` listing them, one line each. A task adds the checks of its own sections
with a ``validate(cfg) -> list[str]`` function (``validate_config(cfg, task_checks=module.validate)``),
built with :class:`Problems`.

Also here: :func:`unknown_key_hint`, what an unknown key's error suggests — the equivalent of a name
brought from TRL, EasyR1 or verl (:data:`FOREIGN_KEYS`), else the nearest key in any section.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mmrl import algorithms
from mmrl import rewards as reward_registry
from mmrl.config import ConfigError, TrainConfig
from mmrl.logger import REPORTERS

# What the trainer hands to accelerate (``auto`` picks bf16 on a GPU that supports it, else no).
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
# Suffixes that make a string a file path rather than a hub id ("Qwen/Qwen2.5-VL-3B" has suffix ".5-VL-3B").
FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".gguf", ".json", ".jsonl", ".parquet",
                 ".arrow", ".txt", ".csv", ".tsv", ".yaml", ".yml", ".py")
# Reward-factory arguments that name a model or file (checked like any other path).
_PATH_ARGS, _PATH_SUFFIXES = ("model", "checkpoint", "path", "name_or_path"), ("_path", "_file", "_dir")
_SEED_MAX = 2**32 - 1  # numpy's seed range (accelerate's set_seed seeds numpy too)


def exists(path: str | Path, kind: str = "any") -> bool:
    """Whether ``path`` (``~`` expanded) exists as a ``file``, a ``dir`` or ``any``; never raises (a NUL
    byte or an over-long name is just a path that does not exist)."""
    try:
        p = Path(path).expanduser()
        return p.is_file() if kind == "file" else p.is_dir() if kind == "dir" else p.exists()
    except (OSError, ValueError, RuntimeError):
        return False


def looks_local(name: str) -> bool:
    """Whether ``name`` can only be a local path, not a hub id: it starts with ``.``, ``/`` or ``~``, holds
    the platform's separator (other than ``/``), has more than one ``/`` (hub ids are ``org/name``), or
    ends in a file suffix (:data:`FILE_SUFFIXES`)."""
    return (name.startswith((".", "/", "~")) or (os.sep != "/" and os.sep in name) or name.count("/") > 1
            or Path(name).suffix.lower() in FILE_SUFFIXES)


def _range_text(gt: float | None, ge: float | None, lt: float | None, le: float | None) -> str:
    fmt = {x: str(x) if isinstance(x, int) else f"{x:g}" for x in (gt, ge, lt, le) if x is not None}
    low = f"({fmt[gt]}" if gt is not None else f"[{fmt[ge]}" if ge is not None else None
    high = f"{fmt[lt]})" if lt is not None else f"{fmt[le]}]" if le is not None else None
    if low and high:
        return f"in {low}, {high}"
    if low or high:
        return f"> {fmt[gt]}" if gt is not None else f">= {fmt[ge]}" if ge is not None else \
            f"< {fmt[lt]}" if lt is not None else f"<= {fmt[le]}"
    return "a finite number"


class Problems:
    """Problems found in a config, one line each: the dotted key, the bad value, what is allowed (and
    why, where that is not obvious). Each check returns whether the value passed."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, key: str, value: Any, expected: str) -> None:
        self.lines.append(f"{key}={value!r}: {expected}")

    def number(self, key: str, value: Any, *, gt: float | None = None, ge: float | None = None,
               lt: float | None = None, le: float | None = None, integer: bool = False,
               optional: bool = False, why: str = "") -> bool:
        """A finite number (an integer if ``integer``) within the bounds; ``None`` only if ``optional``."""
        text = _range_text(gt, ge, lt, le) + (" or null" if optional else "") + (f" ({why})" if why else "")
        if value is None and optional:
            return True
        kind = "an integer" if integer else "a number"
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            self.add(key, value, f"must be {kind} {text}")
            return False
        if isinstance(value, float) and not math.isfinite(value):
            self.add(key, value, f"must be a finite number {text}")
            return False
        ok = ((gt is None or value > gt) and (ge is None or value >= ge) and (lt is None or value < lt)
              and (le is None or value <= le))
        if not ok:
            self.add(key, value, f"must be {text}")
        return ok

    def choice(self, key: str, value: Any, names: Iterable[str], why: str = "") -> bool:
        """``value`` is one of ``names`` (with the nearest one suggested when it is not)."""
        names = list(names)
        if isinstance(value, str) and value in names:
            return True
        close = difflib.get_close_matches(value, names, n=1) if isinstance(value, str) else []
        hint = f"; did you mean {close[0]!r}?" if close else ""
        self.add(key, value, f"must be one of {names}{hint}" + (f" ({why})" if why else ""))
        return False

    def path(self, key: str, value: Any, kind: str = "any", why: str = "") -> bool:
        """``value`` names an existing ``file`` / ``dir`` / either (``any``)."""
        if not isinstance(value, str) or not value:
            self.add(key, value, "must be a path")
            return False
        if exists(value, kind):
            return True
        what = {"file": "file", "dir": "directory"}.get(kind, "file or directory")
        if kind != "any" and exists(value):
            found = f"is a {'directory' if kind == 'file' else 'file'}, not a {what}"
        else:
            resolved = os.path.abspath(os.path.expanduser(value))
            found = f"does not exist (no such {what}; resolved to {resolved!r})"
        self.add(key, value, found + (f"; {why}" if why else ""))
        return False

    def local_or_hub(self, key: str, value: Any, kind: str = "any", why: str = "") -> bool:
        """A hub id passes; a value that can only be a local path (:func:`looks_local`) must exist."""
        if isinstance(value, str) and value and not looks_local(value):
            return True
        return self.path(key, value, kind, why)


# --- Names that need more than a lookup -----------------------------------------------------------


@functools.cache
def _scheduler_error(name: str) -> str | None:
    """Why transformers' ``get_scheduler(name)`` fails as the trainer builds and steps it, or None."""
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scheduler = get_scheduler(name, optimizer, num_warmup_steps=1, num_training_steps=10)
            optimizer.step()
            scheduler.step()  # as the trainer calls it: no metric (rules out reduce_lr_on_plateau)
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def scheduler_problem(name: str) -> str | None:
    """What is wrong with ``optim.scheduler=name`` (None if nothing): it must be a transformers scheduler
    (``SchedulerType``) that runs with the arguments the trainer passes."""
    try:
        from transformers.trainer_utils import SchedulerType
    except ImportError:  # the trainer needs transformers anyway; nothing to check against
        return None
    names = [s.value for s in SchedulerType]
    usable = [n for n in names if _scheduler_error(n) is None]
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        return f"must be one of {usable}" + (f"; did you mean {close[0]!r}?" if close else "")
    error = _scheduler_error(name)
    if error is not None:
        return f"needs scheduler arguments the trainer does not pass ({error}); use one of {usable}"
    return None


def _reward_problems(problems: Problems, key: str, name: Any, args: Any, args_key: str | None = None) -> None:
    """A reward spec resolves without running anything: a registered name or factory (whose ``args`` bind
    to its signature), or ``path.py:function`` with an existing file (not imported here)."""
    if not isinstance(name, str) or not name:
        problems.add(key, name, "must be a registered reward name or 'path/to/file.py:function'")
        return
    if ".py:" in name:
        path, _, function = name.rpartition(":")
        problems.path(key, path, "file", why="the reward file of 'path/to/file.py:function'")
        if not function.isidentifier():
            problems.add(key, name, f"{function!r} is not a function name ('path/to/file.py:function')")
        return
    factories = reward_registry._FACTORIES
    if name in factories:
        try:
            inspect.signature(factories[name]).bind(**(args if isinstance(args, dict) else {}))
        except TypeError as exc:
            takes = f"reward {name!r} takes {inspect.signature(factories[name])} ({exc})"
            if args_key is None:  # eval.reward: args come from a rewards entry of the same name
                problems.add(key, name, f"{takes}; list it under rewards (weight 0 is fine) with its args")
            else:
                problems.add(args_key, args, takes)
        return
    if name not in reward_registry.available_rewards():
        problems.choice(key, name, reward_registry.available_rewards(),
                        why="registered rewards; task rewards register when the task is imported; "
                            "or 'path/to/file.py:function'")


# --- The config -----------------------------------------------------------------------------------


def _check_run(cfg: TrainConfig, p: Problems) -> None:
    if not isinstance(cfg.output_dir, str) or not cfg.output_dir:
        p.add("output_dir", cfg.output_dir, "must be a directory path")
    elif exists(cfg.output_dir, "file"):
        p.add("output_dir", cfg.output_dir, "is a file; the run writes a directory there")
    p.number("seed", cfg.seed, ge=0, le=_SEED_MAX, integer=True, why="numpy's seed range")
    p.number("max_steps", cfg.max_steps, ge=1, integer=True)
    p.number("prompts_per_step", cfg.prompts_per_step, ge=1, integer=True)
    p.number("group_size", cfg.group_size, ge=2, integer=True,
             why="group-relative advantages need at least 2 completions per prompt")
    p.number("micro_batch_size", cfg.micro_batch_size, ge=1, integer=True)
    p.number("logprob_chunk_size", cfg.logprob_chunk_size, ge=1, integer=True)
    mini, sizes = cfg.mini_batch_size, (cfg.prompts_per_step, cfg.group_size)
    rollout = sizes[0] * sizes[1] if all(isinstance(x, int) for x in sizes) else 0
    if (p.number("mini_batch_size", mini, ge=1, integer=True, optional=True,
                 why="samples per optimizer update; null = the whole rollout")
            and mini is not None and rollout > 0 and rollout % mini):
        p.add("mini_batch_size", mini, "must divide the rollout of prompts_per_step * group_size = "
                                       f"{rollout} samples, so that every optimizer update sees as many")
    p.choice("mixed_precision", cfg.mixed_precision, MIXED_PRECISION)
    p.number("save_steps", cfg.save_steps, ge=0, integer=True, why="0 = only at the end")
    p.number("save_total_limit", cfg.save_total_limit, ge=1, integer=True, optional=True,
             why="null keeps every checkpoint")
    if cfg.resume_from is not None and cfg.resume_from != "latest":
        p.path("resume_from", cfg.resume_from, "dir", why="use 'latest' or a checkpoint directory")
    p.number("max_consecutive_skips", cfg.max_consecutive_skips, ge=1, integer=True)
    p.number("reward_timeout", cfg.reward_timeout, gt=0, optional=True, why="seconds; null = no limit")


def _check_sampling(cfg: TrainConfig, p: Problems) -> None:
    s = cfg.sampling
    p.number("sampling.temperature", s.temperature, gt=0,
             why="training needs diverse groups: at 0 (greedy) every completion of a prompt is the same, "
                 "every advantage is 0 and nothing is learned; eval.temperature may be 0")
    p.number("sampling.top_p", s.top_p, gt=0, le=1, why="1 disables nucleus sampling")
    p.number("sampling.top_k", s.top_k, ge=0, integer=True, why="0 disables top-k")
    p.number("sampling.max_new_tokens", s.max_new_tokens, ge=1, integer=True)


def _check_algorithm(cfg: TrainConfig, p: Problems) -> None:
    a = cfg.algorithm
    p.choice("algorithm.loss_type", a.loss_type, algorithms.LOSS_AGGREGATIONS)
    p.choice("algorithm.adv_scale", a.adv_scale, algorithms.ADVANTAGE_SCALES)
    p.number("algorithm.epsilon", a.epsilon, gt=0, lt=1, why="PPO clip: ratios stay in [1 - epsilon, ...]")
    p.number("algorithm.epsilon_high", a.epsilon_high, gt=0, optional=True, why="null = epsilon")
    p.number("algorithm.beta", a.beta, ge=0, why="KL weight; 0 = no reference model")
    p.choice("algorithm.kl_estimator", a.kl_estimator, algorithms.KL_ESTIMATORS)
    p.number("algorithm.ppo_epochs", a.ppo_epochs, ge=1, integer=True)


def _check_papo(cfg: TrainConfig, p: Problems) -> None:
    papo = cfg.papo
    p.number("papo.gamma", papo.gamma, ge=0, why="the perception KL is maximised with weight gamma; a "
                                                 "negative gamma flips its sign")
    p.choice("papo.gamma_schedule", papo.gamma_schedule, algorithms.GAMMA_SCHEDULES)
    p.number("papo.anneal_fraction", papo.anneal_fraction, gt=0, le=1)
    p.choice("papo.kl_estimator", papo.kl_estimator, algorithms.KL_ESTIMATORS)
    p.number("papo.kl_token_clip", papo.kl_token_clip, gt=0, optional=True, why="null = no clip")
    p.number("papo.eta_orig", papo.eta_orig, ge=0)
    p.number("papo.eta_mask", papo.eta_mask, ge=0)
    p.number("papo.monitor_window", papo.monitor_window, ge=1, integer=True)
    if papo.enabled is True and cfg.masking is None:
        p.add("papo.enabled", papo.enabled, "needs a task with a `masking` section (PAPO masks the task's "
                                            "images; this task has none)")


def _check_optim(cfg: TrainConfig, p: Problems) -> None:
    o = cfg.optim
    p.number("optim.lr", o.lr, gt=0)
    p.number("optim.weight_decay", o.weight_decay, ge=0)
    betas = o.betas
    if not isinstance(betas, (list, tuple)) or len(betas) != 2:
        p.add("optim.betas", betas, "must be two numbers in [0, 1), e.g. [0.9, 0.999]")
    else:
        for i, beta in enumerate(betas):
            p.number(f"optim.betas[{i}]", beta, ge=0, lt=1)
    p.number("optim.max_grad_norm", o.max_grad_norm, ge=0, why="0 turns gradient clipping off")
    p.number("optim.warmup_steps", o.warmup_steps, ge=0, integer=True)
    problem = scheduler_problem(o.scheduler) if isinstance(o.scheduler, str) else "must be a scheduler name"
    if problem:
        p.add("optim.scheduler", o.scheduler, problem)


def _check_logging(cfg: TrainConfig, p: Problems) -> None:
    report_to = cfg.logging.report_to  # a list (the loader checks types)
    for i, name in enumerate(report_to if isinstance(report_to, list) else [report_to]):
        p.choice(f"logging.report_to[{i}]", name, REPORTERS)
    p.number("logging.log_completions", cfg.logging.log_completions, ge=0, integer=True, why="0 = none")


def _check_eval(cfg: TrainConfig, p: Problems) -> None:
    e = cfg.eval
    p.number("eval.every_steps", e.every_steps, ge=0, integer=True, why="0 = only before/after training")
    p.number("eval.max_new_tokens", e.max_new_tokens, ge=1, integer=True, optional=True,
             why="null = sampling.max_new_tokens")
    p.number("eval.temperature", e.temperature, ge=0, why="0 = greedy")
    p.number("eval.batch_size", e.batch_size, ge=1, integer=True)
    configured = {r.name: r.args for r in cfg.rewards if isinstance(r.name, str)}
    if e.reward in configured and ".py:" not in e.reward:
        return  # checked with the training rewards (the trainer reuses that entry's args)
    _reward_problems(p, "eval.reward", e.reward, configured.get(e.reward, {}))


def _check_rewards(cfg: TrainConfig, p: Problems) -> None:
    if not isinstance(cfg.rewards, list) or not cfg.rewards:
        p.add("rewards", cfg.rewards, "must list at least one reward function")
        return
    for i, r in enumerate(cfg.rewards):
        key = f"rewards[{i}]"
        _reward_problems(p, f"{key}.name", r.name, r.args, args_key=f"{key}.args")
        p.number(f"{key}.weight", r.weight)
        if not isinstance(r.args, dict):
            p.add(f"{key}.args", r.args, "must be a mapping of keyword arguments")
        elif r.name in reward_registry._FACTORIES:  # a model-backed reward: its model / checkpoint paths
            for arg, value in r.args.items():
                if isinstance(value, str) and (arg in _PATH_ARGS or str(arg).endswith(_PATH_SUFFIXES)):
                    p.local_or_hub(f"{key}.args.{arg}", value)
    weights = [r.weight for r in cfg.rewards]
    if all(isinstance(w, (int, float)) and w == 0 for w in weights):
        p.add("rewards", [r.name for r in cfg.rewards], "every weight is 0: the total reward is always 0 and "
                                                        "nothing is learned")


def config_problems(cfg: TrainConfig,
                    task_checks: Callable[[TrainConfig], Iterable[str]] | None = None) -> list[str]:
    """Every problem of ``cfg`` (see :func:`validate_config`) as a list of lines; empty when it is valid."""
    p = Problems()
    for check in (_check_run, _check_sampling, _check_algorithm, _check_papo, _check_optim, _check_logging,
                  _check_eval, _check_rewards):
        check(cfg, p)
    lines = p.lines
    if task_checks is not None:
        lines.extend(task_checks(cfg))
    return lines


def validate_config(cfg: TrainConfig,
                    task_checks: Callable[[TrainConfig], Iterable[str]] | None = None) -> None:
    """Raise one :class:`~mmrl.config.ConfigError` listing every problem of ``cfg`` — so a mistake costs
    seconds, not a model load or an SFT cold start. ``task_checks`` (a task module's ``validate``) adds
    the problems of the task's sections. Call it after the task module is imported: its rewards must be
    registered by then. Loads no model and runs no user code."""
    lines = config_problems(cfg, task_checks)
    if lines:
        count = f"{len(lines)} problem{'s' if len(lines) > 1 else ''}"
        raise ConfigError(f"invalid config ({count}):\n" + "\n".join(f"  - {line}" for line in lines))


# --- Unknown keys: names users bring from other trainers ------------------------------------------

_TOP = "a top-level key"
_LENGTH = "training length is counted in rollout steps"
_KL_NAMES = "low_var_kl is k3, kl is k1, mse is k2"
_GLOBAL = "counts prompts over all GPUs; prompts_per_step counts them per process"
_PER_UPDATE = "counts prompts per update; mini_batch_size counts samples (prompts x group_size)"


def _named(whose: str, targets: dict[str, str | None], notes: dict[str, str]) -> dict[str, tuple]:
    return {name: (target, whose, notes.get(name, "")) for name, target in targets.items()}


#: A foreign config name (a key, or a dotted path such as EasyR1's ``rollout.n``) -> (our dotted key or
#: None when there is no counterpart, whose name it is, a note on how the two differ).
FOREIGN_KEYS: dict[str, tuple[str | None, str, str]] = {
    **_named("TRL", {  # GRPOConfig / TrainingArguments
        "learning_rate": "optim.lr", "num_generations": "group_size", "beta": "algorithm.beta",
        "max_completion_length": "sampling.max_new_tokens", "max_prompt_length": "data.max_prompt_length",
        "epsilon": "algorithm.epsilon", "epsilon_high": "algorithm.epsilon_high", "seed": "seed",
        "max_grad_norm": "optim.max_grad_norm", "weight_decay": "optim.weight_decay",
        "warmup_steps": "optim.warmup_steps", "adam_beta1": "optim.betas", "adam_beta2": "optim.betas",
        "lr_scheduler_type": "optim.scheduler", "per_device_train_batch_size": "prompts_per_step",
        "gradient_accumulation_steps": "micro_batch_size", "temperature": "sampling.temperature",
        "top_p": "sampling.top_p", "top_k": "sampling.top_k", "loss_type": "algorithm.loss_type",
        "scale_rewards": "algorithm.adv_scale", "num_iterations": "algorithm.ppo_epochs",
        "save_total_limit": "save_total_limit", "gradient_checkpointing": "gradient_checkpointing",
        "report_to": "logging.report_to", "run_name": "logging.run_name", "logging_steps": None,
        "num_train_epochs": "max_steps", "eval_steps": "eval.every_steps", "bf16": "mixed_precision",
        "fp16": "mixed_precision", "model_name_or_path": "model.name_or_path", "dataset_name": "data.train",
        "use_vllm": None,
    }, {
        "num_generations": "completions per prompt", "adam_beta1": "both betas in one list: [beta1, beta2]",
        "adam_beta2": "both betas in one list: [beta1, beta2]",
        "per_device_train_batch_size": "counts completions (prompts x num_generations) per device; here a "
                                       "step samples prompts_per_step prompts per process, group_size each",
        "gradient_accumulation_steps": "accumulation is implied: micro_batch_size samples per forward, "
                                       "mini_batch_size per optimizer update",
        "scale_rewards": "group | batch | none", "num_iterations": "passes over each rollout",
        "save_total_limit": _TOP, "gradient_checkpointing": _TOP, "seed": _TOP, "num_train_epochs": _LENGTH,
        "logging_steps": "every optimizer step is logged (metrics.jsonl, and report_to)",
        "bf16": "mixed_precision: bf16", "fp16": "mixed_precision: fp16",
        "use_vllm": "completions are sampled with the policy model itself",
    }),
    **_named("EasyR1/verl", {
        "ppo_epochs": "algorithm.ppo_epochs", "n": "group_size", "rollout.n": "group_size",
        "kl_coef": "algorithm.beta", "clip_ratio_low": "algorithm.epsilon", "val_files": "data.eval",
        "clip_ratio_high": "algorithm.epsilon_high", "adv_estimator": "algorithm.adv_scale",
        "max_response_length": "sampling.max_new_tokens", "train_files": "data.train",
        "max_steps": "max_steps",
        "total_epochs": "max_steps", "save_freq": "save_steps", "project_name": "logging.project",
        "experiment_name": "logging.run_name", "logger": "logging.report_to",
    }, {
        "n": "rollout.n: completions per prompt", "rollout.n": "completions per prompt",
        "total_epochs": _LENGTH,
        "adv_estimator": "advantages are GRPO's; adv_scale picks their scaling and loss_type the aggregation",
        "max_steps": _TOP, "logger": "jsonl | tensorboard | wandb",
    }),
    **_named("EasyR1", {
        "rollout_batch_size": "prompts_per_step", "global_batch_size": "mini_batch_size",
        "micro_batch_size_per_device_for_update": "micro_batch_size", "kl_penalty": "algorithm.kl_estimator",
        "model_path": "model.name_or_path", "save_limit": "save_total_limit", "val_freq": "eval.every_steps",
    }, {"rollout_batch_size": _GLOBAL, "global_batch_size": _PER_UPDATE, "kl_penalty": _KL_NAMES}),
    **_named("verl", {
        "train_batch_size": "prompts_per_step", "ppo_mini_batch_size": "mini_batch_size",
        "ppo_micro_batch_size_per_gpu": "micro_batch_size", "kl_loss_coef": "algorithm.beta",
        "kl_loss_type": "algorithm.kl_estimator", "clip_ratio": "algorithm.epsilon",
        "loss_agg_mode": "algorithm.loss_type", "total_training_steps": "max_steps",
        "test_freq": "eval.every_steps",
    }, {"train_batch_size": _GLOBAL, "ppo_mini_batch_size": _PER_UPDATE, "kl_loss_type": _KL_NAMES,
        "loss_agg_mode": "token-mean is dapo/bnpo, seq-mean-token-mean is grpo"}),
    **_named("transformers", {"torch_dtype": "model.dtype"}, {}),
}


def _flatten(value: Any, prefix: str, depth: int = 4) -> list[str]:
    """Dotted paths of the keys inside a nested mapping (an unknown section brought from another trainer)."""
    if not isinstance(value, dict) or depth == 0:
        return []
    out = []
    for k, v in value.items():
        path = f"{prefix}.{k}"
        out.append(path)
        out.extend(_flatten(v, path, depth - 1))
    return out


def _foreign_notes(full: str, value: Any, schema: list[str] | None) -> list[str]:
    """What ``full`` (and, for an unknown section, the keys inside it) are called here."""
    known = set(schema or [])
    notes: list[str] = []
    for path in [full, *_flatten(value, full)]:
        parts = path.split(".")
        leaf = parts[-1]
        # The longest tail first: EasyR1's worker.rollout.n matches "rollout.n" before "n".
        tails = [".".join(parts[i:]) for i in range(len(parts))]
        name = next((tail for tail in tails if tail in FOREIGN_KEYS), None)
        if name is not None:
            target, whose, note = FOREIGN_KEYS[name]
            if target == path or (target is not None and known and target not in known):
                continue  # already in place, or this task has no such key
            text = f"is `{target}` here" if target else "has no counterpart here"
            notes.append(f"{whose}'s {name} {text}" + (f" ({note})" if note else ""))
        elif path != full:  # e.g. EasyR1's worker.actor.optim.lr: the same name exists here, in its own place
            targets = [k for k in schema or [] if k.rsplit(".", 1)[-1] == leaf]
            if targets:  # the one sharing the longest tail (optim.lr, not cold_start.lr)
                best = max(targets, key=lambda k: len(os.path.commonprefix([k.split(".")[::-1],
                                                                            parts[::-1]])))
                notes.append(f"{path} is `{best}` here")
        if len(notes) == 4:
            break
    return list(dict.fromkeys(notes))


def unknown_key_hint(key: str, valid: list[str], where: str, value: Any = None,
                     schema: list[str] | None = None) -> str:
    """The hint after "unknown config key 'where+key'": the equivalent of a TRL / EasyR1 / verl name, else
    the same name in another section, else the nearest key — here (as before) or, when clearly nearer, in
    any section of ``schema`` (every dotted key, see :func:`mmrl.config.schema_keys`)."""
    full = where + key
    notes = _foreign_notes(full, value, schema)
    if notes:
        local = difflib.get_close_matches(key, valid, n=1, cutoff=0.85)  # optim.beta: betas or algorithm.beta
        return " — " + "; ".join(notes) + (f"; or did you mean {local[0]!r}?" if local else ".")
    schema = schema or []
    elsewhere = [k for k in schema if k.rsplit(".", 1)[-1] == key and k != full]
    if elsewhere:
        also = f" (or {', '.join(repr(k) for k in elsewhere[1:])})" if len(elsewhere) > 1 else ""
        return f". Did you mean {elsewhere[0]!r}{also}?"
    local = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    local_score = difflib.SequenceMatcher(None, key, local[0]).ratio() if local else 0.0
    leaves: dict[str, list[str]] = {}
    for k in schema:
        leaves.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    near = difflib.get_close_matches(key, list(leaves), n=1, cutoff=0.75)
    if near and difflib.SequenceMatcher(None, key, near[0]).ratio() > local_score:
        targets = [k for k in leaves[near[0]] if k != where + near[0]]
        if targets:
            also = f" (or {', '.join(repr(k) for k in targets[1:])})" if len(targets) > 1 else ""
            return f". Did you mean {targets[0]!r}{also}?"
    return f". Did you mean {local[0]!r}?" if local else "."
