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

import torch
from safetensors.torch import load_file

from image_gen import rewards as _rewards  # noqa: F401  (registers the rule rewards)
from image_gen.gpt import GPT, GPTConfig, get_config, load_llamagen_checkpoint
from image_gen.policy import ARImagePolicy
from image_gen.prompts import render_spec
from image_gen.rewards import dry_run
from image_gen.vq import DiffusersVQ, load_llamagen_vq
from mmrl.config import TrainConfig

logger = logging.getLogger(__name__)

TINY_DIR = Path(__file__).parent / "assets" / "tiny"


@dataclass
class ImageGenModelConfig:
    """The ``model:`` section of an image-generation config."""

    gpt: str = "tiny"  # "tiny" | LlamaGen checkpoint file | directory saved by an mmrl checkpoint
    gpt_config: str = "GPT-XL"  # LlamaGen size preset for a checkpoint file (GPT-B/L/XL/XXL/XXXL)
    num_classes: int = 1000  # for a LlamaGen C2I checkpoint
    image_size: int = 256  # for a LlamaGen checkpoint: block_size = (image_size / 16)²
    vq: str = "tiny"  # "tiny" | diffusers VQModel dir or hub id | LlamaGen VQ checkpoint file (.pt/.safetensors)
    vq_config: str = "VQ-16"
    cfg_scale: float = 2.0  # classifier-free guidance in rollouts (AR-GRPO: 2.0)
    cfg_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])  # fractions of the tokens guided
    logprob_mode: str = "cond"  # cond (AR-GRPO / T2I-R1) | cfg (on-policy guided log-probs)
    use_cache: bool = True  # KV-cached sampling


@dataclass
class ImageGenDataConfig:
    """The ``data:`` section: which conditions to train and evaluate on."""

    prompts: str = "tiny_shapes"  # tiny_shapes (the tiny model's classes) | classes (ids in class_ids)
    class_ids: list[int] | None = None  # for prompts: classes, e.g. ImageNet ids
    num_train: int = 512
    num_eval: int = 72
    seed: int = 0


SECTION_TYPES = {"model": ImageGenModelConfig, "data": ImageGenDataConfig}


@dataclass
class ImageGenTask:
    policy: ARImagePolicy
    train_dataset: list[dict]
    eval_dataset: list[dict] | None


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
    path = Path(cfg.gpt)
    if path.is_dir():  # an mmrl checkpoint's model/ directory
        config = GPTConfig(**json.loads((path / "gpt_config.json").read_text()))
        model = GPT(config)
        model.load_state_dict(load_file(str(path / "model.safetensors")))
        return model
    if not path.is_file():
        raise FileNotFoundError(f"model.gpt={cfg.gpt!r} is neither 'tiny', a checkpoint file nor a directory")
    config = get_config(cfg.gpt_config, model_type="c2i", num_classes=cfg.num_classes,
                        block_size=(cfg.image_size // 16) ** 2)
    return load_llamagen_checkpoint(path, config)


def _load_vq(cfg: ImageGenModelConfig):
    if cfg.vq == "tiny":
        return DiffusersVQ(str(TINY_DIR / "vq"))
    path = Path(cfg.vq)
    if path.is_file():
        return load_llamagen_vq(path, cfg.vq_config)
    return DiffusersVQ(cfg.vq)  # a diffusers directory or hub id


def _records(cfg: ImageGenDataConfig, num_classes: int) -> tuple[list[dict], list[dict]]:
    if cfg.prompts == "tiny_shapes":
        classes = tiny_classes()
        pool = [{**c, "category": "single_object"} for c in classes]
    elif cfg.prompts == "classes":
        ids = cfg.class_ids if cfg.class_ids is not None else list(range(num_classes))
        pool = [{"class_id": int(i), "prompt": f"class {i}"} for i in ids]
    else:
        raise ValueError(f"data.prompts={cfg.prompts!r}; valid: ['classes', 'tiny_shapes']")
    if not pool:
        raise ValueError("data.class_ids is empty: no conditions to train on")
    rng = random.Random(cfg.seed)
    train = [dict(rng.choice(pool)) for _ in range(cfg.num_train)]
    evaluation = [dict(pool[i % len(pool)]) for i in range(cfg.num_eval)]  # balanced over conditions
    return train, evaluation


def build(cfg: TrainConfig) -> ImageGenTask:
    model = _load_gpt(cfg.model)
    tokenizer = _load_vq(cfg.model)
    train, evaluation = _records(cfg.data, model.config.num_classes)
    policy = ARImagePolicy(model, tokenizer, cfg.model.cfg_scale, tuple(cfg.model.cfg_interval),
                           cfg.model.logprob_mode, cfg.model.use_cache, cfg.logprob_chunk_size)
    # A broken reward (bad model path, wrong signature) must fail now, not after the first rollout.
    sample = train[0]
    spec = sample.get("spec")
    image = render_spec(spec, size=64) if spec else torch.rand(3, 64, 64)
    dry_run([r.name for r in cfg.rewards], sample["prompt"], image, spec)
    logger.info("AR generator: %.2fM parameters, %d tokens per image; %d training conditions",
                sum(p.numel() for p in model.parameters()) / 1e6, model.config.block_size, len(train))
    return ImageGenTask(policy, train, evaluation)


@torch.no_grad()
def save_samples(cfg: TrainConfig, task: ImageGenTask, path: str | Path, per_class: int = 4,
                 max_classes: int = 9) -> Path:
    """A PNG grid: one row per condition, ``per_class`` samples each, drawn as in rollouts."""
    from PIL import Image, ImageDraw


    seen, records = set(), []
    for record in task.eval_dataset or task.train_dataset:
        if record["class_id"] not in seen and len(records) < max_classes:
            seen.add(record["class_id"])
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

