"""Loading Qwen-VL models and processors — from a hub id, a local directory, or the built-in tiny model.

Two traps handled here:

* transformers' Qwen-VL processors refuse to construct without torchvision (the video-processor class
  check runs even for ``video_processor=None``). :func:`image_only_processor_class` derives a processor
  class whose constructor takes no video processor, so the class check never runs; images go through
  the PIL image processor. Saving works too (there is no ``None`` attribute to serialise).
* ``tiny-qwen2.5-vl`` is a ~0.7M-parameter Qwen2.5-VL built from a config with the tokenizer shipped in
  ``vision/assets/tiny_tokenizer``: no network, seconds to train on a CPU, the real architecture.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLProcessor,
    Qwen3VLProcessor,
)
from transformers.image_utils import SizeDict
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

logger = logging.getLogger(__name__)

TINY_TOKENIZER_DIR = Path(__file__).parent / "assets" / "tiny_tokenizer"

# Processor class per model_type; the image-only variant is derived from it.
PROCESSOR_CLASSES = {
    "qwen2_vl": Qwen2VLProcessor,
    "qwen2_5_vl": Qwen2_5_VLProcessor,
    "qwen3_vl": Qwen3VLProcessor,
    "qwen3_vl_moe": Qwen3VLProcessor,
}


# Qwen2/2.5/3-VL decoder layers' linear layers: attention and MLP.
LANGUAGE_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"  # what PEFT writes next to an adapter's weights


@dataclass
class LoraConfig:
    """``model.lora``: train a LoRA adapter (through PEFT) instead of every weight.

    The adapter goes on the ``nn.Linear`` layers of the language model whose last name component is in
    ``target_modules`` (``null``: every linear layer of the language model); the output head is never
    adapted (it is tied to the input embeddings in small Qwen models). The vision encoder (``visual``,
    merger included) is left out unless ``vision_tower: true``. The list handed to PEFT holds full module
    names, so a vision block's ``mlp.down_proj`` can never match a language-model target by accident.

    With an adapter the KL reference is the same model with the adapter disabled (no second copy of the
    weights), and a checkpoint's ``model/`` holds the adapter (``adapter_config.json`` names the base)."""

    r: int = 8  # rank
    alpha: float = 16.0  # scaling = alpha / r
    dropout: float = 0.0
    target_modules: list[str] | None = field(default_factory=lambda: list(LANGUAGE_LINEAR_NAMES))
    vision_tower: bool = False  # also adapt the vision encoder's linear layers


@dataclass
class GradientCheckpointingConfig:
    """``model.gradient_checkpointing``: activation checkpointing per part of the model. ``null`` follows the
    top-level ``gradient_checkpointing`` (which means both parts)."""

    vision: bool | None = None  # the vision encoder's blocks
    language: bool | None = None  # the language model's decoder layers


@dataclass
class VisionModelConfig:
    """The ``model:`` section of a vision config.

    ``freeze_vision_tower`` (as in verl and EasyR1, which both call ``visual.requires_grad_(False)``):
    the whole vision encoder, the patch merger / projector into the language model included, gets
    ``requires_grad=False``; the language model (embeddings, decoder, head) trains."""

    name_or_path: str = "tiny-qwen2.5-vl"  # hub id, local directory, or a built-in tiny model name
    dtype: str = "auto"  # auto (bf16 on a bf16-capable GPU, else fp32) | float32 | bfloat16 | float16
    attn_implementation: str | None = None  # e.g. sdpa | flash_attention_2; None = transformers' default
    min_pixels: int = 28 * 28 * 4  # image sizing bounds (Qwen's smart resize)
    max_pixels: int = 28 * 28 * 256
    freeze_vision_tower: bool = False  # vision encoder + merger frozen (see above)
    lora: LoraConfig | None = None  # null = full fine-tuning
    gradient_checkpointing: GradientCheckpointingConfig = field(default_factory=GradientCheckpointingConfig)
    seed: int = 0  # initialisation seed of a built-in tiny model


