"""Reward functions: a registry by name, loading from ``path/to/file.py:function``, and the
weighted combination the trainer uses.

A reward function has TRL's signature::

    fn(prompts: list, completions: list, **columns) -> list[float | None]

``prompts[i]`` / ``completions[i]`` belong to sample ``i`` of the rollout; every dataset column of the
prompt batch is passed as a keyword argument holding one value per sample (repeated across a group).
Functions should accept ``**kwargs`` so that columns they do not use are ignored.

Missing rewards follow TRL's semantics: ``None`` means "this function has no opinion on this completion".
So does every value that cannot be a reward: NaN, ±inf (or a finite value that overflows float32 once
weighted), a string or anything ``float()`` refuses. A function that raises, returns the wrong number of
values (or no list at all), or does not return within the per-call timeout (:data:`DEFAULT_REWARD_TIMEOUT_S`
unless the caller says otherwise) is missing for the whole batch. The weighted sum ignores missing entries;
a completion for which *every* function is missing gets reward NaN, which
:func:`mmrl.algorithms.group_advantages` turns into advantage 0 — so no infinity ever reaches the loss.
Every kind of missing value (:data:`FAULT_KINDS`) is warned about once per reward function and then only
counted, in a :class:`RewardFaults` the trainer owns and checkpoints. Training goes on.
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
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
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


# --------------------------------------------------------------------------- missing rewards

#: Every way a reward value can be missing. ``none``/``nan``/``inf``/``non_numeric`` are per value;
#: ``wrong_length``/``exception``/``timeout`` take out a function's whole column for the batch.
FAULT_KINDS = ("none", "nan", "inf", "non_numeric", "wrong_length", "exception", "timeout")
#: Seconds one reward-function call may take when the caller gives no ``timeout`` (the same default as
#: ``TrainConfig.reward_timeout``): a hung scorer or judge must not hang a days-long run.
DEFAULT_REWARD_TIMEOUT_S = 300.0
#: Name under which a weighted total that overflows float32 is counted (every term fits, their sum not).
TOTAL_NAME = "<weighted total>"  # not a Python identifier: no reward function can be named so

_PER_VALUE_KINDS = FAULT_KINDS[:4]
_F32_MAX = float(torch.finfo(torch.float32).max)
_VALUE_REPR_CHARS = 200  # a reward may return a huge object; the log line must stay readable


@dataclass(frozen=True)
class RewardFault:
    """``count`` missing values of one kind from one reward function in one batch; ``row`` and ``value``
    describe the first of them (``row`` is 0 for a whole-batch kind, ``value`` a short repr or message)."""

    name: str
    kind: str
    count: int
    row: int
    value: str
    traceback: str = ""  # for ``exception``: the worker's traceback, logged with the first warning


class RewardFaults:
    """Cumulative counts of missing rewards per (reward name, kind), owned by the trainer.

    :meth:`record` logs a warning the first time a (name, kind) pair occurs in this process and only counts
    it afterwards. :meth:`metrics` has the same keys on every call and every process (all of
    :data:`FAULT_KINDS`, zeros included), so the values can be reduced across processes. :meth:`state_dict`
    holds plain ints (JSON-serialisable); a resumed run that loads it continues the counts exactly. Which
    pairs were already warned about is not saved: a resumed process warns once again in its own log.
    """

    def __init__(self) -> None:
        self.counts: dict[str, dict[str, int]] = {}
        self._warned: set[tuple[str, str]] = set()

    def record(self, faults: Sequence[RewardFault]) -> None:
        for fault in faults:
            if fault.kind not in FAULT_KINDS:
                raise ValueError(f"unknown reward fault kind {fault.kind!r}; valid: {FAULT_KINDS}")
            per_name = self.counts.setdefault(fault.name, {})
            per_name[fault.kind] = per_name.get(fault.kind, 0) + fault.count
            key = (fault.name, fault.kind)
            if key in self._warned:
                logger.debug("reward %r: %d more %s value(s)", fault.name, fault.count, fault.kind)
                continue
            self._warned.add(key)
            if fault.kind in _PER_VALUE_KINDS:
                what = (f"{fault.count} value(s) missing ({fault.kind}); "
                        f"first at row {fault.row}: {fault.value}")
            else:
                what = f"missing for the whole batch of {fault.count} ({fault.kind}): {fault.value}"
            logger.warning("reward %r: %s. Later %r faults of %r are only counted (reward_missing_total).%s",
                           fault.name, what, fault.kind, fault.name,
                           f"\n{fault.traceback}" if fault.traceback else "")

    @property
    def total(self) -> int:
        return sum(n for per_name in self.counts.values() for n in per_name.values())

    def by_kind(self) -> dict[str, int]:
        totals = dict.fromkeys(FAULT_KINDS, 0)
        for per_name in self.counts.values():
            for kind, n in per_name.items():
                totals[kind] += n
        return totals

    def metrics(self) -> dict[str, float]:
        """``reward_missing_total`` and ``reward_missing_total/<kind>`` for every kind: cumulative counts."""
        return {"reward_missing_total": float(self.total),
                **{f"reward_missing_total/{k}": float(n) for k, n in self.by_kind().items()}}

    def state_dict(self) -> dict[str, Any]:
        return {"counts": {name: dict(per_name) for name, per_name in self.counts.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        counts = state.get("counts", {})
        loaded: dict[str, dict[str, int]] = {}
        for name, per_name in counts.items():
            for kind, n in per_name.items():
                # A bool is an int in Python; a hand-edited or foreign state must not slip one in.
                if kind not in FAULT_KINDS or isinstance(n, bool) or not isinstance(n, int) or n < 0:
                    raise ValueError(f"bad reward-fault count {name!r}/{kind!r}: {n!r}")
            loaded[str(name)] = {str(k): int(n) for k, n in per_name.items()}
        self.counts = loaded


@dataclass
class RewardOutput:
    """Per-function rewards ``[B, F]`` (NaN = missing), their weighted total ``[B]`` (NaN when every
    function is missing for that sample), missing counts per function (``failures``, all kinds together)
    and the faults of this batch, one :class:`RewardFault` per (function, kind)."""

    per_function: torch.Tensor
    total: torch.Tensor
    names: list[str]
    failures: dict[str, int] = field(default_factory=dict)
    faults: list[RewardFault] = field(default_factory=list)

    @staticmethod
    def concat(parts: Sequence[RewardOutput]) -> RewardOutput:
        """Several batches' rewards as one (e.g. every chunk dynamic sampling generated in a step)."""
        failures: dict[str, int] = {}
        for part in parts:
            for name, count in part.failures.items():
                failures[name] = failures.get(name, 0) + count
        return RewardOutput(torch.cat([p.per_function for p in parts]), torch.cat([p.total for p in parts]),
                            list(parts[0].names), failures, [f for p in parts for f in p.faults])


