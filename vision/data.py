"""Vision-language datasets: rows from a local file or folder, the Hub or a synthetic task, turned one
at a time into the *record* the policy consumes (see :mod:`vision`). Two row layouts, told apart by
their columns when ``VisionDataConfig.layout="auto"``:

* **EasyR1**: ``images`` (a list, or one image), ``problem`` (text with one ``<image>`` placeholder per
  image), ``answer``. The template is applied to the problem text *with* its placeholders, which is then
  split at each one, so images stay where the author put them (no placeholders: all images first).
* **TRL conversational**: ``prompt`` (chat messages with ``{"type": "image"}`` parts, or a string), images
  in ``image``/``images``, an optional answer (``answer``, or TRL's ``solution``). The template is
  applied to the last text part of the last user message.

An image is a PIL image, a path (against ``image_dir``, else the data file's folder, else the working
directory), a ``{"bytes", "path"}`` dict as Hugging Face datasets stores it, or raw bytes. Images are
decoded when a record is read (:mod:`vision.images`); an unusable row raises :class:`mmrl.data.BadSample`
(the sampler skips it).
"""

from __future__ import annotations

import copy
import logging
import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from mmrl.data import BadSample
from vision.images import _decode, _to_rgb, load_image  # noqa: F401  (re-exported: vision.data API)

if TYPE_CHECKING:
    import datasets

    from vision.prompt_limits import PromptLimits

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
SYNTHETIC_PREFIX = "synthetic:"
BENCHMARK_PREFIX = "benchmark:"  # data.eval only: a registry benchmark (vision.benchmarks) as the held-out set
# Local data formats by extension -> the datasets packaged builder that reads them.
DATA_EXTENSIONS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# Split names recognised in the file names of a data directory (train.jsonl, test-00000.parquet, ...).
KNOWN_SPLITS = ("train", "test", "validation", "valid", "val", "eval", "dev")
LAYOUTS = ("auto", "easyr1", "trl")

# Format strings with one ``{question}`` field; literal braces are doubled, so ``str.format`` works.
PROMPT_TEMPLATES: dict[str, str] = {
    "r1": "{question}\nFirst reason about the question inside <think> </think> tags. "
    "Then write only your final answer inside <answer> </answer> tags.",
    "boxed": "{question}\nThink it through step by step, then put your final answer in \\boxed{{}}.",
    # Short on purpose: tiny models follow a brief instruction better than a paragraph.
    "answer": "{question}\nAnswer with <answer>...</answer>.",
    "none": "{question}",
}


@dataclass
class VisionDataConfig:
    """The ``data:`` section of a vision config."""

    # Training data: a Hub dataset id, a local .json/.jsonl/.parquet file or a directory of them,
    # or "synthetic:NAME" (a generated task from vision.synthetic).
    train: str = "synthetic:colour_at_position"
    # Evaluation data in the same forms, or "benchmark:NAME" (a vision.benchmarks entry, graded by the
    # benchmark_accuracy reward); None means no evaluation set.
    eval: str | None = None
    # Local copy of that benchmark (folder, file or save_to_disk folder); None loads it from the Hub.
    eval_benchmark_path: str | None = None
    # Split read for train / eval (Hub datasets, split-named files in a directory, synthetic tasks,
    # whose "test" split is held out from "train"). A single local file is its own split.
    train_split: str = "train"
    eval_split: str = "test"
    # Keep at most this many rows (the first ones); for synthetic sources it is the number generated
    # (default 2048 for train, 256 for eval) unless synthetic_options sets num_samples.
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    # Keyword arguments for vision.synthetic.make_synthetic (image_size, num_samples, task options).
    synthetic_options: dict = field(default_factory=dict)
    # Seed of the synthetic generator.
    seed: int = 0
    # Row layout: "auto" (from the columns present), "easyr1" or "trl".
    layout: str = "auto"
    # Column names: images, problem text and answer (EasyR1), chat prompt (TRL).
    image_key: str = "images"
    problem_key: str = "problem"
    answer_key: str = "answer"
    prompt_key: str = "prompt"
    # Base folder for relative image paths; None means the data file's folder, then the working dir.
    image_dir: str | None = None
    # Prompt template: a name in PROMPT_TEMPLATES, or a format string containing "{question}".
    template: str = "r1"
    # System message prepended to every prompt (replacing one in the data); None keeps the data's.
    system_prompt: str | None = None
    # Longest prompt (text + image tokens) in tokens; None = the model's context length. A longer row is
    # skipped (BadSample), or with truncate_prompts its user text is cut from the left to fit (images never).
    max_prompt_length: int | None = None
    truncate_prompts: bool = False
    # A staged schedule of training data (SRPO's two-stage cross-domain training, or any curriculum), in
    # place of ``train``: each stage ``{steps: N, train: SOURCE}`` or ``{steps: N, mix: {SOURCE: weight, ...}}``
    # (a mixture: each record's source drawn by weight); the last stage may omit ``steps`` (until the end).
    # Every other key (max_train_samples, template, train_split, ...) is this section's. [] = just ``train``.
    stages: list[dict] = field(default_factory=list)