# ------------------------------------------------------------------------------------------------
# Processor without torchvision
# ------------------------------------------------------------------------------------------------

_IMAGE_ONLY_CACHE: dict[type, type] = {}


def image_only_processor_class(base: type) -> type:
    """A subclass of a Qwen-VL processor class whose only sub-processors are image processor + tokenizer."""
    if base in _IMAGE_ONLY_CACHE:
        return _IMAGE_ONLY_CACHE[base]

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # ProcessorMixin reads the sub-processor names off this signature: no video_processor here.
        base.__init__(self, image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                      chat_template=chat_template, **kwargs)

    cls = type(f"ImageOnly{base.__name__}", (base,), {"__init__": __init__, "__module__": __name__})
    _IMAGE_ONLY_CACHE[base] = cls
    return cls


def build_processor(model_type: str, tokenizer, image_processor, chat_template: str | None = None):
    if model_type not in PROCESSOR_CLASSES:
        raise ValueError(f"unsupported model type {model_type!r}; supported: {sorted(PROCESSOR_CLASSES)}")
    cls = image_only_processor_class(PROCESSOR_CLASSES[model_type])
    template = chat_template or getattr(tokenizer, "chat_template", None)
    return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 28 * 28 * 4,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """Qwen-VL's sizing rule: both sides multiples of ``factor``, area within [min_pixels, max_pixels],
    aspect ratio kept as closely as the grid allows. (qwen-vl-utils implements the same rule but imports
    torchvision, which this project must not need.)"""
    if max(height, width) / max(1, min(height, width)) > 200:
        raise ValueError(f"image aspect ratio must be below 200, got {height}x{width}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


def set_pixel_bounds(image_processor, min_pixels: int, max_pixels: int) -> None:
    """One sizing rule everywhere: the image processor's bounds follow the config. transformers 5 reads
    them from ``size`` (shortest_edge = min pixels, longest_edge = max pixels); the old ``min_pixels`` /
    ``max_pixels`` attributes are deprecated and cleared so they cannot override it."""
    if min_pixels > max_pixels:
        raise ValueError(f"model.min_pixels={min_pixels} is larger than model.max_pixels={max_pixels}")
    image_processor.size = SizeDict(shortest_edge=min_pixels, longest_edge=max_pixels)
    image_processor.min_pixels = image_processor.max_pixels = None


def pixel_bounds(image_processor) -> tuple[int, int]:
    """(min_pixels, max_pixels) the image processor resizes to."""
    size = image_processor.size
    low, high = size["shortest_edge"], size["longest_edge"]
    return (getattr(image_processor, "min_pixels", None) or low, getattr(image_processor, "max_pixels", None) or high)


def resize_image(image: Image.Image, min_pixels: int, max_pixels: int, factor: int = 28) -> Image.Image:
    h, w = smart_resize(image.height, image.width, factor, min_pixels, max_pixels)
    if (h, w) == (image.height, image.width):
        return image
    return image.resize((w, h), resample=Image.Resampling.BICUBIC)


# ------------------------------------------------------------------------------------------------
# The built-in tiny model
# ------------------------------------------------------------------------------------------------


def tiny_qwen2_5_vl_config(tokenizer) -> Qwen2_5_VLConfig:
    """0.7M parameters: text 128 wide × 2 layers, vision 64 wide × 2 blocks (patch 14, merge 2)."""
    special = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
                tie_word_embeddings=True, eos_token_id=eos, pad_token_id=pad, bos_token_id=None)
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[1],
                  window_size=112, in_chans=3)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                            eos_token_id=eos, pad_token_id=pad, **special)


def build_tiny_model(name: str, seed: int = 0):
    """Random-initialised tiny model + processor (no network)."""
    if name != "tiny-qwen2.5-vl":
        raise ValueError(f"unknown built-in model {name!r}; built-in: ['tiny-qwen2.5-vl']")
    tokenizer = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR))
    config = tiny_qwen2_5_vl_config(tokenizer)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 256},
                                               patch_size=14, merge_size=2, temporal_patch_size=2)
    processor = build_processor("qwen2_5_vl", tokenizer, image_processor)
    return model, processor