class RewardTimeout(TimeoutError):
    """A reward call did not return in time, or was skipped because its previous call is still running."""


# One thread per reward function at most: a call that timed out keeps running (a Python thread cannot be
# killed) and the next call of that function is skipped until it returns, so a scorer that hangs forever
# holds one daemon thread, not one per step.
_RUNNING: dict[int, threading.Thread] = {}
_RUNNING_LOCK = threading.Lock()


def call_with_timeout(fn: RewardFn, timeout: float | None, args: tuple, kwargs: dict) -> Any:
    """``fn(*args, **kwargs)``, raising :class:`RewardTimeout` after ``timeout`` seconds (``None`` or 0:
    no limit, called in this thread). The call runs in a daemon thread (not a ThreadPoolExecutor, whose
    workers are joined at exit) so that a reward that never returns cannot keep the process from exiting;
    it is abandoned, its result ignored, and later calls of the same ``fn`` raise at once while it runs."""
    if timeout is not None and timeout < 0:
        raise ValueError(f"reward timeout must be >= 0 seconds or None, got {timeout}")
    key = id(fn)  # the running thread holds ``fn``, so its id cannot be reused while the entry is live
    with _RUNNING_LOCK:
        previous = _RUNNING.get(key)
        if previous is not None and previous.is_alive():
            raise RewardTimeout(f"reward {reward_name(fn)!r} was skipped: an earlier call that timed out "
                                "is still running")
        if not timeout:
            worker = None
        else:
            outcome: dict[str, Any] = {}

            def target() -> None:
                try:
                    outcome["value"] = fn(*args, **kwargs)
                except BaseException as exc:  # re-raised in the caller's thread
                    outcome["error"] = exc
                finally:
                    with _RUNNING_LOCK:
                        if _RUNNING.get(key) is threading.current_thread():
                            del _RUNNING[key]

            worker = threading.Thread(target=target, name=f"reward-{reward_name(fn)}", daemon=True)
            _RUNNING[key] = worker
            worker.start()
    if worker is None:
        return fn(*args, **kwargs)
    worker.join(timeout)
    if worker.is_alive():
        raise RewardTimeout(f"reward {reward_name(fn)!r} timed out after {timeout}s; its thread keeps "
                            "running as a daemon and the reward is skipped until it returns")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _short_repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception as exc:  # a user object's __repr__ may itself be broken
        text = f"<{type(value).__name__} (repr failed: {exc!r})>"
    return text if len(text) <= _VALUE_REPR_CHARS else text[:_VALUE_REPR_CHARS] + "..."


def classify_reward(value: Any) -> tuple[float, str | None]:
    """``(float value, None)`` for a usable reward, else ``(nan, kind)`` with kind from :data:`FAULT_KINDS`.

    Strings are never rewards (even ``"1.5"``: a function returning text is almost surely returning the wrong
    thing); bool counts as 0/1; anything ``float()`` accepts (numpy, 0-d tensors, ...) is a number."""
    if value is None:
        return math.nan, "none"
    if isinstance(value, (str, bytes, bytearray)):
        return math.nan, "non_numeric"
    try:
        x = float(value)
    except OverflowError:  # an int beyond float's range is infinite for every purpose here
        return math.nan, "inf"
    except Exception:  # TypeError/ValueError, or whatever a user type's __float__ raises
        return math.nan, "non_numeric"
    if math.isnan(x):
        return math.nan, "nan"
    if math.isinf(x):
        return math.nan, "inf"
    return x, None


