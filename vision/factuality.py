"""Long-form factuality reward (after Chen et al., 2025, "Learning to Reason for Factuality").

For a description ``y`` with claims ``C(y)`` of which ``S(y)`` are supported::

    reward = w_p * precision + lambda_detail * log(1 + |S(y)|) + w_r * relevance
    precision = |S(y)| / |C(y)|          (0 when y makes no claim)

The paper's point, reproduced by ``configs/vision/describe_scene_tiny.yaml``: optimising precision alone is
hacked by saying less (one safe claim scores 1.0), so the detail term pays for every *additional* supported
claim, on a log scale so that it cannot outweigh precision (one false claim among ``n`` costs ``w_p / (n+1)``
of precision, one more true claim gains only ``lambda_detail * log((n+2)/(n+1))``); the relevance term pays
for naming the image's objects (object coverage, :func:`vision.claims.scene_relevance`). Generic claims
("there is a shape") are no claims at all (:mod:`vision.claims`), so they earn neither precision nor detail.

Defaults: ``w_p = 1``, ``lambda_detail = 0.1``, ``w_r = 0.1``. The paper weighs precision, detail and a
judge's relevance score the same way but we could not check its exact lambda / mu offline, so these are
our values: with the 1-4 objects of ``describe_scene`` a full description has 3-9 distinct claims; adding
a false claim to ``n`` true ones costs ``1/(n+1)`` (at least 0.1 up to n = 9), adding a true one earns
``0.1 * log((n+2)/(n+1))`` (at most 0.07), so hallucinating never pays, while the full description
(1 + 0.1 * log 10 + 0.1 for 9 claims) still beats "There is a red circle." (1 + 0.1 * log 2 + 0.1 / n)
— under precision alone the two tie at 1.0. Override them in ``args``. That argument holds for a policy that
is already nearly right; one whose precision is low gains most by dropping claims, and on the tiny model
0.1 did not stop that collapse while 0.5 kept the claims on 2 of 3 seeds over 100 steps (README, measured
tables; ``describe_scene_tiny.yaml`` uses 0.5).

No claims: precision 0, not missing. A refusal or an empty answer must not be rewarded (the paper's
concern is exactly this collapse), and a missing value would make it neutral instead of the worst in its
group; every component is >= 0, so it scores the minimum, 0.

Verifiers (``verifier`` arg): ``"scene"`` — :class:`vision.claims.SceneGraphVerifier`, exact, against the
row's ``scene`` column (rows without one are missing); ``"judge"`` — :class:`vision.judge.ModelJudgeVerifier`
with the model ``judge`` (hub id, local directory or ``tiny-qwen2.5-vl``), the image re-drawn from the
scene. A judge's unusable reply makes that completion's reward None; a judge that raises or times out
takes out the batch (compute_rewards counts both as missing rewards; training goes on).

Registered factories, one design for logging: the trainer logs each reward *function* as
``rewards/<name>/mean`` (:class:`mmrl.rewards.RewardOutput` has one column per function and no side
channel), so each component is also its own reward, and the config's weights are ``w_p``, ``lambda_detail``
and ``w_r``; the three share one verifier and one verification per batch, so listing all three costs one
verification. ``factuality`` is the combined value in one function (for ``eval.reward``, or one column).

* ``factuality`` — the formula above (args: the weights, plus the verifier args);
* ``factuality_precision`` / ``factuality_detail`` / ``factuality_relevance`` — one unweighted component;
* ``factuality_claims`` / ``factuality_supported`` — the number of claims / of supported claims (log them
  with weight 0; they are not rewards: the mean of ``factuality_detail`` is no count).
"""

from __future__ import annotations

import functools
import json
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

from mmrl.rewards import register_reward_factory
from vision.claims import SceneGraphVerifier, Verdict, Verifier
from vision.describe_scene import render_scene
from vision.rewards import completion_text

VERIFIERS = ("scene", "judge")
PRECISION_WEIGHT, DETAIL_WEIGHT, RELEVANCE_WEIGHT = 1.0, 0.1, 0.1


def precision(verdict: Verdict) -> float:
    """Supported / claims; 0 for a description without claims (see the module docstring)."""
    return verdict.num_supported / verdict.num_claims if verdict.num_claims else 0.0


def detail(verdict: Verdict) -> float:
    """log(1 + number of supported claims)."""
    return math.log1p(verdict.num_supported)


