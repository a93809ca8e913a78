"""The summary of a benchmark evaluation (:mod:`vision.evaluate`): accuracy (avg@n), pass@k, error counts,
how many answers the ``--judge`` model read, per-category breakdowns, and the Markdown table."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

import torch

from mmrl.metrics import avg_at_k, pass_at_k

if TYPE_CHECKING:
    from vision.evaluate import ItemResult

UNMATCHED = "_unmatched_predictions"  # summary key for prediction rows no selected benchmark can claim


def _correct_matrix(results: list[ItemResult], n: int) -> torch.Tensor:
    """``[items, n]`` correctness; a result with fewer than ``n`` samples counts the rest as wrong."""
    return torch.tensor([(r.correct + [False] * n)[:n] for r in results], dtype=torch.bool).reshape(len(results), n)


def summarize(results: list[ItemResult], k: int, breakdowns: tuple[str, ...] = ()) -> dict[str, Any]:
    """Accuracy (avg@n), pass@k, error counts and per-category accuracy for one benchmark's results."""
    n = max([k, *(len(r.correct) for r in results)])
    k = min(k, n) if k > 1 else n
    correct = _correct_matrix(results, n)
    avg = avg_at_k(correct) if len(results) else torch.zeros(0)
    summary: dict[str, Any] = {
        "accuracy": float(avg.mean()) if len(results) else float("nan"), "n": len(results),
        "errors": sum(1 for r in results if r.error and r.error.startswith(("load error", "generation error"))),
        "missing": sum(1 for r in results if r.error in ("no prediction", "no output")),
        "unknown_ids": sum(1 for r in results if r.error == "unknown id"), "samples_per_item": n,
        # graded with fewer than n samples (scoring mode: a row with fewer outputs); the rest count as wrong
        "incomplete": sum(1 for r in results if 0 < len(r.correct) < n),
        "judged": sum(sum(r.judged) for r in results)}  # outputs whose answer the --judge model read
    passed = pass_at_k(correct, k) if len(results) and n > 1 else None
    if n > 1:
        summary[f"avg@{n}"] = summary["accuracy"]
        summary[f"pass@{k}"] = float(passed.mean()) if passed is not None else float("nan")
    summary["breakdowns"] = _breakdowns(results, avg, passed, k, breakdowns)
    return summary


def _breakdowns(results, avg, passed, k, keys) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for key in keys:
        buckets: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(results):
            value = r.categories.get(key)
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if v is not None and v != "":
                    buckets[str(v)].append(i)
        if buckets:
            out[key] = {v: {"accuracy": float(avg[idx].mean()), "n": len(idx),
                            **({f"pass@{k}": float(passed[idx].mean())} if passed is not None else {})}
                        for v, idx in sorted(buckets.items())}
    return out


def _pct(value: float) -> str:
    return "—" if value != value else f"{100 * value:.1f}"  # NaN (no items) shows as a dash


def markdown_summary(summary: dict[str, dict]) -> str:
    lines = ["| benchmark | n | accuracy (%) | pass@k (%) | errors | missing | unknown ids |", "|---|---|---|---|---|---|---|"]
    benches = {b: s for b, s in summary.items() if b != UNMATCHED}
    for name, s in benches.items():
        pk = next((f"{_pct(v)} (k={key[5:]})" for key, v in s.items() if key.startswith("pass@")), "—")
        lines.append(f"| {name} | {s['n']} | {_pct(s['accuracy'])} | {pk} | {s['errors']} | {s['missing']} "
                     f"| {s['unknown_ids']} |")
    if UNMATCHED in summary:
        lines.append(f"\n{summary[UNMATCHED]['n']} prediction rows matched no benchmark item (see {UNMATCHED}).")
    for name, s in benches.items():
        for key, buckets in s["breakdowns"].items():
            lines += ["", f"**{name}** by {key}", "", f"| {key} | n | accuracy (%) |", "|---|---|---|"]
            lines += [f"| {v} | {b['n']} | {_pct(b['accuracy'])} |" for v, b in buckets.items()]
    return "\n".join(lines) + "\n"
