"""HPSv2 (Human Preference Score v2) reward — an optional extra: ``pip install "mmrl[hps]"``.

HPSv2 is an OpenCLIP ViT-H-14 fine-tuned on human preference pairs; the score of (prompt, image) is the
dot product of the L2-normalised image and text embeddings (no logit scale), as ``hpsv2.score`` computes
it. AR-GRPO uses HPSv2.1 as one of its rewards.

The ``hpsv2`` package bundles its own OpenCLIP copy, whose image transforms need torchvision — so this
reward needs a CUDA machine with torchvision (it cannot run on the CPU-only CI). Nothing is downloaded:
``checkpoint`` must be a local copy of ``HPS_v2.1_compressed.pt`` (or ``HPS_v2_compressed.pt``) from the
``xswu/HPSv2`` hub repository; the OpenCLIP backbone is built with ``pretrained=None`` because the HPS
checkpoint holds every weight.

Registered as the reward factory ``hpsv2``: ``{name: hpsv2, args: {checkpoint: /path/HPS_v2.1_compressed.pt}}``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from image_gen.rewards import to_pil
from image_gen.safe_load import safe_torch_load
from mmrl.rewards import register_reward_factory

HPS_BACKBONE = "ViT-H-14"


def _load_open_clip(checkpoint: str, device: torch.device) -> tuple[torch.nn.Module, Callable, Callable]:
    try:
        from hpsv2.src.open_clip import create_model_and_transforms, get_tokenizer
    except ImportError as exc:
        raise ImportError("the hpsv2 reward needs the optional extra: pip install 'mmrl[hps]' "
                          f"(hpsv2's OpenCLIP needs torchvision, i.e. a CUDA torch build) — {exc}") from exc
    model, _, preprocess = create_model_and_transforms(HPS_BACKBONE, pretrained=None, precision="fp32",
                                                       device=device, output_dict=True)
    model.load_state_dict(read_hps_state_dict(checkpoint, device))
    return model.eval().requires_grad_(False), preprocess, get_tokenizer(HPS_BACKBONE)


def read_hps_state_dict(checkpoint: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The weights of an HPSv2 checkpoint, read with ``weights_only=True`` and nothing else allowed: the
    published ``HPS_v2*_compressed.pt`` files hold ``{"state_dict": ...}`` (an OpenCLIP training
    checkpoint adds plain epoch/name/optimizer entries), so a file pickling any class is refused."""
    state = safe_torch_load(checkpoint, allowed=(), map_location=device)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise TypeError(f"hpsv2 checkpoint {checkpoint} holds a {type(state).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


class HPSv2Reward:
    """``fn(prompts, completions, **kw) -> list[float]``: HPSv2 score per (prompt, image), batched.

    ``model``/``preprocess``/``tokenizer`` can be passed directly (anything with OpenCLIP's interface:
    ``model(images, tokens)`` returning ``{"image_features", "text_features"}``); otherwise they are
    loaded from ``checkpoint``.
    """

    def __init__(self, checkpoint: str | None = None, device: str | torch.device | None = None, batch_size: int = 16,
                 model: torch.nn.Module | None = None, preprocess: Callable | None = None,
                 tokenizer: Callable | None = None) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if model is None:
            if checkpoint is None or not Path(checkpoint).is_file():
                raise FileNotFoundError(f"hpsv2 reward: args.checkpoint={checkpoint!r} must be a local copy of "
                                        "HPS_v2.1_compressed.pt (hub repo xswu/HPSv2); nothing is downloaded")
            model, preprocess, tokenizer = _load_open_clip(checkpoint, self.device)
        if preprocess is None or tokenizer is None:
            raise ValueError("hpsv2 reward: pass preprocess and tokenizer together with model")
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer
        self.batch_size = batch_size
        self.__name__ = "hpsv2"

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        scores: list[float] = []
        for start in range(0, len(completions), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            images = torch.stack([self.preprocess(to_pil(c)) for c in completions[chunk]]).to(self.device)
            tokens = self.tokenizer([str(p) for p in prompts[chunk]]).to(self.device)
            out = self.model(images, tokens)
            # Row-wise <image_i, text_i>: the diagonal of image_features @ text_features.T, without the
            # full matrix. OpenCLIP already returns normalised features; normalising again is a no-op then.
            image = torch.nn.functional.normalize(out["image_features"].float(), dim=-1)
            text = torch.nn.functional.normalize(out["text_features"].float(), dim=-1)
            scores.extend((image * text).sum(-1).tolist())
        return scores


@register_reward_factory("hpsv2")
def hpsv2(checkpoint: str, device: str | None = None, batch_size: int = 16) -> HPSv2Reward:
    """Config: ``{name: hpsv2, args: {checkpoint: /path/to/HPS_v2.1_compressed.pt}}``."""
    return HPSv2Reward(checkpoint, device, batch_size)
