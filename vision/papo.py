"""PAPO for vision-language models (Wang et al., 2025, "Perception-Aware Policy Optimization for
Multimodal Reasoning"): the public entry points of the vision side.

PAPO is not a second trainer: it is the ``papo:`` section of the one trainer's config (``papo.enabled``,
γ and its schedule, the estimator, the double-entropy weights), plus a ``masking:`` section saying how the
counterfactual images are made. The pieces:

- :func:`perception_kl` — the per-token KL estimate between the policy given the real image and given the
  masked one (k3 by default, clamps as in the official code). It lives in :mod:`mmrl.algorithms` because the
  trainer needs it and ``mmrl`` never imports ``vision``; it is re-exported here under the name users expect.
- :func:`vision.masking.random_patch_mask` and :class:`vision.masking.MaskingConfig` — the masks.
- :meth:`vision.policy.VisionPolicy.masked_view` — the rollout re-conditioned on masked images.
- Presets ``papo_grpo`` / ``papo_dapo`` (``preset: papo_grpo`` in a YAML config) with the paper's settings.
"""

from mmrl.algorithms import perception_kl, scheduled_weight
from mmrl.perception import CollapseMonitor, perception_term
from vision.masking import MaskingConfig, mask_images, random_patch_mask

__all__ = ["CollapseMonitor", "MaskingConfig", "mask_images", "perception_kl", "perception_term",
           "random_patch_mask", "scheduled_weight"]
