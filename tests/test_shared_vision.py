"""vision.shared_vision: each unique image is encoded once per generate / forward call, with the same
completions, log-probs and gradients as encoding every sample's copy — for tiny Qwen2-VL, Qwen2.5-VL and
Qwen3-VL (deepstack) models, several images per prompt and text-only prompts in the same batch."""

from __future__ import annotations

import contextlib

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
from tests.test_model_families import plain_forward_logprobs
from vision.masking import MaskingConfig
from vision.modeling import TINY_TOKENIZER_DIR, build_processor, build_tiny_model, set_pixel_bounds
from vision.policy import VisionPolicy
from vision.shared_vision import plan_images, shared_image_features

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
GROUP = 3


def _tiny(family: str):
    """(model, processor), random init, float32, no files."""
    if family == "qwen2_5_vl":
        model, processor = build_tiny_model("tiny-qwen2.5-vl")
        set_pixel_bounds(processor.image_processor, 28 * 28 * 4, 28 * 28 * 16)
        processor.tokenizer.padding_side = "left"
        return model.float().eval(), processor
    tok = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR), padding_side="left")
    ids = {key: tok.convert_tokens_to_ids(token) for key, token in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=0, tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if family == "qwen2_vl":
            rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}
            model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(
                text_config={**text, "rope_parameters": rope}, vision_config=dict(
                    depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                    spatial_merge_size=2), **ids))
            patch = 14
        else:
            rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
            model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(
                text_config={**text, "head_dim": 16, "rope_parameters": rope}, vision_config=dict(
                    depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                    spatial_merge_size=2, num_position_embeddings=64, deepstack_visual_indexes=[1]), **ids))
            patch = 16
    factor = 2 * patch
    image_processor = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                               min_pixels=factor**2 * 4, max_pixels=factor**2 * 16)
    return model.float().eval(), build_processor(family, tok, image_processor)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    model, processor = _tiny(request.param)
    assert model.config.model_type == request.param
    return request.param, model, processor


def _records() -> list[dict]:
    """Two images, text only, one image: 3 unique images, 9 occurrences with G=3."""
    def image_turn(n, text):
        return [{"role": "user", "content": [*([{"type": "image"}] * n), {"type": "text", "text": text}]}]

    return [
        {"prompt": image_turn(2, "Same colour?"), "answer": "no",
         "images": [Image.new("RGB", (100, 90), (255, 0, 0)), Image.new("RGB", (128, 64), (0, 0, 255))]},
        {"prompt": image_turn(0, "Say hi."), "images": [], "answer": "hi"},
        {"prompt": image_turn(1, "What colour?"), "answer": "green",
         "images": [Image.new("RGB", (70, 120), (0, 200, 30))]},
    ]


@contextlib.contextmanager
def count_images(model):
    """Counts the images the vision tower encodes (one ``grid_thw`` row per image)."""
    counts = []

    def hook(module, args, kwargs):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        counts.append(int(grid.shape[0]))

    handle = model.model.visual.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield counts
    finally:
        handle.remove()


def _sample(policy, model, seed=0, **sampling):
    torch.manual_seed(seed)
    return policy.generate(model, _records(), GROUP, Sampling(max_new_tokens=6, temperature=1.0, **sampling))


def test_generation_encodes_each_image_once_and_samples_the_same(family):
    name, model, processor = family
    shared = VisionPolicy(model, processor, record_sampler_logp=True)
    unshared = VisionPolicy(model, processor, record_sampler_logp=True, share_vision=False, share_prompt=False)
    with count_images(model) as counts:
        a = _sample(shared, model)
    assert counts == [3]  # 3 unique images, not 9 occurrences
    assert shared.images_encoded == 3
    with count_images(model) as counts:
        b = _sample(unshared, model)
    assert counts == [9]
    torch.testing.assert_close(a.completion_ids, b.completion_ids, rtol=0, atol=0)
    torch.testing.assert_close(a.completion_mask, b.completion_mask, rtol=0, atol=0)
    torch.testing.assert_close(a.sampler_logp, b.sampler_logp, rtol=1e-5, atol=1e-5)
    # The model is left as it was: no per-instance method stays behind.
    assert "get_image_features" not in vars(model.model)


def _loss_and_grads(policy, model, rollout):
    model.zero_grad(set_to_none=True)
    logp, entropy = policy.log_probs(model, rollout, with_entropy=True)
    weights = torch.linspace(-1.0, 2.0, logp.numel()).reshape(logp.shape)  # uneven: no symmetric cancellation
    (logp * weights * rollout.completion_mask).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logp.detach(), entropy, grads


def _assert_same_grads(shared: dict, unshared: dict):
    assert shared.keys() == unshared.keys()
    assert any("visual" in n for n in shared)
    for n, g in unshared.items():
        scale = float(g.abs().max())
        torch.testing.assert_close(shared[n], g, rtol=1e-5, atol=1e-5 * scale + 1e-12, msg=n)


