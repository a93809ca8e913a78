"""The committed tiny image generator (``image_gen/assets/tiny``, built by scripts/build_tiny_image_gen.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from image_gen.gpt import GPT, GPTConfig
from image_gen.prompts import _pool, class_for_spec, render_spec, spec_to_prompt
from image_gen.rewards import geneval_rules
from image_gen.vq import DiffusersVQ, ImageTokenizer

ASSETS = Path(__file__).resolve().parents[1] / "image_gen" / "assets" / "tiny"
MAX_BYTES = 10 * 1024 * 1024


def _json(name: str):
    return json.loads((ASSETS / name).read_text())


@pytest.fixture(scope="module")
def classes() -> list[dict]:
    return _json("classes.json")["classes"]


@pytest.fixture(scope="module")
def vq() -> DiffusersVQ:
    return DiffusersVQ(str(ASSETS / "vq")).eval()


@pytest.fixture(scope="module")
def gpt() -> GPT:
    from safetensors.torch import load_file

    model = GPT(GPTConfig(**_json("gpt_config.json")))
    model.load_state_dict(load_file(str(ASSETS / "gpt.safetensors")), strict=True)
    return model.eval()


def test_layout_and_size_budget():
    for name in ("gpt.safetensors", "gpt_config.json", "classes.json", "build_info.json", "vq/config.json"):
        assert (ASSETS / name).is_file(), name
    assert list((ASSETS / "vq").glob("*.safetensors")), "VQ weights missing"
    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert total <= MAX_BYTES, f"assets are {total} bytes"
    info = _json("build_info.json")
    for key in ("seed", "date", "vq", "gpt", "prior_sample"):
        assert key in info
    assert info["vq"]["recon_reward"] > 0.8


def test_classes_match_prompts_module(classes):
    meta = _json("classes.json")
    singles = _pool("single_object")
    assert meta["num_classes"] == len(classes) == len(singles) == 18
    assert meta["null_class_id"] == 18
    for i, (row, spec) in enumerate(zip(classes, singles)):
        assert row["class_id"] == i
        assert row["spec"] == spec
        assert row["prompt"] == spec_to_prompt(spec, "single_object")
        assert row["global_class_id"] == class_for_spec(spec)
    assert len({(r["spec"]["objects"][0]["colour"], r["spec"]["objects"][0]["shape"]) for r in classes}) == 18


def test_gpt_config_fits_vq(vq, gpt):
    cfg = gpt.config
    assert isinstance(vq, ImageTokenizer)
    assert cfg.vocab_size == vq.codebook_size == 64
    assert vq.grid_size(32) == (8, 8) and cfg.block_size == 64
    assert cfg.num_classes == 18 and cfg.model_type == "c2i"


def test_vq_reconstructions_satisfy_specs(vq, classes):
    rows = classes[::4]  # a few specs over all colours/shapes
    images = torch.stack(
        [
            torch.from_numpy(
                np.asarray(render_spec(r["spec"], size=32, seed=10_000 + k), dtype=np.float32) / 255
            ).permute(2, 0, 1)
            for k, r in enumerate(rows)
        ]
    )
    tokens = vq.encode(images)
    assert tokens.shape == (len(rows), 64) and tokens.dtype == torch.long
    recon = vq.decode(tokens)
    scores = geneval_rules([r["prompt"] for r in rows], list(recon), spec=[r["spec"] for r in rows])
    assert float(np.mean(scores)) >= 0.7, scores


@torch.no_grad()
def test_prior_cfg_samples(vq, gpt):
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 7, 17])
    b = len(labels)
    cond = torch.cat([labels, gpt.null_condition(b)])
    idx = torch.zeros(b, 0, dtype=torch.long)
    for _ in range(gpt.config.block_size):
        logits = gpt(torch.cat([idx, idx]), cond)[:, -1]
        guided = logits[b:] + 2.0 * (logits[:b] - logits[b:])
        idx = torch.cat([idx, torch.multinomial(guided.softmax(-1), 1, generator=g)], 1)
    assert idx.shape == (b, 64)
    assert int(idx.min()) >= 0 and int(idx.max()) < vq.codebook_size
    images = vq.decode(idx)
    assert images.shape == (b, 3, 32, 32)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
