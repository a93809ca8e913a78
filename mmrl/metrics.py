"""Sampling metrics for evaluation with ``n`` samples per item: pass@k, avg@k and majority@k.

Pure tensor functions: they run on whatever device the inputs are on, without loops over items or
samples and without host synchronisation apart from input validation.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_correct(correct: Tensor) -> Tensor:
    """``correct`` as a bool ``[N, n]`` tensor; bool or 0/1 numbers are accepted."""
    if correct.dim() != 2:
        raise ValueError(f"correct must be [N, n] (items x samples), got shape {tuple(correct.shape)}")
    if correct.shape[1] == 0:
        raise ValueError("correct has no samples per item (n = 0)")
    if correct.dtype != torch.bool:
        if not bool(((correct == 0) | (correct == 1)).all()):
            raise ValueError("correct must hold only 0/1 (or bool) values")
        correct = correct != 0
    return correct


def pass_at_k(correct: Tensor, k: int) -> Tensor:
    """Unbiased pass@k per item (Chen et al., 2021, "Evaluating Large Language Models Trained on Code"):
    ``1 - C(n - c, k) / C(n, k)`` with ``c`` correct out of ``n`` samples, the probability that at least
    one of ``k`` samples drawn without replacement is correct.

    ``correct``: ``[N, n]`` bool or 0/1. Returns ``[N]`` float (the default dtype). ``k`` must be in
    ``1..n``. The ratio is computed as ``prod_{i=n-c+1}^{n} (1 - k / i)``, which never forms a binomial
    (``C(100, 50)`` is ~1e29) and is exact up to rounding.
    """
    correct = _check_correct(correct)
    n = correct.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..n = 1..{n}, got {k}")
    dtype = torch.get_default_dtype()
    c = correct.sum(dim=1, keepdim=True)  # [N, 1]
    i = torch.arange(1, n + 1, device=correct.device, dtype=dtype)  # [n]
    # C(n-c, k) / C(n, k) = prod over i in (n-c, n] of (i - k) / i; a factor is 1 outside that range.
    # When n - c < k the range contains i = k, a zero factor: every draw of k holds a correct sample.
    factors = torch.where(i > n - c, 1.0 - k / i, torch.ones((), dtype=dtype, device=correct.device))
    all_wrong = factors.prod(dim=1)
    return torch.where(c.squeeze(1) > n - k, torch.ones_like(all_wrong), 1.0 - all_wrong)


def avg_at_k(correct: Tensor) -> Tensor:
    """avg@k per item: the mean correctness of its ``n`` samples. ``[N, n]`` -> ``[N]`` float."""
    return _check_correct(correct).to(torch.get_default_dtype()).mean(dim=1)


def majority_at_k(answers: Tensor, correct: Tensor) -> Tensor:
    """maj@k per item: whether the most frequent answer among the ``n`` samples is correct.

    ``answers``: ``[N, n]`` integer ids, equal ids for equal (graded-equivalent) answers, negative for
    "no answer", which never wins the vote. ``correct``: ``[N, n]`` correctness of each sample. A tie
    goes to the answer sampled first. An item whose samples all have no answer scores 0.
    Returns ``[N]`` float.
    """
    correct = _check_correct(correct)
    if answers.shape != correct.shape:
        raise ValueError(f"answers {tuple(answers.shape)} and correct {tuple(correct.shape)} differ in shape")
    if answers.dtype.is_floating_point or answers.dtype == torch.bool:
        raise ValueError(f"answers must be integer ids, got {answers.dtype}")
    # votes[b, j] = how many samples of item b gave sample j's answer: O(n^2) per item, fine for n <= ~1k.
    votes = (answers.unsqueeze(2) == answers.unsqueeze(1)).sum(dim=2)
    votes = torch.where(answers < 0, torch.zeros_like(votes), votes)
    winner = votes.argmax(dim=1, keepdim=True)  # argmax returns the first maximum: earliest sample wins
    has_vote = votes.amax(dim=1) > 0
    return (correct.gather(1, winner).squeeze(1) & has_vote).to(torch.get_default_dtype())
