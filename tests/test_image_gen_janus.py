"""Janus backend on a tiny random-init JanusConfig saved to disk and loaded by path (no downloads): prompt and
CFG rows, cached vs uncached sampling, the sampler's log-probs against the trainer's recomputation in both
``logprob_mode``s, decoding, saving, and optimizer steps through :class:`mmrl.Trainer`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, JanusConfig, JanusForConditionalGeneration, JanusProcessor
from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

from image_gen.janus import (
    PROMPT_TEMPLATE,
    JanusImagePolicy,
    build_janus_policy,
    encode_prompts,
    load_processor,
    sample_janus_tokens,
)
from mmrl.config import LoggingConfig, OptimConfig, TrainConfig
from mmrl.policy import Sampling
from mmrl.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
SPECIAL = [BOS, EOS, PAD, "<image_placeholder>", "<begin_of_image>", "<end_of_image>", "<|User|>", "<|Assistant|>"]
NUM_CODES, GRID = 64, 4  # 4x4 = 16 image tokens; the VQ decoder upsamples 4x → 16x16 images
PROMPTS = ["a red circle", "two blue squares left of a green triangle"]


def build_tokenizer(out: Path):
    """A byte-level BPE with Janus' special tokens (ids 0..7), trained on the fly."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(PROMPTS * 4 + ["one yellow star above an orange square"], trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
              "padding_side": "left", "extra_special_tokens": {
                  "image_token": "<image_placeholder>", "boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>"}}
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return AutoTokenizer.from_pretrained(str(out))


def tiny_config(vocab_size: int, image_token_id: int) -> JanusConfig:
    return JanusConfig(
        text_config={"model_type": "llama", "vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 128, "pad_token_id": 2, "bos_token_id": 0, "eos_token_id": 1},
        vision_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 16 * GRID,
                       "patch_size": 16, "projection_dim": 32, "num_image_tokens": GRID * GRID, "depth": 1},
        vq_config={"embed_dim": 8, "num_embeddings": NUM_CODES, "latent_channels": 32, "base_channels": 32,
                   "channel_multiplier": [1, 1, 2], "num_res_blocks": 1, "projection_dim": 32,
                   "image_token_embed_dim": 32, "num_hidden_layers": 2},
        image_token_id=image_token_id)