STAGE_KEYS = ("steps", "train", "mix")


def stage_sources(stage: dict) -> dict[str, float]:
    """The sources of one entry of ``VisionDataConfig.stages`` with their weights."""
    return {stage["train"]: 1.0} if "train" in stage else dict(stage["mix"])


def resolve_template(template: str) -> str:
    """The format string for a template name (or a custom string with ``{question}``)."""
    if template in PROMPT_TEMPLATES:
        return PROMPT_TEMPLATES[template]
    if "{question}" in template:
        return template
    raise ValueError(f"unknown prompt template {template!r}; valid templates: {sorted(PROMPT_TEMPLATES)} "
                     "(or a format string containing '{question}')")


def apply_template(question: str, template: str) -> str:
    return resolve_template(template).format(question=question)


def _looks_like_path(source: str) -> bool:
    # Hub ids are "name" or "org/name": no leading ./~, at most one slash, no data-file extension.
    return source.startswith(("/", ".", "~")) or (os.sep != "/" and os.sep in source) or (
        source.count("/") > 1 or Path(source).suffix.lower() in DATA_EXTENSIONS
    )


def _split_matches(file: Path, root: Path, split: str) -> bool:
    names = [*file.relative_to(root).parent.parts, file.name.split(".")[0]]
    return any(n == split or n.startswith((f"{split}-", f"{split}_")) for n in names)


def _data_files(path: Path, split: str) -> tuple[str, list[str]]:
    """(builder name, files) for a local file or directory; a directory's split-named files are used
    when it has any, so that eval never silently reads the training files."""
    files = [path]
    if path.is_dir():  # hidden folders (.cache, .git) are skipped
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DATA_EXTENSIONS
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise FileNotFoundError(f"no {'/'.join(DATA_EXTENSIONS)} files in directory {str(path)!r}")
        chosen = [p for p in files if _split_matches(p, path, split)]
        if not chosen and any(_split_matches(p, path, s) for p in files for s in KNOWN_SPLITS):
            raise FileNotFoundError(f"directory {str(path)!r} has split-named data files but none for {split!r}")
        files = chosen or files
    builders = {DATA_EXTENSIONS.get(p.suffix.lower()) for p in files}
    if None in builders:  # only a single file can get here
        raise ValueError(f"unsupported data file {str(path)!r}; supported extensions: {list(DATA_EXTENSIONS)}")
    if len(builders) > 1:
        raise ValueError(f"directory {str(path)!r} mixes json and parquet files; keep one format per source")
    return builders.pop(), [str(p) for p in files]


def load_rows(
    source: str, split: str = "train", *, num_samples: int | None = None, seed: int = 0,
    synthetic_options: dict | None = None, default_synthetic_samples: int = 2048,
) -> list[dict] | datasets.Dataset:
    """Raw rows of ``source`` (see ``VisionDataConfig.train``), at most ``num_samples``: a list of dicts for
    synthetic sources, else a ``datasets.Dataset`` (memory-mapped: images stay on disk until read)."""
    if source.startswith(SYNTHETIC_PREFIX):
        from vision.describe_scene import SCENE_COLUMN_TASKS  # registers synthetic:describe_scene
        from vision.synthetic import make_synthetic  # lazy: only synthetic sources need it

        options = dict(synthetic_options or {})
        if source[len(SYNTHETIC_PREFIX):] in SCENE_COLUMN_TASKS:  # its rewards check claims against the scene
            options.setdefault("return_scene", True)
        count = options.pop("num_samples", None) or num_samples or default_synthetic_samples
        rows = make_synthetic(source[len(SYNTHETIC_PREFIX) :], split=split, num_samples=count, seed=seed, **options)
        return rows if num_samples is None else rows[:num_samples]

    import datasets  # lazy: importing datasets is slow and synthetic runs do not need it

    path = Path(source).expanduser()
    if path.exists():
        builder, files = _data_files(path, split)
        ds = datasets.load_dataset(builder, data_files=files, split="train")
    elif _looks_like_path(source):
        raise FileNotFoundError(f"dataset path {source!r} does not exist (resolved to {str(path.resolve())!r})")
    else:
        try:
            ds = datasets.load_dataset(source, split=split)
        except Exception as exc:  # network, auth, unknown id, unknown split: all need the same hint
            raise RuntimeError(
                f"could not load dataset {source!r} (split {split!r}) from the Hugging Face Hub: "
                f"{type(exc).__name__}: {exc}. If this machine is offline, download it beforehand or point "
                "data.train/data.eval at a local .json/.jsonl/.parquet file or a 'synthetic:NAME' task."
            ) from exc
    if num_samples is not None:
        ds = ds.select(range(min(num_samples, len(ds))))
    return ds


