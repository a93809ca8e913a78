"""image_gen.gpt: the LlamaGen-architecture image-token transformer on the tiny preset (CPU, fast)."""

from __future__ import annotations

import argparse

import pytest
import torch

from image_gen.gpt import (
    GPT,
    GPT_CONFIGS,
    GPTConfig,
    get_config,
    precompute_freqs_cis_2d,
)
from image_gen.llamagen_checkpoint import load_llamagen_checkpoint

T2I_TOKENS = 6  # short caption prefix keeps the t2i tests fast
UNPICKLED: list[str] = []  # what _record_unpickle saw: stays empty unless a full unpickle ran


def _record_unpickle() -> str:
    UNPICKLED.append("ran")
    return "payload"


class Payload:
    """Unpickling this calls a function: what a malicious checkpoint would do."""

    def __reduce__(self):
        return (_record_unpickle, ())


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls gain nothing from threads, and on a busy CPU thread hand-offs dominate the run time."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _build(model_type: str = "c2i", seed: int = 0, **overrides) -> GPT:
    if model_type == "t2i":
        overrides = {"cls_token_num": T2I_TOKENS, **overrides}
    cfg = get_config("GPT-tiny", model_type=model_type, **overrides)
    torch.manual_seed(seed)
    model = GPT(cfg)
    torch.nn.init.normal_(model.output.weight, std=0.5)  # LlamaGen zero-inits it: logits would be all 0
    return model.eval()


def _cond(model: GPT, batch: int = 2) -> torch.Tensor:
    cfg = model.config
    if cfg.model_type == "c2i":
        return torch.arange(batch) % cfg.num_classes + 1
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, cfg.cls_token_num, cfg.caption_dim, generator=g)


def _tokens(model: GPT, batch: int = 2, t: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, model.config.vocab_size, (batch, t or model.config.block_size), generator=g)


@pytest.mark.parametrize("model_type", ["c2i", "t2i"])
def test_forward_shapes(model_type):
    model = _build(model_type)
    cond, idx = _cond(model), _tokens(model, t=5)
    logits = model(idx, cond)
    assert logits.shape == (2, 6, model.config.vocab_size) and logits.dtype == torch.float32
    assert model(idx[:, :0], cond).shape == (2, 1, model.config.vocab_size)  # prefix only
    hidden = model(idx, cond, return_hidden=True)
    assert hidden.shape == (2, 6, model.config.dim)
    torch.testing.assert_close(model.output(hidden).float(), logits)
    with pytest.raises(ValueError, match="block_size"):
        model(_tokens(model, t=model.config.block_size + 1), cond)


def test_causal():
    model = _build()
    cond, idx = _cond(model), _tokens(model)
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % model.config.vocab_size
    a, b = model(idx, cond), model(changed, cond)
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=0)  # logits[:, i] only sees tokens < i
    assert not torch.allclose(a[:, 8:], b[:, 8:])


@pytest.mark.parametrize("model_type", ["c2i", "t2i"])
def test_kv_cache_matches_full_forward(model_type):
    model = _build(model_type, n_kv_head=2)  # exercise GQA too
    cond, idx = _cond(model), _tokens(model)
    cond_mask = None
    if model_type == "t2i":  # left-padded captions of different lengths
        cond_mask = torch.ones(2, T2I_TOKENS, dtype=torch.bool)
        cond_mask[1, :2] = False
    with torch.no_grad():
        full = model(idx, cond, cond_mask=cond_mask)
        model.setup_cache(max_batch_size=2)
        steps = [model.prefill(cond, cond_mask=cond_mask)]
        for i in range(idx.shape[1]):
            steps.append(model.forward_step(idx[:, i]))
    torch.testing.assert_close(torch.stack(steps, dim=1), full, rtol=0, atol=1e-5)
    assert not torch.allclose(full[0], full[1])  # the two rows really are conditioned differently
    model.clear_cache()
    with pytest.raises(RuntimeError, match="setup_cache"):
        model.forward_step(idx[:, 0])


