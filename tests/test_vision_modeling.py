"""vision.modeling: the built-in tiny Qwen2.5-VL, the torchvision-free processor, image sizing, loading
by path, freezing the vision tower, and mmrl.checkpoint.load_model_weights on a saved model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import LlamaConfig, Qwen2_5_VLForConditionalGeneration

from mmrl.checkpoint import load_model_weights
from vision.modeling import (
    TINY_TOKENIZER_DIR,
    VisionModelConfig,
    build_processor,
    build_tiny_model,
    load_model_and_processor,
    pixel_bounds,
    resize_image,
    smart_resize,
)

MIN_PIXELS, MAX_PIXELS = 3136, 12544  # 56x56 .. 112x112

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _cfg(**kwargs) -> VisionModelConfig:
    return VisionModelConfig(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, dtype="float32", **kwargs)


@pytest.fixture(scope="module")
def tiny():
    return load_model_and_processor(_cfg())


@pytest.fixture(scope="module")
def saved_dir(tiny, tmp_path_factory) -> Path:
    model, processor = tiny
    path = tmp_path_factory.mktemp("tiny_saved")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _two_image_text(processor) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                             {"type": "text", "text": "Which is red?"}]}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _image_pad_id(processor) -> int:
    return processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")


# ------------------------------------------------------------------------------------------ tiny model


def test_tiny_model_builds_with_shipped_tokenizer(tiny):
    model, processor = tiny
    assert isinstance(model, Qwen2_5_VLForConditionalGeneration)
    assert TINY_TOKENIZER_DIR.is_dir()
    assert model.config.model_type == "qwen2_5_vl"
    assert type(processor).__name__.startswith("ImageOnly")
    assert processor.tokenizer.padding_side == "left"
    assert pixel_bounds(processor.image_processor) == (MIN_PIXELS, MAX_PIXELS)
    assert model.get_input_embeddings().weight.shape[0] == len(processor.tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    assert 1e5 < n_params < 2e6
    assert next(model.parameters()).dtype == torch.float32
    # special tokens of the config are the tokenizer's
    tok = processor.tokenizer
    assert model.config.image_token_id == _image_pad_id(processor)
    assert model.config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert tok.eos_token == "<|im_end|>"


def test_tiny_model_seed_is_deterministic_and_does_not_touch_global_rng():
    state = torch.get_rng_state()
    a, _ = build_tiny_model("tiny-qwen2.5-vl", seed=3)
    assert torch.equal(state, torch.get_rng_state())  # built under fork_rng
    b, _ = build_tiny_model("tiny-qwen2.5-vl", seed=3)
    c, _ = build_tiny_model("tiny-qwen2.5-vl", seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_processor_two_images(tiny):
    _, processor = tiny
    images = [Image.new("RGB", (112, 112), (255, 0, 0)), Image.new("RGB", (56, 84), (0, 255, 0))]  # (w, h)
    batch = processor(text=[_two_image_text(processor)], images=images, return_tensors="pt")
    assert {"input_ids", "attention_mask", "pixel_values", "image_grid_thw"} <= set(batch)
    grids = batch["image_grid_thw"]
    assert grids.tolist() == [[1, 8, 8], [1, 6, 4]]  # (t, h/14, w/14)
    assert batch["pixel_values"].shape == (64 + 24, 3 * 2 * 14 * 14)
    # one placeholder per 2x2 merged patch
    expected_tokens = int(grids.prod(dim=1).sum()) // 4
    assert expected_tokens == 16 + 6
    assert int((batch["input_ids"] == _image_pad_id(processor)).sum()) == expected_tokens


def test_processor_batch_is_left_padded_and_model_runs(tiny):
    model, processor = tiny
    short = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
                                          tokenize=False, add_generation_prompt=True)
    texts = [_two_image_text(processor), short]
    images = [Image.new("RGB", (56, 56), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
    mask = batch["attention_mask"]
    assert mask[0].all() and not mask[1].all()
    assert mask[1, 0] == 0 and mask[1, -1] == 1  # padding on the left
    assert int((batch["input_ids"] == _image_pad_id(processor)).sum()) == 3 * 4
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape
    assert torch.isfinite(out.logits).all()


def test_processor_respects_configured_bounds(tiny):
    _, processor = tiny
    big = processor.image_processor(images=[Image.new("RGB", (448, 448))], return_tensors="pt")
    small = processor.image_processor(images=[Image.new("RGB", (10, 10))], return_tensors="pt")
    assert big["image_grid_thw"].tolist() == [[1, 8, 8]]  # 112x112 at max_pixels=12544
    assert small["image_grid_thw"].tolist() == [[1, 4, 4]]  # 56x56 at min_pixels=3136


# ------------------------------------------------------------------------------------------ sizing


@pytest.mark.parametrize(("size", "expected"), [
    ((112, 112), (112, 112)),  # already on the grid and inside the bounds
    ((448, 448), (112, 112)),  # scaled down to max_pixels
    ((10, 10), (56, 56)),  # scaled up to min_pixels
    ((100, 100), (112, 112)),  # rounded to the nearest multiple of 28
    ((56, 84), (56, 84)),
    ((90, 40), (84, 56)),  # rounded (84x28 < min) then scaled up, aspect kept
    ((1000, 500), (140, 56)),  # 2:1, down to the largest grid under max_pixels
])
def test_smart_resize_hand_cases(size, expected):
    assert smart_resize(*size, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS) == expected


@pytest.mark.parametrize("size", [(57, 57), (29, 300), (300, 29), (333, 777), (1024, 768), (28, 28), (200, 50),
                                  (12, 40), (5000, 4000)])
def test_smart_resize_invariants(size):
    h, w = smart_resize(*size, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    assert h % 28 == 0 and w % 28 == 0
    assert MIN_PIXELS <= h * w <= MAX_PIXELS
    # the aspect ratio survives as well as a 28-px grid allows
    assert abs(math.log((h / w) / (size[0] / size[1]))) < math.log(3.0)


def test_smart_resize_default_factor_and_other_factor():
    assert smart_resize(448, 448) == (448, 448)  # default bounds: 4 .. 1280 tokens
    assert smart_resize(64, 64, factor=32, min_pixels=32 * 32, max_pixels=32 * 32 * 4) == (64, 64)


@pytest.mark.parametrize("size", [(10, 2500), (2500, 10), (1, 201)])
def test_smart_resize_extreme_aspect_ratio(size):
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(*size, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def test_resize_image():
    on_grid = Image.new("RGB", (112, 112), (1, 2, 3))
    assert resize_image(on_grid, MIN_PIXELS, MAX_PIXELS) is on_grid  # no copy when nothing changes
    big = resize_image(Image.new("RGB", (448, 224), (10, 200, 30)), MIN_PIXELS, MAX_PIXELS)
    assert big.size == (140, 56)  # PIL size is (w, h); smart_resize(224, 448) = (56, 140)
    assert big.mode == "RGB" and big.getpixel((70, 28)) == (10, 200, 30)
    tiny = resize_image(Image.new("RGB", (10, 10)), MIN_PIXELS, MAX_PIXELS)
    assert tiny.size == (56, 56)
    assert resize_image(Image.new("RGB", (64, 64)), 32 * 32, 32 * 32 * 4, factor=32).size == (64, 64)


# ------------------------------------------------------------------------------------------ loading


def test_save_and_load_by_path(tiny, saved_dir):
    model, processor = tiny
    assert (saved_dir / "model.safetensors").is_file() and (saved_dir / "config.json").is_file()
    loaded, loaded_processor = load_model_and_processor(_cfg(name_or_path=str(saved_dir)))
    assert type(loaded) is type(model)
    a, b = model.state_dict(), loaded.state_dict()
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the processor works and processes exactly as the original
    assert type(loaded_processor).__name__.startswith("ImageOnly")
    assert loaded_processor.tokenizer.padding_side == "left"
    assert pixel_bounds(loaded_processor.image_processor) == (MIN_PIXELS, MAX_PIXELS)
    images = [Image.new("RGB", (112, 112), (255, 0, 0)), Image.new("RGB", (56, 84), (0, 255, 0))]
    text = [_two_image_text(processor)]
    x = processor(text=text, images=images, return_tensors="pt")
    y = loaded_processor(text=text, images=images, return_tensors="pt")
    assert torch.equal(x["input_ids"], y["input_ids"])
    assert torch.equal(x["image_grid_thw"], y["image_grid_thw"])
    assert torch.allclose(x["pixel_values"], y["pixel_values"])
    with torch.no_grad():
        assert torch.allclose(model(**x).logits, loaded(**y).logits, atol=1e-5)


def test_load_by_path_applies_config_bounds_and_freeze(saved_dir):
    model, processor = load_model_and_processor(VisionModelConfig(
        name_or_path=str(saved_dir), min_pixels=28 * 28, max_pixels=28 * 28 * 4, freeze_vision_tower=True,
        dtype="float32"))
    assert pixel_bounds(processor.image_processor) == (784, 3136)
    grid = processor.image_processor(images=[Image.new("RGB", (448, 448))], return_tensors="pt")["image_grid_thw"]
    assert grid.tolist() == [[1, 4, 4]]  # the image processor itself follows the configured bounds
    assert not any(p.requires_grad for n, p in model.named_parameters() if "visual" in n)


def test_missing_local_path(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model") as info:
        load_model_and_processor(_cfg(name_or_path=str(missing)))
    assert str(missing) in str(info.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_and_processor(_cfg(name_or_path="./definitely/not/here"))


def test_unknown_builtin_name():
    with pytest.raises(ValueError, match="tiny-qwen2.5-vl"):
        build_tiny_model("tiny-qwen9-vl")
    # by config, a name that is neither built in nor a directory nor a hub id: the built-ins are listed
    with pytest.raises(FileNotFoundError, match="tiny-qwen2.5-vl"):
        load_model_and_processor(_cfg(name_or_path="tiny-qwen9-vl"))


def test_unsupported_model_type(tmp_path, tiny):
    LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="llama") as info:
        load_model_and_processor(_cfg(name_or_path=str(tmp_path)))
    assert "qwen2_5_vl" in str(info.value)  # names the supported types
    _, processor = tiny
    with pytest.raises(ValueError, match="unsupported model type"):
        build_processor("llava", processor.tokenizer, processor.image_processor)


def test_bad_dtype():
    with pytest.raises(ValueError, match="dtype"):
        load_model_and_processor(VisionModelConfig(dtype="float64"))


def test_dtype_is_applied():
    model, _ = load_model_and_processor(VisionModelConfig(dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_freeze_vision_tower_freezes_only_visual():
    model, _ = load_model_and_processor(_cfg(freeze_vision_tower=True))
    named = dict(model.named_parameters())
    visual = [n for n in named if n.startswith("model.visual.")]
    others = [n for n in named if not n.startswith("model.visual.")]
    assert visual and others
    assert not any(named[n].requires_grad for n in visual)
    assert all(named[n].requires_grad for n in others)
    unfrozen, _ = load_model_and_processor(_cfg())
    assert all(p.requires_grad for p in unfrozen.parameters())


# ------------------------------------------------------------------------------------------ checkpoint weights


def test_load_model_weights_from_saved_dir(tiny, saved_dir):
    model, _ = tiny
    fresh, _ = build_tiny_model("tiny-qwen2.5-vl", seed=1)
    before = fresh.state_dict()
    reference = model.state_dict()
    assert any(not torch.equal(before[k], reference[k]) for k in reference)
    load_model_weights(fresh, saved_dir)
    after = fresh.state_dict()
    for key in reference:
        assert torch.equal(after[key], reference[key]), key
    # tied embeddings stay tied
    assert fresh.get_output_embeddings().weight.data_ptr() == fresh.get_input_embeddings().weight.data_ptr()


def test_load_model_weights_sharded(tiny, tmp_path):
    model, _ = tiny
    model.save_pretrained(tmp_path, max_shard_size="600KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    fresh, _ = build_tiny_model("tiny-qwen2.5-vl", seed=2)
    load_model_weights(fresh, tmp_path)
    reference = model.state_dict()
    after = fresh.state_dict()
    assert all(torch.equal(after[k], reference[k]) for k in reference)


def test_load_model_weights_missing_files(tmp_path, tiny):
    model, _ = tiny
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model_weights(model, tmp_path)


def test_unreachable_hub_id_or_empty_dir_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # as on a machine without network (and without DNS timeouts): read at import, so patch the constant
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="could not load model 'someone/not-cached'.*local directory"):
        load_model_and_processor(_cfg(name_or_path="someone/not-cached"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="could not load model"):
        load_model_and_processor(_cfg(name_or_path=str(tmp_path / "empty")))