BUILTIN_MODELS = ("tiny-qwen2.5-vl",)


def _resolve_dtype(dtype: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"model.dtype={dtype!r}; valid: auto, float32, bfloat16, float16") from None


def load_model_and_processor(cfg: VisionModelConfig, gradient_checkpointing: bool = False):
    """(model, processor) for ``cfg.name_or_path``: a built-in tiny name, a local directory, a LoRA adapter
    directory (its base loaded, the adapter merged in), or a hub id. Then, in this order: the vision tower
    frozen (``freeze_vision_tower``), activation checkpointing per part (``cfg.gradient_checkpointing``; a
    part left ``null`` follows ``gradient_checkpointing``, the top-level setting), a LoRA adapter
    (``cfg.lora``; the model returned is then a ``peft.PeftModel``)."""
    name = cfg.name_or_path
    local = Path(name).expanduser() if isinstance(name, str) else None
    if name not in BUILTIN_MODELS and local is not None and is_adapter_dir(local):
        model, processor = load_adapter(local, cfg)
    else:
        model, processor = _load_base(cfg)
    set_pixel_bounds(processor.image_processor, cfg.min_pixels, cfg.max_pixels)
    if cfg.freeze_vision_tower:
        visual = vision_and_language(model)[0]
        if visual is None:
            raise ValueError("freeze_vision_tower: this model has no `visual` module")
        visual.requires_grad_(False)
    parts = cfg.gradient_checkpointing
    set_gradient_checkpointing(model, vision=gradient_checkpointing if parts.vision is None else parts.vision,
                               language=gradient_checkpointing if parts.language is None else parts.language)
    if cfg.lora is not None:
        base = str(local.resolve()) if local is not None and local.is_dir() else name
        model = apply_lora(model, cfg.lora, base)
    processor.tokenizer.padding_side = "left"  # generation pads prompts on the left
    return model, processor


def _load_base(cfg: VisionModelConfig):
    name = cfg.name_or_path
    if name in BUILTIN_MODELS:
        model, processor = build_tiny_model(name, cfg.seed)
    else:
        local = Path(name).expanduser()
        looks_local = name.startswith((".", "/", "~")) or local.exists() or name.count("/") != 1
        if looks_local and not local.is_dir():
            raise FileNotFoundError(
                f"model path {name!r} does not exist. Use a local model directory, a hub id like "
                f"'Qwen/Qwen2.5-VL-3B-Instruct', or a built-in model: {list(BUILTIN_MODELS)}")
        source = str(local) if local.is_dir() else name
        if local.is_dir() and not (local / "config.json").is_file():
            raise FileNotFoundError(f"could not load model {name!r}: the directory has no config.json (not a "
                                    "transformers model directory; an mmrl checkpoint's model is in checkpoint-N/model)")
        try:
            config = AutoConfig.from_pretrained(source)
        except OSError as exc:  # offline and not in the local cache, or a directory without config.json
            raise FileNotFoundError(
                f"could not load model {name!r}: {str(exc).splitlines()[0]} Download it on a connected machine "
                "(e.g. `huggingface-cli download ...`) and pass the local directory, or pre-fill the hub cache."
            ) from exc
        if config.model_type not in PROCESSOR_CLASSES:
            raise ValueError(f"{name!r} is a {config.model_type!r} model; supported: {sorted(PROCESSOR_CLASSES)}")
        kwargs = {"dtype": _resolve_dtype(cfg.dtype)}
        if cfg.attn_implementation:
            kwargs["attn_implementation"] = cfg.attn_implementation
        model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, padding_side="left")
        image_processor = AutoImageProcessor.from_pretrained(source)
        processor = build_processor(config.model_type, tokenizer, image_processor)
    return model.to(_resolve_dtype(cfg.dtype)), processor


# ------------------------------------------------------------------------------------------------
# Parts of the model: freezing, activation checkpointing, LoRA
# ------------------------------------------------------------------------------------------------


