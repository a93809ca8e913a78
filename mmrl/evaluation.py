"""Held-out evaluation of a policy: one completion per record, scored by one reward.

Kept apart from the trainer so that scripts and the benchmarks can evaluate a model without building one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from mmrl.data import BadSample
from mmrl.policy import Policy, Sampling
from mmrl.processes import process_state
from mmrl.rewards import DEFAULT_REWARD_TIMEOUT_S, RewardFaults, compute_rewards, get_reward

logger = logging.getLogger(__name__)


def evaluate_policy(policy: Policy, model: torch.nn.Module, dataset: Sequence[dict], reward: str | Callable,
                    sampling: Sampling, batch_size: int = 32, max_samples: int | None = None,
                    show_progress: bool = True,
                    reward_timeout: float | None = DEFAULT_REWARD_TIMEOUT_S) -> dict[str, float]:
    """Mean of ``reward`` over one completion per record of ``dataset``, sampled with ``sampling``
    (``temperature=0`` for greedy). A record that fails to load counts as wrong and is reported.

    With several processes (``accelerate launch``) each evaluates every N-th record and the scores are
    gathered with accelerate's ``gather_object``, so all processes return the same numbers."""
    fn = get_reward(reward)
    n = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    state = process_state()
    mine = list(range(state.process_index, n, state.num_processes))
    scores: list[float] = []
    errors = 0
    faults = RewardFaults()  # one warning per kind of missing score for the whole evaluation
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, len(mine), batch_size), desc="eval", leave=False,
                      disable=not show_progress or not state.is_main_process):
        records = []
        for i in mine[start:start + batch_size]:
            try:
                records.append(dataset[i])
            except BadSample as exc:
                errors += 1
                logger.warning("evaluation sample %d could not be loaded: %s", i, exc)
        if not records:
            continue
        rollout = policy.generate(model, records, 1, sampling)
        out = compute_rewards([fn], [1.0], rollout.prompts, policy.decode(rollout), rollout.columns,
                              timeout=reward_timeout, faults=faults)
        scores.extend(out.per_function[:, 0].tolist())
    model.train(was_training)
    if state.num_processes > 1:
        scores = gather_object(scores)
        errors = sum(gather_object([errors]))
    missing = sum(1 for s in scores if math.isnan(s))
    total = len(scores) + errors
    correct = sum(s for s in scores if not math.isnan(s))
    return {"accuracy": correct / total if total else float("nan"), "num_samples": float(total),
            "missing": float(missing), "load_errors": float(errors)}
