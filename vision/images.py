"""Decoding one image of a dataset row into an RGB PIL image (:func:`load_image`), used by
:class:`vision.data.VisionDataset` and the benchmark loader. Transparent pixels become white and 16/32-bit
grey is rescaled, not clipped; EXIF orientation is applied; an unusable image raises
:class:`mmrl.data.BadSample` with the reason, so the sampler skips its row."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from mmrl.data import BadSample


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        # convert("RGB") would show transparent pixels as the colour they hide (often black); use white.
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    if img.mode.startswith("I") or img.mode == "F":
        # 16/32-bit grey: convert("RGB") would clip to 0..255; rescale instead.
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 255.0)
        return Image.fromarray(np.clip(arr / peak * 255.0, 0, 255).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def _decode(data: bytes | str | Path) -> Image.Image:
    with Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data) as img:
        img.load()  # decode now: a truncated file must fail here, not later inside the processor
        return _to_rgb(ImageOps.exif_transpose(img))


def load_image(src: Any, k: int, resolve: Callable[[str], Path] = Path) -> Image.Image:
    """Decode image ``k`` of a row: PIL, a path (made absolute by ``resolve``), an HF ``{"bytes", "path"}``
    dict or raw bytes. Raises BadSample (with the reason) when it is unusable."""
    if isinstance(src, Image.Image):
        return _to_rgb(src)
    if isinstance(src, dict):  # Hugging Face Image storage: bytes win, path is a fallback
        src = src.get("bytes") or src.get("path")
        if not src:
            raise BadSample(f"image {k} has neither bytes nor path")
    if isinstance(src, (str, os.PathLike)):
        path = resolve(os.fspath(src))
        if not path.is_file():
            raise BadSample(f"image {k}: file not found: {str(path)!r}")
        src = path
    elif not isinstance(src, (bytes, bytearray, memoryview)):
        raise BadSample(f"image {k} is a {type(src).__name__}, not an image, path or bytes")
    try:
        return _decode(src)
    except Exception as exc:  # PIL raises many types for bad data (OSError, SyntaxError, ...)
        where = f"image {k} ({str(src)!r})" if isinstance(src, Path) else f"image {k}"
        raise BadSample(f"{where} cannot be decoded: {type(exc).__name__}: {exc}") from None
