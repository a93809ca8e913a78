"""Image tokenizers: LlamaGen-compatible VQ (toy width) and the tiny diffusers VQModel."""

from __future__ import annotations

import argparse
from collections import OrderedDict

import pytest
import torch
from PIL import Image, ImageDraw

from image_gen.vq import (
    VQ_CONFIGS,
    AttnBlock,
    DiffusersVQ,
    ImageTokenizer,
    LlamaGenVQ,
    build_tiny_diffusers_vq,
    load_llamagen_vq,
    train_vq,
)


def _shapes(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Coloured rectangles/ellipses on a plain background, [n, 3, size, size] in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        r = torch.randint(0, 256, (7,), generator=g).tolist()
        img = Image.new("RGB", (size, size), tuple(r[:3]))
        draw = ImageDraw.Draw(img)
        x0, y0 = (torch.randint(0, size // 2, (2,), generator=g)).tolist()
        x1, y1 = x0 + size // 3 + r[3] % (size // 3), y0 + size // 3 + r[4] % (size // 3)
        shape = draw.ellipse if r[5] % 2 else draw.rectangle
        shape((x0, y0, x1, y1), fill=(r[6], 255 - r[6], r[0]))
        out.append(torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3))
    return torch.stack(out).permute(0, 3, 1, 2).float() / 255.0


@pytest.fixture(scope="module")
def tiny() -> LlamaGenVQ:
    torch.manual_seed(0)
    return LlamaGenVQ("VQ-tiny").eval()


def test_llamagen_tiny_encode_decode_shapes_and_ranges(tiny: LlamaGenVQ) -> None:
    assert isinstance(tiny, ImageTokenizer)
    assert tiny.downsample == 4 and tiny.grid_size(16) == (4, 4) and tiny.codebook_size == 64
    x = torch.rand(2, 3, 16, 16)
    idx = tiny.encode(x)
    assert idx.shape == (2, 16) and idx.dtype == torch.long
    assert int(idx.min()) >= 0 and int(idx.max()) < 64
    assert torch.equal(idx, tiny.encode(x))  # deterministic
    img = tiny.decode(idx)
    assert img.shape == (2, 3, 16, 16) and float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    # non-square grids need the grid spelled out
    assert tiny.decode(tiny.encode(torch.rand(1, 3, 8, 16)), grid=(2, 4)).shape == (1, 3, 8, 16)
    with pytest.raises(ValueError):
        tiny.grid_size(18)


def test_llamagen_quantizer_picks_nearest_normalised_code(tiny: LlamaGenVQ) -> None:
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        z = tiny.quant_conv(tiny.encoder(x * 2 - 1))
        flat = torch.nn.functional.normalize(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), dim=-1)
        book = torch.nn.functional.normalize(tiny.quantize.embedding.weight, dim=-1)
        nearest = torch.cdist(flat, book).argmin(1).reshape(2, -1)
        assert torch.equal(tiny.encode(x), nearest)
        # decoding the indices equals running the decoder on the quantised latents directly
        zq = book[nearest.reshape(-1)].reshape(2, 4, 4, -1).permute(0, 3, 1, 2)
        direct = ((tiny.decoder(tiny.post_quant_conv(zq)) + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(tiny.decode(nearest), direct)


def test_attention_matches_explicit_softmax() -> None:
    torch.manual_seed(0)
    block = AttnBlock(8, 4)
    x = torch.randn(2, 8, 3, 3)
    with torch.no_grad():
        h = block.norm(x)
        q, k, v = (t.reshape(2, 8, 9) for t in (block.q(h), block.k(h), block.v(h)))
        w = torch.softmax(q.transpose(1, 2) @ k / 8**0.5, dim=-1)  # [b, query, key]
        ref = x + block.proj_out((v @ w.transpose(1, 2)).reshape(2, 8, 3, 3))
        torch.testing.assert_close(block(x), ref)


def test_llamagen_state_dict_roundtrip_pt_and_safetensors(tiny: LlamaGenVQ, tmp_path) -> None:
    from safetensors.torch import save_file

    x = torch.rand(2, 3, 16, 16)
    sd = {k: v.clone() for k, v in tiny.state_dict().items()}
    pt = tmp_path / "vq_tiny.pt"
    torch.save({"model": sd, "steps": 3}, pt)
    st = tmp_path / "vq_tiny.safetensors"
    save_file(sd, str(st))
    for source in (pt, st, sd):
        loaded = load_llamagen_vq(source, "VQ-tiny")
        assert torch.equal(loaded.encode(x), tiny.encode(x))
        torch.testing.assert_close(loaded.decode(tiny.encode(x)), tiny.decode(tiny.encode(x)))
    # the official checkpoint carries a usage buffer that is statistics, not weights: tolerated
    load_llamagen_vq({**sd, "quantize.codebook_used": torch.zeros(65536)}, "VQ-tiny")


def test_llamagen_training_checkpoint_args_allowed_other_classes_refused(tiny: LlamaGenVQ, tmp_path) -> None:
    sd = {k: v.clone() for k, v in tiny.state_dict().items()}
    path = tmp_path / "vq_train.pt"
    torch.save({"model": sd, "args": argparse.Namespace(vq_model="VQ-16", codebook_size=16384)}, path)
    x = torch.rand(1, 3, 16, 16)
    assert torch.equal(load_llamagen_vq(path, "VQ-tiny").encode(x), tiny.encode(x))
    evil = tmp_path / "evil.pt"
    torch.save({"model": sd, "extra": _Unsafe()}, evil)
    with pytest.raises(RuntimeError, match=r"refused .*evil\.pt: it pickles .*_Unsafe"):
        load_llamagen_vq(evil, "VQ-tiny")


class _Unsafe(OrderedDict):
    """Any class outside the allow-list: weights_only must refuse it."""


def test_llamagen_wrong_key_is_a_clear_error(tiny: LlamaGenVQ) -> None:
    sd = dict(tiny.state_dict())
    sd["encoder.conv_input.weight"] = sd.pop("encoder.conv_in.weight")
    with pytest.raises(KeyError) as err:
        load_llamagen_vq({"model": sd}, "VQ-tiny")
    msg = str(err.value)
    assert "missing" in msg and "encoder.conv_in.weight" in msg and "encoder.conv_input.weight" in msg


def test_vq16_preset_matches_llamagen() -> None:
    cfg = VQ_CONFIGS["VQ-16"]
    assert (cfg.codebook_size, cfg.codebook_embed_dim, cfg.codebook_l2_norm) == (16384, 8, True)
    assert cfg.encoder_ch_mult == cfg.decoder_ch_mult == [1, 1, 2, 2, 4]
    assert (cfg.z_channels, cfg.ch, cfg.num_res_blocks, cfg.norm_num_groups) == (256, 128, 2, 32)
    model = LlamaGenVQ(cfg)  # ~1 s on CPU
    assert model.downsample == 16 and model.grid_size(256) == (16, 16)
    assert 71e6 < sum(p.numel() for p in model.parameters()) < 73e6
    keys = set(model.state_dict())
    for key in (
        "encoder.conv_in.weight",
        "encoder.conv_blocks.0.res.0.conv1.weight",
        "encoder.conv_blocks.0.downsample.conv.weight",
        "encoder.conv_blocks.2.res.0.nin_shortcut.weight",
        "encoder.conv_blocks.4.attn.1.proj_out.weight",
        "encoder.mid.1.q.weight",
        "decoder.conv_blocks.0.attn.2.k.weight",
        "decoder.conv_blocks.3.upsample.conv.weight",
        "decoder.conv_out.weight",
        "quantize.embedding.weight",
        "quantize.codebook_used",
        "quant_conv.weight",
        "post_quant_conv.weight",
    ):
        assert key in keys, key
    assert "encoder.conv_blocks.4.downsample.conv.weight" not in keys
    assert "decoder.conv_blocks.4.upsample.conv.weight" not in keys
    assert model.quantize.embedding.weight.shape == (16384, 8)


@pytest.fixture(scope="module")
def dvq() -> DiffusersVQ:
    return build_tiny_diffusers_vq(seed=0).eval()


def test_diffusers_vq_interface(dvq: DiffusersVQ, tmp_path) -> None:
    assert isinstance(dvq, ImageTokenizer)
    assert sum(p.numel() for p in dvq.parameters()) < 1.5e6
    assert dvq.codebook_size == 64 and dvq.downsample == 4 and dvq.grid_size(32) == (8, 8)
    x = _shapes(3)
    idx = dvq.encode(x)
    assert idx.shape == (3, 64) and idx.dtype == torch.long
    assert int(idx.min()) >= 0 and int(idx.max()) < 64
    # batching must not mix images: per-image encoding gives the same rows
    assert torch.equal(torch.cat([dvq.encode(x[i : i + 1]) for i in range(3)]), idx)
    img = dvq.decode(idx)
    assert img.shape == (3, 3, 32, 32) and float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    # decode(indices) == the VQModel's own quantise-then-decode path
    with torch.no_grad():
        ref = dvq.model.decode(dvq.model.encode(x * 2 - 1).latents).sample
    torch.testing.assert_close(img, ((ref + 1) / 2).clamp(0, 1), atol=1e-5, rtol=1e-5)

    dvq.save_pretrained(tmp_path / "tiny_vq")
    reloaded = DiffusersVQ(str(tmp_path / "tiny_vq"))
    assert torch.equal(reloaded.encode(x), idx)


def test_train_vq_lowers_loss() -> None:
    torch.manual_seed(0)
    vq = build_tiny_diffusers_vq(seed=1)
    batch = _shapes(4, seed=3)
    history = train_vq(vq, [batch], steps=10, lr=2e-3)
    assert len(history) == 10 and all(h == h for h in history)
    assert sum(history[-3:]) / 3 < 0.8 * sum(history[:3]) / 3
    assert not vq.training  # restores the mode it found


def test_train_vq_on_llamagen_and_generator_exhaustion() -> None:
    torch.manual_seed(0)
    model = LlamaGenVQ("VQ-tiny")
    batches = (torch.rand(2, 3, 16, 16) for _ in range(2))  # a generator: training stops when it runs out
    history = train_vq(model, batches, steps=5)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(history)))
    assert model.quantize.embedding.weight.grad is not None  # codebook term reaches the embedding


def test_diffusers_decode_with_lookup_from_codebook() -> None:
    vq = build_tiny_diffusers_vq(seed=0)
    idx = vq.encode(_shapes(2))
    expected = vq.decode(idx)
    vq.model.register_to_config(lookup_from_codebook=True)  # VQModel then looks codes up itself
    torch.testing.assert_close(vq.decode(idx), expected)
