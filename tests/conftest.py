"""Shared test fixtures."""

from __future__ import annotations

import json
import string

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """A random, tiny CLIP with a character-level CLIP tokenizer, saved locally (nothing downloaded)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    path = tmp_path_factory.mktemp("clip")
    vocab: dict[str, int] = {}
    for ch in string.ascii_lowercase + string.digits:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    bos, eos = len(vocab), len(vocab) + 1
    vocab.update({"<|startoftext|>": bos, "<|endoftext|>": eos})
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), pad_token="<|endoftext|>")
    image_proc = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    text_cfg = dict(
        small, vocab_size=len(vocab), max_position_embeddings=48, bos_token_id=bos, eos_token_id=eos
    )
    config = CLIPConfig(
        text_config=text_cfg, vision_config=dict(small, image_size=16, patch_size=8), projection_dim=8
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    CLIPProcessor(image_processor=image_proc, tokenizer=tok).save_pretrained(path)
    return str(path)
