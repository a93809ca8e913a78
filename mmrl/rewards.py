"""Reward functions: a registry by name, loading from ``path/to/file.py:function``, and the
weighted combination the trainer uses.

A reward function has TRL's signature::

    fn(prompts: list, completions: list, **columns) -> list[float | None]

``prompts[i]`` / ``completions[i]`` belong to sample ``i`` of the rollout; every dataset column of the
prompt batch is passed as a keyword argument holding one value per sample (repeated across a group).
Functions should accept ``**kwargs`` so that columns they do not use are ignored.

Missing rewards follow TRL's semantics: ``None`` (or NaN) means "this function has no opinion on this
completion". The weighted sum ignores missing entries; a completion for which *every* function is
missing gets reward NaN, which :func:`mmrl.algorithms.group_advantages` callers turn into advantage 0.
A function that raises or times out is treated as missing for the whole batch, counted and logged —
training goes on. A function that returns the wrong number of values is a programming error and
raises immediately.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import inspect
import json
import logging
import math
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

RewardFn = Callable[..., list]

_REGISTRY: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make ``fn`` loadable by ``name`` (e.g. from a YAML config)."""

    def decorator(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"reward {name!r} is already registered (by {_REGISTRY[name].__module__})")
        _REGISTRY[name] = fn
        return fn

    return decorator


# Rewards that own a model (CLIP, a VLM judge, ...) are registered as *factories*: ``factory(**args)``
# builds the callable once; a config names it and passes ``args`` (``{name: clip_score, args: {...}}``).
_FACTORIES: dict[str, Callable[..., RewardFn]] = {}
_BUILT: dict[tuple[str, str], RewardFn] = {}


def register_reward_factory(name: str) -> Callable[[Callable[..., RewardFn]], Callable[..., RewardFn]]:
    """Decorator: ``factory(**args) -> reward fn`` buildable by ``name`` with config ``args``. Built once
    per (name, args) and shared, so the start-up dry run and the trainer use the same loaded model."""

    def decorator(factory: Callable[..., RewardFn]) -> Callable[..., RewardFn]:
        if name in _REGISTRY or (name in _FACTORIES and _FACTORIES[name] is not factory):
            raise ValueError(f"reward {name!r} is already registered")
        _FACTORIES[name] = factory
        return factory

    return decorator


def available_rewards() -> list[str]:
    return sorted({*_REGISTRY, *_FACTORIES})


