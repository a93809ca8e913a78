"""The image-generation task as the CLI wires it: config sections, building the policy and prompt sets,
a start-up dry run of the rewards, and sample grids.

Models: ``model.gpt: tiny`` (the offline tiny generator shipped in ``image_gen/assets/tiny``, built by
``scripts/build_tiny_image_gen.py``), a LlamaGen checkpoint file (``.pt`` / ``.safetensors``, with
``model.gpt_config`` naming its size), or a directory written by an mmrl checkpoint. Tokenizers:
``model.vq: tiny``, a diffusers ``VQModel`` directory / hub id, or a LlamaGen VQ checkpoint file.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file

from image_gen import hps as _hps  # noqa: F401  (registers the hpsv2 reward factory)
from image_gen import judge as _judge  # noqa: F401  (registers the vlm_judge reward factory)
from image_gen import rewards as _rewards  # noqa: F401  (registers the rule rewards and clip_score)
from image_gen.gpt import GPT, GPTConfig, get_config
from image_gen.llamagen_checkpoint import load_llamagen_checkpoint
from image_gen.policy import ARImagePolicy
from image_gen.prompts import make_prompts, render_spec
from image_gen.rewards import dry_run
from image_gen.text_encoder import LLAMAGEN_T5, TEXT_ENCODER_FILE, T5TextEncoder
from image_gen.vq import DiffusersVQ, load_llamagen_vq
from mmrl.config import TrainConfig
from mmrl.rewards import build_reward

logger = logging.getLogger(__name__)

TINY_DIR = Path(__file__).parent / "assets" / "tiny"
# The tiny text-conditional prior + its tiny T5 (scripts/build_tiny_t2i.py); it uses TINY_DIR's VQ.
TINY_T2I_DIR = Path(__file__).parent / "assets" / "tiny_t2i"


@dataclass
class ImageGenModelConfig:
    """The ``model:`` section of an image-generation config."""

    # llamagen: our LlamaGen GPT + a VQ (the fields below) | janus: Janus-Pro through transformers
    # (image_gen.janus; name_or_path + dtype, the GPT/VQ/text fields do not apply)
    backend: str = "llamagen"
    name_or_path: str | None = None  # janus: hub id (deepseek-community/Janus-Pro-1B) or local directory
    dtype: str = "bfloat16"  # janus: weights dtype
    gpt: str = "tiny"  # "tiny" | "tiny_t2i" | LlamaGen checkpoint file | directory saved by an mmrl checkpoint
    gpt_config: str = "GPT-XL"  # LlamaGen size preset for a checkpoint file (GPT-B/L/XL/XXL/XXXL)
    num_classes: int = 1000  # for a LlamaGen C2I checkpoint
    image_size: int = 256  # for a LlamaGen checkpoint: block_size = (image_size / 16)²
    condition: str = "c2i"  # for a LlamaGen checkpoint file: c2i (class ids) | t2i (T5 caption features)
    # t2i only: T5 hub id or local dir | "tiny" (the tiny_t2i model's). None: the one recorded with a saved
    # model (text_encoder.json), "tiny" for gpt: tiny_t2i, else LlamaGen's google/flan-t5-xl.
    text_encoder: str | None = None
    text_max_length: int = 120  # t2i checkpoint file: caption tokens (LlamaGen's cls_token_num: 120)
    caption_dim: int = 2048  # t2i checkpoint file: T5 feature size (flan-t5-xl: 2048)
    vq: str = "tiny"  # "tiny" | diffusers VQModel dir or hub id | LlamaGen VQ checkpoint file (.pt/.safetensors)
    vq_config: str = "VQ-16"
    cfg_scale: float = 2.0  # classifier-free guidance in rollouts (AR-GRPO: 2.0)
    cfg_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])  # fractions of the tokens guided
    logprob_mode: str = "cond"  # cond (AR-GRPO / T2I-R1) | cfg (on-policy guided log-probs)
    use_cache: bool = True  # KV-cached sampling


@dataclass
class ImageGenDataConfig:
    """The ``data:`` section: which conditions to train and evaluate on."""

    # tiny_shapes: the tiny model's classes | classes: ids in class_ids (c2i) | procedural: generated
    # GenEval-like prompts with specs, for rule rewards (t2i) | file: prompts from prompt_file (t2i)
    prompts: str = "tiny_shapes"
    class_ids: list[int] | None = None  # for prompts: classes, e.g. ImageNet ids (default: all)
    # For prompts: classes — a text file with one class name per line (line i = class i, e.g. ImageNet's
    # 1000 names), turned into each record's prompt by class_prompt; AR-GRPO's CLIP reward uses
    # "a photo of {name}". Without it the prompt is "class {id}".
    class_names: str | None = None
    class_prompt: str = "a photo of {name}"
    # For prompts: file — .txt (one prompt per line) or .jsonl rows {"prompt": ..., optional "spec"}.
    prompt_file: str | None = None
    # For prompts: procedural — categories from image_gen.prompts.CATEGORIES (default: all).
    categories: list[str] | None = None
    num_train: int = 512
    num_eval: int = 72
    seed: int = 0


SECTION_TYPES = {"model": ImageGenModelConfig, "data": ImageGenDataConfig}


@dataclass
class ImageGenTask:
    policy: ARImagePolicy  # or image_gen.janus.JanusImagePolicy (model.backend: janus)
    train_dataset: list[dict]
    eval_dataset: list[dict] | None
    # What the evaluation set is, as printed beside its score: only procedural prompts are held out; with a
    # fixed pool of conditions (e.g. a class-conditional model's classes) it is the training conditions.
    eval_label: str = "held-out"


def tiny_classes() -> list[dict]:
    """The shipped tiny generator's classes: [{"class_id", "prompt", "spec"}, ...] in class-id order."""
    path = TINY_DIR / "classes.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run scripts/build_tiny_image_gen.py to build the tiny model")
    data = json.loads(path.read_text())
    rows = data["classes"] if isinstance(data, dict) else data
    return [{"class_id": i, "prompt": row["prompt"], "spec": row["spec"]} for i, row in enumerate(rows)]


