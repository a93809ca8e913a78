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
    elif (isinstance(mini, int) and isinstance(cfg.group_size, int) and cfg.group_size > 0
          and mini % cfg.group_size):
        p.add("mini_batch_size", mini, f"must be a multiple of group_size={cfg.group_size}: mini-batches hold "
                                       "whole groups")
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
    p.number("sampling.min_new_tokens", s.min_new_tokens, ge=0, le=s.max_new_tokens if isinstance(s.max_new_tokens, int)
             else None, integer=True, why="the stop token is suppressed until then; at most max_new_tokens")


def _check_algorithm(cfg: TrainConfig, p: Problems) -> None:
    from mmrl.objectives import DPO_LOSSES, OBJECTIVES, objective_spec

    a = cfg.algorithm
    p.choice("algorithm.objective", a.objective, OBJECTIVES)
    p.choice("algorithm.loss_type", a.loss_type, algorithms.LOSS_AGGREGATIONS)
    p.choice("algorithm.advantage_estimator", a.advantage_estimator, algorithms.ADVANTAGE_ESTIMATORS)
    p.choice("algorithm.adv_scale", a.adv_scale, algorithms.ADVANTAGE_SCALES)
    p.number("algorithm.epsilon", a.epsilon, gt=0, lt=1, why="PPO clip: ratios stay in [1 - epsilon, ...]")
    p.number("algorithm.epsilon_high", a.epsilon_high, gt=0, optional=True, why="null = epsilon")
    p.number("algorithm.dual_clip", a.dual_clip, gt=1, optional=True, why="caps -A*r at -A*C for A < 0")
    p.number("algorithm.delta", a.delta, gt=1, optional=True, why="upper clamp of the ratio")
    p.number("algorithm.tau_pos", a.tau_pos, gt=0)
    p.number("algorithm.tau_neg", a.tau_neg, gt=0)
    p.number("algorithm.entropy_coef", a.entropy_coef, ge=0)
    p.number("algorithm.beta", a.beta, ge=0, why="KL weight; 0 = no reference model")
    p.choice("algorithm.kl_estimator", a.kl_estimator, algorithms.KL_ESTIMATORS)
    p.number("algorithm.ppo_epochs", a.ppo_epochs, ge=1, integer=True)
    if a.kl_in_reward and isinstance(a.beta, (int, float)) and a.beta <= 0:
        p.add("algorithm.kl_in_reward", True, "needs algorithm.beta > 0 (the penalty's weight)")
    p.number("algorithm.ref_sync_steps", a.ref_sync_steps, ge=0, integer=True,
             why="optimizer updates between reference refreshes; 0 = a frozen reference")
    p.number("algorithm.ref_sync_alpha", a.ref_sync_alpha, gt=0, le=1)
    spec = objective_spec(a.objective) if a.objective in OBJECTIVES else None
    uses_reference = spec is not None and "logps:ref" in spec.needs
    if isinstance(a.ref_sync_steps, int) and a.ref_sync_steps > 0 and isinstance(a.beta, (int, float)) \
            and a.beta <= 0 and not uses_reference:
        p.add("algorithm.ref_sync_steps", a.ref_sync_steps, "refreshes the KL reference: needs algorithm.beta > 0")
    p.choice("algorithm.rollout_model", a.rollout_model, ("policy", "reference"))
    p.number("algorithm.dpo_beta", a.dpo_beta, gt=0)
    p.choice("algorithm.dpo_loss", a.dpo_loss, DPO_LOSSES)
    p.number("algorithm.dpo_label_smoothing", a.dpo_label_smoothing, ge=0, lt=0.5, why="cDPO's label noise ε")
    p.number("algorithm.dpo_nll_coef", a.dpo_nll_coef, ge=0, why="weight of the NLL on the chosen completion")
    p.choice("algorithm.pairs", a.pairs, ("sampled", "dataset"))
    if spec is not None and spec.pairwise:
        _check_pairwise(cfg, p)
    elif a.pairs != "sampled":
        p.add("algorithm.pairs", a.pairs, f"only a pairwise objective (dpo) trains on pairs; objective is {a.objective!r}")


