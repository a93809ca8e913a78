"""The VLM's own sampling loop: the model's forward, one token per step, over a prefilled KV cache.

``model.generate`` re-derives, at every step, what stays fixed through a rollout: it rebuilds the model
inputs (``prepare_inputs_for_generation``), re-runs the logits-processor and stopping-criterion lists and
grows ``position_ids`` and ``attention_mask`` through generic code paths; the model's forward then rebuilds
the attention mask and runs every module's wrappers. :func:`sample_tokens` does the same work directly, and
each step runs :func:`vision.text_decoder.decode_step` where that reproduces the model bit for bit
(``bench/decode_loop.py``: 0.82–0.87 of ``generate``'s time on the benchmark model, 0.90–0.975 for the loop
alone over the model's forward):

* positions: the next text position of each row is its count of attended tokens minus one (left padding
  counts nothing), plus Qwen-VL's M-RoPE offset ``rope_deltas`` that the prefill left on the inner model —
  the same ``text position + rope_deltas`` that ``generate`` feeds Qwen2-VL / Qwen2.5-VL / Qwen3-VL once a
  cache exists;
* scores: fp32 logits of the last position, processed in transformers' order — the stop tokens masked
  until ``min_new_tokens``, suppressed tokens masked, then temperature, top-k, top-p
  (:func:`process_scores`), then ``torch.multinomial`` (or ``argmax`` when greedy) on the global RNG, as
  ``generate`` draws; seeded, both loops sample the same tokens (``tests/test_decoding.py``);
* rows that stopped are fed the pad token and their later positions hold it; the loop ends as soon as
  every row has stopped, or after ``max_new_tokens``;
* the sampler's log-prob of each drawn token (TIS/MIS) is read off the processed scores as it is drawn;
* sharded weights (FSDP, DeepSpeed ZeRO-3, more than one process): every forward gathers parameters
  collectively, so a process whose rows have all stopped keeps stepping (its output discarded) until every
  process has stopped — ``generate``'s ``synced_gpus``, decided by the same test.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from transformers.distributed.fsdp import is_fsdp_managed_module
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from mmrl.policy import Sampling
from vision import text_decoder
from vision.shared_prompt import causal_lm
from vision.shared_vision import vision_model

Tensor = torch.Tensor


def process_scores(logits: Tensor, sampling: Sampling, step: int, eos_ids: Tensor, suppress_ids: Tensor | None) -> Tensor:
    """The scores transformers' ``generate`` samples from, for fp32 ``logits [B, V]`` at decoding ``step``
    (0-based): stop tokens at −inf while ``step < min_new_tokens``; suppressed tokens at −inf; divided by the
    temperature; outside the top-k at −inf; outside the top-p nucleus at −inf (a token is dropped when the
    probability mass of the tokens *less* likely than it, itself included, is at most 1 − top_p; the most
    likely token always stays). Greedy (temperature 0) applies the masks only."""
    if step < sampling.min_new_tokens:
        logits = logits.index_fill(-1, eos_ids, float("-inf"))
    if suppress_ids is not None:
        logits = logits.index_fill(-1, suppress_ids, float("-inf"))
    if sampling.temperature <= 0:
        return logits
    if sampling.temperature != 1.0:
        logits = logits / sampling.temperature
    if sampling.top_k and sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        ascending, order = torch.sort(logits, dim=-1)
        drop = ascending.softmax(-1).cumsum(-1) <= 1.0 - sampling.top_p
        drop[..., -1] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def sample_tokens(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, cache, rope_deltas: Tensor,
                  sampling: Sampling, eos_ids: list[int], pad_id: int, suppress_ids: list[int] | None = None,
                  record_logp: bool = False) -> tuple[Tensor, Tensor | None]:
    """Sample completions for ``input_ids [B, L]`` whose first ``L − 1`` tokens are already in ``cache``
    (:func:`vision.shared_vision.prefill_groups`): the loop feeds the last prompt token, then each drawn one.
    ``rope_deltas [B, 1]``: each row's M-RoPE offset (zeros for text-only rows). Returns the new tokens
    ``[B, T]`` (T ≤ ``max_new_tokens``; pad after a row's stop token) and, with ``record_logp``, the log-prob
    of each under the scores it was drawn from (0 when greedy and after the stop)."""
    device = input_ids.device
    eos = torch.tensor(eos_ids, device=device)
    suppress = torch.tensor(suppress_ids, device=device) if suppress_ids else None
    greedy = sampling.temperature <= 0
    rows = input_ids.shape[0]
    # The whole attention mask up front; each step reads a longer prefix (no per-step concatenation). Only
    # prompts can be padded, so the SDPA form of the mask (None when nothing is) is also built once.
    prompt_length = attention_mask.shape[1]
    mask = torch.ones(rows, prompt_length + sampling.max_new_tokens, dtype=attention_mask.dtype, device=device)
    mask[:, :prompt_length] = attention_mask
    keep = None if bool(attention_mask.all()) else mask.bool()[:, None, None, :]
    position = attention_mask.sum(-1, keepdim=True) - 1 + rope_deltas.to(device)
    tokens = torch.full((rows, sampling.max_new_tokens), pad_id, dtype=torch.long, device=device)
    logps = torch.zeros(rows, sampling.max_new_tokens, device=device) if record_logp else None
    running = torch.ones(rows, dtype=torch.bool, device=device)
    feed = input_ids[:, -1:]
    steps, alive = 0, True
    synced = _sharded(model)
    forward = _model_step if synced else text_decoder.decode_step if text_decoder.supports(model) else _text_step
    for step in range(sampling.max_new_tokens):
        length = prompt_length + step  # the cached tokens and this step's (the last prompt token is fed first)
        logits, cache = forward(model, feed, mask[:, :length], None if keep is None else keep[..., :length],
                                position, cache)
        scores = process_scores(logits.float(), sampling, step, eos, suppress)
        drawn = scores.argmax(-1) if greedy else torch.multinomial(scores.softmax(-1), 1).squeeze(1)
        if logps is not None and not greedy:
            logps[:, step] = scores.log_softmax(-1).gather(-1, drawn[:, None]).squeeze(1).masked_fill(~running, 0.0)
        drawn = drawn.masked_fill(~running, pad_id)
        if alive:  # a row of this process was running: the step counts towards its completions
            tokens[:, step] = drawn
            steps = step + 1
        running &= ~torch.isin(drawn, eos)
        alive = bool(running.any())  # False while sharded: stopped here, stepping for the other processes
        if not (_anywhere(alive) if synced else alive):
            break
        feed, position = drawn[:, None], position + 1
    return tokens[:, :steps], (logps[:, :steps] if logps is not None else None)


def _model_step(model: torch.nn.Module, feed: Tensor, mask: Tensor, keep: Tensor | None, position: Tensor,
                cache) -> tuple[Tensor, object]:
    """One decoding step through the whole model's forward (what sharded weights need: the root module's
    forward gathers its parameters). The signature of every step function: ``mask [B, K]`` the attention
    mask, ``keep`` its SDPA form (``None`` when nothing is padded, else ``[B, 1, 1, K]`` booleans)."""
    out = model(input_ids=feed, attention_mask=mask, position_ids=position, cache=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1], (out.cache if getattr(out, "cache", None) is not None
                               else getattr(out, "past_key_values", cache))


def _text_step(model: torch.nn.Module, feed: Tensor, mask: Tensor, keep: Tensor | None, position: Tensor,
               cache) -> tuple[Tensor, object]:
    """One decoding step through the language model and the head only: a new token is text, so the
    multimodal wrapper (image / video merging, position bookkeeping) has nothing to do. Qwen2-VL and
    Qwen2.5-VL take the attention mask already in the form their SDPA layers use — ``None`` when no row is
    padded, else a ``[B, 1, 1, K]`` boolean keep-mask — which is what ``create_causal_mask`` returns for one
    query token, so the loop's ``keep`` is passed as it is; Qwen3-VL builds it itself from ``mask``. Same logits as
    :func:`_model_step`, bit for bit (``tests/test_decoding.py``)."""
    language_model = vision_model(model).language_model
    if language_model.config.model_type in ("qwen2_vl_text", "qwen2_5_vl_text"):
        mask = {"full_attention": keep}
    out = language_model(input_ids=feed, attention_mask=mask, position_ids=position, cache=cache, use_cache=True)
    logits = causal_lm(model).get_output_embeddings()(out.last_hidden_state[:, -1])
    return logits, out.cache if getattr(out, "cache", None) is not None else getattr(out, "past_key_values", cache)


def _sharded(model: torch.nn.Module) -> bool:
    """Whether every forward is a collective (parameters gathered across processes)."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return world > 1 and (is_deepspeed_zero3_enabled() or is_fsdp_managed_module(model))


def _anywhere(here: bool) -> bool:
    """Whether any process still has a running row (a collective: every process calls it each step)."""
    flag = torch.tensor([1.0 if here else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.SUM)
    return bool(flag.item() > 0)
