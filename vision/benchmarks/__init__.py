"""Public VLM benchmarks (and the synthetic tasks) behind one registry, for :mod:`vision.evaluate` and for
evaluation during training.

    from vision.benchmarks import available_benchmarks, load_benchmark, item_record
    data = load_benchmark("mathvista")                      # Hub (datasets.load_dataset)
    data = load_benchmark("mathvista", "/data/MathVista")   # a local copy in the same format
    item = data[0]                                          # BenchmarkItem: question, answers, answer_type, ...
    record = item_record(data, item)                        # the record VisionPolicy.generate consumes

Registered: ``geometry3k``, ``mathvista``, ``mathverse``, ``logicvista``, ``wemath``, ``clevr_count``,
``mmk12``, ``mmmu`` and ``synthetic_<task>`` for every task in :mod:`vision.synthetic`.

Importing this package also registers the ``benchmark_accuracy`` reward: it grades each completion with the
rule of the benchmark its record came from (records built by :func:`item_record` carry the columns it
reads: ``accepted_answers``/``answer``, ``answer_type``, ``choices``, ``precision``, ``unit``).
"""

from __future__ import annotations

import logging
from typing import Any

from mmrl.rewards import register_reward
from vision.benchmarks import specs as _specs  # noqa: F401  (registers the benchmarks)
from vision.benchmarks.core import (
    ANSWER_TYPES,
    Benchmark,
    BenchmarkData,
    BenchmarkError,
    BenchmarkItem,
    BenchmarkRecords,
    available_benchmarks,
    get_benchmark,
    grade_answer,
    item_record,
    load_benchmark,
    register_benchmark,
)

__all__ = [
    "ANSWER_TYPES", "Benchmark", "BenchmarkData", "BenchmarkError", "BenchmarkItem", "BenchmarkRecords",
    "available_benchmarks", "benchmark_accuracy", "get_benchmark", "grade_answer", "item_record",
    "load_benchmark", "register_benchmark",
]

logger = logging.getLogger(__name__)


@register_reward("benchmark_accuracy")
def benchmark_accuracy(prompts: list, completions: list, answer: list | None = None,
                       answer_type: list | None = None, accepted_answers: list | None = None,
                       choices: list | None = None, precision: list | None = None, unit: list | None = None,
                       **_: Any) -> list[float | None]:
    """1.0 when the completion is right under its benchmark's grading rule, else 0.0; None (missing) for a
    sample without ``answer``/``answer_type`` columns (not a benchmark record)."""
    from vision.rewards import completion_text

    scores: list[float | None] = []
    for i, completion in enumerate(completions):
        kind = _at(answer_type, i)
        answers = _at(accepted_answers, i) or ([_at(answer, i)] if _at(answer, i) is not None else [])
        if not kind or not answers:
            scores.append(None)
            continue
        try:
            result = grade_answer(completion_text(completion), [str(a) for a in answers], kind, _at(choices, i),
                                  _at(precision, i), _at(unit, i))
        except Exception as exc:  # a grading bug must not stop training: this completion counts as wrong
            logger.warning("benchmark_accuracy: grading sample %d failed (%s: %s); scored 0", i, type(exc).__name__, exc)
            scores.append(0.0)
            continue
        scores.append(1.0 if result.correct else 0.0)
    return scores


def _at(column: list | None, i: int) -> Any:
    return None if column is None else column[i]
