"""One decoding step of a Qwen-VL text model, written out over the model's own modules.

A decoding step feeds one text token per row. transformers' text-model forward spends most of that step's
time around the arithmetic rather than in it at RL-on-CPU sizes (profiled on the ``bench/vs_trl.py`` model:
a third of the step in matmuls): output-capturing and deprecation wrappers on every module, the causal mask
rebuilt, the M-RoPE tables recomposed over three position rows, the attention-backend dispatch.
:func:`decode_step` runs the same operations in the same order — the layers' own norm, projection and MLP
modules (so LoRA adapters and frozen parts behave as in the model), rotary tables from the model's
``inv_freq``, ``repeat``-free grouped-query SDPA exactly as transformers' SDPA backend calls it, the
model's KV cache — and nothing else. With one token per row the three M-RoPE position rows are equal
(``text position + rope_deltas``), so the recomposed tables equal the plain ones.

Only what it reproduces bit for bit is taken (:func:`supports`): Qwen2-VL, Qwen2.5-VL and Qwen3-VL text
models with SDPA attention, default RoPE, no sliding window; anything else decodes through the model's
forward. Logits equal the model's forward exactly (``tests/test_decoding.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vision.shared_prompt import causal_lm
from vision.shared_vision import vision_model

Tensor = torch.Tensor

TEXT_MODELS = ("qwen2_vl_text", "qwen2_5_vl_text", "qwen3_vl_text")


def supports(model: torch.nn.Module) -> bool:
    """Whether :func:`decode_step` reproduces this model's forward."""
    language_model = vision_model(model).language_model
    config = language_model.config
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    return (config.model_type in TEXT_MODELS and config._attn_implementation == "sdpa" and rope == "default"
            and not getattr(config, "use_sliding_window", False)
            and all(kind == "full_attention" for kind in (getattr(config, "layer_types", None) or ["full_attention"]))
            and not language_model.training)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def decode_step(model: torch.nn.Module, feed: Tensor, mask: Tensor, keep: Tensor | None, position: Tensor,
                cache) -> tuple[Tensor, object]:
    """Logits ``[B, V]`` for one new token per row. ``feed [B, 1]``: the tokens; ``mask [B, K]``: the
    attention mask over the cache plus the new token (unused here: ``keep`` carries it); ``keep``: the same
    in SDPA form, ``None`` when no row is padded (as transformers passes it) else ``[B, 1, 1, K]``
    booleans; ``position [B, 1]``: text position + rope_deltas; ``cache``: the model's KV cache (appended to)."""
    language_model = vision_model(model).language_model
    hidden = language_model.embed_tokens(feed)
    rotary = language_model.rotary_emb
    freqs = position[..., None].float() * rotary.inv_freq.to(device=hidden.device, dtype=torch.float)
    cos = (freqs.cos() * rotary.attention_scaling)
    sin = (freqs.sin() * rotary.attention_scaling)
    cos = torch.cat((cos, cos), dim=-1).to(hidden.dtype).unsqueeze(1)  # [B, 1, 1, D]: broadcast over heads
    sin = torch.cat((sin, sin), dim=-1).to(hidden.dtype).unsqueeze(1)
    rows = feed.shape[0]
    for index, layer in enumerate(language_model.layers):
        residual = hidden
        hidden = layer.input_layernorm(hidden)
        attention = layer.self_attn
        head_dim = attention.head_dim
        query = attention.q_proj(hidden).view(rows, 1, -1, head_dim)
        key = attention.k_proj(hidden).view(rows, 1, -1, head_dim)
        if hasattr(attention, "q_norm"):  # Qwen3-VL: RMSNorm over each head
            query, key = attention.q_norm(query), attention.k_norm(key)
        query, key = query.transpose(1, 2), key.transpose(1, 2)
        value = attention.v_proj(hidden).view(rows, 1, -1, head_dim).transpose(1, 2)
        query = query * cos + _rotate_half(query) * sin
        key = key * cos + _rotate_half(key) * sin
        key, value = cache.update(key, value, index)
        groups = attention.num_key_value_groups
        if groups > 1 and keep is None:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                                 scale=attention.scaling, is_causal=False, enable_gqa=True)
        else:
            if groups > 1:  # one query token: the heads of a group become that group's queries
                query = query.reshape(rows, query.shape[1] // groups, groups, head_dim)
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=keep, dropout_p=0.0,
                                                 scale=attention.scaling, is_causal=False)
        out = out.reshape(rows, -1, 1, head_dim).transpose(1, 2).contiguous()
        hidden = residual + attention.o_proj(out.reshape(rows, 1, -1).contiguous())
        residual = hidden
        hidden = residual + layer.mlp(layer.post_attention_layernorm(hidden))
    hidden = language_model.norm(hidden)
    return causal_lm(model).get_output_embeddings()(hidden[:, -1]), cache
