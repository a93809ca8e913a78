"""Discrete image tokenizers behind one small interface.

Autoregressive image generation (LlamaGen, AR-GRPO) models images as sequences of codebook indices, so
the policy only ever needs two things from a tokenizer: images -> indices and indices -> images. This
module provides that interface (:class:`ImageTokenizer`) and two implementations: :class:`LlamaGenVQ`
(our re-implementation of LlamaGen's VQ-16, key-compatible with ``vq_ds16_c2i.pt``) and :class:`DiffusersVQ`
(``diffusers.VQModel``; :func:`build_tiny_diffusers_vq` + :func:`train_vq` give a toy one for offline runs).

Conventions: images are float ``[B, 3, H, W]`` in ``[0, 1]``; indices are long ``[B, h*w]`` in
row-major (raster) order, which is the order the AR model generates them in.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from image_gen.safe_load import safe_torch_load


@runtime_checkable
class ImageTokenizer(Protocol):
    """What an AR image policy needs from a tokenizer (structural, so any object with these members fits)."""

    @property
    def codebook_size(self) -> int: ...
    @property
    def downsample(self) -> int: ...
    def grid_size(self, image_size: int | tuple[int, int]) -> tuple[int, int]: ...
    def encode(self, images: torch.Tensor) -> torch.Tensor: ...
    def decode(self, indices: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor: ...


def _to_signed(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]: both tokenizers were trained on signed pixels."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
    return images * 2.0 - 1.0


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped because decoders overshoot and callers (rewards, PIL) expect a range."""
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def _resolve_grid(indices: torch.Tensor, grid: tuple[int, int] | None) -> tuple[int, int]:
    """Token grid for ``[B, h*w]`` indices; square unless told otherwise, since most generators are square."""
    n = indices.shape[-1]
    h, w = grid if grid is not None else (math.isqrt(n), math.isqrt(n))
    if indices.ndim != 2 or h * w != n:
        raise ValueError(f"indices {tuple(indices.shape)} are not [B, h*w] on grid {(h, w)}; pass grid=(h, w)")
    return int(h), int(w)


class _TokenizerBase(nn.Module):
    """Shared ``grid_size``; subclasses define ``downsample``."""

    downsample: int

    def grid_size(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"image size {(h, w)} is not a multiple of the downsample {self.downsample}")
        return h // self.downsample, w // self.downsample


# ---- LlamaGen VQ: module/attribute names mirror LlamaGen's so state dicts load key-for-key ----


@dataclass
class VQConfig:
    """Architecture of a LlamaGen-style VQ tokenizer (fields follow LlamaGen's ``ModelArgs``)."""

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True  # LlamaGen keeps a 65536-long usage buffer in its state dict
    commit_loss_beta: float = 0.25
    encoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    decoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    z_channels: int = 256
    ch: int = 128
    num_res_blocks: int = 2
    norm_num_groups: int = 32
    dropout_p: float = 0.0


