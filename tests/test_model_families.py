"""Qwen2-VL and Qwen3-VL (besides the tiny Qwen2.5-VL used everywhere else) through the real loading path:
a tiny random model saved to disk in transformers' format, loaded by path with ``load_model_and_processor``,
then sampled and scored by ``VisionPolicy`` — several images per prompt, and log-probs checked against a
plain forward pass."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import (
    AutoTokenizer,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from mmrl.policy import Sampling
from vision.modeling import TINY_TOKENIZER_DIR, VisionModelConfig, load_model_and_processor
from vision.policy import VisionPolicy


def _save_tiny(family: str, path) -> int:
    tok = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR))
    ids = {key: tok.convert_tokens_to_ids(token) for key, token in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=0, tie_word_embeddings=True)
    torch.manual_seed(0)
    if family == "qwen2_vl":
        rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}
        config = Qwen2VLConfig(text_config={**text, "rope_parameters": rope}, vision_config=dict(
            depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2), **ids)
        model, patch = Qwen2VLForConditionalGeneration(config), 14
    else:
        rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
        config = Qwen3VLConfig(text_config={**text, "head_dim": 16, "rope_parameters": rope}, vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
            spatial_merge_size=2, num_position_embeddings=64, deepstack_visual_indexes=[1]), **ids)
        model, patch = Qwen3VLForConditionalGeneration(config), 16
    factor = 2 * patch
    image_processor = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                               min_pixels=factor**2 * 4, max_pixels=factor**2 * 16)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    image_processor.save_pretrained(path)
    return factor


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_family_loads_by_path_samples_and_scores(family, tmp_path):
    factor = _save_tiny(family, tmp_path)
    model, processor = load_model_and_processor(VisionModelConfig(
        name_or_path=str(tmp_path), min_pixels=factor**2 * 4, max_pixels=factor**2 * 16))
    assert model.config.model_type == family
    assert "video_processor" not in type(processor).get_attributes()  # built without torchvision
    policy = VisionPolicy(model, processor)
    assert policy.size_factor == factor
    records = [
        {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}],
         "images": [Image.new("RGB", (100, 90), (255, 0, 0))], "answer": "red"},
        {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]}],
         "images": [Image.new("RGB", (64, 64)), Image.new("RGB", (128, 64), (0, 0, 255))], "answer": "no"},
    ]
    torch.manual_seed(0)
    rollout = policy.generate(model, records, 2, Sampling(max_new_tokens=5))
    assert rollout.completion_ids.shape[0] == 4
    assert rollout.columns["answer"] == ["red", "red", "no", "no"]
    assert [len(p) for p in rollout.inputs.lists["pixel_values"]] == [1, 1, 2, 2]
    logp, entropy = policy.log_probs(model, rollout, with_entropy=True)

    # Reference: the model's own logits from one ordinary forward pass.
    expected = plain_forward_logprobs(policy, model, rollout)
    mask = rollout.completion_mask.bool()
    torch.testing.assert_close(logp.detach()[mask], expected[mask], atol=1e-5, rtol=1e-5)
    assert entropy is not None and (entropy[mask] > 0).all()

    (logp * rollout.completion_mask).sum().backward()
    visual = [p for n, p in model.named_parameters() if "visual" in n]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in visual)


def plain_forward_logprobs(policy, model, rollout):
    """Log-probs of the completions from one ordinary forward pass of ``model`` over every sample's full
    inputs (each image copy included): the reference the policy's own scoring must equal."""
    inputs = policy._model_inputs(rollout.inputs, torch.device("cpu"))
    prompt_len = inputs["input_ids"].shape[1]
    inputs["input_ids"] = torch.cat([inputs["input_ids"], rollout.completion_ids], 1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], rollout.completion_mask], 1)
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(rollout.completion_ids)], 1)
    with torch.no_grad():
        logits = model(**inputs).logits[:, prompt_len - 1:-1].float()
    return logits.log_softmax(-1).gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)
