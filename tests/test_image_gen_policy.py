"""AR image policy: the CFG formula, guidance intervals, filtering, cached vs uncached sampling, and the
sampler's own log-probs against the trainer's recomputation in both ``logprob_mode``s."""

from __future__ import annotations

import pytest
import torch

from image_gen.gpt import GPT, get_config
from image_gen.policy import ARImagePolicy
from image_gen.sampling import cfg_logits, cfg_scales, draw, filter_logits, sample_image_tokens, sample_next
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
        runs.append(sample_image_tokens(gpt, cond, 16, cfg_scale=2.0, temperature=1.0, generator=g, use_cache=use_cache,
                                        with_logp=True))
    assert torch.equal(runs[0].tokens, runs[1].tokens)  # token-identical for the same RNG
    torch.testing.assert_close(runs[0].logp, runs[1].logp, atol=1e-5, rtol=1e-5)
    assert sample_image_tokens(gpt, cond, 2).logp is None  # nothing recorded unless asked


def test_top_k_restricts_samples(gpt):
    g = torch.Generator().manual_seed(0)
    tokens, _ = sample_image_tokens(gpt, torch.tensor([1, 2]), 1, cfg_scale=1.0, top_k=3, generator=g)
    logits = gpt(torch.zeros(2, 0, dtype=torch.long), torch.tensor([1, 2]))[:, 0]
    top3 = logits.topk(3, -1).indices
    assert all(tokens[i, 0] in top3[i] for i in range(2))


def test_sample_next_logp_is_the_filtered_tempered_distribution():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0], [0.0, 0.5, 4.0, 0.2, 0.1]])
    g = torch.Generator().manual_seed(0)
    for top_k, top_p in ((0, 1.0), (3, 1.0), (0, 0.7), (4, 0.8)):
        token, logp = sample_next(logits, 0.7, top_k, top_p, g, with_logp=True)
        expected = filter_logits(logits / 0.7, top_k, top_p).log_softmax(-1).gather(-1, token[:, None]).squeeze(-1)
        torch.testing.assert_close(logp, expected)
        assert sample_next(logits, 0.7, top_k, top_p, g)[1] is None
    token, logp = sample_next(logits, 0.0, with_logp=True)  # greedy: a point mass on the argmax
    assert token.tolist() == [0, 2] and logp.tolist() == [0.0, 0.0]


def test_draw_is_the_categorical_distribution():
    """The inverse-CDF draw (one uniform per row, not multinomial's one exponential per entry): empirical
    frequencies match softmax, −inf entries (filtered tokens, here also the whole tail) are never drawn, and
    the log-prob is log_softmax's."""
    logits = torch.tensor([float("-inf"), 1.0, 0.0, float("-inf"), 2.0, -1.0, float("-inf"), float("-inf")])
    rows = logits.expand(40_000, -1)
    token, logp = draw(rows, torch.Generator().manual_seed(0), with_logp=True)
    freq = torch.bincount(token, minlength=8).double() / len(token)
    torch.testing.assert_close(freq, logits.double().softmax(-1), atol=0.01, rtol=0)
    assert freq[logits.isinf()].sum() == 0
    torch.testing.assert_close(logp, logits.log_softmax(-1)[token])
    assert draw(rows[:2], torch.Generator().manual_seed(0))[1] is None
    single = torch.full((3, 5), float("-inf"))
    single[:, 4] = 0.5  # one finite entry, at the end: always drawn, with probability 1
    token, logp = draw(single, with_logp=True)
    assert token.tolist() == [4, 4, 4] and logp.tolist() == [0.0, 0.0, 0.0]


def test_two_level_draw_equals_the_full_inverse_cdf():
    """The blockwise CDF picks the same token as one float64 cumsum over the whole vocabulary, for the same
    uniforms: V not a multiple of the block, whole blocks and the tail filtered to −inf, peaked rows."""
    from image_gen.sampling import CDF_BLOCK
    torch.manual_seed(0)
    vocab = 3 * CDF_BLOCK + 37
    logits = torch.randn(2_000, vocab) * torch.linspace(0.5, 8.0, 2_000)[:, None]
    logits[:, CDF_BLOCK : 2 * CDF_BLOCK] = float("-inf")  # a whole block of zero mass
    logits[::3, -37:] = float("-inf")  # the padded last block empty on some rows
    token, logp = draw(logits, torch.Generator().manual_seed(1), with_logp=True)
    weights = (logits - logits.amax(-1, keepdim=True)).exp().double()
    cdf = weights.cumsum(-1)
    u = torch.rand(len(logits), 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = torch.searchsorted(cdf, torch.minimum(u * cdf[:, -1:], cdf[:, -1:].nextafter(torch.zeros(1))),
                                  right=True).squeeze(-1)
    assert torch.equal(token, expected)
    assert torch.isfinite(logits.gather(-1, token[:, None])).all()
    torch.testing.assert_close(logp, logits.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1))