def _load_gpt(cfg: ImageGenModelConfig) -> GPT:
    if cfg.gpt == "tiny":
        config = GPTConfig(**json.loads((TINY_DIR / "gpt_config.json").read_text()))
        model = GPT(config)
        model.load_state_dict(load_file(str(TINY_DIR / "gpt.safetensors")))
        return model
    path = TINY_T2I_DIR if cfg.gpt == "tiny_t2i" else Path(cfg.gpt)
    if path.is_dir():  # an mmrl checkpoint's model/ directory (or the shipped tiny_t2i)
        config = GPTConfig(**json.loads((path / "gpt_config.json").read_text()))
        model = GPT(config)
        model.load_state_dict(load_file(str(path / "model.safetensors")))
        return model
    if not path.is_file():
        raise FileNotFoundError(f"model.gpt={cfg.gpt!r} is neither 'tiny', 'tiny_t2i', a checkpoint file nor a directory")
    if cfg.condition not in ("c2i", "t2i"):
        raise ValueError(f"model.condition={cfg.condition!r}; valid: ['c2i', 't2i']")
    text = {"cls_token_num": cfg.text_max_length, "caption_dim": cfg.caption_dim} if cfg.condition == "t2i" else {}
    config = get_config(cfg.gpt_config, model_type=cfg.condition, num_classes=cfg.num_classes,
                        block_size=(cfg.image_size // 16) ** 2, **text)
    return load_llamagen_checkpoint(path, config)


def _text_encoder_source(cfg: ImageGenModelConfig) -> str:
    """Which T5 a t2i model reads (see ``ImageGenModelConfig.text_encoder``)."""
    if cfg.text_encoder:
        return cfg.text_encoder
    recorded = Path(cfg.gpt) / TEXT_ENCODER_FILE
    if recorded.is_file():  # saved next to the weights by ARImagePolicy.save_pretrained
        return json.loads(recorded.read_text())["name_or_path"]
    return "tiny" if cfg.gpt == "tiny_t2i" else LLAMAGEN_T5


def _load_vq(cfg: ImageGenModelConfig):
    if cfg.vq == "tiny":
        return DiffusersVQ(str(TINY_DIR / "vq"))
    path = Path(cfg.vq)
    if path.is_file():
        return load_llamagen_vq(path, cfg.vq_config)
    return DiffusersVQ(cfg.vq)  # a diffusers directory or hub id


def _class_pool(cfg: ImageGenDataConfig, num_classes: int) -> list[dict]:
    ids = cfg.class_ids if cfg.class_ids is not None else list(range(num_classes))
    bad = [i for i in ids if not 0 <= int(i) < num_classes]
    if bad:
        raise ValueError(f"data.class_ids {bad[:5]} outside the model's classes 0..{num_classes - 1}")
    names = None
    if cfg.class_names:
        path = Path(cfg.class_names)
        if not path.is_file():
            raise FileNotFoundError(f"data.class_names={cfg.class_names!r} is not a file (one class name per line)")
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if len(names) < num_classes:
            raise ValueError(f"data.class_names has {len(names)} names for a model with {num_classes} classes")
    prompt = (lambda i: cfg.class_prompt.format(name=names[i])) if names else (lambda i: f"class {i}")
    return [{"class_id": int(i), "prompt": prompt(int(i))} for i in ids]


def _file_pool(cfg: ImageGenDataConfig) -> list[dict]:
    if not cfg.prompt_file or not Path(cfg.prompt_file).is_file():
        raise FileNotFoundError(f"data.prompts=file needs data.prompt_file to be a .txt or .jsonl file, "
                                f"got {cfg.prompt_file!r}")
    path = Path(cfg.prompt_file)
    if path.suffix == ".jsonl":
        pool, skipped = [], 0
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            row = json.loads(line) if line.strip() else None
            if not isinstance(row, dict) or not str(row.get("prompt") or "").strip():
                skipped += 1  # one bad row in a large prompt file is skipped, counted and logged
                logger.warning("%s:%d has no non-empty 'prompt'; skipped", path, line_no)
                continue
            pool.append(row)
        if skipped:
            logger.warning("%s: %d rows skipped (no prompt), %d kept", path, skipped, len(pool))
        return pool
    return [{"prompt": line.strip()} for line in path.read_text().splitlines() if line.strip()]


def _eval_label(cfg: ImageGenDataConfig) -> str:
    return "held-out" if cfg.prompts == "procedural" else "eval-set (training conditions, new samples)"


def _records(cfg: ImageGenDataConfig, model_config) -> tuple[list[dict], list[dict]]:
    """Training and held-out condition records. c2i records carry ``class_id``; t2i records ``prompt``."""
    if cfg.prompts == "procedural":  # held-out scenes never appear in training (image_gen.prompts split)
        train = make_prompts(cfg.num_train, cfg.seed, cfg.categories, "train")
        evaluation = make_prompts(cfg.num_eval, cfg.seed + 1, cfg.categories, "test")
        if model_config.model_type == "c2i":
            raise ValueError("data.prompts=procedural needs a text-conditional (t2i) model; a class-conditional "
                             "model can only use prompts: tiny_shapes or classes")
        return train, evaluation
    if cfg.prompts == "tiny_shapes":
        pool = [{**c, "category": "single_object"} for c in tiny_classes()]
    elif cfg.prompts == "classes":
        pool = _class_pool(cfg, model_config.num_classes)
    elif cfg.prompts == "file":
        pool = _file_pool(cfg)
    else:
        raise ValueError(f"data.prompts={cfg.prompts!r}; valid: ['classes', 'file', 'procedural', 'tiny_shapes']")
    if not pool:
        raise ValueError(f"data.prompts={cfg.prompts!r} gave no conditions to train on")
    rng = random.Random(cfg.seed)
    train = [dict(rng.choice(pool)) for _ in range(cfg.num_train)]
    evaluation = [dict(pool[i % len(pool)]) for i in range(cfg.num_eval)]  # balanced over conditions
    return train, evaluation


def _build_janus(cfg: TrainConfig):
    from image_gen.janus import build_janus_policy

    if not cfg.model.name_or_path:
        raise ValueError("model.backend=janus needs model.name_or_path (e.g. deepseek-community/Janus-Pro-1B "
                         "or a local directory in transformers' Janus format)")
    return build_janus_policy(cfg.model.name_or_path, cfg.model.cfg_scale, cfg.model.logprob_mode,
                              tuple(cfg.model.cfg_interval), cfg.model.use_cache, cfg.logprob_chunk_size,
                              dtype=cfg.model.dtype)


def _check_rewards(cfg: TrainConfig, train: list[dict]) -> None:
    # A broken reward (bad model path, wrong signature) must fail now, not after the first rollout.
    sample = train[0]
    spec = sample.get("spec")
    image = render_spec(spec, size=64) if spec else torch.rand(3, 64, 64)
    dry_run([build_reward(r.name, r.args) for r in cfg.rewards], sample["prompt"], image, spec)


def build(cfg: TrainConfig) -> ImageGenTask:
    if cfg.model.backend not in ("llamagen", "janus"):
        raise ValueError(f"model.backend={cfg.model.backend!r}; valid: ['janus', 'llamagen']")
    if cfg.model.backend == "janus":
        policy = _build_janus(cfg)  # text-conditional: prompts, not class ids
        train, evaluation = _records(cfg.data, SimpleNamespace(model_type="t2i", num_classes=0))
        _check_rewards(cfg, train)
        logger.info("Janus generator: %.2fM trainable parameters; %d training prompts",
                    sum(p.numel() for p in policy.model.parameters() if p.requires_grad) / 1e6, len(train))
        return ImageGenTask(policy, train, evaluation, _eval_label(cfg.data))
    model = _load_gpt(cfg.model)
    tokenizer = _load_vq(cfg.model)
    train, evaluation = _records(cfg.data, model.config)
    text_encoder = None
    if model.config.model_type == "t2i":  # the window is the model's: LlamaGen's T2I models use 120 tokens
        source = _text_encoder_source(cfg.model)
        name = str(TINY_T2I_DIR / "t5") if source == "tiny" else source
        text_encoder = T5TextEncoder(name, max_length=model.config.cls_token_num, source=source)
    policy = ARImagePolicy(model, tokenizer, cfg.model.cfg_scale, tuple(cfg.model.cfg_interval),
                           cfg.model.logprob_mode, cfg.model.use_cache, cfg.logprob_chunk_size, text_encoder)
    _check_rewards(cfg, train)
    logger.info("AR generator: %.2fM parameters, %d tokens per image; %d training conditions",
                sum(p.numel() for p in model.parameters()) / 1e6, model.config.block_size, len(train))
    return ImageGenTask(policy, train, evaluation, _eval_label(cfg.data))


@torch.no_grad()
def save_samples(cfg: TrainConfig, task: ImageGenTask, path: str | Path, per_class: int = 4,
                 max_classes: int = 9) -> Path:
    """A PNG grid: one row per condition, ``per_class`` samples each, drawn as in rollouts."""
    from PIL import Image, ImageDraw


    seen, records = set(), []
    for record in task.eval_dataset or task.train_dataset:
        key = record.get("class_id", record.get("prompt"))
        if key not in seen and len(records) < max_classes:
            seen.add(key)
            records.append(record)
    policy = task.policy
    model = policy.model
    was_training = model.training
    model.eval()
    rollout = policy.generate(model, records, per_class, cfg.sampling)
    model.train(was_training)
    images = policy.decode(rollout)
    size, label = 64, 120
    grid = Image.new("RGB", (label + per_class * size, len(records) * size), "white")
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        row, col = divmod(i, per_class)
        pil = Image.fromarray((image.clamp(0, 1).permute(1, 2, 0) * 255).byte().numpy()).resize((size, size), Image.NEAREST)
        grid.paste(pil, (label + col * size, row * size))
        if col == 0:
            draw.text((4, row * size + size // 2 - 6), str(records[row]["prompt"])[:20], fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path



def validate(cfg: TrainConfig) -> list[str]:
    """Problems of the image-generation sections (``model``, ``data``), one line each, for
    :func:`mmrl.config_checks.validate_config` — found before a multi-GB checkpoint loads, not after.
    Loads nothing: names come from the real tables (GPT/VQ presets, log-prob modes, prompt categories),
    local paths must exist, hub ids are left to the loaders."""
    from image_gen.gpt import GPT_CONFIGS
    from image_gen.prompts import CATEGORIES
    from image_gen.sampling import LOGPROB_MODES
    from image_gen.vq import VQ_CONFIGS
    from mmrl.config_checks import Problems, exists

    p = Problems()
    model, data = cfg.model, cfg.data
    gpt_is_file = False
    if model is not None and p.choice("model.backend", model.backend, ("llamagen", "janus")):  # as build()
        if model.backend == "janus":
            from image_gen.janus import DTYPES

            if not model.name_or_path:
                p.add("model.name_or_path", model.name_or_path, "model.backend=janus needs a hub id (e.g. "
                      "deepseek-community/Janus-Pro-1B) or a local directory")
            else:
                p.local_or_hub("model.name_or_path", model.name_or_path, "dir")
            p.choice("model.dtype", model.dtype, DTYPES)
        elif model.gpt in ("tiny", "tiny_t2i"):
            tiny = model.gpt == "tiny"
            shipped = TINY_DIR / "gpt.safetensors" if tiny else TINY_T2I_DIR / "model.safetensors"
            p.path("model.gpt", str(shipped), "file", why="run scripts/build_tiny_image_gen.py (or _t2i.py)")
        elif p.path("model.gpt", model.gpt, why="'tiny', 'tiny_t2i', a LlamaGen checkpoint file or a "
                                                "directory saved by an mmrl checkpoint"):
            gpt_is_file = exists(model.gpt, "file")
            for name in () if gpt_is_file else ("gpt_config.json", "model.safetensors"):
                if not exists(Path(model.gpt).expanduser() / name, "file"):
                    p.add("model.gpt", model.gpt, f"the directory has no {name} (not a saved mmrl model)")
        if model.backend == "llamagen":
            p.choice("model.gpt_config", model.gpt_config, GPT_CONFIGS)
            p.choice("model.condition", model.condition, ("c2i", "t2i"))
            p.number("model.num_classes", model.num_classes, ge=1, integer=True)
            if p.number("model.image_size", model.image_size, ge=16, integer=True) and model.image_size % 16:
                p.add("model.image_size", model.image_size, "must be a multiple of 16 (VQ downsampling)")
            p.number("model.text_max_length", model.text_max_length, ge=1, integer=True)
            p.number("model.caption_dim", model.caption_dim, ge=1, integer=True)
            if model.text_encoder not in (None, "tiny"):
                p.local_or_hub("model.text_encoder", model.text_encoder, "dir")
            if model.vq == "tiny":
                p.path("model.vq", str(TINY_DIR / "vq"), "dir", why="run scripts/build_tiny_image_gen.py")
            elif p.local_or_hub("model.vq", model.vq) and exists(model.vq, "file"):
                p.choice("model.vq_config", model.vq_config, VQ_CONFIGS)
        p.number("model.cfg_scale", model.cfg_scale, ge=0, why="classifier-free guidance; 1 = none")
        interval = model.cfg_interval
        if (not isinstance(interval, (list, tuple)) or len(interval) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in interval)
                or not 0.0 <= interval[0] <= interval[1] <= 1.0):
            p.add("model.cfg_interval", interval, "must be [start, end] with 0 <= start <= end <= 1")
        p.choice("model.logprob_mode", model.logprob_mode, LOGPROB_MODES)
    if data is not None:
        p.choice("data.prompts", data.prompts, ("classes", "file", "procedural", "tiny_shapes"))
        class_conditional = model is not None and model.backend == "llamagen" and (
            model.gpt == "tiny" or (gpt_is_file and model.condition == "c2i"))
        if data.prompts == "procedural" and class_conditional:
            p.add("data.prompts", data.prompts, "needs a text-conditional (t2i) model; a class-conditional "
                                                "one can only use prompts: tiny_shapes or classes")
        high = model.num_classes - 1 if gpt_is_file and isinstance(model.num_classes, int) else None
        for i, class_id in enumerate(data.class_ids or []):
            p.number(f"data.class_ids[{i}]", class_id, ge=0, le=high, integer=True)
        if data.class_names is not None:
            p.path("data.class_names", data.class_names, "file", why="one class name per line")
            try:
                data.class_prompt.format(name="x")
            except (KeyError, IndexError, ValueError, AttributeError):
                p.add("data.class_prompt", data.class_prompt, "must be a format string with one {name} field")
        if data.prompts == "file" or data.prompt_file is not None:
            p.path("data.prompt_file", data.prompt_file, "file", why="a .txt (one prompt a line) or .jsonl")
        for i, category in enumerate(data.categories or []):
            p.choice(f"data.categories[{i}]", category, CATEGORIES)
        p.number("data.num_train", data.num_train, ge=1, integer=True)
        p.number("data.num_eval", data.num_eval, ge=0, integer=True)
        p.number("data.seed", data.seed, ge=0, integer=True)
    return p.lines
