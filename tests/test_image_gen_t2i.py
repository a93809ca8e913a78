"""Text-conditional generation: T5 caption features (LlamaGen's left padding, truncation, empty prompts),
the t2i policy's sampler log-probs against the trainer's recomputation, LlamaGen T2I checkpoint loading,
and a short AR-GRPO run of a t2i model through the CLI — all on tiny models written by the tests."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import save_model

from image_gen.gpt import GPT, get_config
from image_gen.policy import ARImagePolicy
from image_gen.prompts import make_prompts
from image_gen.text_encoder import T5TextEncoder, right_align
from image_gen.vq import build_tiny_diffusers_vq
from mmrl.policy import Sampling

MAX_LEN = 8
T5_DIM = 32


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    """A tiny T5 encoder + a word-level fast tokenizer that appends </s>, saved in transformers' format."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = sorted({w for row in make_prompts(200, seed=0) for w in row["prompt"].split()} | {"extra", "words"})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    path = tmp_path_factory.mktemp("t5")
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(vocab), d_model=T5_DIM, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    T5EncoderModel(config).save_pretrained(path)
    fast.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def encoder(t5_dir) -> T5TextEncoder:
    return T5TextEncoder(t5_dir, max_length=MAX_LEN, device="cpu")


def test_right_align_moves_valid_tokens_to_the_end():
    feats = torch.arange(1, 9, dtype=torch.float).view(2, 4, 1)  # rows [1,2,3,4], [5,6,7,8]
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    out, new_mask = right_align(feats, mask)
    assert out.squeeze(-1).tolist() == [[0, 0, 1, 2], [5, 6, 7, 8]]
    assert new_mask.tolist() == [[False, False, True, True], [True, True, True, True]]


def test_t5_features_are_left_padded_like_llamagen(encoder, t5_dir):
    from transformers import AutoTokenizer, T5EncoderModel

    features, mask = encoder.encode(["a red circle", "a blue square and a green triangle"])
    assert features.shape == (2, MAX_LEN, T5_DIM) and mask.dtype == torch.bool
    assert mask[0].tolist() == [False] * 4 + [True] * 4  # 3 words + </s>, right-aligned
    assert (features[0, :4] == 0).all()  # padded rows are zeros
    tok, model = AutoTokenizer.from_pretrained(t5_dir), T5EncoderModel.from_pretrained(t5_dir)
    ids = tok(["a red circle"], return_tensors="pt")["input_ids"]
    assert ids.shape[1] == 4
    torch.testing.assert_close(features[0, 4:], model(input_ids=ids).last_hidden_state[0], atol=1e-5, rtol=1e-5)


def test_empty_prompt_is_an_error_and_long_prompt_is_truncated(encoder, caplog):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        encoder.encode(["a red circle", "  "])
    long = " ".join(["a red circle and"] * 5)
    with caplog.at_level(logging.WARNING, logger="image_gen.text_encoder"):
        features, mask = encoder.encode([long])
    assert mask.all() and features.shape == (1, MAX_LEN, T5_DIM)
    assert "21 tokens, more than the text encoder's 8: truncated" in caplog.text


def test_missing_text_encoder_names_the_setting(tmp_path):
    with pytest.raises(OSError, match="model.text_encoder"):
        T5TextEncoder(str(tmp_path / "nowhere"), device="cpu")


def _t2i_gpt(block_size: int = 16) -> GPT:
    torch.manual_seed(0)
    model = GPT(get_config("GPT-tiny", model_type="t2i", cls_token_num=MAX_LEN, caption_dim=T5_DIM,
                           block_size=block_size))
    for p in model.parameters():  # the zero-initialised head would make every distribution uniform
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


@pytest.mark.parametrize("mode", ["cond", "cfg"])
def test_t2i_sampler_logprobs_against_trainer_recomputation(encoder, mode):
    """Sampled without top-k/top-p, the sampler's log-probs are the guided ones: what ``cfg`` mode recomputes,
    not what ``cond`` mode does (that gap is what a TIS correction weighs)."""
    gpt = _t2i_gpt()
    policy = ARImagePolicy(gpt, build_tiny_diffusers_vq(), cfg_scale=3.0, logprob_mode=mode, text_encoder=encoder,
                           record_sampler_logp=True)
    records = [{"prompt": "a red circle"}, {"prompt": "two blue squares left of a green triangle"}]
    torch.manual_seed(1)
    rollout = policy.generate(gpt, records, 2, Sampling(temperature=1.0))
    assert rollout.completion_ids.shape == (4, 16)
    assert rollout.inputs.tensors["cond"].shape == (4, MAX_LEN, T5_DIM)
    assert rollout.inputs.tensors["cond_mask"].sum(1).tolist() == [4, 4, 8, 8]
    logp, _ = policy.log_probs(gpt, rollout)
    if mode == "cfg":
        torch.testing.assert_close(logp.detach(), rollout.sampler_logp, atol=1e-5, rtol=1e-5)
    else:
        assert not torch.allclose(logp.detach(), rollout.sampler_logp, atol=1e-3)