def test_sampler_logp_of_the_first_token_by_hand(gpt):
    """The first image token's recorded log-prob against a direct forward: guided, tempered, filtered."""
    cond = torch.tensor([1, 2, 3])
    torch.manual_seed(0)
    tokens, logp = sample_image_tokens(gpt, cond, 1, cfg_scale=2.0, temperature=0.7, top_k=10, top_p=0.9,
                                       with_logp=True)
    empty = torch.zeros(3, 0, dtype=torch.long)
    c, u = gpt(empty, cond)[:, 0].float(), gpt(empty, gpt.null_condition(3))[:, 0].float()
    processed = filter_logits(cfg_logits(c, u, 2.0) / 0.7, 10, 0.9)
    torch.testing.assert_close(logp[:, 0], processed.log_softmax(-1).gather(-1, tokens).squeeze(-1))


@pytest.mark.parametrize("mode", ["cond", "cfg"])
def test_sampler_logp_against_trainer_recomputation(gpt, mode):
    """Without top-k/top-p the sampler's log-probs are the guided ones ``cfg`` mode recomputes; ``cond`` mode
    scores the conditional distribution, equal only outside the guidance interval (scale 1)."""
    policy = ARImagePolicy(gpt, build_tiny_diffusers_vq(), cfg_scale=2.5, cfg_interval=(0.25, 1.0), logprob_mode=mode,
                           logprob_chunk_size=5)
    records = [{"prompt": "a", "class_id": 1, "spec": None}, {"prompt": "b", "class_id": 4, "spec": None}]
    assert policy.generate(gpt, records, 1, Sampling()).sampler_logp is None  # off by default
    policy.record_sampler_logp = True
    torch.manual_seed(3)
    rollout = policy.generate(gpt, records, 3, Sampling(temperature=0.8))
    assert rollout.completion_ids.shape == (6, 16) and rollout.completion_mask.all()
    assert rollout.columns["class_id"] == [1, 1, 1, 4, 4, 4]
    logp, entropy = policy.log_probs(gpt, rollout, with_entropy=True)
    assert entropy is not None and (entropy > 0).all()
    assert rollout.sampler_logp.shape == (6, 16)
    if mode == "cfg":
        torch.testing.assert_close(logp.detach(), rollout.sampler_logp, atol=1e-5, rtol=1e-5)
    else:  # tokens 0..3 are outside the interval (plain conditional sampling)
        torch.testing.assert_close(logp.detach()[:, :4], rollout.sampler_logp[:, :4], atol=1e-5, rtol=1e-5)
        assert (logp.detach()[:, 4:] - rollout.sampler_logp[:, 4:]).abs().max() > 1e-2


def test_sampler_logp_with_filtering_and_greedy(gpt):
    policy = ARImagePolicy(gpt, build_tiny_diffusers_vq(), cfg_scale=2.0, logprob_mode="cfg", record_sampler_logp=True)
    records = [{"prompt": "a", "class_id": 0}, {"prompt": "b", "class_id": 3}]
    torch.manual_seed(4)
    rollout = policy.generate(gpt, records, 2, Sampling(temperature=0.9, top_k=8))
    logp, _ = policy.log_probs(gpt, rollout)
    # top-k renormalises over fewer tokens: the sampler's probability is never lower, here always higher
    assert (rollout.sampler_logp > logp.detach() + 1e-4).all() and (rollout.sampler_logp <= 0).all()
    greedy = policy.generate(gpt, records, 2, Sampling(temperature=0.0))
    assert greedy.temperature == 1.0 and torch.equal(greedy.sampler_logp, torch.zeros(4, 16))


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


def test_rollouts_of_several_rounds_concatenate(gpt):
    """DAPO's dynamic sampling joins rounds into one batch: scores equal each round's own, columns align."""
    from mmrl.policy import Rollout

    policy = ARImagePolicy(gpt, build_tiny_diffusers_vq(), cfg_scale=2.0, logprob_mode="cfg", record_sampler_logp=True)
    torch.manual_seed(5)
    first = policy.generate(gpt, [{"prompt": "a", "class_id": 1}], 2, Sampling(temperature=0.9))
    second = policy.generate(gpt, [{"prompt": "b", "class_id": 2, "extra": 7}], 2, Sampling(temperature=0.9))
    joined = Rollout.concat([first, second])
    assert joined.batch_size == 4 and joined.columns["class_id"] == [1, 1, 2, 2]
    assert joined.columns["extra"] == [None, None, 7, 7]
    together, _ = policy.log_probs(gpt, joined)
    apart = torch.cat([policy.log_probs(gpt, r)[0] for r in (first, second)])
    torch.testing.assert_close(together.detach(), apart.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(joined.sampler_logp, torch.cat([first.sampler_logp, second.sampler_logp]))
