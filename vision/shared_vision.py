"""Encode each image once per batch, however many samples share it.

A group's ``G`` samples repeat their prompt's inputs (:meth:`mmrl.policy.SampleInputs.select`), so their
per-image pixel tensors are the *same tensor objects*. :func:`plan_images` finds the unique ones by object
identity (plus the image's grid: no value hashing), and :func:`shared_image_features` makes the model encode
only those and hand each unique image's features to every image token block that shows it.

It works inside the model's own forward, so it holds for a DDP/FSDP-wrapped model and for ``generate``
alike: the call gets the unique images' ``pixel_values`` and the full ``image_grid_thw`` (one row per image
occurrence, which M-RoPE positions need), and for the duration of the call the inner Qwen-VL model's
``get_image_features`` — which its ``forward`` calls with exactly those two — encodes the unique images and
indexes its per-image outputs back out to every occurrence: ``pooler_output`` (the merged tokens written
into the text embeddings) and, for Qwen3-VL, each ``deepstack_features`` level. Indexing a tensor several
times sums the gradients of its uses, so gradients are those of encoding every copy. Transformers 5.24's
Qwen2-VL, Qwen2.5-VL and Qwen3-VL all encode images this way (``Model.forward`` → ``self.get_image_features``
→ ``self.visual``), and each image is encoded independently of the others in the call (per-image
attention windows), so encoding fewer images does not change any image's features.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from mmrl.policy import unwrap_model

Tensor = torch.Tensor


@dataclass
class ImagePlan:
    """Which image occurrence shows which unique image."""

    pixel_values: Tensor  # the unique images' patches, concatenated in first-seen order
    unique_grid_thw: Tensor  # [U, 3]
    image_grid_thw: Tensor  # [N, 3]: every occurrence, in the order of the image tokens
    index: list[int]  # occurrence → unique image

    @property
    def num_unique(self) -> int:
        return len(self.unique_grid_thw)


def plan_images(pixels_per_sample: list[list[Tensor]], grids_per_sample: list[list[Tensor]]) -> ImagePlan | None:
    """The unique images among every sample's images (``None`` when there are no images). Two occurrences
    are one image when their pixel tensors are the same object and their grids are equal."""
    pixels = [p for chunk in pixels_per_sample for p in chunk]
    if not pixels:
        return None
    grids = [g for chunk in grids_per_sample for g in chunk]
    first: dict[tuple, int] = {}  # key → unique index; the tensors stay alive in the lists, so ids are stable
    unique_pixels, unique_grids, index = [], [], []
    for p, g in zip(pixels, grids, strict=True):
        key = (id(p), tuple(g.flatten().tolist()))
        if key not in first:
            first[key] = len(unique_pixels)
            unique_pixels.append(p)
            unique_grids.append(g)
        index.append(first[key])
    return ImagePlan(pixel_values=torch.cat(unique_pixels), unique_grid_thw=torch.cat(unique_grids),
                     image_grid_thw=torch.cat(grids), index=index)


def vision_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose ``forward`` calls ``self.get_image_features`` (``Qwen*VLModel``) inside a
    ``Qwen*VLForConditionalGeneration``, itself possibly inside DDP/DeepSpeed wrappers."""
    inner = unwrap_model(model)
    if hasattr(inner, "get_base_model"):  # a PEFT (LoRA) model wraps the transformers model
        inner = inner.get_base_model()
    base = getattr(inner, "model", inner)
    if not (hasattr(base, "visual") and hasattr(base, "get_image_features")):
        raise TypeError(f"{type(inner).__name__} has no Qwen-VL style vision model (.model.visual)")
    return base


@contextmanager
def shared_image_features(model: torch.nn.Module, plan: ImagePlan | None) -> Iterator[None]:
    """For the duration of the block, the model encodes ``plan.pixel_values`` (the unique images) and
    gives every image occurrence its unique image's features. Pass the model ``plan.pixel_values`` and
    ``plan.image_grid_thw``. A ``None`` plan (no images) changes nothing."""
    if plan is None:
        yield
        return
    base = vision_model(model)
    original = base.get_image_features
    own = "get_image_features" in vars(base)  # already patched on the instance (nested use): restore it after

    def get_image_features(pixel_values: Tensor, image_grid_thw: Tensor | None = None, **kwargs):
        if image_grid_thw is None or image_grid_thw.shape[0] != len(plan.index) \
                or pixel_values.shape[0] != plan.pixel_values.shape[0]:
            raise RuntimeError("shared_image_features: the model was not given the plan's pixel_values and "
                               "image_grid_thw")
        out = original(pixel_values, plan.unique_grid_thw.to(image_grid_thw.device), **kwargs)
        out.pooler_output = tuple(out.pooler_output[i] for i in plan.index)
        deepstack = getattr(out, "deepstack_features", None)  # Qwen3-VL: one per-image tuple per level
        if deepstack is not None:
            out.deepstack_features = [tuple(level[i] for i in plan.index) for level in deepstack]
        return out

    base.get_image_features = get_image_features
    try:
        yield
    finally:
        if own:
            base.get_image_features = original
        else:
            del base.get_image_features


@torch.no_grad()
def prefill_groups(model: torch.nn.Module, inputs: dict[str, Tensor], plan: ImagePlan | None,
                   group_size: int) -> tuple[dict[str, Tensor], Any]:
    """Prompt sharing for generation: each of the P prompts runs through the model once — all but its last
    token, images included — and its KV cache is copied to the G rows of its group. Returns the P·G-row
    inputs for ``model.generate`` (no pixels: the cache holds the images) and the cache, which ``generate``
    continues from (it feeds only the last prompt token, then decodes as usual, so sampling, logits
    processors and recorded scores are unchanged).

    Qwen-VL's M-RoPE keeps the prompt's position offset (``rope_deltas``) on the inner model after the
    first forward; it is copied per group like the cache. A batch without images gets zero offsets, as
    ``generate`` itself sets them for text-only input."""
    base = vision_model(model)
    base.rope_deltas = None  # computed afresh by this prefill
    prefix = {k: v[:, :-1] if v.dim() >= 2 and v.shape[1] == inputs["input_ids"].shape[1] else v
              for k, v in inputs.items()}
    with shared_image_features(model, plan):
        out = model(**prefix, use_cache=True, logits_to_keep=1)
    cache = getattr(out, "cache", None) or out.past_key_values
    rows = inputs["input_ids"].shape[0]
    if base.rope_deltas is None:
        base.rope_deltas = torch.zeros(rows, 1, dtype=torch.long, device=inputs["input_ids"].device)
    cache.batch_repeat_interleave(group_size)
    base.rope_deltas = base.rope_deltas.repeat_interleave(group_size, dim=0)
    expanded = {k: v.repeat_interleave(group_size, dim=0) for k, v in inputs.items()
                if k not in ("pixel_values", "image_grid_thw")}
    return expanded, cache