def combine(verdict: Verdict, precision_weight: float = PRECISION_WEIGHT, detail_weight: float = DETAIL_WEIGHT,
            relevance_weight: float = RELEVANCE_WEIGHT) -> float:
    """``w_p * precision + lambda_detail * detail + w_r * relevance`` of one verdict."""
    return (precision_weight * precision(verdict) + detail_weight * detail(verdict)
            + relevance_weight * verdict.relevance)


class FactualityScorer:
    """Verdicts for a batch of completions, shared by the component rewards: the last batch's verdicts are
    kept, so the second and third component of a step reuse the first one's verification, and a lock keeps
    two verifications (two judge calls) from running at once."""

    def __init__(self, verifier: Verifier, image_size: int = 112):
        self.verifier, self.image_size = verifier, image_size
        self._lock = threading.Lock()
        self._last: tuple[Any, list[Verdict | None]] | None = None

    def _image(self, scene: Any) -> Image.Image | None:
        if isinstance(self.verifier, SceneGraphVerifier) or not isinstance(scene, dict) or "objects" not in scene:
            return None  # the scene verifier needs no pixels; a row without a scene has none to draw
        return render_scene(scene, self.image_size)

    def verdicts(self, completions: Sequence[Any], scenes: Sequence[Any]) -> list[Verdict | None]:
        texts = [completion_text(c) for c in completions]
        scenes = list(scenes) if scenes is not None else [None] * len(texts)
        key = (tuple(texts), json.dumps(scenes, sort_keys=True, default=str))
        with self._lock:
            if self._last is not None and self._last[0] == key:
                return self._last[1]
            found = self.verifier.verify(texts, scenes, [self._image(s) for s in scenes])
            self._last = (key, found)
            return found


@functools.lru_cache(maxsize=16)
def _scorer(verifier: str, judge: Any, image_size: int, judge_batch_size: int, judge_max_new_tokens: int,
            judge_timeout_s: float | None) -> FactualityScorer:
    # One scorer per verifier configuration, so the component rewards built with equal args share it.
    if verifier not in VERIFIERS:
        raise ValueError(f"unknown verifier {verifier!r}; valid: {list(VERIFIERS)}")
    if verifier == "scene":
        return FactualityScorer(SceneGraphVerifier(), image_size)
    if judge is None:
        raise ValueError("verifier='judge' needs judge: a model (hub id, directory or tiny-qwen2.5-vl)")
    from vision.judge import ModelJudgeVerifier  # lazy: loads transformers models only when asked

    return FactualityScorer(ModelJudgeVerifier(judge, judge_batch_size, judge_max_new_tokens, judge_timeout_s),
                            image_size)


def _reward(name: str, value: Callable[[Verdict], float], scorer: FactualityScorer) -> Callable[..., list]:
    def reward(prompts: list, completions: list, scene: Sequence[Any] | None = None, **kwargs: Any) -> list:
        return [None if v is None else value(v) for v in scorer.verdicts(completions, scene)]

    reward.__name__ = name
    return reward


@register_reward_factory("factuality")
def factuality(precision_weight: float = PRECISION_WEIGHT, detail_weight: float = DETAIL_WEIGHT,
               relevance_weight: float = RELEVANCE_WEIGHT, verifier: str = "scene", judge: Any = None,
               image_size: int = 112, judge_batch_size: int = 8, judge_max_new_tokens: int = 128,
               judge_timeout_s: float | None = None) -> Callable[..., list]:
    """``w_p * precision + lambda_detail * log(1 + supported) + w_r * relevance`` per completion."""
    scorer = _scorer(verifier, judge, image_size, judge_batch_size, judge_max_new_tokens, judge_timeout_s)
    return _reward("factuality", lambda v: combine(v, precision_weight, detail_weight, relevance_weight), scorer)


def _component(name: str, value: Callable[[Verdict], float]) -> None:
    def factory(verifier: str = "scene", judge: Any = None, image_size: int = 112, judge_batch_size: int = 8,
                judge_max_new_tokens: int = 128, judge_timeout_s: float | None = None) -> Callable[..., list]:
        scorer = _scorer(verifier, judge, image_size, judge_batch_size, judge_max_new_tokens,
                                  judge_timeout_s)
        return _reward(name, value, scorer)

    factory.__name__ = name
    factory.__doc__ = f"The ``{name}`` component alone (unweighted); args select the verifier."
    register_reward_factory(name)(factory)


_component("factuality_precision", precision)
_component("factuality_detail", detail)
_component("factuality_relevance", lambda v: v.relevance)
_component("factuality_claims", lambda v: float(v.num_claims))
_component("factuality_supported", lambda v: float(v.num_supported))