VQ_CONFIGS: dict[str, VQConfig] = {
    # LlamaGen's VQ-16 (vq_ds16_c2i.pt / vq_ds16_t2i.pt): 256x256 -> 16x16 tokens, ~72M parameters.
    "VQ-16": VQConfig(),
    # Same topology at toy width, downsample 4, for tests that must run in milliseconds.
    "VQ-tiny": VQConfig(
        codebook_size=64, codebook_show_usage=False, z_channels=16, ch=16, num_res_blocks=1, norm_num_groups=8,
        encoder_ch_mult=[1, 1, 2], decoder_ch_mult=[1, 1, 2],
    ),
}


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block (GroupNorm -> SiLU -> conv, twice) with a 1x1 shortcut on width change."""

    def __init__(self, cin: int, cout: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all positions (used only at the coarsest resolution)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q, k, v = (t.reshape(b, 1, c, hh * ww).transpose(2, 3) for t in (self.q(h), self.k(h), self.v(h)))
        out = F.scaled_dot_product_attention(q, k, v)  # default scale 1/sqrt(c), as in LlamaGen
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, hh, ww))


class Resample(nn.Module):
    """2x down (stride-2 conv after LlamaGen's right/bottom zero pad) or up (nearest, then 3x3 conv)."""

    def __init__(self, channels: int, up: bool) -> None:
        super().__init__()
        self.up = up
        self.conv = nn.Conv2d(channels, channels, 3, stride=1 if up else 2, padding=1 if up else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest") if self.up else F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


def _stage(cin: int, cout: int, n: int, attn: bool, cfg: VQConfig, up: bool | None) -> nn.Module:
    """One resolution level as a bare container, so keys read ``conv_blocks.{i}.res.{j}`` like LlamaGen's."""
    g, stage = cfg.norm_num_groups, nn.Module()
    stage.res = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout, g, cfg.dropout_p) for j in range(n))
    stage.attn = nn.ModuleList(AttnBlock(cout, g) for _ in range(n if attn else 0))
    if up is not None:
        setattr(stage, "upsample" if up else "downsample", Resample(cout, up))
    return stage


def _mid(c: int, cfg: VQConfig) -> nn.Sequential:
    """ResNet -> attention -> ResNet; a Sequential has the same ``mid.{i}`` keys as LlamaGen's ModuleList."""
    g, p = cfg.norm_num_groups, cfg.dropout_p
    return nn.Sequential(ResnetBlock(c, c, g, p), AttnBlock(c, g), ResnetBlock(c, c, g, p))


def _run(stages: nn.ModuleList, h: torch.Tensor, resample: str) -> torch.Tensor:
    """Residual blocks of each level (each followed by its attention block, if the level has them)."""
    for stage in stages:
        for j, block in enumerate(stage.res):
            h = block(h)
            if len(stage.attn):
                h = stage.attn[j](h)
        if hasattr(stage, resample):
            h = getattr(stage, resample)(h)
    return h


