"""Masked-image counterfactuals for PAPO (Perception-Aware Policy Optimization, Wang et al. 2025).

PAPO adds a term that *maximises* KL(pi(o | q, I) || pi(o | q, I_masked)): a policy that really looks at
the image should become much less sure of its own answer when the image is taken away. This module
builds ``I_masked``.

Default (the paper's): split the **raw** image into 14x14-pixel patches and black out each one
independently with probability 0.6. Masking happens *before* the Qwen processor resizes the image, so the
processor sees the masked picture exactly as it would see a real one (same resize, same vision-token
count), and the two forward passes differ only in pixel content.

One mask per prompt, shared by the group: the caller calls :func:`mask_images` once per prompt per step
and reuses the result for all G rollouts of that prompt. Every rollout is then compared against the same
counterfactual, so differences in the KL term across the group reflect the rollouts, not mask luck, and
the group-relative view of the loss stays coherent.

Fresh masks each step: the generator advances between steps, so the policy never sees the same holes
twice and cannot learn to exploit one fixed mask (e.g. by reading the unmasked regions it has memorised).

Variants (:class:`MaskingConfig.strategy`):

* ``"random_patch"`` -- black patches with probability ``prob`` (default).
* ``"full"`` -- the whole image black (the paper's mask-ratio 1.0 ablation); draws no random numbers.
* ``"noise"`` -- random patches filled with Gaussian noise (mean 127.5, std 64, clipped) instead of black.
* ``"column"`` -- precomputed masked images from a dataset column (the paper's "semantic-aware" masking,
  where the masked regions follow objects rather than a grid).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

STRATEGIES = ("random_patch", "full", "noise", "column")
FILLS = ("black", "noise")
NOISE_MEAN = 127.5
NOISE_STD = 64.0


def _check_params(patch_size: int, prob: float) -> None:
    # bool is an int subclass; True as a patch size is almost certainly a config mistake.
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be an integer >= 1, got {patch_size!r}")
    if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be a number in [0, 1], got {prob!r}")


def _to_rgb(image: Image.Image) -> Image.Image:
    """A new RGB image with the same content; transparency is composited on white."""
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        # A plain convert("RGB") drops alpha and shows whatever colour hides under it (often black),
        # which would look like masked patches before any masking happened.
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode.startswith("I") or image.mode == "F":
        # 16/32-bit and float grey: convert("RGB") would clip at 255 (mostly white); rescale instead.
        arr = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(arr.max(initial=0.0)), 255.0)
        grey = np.clip(arr / peak * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    # convert() always returns a new image, even for RGB, so the caller's input is never aliased.
    return image.convert("RGB")


def mask_patches_grid(height: int, width: int, patch_size: int, prob: float,
                      generator: torch.Generator | None) -> torch.Tensor:
    """Bool tensor (rows, cols), ``True`` = patch masked; ``rows = ceil(height / patch_size)`` etc.

    One vectorised draw, so the number of random numbers consumed depends only on the grid shape and the
    same generator state always gives the same mask.
    """
    _check_params(patch_size, prob)
    rows, cols = math.ceil(height / patch_size), math.ceil(width / patch_size)
    # torch.rand is in [0, 1): prob=1 masks everything, prob=0 nothing.
    return torch.rand(rows, cols, generator=generator) < prob


def random_patch_mask(image: Image.Image, patch_size: int = 14, prob: float = 0.6,
                      generator: torch.Generator | None = None, fill: str = "black") -> Image.Image:
    """A new RGB image of the same size with each patch filled independently with probability ``prob``.

    Edge patches may be partial, so the whole image is covered; an image smaller than one patch is a
    single patch. ``fill`` is ``"black"`` or ``"noise"`` (per-pixel N(127.5, 64^2) clipped to 0..255, drawn
    from ``generator`` after the mask).
    """
    _check_params(patch_size, prob)
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    rgb = _to_rgb(image)
    width, height = rgb.size
    grid = mask_patches_grid(height, width, patch_size, prob, generator)
    if grid.numel() == 0:  # zero-sized image: nothing to mask
        return rgb
    # Expand patch decisions to pixels, then crop the overhang of the partial last row/column.
    pixel_mask = grid.repeat_interleave(patch_size, 0).repeat_interleave(patch_size, 1)[:height, :width]
    mask = pixel_mask.numpy()
    pixels = np.array(rgb)  # writable copy
    if fill == "black":
        pixels[mask] = 0
    else:
        noise = torch.randn(height, width, 3, generator=generator) * NOISE_STD + NOISE_MEAN
        noise = noise.clamp_(0, 255).round_().to(torch.uint8).numpy()
        pixels[mask] = noise[mask]
    return Image.fromarray(pixels)


@dataclass
class MaskingConfig:
    """How PAPO builds the masked image (YAML section)."""

    strategy: str = "random_patch"
    patch_size: int = 14
    prob: float = 0.6
    column: str = "masked_images"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"masking strategy must be one of {', '.join(STRATEGIES)}; got {self.strategy!r}")
        # Validate even for strategies that ignore them, so a typo fails at load time not at a switch.
        _check_params(self.patch_size, self.prob)
        if not isinstance(self.column, str) or not self.column:
            raise ValueError(f"masking column must be a non-empty string, got {self.column!r}")


def mask_images(images: list[Image.Image], config: MaskingConfig, generator: torch.Generator,
                precomputed: list | None = None) -> list[Image.Image]:
    """Masked counterparts of the images of ONE prompt, in order.

    Call once per prompt per step and share the result across the prompt's rollouts. ``precomputed`` is
    that prompt's value of ``config.column`` (already loaded as PIL images), used only by ``"column"``.
    """
    for k, img in enumerate(images):
        if not isinstance(img, Image.Image):
            raise TypeError(f"images[{k}] must be a PIL.Image.Image, got {type(img).__name__}")
    if config.strategy == "column":
        if precomputed is None or len(precomputed) != len(images):
            got = "none" if precomputed is None else len(precomputed)
            raise ValueError(f"masking column {config.column!r} must hold one masked image per image: "
                             f"got {got} for {len(images)} image(s)")
        for k, img in enumerate(precomputed):
            if not isinstance(img, Image.Image):
                raise TypeError(f"column {config.column!r}[{k}] must be a PIL.Image.Image "
                                f"(the caller loads paths/bytes), got {type(img).__name__}")
        # RGB copies, so the output is uniform across strategies and independent of the dataset's objects.
        return [_to_rgb(img) for img in precomputed]
    if config.strategy == "full":
        return [Image.new("RGB", img.size, (0, 0, 0)) for img in images]
    fill = "noise" if config.strategy == "noise" else "black"
    return [random_patch_mask(img, config.patch_size, config.prob, generator, fill) for img in images]
