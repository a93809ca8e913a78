"""Evaluating an image generator offline: a GenEval-like rule suite, FID / KID / IS, and CLIP score.

Suites (``--suite``, a comma list):

* ``geneval_lite`` — procedural prompts in GenEval's six categories (:data:`image_gen.prompts.CATEGORIES`),
  checked by rules on the decoded image: pixels classified to the palette, 4-connected components per
  colour, each component's shape from its fill ratio, centroids (:mod:`image_gen.rewards`). As in GenEval,
  each category checks *its* aspect of the prompt and reports pass/fail per image:

  ============================  ==========================================================================
  single_object                 an object of the named shape, any colour
  two_objects                   both named shapes present (any colours; a repeated shape needs two objects)
  counting                      exactly ``count`` objects of the named shape, any colour
  colours                       an object of the named shape in the named colour
  position                      both objects (colour + shape: the colour tells them apart) and the relation
                                between their centroids
  colour_attribution            each shape in its bound colour
  ============================  ==========================================================================

  Accuracy per category and overall (the mean over categories, GenEval's convention). A class-conditional
  model can only draw its classes, so it gets the prompts whose spec is one of its classes; categories with
  none are listed as ``uncovered`` and left out of the overall score.
* ``fid`` — FID, KID and Inception Score of generated images against ``--reference`` (a folder of images,
  or the ``reference_features.pt`` a previous run wrote), with the FID Inception of
  :mod:`image_gen.inception` loaded from ``--inception-weights``. Generated images are quantised to uint8
  first, like the reference PNGs.
* ``clip`` — CLIPScore, ``100 · max(cos, 0)`` between image and prompt embeddings (``--clip``: a local
  directory or a cached hub id), through :class:`image_gen.rewards.CLIPReward`.

Python: ``evaluate(EvalSettings(model="tiny", suites=["geneval_lite"]))`` returns the summary dict;
the pieces (:func:`geneval_lite_prompts`, :func:`check_image`, :func:`generate`, ...) are public too.
CLI: ``mmrl eval-gen`` forwards to :func:`cli_main`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from image_gen.inception import (
    WEIGHTS_FILE,
    frechet_distance,
    inception_features,
    inception_score,
    kernel_inception_distance,
    load_image_folder,
    load_inception,
    resolve_weights_path,
)
from image_gen.prompts import (
    CATEGORIES,
    PALETTE,
    category_specs,
    class_for_spec,
    normalize_spec,
    spec_to_prompt,
)
from image_gen.rewards import classify_pixels, colour_mask, components, geneval_rules, shape_of

SUITES = ("geneval_lite", "fid", "clip")


@dataclass
class EvalSettings:
    """Everything an evaluation run needs; the CLI flags map one to one."""

    model: str = "tiny"  # "tiny" | an mmrl checkpoint's model/ directory | a LlamaGen checkpoint file
    suites: list[str] = field(default_factory=lambda: ["geneval_lite"])
    reference: str | None = None  # folder of real images, or a reference_features.pt, for fid
    inception_weights: str | None = None  # FID Inception weights (else $MMRL_INCEPTION_WEIGHTS)
    inception_resize: str = "tf1"  # tf1 (torch-fidelity / TF FID) | pytorch_fid
    clip: str | None = None  # CLIP directory or cached hub id, for clip
    num_images: int = 64  # per suite; prompts = ceil(num_images / samples_per_prompt)
    samples_per_prompt: int = 4
    cfg_scale: float = 2.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    output: str | None = None  # directory for samples.png, summary.json, ...; None writes nothing
    batch_size: int = 64  # images per generation / feature batch
    split: str | None = None  # geneval_lite prompt split: train | test | all; None: test (t2i), all (c2i)
    classes: str | None = None  # class-map JSON for a class-conditional model (default: the tiny model's)
    model_options: dict[str, Any] = field(default_factory=dict)  # extra ImageGenModelConfig fields
    device: str | None = None  # generator device (default: cuda if available); the VQ decodes where it is
    progress: bool = True


# --- rule checks -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Detection:
    colour: str
    shape: str
    area: int
    centre: tuple[float, float]  # (x, y) in pixels


def detect_objects(image: Any, min_pixels: int | None = None) -> list[Detection]:
    """Objects as the rules see them: per palette colour, each connected component large enough."""
    labels = classify_pixels(image)
    found = []
    for colour in PALETTE:
        for comp in components(colour_mask(labels, colour), min_pixels):
            ys, xs = np.nonzero(comp)
            found.append(Detection(colour, shape_of(comp), len(xs), (float(xs.mean()), float(ys.mean()))))
    return found


def _matching(found: list[Detection], shape: str, colour: str | None = None) -> list[Detection]:
    return [d for d in found if d.shape == shape and (colour is None or d.colour == colour)]


def _relation_holds(relation: str, a: tuple[float, float], b: tuple[float, float]) -> bool:
    return {"left of": a[0] < b[0], "right of": a[0] > b[0], "above": a[1] < b[1], "below": a[1] > b[1]}[relation]


def check_image(image: Any, spec: dict[str, Any], category: str, min_pixels: int | None = None) -> bool:
    """Does ``image`` pass ``category``'s check for ``spec``? (table in the module docstring)"""
    found = detect_objects(image, min_pixels)
    objs = normalize_spec(spec)["objects"]
    first = objs[0]
    if category == "single_object":
        return bool(_matching(found, first["shape"]))
    if category == "colours":
        return bool(_matching(found, first["shape"], first["colour"]))
    if category == "counting":
        return len(_matching(found, first["shape"])) == first["count"]
    if category == "two_objects":
        need = Counter(o["shape"] for o in objs)
        have = Counter(d.shape for d in found)
        return all(have[s] >= k for s, k in need.items())
    if category == "colour_attribution":
        return all(_matching(found, o["shape"], o["colour"]) for o in objs)
    if category == "position":
        matches = [_matching(found, o["shape"], o["colour"]) for o in objs]
        if not all(matches):
            return False
        a, b = (max(m, key=lambda d: d.area).centre for m in matches)
        return _relation_holds(spec["relation"], a, b)
    raise ValueError(f"unknown category {category!r}; choose from {CATEGORIES}")


