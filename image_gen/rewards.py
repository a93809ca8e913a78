"""Rule rewards on decoded images for procedural prompts (:mod:`image_gen.prompts`), plus a CLIP score.

Importing this module registers (see :func:`mmrl.rewards.register_reward`):

* ``"colour_fraction"`` — are the spec's colours present in a plausible amount, and nothing else?
* ``"object_count"`` — connected components per spec colour versus the spec count;
* ``"relative_position"`` — centroids of the two objects' colour masks satisfy the spec relation;
* ``"object_shape"`` — each component's fill ratio (area / bounding box) matches the spec shape;
* ``"geneval_rules"`` — the mean of the applicable rules above;

and the model-backed reward factories (:func:`mmrl.rewards.register_reward_factory`; a config passes
``args``) ``"clip_score"`` and ``"clip_score_quantized"`` (AR-GRPO's step map).

Signature (TRL): ``fn(prompts, completions, spec=[...], **columns) -> list[float | None]`` where each
completion is a PIL image or a float tensor ``[3, H, W]`` in ``[0, 1]`` (numpy ``HxWx3`` uint8 works too).

Pixels are classified to the *nearest* palette entry (the spec palette plus white and black) if within
:data:`COLOUR_TOLERANCE` (Euclidean RGB distance, 0–255 scale), so colour masks never overlap.

Missing values: ``None`` only where the rule has no opinion — spec ``None``, a rule that does not apply
(``relative_position`` without a relation) or an empty image. A spec object that is absent from the
image is a *failure* scoring 0.0, not a missing value: an undefined centroid or an empty mask must not let
the policy escape the reward by drawing nothing. No function ever returns NaN.

Time limits: the model-backed rewards (CLIP here, :mod:`image_gen.judge`, :mod:`image_gen.hps`) are plain
callables run by :func:`mmrl.rewards.compute_rewards`, in training (``reward_timeout``) and in evaluation
alike, so each call is bounded by its per-call timeout (300 s unless configured); :func:`dry_run` bounds the
start-up check the same way. A call that times out cannot be killed: it finishes on its daemon thread while
the reward counts as missing, and the reward is skipped until it returns.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from image_gen.prompts import PALETTE
from mmrl.rewards import (
    DEFAULT_REWARD_TIMEOUT_S,
    RewardTimeout,
    call_with_timeout,
    get_reward,
    register_reward,
    register_reward_factory,
    reward_name,
)

COLOUR_TOLERANCE = 80.0
MIN_FRACTION_PER_OBJECT = 0.01  # below this an object is "barely there"
MAX_FRACTION_PER_OBJECT = 0.25  # above this the colour floods the image
COUNT_DECAY = 0.5  # object_count = COUNT_DECAY ** |found - expected|
# Fill ratio of a component in its bounding box: square ~1.0, disc ~0.785, triangle ~0.5.
SHAPE_THRESHOLDS = (0.66, 0.89)

_NAMES = [*PALETTE, "white", "black"]
_RGB = np.array([*PALETTE.values(), (255, 255, 255), (0, 0, 0)], dtype=np.float32)


def to_rgb_array(image: Any) -> np.ndarray:
    """``HxWx3`` uint8 from a PIL image, a ``[3,H,W]`` float tensor in [0,1], or an ``HxWx3`` array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.ndim != 3 or t.shape[0] != 3:
            raise ValueError(f"expected a [3,H,W] tensor, got shape {tuple(t.shape)}")
        return (t.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {arr.shape}")
    return (
        arr.astype(np.uint8) if arr.dtype == np.uint8 else (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    )


def classify_pixels(image: Any, tolerance: float = COLOUR_TOLERANCE) -> np.ndarray:
    """``HxW`` int map: index into ``[*PALETTE, "white", "black"]``, or -1 (no entry within tolerance)."""
    rgb = to_rgb_array(image).astype(np.float32)
    dist = np.linalg.norm(rgb[:, :, None, :] - _RGB[None, None], axis=-1)
    nearest = dist.argmin(-1)
    return np.where(dist.min(-1) <= tolerance, nearest, -1)


def colour_mask(labels: np.ndarray, colour: str) -> np.ndarray:
    return labels == _NAMES.index(colour)


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected labelling: returns ``(labels, n)`` with labels 1..n on the mask and 0 elsewhere.

    Vectorised min-label propagation with pointer jumping (``label = label[label]``), so the number of
    passes grows with the log of component diameter rather than pixel count; no scipy needed.
    """
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    big = h * w
    lab = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        prev = lab
        m = lab.copy()
        m[1:, :] = np.minimum(m[1:, :], lab[:-1, :])
        m[:-1, :] = np.minimum(m[:-1, :], lab[1:, :])
        m[:, 1:] = np.minimum(m[:, 1:], lab[:, :-1])
        m[:, :-1] = np.minimum(m[:, :-1], lab[:, 1:])
        m = np.where(mask, m, big)
        flat = np.append(m.ravel(), big)  # index ``big`` maps to itself
        for _ in range(4):
            flat = flat[flat]
        lab = flat[:-1].reshape(h, w)
        if np.array_equal(lab, prev):
            break
    roots, dense = np.unique(lab[mask], return_inverse=True)
    out = np.zeros((h, w), dtype=np.int64)
    out[mask] = dense + 1
    return out, len(roots)


def default_min_pixels(h: int, w: int) -> int:
    """Components smaller than this are noise: 4 px at 32x32, 16 px at 64x64."""
    return max(4, (h * w) // 256)


def components(mask: np.ndarray, min_pixels: int | None = None) -> list[np.ndarray]:
    """Boolean masks of the 4-connected components with at least ``min_pixels`` pixels."""
    labels, n = connected_components(mask)
    if min_pixels is None:
        min_pixels = default_min_pixels(*mask.shape)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    return [labels == i for i in range(1, n + 1) if sizes[i] >= min_pixels]


def shape_of(component: np.ndarray) -> str:
    """Classify a component by its fill ratio in its bounding box (scale-free, cheap, robust on flat art)."""
    ys, xs = np.nonzero(component)
    fill = len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    lo, hi = SHAPE_THRESHOLDS
    return "triangle" if fill < lo else "circle" if fill < hi else "square"


def _expected_counts(spec: dict[str, Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in spec["objects"]:
        counts[o["colour"]] = counts.get(o["colour"], 0) + int(o.get("count", 1))
    return counts


# --- per-image rules (float, or None when the rule does not apply) ----------------------------------


def _colour_fraction(labels: np.ndarray, spec: dict[str, Any]) -> float | None:
    """Mean over spec colours of an in-range score for the colour's area, times purity.

    Area score: 1 inside ``[MIN, MAX] * count`` of the image, ``f / lo`` below (linear to 0 at no pixels),
    linear down to 0 at a fully flooded image above. Purity: spec-colour pixels over all non-white pixels
    (1 when there are none, since the area score is then already 0). Monotone in each failure mode.
    """
    total = labels.size
    if total == 0:
        return None
    scores = []
    spec_pixels = 0
    for colour, k in _expected_counts(spec).items():
        n = int(colour_mask(labels, colour).sum())
        spec_pixels += n
        f, lo, hi = n / total, MIN_FRACTION_PER_OBJECT * k, min(0.9, MAX_FRACTION_PER_OBJECT * k)
        scores.append(f / lo if f < lo else 1.0 if f <= hi else max(0.0, 1.0 - (f - hi) / (1.0 - hi)))
    foreground = int((labels != _NAMES.index("white")).sum())
    purity = spec_pixels / foreground if foreground else 1.0
    return float(np.mean(scores)) * purity


def _object_count(labels: np.ndarray, spec: dict[str, Any], min_pixels: int | None) -> float | None:
    if labels.size == 0:
        return None
    scores = [
        COUNT_DECAY ** abs(len(components(colour_mask(labels, colour), min_pixels)) - k)
        for colour, k in _expected_counts(spec).items()
    ]
    return float(np.mean(scores))


def _relative_position(labels: np.ndarray, spec: dict[str, Any]) -> float | None:
    rel = spec.get("relation")
    if rel is None or len(spec["objects"]) != 2 or labels.size == 0:
        return None
    centres = []
    for o in spec["objects"]:
        ys, xs = np.nonzero(colour_mask(labels, o["colour"]))
        if len(xs) == 0:
            return 0.0  # object absent: the relation fails (see module docstring)
        centres.append((xs.mean(), ys.mean()))
    (ax, ay), (bx, by) = centres
    ok = {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[rel]
    return float(ok)


def _object_shape(labels: np.ndarray, spec: dict[str, Any], min_pixels: int | None) -> float | None:
    """Per spec object, the fraction of its colour's components with the right shape (0 if none)."""
    if labels.size == 0:
        return None
    scores = []
    for o in spec["objects"]:
        comps = components(colour_mask(labels, o["colour"]), min_pixels)
        scores.append(sum(shape_of(c) == o["shape"] for c in comps) / len(comps) if comps else 0.0)
    return float(np.mean(scores))


def _batched(rule: Callable[..., float | None]) -> Callable[..., list[float | None]]:
    def fn(prompts: Sequence[Any], completions: Sequence[Any], spec: Sequence[Any] | None = None, **kw: Any):
        specs = spec if spec is not None else [None] * len(completions)
        if len(specs) != len(completions):
            raise ValueError(f"{len(specs)} specs for {len(completions)} completions")
        out: list[float | None] = []
        for image, s in zip(completions, specs):
            value = None if s is None else rule(classify_pixels(image), s, **kw)
            out.append(None if value is None or math.isnan(value) else float(value))
        return out

    fn.__name__ = rule.__name__.lstrip("_")
    fn.__doc__ = rule.__doc__
    return fn


def _with_min_pixels(rule: Callable[..., float | None]) -> Callable[..., float | None]:
    def inner(labels: np.ndarray, spec: dict[str, Any], min_pixels: int | None = None, **_: Any):
        return rule(labels, spec, min_pixels)

    inner.__name__ = rule.__name__
    inner.__doc__ = rule.__doc__
    return inner


def _ignore_kw(rule: Callable[..., float | None]) -> Callable[..., float | None]:
    def inner(labels: np.ndarray, spec: dict[str, Any], **_: Any):
        return rule(labels, spec)

    inner.__name__ = rule.__name__
    inner.__doc__ = rule.__doc__
    return inner


def _geneval_rules(labels: np.ndarray, spec: dict[str, Any], min_pixels: int | None = None, **_: Any):
    """Mean of the applicable rules: everything the spec says, in one number."""
    values = [
        _colour_fraction(labels, spec),
        _object_count(labels, spec, min_pixels),
        _relative_position(labels, spec),
        _object_shape(labels, spec, min_pixels),
    ]
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


colour_fraction = register_reward("colour_fraction")(_batched(_ignore_kw(_colour_fraction)))
object_count = register_reward("object_count")(_batched(_with_min_pixels(_object_count)))
relative_position = register_reward("relative_position")(_batched(_ignore_kw(_relative_position)))
object_shape = register_reward("object_shape")(_batched(_with_min_pixels(_object_shape)))
geneval_rules = register_reward("geneval_rules")(_batched(_geneval_rules))


# --- CLIP score --------------------------------------------------------------------------------------


def to_pil(image: Any) -> Image.Image:
    """PIL RGB view of any accepted completion type (CLIP's processor wants PIL / HWC arrays)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return Image.fromarray(to_rgb_array(image))


#: AR-GRPO's quantised CLIP reward: cosine similarity below 0 / in [0, 0.3) / [0.3, 0.6) / from 0.6 up maps to
#: -1 / 0.5 / 1.0 / 1.5 (``discrete_reward_map(score, [0, 0.3, 0.6, 1], [-1, 0.5, 1, 1.5])`` in the AR-GRPO
#: code's ``img_gen_grpo_rewards.py``; read in a public fork of Kwai-Klear/AR-GRPO). Coarse buckets stop
#: GRPO from blowing CLIP's tiny, noisy differences between near-identical samples up into full advantages.
AR_GRPO_CLIP_THRESHOLDS = (0.0, 0.3, 0.6)
AR_GRPO_CLIP_LEVELS = (-1.0, 0.5, 1.0, 1.5)
DEFAULT_CLIP = "openai/clip-vit-base-patch32"  # AR-GRPO's CLIP


def quantise_clip(scores: torch.Tensor, thresholds: Sequence[float] = AR_GRPO_CLIP_THRESHOLDS,
                  levels: Sequence[float] = AR_GRPO_CLIP_LEVELS) -> torch.Tensor:
    """Step function: ``levels[i]`` for scores in [thresholds[i-1], thresholds[i]) (``levels[0]`` below the
    first threshold, ``levels[-1]`` from the last one up)."""
    if len(levels) != len(thresholds) + 1:
        raise ValueError(f"{len(thresholds)} thresholds need {len(thresholds) + 1} levels, got {len(levels)}")
    edges = torch.tensor(thresholds, dtype=scores.dtype, device=scores.device)
    values = torch.tensor(levels, dtype=scores.dtype, device=scores.device)
    return values[torch.bucketize(scores, edges, right=True)]


class CLIPReward:
    """Cosine similarity between CLIP's image and text embeddings, one value per (prompt, image) pair.

    Registered as the reward factory ``clip_score`` (and ``clip_score_quantized``): in a config,
    ``{name: clip_score, args: {model: PATH_OR_ID}}``. The model is a local directory or a hub id already
    in the local cache; nothing else is downloaded. ``quantize=True`` applies AR-GRPO's step map
    (:func:`quantise_clip`). The raw score is the plain cosine (AR-GRPO scales it by 5: a reward weight of
    5 reproduces that; group-normalised advantages do not change with the scale).
    """

    def __init__(self, model_name_or_path: str = DEFAULT_CLIP, device: str | torch.device | None = None,
                 quantize: bool = False) -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = CLIPModel.from_pretrained(model_name_or_path).to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(model_name_or_path)
        self.quantize = quantize
        self.__name__ = "clip_score_quantized" if quantize else "clip_score"

    @torch.no_grad()
    def similarity(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Row-wise cosine similarity ``[B]`` from pre-tokenised text and preprocessed pixels."""
        out = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=None if attention_mask is None else attention_mask.to(self.device),
            pixel_values=pixel_values.to(self.device, self.model.dtype),
        )
        text = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
        image = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
        return (text * image).sum(-1).clamp(-1.0, 1.0)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float | None]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        if not completions:
            return []
        max_len = self.model.config.text_config.max_position_embeddings
        batch = self.processor(
            text=[str(p) for p in prompts],
            images=[to_pil(c) for c in completions],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_len,
        )
        scores = self.similarity(batch["input_ids"], batch["pixel_values"], batch.get("attention_mask"))
        if self.quantize:
            scores = quantise_clip(scores)
        return [None if math.isnan(v) else float(v) for v in scores.tolist()]


