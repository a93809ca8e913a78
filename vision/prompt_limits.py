"""Per-record limits, checked when a dataset reads a record — before it reaches the policy — so that one bad
row is a skipped sample (:class:`mmrl.data.BadSample`, counted by the sampler) instead of a failed run:

* every image can be sized by the model's processor (Qwen's smart resize refuses an aspect ratio over 200,
  and an empty image has no size at all);
* the prompt — text tokens plus image tokens, as the processor will produce them — fits
  ``data.max_prompt_length``. With ``data.truncate_prompts`` an over-long prompt is cut to fit instead:
  the user's text is trimmed **from the left** (earliest text first), so the end of the prompt — the
  template's answer-format instruction and the question's last sentence — survives. Images, image tokens
  and the system message are never cut; a prompt that cannot fit even without its user text is skipped.

The length check is cheap: the chat template is rendered and tokenized as text only, and each image's token
count is computed from its size: ``(h / factor) * (w / factor)`` after smart resize, ``factor`` being the
patch size times the merge size (28 for Qwen2/2.5-VL, 32 for Qwen3-VL); the processor's count,
``grid_t * grid_h * grid_w / merge_size**2`` with ``grid_t = 1`` for an image, is the same number. The
policy resizes an image before the processor, which resizes it again by the same rule, so smart resize is
applied twice (the second pass changes only thin images whose first pass exceeded max_pixels).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from mmrl.data import BadSample
from vision.modeling import pixel_bounds, smart_resize

logger = logging.getLogger(__name__)


def image_token_count(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> int:
    """Image tokens the processor puts in the prompt for one ``height`` x ``width`` image (after the
    policy's smart resize). Raises ValueError when the image cannot be sized."""
    if height < 1 or width < 1:
        raise ValueError(f"the image is empty ({width}x{height} pixels)")
    h, w = smart_resize(height, width, factor, min_pixels, max_pixels)  # the policy's resize_image
    # The image processor then sizes the resized image by the same rule: a no-op unless the first pass broke
    # max_pixels, as a thin image can (both sides are at least ``factor``), and then it shrinks it again.
    h, w = smart_resize(h, w, factor, min_pixels, max_pixels)
    return (h // factor) * (w // factor)


def context_length(model: Any) -> int | None:
    """The model's context length (``max_position_embeddings`` of its text config), or None if unknown."""
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", None) or config
    length = getattr(text_config, "max_position_embeddings", None)
    return int(length) if length else None


@dataclass
class PromptLimits:
    """What :meth:`check` enforces on a record. Without ``processor`` (or ``max_prompt_length``) only the
    images are checked."""

    min_pixels: int
    max_pixels: int
    factor: int = 28  # patch size x merge size: the side of one image token, in pixels
    max_prompt_length: int | None = None
    truncate: bool = False
    processor: Any = None  # chat template + tokenizer, for the prompt length

    @classmethod
    def from_processor(cls, processor: Any, max_prompt_length: int | None = None,
                       truncate: bool = False) -> PromptLimits:
        image_processor = processor.image_processor
        min_pixels, max_pixels = pixel_bounds(image_processor)
        factor = image_processor.patch_size * image_processor.merge_size
        return cls(min_pixels, max_pixels, factor, max_prompt_length, truncate, processor)

    def image_tokens(self, images: Sequence[Image.Image]) -> list[int]:
        """Image tokens per image; BadSample naming the image and the reason when one cannot be sized."""
        counts = []
        for k, image in enumerate(images):
            width, height = image.size
            try:
                counts.append(image_token_count(height, width, self.factor, self.min_pixels, self.max_pixels))
            except (ValueError, ZeroDivisionError, OverflowError) as exc:
                raise BadSample(f"image {k} ({width}x{height} pixels) cannot be sized for the model "
                                f"(min_pixels {self.min_pixels}, max_pixels {self.max_pixels}): {exc}") from None
        return counts

    def prompt_length(self, messages: list[dict], image_tokens: Sequence[int]) -> int:
        """Prompt tokens as the policy will feed them: the chat template with the generation prompt,
        tokenized, each image placeholder expanded to that image's tokens."""
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.processor.tokenizer(text)["input_ids"]
        placeholders = text.count(self.processor.image_token)
        if placeholders != len(image_tokens):
            raise BadSample(f"the prompt has {placeholders} image placeholders but the record has "
                            f"{len(image_tokens)} images")
        return len(ids) - placeholders + sum(image_tokens)

    def check(self, record: dict, where: str = "record") -> dict:
        """``record`` if it is usable, else BadSample; with ``truncate`` an over-long prompt comes back
        truncated (a copy; a warning names ``where`` and the lengths)."""
        image_tokens = self.image_tokens(record.get("images") or [])
        limit = self.max_prompt_length
        if limit is None or self.processor is None:
            return record
        length = self.prompt_length(record["prompt"], image_tokens)
        if length <= limit:
            return record
        if not self.truncate:
            raise BadSample(f"prompt is {length} tokens > data.max_prompt_length {limit}")
        messages, new_length = self._truncate(record["prompt"], image_tokens, length, limit)
        logger.warning("%s: prompt truncated from %d to %d tokens (data.max_prompt_length %d); the user text "
                       "was cut from the left", where, length, new_length, limit)
        return {**record, "prompt": messages}

    def _truncate(self, messages: list[dict], image_tokens: Sequence[int], length: int,
                  limit: int) -> tuple[list[dict], int]:
        messages = copy.deepcopy(messages)  # text only: images live in the record, not in the messages
        for message in messages:  # plain-string user content becomes one text part, so it can be trimmed
            if message.get("role") == "user" and isinstance(message.get("content"), str):
                message["content"] = [{"type": "text", "text": message["content"]}]
        parts = [p for m in messages if m.get("role") == "user" for p in m["content"] if p.get("type") == "text"]
        tokenizer = self.processor.tokenizer
        # Re-tokenizing the joined prompt can differ from the parts by a token; a few passes settle it.
        for _ in range(len(parts) + 8):
            excess = length - limit
            if excess <= 0:
                return messages, length
            part = next((p for p in parts if p.get("text")), None)
            if part is None:
                break
            ids = tokenizer(part["text"], add_special_tokens=False)["input_ids"]
            part["text"] = tokenizer.decode(ids[excess:]) if excess < len(ids) else ""
            length = self.prompt_length(messages, image_tokens)
        if length <= limit:
            return messages, length
        raise BadSample(f"prompt is {length} tokens > data.max_prompt_length {limit} even with its text "
                        "truncated (the images and the template alone are too long)")


class CheckedRecords(Sequence):
    """Any dataset of records (e.g. :class:`vision.benchmarks.BenchmarkRecords`) with ``limits`` checked
    on every record read; other attributes are the wrapped dataset's."""

    def __init__(self, dataset: Sequence[dict], limits: PromptLimits):
        self.dataset, self.limits = dataset, limits

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:  # type: ignore[override]
        record, name = self.dataset[index], getattr(self.dataset, "name", "dataset")
        try:
            return self.limits.check(record, where=f"row {index} of {name}")
        except BadSample as exc:
            raise BadSample(f"row {index} of {name}: {exc}") from None

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "limits"):  # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)
