"""AR image policy: the CFG formula, guidance intervals, filtering, cached vs uncached sampling, and the
sampler's own log-probs against the trainer's recomputation in both ``logprob_mode``s."""

from __future__ import annotations

import pytest
import torch

from image_gen.gpt import GPT, get_config
from image_gen.policy import ARImagePolicy
from image_gen.sampling import cfg_logits, cfg_scales, filter_logits, sample_image_tokens
from image_gen.vq import build_tiny_diffusers_vq
from mmrl.policy import Sampling


@pytest.fixture(scope="module")
def gpt() -> GPT:
    torch.manual_seed(0)
    model = GPT(get_config("GPT-tiny", vocab_size=64, block_size=16, num_classes=5))
    for p in model.parameters():  # the zero-initialised head would make every distribution uniform
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def test_cfg_formula():
    c, u = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    torch.testing.assert_close(cfg_logits(c, u, 2.0), torch.tensor([[3.0, -1.0]]))  # u + 2(c − u)
    torch.testing.assert_close(cfg_logits(c, u, 1.0), c)
    torch.testing.assert_close(cfg_logits(c, u, 0.0), u)


def test_cfg_interval_scales():
    assert cfg_scales(8, 3.0).tolist() == [3.0] * 8
    assert cfg_scales(8, 3.0, (0.25, 0.75)).tolist() == [1, 1, 3, 3, 3, 3, 1, 1]
    with pytest.raises(ValueError, match="cfg_interval"):
        cfg_scales(8, 3.0, (0.8, 0.2))


def test_filter_logits():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    probs = logits.softmax(-1)[0]  # ≈ 0.644, 0.237, 0.087, 0.032
    kept = ~torch.isinf(filter_logits(logits, top_p=0.8))
    assert kept.tolist() == [[True, True, False, False]] and probs[0] < 0.8 <= probs[:2].sum()
    assert not torch.isinf(filter_logits(logits)).any()


def test_cached_sampling_matches_uncached(gpt):
    cond = torch.tensor([0, 3, 4])
    runs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(7)
        runs.append(sample_image_tokens(gpt, cond, 16, cfg_scale=2.0, temperature=1.0, generator=g, use_cache=use_cache))
    assert torch.equal(runs[0][0], runs[1][0])  # token-identical for the same RNG
    torch.testing.assert_close(runs[0][1], runs[1][1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(runs[0][2], runs[1][2], atol=1e-5, rtol=1e-5)


def test_top_k_restricts_samples(gpt):
    g = torch.Generator().manual_seed(0)
    tokens, _, _ = sample_image_tokens(gpt, torch.tensor([1, 2]), 1, cfg_scale=1.0, top_k=3, generator=g)
    logits = gpt(torch.zeros(2, 0, dtype=torch.long), torch.tensor([1, 2]))[:, 0]
    top3 = logits.topk(3, -1).indices
    assert all(tokens[i, 0] in top3[i] for i in range(2))


@pytest.mark.parametrize("mode", ["cond", "cfg"])
def test_sampler_logprobs_equal_trainer_recomputation(gpt, mode):
    policy = ARImagePolicy(gpt, build_tiny_diffusers_vq(), cfg_scale=2.5, cfg_interval=(0.25, 1.0), logprob_mode=mode,
                           logprob_chunk_size=5)
    records = [{"prompt": "a", "class_id": 1, "spec": None}, {"prompt": "b", "class_id": 4, "spec": None}]
    torch.manual_seed(3)
    rollout = policy.generate(gpt, records, 3, Sampling(temperature=0.8))
    assert rollout.completion_ids.shape == (6, 16) and rollout.completion_mask.all()
    assert rollout.columns["class_id"] == [1, 1, 1, 4, 4, 4]
    logp, entropy = policy.log_probs(gpt, rollout, with_entropy=True)
    torch.testing.assert_close(logp.detach(), rollout.sampler_logp, atol=1e-5, rtol=1e-5)
    assert entropy is not None and (entropy > 0).all()
    if mode == "cfg":  # the guided log-probs differ from the conditional ones
        cond_policy = ARImagePolicy(gpt, policy.tokenizer, 2.5, (0.25, 1.0), "cond")
        assert not torch.allclose(cond_policy.log_probs(gpt, rollout)[0], logp)


def test_gradients_reach_both_branches_in_cfg_mode(gpt):
    policy = ARImagePolicy(gpt, build_tiny_diffusers_vq(), logprob_mode="cfg")
    rollout = policy.generate(gpt, [{"prompt": "a", "class_id": 2}], 2, Sampling())
    logp, _ = policy.log_probs(gpt, rollout)
    logp.sum().backward()
    null_row = gpt.cls_embedding.embedding_table.weight.grad[gpt.config.num_classes]
    assert null_row.abs().sum() > 0  # the unconditional branch is trained too
    gpt.zero_grad()


def test_decode_and_bad_class_id(gpt):
    tokenizer = build_tiny_diffusers_vq()
    policy = ARImagePolicy(GPT(get_config("GPT-tiny", vocab_size=64, block_size=64, num_classes=5)), tokenizer)
    rollout = policy.generate(policy.model, [{"prompt": "a", "class_id": 0}], 2, Sampling())
    images = policy.decode(rollout)
    assert len(images) == 2 and images[0].shape == (3, 32, 32)
    assert 0.0 <= float(images[0].min()) and float(images[0].max()) <= 1.0
    with pytest.raises(ValueError, match="class_id"):
        policy.generate(policy.model, [{"prompt": "x", "class_id": 9}], 2, Sampling())
    with pytest.raises(ValueError, match="logprob_mode"):
        ARImagePolicy(gpt, tokenizer, logprob_mode="guided")


def test_guided_token_logprobs_against_hand_computed_values():
    from image_gen.sampling import guided_token_logprobs

    head = torch.nn.Identity()  # hidden states are the logits themselves (vocab 2)
    cond = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])  # [B=1, T=2, V=2]
    uncond = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])
    ids = torch.tensor([[0, 1]])
    logp, _ = guided_token_logprobs(torch.cat([cond, uncond]), ids, head, 2.0, (0.0, 1.0), 1.0, 1)
    # t=0: u + 2(c - u) = [3, -1] -> log σ(4); t=1: [-1, 0] -> token 1: log σ(1)
    expected = torch.log(torch.sigmoid(torch.tensor([[4.0, 1.0]])))
    torch.testing.assert_close(logp, expected)
    # guidance only on the second half of the tokens: t=0 is plain conditional, [2, 0] -> log σ(2)
    logp, _ = guided_token_logprobs(torch.cat([cond, uncond]), ids, head, 2.0, (0.5, 1.0), 1.0, 1)
    torch.testing.assert_close(logp, torch.log(torch.sigmoid(torch.tensor([[2.0, 1.0]]))))