def vision_and_language(model: torch.nn.Module) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
    """(vision encoder, language model) of a Qwen-VL model, a PEFT-wrapped one included (``None`` where the
    model has no such part)."""
    if hasattr(model, "get_base_model"):  # peft.PeftModel: the adapters sit inside the original modules
        model = model.get_base_model()
    inner = getattr(model, "model", model)
    return getattr(inner, "visual", None), getattr(inner, "language_model", None)


def set_gradient_checkpointing(model: torch.nn.Module, vision: bool, language: bool) -> None:
    """Activation checkpointing on the vision encoder's blocks and/or the language model's decoder layers.

    Each part is a transformers ``PreTrainedModel`` of its own (``model.model.visual``,
    ``model.model.language_model``) whose layers are ``GradientCheckpointingLayer``s: the part's own
    ``activation_checkpointing_enable`` (``gradient_checkpointing_enable`` in older transformers) sets
    ``gradient_checkpointing`` on its layers only. Non-reentrant checkpointing: the gradients are the same
    as without it, and frozen inputs (a frozen vision tower, LoRA's frozen embeddings) need no hooks."""
    visual, language_model = vision_and_language(model)
    for part, on, what in ((visual, vision, "vision"), (language_model, language, "language")):
        if not on:
            continue
        if part is None or not getattr(part, "supports_gradient_checkpointing", False):
            raise ValueError(f"model.gradient_checkpointing.{what}: this model has no {what} part that supports "
                             "activation checkpointing")
        enable = getattr(part, "activation_checkpointing_enable", None) or part.gradient_checkpointing_enable
        enable({"use_reentrant": False})


def lora_target_names(model: torch.nn.Module, lora: LoraConfig) -> list[str]:
    """Full names of the linear layers that get an adapter (see :class:`LoraConfig`)."""
    visual = vision_and_language(model)[0]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vision_prefix = next((n for n, m in model.named_modules() if m is visual), None) if visual is not None else None
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        in_vision = vision_prefix is not None and (name == vision_prefix or name.startswith(vision_prefix + "."))
        if in_vision and not lora.vision_tower:
            continue
        if lora.target_modules is None or name.rsplit(".", 1)[-1] in lora.target_modules:
            names.append(name)
    return names


def apply_lora(model: torch.nn.Module, lora: LoraConfig, base_name: str):
    """``model`` wrapped by PEFT with a fresh LoRA adapter; only the adapter's parameters train. The adapter
    config names ``base_name`` as its base (what :func:`load_adapter` loads it onto)."""
    import peft

    names = lora_target_names(model, lora)
    if not names:
        raise ValueError(f"model.lora.target_modules={lora.target_modules!r} matches no linear layer of the "
                         f"{'model' if lora.vision_tower else 'language model'}")
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=names)
    wrapped = peft.get_peft_model(model, config)
    wrapped.peft_config["default"].base_model_name_or_path = base_name  # PEFT takes it from the model, "" here
    return wrapped


def is_adapter_dir(path: Path) -> bool:
    """A PEFT adapter directory (``adapter_config.json``, no full model's ``config.json``)."""
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def load_adapter(directory: Path, cfg: VisionModelConfig):
    """(model, processor) of a LoRA adapter directory: its base (``base_model_name_or_path`` in
    ``adapter_config.json``, loaded with ``cfg``'s dtype and, for a built-in tiny base, ``cfg.seed``) with
    the adapter merged into the weights: a plain model, as fast as the base, for evaluation or as the start
    of another run."""
    from peft import PeftModel

    try:
        base = json.loads((directory / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except ValueError as exc:
        raise ValueError(f"{directory / ADAPTER_CONFIG} is not valid JSON ({exc})") from None
    if not base:
        raise ValueError(f"{directory / ADAPTER_CONFIG} names no base model (base_model_name_or_path)")
    model, processor = _load_base(replace(cfg, name_or_path=base, lora=None))
    model = PeftModel.from_pretrained(model, str(directory)).merge_and_unload()
    logger.info("loaded the LoRA adapter %s onto %s (merged)", directory, base)
    return model, processor