@pytest.fixture(scope="module")
def janus_dir(tmp_path_factory) -> Path:
    """A tiny Janus written in HF format with its processor, as a hub checkpoint would be."""
    root = tmp_path_factory.mktemp("janus")
    tokenizer = build_tokenizer(root / "tokenizer")
    torch.manual_seed(0)
    model = JanusForConditionalGeneration(tiny_config(len(tokenizer), tokenizer.convert_tokens_to_ids("<image_placeholder>")))
    # Janus' 0.02-std init makes every image-token distribution nearly uniform; larger weights make them
    # peaked, so CFG, caching and log-prob mismatches show up as real differences.
    for name, p in model.named_parameters():
        if p.dim() > 1 and "vqmodel" not in name:
            torch.nn.init.normal_(p, std=0.3)
    # as the HF conversion of Janus-Pro stores them (its generate() reads them; so does our policy)
    model.generation_config.bos_token_id, model.generation_config.pad_token_id = tokenizer.bos_token_id, tokenizer.pad_token_id
    model.generation_config.generation_kwargs = {"boi_token_id": tokenizer.convert_tokens_to_ids("<begin_of_image>")}
    model.generation_config._from_model_config = False  # else from_pretrained rebuilds it from config.json
    model.save_pretrained(root / "model")
    processor = JanusProcessor(JanusImageProcessorPil(size={"height": 64, "width": 64}), tokenizer,
                               num_image_tokens=GRID * GRID)
    processor.save_pretrained(root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def policy(janus_dir) -> JanusImagePolicy:
    return build_janus_policy(str(janus_dir), cfg_scale=3.0, logprob_mode="cond", dtype="float32")


def test_prompt_rows_follow_janus(policy):
    tok, special = policy.tokenizer, policy.tokens
    cond, uncond, mask = encode_prompts(tok, PROMPTS, special)
    short = int(mask[0].sum())
    assert cond.shape == uncond.shape == mask.shape and short < cond.shape[1]  # left padding
    assert mask[0, :-short].sum() == 0 and cond[0, -short] == special.bos and (cond[:, -1] == special.boi).all()
    assert tok.decode(cond[0, -short + 1:-1]) == PROMPT_TEMPLATE.format(prompt="a red circle")
    # the unconditional row keeps only BOS and <begin_of_image>: everything else becomes the pad token
    kept = uncond[1][uncond[1] != special.pad].tolist()
    assert kept == [special.bos, special.boi]
    assert torch.equal(uncond[0, :-short], cond[0, :-short])
    assert policy.num_tokens == GRID * GRID
    assert (special.bos, special.pad, special.boi) == (tok.bos_token_id, tok.pad_token_id, tok.convert_tokens_to_ids(tok.boi_token))


def test_greedy_sampling_matches_transformers_janus_generate(policy):
    """Our prompt rows, unconditional rows, embeddings, head and CFG reproduce transformers' own Janus image
    mode (``generate(generation_mode="image")``) token for token, left padding included."""
    cond, uncond, mask = encode_prompts(policy.tokenizer, PROMPTS, policy.tokens)
    ours = sample_janus_tokens(policy.model, cond, uncond, mask, 16, cfg_scale=3.0, temperature=0.0)[0]
    reference = policy.model.generate(input_ids=cond, attention_mask=mask, generation_mode="image", do_sample=False,
                                      guidance_scale=3.0)
    assert torch.equal(ours, reference)
    assert not torch.equal(ours, sample_janus_tokens(policy.model, cond, uncond, mask, 16, cfg_scale=1.0,
                                                     temperature=0.0)[0])  # guidance matters here


def test_cached_sampling_matches_uncached(policy):
    cond, uncond, mask = encode_prompts(policy.tokenizer, PROMPTS * 2, policy.tokens)
    runs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(7)
        runs.append(sample_janus_tokens(policy.model, cond, uncond, mask, 16, cfg_scale=3.0, cfg_interval=(0.25, 1.0),
                                        temperature=1.0, generator=g, use_cache=use_cache, with_logp=True))
    assert torch.equal(runs[0].tokens, runs[1].tokens)  # token-identical for the same RNG
    torch.testing.assert_close(runs[0].logp, runs[1].logp, atol=1e-5, rtol=1e-5)
    assert len(set(runs[0].tokens.flatten().tolist())) > 4  # really sampled, not one repeated code


@pytest.mark.parametrize("mode", ["cond", "cfg"])
def test_sampler_logprobs_against_trainer_recomputation(policy, mode):
    """Without top-k/top-p the sampler's log-probs are the guided ones ``cfg`` mode recomputes (``cond``
    mode's differ only inside the guidance interval); top-k makes the sampler's higher than either."""
    policy.logprob_mode, policy.logprob_chunk_size, policy.cfg_interval = mode, 7, (0.25, 1.0)
    try:
        records = [{"prompt": PROMPTS[0], "spec": "s0"}, {"prompt": PROMPTS[1], "spec": "s1"}]
        assert policy.generate(policy.model, records, 1, Sampling()).sampler_logp is None  # off by default
        policy.record_sampler_logp = True
        torch.manual_seed(3)
        rollout = policy.generate(policy.model, records, 3, Sampling(temperature=0.8))
        assert rollout.completion_ids.shape == (6, 16) and rollout.completion_mask.all()
        assert rollout.prompts == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3 and rollout.columns["spec"] == ["s0"] * 3 + ["s1"] * 3
        logp, entropy = policy.log_probs(policy.model, rollout, with_entropy=True)
        assert entropy is not None and (entropy > 0).all() and entropy.mean() < 0.9 * torch.log(torch.tensor(64.0))
        # fp32; cached step-by-step vs one full forward differ by accumulation order only (max seen: 1.2e-5)
        if mode == "cfg":
            torch.testing.assert_close(logp.detach(), rollout.sampler_logp, atol=2e-5, rtol=1e-5)
            # a micro-batch of the short prompt's rows only (its left padding is trimmed) scores the same
            part = rollout.select(torch.tensor([2, 0]))
            torch.testing.assert_close(policy.log_probs(policy.model, part)[0].detach(), part.sampler_logp,
                                       atol=2e-5, rtol=1e-5)
        else:  # tokens 0..3: outside the interval, plain conditional sampling
            torch.testing.assert_close(logp.detach()[:, :4], rollout.sampler_logp[:, :4], atol=2e-5, rtol=1e-5)
            assert (logp.detach()[:, 4:] - rollout.sampler_logp[:, 4:]).abs().max() > 1e-2
        torch.manual_seed(4)
        filtered = policy.generate(policy.model, records, 3, Sampling(temperature=0.8, top_k=40))
        policy.logprob_mode = "cfg"
        guided, _ = policy.log_probs(policy.model, filtered)
        gap = filtered.sampler_logp - guided.detach()  # renormalised over 40 of 64 codes: never lower
        assert (gap > -2e-5).all() and gap.max() > 1e-3
    finally:
        policy.logprob_mode, policy.logprob_chunk_size, policy.cfg_interval = "cond", 1024, (0.0, 1.0)
        policy.record_sampler_logp = False


def test_rounds_with_prompts_of_different_lengths_concatenate(policy):
    """Dynamic sampling joins rounds: the shorter round's prompts get more left padding (pad token, mask 0)
    and score exactly as before."""
    from mmrl.policy import Rollout

    torch.manual_seed(6)
    short = policy.generate(policy.model, [{"prompt": "red"}], 2, Sampling(temperature=0.8))
    long = policy.generate(policy.model, [{"prompt": PROMPTS[0] + " and more words here"}], 2, Sampling(temperature=0.8))
    assert short.inputs.tensors["prompt_ids"].shape[1] < long.inputs.tensors["prompt_ids"].shape[1]
    joined = Rollout.concat([short, long])
    assert joined.inputs.tensors["prompt_ids"].shape[1] == long.inputs.tensors["prompt_ids"].shape[1]
    together = policy.log_probs(policy.model, joined)[0].detach()
    apart = torch.cat([policy.log_probs(policy.model, r)[0].detach() for r in (short, long)])
    torch.testing.assert_close(together, apart, atol=2e-5, rtol=1e-5)


def test_gradients_reach_generation_modules_not_frozen_ones(policy):
    policy.logprob_mode = "cfg"
    try:
        rollout = policy.generate(policy.model, [{"prompt": PROMPTS[0]}], 2, Sampling())
        policy.log_probs(policy.model, rollout)[0].sum().backward()
    finally:
        policy.logprob_mode = "cond"
    inner = policy.model.model
    for module in (inner.generation_head, inner.generation_aligner, inner.generation_embeddings, inner.language_model):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters() if p.dim() > 1)
    assert not any(p.requires_grad for p in inner.vqmodel.parameters())
    assert not any(p.requires_grad for p in inner.vision_model.parameters())
    policy.model.zero_grad(set_to_none=True)


