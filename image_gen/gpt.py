"""LlamaGen-architecture autoregressive image-token transformer, in one readable file.

The model predicts VQ codebook indices of an image in raster order, conditioned on a prefix of
``cls_token_num`` condition embeddings (one class embedding for class-to-image, 120 projected T5
caption features for text-to-image). It is a Llama decoder (RMSNorm, SwiGLU, optional GQA) with a 2D
rotary embedding over the image grid. Parameter names follow LlamaGen's ``autoregressive/models/gpt.py``
so its released checkpoints load with :func:`image_gen.llamagen_checkpoint.load_llamagen_checkpoint`.

Sequence layout and logits convention (used by both :meth:`GPT.forward` and the KV-cached path)::

    position: 0 .. C-1          C        C+1     ...  C+T-1
    input:    cond_0 .. cond_C-1 img_0    img_1   ...  img_T-1
    logits:            -> img_0  -> img_1 -> img_2 ... -> img_T

so ``forward(idx, cond)`` returns ``T + 1`` logits and ``logits[:, i]`` predicts image token ``i``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    """Hyper-parameters; field names and defaults mirror LlamaGen's ``ModelArgs``.

    Dropouts default to 0 (LlamaGen pre-trained with 0.1): RL importance ratios compare log-probs of
    two forward passes, which must be deterministic. ``class_dropout_prob`` is only the rate a
    pre-training loop should draw ``drop_cond`` with; the model itself never drops conditions at random.
    """

    vocab_size: int = 16384  # image codebook size
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int | None = None  # None -> n_head (no GQA)
    dim: int = 4096
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.0
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.0
    ffn_dropout_p: float = 0.0
    block_size: int = 256  # number of image tokens = grid_size ** 2
    cls_token_num: int = 1  # condition prefix length: 1 for c2i, 120 for t2i
    model_type: str = "c2i"  # "c2i" | "t2i"
    num_classes: int = 1000
    caption_dim: int = 2048  # T5-XL feature size
    class_dropout_prob: float = 0.1

    def __post_init__(self) -> None:
        problems = {
            f"model_type must be 'c2i' or 't2i', not {self.model_type!r}": self.model_type not in ("c2i", "t2i"),
            "c2i models take exactly one condition token": self.model_type == "c2i" and self.cls_token_num != 1,
            "dim must divide by n_head, and n_head by n_kv_head": self.dim % self.n_head or self.n_head % self.kv_heads,
            "2D RoPE needs head_dim divisible by 4 (a quarter per axis)": self.head_dim % 4,
            f"block_size={self.block_size} is not a square number": self.grid_size**2 != self.block_size,
        }
        if bad := [msg for msg, failed in problems.items() if failed]:
            raise ValueError("; ".join(bad))

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.block_size)

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU intermediate size: 2/3 of 4*dim (keeps FLOPs of a 4x MLP), scaled, rounded up."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return -(-hidden // self.multiple_of) * self.multiple_of  # round up to a multiple


# LlamaGen's sizes. Override per checkpoint, e.g. block_size=576 for 384px c2i models, or
# model_type="t2i", cls_token_num=120 for the text-to-image GPT-XL.
GPT_CONFIGS: dict[str, GPTConfig] = {
    "GPT-B": GPTConfig(n_layer=12, n_head=12, dim=768),  # 111M
    "GPT-L": GPTConfig(n_layer=24, n_head=16, dim=1024),  # 343M
    "GPT-XL": GPTConfig(n_layer=36, n_head=20, dim=1280),  # 775M
    "GPT-XXL": GPTConfig(n_layer=48, n_head=24, dim=1536),  # 1.4B
    "GPT-XXXL": GPTConfig(n_layer=48, n_head=40, dim=2560),  # 3.9B
    # offline tests: 4x4 grid, 64-entry codebook, 10 classes
    "GPT-tiny": GPTConfig(vocab_size=64, n_layer=2, n_head=4, dim=64, multiple_of=32, block_size=16, num_classes=10, caption_dim=32),
}


def get_config(name: str, **overrides) -> GPTConfig:
    """A preset from :data:`GPT_CONFIGS` with fields replaced (validation re-runs)."""
    if name not in GPT_CONFIGS:
        raise KeyError(f"unknown GPT preset {name!r}; choose from {sorted(GPT_CONFIGS)}")
    return replace(GPT_CONFIGS[name], **overrides)


# ---- Condition embedders ----
class LabelEmbedder(nn.Module):
    """Class id -> one condition token. Row ``num_classes`` is the learned null class used by CFG."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        if drop is not None:
            labels = torch.where(drop.bool(), self.num_classes, labels)
        return self.embedding_table(labels).unsqueeze(1)  # [B, 1, dim]