def test_cond_mask_hides_padded_caption_tokens():
    model = _build("t2i")
    cond, idx = _cond(model), _tokens(model, t=4)
    mask = torch.ones(2, T2I_TOKENS, dtype=torch.bool)
    mask[:, :3] = False
    noisy = cond.clone()
    noisy[:, :3] += 5.0  # padded positions change; image-token logits must not
    a, b = model(idx, cond, cond_mask=mask), model(idx, noisy, cond_mask=mask)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, model(idx, noisy))  # without the mask they do matter


@pytest.mark.parametrize("model_type", ["c2i", "t2i"])
def test_null_condition(model_type):
    model = _build(model_type)
    null, cond, idx = model.null_condition(2), _cond(model), _tokens(model, t=3)
    if model_type == "c2i":
        assert null.tolist() == [model.config.num_classes] * 2
    else:
        assert null.shape == (2, T2I_TOKENS, model.config.caption_dim)
    uncond = model(idx, null)
    assert not torch.allclose(uncond, model(idx, cond))
    dropped = model(idx, cond, drop_cond=torch.tensor([True, False]))
    torch.testing.assert_close(dropped[0], uncond[0])
    torch.testing.assert_close(dropped[1], model(idx, cond)[1])


def test_2d_rope_table():
    cfg = GPT_CONFIGS["GPT-tiny"]
    grid, hd, c = cfg.grid_size, cfg.head_dim, 3
    table = precompute_freqs_cis_2d(grid, hd, cfg.rope_base, c)
    assert table.shape == (c + grid * grid, hd // 2, 2)
    assert torch.all(table[:c] == 0)  # LlamaGen: condition tokens get a zero table
    img = table[c:].view(grid, grid, hd // 2, 2)
    q = hd // 4
    # first quarter of the pairs follows the row, second the column
    torch.testing.assert_close(img[:, 0, :q], img[:, 3, :q])
    torch.testing.assert_close(img[0, :, q:], img[3, :, q:])
    assert not torch.allclose(img[1, 0], img[0, 1])
    torch.testing.assert_close(img[0, 0, :, 0], torch.ones(hd // 2))  # (0, 0) is the identity rotation
    angle = torch.atan2(img[2, 1, :, 1], img[2, 1, :, 0])
    inv = 1.0 / cfg.rope_base ** (torch.arange(q) * 2 / (hd // 2))
    torch.testing.assert_close(angle, torch.cat([2 * inv, 1 * inv]))


@pytest.mark.parametrize("model_type", ["c2i", "t2i"])
def test_llamagen_checkpoint_round_trip(model_type, tmp_path):
    model = _build(model_type)
    sd = model.state_dict()
    assert "freqs_cis" not in sd and "tok_embeddings.weight" in sd
    assert {"layers.0.attention.wqkv.weight", "layers.1.feed_forward.w3.weight", "norm.weight"} <= set(sd)
    if model_type == "c2i":
        assert sd["cls_embedding.embedding_table.weight"].shape[0] == model.config.num_classes + 1
    else:
        assert {"cls_embedding.cap_proj.fc1.weight", "cls_embedding.uncond_embedding"} <= set(sd)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": sd, "steps": 10}, path)
    loaded = load_llamagen_checkpoint(path, model.config)
    cond, idx = _cond(model), _tokens(model, t=4)
    torch.testing.assert_close(loaded(idx, cond), model(idx, cond), rtol=0, atol=0)
    # DDP-prefixed dict under "module" also loads
    wrapped = {"module": {f"module.{k}": v for k, v in sd.items()}}
    from_dict = load_llamagen_checkpoint(wrapped, model.config)
    torch.testing.assert_close(from_dict(idx, cond), model(idx, cond))
    assert from_dict.norm.weight.data_ptr() != model.norm.weight.data_ptr()  # copied, not aliased


def test_safetensors_checkpoint(tmp_path):
    from safetensors.torch import save_file

    model = _build()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "m.safetensors")
    loaded = load_llamagen_checkpoint(tmp_path / "m.safetensors", model.config)
    idx, cond = _tokens(model, t=2), _cond(model)
    torch.testing.assert_close(loaded(idx, cond), model(idx, cond))


def test_checkpoint_mismatch_names_keys(tmp_path):
    model = _build()
    sd = model.state_dict()
    sd["layers.0.attention.qkv.weight"] = sd.pop("layers.0.attention.wqkv.weight")
    torch.save({"model": sd}, tmp_path / "bad.pt")
    with pytest.raises(ValueError) as err:
        load_llamagen_checkpoint(tmp_path / "bad.pt", model.config)
    assert "layers.0.attention.wqkv.weight" in str(err.value)  # missing
    assert "layers.0.attention.qkv.weight" in str(err.value)  # unexpected
    with pytest.raises(ValueError, match="shape mismatches.*tok_embeddings"):
        load_llamagen_checkpoint({"model": model.state_dict()}, get_config("GPT-tiny", vocab_size=128))


def test_presets():
    sizes = {"GPT-B": (12, 12, 768), "GPT-L": (24, 16, 1024), "GPT-XL": (36, 20, 1280), "GPT-XXL": (48, 24, 1536)}
    for name, (n_layer, n_head, dim) in sizes.items():
        cfg = GPT_CONFIGS[name]
        assert (cfg.n_layer, cfg.n_head, cfg.dim) == (n_layer, n_head, dim)
        assert (cfg.vocab_size, cfg.block_size, cfg.num_classes, cfg.cls_token_num) == (16384, 256, 1000, 1)
    assert GPT_CONFIGS["GPT-B"].ffn_hidden_dim == 2048
    assert GPT_CONFIGS["GPT-XL"].ffn_hidden_dim == 3584
    t2i = get_config("GPT-XL", model_type="t2i", cls_token_num=120)
    assert t2i.caption_dim == 2048 and t2i.head_dim == 64
    GPT(GPT_CONFIGS["GPT-tiny"])  # constructs
    with pytest.raises(ValueError):
        GPTConfig(block_size=250)
    with pytest.raises(ValueError):
        get_config("GPT-tiny", cls_token_num=120)  # c2i takes a single class token
    with pytest.raises(KeyError):
        get_config("GPT-huge")


def test_llamagen_training_checkpoint_with_args_loads_safely(tmp_path):
    """LlamaGen's train scripts save {"model", "args": argparse.Namespace, ...}: model.gpt = that file loads
    through the task without trust_pickle; a file pickling anything else is refused without running it."""
    from image_gen.task import ImageGenModelConfig, _load_gpt

    model = _build()
    args = argparse.Namespace(gpt_model="GPT-tiny", image_size=64, lr=1e-4, results_dir="/tmp/results")
    path = tmp_path / "0010000.pt"
    torch.save({"model": model.state_dict(), "args": args, "steps": 10000}, path)
    cfg = ImageGenModelConfig(gpt=str(path), gpt_config="GPT-tiny", num_classes=10, image_size=64)
    loaded = _load_gpt(cfg)
    idx, cond = _tokens(model, t=3), _cond(model)
    torch.testing.assert_close(loaded(idx, cond), model(idx, cond))

    evil = tmp_path / "evil.pt"
    torch.save({"model": model.state_dict(), "args": args, "extra": Payload()}, evil)
    UNPICKLED.clear()
    with pytest.raises(RuntimeError, match=r"refused .*evil\.pt: it pickles .*_record_unpickle.*trust_pickle=True"):
        _load_gpt(ImageGenModelConfig(gpt=str(evil), gpt_config="GPT-tiny", num_classes=10, image_size=64))
    assert UNPICKLED == []
    # the explicit escape hatch still loads a trusted file (and runs its pickle)
    trusted = load_llamagen_checkpoint(evil, model.config, trust_pickle=True)
    assert UNPICKLED == ["ran"]
    torch.testing.assert_close(trusted(idx, cond), model(idx, cond))


def _packed_linears(model: GPT) -> list:
    from image_gen.gpt import Linear

    return [m for m in model.modules() if isinstance(m, Linear) and m.packed is not None]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_decoding_packs_the_linears_only_between_setup_and_clear_and_only_without_autograd():
    from image_gen.gpt import Linear

    model = _build()
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(linears) == 5 * model.config.n_layer + 1  # wqkv, wo, w1, w2, w3 per layer + the head
    keys = set(model.state_dict())
    with torch.no_grad():
        plain = model.output(torch.randn(3, model.config.dim, generator=torch.Generator().manual_seed(0)))
        model.setup_cache(max_batch_size=2)
        assert len(_packed_linears(model)) == len(linears)
        packed = model.output(torch.randn(3, model.config.dim, generator=torch.Generator().manual_seed(0)))
        torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)  # the same product, another summation order
        with torch.enable_grad():  # a forward with autograd never takes the packed copy
            x = torch.randn(3, model.config.dim, requires_grad=True)
            model.output(x).sum().backward()
            assert model.output.weight.grad is not None and x.grad is not None
        assert set(model.state_dict()) == keys  # the packed copies are not state
        model.clear_cache()
    assert _packed_linears(model) == []


def test_sampling_with_and_without_packed_weights_draws_the_same_tokens(monkeypatch):
    """Greedy and seeded sampling give the same tokens whether the decoding step multiplies by packed weights
    or by ``F.linear`` (packing is a detail of the CPU kernel, not of the distribution); the packed copies are
    gone after the call, also when it fails."""
    import image_gen.gpt as gpt
    from image_gen.sampling import sample_image_tokens

    model, can_pack = _build(), gpt._can_pack
    cond = _cond(model)
    runs = {}
    for packing in (True, False):
        monkeypatch.setattr(gpt, "_can_pack", can_pack if packing else (lambda weight: False))
        runs[packing] = [sample_image_tokens(model, cond, 12, cfg_scale=2.0, temperature=t, with_logp=True,
                                             generator=torch.Generator().manual_seed(3)) for t in (0.0, 1.0)]
        assert _packed_linears(model) == []
    (greedy_a, sampled_a), (greedy_b, sampled_b) = runs[True], runs[False]
    assert torch.equal(greedy_a.tokens, greedy_b.tokens) and torch.equal(sampled_a.tokens, sampled_b.tokens)
    torch.testing.assert_close(sampled_a.logp, sampled_b.logp, rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(gpt, "_can_pack", can_pack)

    def fail(*args, **kwargs):
        assert _packed_linears(model) or not torch.backends.mkldnn.is_available()  # packed while decoding
        raise RuntimeError("interrupted")

    monkeypatch.setattr(model, "forward_step", fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        sample_image_tokens(model, cond, 4, cfg_scale=2.0)
    assert _packed_linears(model) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_is_llamagens_formula_bit_for_bit(dtype):
    """apply_rotary_emb's x·cos + swap(x)·sin form equals LlamaGen's (x0·cos − x1·sin, x1·cos + x0·sin)
    exactly, condition positions (all-zero angles) included."""
    from image_gen.gpt import apply_rotary_emb, rotary_tables

    freqs = precompute_freqs_cis_2d(4, 16, 10000.0, 2)  # [2 + 16, 8, 2]
    x = torch.randn(3, freqs.shape[0], 5, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    table = freqs.view(1, freqs.shape[0], 1, -1, 2)
    want = torch.stack([pairs[..., 0] * table[..., 0] - pairs[..., 1] * table[..., 1],
                        pairs[..., 1] * table[..., 0] + pairs[..., 0] * table[..., 1]], dim=-1).flatten(3).to(dtype)
    got = apply_rotary_emb(x, rotary_tables(freqs))
    assert got.dtype == dtype and torch.equal(got, want)
    assert torch.equal(got[:, :2], torch.zeros_like(got[:, :2]))  # condition tokens: q/k vanish, as in LlamaGen
