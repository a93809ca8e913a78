"""PAPO image masking: statistics, determinism, PIL modes, edge patches, variants and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vision.masking import MaskingConfig, mask_images, mask_patches_grid, random_patch_mask


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def white(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height), (255, 255, 255))


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img)


def black_fraction(img: Image.Image) -> float:
    return float((pixels(img) == 0).all(axis=-1).mean())


# ---- statistics -------------------------------------------------------------------------------------


def test_grid_fraction_matches_prob():
    grid = mask_patches_grid(1400, 1400, 14, 0.6, gen(1))
    assert grid.shape == (100, 100) and grid.dtype == torch.bool
    assert abs(grid.float().mean().item() - 0.6) < 0.02


def test_pixel_fraction_matches_prob_on_white_image():
    out = random_patch_mask(white(1400, 1400), 14, 0.6, gen(2))
    assert out.size == (1400, 1400) and out.mode == "RGB"
    assert abs(black_fraction(out) - 0.6) < 0.02
    # Every pixel is either untouched white or black: no partial fills.
    arr = pixels(out)
    assert np.isin(arr, (0, 255)).all()


def test_pixels_follow_the_grid():
    out = pixels(random_patch_mask(white(70, 42), 14, 0.5, gen(3)))
    grid = mask_patches_grid(42, 70, 14, 0.5, gen(3)).numpy()
    for r in range(3):
        for c in range(5):
            block = out[r * 14:(r + 1) * 14, c * 14:(c + 1) * 14]
            assert (block == 0).all() if grid[r, c] else (block == 255).all()


# ---- determinism ------------------------------------------------------------------------------------


def test_same_generator_state_same_mask():
    img = white(140, 98)
    a = random_patch_mask(img, generator=gen(7))
    b = random_patch_mask(img, generator=gen(7))
    assert np.array_equal(pixels(a), pixels(b))
    assert torch.equal(mask_patches_grid(98, 140, 14, 0.6, gen(7)), mask_patches_grid(98, 140, 14, 0.6, gen(7)))


def test_mask_images_is_reproducible_from_the_generator_state():
    # One draw per prompt (its group shares it: tests/test_papo.py checks that on the policy); the same
    # generator state gives the same masks for every image of the prompt, another state other masks.
    imgs = [white(56, 56), white(84, 28)]
    cfg = MaskingConfig()
    masked = mask_images(imgs, cfg, gen(5))
    again = mask_images(imgs, cfg, gen(5))
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(masked, again))
    other = mask_images(imgs, cfg, gen(6))
    assert not all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(masked, other))


def test_successive_draws_differ():
    g = gen(11)
    img = white(280, 280)  # 400 patches: two identical draws would be a miracle
    step1 = pixels(random_patch_mask(img, generator=g))
    step2 = pixels(random_patch_mask(img, generator=g))
    assert not np.array_equal(step1, step2)


def test_input_unchanged():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 60, 3), dtype=np.uint8))
    before = pixels(img).copy()
    out = random_patch_mask(img, prob=1.0, generator=gen())
    assert out is not img
    assert np.array_equal(pixels(img), before)


# ---- modes and sizes --------------------------------------------------------------------------------


def test_grayscale_to_rgb():
    img = Image.new("L", (30, 20), 200)
    out = random_patch_mask(img, 10, 0.0, gen())
    assert out.mode == "RGB" and out.size == (30, 20)
    assert (pixels(out) == 200).all()


def test_rgba_transparent_becomes_white_before_masking():
    img = Image.new("RGBA", (28, 28), (0, 0, 0, 0))  # fully transparent black
    out = random_patch_mask(img, 14, 0.0, gen())
    assert out.mode == "RGB" and out.size == (28, 28)
    assert (pixels(out) == 255).all()
    masked = random_patch_mask(img, 14, 0.5, gen(4))
    grid = mask_patches_grid(28, 28, 14, 0.5, gen(4))
    # Black pixels only where a patch was masked; the rest is the white background.
    assert black_fraction(masked) == pytest.approx(grid.float().mean().item())


def test_palette_image():
    img = Image.new("P", (33, 17))
    img.putpalette([255, 0, 0] + [0, 0, 0] * 255)
    out = random_patch_mask(img, 14, 0.0, gen())
    assert out.mode == "RGB" and out.size == (33, 17)
    assert (pixels(out) == (255, 0, 0)).all()


def test_transparent_palette_composited_on_white():
    img = Image.new("P", (10, 10), 0)
    img.putpalette([0, 0, 0] * 256)
    img.info["transparency"] = 0
    assert (pixels(random_patch_mask(img, 14, 0.0, gen())) == 255).all()


def test_16bit_and_la_modes():
    i16 = Image.fromarray(np.full((12, 9), 65535, dtype=np.uint16))
    assert i16.mode.startswith("I;16") or i16.mode == "I"
    out = random_patch_mask(i16, 14, 0.0, gen())
    assert out.mode == "RGB" and out.size == (9, 12) and (pixels(out) == 255).all()
    la = Image.new("LA", (8, 8), (0, 0))
    assert (pixels(random_patch_mask(la, 14, 0.0, gen())) == 255).all()


def test_tiny_image_is_one_patch():
    img = white(5, 7)
    assert mask_patches_grid(7, 5, 14, 0.6, gen()).shape == (1, 1)
    out = random_patch_mask(img, prob=1.0, generator=gen())
    assert out.mode == "RGB" and out.size == (5, 7) and (pixels(out) == 0).all()


def test_partial_edge_patches_covered():
    # 30x20 with 14-px patches: 2 rows x 3 cols, last row 6 px tall, last column 2 px wide.
    assert mask_patches_grid(20, 30, 14, 0.6, gen()).shape == (2, 3)
    out = pixels(random_patch_mask(white(30, 20), 14, 1.0, gen()))
    assert out.shape == (20, 30, 3) and (out == 0).all()


def test_prob_zero_identical_and_prob_one_black():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 45, 3), dtype=np.uint8))
    assert np.array_equal(pixels(random_patch_mask(img, prob=0.0, generator=gen())), pixels(img))
    assert (pixels(random_patch_mask(img, prob=1.0, generator=gen())) == 0).all()


# ---- noise fill ------------------------------------------------------------------------------------


def test_noise_fill_statistics():
    img = white(280, 280)
    out = pixels(random_patch_mask(img, 14, 0.6, gen(9), fill="noise")).astype(np.float64)
    grid = mask_patches_grid(280, 280, 14, 0.6, gen(9)).numpy()
    mask = grid.repeat(14, 0).repeat(14, 1)
    masked, kept = out[mask], out[~mask]
    assert (kept == 255).all()
    assert abs(masked.mean() - 127.5) < 2.0
    assert 55 < masked.std() < 70  # clipping trims the tails a little below 64
    assert masked.min() >= 0 and masked.max() <= 255 and len(np.unique(masked)) > 100


def test_noise_strategy_deterministic():
    cfg = MaskingConfig(strategy="noise")
    a = mask_images([white(56, 42)], cfg, gen(3))[0]
    b = mask_images([white(56, 42)], cfg, gen(3))[0]
    assert np.array_equal(pixels(a), pixels(b))


# ---- strategies -------------------------------------------------------------------------------------


def test_full_strategy_all_black():
    imgs = [white(20, 30), Image.new("L", (7, 5), 9)]
    out = mask_images(imgs, MaskingConfig(strategy="full"), gen())
    assert [o.size for o in out] == [(20, 30), (7, 5)]
    assert all(o.mode == "RGB" and (pixels(o) == 0).all() for o in out)


def test_column_strategy_returns_precomputed():
    pre = [Image.new("RGB", (10, 10), (1, 2, 3))]
    out = mask_images([white(10, 10)], MaskingConfig(strategy="column"), gen(), precomputed=pre)
    assert len(out) == 1 and (pixels(out[0]) == (1, 2, 3)).all()


def test_column_strategy_length_mismatch():
    cfg = MaskingConfig(strategy="column", column="sem_masks")
    with pytest.raises(ValueError, match="sem_masks.*got 1 for 2"):
        mask_images([white(4, 4), white(4, 4)], cfg, gen(), precomputed=[white(4, 4)])
    with pytest.raises(ValueError, match="sem_masks"):
        mask_images([white(4, 4)], cfg, gen(), precomputed=None)


def test_column_strategy_rejects_paths():
    with pytest.raises(TypeError, match="PIL"):
        mask_images([white(4, 4)], MaskingConfig(strategy="column"), gen(), precomputed=["a.png"])


# ---- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("prob", [-0.1, 1.5, float("nan")])
def test_bad_prob(prob):
    with pytest.raises(ValueError, match=r"prob.*\[0, 1\]"):
        random_patch_mask(white(4, 4), prob=prob)
    with pytest.raises(ValueError, match="prob"):
        MaskingConfig(prob=prob)


@pytest.mark.parametrize("patch_size", [0, -3, 2.5])
def test_bad_patch_size(patch_size):
    with pytest.raises(ValueError, match="patch_size.*>= 1"):
        random_patch_mask(white(4, 4), patch_size=patch_size)
    with pytest.raises(ValueError, match="patch_size"):
        MaskingConfig(patch_size=patch_size)


def test_bad_strategy_lists_valid_ones():
    with pytest.raises(ValueError, match="strategy.*random_patch.*full.*noise.*column"):
        MaskingConfig(strategy="semantic")


def test_bad_fill():
    with pytest.raises(ValueError, match="fill"):
        random_patch_mask(white(4, 4), fill="grey")
