"""Benchmark evaluation of a Qwen-VL model: ``mmrl eval`` and :func:`evaluate`.

    mmrl eval --model PATH_OR_ID --benchmarks geometry3k,mathvista [--data mathvista=/data/MathVista]
              [--k 8 --temperature 1.0] [--output runs/eval] [--config configs/eval/x.yaml]
    mmrl eval --predictions preds.jsonl --benchmarks mathvista        # grade existing outputs, no model
    mmrl eval ... --judge Qwen/Qwen2.5-VL-7B-Instruct   # a local model reads answers the rules find none in

Generation goes through :meth:`vision.policy.VisionPolicy.generate`, the sampler training uses, on records
built like training records (:func:`vision.benchmarks.item_record`). With ``k == 1`` decoding is greedy
unless a temperature is given; with ``k > 1`` each item gets ``k`` samples (temperature 1.0 by default)
and the summary reports avg@k (mean correctness of the samples, also ``accuracy``) and pass@k.

Nothing is dropped silently: an item whose image or row cannot be loaded, an item without a prediction
(scoring mode) and a prediction whose id matches no item are all scored wrong, counted in the summary
(``errors``, ``missing``, ``unknown_ids``) and logged. Outputs in ``output``: ``predictions.jsonl``,
``summary.json`` (``{benchmark: {"accuracy", "n", "errors", ..., "breakdowns"}}``) and ``summary.md``.

``--judge MODEL`` (:func:`vision.judge.judge_grades`): rules first; only an output in which they find no
answer is shown to the judge, which replies "ANSWER: X" (graded like any answer) or NONE. The summary's
``judged`` counts the outputs whose answer the judge read; garbage replies leave the output unanswered.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from mmrl.config import ConfigError, from_dict, load_yaml
from mmrl.data import BadSample
from mmrl.policy import Sampling
from mmrl.processes import process_state
from vision.benchmarks import (
    BenchmarkData,
    BenchmarkError,
    BenchmarkItem,
    get_benchmark,
    grade_answer,
    item_record,
    load_benchmark,
)
from vision.data import apply_template
from vision.eval_summary import UNMATCHED, markdown_summary, summarize
from vision.judge import judge_grades

logger = logging.getLogger(__name__)



@dataclass
class EvalRunConfig:
    """An evaluation run (YAML or CLI flags; unknown keys are errors)."""

    model: str | None = None  # hub id, local directory or built-in tiny model; unused with `predictions`
    benchmarks: list[str] = field(default_factory=list)  # registry names (vision.benchmarks)
    data: dict = field(default_factory=dict)  # benchmark name -> local copy (folder, file or save_to_disk)
    k: int = 1  # samples per item
    temperature: float | None = None  # None: greedy for k == 1, 1.0 for k > 1
    top_p: float = 1.0
    max_new_tokens: int = 1024
    batch_size: int = 8  # prompts per generate call (k samples each)
    limit: int | None = None  # first N items of each benchmark
    output: str | None = "runs/eval"  # None: write nothing
    predictions: str | None = None  # scoring-only mode: a JSONL of {"id", "output" | "outputs"} rows
    template: str | None = None  # prompt template override (name or format string with {question})
    system_prompt: str | None = None
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"  # auto: cuda when available
    min_pixels: int = 28 * 28 * 4
    max_pixels: int = 28 * 28 * 1280
    grade_timeout: int = 5  # seconds per math-verify call
    judge: Any = None  # local model (or a callable) that reads the answer where the rules find none
    progress_bar: bool = True


@dataclass
class ItemResult:
    """One item's (or one stray prediction's) outcome, as written to predictions.jsonl."""

    benchmark: str
    id: str
    prompt: str | None
    answer: str | None
    outputs: list[str]
    extracted: list[str | None]
    correct: list[bool]
    error: str | None = None  # "image could not be loaded: ...", "no prediction", "unknown id", ...
    categories: dict = field(default_factory=dict)
    judged: list[bool] = field(default_factory=list)  # per output: the judge, not the rules, read its answer


# ------------------------------------------------------------------------------------------- config


def check_config(cfg: EvalRunConfig, need_model: bool = True) -> EvalRunConfig:
    if not cfg.benchmarks:
        raise ConfigError("no benchmarks given (e.g. --benchmarks geometry3k,mathvista)")
    for name in cfg.benchmarks:
        get_benchmark(name)  # unknown name: BenchmarkError listing the available ones
    for name in cfg.data:
        get_benchmark(name)  # a typo in a data key must not silently fall back to the Hub
        if name not in cfg.benchmarks:
            logger.warning("data path for %s is not used: it is not among the benchmarks %s", name, cfg.benchmarks)
    if cfg.k < 1 or cfg.batch_size < 1:
        raise ConfigError(f"k and batch_size must be >= 1, got k={cfg.k}, batch_size={cfg.batch_size}")
    if cfg.k > 1 and cfg.temperature is not None and cfg.temperature <= 0:
        raise ConfigError(f"k={cfg.k} samples need temperature > 0 (greedy decoding gives k identical outputs)")
    if need_model and cfg.predictions is None and not cfg.model:
        raise ConfigError("give a model (--model PATH_OR_ID) or existing outputs to grade (--predictions FILE)")
    return cfg


def load_eval_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> EvalRunConfig:
    """The run config from YAML (optional) with ``overrides`` (CLI flags) on top; ``data`` merges by name."""
    raw: dict[str, Any] = load_yaml(path) if path is not None else {}
    for key, value in (overrides or {}).items():
        raw[key] = {**(raw.get("data") or {}), **value} if key == "data" else value
    if isinstance(raw.get("benchmarks"), str):  # "a,b" in YAML too
        raw["benchmarks"] = [b.strip() for b in raw["benchmarks"].split(",") if b.strip()]
    return check_config(from_dict(EvalRunConfig, raw))


# ---------------------------------------------------------------------------------------- generation


def _load_policy(cfg: EvalRunConfig):
    from vision.modeling import VisionModelConfig, load_model_and_processor
    from vision.policy import VisionPolicy

    model, processor = load_model_and_processor(VisionModelConfig(
        name_or_path=cfg.model, dtype=cfg.dtype, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels))
    # Under `accelerate launch` every process gets its own device (cuda:LOCAL_RANK); alone, cuda if any.
    device = cfg.device if cfg.device != "auto" else process_state().device
    return VisionPolicy(model.to(device).eval(), processor)


def _prompt_text(data: BenchmarkData, item: BenchmarkItem, cfg: EvalRunConfig) -> str:
    return apply_template(item.question, cfg.template or data.benchmark.template)


def _graded(data: BenchmarkData, item: BenchmarkItem, cfg: EvalRunConfig, outputs: list[str]) -> ItemResult:
    def one(text: str):
        return grade_answer(text, item.answers, item.answer_type, item.choices, item.precision, item.unit,
                            cfg.grade_timeout)

    # rules first; with a judge, it reads only the outputs in which they found no answer
    grades, judged = judge_grades(cfg.judge, outputs, [one(o) for o in outputs], one)
    return ItemResult(data.benchmark.name, item.id, _prompt_text(data, item, cfg), item.answer, list(outputs),
                      [g.extracted for g in grades], [g.correct for g in grades], categories=dict(item.categories),
                      judged=judged)


def _failed(data: BenchmarkData, item: BenchmarkItem | None, index: int, error: str, cfg: EvalRunConfig) -> ItemResult:
    if item is None:
        return ItemResult(data.benchmark.name, f"row-{index}", None, None, [], [], [], error)
    return ItemResult(data.benchmark.name, item.id, _prompt_text(data, item, cfg), item.answer, [], [], [], error,
                      dict(item.categories))


def _generate_batch(policy, batch: list, data: BenchmarkData, cfg: EvalRunConfig,
                    sampling: Sampling) -> tuple[dict[int, ItemResult], int]:
    """Results of one batch and its completion tokens. If the batch fails (an image the processor rejects,
    out of memory), its items are retried one by one so that only the culprit becomes an error item."""
    try:
        rollout = policy.generate(policy.model, [record for _, _, record in batch], cfg.k, sampling)
    except Exception as exc:
        if len(batch) == 1:
            index, item, _ = batch[0]
            logger.warning("%s: item %s scored wrong: generation failed: %s: %s", data.benchmark.name, item.id,
                           type(exc).__name__, exc)
            return {index: _failed(data, item, index, f"generation error: {type(exc).__name__}: {exc}", cfg)}, 0
        results, tokens = {}, 0
        for one in batch:
            part, n = _generate_batch(policy, [one], data, cfg, sampling)
            results.update(part)
            tokens += n
        return results, tokens
    texts = policy.decode(rollout)
    results = {i: _graded(data, item, cfg, texts[j * cfg.k:(j + 1) * cfg.k]) for j, (i, item, _) in enumerate(batch)}
    return results, int(rollout.completion_mask.sum())


def generate_results(policy, data: BenchmarkData, cfg: EvalRunConfig) -> list[ItemResult]:
    """Sample ``cfg.k`` completions per item in batches and grade them; a load failure is an error item.

    Data-parallel under ``accelerate launch``: process r takes items r, r + N, ...; the results are
    gathered (accelerate's ``gather_object``) so every process returns the full, ordered list."""
    temperature = cfg.temperature if cfg.temperature is not None else (1.0 if cfg.k > 1 else 0.0)
    sampling = Sampling(temperature=temperature, top_p=cfg.top_p, top_k=0, max_new_tokens=cfg.max_new_tokens)
    state = process_state()
    # per benchmark (results do not depend on which benchmarks ran before) and per process (no shared stream)
    torch.manual_seed(cfg.seed + state.process_index)
    was_training = policy.model.training
    policy.model.eval()
    results: dict[int, ItemResult] = {}
    mine = range(state.process_index, len(data), state.num_processes)
    bar = tqdm(total=len(mine), desc=data.benchmark.name, unit="item", dynamic_ncols=True,
               disable=not cfg.progress_bar or not state.is_main_process)
    tokens, start, batch = 0, time.perf_counter(), []
    for index in mine:
        item = None
        try:
            item = data[index]
            batch.append((index, item, item_record(data, item, cfg.template, cfg.system_prompt)))
        except BadSample as exc:
            logger.warning("%s: item %s scored wrong: %s", data.benchmark.name, item.id if item else index, exc)
            results[index] = _failed(data, item, index, f"load error: {exc}", cfg)
            bar.update(1)
        if len(batch) == cfg.batch_size or (index == mine[-1] and batch):
            done, n_tokens = _generate_batch(policy, batch, data, cfg, sampling)
            results.update(done)
            tokens += n_tokens
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - start):.1f}")
            batch = []
    bar.close()
    policy.model.train(was_training)
    pairs = list(results.items())
    if state.num_processes > 1:
        pairs = gather_object(pairs)
    return [result for _, result in sorted(pairs, key=lambda pair: pair[0])]


