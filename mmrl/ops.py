"""Memory-aware tensor operations shared by the policies.

The log-prob of a completion needs the vocabulary-sized logits, ``[B, T, V]``. For a 150k-token
vocabulary and a few thousand tokens that tensor is the largest thing in the step, and fp32 softmax
doubles it. :func:`token_logprobs` projects the final hidden states to logits a slice of rows at a
time, in fp32, gathers the needed entries, and (when gradients are on) re-computes each slice in the
backward pass instead of keeping it — so at most one slice of fp32 logits exists at any moment.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

Tensor = torch.Tensor


def _slice_logprobs(
    hidden: Tensor, targets: Tensor, head: Callable[[Tensor], Tensor], temperature: float, want_entropy: bool | str
) -> tuple[Tensor, Tensor]:
    logits = head(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    log_z = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_z
    if want_entropy:
        # H = log Z − Σ p·logit from the full distribution. As a monitor it carries no gradient and costs no
        # backward; an entropy bonus asks for it with gradient (want_entropy="grad").
        with contextlib.nullcontext() if want_entropy == "grad" else torch.no_grad():
            entropy = log_z - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    else:
        entropy = torch.zeros_like(logp)
    return logp, entropy


def token_logprobs(
    hidden: Tensor,
    targets: Tensor,
    head: Callable[[Tensor], Tensor],
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool | str = False,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs (and optionally entropies) of ``targets`` under ``head(hidden)``.

    ``with_entropy``: ``True`` — full-distribution entropies without gradient (a monitor); ``"grad"`` — with
    gradient (an entropy bonus in the loss).

    ``hidden`` ``[B, T, H]`` are the states that *predict* ``targets`` ``[B, T]`` (already shifted by
    the caller). Rows are processed ``chunk_size`` tokens at a time. Returns fp32 ``[B, T]`` tensors.
    """
    batch, length, width = hidden.shape
    flat_hidden = hidden.reshape(batch * length, width)
    flat_targets = targets.reshape(batch * length)
    use_checkpoint = torch.is_grad_enabled() and hidden.requires_grad
    logps, entropies = [], []
    for start in range(0, flat_hidden.shape[0], chunk_size):
        h = flat_hidden[start : start + chunk_size]
        t = flat_targets[start : start + chunk_size]
        if use_checkpoint:
            logp, ent = checkpoint(_slice_logprobs, h, t, head, temperature, with_entropy, use_reentrant=False)
        else:
            logp, ent = _slice_logprobs(h, t, head, temperature, with_entropy)
        logps.append(logp)
        entropies.append(ent)
    logp = torch.cat(logps).view(batch, length)
    entropy = torch.cat(entropies).view(batch, length) if with_entropy else None
    return logp, entropy