def test_t2i_policy_needs_a_matching_text_encoder(encoder):
    with pytest.raises(ValueError, match="needs a text encoder"):
        ARImagePolicy(_t2i_gpt(), build_tiny_diffusers_vq())
    other = GPT(get_config("GPT-tiny", model_type="t2i", cls_token_num=MAX_LEN, caption_dim=16))
    with pytest.raises(ValueError, match="16"):
        ARImagePolicy(other, build_tiny_diffusers_vq(), text_encoder=encoder)


def test_llamagen_t2i_checkpoint_loads_through_the_task(tmp_path, t5_dir):
    from image_gen import task as image_task

    source = GPT(get_config("GPT-tiny", model_type="t2i", cls_token_num=MAX_LEN, caption_dim=T5_DIM, block_size=16))
    torch.save({"model": source.state_dict()}, tmp_path / "t2i_tiny.pt")  # LlamaGen's checkpoint layout
    cfg = image_task.ImageGenModelConfig(gpt=str(tmp_path / "t2i_tiny.pt"), gpt_config="GPT-tiny", condition="t2i",
                                         text_max_length=MAX_LEN, caption_dim=T5_DIM, image_size=64)
    loaded = image_task._load_gpt(cfg)
    assert loaded.config.model_type == "t2i" and loaded.config.block_size == 16
    for key, value in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


def test_t2i_ar_grpo_runs_through_the_cli(tmp_path, t5_dir):
    """A random-init t2i GPT sized for the shipped tiny VQ (8x8 tokens), T5 features, procedural prompts
    and rule rewards: two GRPO steps through `mmrl train` (learning is the c2i demo's job)."""
    from mmrl.cli import main

    gpt_dir = tmp_path / "gpt"
    gpt_dir.mkdir()
    model = _t2i_gpt(block_size=64)
    save_model(model, str(gpt_dir / "model.safetensors"))
    (gpt_dir / "gpt_config.json").write_text(json.dumps(vars(model.config)))
    code = main(["train", "configs/image_gen/demo.yaml", f"output_dir={tmp_path / 'run'}", "max_steps=2",
                 f"model.gpt={gpt_dir}", f"model.text_encoder={t5_dir}", "data.prompts=procedural",
                 "data.num_eval=4", "prompts_per_step=2", "group_size=2", "logging.progress_bar=false",
                 "logging.report_to=[jsonl]", "eval.before_training=false", "save_final=false"])
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(0.0 <= row["reward"] <= 1.0 for row in rows)
    assert (tmp_path / "run" / "samples_after.png").exists()


def test_shipped_tiny_t2i_demo_runs_and_saved_model_remembers_its_text_encoder(tmp_path):
    """configs/image_gen/demo_t2i.yaml (shipped tiny T5 + t2i prior): a short run; the checkpoint records
    its text encoder, so it reloads — e.g. for `mmrl eval-gen` — with no text_encoder setting."""
    from image_gen import task as image_task
    from mmrl.cli import main
    from mmrl.config import load_config

    code = main(["train", "configs/image_gen/demo_t2i.yaml", f"output_dir={tmp_path}", "max_steps=2",
                 "data.num_eval=4", "prompts_per_step=2", "group_size=2", "logging.progress_bar=false",
                 "logging.report_to=[jsonl]", "eval.before_training=false"])
    assert code == 0
    saved = tmp_path / "checkpoint-2" / "model"
    assert json.loads((saved / "text_encoder.json").read_text()) == {"name_or_path": "tiny", "max_length": 16}
    cfg = load_config("configs/image_gen/demo_t2i.yaml", [f"model.gpt={saved}", "model.text_encoder=null"],
                      section_types=image_task.SECTION_TYPES)
    policy = image_task.build(cfg).policy
    assert policy.text_encoder.source == "tiny" and policy.model.config.model_type == "t2i"
    features, mask = policy.text_encoder.encode(["a circle that is red"])
    assert features.shape == (1, 16, 32) and mask.sum() == 6  # 5 words + </s>