class CaptionEmbedder(nn.Module):
    """Caption features [B, L, caption_dim] -> L condition tokens via a bias-free tanh-GELU MLP.

    ``uncond_embedding`` is the null caption (in caption-feature space, before the projection). As in
    LlamaGen it is a persistent buffer, not a parameter: it is saved in checkpoints but not trained.
    """

    def __init__(self, caption_dim: int, dim: int, token_num: int) -> None:
        super().__init__()
        fc1, fc2 = nn.Linear(caption_dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.cap_proj = nn.Sequential(OrderedDict(fc1=fc1, act=nn.GELU(approximate="tanh"), fc2=fc2))
        self.register_buffer("uncond_embedding", torch.randn(token_num, caption_dim) / caption_dim**0.5)

    def forward(self, caption: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        if drop is not None:
            null = self.uncond_embedding.to(caption.dtype)
            caption = torch.where(drop.bool()[:, None, None], null, caption)
        return self.cap_proj(caption)


# ---- Transformer blocks ----
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # normalise in fp32 so bf16 activations don't lose the mean square
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def _can_pack(weight: torch.Tensor) -> bool:
    """True where :class:`Linear` may decode with a prepacked weight: a plain fp32 CPU tensor and a torch
    built with oneDNN's linear ops (absent builds, GPUs, bf16 and sharded DTensors keep ``F.linear``)."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and type(weight.data) is torch.Tensor
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state-dict keys) that, while the KV cache is set up on the CPU,
    multiplies by a copy of its weight prepacked for oneDNN — the kernel PyTorch's own compiler uses for
    frozen fp32 linears on CPU.

    Why: at decoding sizes (16–32 rows) ``F.linear`` re-packs the weight on every call, which in CPU profiles
    of the sampler cost about as much as the product itself (the whole sampler's gain: BENCHMARKS.md,
    ``python bench/cfg_sampler_speed.py``). The packed copy (one more copy of the weight in memory) exists only
    between :meth:`GPT.setup_cache` and :meth:`GPT.clear_cache`, and is used only without autograd and
    autocast: training forwards never see it. The products agree with ``F.linear`` to float rounding (another
    summation order), not bit for bit.
    """

    packed: torch.Tensor | None = None

    def pack(self) -> None:
        if _can_pack(self.weight):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)

    def unpack(self) -> None:
        self.packed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu"):
            return super().forward(x)  # training, or autocast's own precision choice
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        hidden = cfg.ffn_hidden_dim
        self.w1 = Linear(cfg.dim, hidden, bias=False)
        self.w3 = Linear(cfg.dim, hidden, bias=False)
        self.w2 = Linear(hidden, cfg.dim, bias=False)
        self.ffn_dropout = nn.Dropout(cfg.ffn_dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


def precompute_freqs_cis_2d(grid_size: int, head_dim: int, base: float, cls_token_num: int) -> torch.Tensor:
    """Rotary (cos, sin) table [cls_token_num + grid_size**2, head_dim // 2, 2].

    Image token ``r * grid_size + c`` rotates its first head_dim/4 channel pairs by row ``r`` and the
    rest by column ``c`` (same frequency ladder on both axes). Condition tokens get all zeros, as in
    LlamaGen (their q/k vanish; they act through values only); identity would alter pretrained outputs.
    """
    quarter = head_dim // 4
    cpu = torch.device("cpu")  # explicit, so a model built under torch.device("meta") still gets values
    inv_freq = 1.0 / (base ** (torch.arange(quarter, dtype=torch.float32, device=cpu) * 2 / (head_dim // 2)))
    angles = torch.outer(torch.arange(grid_size, dtype=torch.float32, device=cpu), inv_freq)  # [grid, quarter]
    rows = angles[:, None, :].expand(grid_size, grid_size, quarter)
    cols = angles[None, :, :].expand(grid_size, grid_size, quarter)
    grid = torch.cat([rows, cols], dim=-1).flatten(0, 1)  # [grid*grid, head_dim // 2]
    table = torch.stack([grid.cos(), grid.sin()], dim=-1)
    return torch.cat([torch.zeros(cls_token_num, head_dim // 2, 2, device=cpu), table])


def rotary_tables(freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, signed sin), each [S, D], from a LlamaGen table [S, D/2, 2]: channels 2i and 2i+1 both get
    cos_i; the sine is −sin_i on the even channel and +sin_i on the odd one (see :func:`apply_rotary_emb`)."""
    cos, sin = freqs.unbind(-1)
    return cos.repeat_interleave(2, dim=-1), torch.stack([-sin, sin], dim=-1).flatten(-2)


def apply_rotary_emb(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate adjacent (even, odd) channel pairs of x [B, S, H, D] by :func:`rotary_tables` [S, D] (in fp32).

    LlamaGen computes (x0·cos − x1·sin, x1·cos + x0·sin) per pair. Here the same is x·cos + swap(x)·sin with
    swap exchanging each pair and the signed sine: the same products and the same sums (a − b is a + (−b) in
    IEEE arithmetic), so bit for bit the same result, in four kernels instead of nine (decoding runs it
    once per layer per token)."""
    cos, sin = rope
    xf = x.float()
    swapped = xf.view(*xf.shape[:-1], -1, 2).flip(-1).flatten(-2)
    return (xf * cos[:, None] + swapped * sin[:, None]).type_as(x)


class KVCache:
    """Per-layer keys/values for incremental decoding; not a module, so never in ``state_dict()``."""

    def __init__(self, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device) -> None:
        # Uninitialised: a position is only ever read after ``update`` wrote it (reads stop at ``end``), so
        # zero-filling hundreds of MB per sampling call would be pure memory traffic.
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, H, S, D] at positions start..start+S-1; return all keys/values so far."""
        b, end = k.shape[0], start + k.shape[2]
        self.k[:b, :, start:end] = k
        self.v[:b, :, start:end] = v
        return self.k[:b, :, :end], self.v[:b, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.wqkv = Linear(cfg.dim, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.wo = Linear(cfg.dim, cfg.dim, bias=False)
        self.attn_dropout_p = cfg.attn_dropout_p
        self.resid_dropout = nn.Dropout(cfg.resid_dropout_p)

    def forward(self, x, rope, mask: torch.Tensor | None, cache: KVCache | None = None, start: int = 0):
        """``mask`` None: plain causal self-attention (no cache); else bool [B, 1, S, keys], True = attend."""
        b, s, _ = x.shape
        heads = self.n_head + self.n_kv_head
        qk, v = self.wqkv(x).split([heads * self.head_dim, self.n_kv_head * self.head_dim], dim=-1)
        # q and k are adjacent in wqkv's output: one rotary call for both (the same element-wise ops)
        qk = apply_rotary_emb(qk.view(b, s, heads, self.head_dim), rope).transpose(1, 2)
        q, k = qk.split([self.n_head, self.n_kv_head], dim=1)
        v = v.view(b, s, self.n_kv_head, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(start, k, v)
        if self.n_kv_head != self.n_head:
            rep = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        p = self.attn_dropout_p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=p)
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(b, s, -1)))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, rope, mask, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask, cache, start)
        return h + self.feed_forward(self.ffn_norm(h))


# ---- The model ----
class GPT(nn.Module):
    """Condition prefix + image tokens -> next-image-token logits (see the module docstring)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = cfg = config
        if cfg.model_type == "c2i":
            self.cls_embedding: nn.Module = LabelEmbedder(cfg.num_classes, cfg.dim)
        else:
            self.cls_embedding = CaptionEmbedder(cfg.caption_dim, cfg.dim, cfg.cls_token_num)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout_p)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = Linear(cfg.dim, cfg.vocab_size, bias=False)
        # Plain attribute (not a buffer): stays fp32 under model.to(bf16) and out of state_dict().
        self.freqs_cis = precompute_freqs_cis_2d(cfg.grid_size, cfg.head_dim, cfg.rope_base, cfg.cls_token_num)
        self._rope = rotary_tables(self.freqs_cis)  # the form apply_rotary_emb takes; moved with _rope_on
        self._caches: list[KVCache] | None = None
        self._cache_len = 0
        self._key_mask: torch.Tensor | None = None  # [B, max_len] bool: cached keys that may be attended
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=cfg.initializer_range)
        nn.init.zeros_(self.output.weight)  # LlamaGen starts from uniform next-token predictions

    def null_condition(self, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Unconditional input for classifier-free guidance: null class ids [B] (c2i) or the null
        caption features [B, cls_token_num, caption_dim] (t2i)."""
        device = device or self.output.weight.device
        if self.config.model_type == "c2i":
            return torch.full((batch,), self.config.num_classes, dtype=torch.long, device=device)
        null = self.cls_embedding.uncond_embedding
        return null.to(device).unsqueeze(0).expand(batch, -1, -1).clone()

    def embed_condition(self, cond: torch.Tensor, drop_cond: torch.Tensor | None = None) -> torch.Tensor:
        """[B] class ids or [B, L>=C, caption_dim] features -> [B, C, dim] prefix embeddings.
        ``drop_cond`` [B] bool replaces the chosen rows by the null condition."""
        c = self.config.cls_token_num
        if self.config.model_type == "t2i" and (cond.dim() != 3 or cond.shape[1] < c):
            raise ValueError(f"t2i condition must be [B, {c}, caption_dim], got {tuple(cond.shape)}")
        if self.config.model_type == "t2i":
            cond = cond[:, :c].to(self.output.weight.dtype)
        return self.cls_embedding(cond, drop_cond)[:, :c]

    def _prefix_mask(self, cond_mask: torch.Tensor | None, batch: int, s: int, device) -> torch.Tensor | None:
        """Causal mask over the first ``s`` positions with padded condition tokens hidden as keys.
        Every position keeps its own diagonal (as LlamaGen does) so no attention row is empty."""
        if cond_mask is None:
            return None
        key_ok = torch.ones(batch, s, dtype=torch.bool, device=device)
        c = min(self.config.cls_token_num, s)
        key_ok[:, :c] = cond_mask[:, :c].to(device=device, dtype=torch.bool)
        causal = torch.ones(s, s, dtype=torch.bool, device=device).tril()
        return ((causal & key_ok[:, None, :]) | torch.eye(s, dtype=torch.bool, device=device)).unsqueeze(1)

    def forward(
        self, idx: torch.Tensor, cond: torch.Tensor, cond_mask=None, drop_cond=None, return_hidden: bool = False
    ) -> torch.Tensor:
        """Teacher-forced pass over a whole sequence (no cache).

        Args:
            idx: [B, T] image token ids in raster order, 0 <= T <= block_size (T=0 is allowed).
            cond: [B] class ids (c2i) or [B, cls_token_num, caption_dim] caption features (t2i).
            cond_mask: optional [B, cls_token_num] bool, False marks padded caption tokens.
            drop_cond: optional [B] bool; True rows use the null condition (CFG / condition dropout).
            return_hidden: return the final-norm hidden states [B, T+1, dim] instead of logits, so a
                caller can apply ``model.output`` in chunks without materialising all logits.
        Returns:
            fp32 logits [B, T+1, vocab_size]; ``logits[:, i]`` predicts image token i, so
            ``logits[:, :T]`` scores ``idx`` and ``logits[:, T]`` predicts the next token.
        """
        c, t = self.config.cls_token_num, idx.shape[1]
        if t > self.config.block_size:
            raise ValueError(f"{t} image tokens exceed block_size={self.config.block_size}")
        h = self.tok_dropout(torch.cat([self.embed_condition(cond, drop_cond), self.tok_embeddings(idx)], 1))
        rope = tuple(table[: c + t] for table in self._rope_on(h.device))
        mask = self._prefix_mask(cond_mask, h.shape[0], c + t, h.device)
        for layer in self.layers:
            h = layer(h, rope, mask)
        h = self.norm(h[:, c - 1 :])
        return h if return_hidden else self.output(h).float()

    def _rope_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary tables on ``device`` (plain attributes, not buffers: fp32 under model.to(bf16), moved here
        on first use; a no-op afterwards)."""
        if self._rope[0].device != device:
            self.freqs_cis = self.freqs_cis.to(device)
            self._rope = tuple(table.to(device) for table in self._rope)
        return self._rope

    # ---- incremental decoding: setup_cache(), prefill(cond), then forward_step(token) per token ----
    def setup_cache(self, max_batch_size: int, max_seq_len: int | None = None, dtype=None, device=None) -> None:
        """Allocate per-layer KV caches (default length: condition prefix + all image tokens)."""
        cfg = self.config
        max_seq_len = max_seq_len or cfg.cls_token_num + cfg.block_size
        device = device or self.output.weight.device
        shape = (max_batch_size, cfg.kv_heads, max_seq_len, cfg.head_dim)
        self._caches = [KVCache(shape, dtype or self.output.weight.dtype, device) for _ in self.layers]
        self._key_mask = torch.zeros(max_batch_size, max_seq_len, dtype=torch.bool, device=device)
        self._cache_len = 0
        self._pack_linears(True)  # decoding-only packed weights (see Linear); clear_cache drops them

    def clear_cache(self) -> None:
        """Free the KV caches and the packed weights."""
        self._caches, self._key_mask, self._cache_len = None, None, 0
        self._pack_linears(False)

    def _pack_linears(self, on: bool) -> None:
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack() if on else module.unpack()

    def _run_cached(self, x: torch.Tensor, mask: torch.Tensor, return_hidden: bool) -> torch.Tensor:
        start, s = self._cache_len, x.shape[1]
        if start + s > self._key_mask.shape[1] or x.shape[0] > self._key_mask.shape[0]:
            raise RuntimeError("KV cache too small: raise max_batch_size / max_seq_len in setup_cache()")
        h = self.tok_dropout(x)
        rope = tuple(table[start : start + s] for table in self._rope_on(h.device))
        for layer, cache in zip(self.layers, self._caches):
            h = layer(h, rope, mask, cache, start)
        self._cache_len = start + s
        h = self.norm(h[:, -1])
        return h if return_hidden else self.output(h).float()

    def prefill(self, cond: torch.Tensor, cond_mask=None, drop_cond=None, return_hidden: bool = False) -> torch.Tensor:
        """Restart the cache with the condition prefix (arguments as in :meth:`forward`); return fp32
        logits [B, vocab] for image token 0 (``return_hidden``: the final-norm hidden state [B, dim] instead)."""
        if self._caches is None:
            raise RuntimeError("call setup_cache() before prefill()")
        x = self.embed_condition(cond, drop_cond)
        b, c = x.shape[:2]
        self._cache_len = 0
        self._key_mask[:b] = True
        if cond_mask is not None:
            self._key_mask[:b, :c] = cond_mask.to(self._key_mask.device, torch.bool)
        mask = self._prefix_mask(cond_mask, b, c, x.device)
        if mask is None:  # SDPA's is_causal is wrong for cached keys; always pass a mask here
            mask = torch.ones(c, c, dtype=torch.bool, device=x.device).tril()
        return self._run_cached(x, mask, return_hidden)

    def forward_step(self, idx: torch.Tensor, return_hidden: bool = False) -> torch.Tensor:
        """Append one image token per row (idx [B] or [B, 1]) after :meth:`prefill`; return fp32 logits
        [B, vocab] for the next image token (``return_hidden``: the final-norm hidden state [B, dim]).
        Matches :meth:`forward` up to float rounding."""
        if self._caches is None or self._cache_len == 0:
            raise RuntimeError("call setup_cache() and prefill() before forward_step()")
        idx = idx.reshape(-1, 1)
        mask = self._key_mask[: idx.shape[0], None, None, : self._cache_len + 1]
        return self._run_cached(self.tok_embeddings(idx), mask, return_hidden)
