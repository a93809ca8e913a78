"""HPSv2 reward glue (the real model needs hpsv2 + torchvision, i.e. a CUDA build): the score is the
row-wise dot product of normalised image and text features, batched; missing pieces fail clearly."""

from __future__ import annotations

import argparse

import pytest
import torch

from image_gen.hps import HPSv2Reward, read_hps_state_dict
from mmrl.rewards import build_reward


class FakeOpenCLIP(torch.nn.Module):
    """OpenCLIP's interface: model(images, tokens) -> {"image_features", "text_features"}."""

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        image = torch.stack([images.mean((1, 2, 3)), torch.ones(len(images))], -1)  # [B, 2]
        text = torch.stack([tokens[:, 0].float(), torch.ones(len(tokens))], -1)
        return {"image_features": image, "text_features": text}


def _preprocess(pil) -> torch.Tensor:
    return torch.full((3, 2, 2), pil.getpixel((0, 0))[0] / 255.0)


def _tokenizer(texts: list[str]) -> torch.Tensor:
    return torch.tensor([[len(t)] for t in texts])


def test_hps_score_is_normalised_dot_product_per_pair():
    reward = HPSv2Reward(model=FakeOpenCLIP(), preprocess=_preprocess, tokenizer=_tokenizer, device="cpu", batch_size=2)
    black, white = torch.zeros(3, 4, 4), torch.ones(3, 4, 4)
    scores = reward(["ab", "a", "abc"], [black, white, white])
    # image (0, 1) vs text (2, 1): 1/sqrt(5); image (1, 1) vs (1, 1): 1; image (1, 1) vs (3, 1): 4/sqrt(20)
    assert scores == pytest.approx([1 / 5**0.5, 1.0, 4 / 20**0.5], abs=1e-6)


def test_hps_without_checkpoint_or_extra_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="HPS_v2.1_compressed.pt"):
        build_reward("hpsv2", {"checkpoint": str(tmp_path / "missing.pt")})
    (tmp_path / "hps.pt").write_bytes(b"")
    try:
        import hpsv2  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"mmrl\[hps\]"):
            HPSv2Reward(str(tmp_path / "hps.pt"), device="cpu")


def test_hps_checkpoint_is_read_weights_only(tmp_path):
    """The published HPS_v2*_compressed.pt is {"state_dict": ...}; open_clip's training checkpoints add plain
    entries. Both load with weights_only=True; a file pickling any class (even argparse.Namespace) is refused."""
    weights = {"visual.proj": torch.randn(4, 2), "module.logit_scale": torch.tensor(4.6)}
    torch.save({"state_dict": weights}, tmp_path / "compressed.pt")
    torch.save({"epoch": 3, "name": "hps", "state_dict": weights, "optimizer": {"state": {}, "param_groups": []}},
               tmp_path / "training.pt")
    for name in ("compressed.pt", "training.pt"):
        state = read_hps_state_dict(str(tmp_path / name))
        assert set(state) == {"visual.proj", "logit_scale"}  # a DDP "module." prefix is dropped
        assert torch.equal(state["visual.proj"], weights["visual.proj"])
    torch.save({"state_dict": weights, "args": argparse.Namespace(lr=1.0)}, tmp_path / "pickled.pt")
    with pytest.raises(RuntimeError, match=r"refused .*pickled\.pt: it pickles argparse\.Namespace"):
        read_hps_state_dict(str(tmp_path / "pickled.pt"))