def _as_list(value: Any) -> list:
    # A column may hold a list, one item (an image: PIL, path, dict or bytes) or nothing.
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _without_image_decoding(features: datasets.Features) -> datasets.Features:
    import datasets

    def visit(feature: Any) -> None:
        if isinstance(feature, datasets.Image):
            feature.decode = False
        # Features / dict structs, legacy [feature] lists, and List / LargeList / Sequence wrappers.
        subs = feature.values() if isinstance(feature, dict) else feature if isinstance(feature, (list, tuple)) else (
            [feature.feature] if hasattr(feature, "feature") else [])
        for sub in subs:
            visit(sub)

    features = copy.deepcopy(features)
    visit(features)
    # Rebuilt so that Features recomputes which columns still need decoding (e.g. Json columns).
    return datasets.Features(features)


class LazyRows(Sequence):
    """Rows of a list or a ``datasets.Dataset``, one dict per ``[i]``. A Dataset is read as Arrow with image
    decoding off: images come back as ``{"bytes", "path"}`` dicts that the caller decodes, so a corrupt image
    fails for its own row (not inside datasets) and the dataset is not cast (rewritten) up front."""

    def __init__(self, rows: list[dict] | datasets.Dataset):
        if isinstance(rows, list):
            self._rows: Any = rows
            self.columns = list(dict.fromkeys(k for row in rows for k in row))
        else:
            self._rows = rows.with_format("arrow")
            self._features = _without_image_decoding(rows.features)
            self.columns = list(rows.column_names)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict:  # type: ignore[override]
        if isinstance(self._rows, list):
            return self._rows[index]
        return self._features.decode_example(self._rows[index].to_pylist()[0])  # one-row Arrow table


def interleave_images(text: str, num_images: int) -> list[dict]:
    """Chat content parts for ``text`` whose ``<image>`` placeholders mark where the images go (no
    placeholders: all images first). Raises BadSample when placeholders and images disagree."""
    pieces = text.split(IMAGE_PLACEHOLDER)
    texts = [{"type": "text", "text": t.strip()} for t in pieces]
    if len(pieces) == 1:
        parts = [{"type": "image"} for _ in range(num_images)] + texts
    elif len(pieces) - 1 != num_images:
        raise BadSample(f"the problem has {len(pieces) - 1} {IMAGE_PLACEHOLDER!r} placeholders but the row "
                        f"has {num_images} images")
    else:
        parts = [texts[0], *(p for t in texts[1:] for p in ({"type": "image"}, t))]
    return [p for p in parts if p["type"] == "image" or p["text"]]  # drop empty text between images


@dataclass
class _Layout:
    kind: str  # "easyr1" or "trl"
    text_col: str  # problem (easyr1) or prompt (trl) column
    image_col: str | None
    answer_col: str | None