# ---------------------------------------------------------------------------------------- scoring mode


def read_predictions(path: str | Path) -> list[dict]:
    """Rows of a predictions JSONL file (``{"id", "output"}`` or ``{"id", "outputs": [...]}``, optionally
    ``"benchmark"``); this module's own predictions.jsonl reads back."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not a JSON line: {exc}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _row_outputs(row: dict) -> list[str]:
    outputs = row["outputs"] if "outputs" in row else [row.get("output")]
    outputs = [outputs] if isinstance(outputs, str) else outputs
    return [str(o) for o in (outputs or []) if o is not None]  # null = no output for that sample


def _item_ids(data: BenchmarkData) -> set[str]:
    ids = set()
    for i in range(len(data)):
        try:
            ids.add(data[i].id)
        except BadSample:  # reported as an error item by score_results
            pass
    return ids


def assign_predictions(rows: list[dict], datas: dict[str, BenchmarkData]) -> tuple[dict, dict, list]:
    """({benchmark: {id: outputs}}, {benchmark: [unknown rows]}, [rows no benchmark can claim]). Rows for
    the same id are concatenated (one sample per row works); a row naming an unselected benchmark is
    skipped (it is another run's). Without a "benchmark" field a row matches every benchmark with its id."""
    ids = {name: _item_ids(data) for name, data in datas.items()}
    outputs: dict[str, dict[str, list[str]]] = {name: defaultdict(list) for name in datas}
    unknown: dict[str, list[dict]] = {name: [] for name in datas}
    unclaimed, skipped = [], 0
    for row in rows:
        row_id, named = str(row.get("id")), row.get("benchmark")
        if named is not None and named not in datas:
            skipped += 1
            continue
        targets = [named] if named is not None else [n for n in datas if row_id in ids[n]]
        matched = [n for n in targets if row_id in ids[n]]
        for name in matched:
            outputs[name][row_id].extend(_row_outputs(row))
        if not matched:
            owner = targets[0] if targets else next(iter(datas)) if len(datas) == 1 else None
            (unknown[owner] if owner else unclaimed).append(row)
    if skipped:
        logger.info("skipped %d prediction rows of benchmarks not selected here", skipped)
    return outputs, unknown, unclaimed


def score_results(data: BenchmarkData, outputs: dict[str, list[str]], unknown: list[dict],
                  cfg: EvalRunConfig) -> list[ItemResult]:
    results = []
    for index in range(len(data)):
        try:
            item = data[index]
        except BadSample as exc:
            results.append(_failed(data, None, index, f"load error: {exc}", cfg))
            continue
        found = outputs.get(item.id)
        if not found:
            error = "no prediction" if found is None else "no output"
            results.append(_failed(data, item, index, error, cfg))
        else:
            results.append(_graded(data, item, cfg, found))
    for row in unknown:
        results.append(ItemResult(data.benchmark.name, str(row.get("id")), None, None, _row_outputs(row), [], [],
                                  "unknown id"))
    _warn_errors(data.benchmark.name, results)
    return results


def _warn_errors(benchmark: str, results: list[ItemResult], shown: int = 10) -> None:
    """One warning per kind of error (a large file must not flood the log), naming the first ids."""
    by_kind: dict[str, list[str]] = defaultdict(list)
    for r in results:
        if r.error:
            by_kind[r.error.split(":")[0]].append(r.id)
    for kind, ids in by_kind.items():
        more = f", ... ({len(ids) - shown} more)" if len(ids) > shown else ""
        logger.warning("%s: %d scored wrong for %s: %s%s", benchmark, len(ids), kind, ", ".join(ids[:shown]), more)


# ------------------------------------------------------------------------------------------- outputs


def write_outputs(output: str | Path, results: list[ItemResult], summary: dict) -> None:
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps(asdict(r), ensure_ascii=False, default=str) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    (out / "summary.md").write_text(markdown_summary(summary))


# ------------------------------------------------------------------------------------------- runs


def run(cfg: EvalRunConfig, policy=None) -> dict[str, dict]:
    """Evaluate (or, with ``cfg.predictions``, score) every benchmark of ``cfg``; returns the summary."""
    check_config(cfg, need_model=policy is None)
    datas = {name: load_benchmark(name, cfg.data.get(name), cfg.limit) for name in cfg.benchmarks}
    all_results: list[ItemResult] = []
    summary: dict[str, dict] = {}
    if cfg.predictions is not None:
        outputs, unknown, unclaimed = assign_predictions(read_predictions(cfg.predictions), datas)
        per_bench = {name: score_results(data, outputs[name], unknown[name], cfg) for name, data in datas.items()}
    else:
        policy = policy if policy is not None else _load_policy(cfg)
        per_bench = {name: generate_results(policy, data, cfg) for name, data in datas.items()}
        unclaimed = []
    for name, results in per_bench.items():
        summary[name] = summarize(results, cfg.k, datas[name].benchmark.breakdowns)
        if summary[name]["incomplete"]:
            logger.warning("%s: %d items have fewer than %d outputs; the missing samples count as wrong", name,
                           summary[name]["incomplete"], summary[name]["samples_per_item"])
        all_results += results
    if unclaimed:
        logger.warning("%d prediction rows match no item of %s; scored nowhere, listed under %s",
                       len(unclaimed), cfg.benchmarks, UNMATCHED)
        summary[UNMATCHED] = {"n": len(unclaimed), "ids": [str(r.get("id")) for r in unclaimed[:50]]}
        all_results += [ItemResult(str(r.get("benchmark")), str(r.get("id")), None, None, _row_outputs(r), [], [],
                                   "unknown id") for r in unclaimed]
    if cfg.output is not None and process_state().is_main_process:
        write_outputs(cfg.output, all_results, summary)
    return summary


def evaluate(model_or_policy: Any, benchmarks: list[str] | str, **options: Any) -> dict[str, dict]:
    """Python API: evaluate a :class:`~vision.policy.VisionPolicy` (or a model path / hub id, or None with
    ``predictions=``) on ``benchmarks``; ``options`` are :class:`EvalRunConfig` fields (``k``, ``data``,
    ``output``, ...). Returns the summary (``{benchmark: {"accuracy", "n", ...}}``)."""
    names = [b.strip() for b in benchmarks.split(",")] if isinstance(benchmarks, str) else list(benchmarks)
    if isinstance(model_or_policy, str):
        return run(EvalRunConfig(model=model_or_policy, benchmarks=names, **options))
    return run(EvalRunConfig(benchmarks=names, **options), model_or_policy)


# ------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmrl eval", description="Evaluate a VLM on benchmarks (or grade outputs).")
    p.add_argument("--config", help="YAML run config (vision.evaluate.EvalRunConfig); flags override it")
    p.add_argument("--model", help="model: hub id, local directory or tiny-qwen2.5-vl")
    p.add_argument("--benchmarks", help="comma-separated registry names, e.g. geometry3k,mathvista")
    p.add_argument("--data", action="append", default=[], metavar="NAME=PATH",
                   help="local copy of a benchmark (repeatable), e.g. --data mathvista=/data/MathVista")
    p.add_argument("--k", type=int, help="samples per item (avg@k and pass@k when > 1)")
    p.add_argument("--temperature", type=float, help="sampling temperature (default: greedy for k=1, 1.0 for k>1)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--batch-size", type=int, help="prompts per generate call")
    p.add_argument("--limit", type=int, help="evaluate only the first N items of each benchmark")
    p.add_argument("--output", help="output folder (predictions.jsonl, summary.json, summary.md)")
    p.add_argument("--predictions", help="grade this JSONL of outputs instead of running a model")
    p.add_argument("--template", help="prompt template override (a name or a string with {question})")
    p.add_argument("--seed", type=int)
    p.add_argument("--judge", help="local model that reads the answer where the rules find none (summary: judged)")
    p.add_argument("--list", action="store_true", help="list the registered benchmarks and exit")
    return p


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out = {key: getattr(args, key) for key in ("model", "k", "temperature", "max_new_tokens", "batch_size",
                                               "limit", "output", "predictions", "template", "seed", "judge")
           if getattr(args, key) is not None}
    if args.benchmarks is not None:
        out["benchmarks"] = args.benchmarks
    if args.data:
        pairs = [item.partition("=") for item in args.data]
        bad = [name for name, eq, path in pairs if not eq or not name or not path]
        if bad:
            raise ConfigError(f"--data takes NAME=PATH (e.g. mathvista=/data/MathVista), got {args.data}")
        out["data"] = {name.strip(): path for name, _, path in pairs}
    return out


def cli_main(argv: list[str]) -> int:
    """``mmrl eval ...``: returns the process exit code (2 for bad input, with a one-line message)."""
    args = build_parser().parse_args(argv)
    if args.list:
        from vision.benchmarks import available_benchmarks

        print("\n".join(f"{n}\t{get_benchmark(n).source}" for n in available_benchmarks()))
        return 0
    try:
        cfg = load_eval_config(args.config, _overrides(args))
        summary = run(cfg)
    except (ConfigError, BenchmarkError, FileNotFoundError, ValueError) as exc:
        print(f"mmrl eval: error: {exc}", file=sys.stderr)
        return 2
    if not process_state().is_main_process:
        return 0
    print(markdown_summary(summary), end="")
    if cfg.output is not None:
        print(f"outputs: {Path(cfg.output) / 'summary.json'}, summary.md, predictions.jsonl")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(cli_main(sys.argv[1:]))
