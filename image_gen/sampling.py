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

Per decoding step the work is kept to the model's own: tokens are drawn by a two-level inverse CDF
(:func:`draw`, one uniform per row, where ``torch.multinomial`` drew an exponential per vocabulary entry),
with the log-prob from the same pass; the output head runs on the guided hidden state (B rows, not 2B; fp32
heads); q and k share one rotary call; on the CPU the model's linears multiply by prepacked weights while the
KV cache is set up (:class:`image_gen.gpt.Linear`). ``bench/cfg_sampler_speed.py`` measures tokens/s against
the previous implementation.
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


CDF_BLOCK = 128  # entries per block of the two-level inverse CDF in :func:`draw` (≈ √V at V = 16384)


def draw(logits: Tensor, generator: torch.Generator | None = None,
         with_logp: bool = False) -> tuple[Tensor, Tensor | None]:
    """One token per row [B] from softmax(``logits`` [B, V]) by the inverse CDF, and with ``with_logp`` its
    log-prob [B]. Exactly the categorical distribution ``torch.multinomial`` samples, but from one uniform per
    row: ``multinomial`` draws an exponential for every one of the V entries (at V = 16384 that was the
    costliest op of a sampling step).

    The CDF is two-level, in float64 (float32 on MPS, which has no float64): the V weights are summed per
    block of :data:`CDF_BLOCK`, the uniform picks a block on the cumulative block sums, then an entry on the
    cumulative sum inside that one block. No [B, V] float64 CDF is built: in CPU profiles of the 16-image, V = 16384
    benchmark the full-length float64 cumsum and its fresh 2 MB buffer cost 1–10 ms per step. −inf entries have
    probability 0 and are never drawn (each search is capped just below its total, and an entry is only
    chosen where its cumulative weight rises above the draw)."""
    batch, vocab = logits.shape
    top = logits.amax(-1, keepdim=True)
    weights = (logits - top).exp_()  # in place on the fresh difference: one [B, V] temporary, not two
    wide = torch.float32 if logits.device.type == "mps" else torch.float64
    if vocab % CDF_BLOCK:
        weights = torch.nn.functional.pad(weights, (0, CDF_BLOCK - vocab % CDF_BLOCK))  # zero weight
    blocks = weights.view(batch, -1, CDF_BLOCK)
    block_cdf = blocks.sum(-1, dtype=wide).cumsum(-1)  # [B, V / block]
    total = block_cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, dtype=wide, device=logits.device)
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    block = torch.searchsorted(block_cdf, target, right=True)  # [B, 1]: the block whose mass covers target
    below = torch.where(block > 0, block_cdf.gather(-1, (block - 1).clamp_min(0)), torch.zeros_like(target))
    inner_cdf = blocks.gather(1, block[:, :, None].expand(-1, -1, CDF_BLOCK)).squeeze(1).cumsum(-1, dtype=wide)
    inner_total = inner_cdf[:, -1:]  # the block's mass summed in this order (equal to block_cdf's up to rounding)
    rest = torch.minimum(target - below, torch.nextafter(inner_total, torch.zeros_like(inner_total)))
    token = (block * CDF_BLOCK + torch.searchsorted(inner_cdf, rest, right=True)).squeeze(-1)
    if not with_logp:
        return token, None
    # log p = x_i − max − log Σ exp(x − max): the normaliser is the block CDF's last entry, no second pass over V
    logp = (logits.gather(-1, token[:, None]) - top).to(wide) - total.log()
    return token, logp.squeeze(-1).to(logits.dtype)


def sample_next(logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None, with_logp: bool = False) -> tuple[Tensor, Tensor | None]:
    """Draw the next token [B] from ``logits`` [B, V]: temperature, then :func:`filter_logits`, then
    :func:`draw`; the argmax when ``temperature <= 0``. With ``with_logp`` also its log-prob [B] under exactly
    the distribution it was drawn from (renormalised over the tokens top-k/top-p kept), which is what an
    importance weight π_old/π_sampler divides by. Greedy decoding is a point mass, so its log-prob is 0."""
    if temperature <= 0:
        token = logits.argmax(-1)
        return token, (torch.zeros(token.shape, device=logits.device) if with_logp else None)
    if temperature != 1.0:  # x / 1.0 == x exactly: skip the copy
        logits = logits / temperature
    return draw(filter_logits(logits, top_k, top_p), generator, with_logp)


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
    # The output head is linear without bias, so it commutes with the guidance mix:
    # W·u + s·(W·c − W·u) = W·(u + s·(c − u)). In fp32 the mix is taken on the [2B, dim] final hidden states
    # and the vocab-sized head runs on B rows instead of 2B (the same logits up to float rounding). Low-precision
    # heads keep mixing fp32 logits, so that bf16 rounding of a mixed hidden state never enters the sampler.
    mix_hidden = model.output.bias is None and model.output.weight.dtype == torch.float32

    def guided_logits(out: Tensor, t: int) -> Tensor:
        if mix_hidden:
            return model.output(cfg_logits(out[:batch], out[batch:], scales[t]))
        return cfg_logits(out[:batch].float(), out[batch:].float(), scales[t])

    tokens = torch.zeros(batch, num_tokens, dtype=torch.long, device=device)
    logps = torch.zeros(batch, num_tokens, device=device) if with_logp else None
    if use_cache:
        model.setup_cache(2 * batch, device=device)
        out = model.prefill(both, both_mask, return_hidden=mix_hidden)
    try:
        for t in range(num_tokens):
            if not use_cache:
                prefix = torch.cat([tokens[:, :t], tokens[:, :t]])
                out = model(prefix, both, both_mask, return_hidden=mix_hidden)[:, -1]
            nxt, logp = sample_next(guided_logits(out, t), temperature, top_k, top_p, generator, with_logp)
            tokens[:, t] = nxt
            if with_logp:
                logps[:, t] = logp
            if use_cache and t + 1 < num_tokens:
                out = model.forward_step(torch.cat([nxt, nxt]), return_hidden=mix_hidden)
    finally:
        if use_cache:
            model.clear_cache()
    return SampledTokens(tokens, logps)


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