class VisionDataset(Sequence):
    """Records (see :mod:`vision`) over rows from :func:`load_rows`, built lazily one per ``[i]``. With
    ``limits`` (set by :func:`vision.task.build`) a record whose images the model cannot size or whose
    prompt is too long raises BadSample (see :mod:`vision.prompt_limits`)."""

    def __init__(self, rows: list[dict] | datasets.Dataset, config: VisionDataConfig | None = None,
                 source_dir: str | Path | None = None, name: str = "dataset", limits: PromptLimits | None = None):
        self.config, self.name, self.limits = config or VisionDataConfig(), name, limits
        self.source_dir = Path(source_dir) if source_dir is not None else None
        resolve_template(self.config.template)  # fail now, not once per row as a skipped sample
        self._rows = LazyRows(rows)
        self.columns = self._rows.columns
        self.layout = self._detect_layout()
        reserved = {"prompt", "images", "answer"}  # record keys this class owns
        used = {self.layout.text_col, self.layout.image_col, self.layout.answer_col}
        self._extra = [c for c in self.columns if c not in used and c not in reserved]

    def _detect_layout(self) -> _Layout:
        cfg, cols = self.config, self.columns
        if cfg.layout not in LAYOUTS:
            raise ValueError(f"unknown data layout {cfg.layout!r}; valid layouts: {list(LAYOUTS)}")
        kind = cfg.layout
        if kind == "auto":
            kind = "trl" if cfg.prompt_key in cols else "easyr1" if cfg.problem_key in cols else ""
            if not kind:
                raise ValueError(
                    f"cannot tell the layout of {self.name} from its columns {cols}: an EasyR1 dataset needs "
                    f"{[cfg.image_key, cfg.problem_key, cfg.answer_key]}, a TRL conversational one needs "
                    f"{[cfg.prompt_key]} (plus 'image' or 'images', and optionally an answer column); "
                    "set data.problem_key / data.prompt_key or data.layout"
                )
        for option in ("problem_key", "image_key", "answer_key") if kind == "easyr1" else ("prompt_key",):
            if getattr(cfg, option) not in cols:
                raise ValueError(f"dataset column {getattr(cfg, option)!r} not found in {self.name}; columns "
                                 f"present: {cols}; set data.{option}")
        if kind == "easyr1":
            return _Layout("easyr1", cfg.problem_key, cfg.image_key, cfg.answer_key)
        image_col = next((c for c in (cfg.image_key, "image", "images") if c in cols), None)
        # TRL's examples call the answer "solution"; accept it when the answer key was left at its default.
        default = "solution" if cfg.answer_key == "answer" and "solution" in cols else None
        answer_col = cfg.answer_key if cfg.answer_key in cols else default
        return _Layout("trl", cfg.prompt_key, image_col, answer_col)

    def __len__(self) -> int:
        return len(self._rows)

    def _row(self, index: int) -> dict:
        return self._rows[index]

    def __getitem__(self, index: int) -> dict:  # type: ignore[override]
        index = range(len(self))[operator.index(index)]  # negative indices; IndexError when out of range
        row = self._row(index)
        try:
            build = self._easyr1_prompt if self.layout.kind == "easyr1" else self._trl_prompt
            messages, sources = build(row)
            images = [self._load_image(src, k) for k, src in enumerate(sources)]
        except BadSample as exc:
            raise BadSample(f"row {index} of {self.name}: {exc}") from None
        if self.config.system_prompt is not None:
            system = {"role": "system", "content": self.config.system_prompt}
            messages = [system, *(m for m in messages if m["role"] != "system")]
        record: dict[str, Any] = {"prompt": messages, "images": images}
        if self.layout.answer_col is not None:
            answer = row.get(self.layout.answer_col)
            # Reward functions compare text; JSON files often store numeric answers as numbers.
            record["answer"] = str(answer) if isinstance(answer, (int, float)) and not isinstance(answer, bool) else answer
        for col in self._extra:
            record[col] = row.get(col)
        try:
            return record if self.limits is None else self.limits.check(record, f"row {index} of {self.name}")
        except BadSample as exc:
            raise BadSample(f"row {index} of {self.name}: {exc}") from None

    def _easyr1_prompt(self, row: dict) -> tuple[list[dict], list]:
        problem = row.get(self.layout.text_col)
        if not isinstance(problem, str):
            raise BadSample(f"column {self.layout.text_col!r} holds {type(problem).__name__}, not text")
        sources = _as_list(row.get(self.layout.image_col))
        parts = interleave_images(apply_template(problem, self.config.template), len(sources))
        return [{"role": "user", "content": parts}], sources

    def _trl_prompt(self, row: dict) -> tuple[list[dict], list]:
        prompt = row.get(self.layout.text_col)
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if not isinstance(prompt, list) or not all(isinstance(m, dict) for m in prompt):
            raise BadSample(f"column {self.layout.text_col!r} is not a list of chat messages")
        messages: list[dict] = []
        embedded: list = []  # images given inside {"type": "image", "image": ...} parts
        for msg in prompt:
            role, content = msg.get("role") or "user", msg.get("content")
            parts: list[dict] = []
            for part in _as_list(content):
                if isinstance(part, str):
                    parts.append({"type": "text", "text": part})
                elif isinstance(part, dict) and part.get("type") == "image":
                    parts.append({"type": "image"})
                    if part.get("image") is not None:
                        embedded.append(part["image"])
                elif isinstance(part, dict) and part.get("type") == "text":
                    parts.append({"type": "text", "text": part.get("text") or ""})
                else:
                    raise BadSample(f"unsupported message part {part!r}")
            # The record format keeps system content as a plain string.
            text = "".join(p.get("text", "") for p in parts)
            messages.append({"role": role, "content": text if role == "system" else parts})
        sources = _as_list(row.get(self.layout.image_col)) or embedded  # image_col may be None: no column
        users = [m for m in messages if m["role"] == "user"]
        if not users:
            raise BadSample("the prompt has no user message")
        n_parts = sum(p["type"] == "image" for m in users for p in m["content"])
        if n_parts == 0 and sources:
            users[0]["content"][:0] = [{"type": "image"} for _ in sources]
        elif n_parts != len(sources):
            raise BadSample(f"the prompt has {n_parts} image parts but the row has {len(sources)} images")
        text_parts = [p for p in users[-1]["content"] if p["type"] == "text"]
        if text_parts:
            text_parts[-1]["text"] = apply_template(text_parts[-1]["text"], self.config.template)
        return messages, sources

    def _resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        if p.is_absolute():
            return p
        if self.config.image_dir is not None:
            return Path(self.config.image_dir).expanduser() / p
        base = self.source_dir
        return base / p if base is not None and (base / p).exists() else p

    def _load_image(self, src: Any, k: int) -> Image.Image:
        return load_image(src, k, self._resolve)


