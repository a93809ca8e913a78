"""The benchmark registry's machinery: one sample type, loading (Hub or local copy), lazy images, records.

A :class:`Benchmark` maps its dataset's own schema onto :class:`BenchmarkItem` (``adapt``), says where the
data lives (Hub id, config(s), split) and how it is prompted; grading uses the item's ``answer_type`` with
:func:`vision.grading.grade`. Items keep their images as raw sources (HF ``{"bytes", "path"}`` dicts, paths,
PIL images): nothing is decoded until :func:`item_record` builds the record the policy consumes.
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmrl.data import BadSample
from vision.data import LazyRows, _data_files, apply_template, interleave_images, load_image, resolve_template

if TYPE_CHECKING:
    import datasets

    from vision.grading import Grade

logger = logging.getLogger(__name__)

ANSWER_TYPES = ("choice", "number", "math", "text", "list")
SYNTHETIC_SAMPLES = 256  # items generated for a synthetic benchmark unless a limit says otherwise


class BenchmarkError(ValueError):
    """A benchmark that cannot be named or loaded (unknown name, unreachable data, bad local copy)."""


@dataclass(frozen=True)
class BenchmarkItem:
    """One question of a benchmark, in a schema shared by every benchmark.

    ``question`` is the full question text (choices and hints included) with one ``<image>`` placeholder
    per image where the image belongs (none: images go first). ``answers`` holds every accepted answer
    (most benchmarks have one); ``choices`` are option texts in letter order for ``answer_type="choice"``.
    ``categories`` are the fields the summary breaks accuracy down by (a list value counts in each bucket).
    """

    id: str
    question: str
    answers: tuple[str, ...]
    answer_type: str
    images: tuple[Any, ...] = ()
    choices: tuple[str, ...] | None = None
    precision: int | None = None
    unit: str | None = None
    categories: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.answer_type not in ANSWER_TYPES:
            raise ValueError(f"answer_type {self.answer_type!r} is not one of {ANSWER_TYPES}")
        if not self.answers:
            raise ValueError(f"item {self.id!r} has no answer")

    @property
    def answer(self) -> str:
        return self.answers[0]


@dataclass(frozen=True)
class Benchmark:
    """A registry entry. ``adapt(row, index)`` turns one raw row of the dataset into an item (raising
    BadSample for a row it cannot use)."""

    name: str
    adapt: Callable[[dict, int], BenchmarkItem]
    hub_id: str | None = None  # None: generated (synthetic)
    split: str = "test"
    configs: tuple[str | None, ...] = (None,)  # Hub configs, concatenated in this order
    template: str = "boxed"  # a vision.data.PROMPT_TEMPLATES name or a format string with {question}
    breakdowns: tuple[str, ...] = ()  # category keys, in the order the summary shows them
    source: str = ""  # where the schema was checked (shown by `available_benchmarks(verbose=True)`)
    exclude_files: tuple[str, ...] = ()  # glob patterns of local files that are not this split's data
    make_rows: Callable[[int], list[dict]] | None = None  # generated benchmarks: rows for a count


_REGISTRY: dict[str, Benchmark] = {}


def register_benchmark(benchmark: Benchmark) -> Benchmark:
    if benchmark.name in _REGISTRY:
        raise ValueError(f"benchmark {benchmark.name!r} is already registered")
    resolve_template(benchmark.template)
    _REGISTRY[benchmark.name] = benchmark
    return benchmark


def available_benchmarks() -> list[str]:
    return sorted(_REGISTRY)


def get_benchmark(name: str) -> Benchmark:
    if name in _REGISTRY:
        return _REGISTRY[name]
    close = difflib.get_close_matches(name, _REGISTRY, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise BenchmarkError(f"unknown benchmark {name!r}.{hint} Available benchmarks: {available_benchmarks()}")


# ------------------------------------------------------------------------------------------- loading


def _is_saved_dataset(path: Path) -> bool:
    # What Dataset.save_to_disk / DatasetDict.save_to_disk write at the top of their folder.
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def _load_local(benchmark: Benchmark, path: Path) -> datasets.Dataset:
    import datasets

    if _is_saved_dataset(path):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if benchmark.split not in loaded:
                raise BenchmarkError(f"{str(path)!r} has splits {sorted(loaded)} but not {benchmark.split!r}, "
                                     f"the split {benchmark.name} is scored on")
            loaded = loaded[benchmark.split]
        return loaded
    try:
        builder, files = _data_files(path, benchmark.split)
    except (FileNotFoundError, ValueError) as exc:
        raise BenchmarkError(f"local copy of {benchmark.name}: {exc}") from None
    kept = [f for f in files if not any(fnmatch.fnmatch(Path(f).name, pat) for pat in benchmark.exclude_files)]
    if not kept:
        raise BenchmarkError(f"local copy of {benchmark.name} at {str(path)!r}: every data file matches "
                             f"{list(benchmark.exclude_files)}, which are not {benchmark.split!r} data")
    return datasets.load_dataset(builder, data_files=kept, split="train")


def _load_hub(benchmark: Benchmark) -> datasets.Dataset:
    import datasets

    parts = []
    for config in benchmark.configs:
        try:
            parts.append(datasets.load_dataset(benchmark.hub_id, config, split=benchmark.split))
        except Exception as exc:  # offline, auth, renamed dataset: all need the same way out
            where = f"{benchmark.hub_id}" + (f" (config {config!r})" if config else "")
            raise BenchmarkError(
                f"could not load benchmark {benchmark.name!r} from the Hugging Face Hub ({where}, split "
                f"{benchmark.split!r}): {type(exc).__name__}: {exc}. If this machine is offline, point at a local "
                f"copy in the same format: --data {benchmark.name}=/path/to/{benchmark.hub_id.split('/')[-1]} "
                f"(a folder of parquet/json/jsonl files, one such file, or a save_to_disk folder; in YAML: "
                f"data: {{{benchmark.name}: /path/...}})") from exc
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


class BenchmarkData(Sequence):
    """The items of one benchmark, adapted from the raw rows one per ``[i]`` (images stay undecoded)."""

    def __init__(self, benchmark: Benchmark, rows: list[dict] | datasets.Dataset, base_dir: Path | None = None):
        self.benchmark = benchmark
        self.base_dir = base_dir  # where relative image paths start (a local copy's folder)
        self._rows = LazyRows(rows)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> BenchmarkItem:  # type: ignore[override]
        row = self._rows[index]
        try:
            return self.benchmark.adapt(row, index)
        except (KeyError, TypeError, ValueError) as exc:  # a row outside the schema: that item is an error
            raise BadSample(f"row {index} of {self.benchmark.name} does not fit its schema: "
                            f"{type(exc).__name__}: {exc}") from None

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() or self.base_dir is None else self.base_dir / p


def load_benchmark(name: str, path: str | Path | None = None, limit: int | None = None) -> BenchmarkData:
    """Items of benchmark ``name``: from the local copy at ``path`` when given, else from the Hub
    (``datasets.load_dataset``); generated for synthetic benchmarks. At most ``limit`` items (the first)."""
    benchmark = get_benchmark(name)
    if benchmark.make_rows is not None:
        if path is not None:
            raise BenchmarkError(f"{name} is generated (vision.synthetic); it takes no local data path")
        return BenchmarkData(benchmark, benchmark.make_rows(limit or SYNTHETIC_SAMPLES))
    base = None
    if path is not None:
        local = Path(path).expanduser()
        if not local.exists():
            raise BenchmarkError(f"local copy of {name} not found: {str(path)!r} does not exist")
        rows, base = _load_local(benchmark, local), local if local.is_dir() else local.parent
    else:
        rows = _load_hub(benchmark)
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    return BenchmarkData(benchmark, rows, base)


# ------------------------------------------------------------------------------------- records, grading


def item_record(data: BenchmarkData, item: BenchmarkItem, template: str | None = None,
                system_prompt: str | None = None) -> dict:
    """The record (see :mod:`vision`) the policy consumes for ``item``, with the columns grading needs.
    Decodes the images now; raises BadSample when one cannot be loaded."""
    images = [load_image(src, k, data.resolve) for k, src in enumerate(item.images)]
    text = apply_template(item.question, template or data.benchmark.template)
    messages = [{"role": "user", "content": interleave_images(text, len(images))}]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return {"prompt": messages, "images": images, "answer": item.answer, "accepted_answers": list(item.answers),
            "answer_type": item.answer_type, "choices": None if item.choices is None else list(item.choices),
            "precision": item.precision, "unit": item.unit, "benchmark": data.benchmark.name, "id": item.id}


def grade_answer(output: str, answers: Sequence[str], answer_type: str, choices: Sequence[str] | None = None,
                 precision: int | None = None, unit: str | None = None, timeout_seconds: int = 5) -> Grade:
    """Grade ``output`` against every accepted answer: the first correct grade, else the first one."""
    from vision.grading import grade  # lazy: only grading needs math-verify and friends

    first = None
    for answer in answers:
        result = grade(output, answer, answer_type, choices=None if choices is None else list(choices),
                       precision=precision, unit=unit, timeout_seconds=timeout_seconds)
        if result.correct:
            return result
        first = first or result
    return first


class BenchmarkRecords(Sequence):
    """A benchmark as a held-out set for :class:`mmrl.Trainer`: records with the grading columns (pair it
    with the ``benchmark_accuracy`` reward). An item whose images cannot be loaded raises BadSample."""

    def __init__(self, data: BenchmarkData, template: str | None = None, system_prompt: str | None = None):
        self.data, self.template, self.system_prompt = data, template, system_prompt
        self.name = f"benchmark {data.benchmark.name!r}"

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:  # type: ignore[override]
        item = self.data[index]
        try:
            return item_record(self.data, item, self.template, self.system_prompt)
        except BadSample as exc:
            raise BadSample(f"{self.data.benchmark.name} item {item.id!r}: {exc}") from None
