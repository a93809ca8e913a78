"""Classifier-free-guided sampling of image tokens, with and without a KV cache.

Each step runs the batch twice — ``[cond; uncond]`` stacked into one forward — and samples from the
guided logits ``u + s·(c − u)`` (Ho & Salimans; LlamaGen and AR-GRPO use s = 2.0 in RL rollouts). Guidance
can be limited to an interval of the token sequence (``cfg_interval``, fractions of the tokens): outside
it the scale is 1, i.e. plain conditional sampling.

On request the sampler also returns, for every sampled token, its log-prob under the distribution it was
actually drawn from — guided, tempered, top-k/top-p filtered (:func:`sample_next`). That is π_sampler of
the rollout/training mismatch corrections (TIS/MIS, :func:`mmrl.objectives.mismatch_weights`): with
``logprob_mode: cond`` the trainer's π_old is the *conditional* distribution, so π_old/π_sampler ≠ 1 even
without filtering, and filtering makes the two differ in ``cfg`` mode too.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mmrl.ops import token_logprobs

Tensor = torch.Tensor


def cfg_logits(cond: Tensor, uncond: Tensor, scale: float | Tensor) -> Tensor:
    """Classifier-free guidance: u + s·(c − u). ``scale`` may be a tensor broadcasting over the logits."""
    return uncond + scale * (cond - uncond)


def cfg_scales(num_tokens: int, scale: float, interval: tuple[float, float] = (0.0, 1.0),
               device: torch.device | str | None = None) -> Tensor:
    """Per-position guidance scale [T]: ``scale`` for positions in [start·T, end·T), 1 elsewhere."""
    start, end = interval
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"cfg_interval must satisfy 0 <= start <= end <= 1, got {interval}")
    position = torch.arange(num_tokens, device=device, dtype=torch.float32)
    inside = (position >= start * num_tokens) & (position < end * num_tokens)
    return torch.where(inside, torch.tensor(float(scale), device=device), torch.tensor(1.0, device=device))


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Top-k then nucleus (top-p) filtering; removed entries become −inf. ``0`` / ``1.0`` disable them."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None, with_logp: bool = False) -> tuple[Tensor, Tensor | None]:
    """Draw the next token [B] from ``logits`` [B, V]: temperature, then :func:`filter_logits`; the argmax
    when ``temperature <= 0``. With ``with_logp`` also its log-prob [B] under exactly the distribution it was
    drawn from (renormalised over the tokens top-k/top-p kept), which is what an importance weight
    π_old/π_sampler divides by. Greedy decoding is a point mass, so its log-prob is 0."""
    if temperature <= 0:
        token = logits.argmax(-1)
        return token, (torch.zeros(token.shape, device=logits.device) if with_logp else None)
    processed = filter_logits(logits / temperature, top_k, top_p)
    token = torch.multinomial(processed.softmax(-1), 1, generator=generator).squeeze(-1)
    if not with_logp:
        return token, None
    # gather − logsumexp rather than a full log_softmax: no second [B, V] tensor (mmrl.ops does the same)
    return token, processed.gather(-1, token[:, None]).squeeze(-1) - processed.logsumexp(-1)


class SampledTokens(NamedTuple):
    """What a CFG sampler returns: ``tokens`` [B, T] and, when asked for, ``logp`` [B, T] — each token's
    log-prob under the guided, tempered, filtered distribution it was drawn from (0 when greedy)."""

    tokens: Tensor
    logp: Tensor | None


@torch.no_grad()
def sample_image_tokens(model, cond: Tensor, num_tokens: int, cfg_scale: float = 2.0,
                        cfg_interval: tuple[float, float] = (0.0, 1.0), temperature: float = 1.0, top_k: int = 0,
                        top_p: float = 1.0, generator: torch.Generator | None = None, use_cache: bool = True,
                        cond_mask: Tensor | None = None, with_logp: bool = False) -> SampledTokens:
    """Sample ``num_tokens`` image tokens per condition with CFG; with ``with_logp`` also the sampler's own
    log-prob of each (:func:`sample_next`). ``use_cache=False`` re-runs the whole prefix every step (the
    reference the cached path is tested and benchmarked against).
    """
    batch = cond.shape[0]
    device = model.output.weight.device
    null = model.null_condition(batch, device)
    both = torch.cat([cond.to(device), null])  # one forward for [cond; uncond]
    # The null caption keeps its row's caption mask, as in LlamaGen's sampler (caption dropout in training
    # swapped the features but kept the mask, so that is what the null branch was trained on).
    both_mask = None if cond_mask is None else torch.cat([cond_mask, cond_mask]).to(device)
    scales = cfg_scales(num_tokens, cfg_scale, cfg_interval, device)
    tokens = torch.zeros(batch, 0, dtype=torch.long, device=device)
    logps = []
    if use_cache:
        model.setup_cache(2 * batch, device=device)
        logits = model.prefill(both, both_mask)
    try:
        for t in range(num_tokens):
            if not use_cache:
                logits = model(torch.cat([tokens, tokens]), both, both_mask)[:, -1]
            guided = cfg_logits(logits[:batch].float(), logits[batch:].float(), scales[t])
            nxt, logp = sample_next(guided, temperature, top_k, top_p, generator, with_logp)
            logps.append(logp)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            if use_cache and t + 1 < num_tokens:
                logits = model.forward_step(torch.cat([nxt, nxt]))
    finally:
        if use_cache:
            model.clear_cache()
    return SampledTokens(tokens, torch.stack(logps, 1) if with_logp else None)


LOGPROB_MODES = ("cond", "cfg")  # see image_gen.policy: which distribution the policy ratio is taken on


def check_guidance(cfg_scale: float, cfg_interval: tuple[float, float], logprob_mode: str) -> tuple[float, float]:
    """Validate a policy's guidance settings at construction (not mid-training); returns the interval."""
    if logprob_mode not in LOGPROB_MODES:
        raise ValueError(f"logprob_mode={logprob_mode!r}; valid: {list(LOGPROB_MODES)}")
    interval = (float(cfg_interval[0]), float(cfg_interval[1]))
    cfg_scales(1, cfg_scale, interval)  # raises on a bad interval
    return interval


def guided_token_logprobs(hidden: Tensor, ids: Tensor, head, cfg_scale: float, cfg_interval: tuple[float, float],
                          temperature: float, chunk_size: int, with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """Log-probs (and entropies) of ``ids`` [B, T] under the guided distribution u + s_t·(c − u).

    ``hidden`` [2B, T, D] holds the conditional rows then the unconditional ones (one forward for both);
    ``head`` maps hidden states to logits. The guided logits are mixed per position inside the chunked
    :func:`mmrl.ops.token_logprobs` — the per-position scale rides along as one extra feature — so full
    [B, T, V] logits never exist, for either branch.
    """
    batch, length = ids.shape
    width = hidden.shape[-1]
    scales = cfg_scales(length, cfg_scale, cfg_interval, hidden.device).to(hidden.dtype)
    packed = torch.cat([hidden[:batch], hidden[batch:], scales.view(1, -1, 1).expand(batch, -1, 1)], dim=-1)

    def guided_head(h: Tensor) -> Tensor:
        return cfg_logits(head(h[:, :width]).float(), head(h[:, width:2 * width]).float(), h[:, -1:].float())

    return token_logprobs(packed, ids, guided_head, temperature, chunk_size, with_entropy)