class Encoder(nn.Module):
    """Pixels [-1, 1] -> ``z_channels`` features at 1/2**(levels-1) resolution."""

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        widths, n = [cfg.ch * m for m in cfg.encoder_ch_mult], len(cfg.encoder_ch_mult)
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList(
            _stage(cin, cout, cfg.num_res_blocks, i == n - 1, cfg, None if i == n - 1 else False)
            for i, (cin, cout) in enumerate(zip([cfg.ch, *widths], widths))
        )
        self.mid = _mid(widths[-1], cfg)
        self.norm_out = _norm(widths[-1], cfg.norm_num_groups)
        self.conv_out = nn.Conv2d(widths[-1], cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(_run(self.conv_blocks, self.conv_in(x), "downsample"))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """``z_channels`` latents -> pixels in (roughly) [-1, 1]; ``conv_blocks[0]`` is the coarsest level."""

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        widths = [cfg.ch * m for m in reversed(cfg.decoder_ch_mult)]  # coarsest level first
        n = len(widths)
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[0], 3, padding=1)
        self.mid = _mid(widths[0], cfg)
        self.conv_blocks = nn.ModuleList(
            _stage(cin, cout, cfg.num_res_blocks + 1, i == 0, cfg, True if i < n - 1 else None)
            for i, (cin, cout) in enumerate(zip([widths[0], *widths], widths))
        )
        self.norm_out = _norm(widths[-1], cfg.norm_num_groups)
        self.conv_out = nn.Conv2d(widths[-1], 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run(self.conv_blocks, self.mid(self.conv_in(z)), "upsample")
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-codeword lookup; with ``l2_norm`` both latents and codes live on the unit sphere."""

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.l2_norm, self.beta = cfg.codebook_l2_norm, cfg.commit_loss_beta
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_embed_dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)
            if self.l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        if cfg.codebook_show_usage:
            self.register_buffer("codebook_used", torch.zeros(65536))

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``z`` [B, C, h, w] -> (straight-through quantised z, indices [B, h*w], codebook+commitment loss)."""
        b, c, hh, ww = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        if self.l2_norm:
            flat = F.normalize(flat, dim=-1)
        book = self.codebook()
        dist = flat.pow(2).sum(1, keepdim=True) + book.pow(2).sum(1) - 2.0 * flat @ book.t()
        idx = dist.argmin(dim=1)
        zq = book[idx]
        loss = F.mse_loss(zq, flat.detach()) + self.beta * F.mse_loss(flat, zq.detach())
        zq = flat + (zq - flat).detach()
        return zq.reshape(b, hh, ww, c).permute(0, 3, 1, 2), idx.reshape(b, hh * ww), loss

    def lookup(self, indices: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Indices [B, h*w] -> codes [B, C, h, w]."""
        codes = self.codebook()[indices]
        return codes.reshape(indices.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2)


class LlamaGenVQ(_TokenizerBase):
    """LlamaGen's VQ tokenizer (state-dict compatible with its ``VQModel``) implementing :class:`ImageTokenizer`."""

    def __init__(self, config: VQConfig | str = "VQ-16") -> None:
        super().__init__()
        self.config = VQ_CONFIGS[config] if isinstance(config, str) else config
        if len(self.config.encoder_ch_mult) != len(self.config.decoder_ch_mult):
            raise ValueError("encoder and decoder must downsample by the same factor")
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.quantize = VectorQuantizer(self.config)
        self.quant_conv = nn.Conv2d(self.config.z_channels, self.config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(self.config.codebook_embed_dim, self.config.z_channels, 1)

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.config.encoder_ch_mult) - 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Signed pixels -> (reconstruction in [-1, 1], VQ loss); the differentiable path used for training."""
        zq, _, loss = self.quantize(self.quant_conv(self.encoder(x)))
        return self.decoder(self.post_quant_conv(zq)), loss

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> code indices [B, h*w] (no grad: tokenizers are frozen in RL)."""
        return self.quantize(self.quant_conv(self.encoder(_to_signed(images))))[1]

    @torch.no_grad()
    def decode(self, indices: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Indices [B, h*w] -> images [B, 3, H, W] in [0, 1]."""
        codes = self.quantize.lookup(indices, _resolve_grid(indices, grid))
        return _to_unit(self.decoder(self.post_quant_conv(codes)))


_OPTIONAL_KEYS = frozenset({"quantize.codebook_used"})  # usage statistics, not weights


def _read_state_dict(source: str | os.PathLike[str] | Mapping[str, Any]) -> Mapping[str, torch.Tensor]:
    if isinstance(source, Mapping):
        sd: Any = source
    elif str(source).endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(str(source))
    else:
        # LlamaGen training checkpoints pickle an argparse.Namespace: allow just that, keep weights_only.
        sd = safe_torch_load(source)
    for wrapper in ("model", "state_dict"):
        if isinstance(sd, Mapping) and isinstance(sd.get(wrapper), Mapping):
            sd = sd[wrapper]
            break
    if not isinstance(sd, Mapping):
        raise TypeError(f"checkpoint holds a {type(sd).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_llamagen_vq(
    source: str | os.PathLike[str] | Mapping[str, Any], config: VQConfig | str = "VQ-16"
) -> LlamaGenVQ:
    """Build :class:`LlamaGenVQ` and load LlamaGen weights (``{"model": sd}`` .pt, plain dict, or .safetensors).

    Raises ``KeyError`` naming missing/unexpected keys: a partial load would run but produce garbage.
    """
    model = LlamaGenVQ(config)
    sd = _read_state_dict(source)
    expected = set(model.state_dict())
    missing = sorted(expected - set(sd) - _OPTIONAL_KEYS)
    unexpected = sorted(set(sd) - expected - _OPTIONAL_KEYS)
    if missing or unexpected:
        raise KeyError(
            f"checkpoint does not match LlamaGenVQ({config!r}): {len(missing)} missing keys "
            f"{missing[:20]}, {len(unexpected)} unexpected keys {unexpected[:20]}"
        )
    model.load_state_dict({k: v for k, v in sd.items() if k in expected}, strict=False)
    return model.eval()


# ---- diffusers VQModel ----


class DiffusersVQ(_TokenizerBase):
    """:class:`ImageTokenizer` over a ``diffusers.VQModel`` (an instance, a local directory or a hub id)."""

    def __init__(self, model: Any, **from_pretrained_kwargs: Any) -> None:
        super().__init__()
        from diffusers import VQModel

        if not isinstance(model, VQModel):
            model = VQModel.from_pretrained(model, **from_pretrained_kwargs)
        self.model = model

    @property
    def codebook_size(self) -> int:
        return int(self.model.config.num_vq_embeddings)

    @property
    def downsample(self) -> int:
        # every DownEncoderBlock2D but the last halves the resolution
        return 2 ** (len(self.model.config.block_out_channels) - 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Signed pixels -> (reconstruction, VQ loss); diffusers' quantizer returns its loss unconditionally."""
        return self.model(x, return_dict=False)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> indices [B, h*w] (the quantizer returns them flat, batch-major)."""
        latents = self.model.encode(_to_signed(images)).latents
        indices = self.model.quantize(latents)[2][2]
        return indices.reshape(latents.shape[0], -1)

    @torch.no_grad()
    def decode(self, indices: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Indices [B, h*w] -> images [B, 3, H, W] in [0, 1]."""
        h, w = _resolve_grid(indices, grid)
        shape = (indices.shape[0], h, w, self.model.quantize.vq_embed_dim)
        if self.model.config.lookup_from_codebook:  # VQModel does the lookup itself in this mode
            out = self.model.decode(indices.reshape(-1), force_not_quantize=True, shape=shape).sample
        else:
            codes = self.model.quantize.get_codebook_entry(indices.reshape(-1), shape)
            out = self.model.decode(codes, force_not_quantize=True).sample
        return _to_unit(out)

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        self.model.save_pretrained(path)


def build_tiny_diffusers_vq(seed: int = 0) -> DiffusersVQ:
    """~1M-parameter VQModel (32x32 -> 8x8 tokens, 64 codes of dim 8) for offline pipelines and tests."""
    from diffusers import VQModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VQModel(
            block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8, sample_size=32,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            latent_channels=8, num_vq_embeddings=64, vq_embed_dim=8,
        )
    return DiffusersVQ(model).eval()


def train_vq(
    tokenizer: nn.Module, images_iter: Iterable[torch.Tensor], steps: int, lr: float = 1e-3, grad_clip: float = 1.0
) -> list[float]:
    """Fit ``tokenizer`` (``forward(x) -> (recon, vq_loss)``) on pixel MSE in [-1, 1] + VQ loss; returns losses.

    ``images_iter`` yields [B, 3, H, W] batches in [0, 1]; a list is cycled, a generator ends training when
    exhausted. No perceptual/GAN terms: this is for toy tokenizers on drawn shapes, not LlamaGen quality.
    """
    params = [p for p in tokenizer.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    device = params[0].device
    was_training = tokenizer.training
    tokenizer.train()
    history: list[float] = []
    it = iter(images_iter)
    try:
        for _ in range(steps):
            batch = next(it, None)
            if batch is None:  # re-iterables start over; an exhausted generator ends training
                it = iter(images_iter)
                if (batch := next(it, None)) is None:
                    break
            x = _to_signed(batch.to(device))
            recon, vq_loss = tokenizer(x)
            loss = F.mse_loss(recon, x) + vq_loss.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            history.append(float(loss.detach()))
    finally:
        tokenizer.train(was_training)
    return history