def _check_pairwise(cfg: TrainConfig, p: Problems) -> None:
    """DPO's pairs: whole pairs in every micro-batch, one mean over pairs, the chosen row told by its advantage."""
    a = cfg.algorithm
    if a.loss_type != "grpo":
        p.add("algorithm.loss_type", a.loss_type, f"{a.objective} puts each pair's loss on its tokens: it needs "
              "'grpo' (mean over sequences), which makes the loss the mean over pairs")
    if a.advantage_estimator != "preference":
        p.add("algorithm.advantage_estimator", a.advantage_estimator,
              f"{a.objective} needs 'preference' (+1 chosen, -1 rejected)")
    if isinstance(cfg.micro_batch_size, int) and cfg.micro_batch_size % 2:
        p.add("micro_batch_size", cfg.micro_batch_size, f"{a.objective} trains on pairs: must be even")
    if a.pairs == "dataset":
        if cfg.group_size != 2:
            p.add("group_size", cfg.group_size, "algorithm.pairs: dataset gives each prompt 2 completions "
                  "(chosen, rejected): set group_size: 2")
        names = [r.name for r in cfg.rewards] if isinstance(cfg.rewards, list) else []
        if "preference_label" not in names:
            p.add("rewards", names, "algorithm.pairs: dataset ranks chosen over rejected by the reward "
                  "'preference_label' (1 / 0): add {name: preference_label}")


def _check_filters(cfg: TrainConfig, p: Problems) -> None:
    f, m = cfg.filters, cfg.mismatch
    max_new = cfg.sampling.max_new_tokens if isinstance(cfg.sampling.max_new_tokens, int) else None
    p.number("filters.overlong_cache_length", f.overlong_cache_length, ge=0, le=max_new, integer=True,
             why="tokens before sampling.max_new_tokens where the penalty ramps; 0 = off")
    p.number("filters.overlong_penalty_factor", f.overlong_penalty_factor, ge=0)
    group = cfg.group_size if isinstance(cfg.group_size, int) else None
    p.number("filters.gfpo_k", f.gfpo_k, ge=1, le=group, integer=True, optional=True,
             why="completions kept per group, at most group_size; null = GFPO off")
    p.choice("filters.gfpo_metric", f.gfpo_metric, ("length", "reward_per_token"))
    if f.gfpo_adaptive:
        if f.gfpo_k is None:
            p.add("filters.gfpo_adaptive", True, "needs GFPO on (filters.gfpo_k)")
        for i, k in enumerate(f.gfpo_k_per_bucket):
            p.number(f"filters.gfpo_k_per_bucket[{i}]", k, ge=1, le=group, integer=True)
        if len(f.gfpo_k_per_bucket) != len(f.gfpo_quantiles) + 1:
            p.add("filters.gfpo_k_per_bucket", f.gfpo_k_per_bucket, "needs one more entry than gfpo_quantiles")
        if (any(not 0 < q < 1 for q in f.gfpo_quantiles)
                or list(f.gfpo_quantiles) != sorted(set(f.gfpo_quantiles))):
            p.add("filters.gfpo_quantiles", f.gfpo_quantiles, "must be strictly increasing, each in (0, 1)")
    p.number("filters.max_sample_batches", f.max_sample_batches, ge=1, integer=True,
             why="generation rounds per step for dynamic sampling")
    if f.dynamic_sampling_reward is not None:
        names = [r.name for r in cfg.rewards] if isinstance(cfg.rewards, list) else []
        p.choice("filters.dynamic_sampling_reward", f.dynamic_sampling_reward, names,
                 why="the reward whose equal values make a group uninformative; null = the combined reward")
    p.number("filters.top_entropy_fraction", f.top_entropy_fraction, gt=0, le=1, optional=True,
             why="fraction of tokens (highest entropy first) that train; null = all")
    p.number("filters.history_threshold", f.history_threshold,
             why="a rollout is correct when filters.history_reward >= this")
    if f.history_resampling:
        names = [r.name for r in cfg.rewards] if isinstance(cfg.rewards, list) else []
        p.choice("filters.history_reward", f.history_reward, names,
                 why="the reward whose value judges a rollout correct, one of the configured rewards")
    if m.mode is not None:
        from mmrl.objectives import MISMATCH_MODES

        p.choice("mismatch.mode", m.mode, MISMATCH_MODES)
    p.number("mismatch.cap", m.cap, ge=1, why="C >= 1: a truncation below 1 would down-weight on-policy tokens")
    p.number("mismatch.low", m.low, ge=0, le=1, optional=True)
    p.number("mismatch.high", m.high, ge=1, optional=True)


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
    for check in (_check_run, _check_sampling, _check_algorithm, _check_filters, _check_papo, _check_optim,
                  _check_logging, _check_eval, _check_rewards):
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


from mmrl.config_aliases import FOREIGN_KEYS, unknown_key_hint  # noqa: E402,F401  (re-exported)