def test_decode_shape_and_range(policy):
    rollout = policy.generate(policy.model, [{"prompt": PROMPTS[1]}], 3, Sampling(temperature=0.0))
    assert torch.equal(rollout.completion_ids[0], rollout.completion_ids[2])  # greedy: the group is identical
    policy.decode_batch_size = 2
    images = policy.decode(rollout)
    assert len(images) == 3 and images[0].shape == (3, 16, 16)
    assert 0.0 <= float(min(i.min() for i in images)) and float(max(i.max() for i in images)) <= 1.0
    assert float(images[0].std()) > 0
    with pytest.raises(ValueError, match="prompt"):
        policy.generate(policy.model, [{"prompt": ""}], 2, Sampling())
    with pytest.raises(ValueError, match="logprob_mode"):
        JanusImagePolicy(policy.model, policy.processor, logprob_mode="guided")


def test_save_pretrained_round_trip(policy, janus_dir, tmp_path):
    policy.save_pretrained(policy.model, str(tmp_path))
    reloaded = JanusForConditionalGeneration.from_pretrained(str(tmp_path))
    for (name, a), b in zip(policy.model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name
    again = build_janus_policy(str(tmp_path), dtype="float32")
    assert isinstance(again.processor, JanusProcessor) and again.tokens == policy.tokens
    # a directory holding only a tokenizer (no processor_config.json) still gives what generation needs
    tokenizer_only = load_processor(str(janus_dir.parent / "tokenizer"))
    assert not isinstance(tokenizer_only, JanusProcessor) and tokenizer_only.boi_token == "<begin_of_image>"


def redness(prompts, completions, **kwargs):
    """A rule reward that varies between random images, so group advantages are non-zero."""
    return [float(image[0].mean() - image[2].mean()) for image in completions]


def test_trainer_steps_update_the_generator(janus_dir, tmp_path):
    policy = build_janus_policy(str(janus_dir), cfg_scale=3.0, logprob_mode="cfg", dtype="float32")
    head = policy.model.model.generation_head.vision_head.weight
    before, vq_before = head.detach().clone(), policy.model.model.vqmodel.decoder.conv_out.weight.detach().clone()
    cfg = TrainConfig(output_dir=str(tmp_path), seed=0, max_steps=2, prompts_per_step=2, group_size=4,
                      micro_batch_size=4, mixed_precision="no", save_final=True, gradient_checkpointing=True, sampling=Sampling(temperature=1.0),
                      optim=OptimConfig(lr=1e-3), logging=LoggingConfig(report_to=["jsonl"], progress_bar=False,
                                                                        log_completions=0))
    cfg.algorithm.beta = 0.04  # exercises the reference model (a deep copy of the Janus model) too
    records = [{"prompt": p} for p in PROMPTS]
    history = Trainer(cfg, policy, records, reward_funcs=[redness]).train()
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(row["loss"])) for row in history)
    assert history[0]["completions/mean_length"] == 16
    assert (head.detach() - before).abs().max() > 1e-4  # the generation head moved
    assert torch.equal(policy.model.model.vqmodel.decoder.conv_out.weight, vq_before)  # the VQ did not
    saved = JanusForConditionalGeneration.from_pretrained(str(tmp_path / "checkpoint-2" / "model"))
    torch.testing.assert_close(saved.model.generation_head.vision_head.weight, head.detach())


def test_janus_backend_through_the_cli(janus_dir, tmp_path):
    """`model.backend: janus` wired by image_gen.task: the shipped config with the tiny model swapped in."""
    from mmrl.cli import main

    code = main(["train", "configs/image_gen/janus_pro_1b.yaml", f"output_dir={tmp_path}", "max_steps=1",
                 f"model.name_or_path={janus_dir}", "model.dtype=float32", "prompts_per_step=2", "group_size=2",
                 "micro_batch_size=4", "gradient_checkpointing=false", "rewards=[{name: geneval_rules}]",
                 "eval.reward=geneval_rules", "data.num_eval=2", "mixed_precision='no'",
                 "logging.progress_bar=false", "logging.report_to=[jsonl]", "save_final=false"])
    assert code == 0
    assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "samples_after.png").exists()


def test_janus_backend_needs_a_model_path():
    from image_gen import task as image_task
    from mmrl.config import load_config

    cfg = load_config("configs/image_gen/janus_pro_1b.yaml", ["model.name_or_path=null"],
                      section_types=image_task.SECTION_TYPES)
    with pytest.raises(ValueError, match="model.name_or_path"):
        image_task.build(cfg)