def _load_from_file(spec: str) -> RewardFn:
    path_str, _, fn_name = spec.rpartition(":")
    path = Path(path_str)
    if not path.is_file():
        raise FileNotFoundError(f"reward file {path_str!r} (from {spec!r}) does not exist")
    # One module per file, executed once: a file that registers rewards (or holds several functions named
    # in one config) must not be re-run, or its registrations would collide.
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    module_name = f"mmrl_user_reward_{digest}"
    module = sys.modules.get(module_name)
    if module is None:
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise ImportError(f"cannot import reward file {path_str!r}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise AttributeError(f"{path_str!r} has no function {fn_name!r}; callables there: {names}")
    return fn


def get_reward(spec: str | RewardFn) -> RewardFn:
    """Resolve a reward by registry name, ``path/to/file.py:function``, or pass a callable through."""
    if callable(spec):
        return spec
    if ".py:" in spec:
        return _load_from_file(spec)
    if spec in _REGISTRY:
        return _REGISTRY[spec]
    if spec in _FACTORIES:
        return build_reward(spec)
    close = difflib.get_close_matches(spec, available_rewards(), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise KeyError(
        f"unknown reward {spec!r}.{hint} Registered rewards: {available_rewards()} "
        "(task rewards register when their package is imported; or use 'path/to/file.py:function')"
    )


def build_reward(spec: str | RewardFn, args: dict[str, Any] | None = None) -> RewardFn:
    """A reward from a config entry: a factory name built with ``args`` (cached), or any
    :func:`get_reward` spec whose ``args`` become extra keyword arguments of every call."""
    args = dict(args or {})
    if isinstance(spec, str) and spec in _FACTORIES:
        key = (spec, json.dumps(args, sort_keys=True, default=str))
        if key not in _BUILT:
            factory = _FACTORIES[spec]
            try:
                inspect.signature(factory).bind(**args)
            except TypeError as exc:
                raise TypeError(f"reward {spec!r}: bad args {sorted(args)} ({exc}); it accepts "
                                f"{inspect.signature(factory)}") from None
            _BUILT[key] = factory(**args)
        return _BUILT[key]
    fn = get_reward(spec)
    if not args:
        return fn

    def bound(prompts: list, completions: list, **columns: Any) -> list:
        return fn(prompts, completions, **{**columns, **args})

    bound.__name__ = reward_name(fn)
    return bound


def reward_name(fn: RewardFn) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


@dataclass
class RewardOutput:
    """Per-function rewards ``[B, F]`` (NaN = missing), their weighted total ``[B]`` (NaN when every
    function is missing for that sample), and failure counts for logging."""

    per_function: torch.Tensor
    total: torch.Tensor
    names: list[str]
    failures: dict[str, int] = field(default_factory=dict)


def _call_with_timeout(fn: RewardFn, timeout: float | None, args: tuple, kwargs: dict) -> Any:
    if not timeout:
        return fn(*args, **kwargs)
    # A thread cannot be killed: a timed-out call is abandoned and its result ignored. It runs in a
    # daemon thread (not a ThreadPoolExecutor, whose workers are joined at exit) so a reward that
    # hangs forever cannot keep the process from exiting.
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    worker = threading.Thread(target=target, name=f"reward-{reward_name(fn)}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise TimeoutError(f"reward {reward_name(fn)!r} did not return within {timeout}s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _to_float(value: Any) -> float:
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def compute_rewards(
    fns: Sequence[RewardFn],
    weights: Sequence[float],
    prompts: list,
    completions: list,
    columns: dict[str, list] | None = None,
    timeout: float | None = None,
    names: Sequence[str] | None = None,
) -> RewardOutput:
    """Call every reward function on the batch and combine them with ``weights``."""
    if len(fns) != len(weights):
        raise ValueError(f"{len(fns)} reward functions but {len(weights)} weights")
    if not fns:
        raise ValueError("no reward functions configured")
    batch = len(completions)
    if len(prompts) != batch:
        raise ValueError(f"{len(prompts)} prompts but {batch} completions")
    columns = columns or {}
    names = list(names) if names is not None else [reward_name(f) for f in fns]
    table = torch.full((batch, len(fns)), math.nan, dtype=torch.float32)
    failures: dict[str, int] = {}
    for j, (fn, name) in enumerate(zip(fns, names)):
        try:
            values = _call_with_timeout(fn, timeout, (prompts, completions), dict(columns))
        except TimeoutError:
            logger.warning("reward %r timed out after %ss; treated as missing for this batch", name, timeout)
            failures[name] = batch
            continue
        except Exception as exc:  # a user reward may raise anything; training goes on
            logger.warning("reward %r raised %s: %s; treated as missing for this batch", name, type(exc).__name__, exc)
            failures[name] = batch
            continue
        if values is None or len(values) != batch:
            got = "None" if values is None else f"{len(values)} values"
            raise ValueError(f"reward function {name!r} returned {got} for a batch of {batch} completions")
        column = torch.tensor([_to_float(v) for v in values], dtype=torch.float32)
        missing = int(torch.isnan(column).sum())
        if missing:
            failures[name] = missing
        table[:, j] = column
    w = torch.tensor(list(weights), dtype=torch.float32)
    valid = ~torch.isnan(table)
    total = torch.where(valid, table * w, torch.zeros_like(table)).sum(dim=1)
    total = torch.where(valid.any(dim=1), total, torch.full_like(total, math.nan))
    return RewardOutput(per_function=table, total=total, names=names, failures=failures)