def test_log_probs_and_gradients_equal_encoding_every_copy(family):
    name, model, processor = family
    shared = VisionPolicy(model, processor)
    unshared = VisionPolicy(model, processor, share_vision=False, share_prompt=False)
    rollout = _sample(shared, model)
    with count_images(model) as counts:
        logp, entropy, grads = _loss_and_grads(shared, model, rollout)
    assert counts == [3]
    with count_images(model) as counts:
        ref_logp, ref_entropy, ref_grads = _loss_and_grads(unshared, model, rollout)
    assert counts == [9]
    mask = rollout.completion_mask.bool()
    torch.testing.assert_close(logp[mask], ref_logp[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy[mask], ref_entropy[mask], rtol=1e-5, atol=1e-5)
    _assert_same_grads(grads, ref_grads)
    visual = {n: g for n, g in grads.items() if "visual" in n}
    assert any(g.abs().sum() > 0 for g in visual.values())

    # Against the model's own logits from a plain forward pass over every copy.
    expected = plain_forward_logprobs(shared, model, rollout)
    torch.testing.assert_close(logp[mask], expected[mask], rtol=1e-5, atol=1e-5)


def test_micro_batches_share_within_themselves(family):
    name, model, processor = family
    shared = VisionPolicy(model, processor)
    unshared = VisionPolicy(model, processor, share_vision=False, share_prompt=False)
    rollout = _sample(shared, model)
    part = rollout.select(torch.tensor([1, 2, 4, 8, 7]))  # 2 of prompt 0 (2 images each), 1 text, 2 of prompt 2
    with count_images(model) as counts, torch.no_grad():
        logp, _ = shared.log_probs(model, part)
        ref, _ = unshared.log_probs(model, part)
    assert counts == [3, 6]
    mask = part.completion_mask.bool()
    torch.testing.assert_close(logp[mask], ref[mask], rtol=1e-5, atol=1e-5)


def test_papo_masked_view_shares_and_scores_the_same(family):
    name, model, processor = family
    shared = VisionPolicy(model, processor, masking=MaskingConfig())
    unshared = VisionPolicy(model, processor, masking=MaskingConfig(), share_vision=False, share_prompt=False)
    rollout = _sample(shared, model)
    masked, has_view = shared.masked_view(rollout, torch.Generator().manual_seed(0))
    assert has_view.tolist() == [True] * GROUP + [False] * GROUP + [True] * GROUP
    pixels = masked.inputs.lists["pixel_values"]
    assert all(pixels[k][0] is pixels[0][0] for k in range(GROUP))  # the group's copies are one tensor object
    with count_images(model) as counts:
        logp, _, grads = _loss_and_grads(shared, model, masked)
        ref_logp, _, ref_grads = _loss_and_grads(unshared, model, masked)
    assert counts == [3, 9]
    mask = masked.completion_mask.bool()
    torch.testing.assert_close(logp[mask], ref_logp[mask], rtol=1e-5, atol=1e-5)
    _assert_same_grads(grads, ref_grads)
    with torch.no_grad():
        original, _ = shared.log_probs(model, rollout)
    assert not torch.allclose(logp[:GROUP], original[:GROUP])  # the masked images are seen, not the originals


def test_plan_images_keys_on_object_identity():
    a, b = torch.randn(16, 8), torch.randn(4, 8)
    grid_a, grid_b = torch.tensor([[1, 4, 4]]), torch.tensor([[1, 2, 2]])
    copy_of_a = a.clone()  # equal values, another object: encoded again (no value hashing)
    plan = plan_images([[a, b], [], [a, b], [copy_of_a]], [[grid_a, grid_b], [], [grid_a, grid_b], [grid_a]])
    assert plan.index == [0, 1, 0, 1, 2]
    assert plan.num_unique == 3 and plan.pixel_values.shape[0] == 36
    assert plan.image_grid_thw.tolist() == [[1, 4, 4], [1, 2, 2], [1, 4, 4], [1, 2, 2], [1, 4, 4]]
    assert plan_images([[], []], [[], []]) is None


def test_wrong_inputs_inside_the_block_raise():
    model, processor = _tiny("qwen2_5_vl")
    policy = VisionPolicy(model, processor)
    inputs = policy.encode_prompts(_records()).select(torch.tensor([0, 0]))
    full = policy._model_inputs(inputs, torch.device("cpu"))  # every copy's pixels, not the unique ones
    plan = plan_images(inputs.lists["pixel_values"], inputs.lists["image_grid_thw"])
    with shared_image_features(model, plan), pytest.raises(RuntimeError, match="plan's pixel_values"), torch.no_grad():
        model(**full)
    assert "get_image_features" not in vars(model.model)


@contextlib.contextmanager
def count_prefill_rows(model):
    """Rows of every language-model forward that processes more than one position (the prompt prefill)."""
    rows = []

    def hook(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None and embeds.shape[1] > 1:
            rows.append(int(embeds.shape[0]))

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield rows
    finally:
        handle.remove()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generation_prefills_each_prompt_once_and_samples_the_same(family, temperature):
    """Prompt sharing: P prompt rows are prefilled (not P·G) and the KV cache is copied per group; the
    samples, masks and recorded sampler log-probs equal prefilling every row — with images, several
    images per prompt and a text-only prompt in the same batch, and for a batch without any image."""
    name, model, processor = family
    shared = VisionPolicy(model, processor, record_sampler_logp=True)
    unshared = VisionPolicy(model, processor, record_sampler_logp=True, share_prompt=False)
    for records in (_records(), [_records()[1]]):
        runs = []
        for policy in (shared, unshared):
            torch.manual_seed(0)
            with count_prefill_rows(model) as rows:
                runs.append(policy.generate(model, records, GROUP, Sampling(max_new_tokens=6, temperature=temperature)))
            assert rows == ([len(records)] if policy is shared else [len(records) * GROUP])
        a, b = runs
        torch.testing.assert_close(a.completion_ids, b.completion_ids, rtol=0, atol=0)
        torch.testing.assert_close(a.completion_mask, b.completion_mask, rtol=0, atol=0)
        torch.testing.assert_close(a.sampler_logp, b.sampler_logp, rtol=1e-5, atol=1e-5)
        # the rollout still holds every row's full prompt: it re-scores like the unshared one
        assert torch.equal(a.inputs.tensors["input_ids"], b.inputs.tensors["input_ids"])
        torch.testing.assert_close(shared.log_probs(model, a)[0].detach(), unshared.log_probs(model, b)[0].detach(),
                                   rtol=1e-5, atol=1e-5)


@contextlib.contextmanager
def count_lm_rows(model):
    """(rows, positions) of every language-model forward."""
    shapes = []

    def hook(module, args, kwargs):
        shapes.append(tuple(kwargs["inputs_embeds"].shape[:2]))

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield shapes
    finally:
        handle.remove()


def test_training_forward_scores_each_prompt_once(family):
    """Prompt sharing in scoring: the 3 prompts run once (with their images), the 9 completions on top of
    their KV cache — log-probs, entropies and every gradient (vision tower included) as the unshared
    forward, for several images per prompt and a text-only prompt in one batch, and on a micro-batch whose
    rows are not in group order."""
    name, model, processor = family
    shared = VisionPolicy(model, processor)
    unshared = VisionPolicy(model, processor, share_prompt=False)
    rollout = _sample(shared, model)
    prompt_length, completion_length = rollout.inputs.tensors["input_ids"].shape[1], rollout.completion_ids.shape[1]
    with count_lm_rows(model) as shapes:
        logp, entropy, grads = _loss_and_grads(shared, model, rollout)
    assert shapes == [(3, prompt_length), (9, completion_length - 1)]
    with count_lm_rows(model) as shapes:
        ref_logp, ref_entropy, ref_grads = _loss_and_grads(unshared, model, rollout)
    assert shapes == [(9, prompt_length + completion_length)]
    mask = rollout.completion_mask.bool()
    torch.testing.assert_close(logp[mask], ref_logp[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy[mask], ref_entropy[mask], rtol=1e-5, atol=1e-5)
    _assert_same_grads(grads, ref_grads)
    torch.testing.assert_close(logp[mask], plain_forward_logprobs(shared, model, rollout)[mask], rtol=1e-5, atol=1e-5)
    assert "forward" not in vars(model.model)  # the swapped-in forward is gone

    part = rollout.select(torch.tensor([7, 1, 4, 2, 8]))
    with torch.no_grad(), count_lm_rows(model) as shapes:
        a, _ = shared.log_probs(model, part)
        b, _ = unshared.log_probs(model, part)
    assert shapes[0][0] == 3 and shapes[1][0] == 5
    torch.testing.assert_close(a[part.completion_mask.bool()], b[part.completion_mask.bool()], rtol=1e-5, atol=1e-5)


def test_prompt_sharing_steps_aside_for_activation_checkpointing(family):
    """A checkpointed language model cannot keep a cache under a backward: scoring runs unshared (and equal)."""
    name, model, processor = family
    shared = VisionPolicy(model, processor)
    rollout = _sample(shared, model)
    model.model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    try:
        with count_lm_rows(model) as shapes:
            logp, _ = shared.log_probs(model, rollout)
        assert shapes == [(9, rollout.inputs.tensors["input_ids"].shape[1] + rollout.completion_ids.shape[1])]
        with torch.no_grad(), count_lm_rows(model) as shapes:  # no backward to replay: shared again
            again, _ = shared.log_probs(model, rollout)
        assert shapes[0][0] == 3
    finally:
        model.model.language_model.gradient_checkpointing_disable()
        model.eval()
    mask = rollout.completion_mask.bool()
    torch.testing.assert_close(logp.detach()[mask], again[mask], rtol=1e-5, atol=1e-5)