@register_reward_factory("clip_score")
def clip_score(model: str = DEFAULT_CLIP, device: str | None = None) -> CLIPReward:
    """Config: ``{name: clip_score, args: {model: PATH_OR_ID}}`` — raw CLIP cosine similarity."""
    return CLIPReward(model, device, quantize=False)


@register_reward_factory("clip_score_quantized")
def clip_score_quantized(model: str = DEFAULT_CLIP, device: str | None = None) -> CLIPReward:
    """Config: ``{name: clip_score_quantized, args: {model: PATH_OR_ID}}`` — AR-GRPO's quantised CLIP reward."""
    return CLIPReward(model, device, quantize=True)


# --- start-up check ----------------------------------------------------------------------------------


def dry_run(
    reward_fns: Sequence[str | Callable[..., list]], prompt: str, image: Any, spec: dict[str, Any] | None,
    timeout: float | None = DEFAULT_REWARD_TIMEOUT_S,
) -> dict[str, float | None]:
    """Call each reward on one image; raise naming the reward if it fails, takes longer than ``timeout``
    seconds (``None``: no limit) or returns a malformed result (not one value, not a number, ±inf).

    Meant for start-up: a broken reward otherwise only shows up as "missing" in the middle of training.
    Returns ``{name: value}`` (NaN, like ``None``, is a legitimate "no opinion").
    """
    results: dict[str, float | None] = {}
    for ref in reward_fns:
        fn = get_reward(ref)
        name = ref if isinstance(ref, str) else reward_name(fn)
        try:
            out = call_with_timeout(fn, timeout, ([prompt], [image]), {"spec": [spec]})
        except RewardTimeout as exc:
            raise RuntimeError(f"reward {name!r} did not finish on the dry-run image: {exc}") from exc
        except Exception as exc:
            raise RuntimeError(f"reward {name!r} raised on the dry-run image: {exc!r}") from exc
        if not isinstance(out, (list, tuple)) or len(out) != 1:
            raise RuntimeError(f"reward {name!r} must return a list of 1 value for 1 completion, got {out!r}")
        value = out[0]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float, np.number))):
            raise RuntimeError(f"reward {name!r} returned a non-numeric value {value!r}")
        if value is not None and math.isinf(float(value)):
            raise RuntimeError(f"reward {name!r} returned {value!r} on the dry-run image; "
                               "rewards must be finite")
        results[name] = None if value is None else float(value)
    return results