# --- prompts -----------------------------------------------------------------------------------------------


def _spec_key(spec: dict[str, Any]) -> str:
    return json.dumps(normalize_spec(spec), sort_keys=True)


def geneval_lite_prompts(num_prompts: int, seed: int = 0, class_map: list[dict] | None = None,
                         split: str | None = "test") -> tuple[list[dict], list[str]]:
    """Rows ``{"prompt", "spec", "category", "class_id"}`` balanced over the covered categories, and the
    uncovered ones. Each category's specs are shuffled by seed and taken without repeats until exhausted.

    ``class_map`` (rows with ``class_id`` and ``spec``) restricts prompts to a class-conditional model's
    classes, and ``class_id`` is then the model's; otherwise it is the global id of
    :func:`image_gen.prompts.class_for_spec`. ``split`` None or ``"all"`` uses both splits.
    """
    split = None if split == "all" else split
    model_ids = None
    if class_map is not None:
        model_ids = {_spec_key(r["spec"]): int(r["class_id"]) for r in class_map if r.get("spec")}
    pools: dict[str, list[dict]] = {}
    for category in CATEGORIES:
        specs = category_specs(category, split)
        if model_ids is not None:
            specs = [s for s in specs if _spec_key(s) in model_ids]
        if specs:
            random.Random(f"{seed}:{category}").shuffle(specs)
            pools[category] = specs
    covered = [c for c in CATEGORIES if c in pools]
    rows = []
    for i in range(num_prompts if covered else 0):
        category = covered[i % len(covered)]
        pool = pools[category]
        spec = pool[(i // len(covered)) % len(pool)]
        class_id = model_ids[_spec_key(spec)] if model_ids is not None else class_for_spec(spec)
        rows.append({"prompt": spec_to_prompt(spec, category), "spec": spec, "category": category,
                     "class_id": class_id})
    return rows, [c for c in CATEGORIES if c not in pools]


def score_geneval_lite(images: list[Any], rows: list[dict]) -> tuple[dict[str, Any], list[bool]]:
    """Per-category and overall accuracy of ``images`` (one row each), plus the per-image verdicts."""
    if len(images) != len(rows):
        raise ValueError(f"{len(images)} images for {len(rows)} rows")
    passed = [check_image(im, r["spec"], r["category"]) for im, r in zip(images, rows)]
    soft = geneval_rules([r["prompt"] for r in rows], images, spec=[r["spec"] for r in rows])
    per: dict[str, dict[str, Any]] = {}
    for ok, r in zip(passed, rows):
        entry = per.setdefault(r["category"], {"correct": 0, "images": 0, "prompts": set()})
        entry["correct"] += int(ok)
        entry["images"] += 1
        entry["prompts"].add(r["prompt"])
    categories = {c: {"accuracy": per[c]["correct"] / per[c]["images"], "correct": per[c]["correct"],
                      "images": per[c]["images"], "prompts": len(per[c]["prompts"])}
                  for c in CATEGORIES if c in per}
    values = [v for v in soft if v is not None]
    summary = {
        "overall": float(np.mean([e["accuracy"] for e in categories.values()])) if categories else None,
        "categories": categories,
        "rule_score": float(np.mean(values)) if values else None,  # mean geneval_rules reward (soft)
        "images": len(images),
    }
    return summary, passed


# --- the generator -------------------------------------------------------------------------------------------


def load_generator(model: str = "tiny", cfg_scale: float = 2.0, options: dict[str, Any] | None = None,
                   device: str | None = None):
    """An :class:`image_gen.policy.ARImagePolicy` built by the task's own builder (same loading rules as
    ``model.gpt`` in a training config; a directory's ``vq/`` is used as its tokenizer)."""
    from image_gen import task as image_task
    from mmrl.config import RewardConfig, TrainConfig

    opts = dict(options or {})
    path = Path(model)
    if "vq" not in opts and model != "tiny" and (path / "vq").is_dir():
        opts["vq"] = str(path / "vq")
    model_cfg = image_task.ImageGenModelConfig(gpt=model, cfg_scale=cfg_scale, **opts)
    # The data section only feeds the builder's start-up dry run: one record is enough.
    data_cfg = image_task.ImageGenDataConfig(prompts="tiny_shapes" if model == "tiny" else "classes",
                                             num_train=1, num_eval=1)
    cfg = TrainConfig(task="image_gen", model=model_cfg, data=data_cfg, rewards=[RewardConfig("geneval_rules")])
    policy = image_task.build(cfg).policy
    policy.model.eval().to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return policy


def class_map_for(model: str, policy, classes: str | None = None) -> list[dict] | None:
    """A class-conditional model's classes as rows ``{"class_id", "prompt", "spec"?}``; None for t2i.

    From ``classes`` (JSON: a list of rows, or ``{"classes": [...]}``), else ``classes.json`` next to the
    model, else the shipped tiny model's when the class counts agree, else ``"class i"`` without specs.
    """
    from image_gen import task as image_task

    config = policy.model.config
    if config.model_type != "c2i":
        return None
    source = Path(classes) if classes else Path(model) / "classes.json"
    if classes or (model != "tiny" and source.is_file()):
        data = json.loads(source.read_text())
        rows = data["classes"] if isinstance(data, dict) else data
        return [{"class_id": i, "prompt": r.get("prompt", f"class {i}"), "spec": r.get("spec")}
                for i, r in enumerate(rows)]
    tiny = image_task.tiny_classes()
    if model == "tiny" or config.num_classes == len(tiny):
        return tiny
    return [{"class_id": i, "prompt": f"class {i}", "spec": None} for i in range(config.num_classes)]


@torch.no_grad()
def generate(policy, records: list[dict], samples_per_prompt: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, batch_size: int = 64, progress: bool = True,
             desc: str = "generating") -> list[torch.Tensor]:
    """``samples_per_prompt`` images [3, H, W] in [0, 1] per record, record-major; reproducible for a given
    seed and batch size (it seeds torch's global RNG, which the sampler draws from)."""
    from mmrl.policy import Sampling

    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    per_call = max(1, batch_size // samples_per_prompt)
    vq_params = list(policy.tokenizer.parameters()) if hasattr(policy.tokenizer, "parameters") else []
    vq_device = vq_params[0].device if vq_params else torch.device("cpu")
    torch.manual_seed(seed)
    images: list[torch.Tensor] = []
    with tqdm(total=len(records) * samples_per_prompt, desc=desc, disable=not progress) as bar:
        for start in range(0, len(records), per_call):
            rollout = policy.generate(policy.model, records[start:start + per_call], samples_per_prompt, sampling)
            decoded = policy.tokenizer.decode(rollout.completion_ids.to(vq_device))
            images.extend(decoded.float().cpu().clamp(0, 1))
            bar.update(decoded.shape[0])
    return images


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """[3, H, W] float in [0, 1] → uint8, rounded as a PNG writer would."""
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


# --- FID / KID / IS --------------------------------------------------------------------------------------------


def fid_suite(fake: list[torch.Tensor], settings: EvalSettings, output: Path | None) -> dict[str, Any]:
    """FID, KID and IS of ``fake`` (uint8 images) against ``settings.reference``."""
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    net = load_inception(settings.inception_weights, device=device, resize=settings.inception_resize)
    reference = Path(settings.reference)
    if reference.is_file():
        cached = torch.load(reference, map_location="cpu", weights_only=True)
        if cached.get("resize") != settings.inception_resize:
            raise ValueError(f"{reference} was computed with resize={cached.get('resize')!r}, "
                             f"not --inception-resize {settings.inception_resize!r}")
        real_pool = cached["pool"]
    else:
        real_pool, real_logits = inception_features(net, load_image_folder(reference), settings.batch_size,
                                                    settings.progress, "inception (reference)")
        if output is not None:
            torch.save({"pool": real_pool, "logits": real_logits, "resize": settings.inception_resize},
                       output / "reference_features.pt")
    fake_pool, fake_logits = inception_features(net, fake, settings.batch_size, settings.progress,
                                                "inception (generated)")
    kid_mean, kid_std = kernel_inception_distance(real_pool, fake_pool, seed=settings.seed)
    is_mean, is_std = inception_score(fake_logits, seed=settings.seed)
    return {"fid": frechet_distance(real_pool, fake_pool), "kid_mean": kid_mean, "kid_std": kid_std,
            "is_mean": is_mean, "is_std": is_std, "num_real": int(real_pool.shape[0]),
            "num_fake": int(fake_pool.shape[0]), "resize": settings.inception_resize}


# --- CLIP ------------------------------------------------------------------------------------------------------


def clip_scores(clip, prompts: list[str], images: list[Any], batch_size: int = 64,
                progress: bool = True) -> list[float]:
    """CLIPScore per pair: ``100 · max(cos, 0)`` (Hessel et al. use w = 2.5 on top; we report the plain
    100-scaled cosine, as torchmetrics' ``CLIPScore`` does). ``clip`` is a :class:`CLIPReward`."""
    out: list[float] = []
    for start in tqdm(range(0, len(images), batch_size), desc="clip", disable=not progress):
        cos = clip(prompts[start:start + batch_size], images[start:start + batch_size])
        out.extend(100.0 * max(float(c), 0.0) for c in cos)
    return out


# --- outputs ---------------------------------------------------------------------------------------------------


def save_grid(images: list[torch.Tensor], labels: list[str], per_row: int, path: str | Path,
              passed: list[bool] | None = None, max_rows: int = 8, cell: int = 64) -> Path:
    """A PNG: one row per prompt (``per_row`` samples each; its label, up to 2 lines, on the left); with
    ``passed``, a green or red frame marks each image's rule verdict."""
    rows = min(max_rows, math.ceil(len(images) / per_row))
    cols = min(per_row, 8)
    label_w = 160
    grid = Image.new("RGB", (label_w + cols * cell, rows * cell), "white")
    draw = ImageDraw.Draw(grid)
    for r in range(rows):
        for k, line in enumerate(labels[r * per_row].split("\n")[:2]):
            draw.text((4, r * cell + cell // 2 - 12 + 14 * k), line[:26], fill="black" if k == 0 else "gray")
        for c in range(cols):
            i = r * per_row + c
            if i >= len(images):
                break
            pil = Image.fromarray(to_uint8(images[i]).permute(1, 2, 0).numpy()).resize((cell, cell), Image.NEAREST)
            x, y = label_w + c * cell, r * cell
            grid.paste(pil, (x, y))
            if passed is not None:
                draw.rectangle((x, y, x + cell - 1, y + cell - 1), outline="green" if passed[i] else "red", width=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def _expand(records: list[dict], times: int) -> list[dict]:
    return [r for r in records for _ in range(times)]


def _free_records(class_map: list[dict] | None, n: int, seed: int, split: str | None) -> list[dict]:
    """Conditions for FID / CLIP: a c2i model's classes in turn, else the suite's prompts (all categories)."""
    if class_map is not None:
        return [dict(class_map[i % len(class_map)]) for i in range(n)]
    return geneval_lite_prompts(n, seed, None, split)[0]


def evaluate(settings: EvalSettings) -> dict[str, Any]:
    """Run the requested suites; returns (and, with ``output``, writes) the summary."""
    from image_gen.rewards import CLIPReward

    unknown = [s for s in settings.suites if s not in SUITES]
    if unknown or not settings.suites:
        raise ValueError(f"--suite {','.join(settings.suites)!r}: valid suites are {', '.join(SUITES)}")
    if settings.samples_per_prompt < 1 or settings.num_images < 1:
        raise ValueError("--num-images and --samples-per-prompt must be >= 1")
    if "clip" in settings.suites and not settings.clip:
        raise ValueError("the clip suite needs --clip PATH_OR_ID (a local CLIP directory or a cached hub id)")
    if "fid" in settings.suites:  # fail before generating anything
        if not settings.reference:
            raise ValueError("the fid suite needs --reference DIR (a folder of real images, or reference_features.pt)")
        resolve_weights_path(settings.inception_weights)
    started = time.time()
    output = Path(settings.output) if settings.output else None
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
    policy = load_generator(settings.model, settings.cfg_scale, settings.model_options, settings.device)
    class_map = class_map_for(settings.model, policy, settings.classes)
    split = settings.split or ("all" if class_map is not None else "test")
    n_prompts = math.ceil(settings.num_images / settings.samples_per_prompt)
    spp = settings.samples_per_prompt
    gen = dict(temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p, seed=settings.seed,
               batch_size=settings.batch_size, progress=settings.progress)
    summary: dict[str, Any] = {"model": settings.model, "model_type": policy.model.config.model_type,
                               "settings": asdict(settings)}
    grid: tuple | None = None
    if "geneval_lite" in settings.suites:
        rows, uncovered = geneval_lite_prompts(n_prompts, settings.seed, class_map, split)
        result: dict[str, Any] = {"overall": None, "categories": {}, "images": 0}
        if rows:
            images = generate(policy, rows, spp, desc="geneval_lite", **gen)
            result, passed = score_geneval_lite(images, _expand(rows, spp))
            grid = (images, [f"{r['prompt']}\n{r['category']}" for r in _expand(rows, spp)], passed)
            if output is not None:
                with open(output / "geneval_lite.jsonl", "w") as f:
                    for r, ok in zip(_expand(rows, spp), passed):
                        f.write(json.dumps({"prompt": r["prompt"], "category": r["category"], "passed": ok}) + "\n")
        summary["geneval_lite"] = {**result, "uncovered": uncovered, "split": split, "prompts": len(rows)}
    if "fid" in settings.suites or "clip" in settings.suites:
        records = _free_records(class_map, n_prompts, settings.seed, split)
        images = generate(policy, records, spp, desc="generating (fid/clip)", **gen)
        prompts = [r["prompt"] for r in _expand(records, spp)]
        grid = grid or (images, prompts, None)
        if "fid" in settings.suites:
            summary["fid"] = fid_suite([to_uint8(im) for im in images], settings, output)
        if "clip" in settings.suites:
            scores = clip_scores(CLIPReward(settings.clip, device=settings.device), prompts, images,
                                 settings.batch_size, settings.progress)
            summary["clip"] = {"clip_score": float(np.mean(scores)), "clip_score_std": float(np.std(scores)),
                               "images": len(scores), "model": settings.clip}
    summary["seconds"] = round(time.time() - started, 2)
    if output is not None:
        if grid is not None:
            save_grid(grid[0], grid[1], spp, output / "samples.png", grid[2])
        (output / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


# --- CLI -------------------------------------------------------------------------------------------------------


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--model-opt expects KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    d = EvalSettings()
    p = argparse.ArgumentParser(prog="mmrl eval-gen", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=d.model, help="tiny | mmrl checkpoint model/ dir | LlamaGen checkpoint")
    p.add_argument("--model-opt", action="append", type=_option, default=[], metavar="KEY=VALUE",
                   help="extra model-section field, e.g. vq=PATH gpt_config=GPT-B image_size=256")
    p.add_argument("--suite", default="geneval_lite", help=f"comma list of {', '.join(SUITES)}")
    p.add_argument("--reference", help="fid: folder of real images, or reference_features.pt")
    p.add_argument("--inception-weights", help=f"fid: FID Inception weights (.pth), e.g. {WEIGHTS_FILE}")
    p.add_argument("--inception-resize", default=d.inception_resize, choices=["tf1", "pytorch_fid"])
    p.add_argument("--clip", help="clip: CLIP directory or cached hub id")
    p.add_argument("--classes", help="class-map JSON for a class-conditional model")
    p.add_argument("--split", choices=["train", "test", "all"], help="geneval_lite prompt split")
    for name, typ in (("num-images", int), ("samples-per-prompt", int), ("cfg-scale", float),
                      ("temperature", float), ("top-k", int), ("top-p", float), ("seed", int), ("batch-size", int)):
        p.add_argument(f"--{name}", type=typ, default=getattr(d, name.replace("-", "_")))
    p.add_argument("--device")
    p.add_argument("--output", default="runs/eval_gen", help="directory for samples.png and summary.json")
    p.add_argument("--no-progress", action="store_true")
    return p


def cli_main(argv: list[str]) -> int:
    """``mmrl eval-gen [flags]``: run, print the summary, return an exit code (2 for bad input)."""
    args = build_parser().parse_args(argv)
    settings = EvalSettings(
        model=args.model, suites=[s.strip() for s in args.suite.split(",") if s.strip()], reference=args.reference,
        inception_weights=args.inception_weights, inception_resize=args.inception_resize, clip=args.clip,
        num_images=args.num_images, samples_per_prompt=args.samples_per_prompt, cfg_scale=args.cfg_scale,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, output=args.output,
        batch_size=args.batch_size, split=args.split, classes=args.classes, model_options=dict(args.model_opt),
        device=args.device, progress=not args.no_progress)
    try:
        summary = evaluate(settings)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}")
        return 2
    report = {k: v for k, v in summary.items() if k != "settings"}
    print(json.dumps(report, indent=1, default=str))
    if settings.output:
        print(f"wrote {Path(settings.output) / 'summary.json'}")
    return 0