def _source_dir(source: str) -> Path | None:
    path = Path(source).expanduser()  # where relative image paths of a local source usually start
    return path.parent if path.is_file() else path if path.is_dir() else None


def build_datasets(cfg: VisionDataConfig) -> tuple[VisionDataset, Sequence[dict] | None]:
    """(train, eval) datasets for a config; eval is None when ``cfg.eval`` is unset, a
    :class:`vision.benchmarks.BenchmarkRecords` for ``"benchmark:NAME"``, else a VisionDataset."""
    common = {"seed": cfg.seed, "synthetic_options": cfg.synthetic_options}
    train_rows = load_rows(cfg.train, cfg.train_split, num_samples=cfg.max_train_samples, **common)
    train = VisionDataset(train_rows, cfg, _source_dir(cfg.train), name=f"train data {cfg.train!r}")
    if not cfg.eval:
        return train, None
    if cfg.eval.startswith(BENCHMARK_PREFIX):
        from vision.benchmarks import BenchmarkRecords, load_benchmark  # lazy: imports the registry

        bench = load_benchmark(cfg.eval[len(BENCHMARK_PREFIX):], cfg.eval_benchmark_path, cfg.max_eval_samples)
        return train, BenchmarkRecords(bench, cfg.template, cfg.system_prompt)
    # A smaller default for a generated eval set: it is scored often during training.
    n_eval = {"num_samples": cfg.max_eval_samples, "default_synthetic_samples": 256}
    eval_rows = load_rows(cfg.eval, cfg.eval_split, **n_eval, **common)
    return train, VisionDataset(eval_rows, cfg, _source_dir(cfg.eval), name=f"eval data {cfg.eval!r}")


# Assistant targets for a supervised cold start, by answer format (format strings with ``{answer}``).
SFT_TARGETS: dict[str, str] = {
    "answer": "<answer>{answer}</answer>",
    "r1": "<think>\nI look at the image carefully and work out the answer.\n</think>\n<answer>{answer}</answer>",
    "boxed": "\\boxed{{{answer}}}",
    "none": "{answer}",
}


def sft_target(answer: Any, answer_format: str = "answer") -> str:
    """The assistant text a supervised cold start teaches for ``answer``."""
    if answer_format not in SFT_TARGETS:
        raise ValueError(f"unknown answer_format {answer_format!r}; valid: {sorted(SFT_TARGETS)}")
    return SFT_TARGETS[answer_format].format(answer=answer)


def to_sft_rows(dataset: VisionDataset, answer_format: str = "answer", max_samples: int | None = None) -> list[dict]:
    """TRL SFT rows ``{"messages": [..., user, assistant], "images": [PIL]}`` for a supervised cold start.

    The prompt keeps the dataset's template, so use a template that asks for the same format as
    ``answer_format``. Rows that raise BadSample are skipped with a warning."""
    sft_target("", answer_format)  # validate before the loop
    template = dataset.config.template
    if template in ("answer", "r1", "boxed") and template != answer_format:
        logger.warning("SFT answer_format %r differs from the prompt template %r", answer_format, template)
    rows: list[dict] = []
    for i in range(len(dataset)):
        if len(rows) == max_samples:
            break
        try:
            record = dataset[i]
        except BadSample as exc:
            logger.warning("to_sft_rows: skipping %s", exc)
            continue
        if "answer" not in record:
            raise ValueError(f"{dataset.name} has no answer column; SFT targets need one (set data.answer_key)")
        target = {"role": "assistant", "content": [{"type": "text", "text": sft_target(record["answer"], answer_format)}]}
        rows.append({"messages": [*record["prompt"], target], "images": record["images"]})
    return rows