def _as_values(values: Any, batch: int) -> list | None:
    """The returned values as a list of ``batch`` entries, or None when the return value is malformed."""
    if isinstance(values, (str, bytes, bytearray, Mapping)) or not isinstance(values, Iterable):
        return None  # None, a bare number, text or a dict: not one value per completion
    try:
        values = list(values)
    except Exception:
        return None
    return values if len(values) == batch else None


def _describe_return(values: Any, batch: int) -> str:
    try:
        got = f"{len(values)} values"
    except Exception:
        got = f"a {type(values).__name__}"
    return f"{got} for a batch of {batch} completions: {_short_repr(values)}"


def compute_rewards(
    fns: Sequence[RewardFn],
    weights: Sequence[float],
    prompts: list,
    completions: list,
    columns: dict[str, list] | None = None,
    timeout: float | None = DEFAULT_REWARD_TIMEOUT_S,
    names: Sequence[str] | None = None,
    faults: RewardFaults | None = None,
) -> RewardOutput:
    """Call every reward function on the batch and combine them with ``weights``.

    Every missing value is recorded in ``faults`` (the trainer's cumulative :class:`RewardFaults`: warned
    once per (name, kind), then counted); without one, a fresh counter warns about this batch only. The
    batch's faults are also returned in :attr:`RewardOutput.faults`. ``timeout`` is seconds per function
    call (``None``: no limit)."""
    if len(fns) != len(weights):
        raise ValueError(f"{len(fns)} reward functions but {len(weights)} weights")
    if not fns:
        raise ValueError("no reward functions configured")
    w64 = [float(w) for w in weights]
    if not all(math.isfinite(w) for w in w64):
        raise ValueError(f"reward weights must be finite, got {list(weights)}")
    if timeout is not None and timeout < 0:
        raise ValueError(f"reward timeout must be >= 0 seconds or None, got {timeout}")
    batch = len(completions)
    if len(prompts) != batch:
        raise ValueError(f"{len(prompts)} prompts but {batch} completions")
    columns = columns or {}
    names = list(names) if names is not None else [reward_name(f) for f in fns]
    # float64 while combining: a value that fits float32 times its weight may not; the table and total are
    # float32 as before, and every entry of them is finite or NaN.
    table = torch.full((batch, len(fns)), math.nan, dtype=torch.float64)
    found: list[RewardFault] = []
    for j, (fn, name, w) in enumerate(zip(fns, names, w64)):
        whole: tuple[str, str, str] | None = None
        try:
            returned = call_with_timeout(fn, timeout, (prompts, completions), dict(columns))
        except RewardTimeout as exc:
            whole = ("timeout", str(exc), "")
        except Exception as exc:  # a user reward may raise anything; training goes on
            whole = ("exception", f"{type(exc).__name__}: {exc}",
                     "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        else:
            values = _as_values(returned, batch)
            if values is None:
                whole = ("wrong_length", _describe_return(returned, batch), "")
        if whole is not None:
            if batch:
                found.append(RewardFault(name, whole[0], batch, 0, whole[1], whole[2]))
            continue
        first: dict[str, tuple[int, int, str]] = {}  # kind -> (count, first row, first value)
        for i, raw in enumerate(values):
            x, kind = classify_reward(raw)
            if kind is None and not (abs(x) <= _F32_MAX and abs(x * w) <= _F32_MAX):
                kind = "inf"  # finite in Python, infinite once stored or weighted in float32
            if kind is None:
                table[i, j] = x
                continue
            count, row, shown = first.get(kind, (0, i, _short_repr(raw)))
            first[kind] = (count + 1, row, shown)
        found.extend(RewardFault(name, kind, c, row, shown) for kind, (c, row, shown) in first.items())
    w = torch.tensor(w64, dtype=torch.float64)
    valid = ~torch.isnan(table)
    total = torch.where(valid, table * w, torch.zeros_like(table)).sum(dim=1)
    total = torch.where(valid.any(dim=1), total, torch.full_like(total, math.nan))
    # Each weighted term fits float32, but several large ones may not: such a sample is missing too, so
    # that the group advantages never see an infinity.
    overflow = total.abs() > _F32_MAX
    if overflow.any():
        row = int(overflow.nonzero()[0, 0])
        found.append(RewardFault(TOTAL_NAME, "inf", int(overflow.sum()), row, _short_repr(float(total[row]))))
        total = torch.where(overflow, torch.full_like(total, math.nan), total)
    (faults if faults is not None else RewardFaults()).record(found)
    failures: dict[str, int] = {}
    for fault in found:
        if fault.name != TOTAL_NAME:
            failures[fault.name] = failures.get(fault.name, 0) + fault.count
    return RewardOutput(per_function=table.float(), total=total.float(), names=names, failures=failures,
                        faults=found)
