"""Tests for :func:`mmrl.ops.token_logprobs` against the direct full-logits computation."""

from __future__ import annotations

import pytest
import torch

from mmrl.ops import token_logprobs

BATCH, LENGTH, WIDTH, VOCAB = 3, 5, 8, 11


def make_case(seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(BATCH, LENGTH, WIDTH, generator=g, dtype=dtype)
    targets = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=g)
    head = torch.nn.Linear(WIDTH, VOCAB, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(VOCAB, WIDTH, generator=g))
    return hidden, targets, head.to(dtype)


def direct(hidden, targets, head, temperature):
    """The straightforward computation: full fp32 logits, log_softmax, gather."""
    logits = head(hidden).float() / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_entropy_match_direct(chunk_size, temperature):
    hidden, targets, head = make_case()
    with torch.no_grad():
        logp, entropy = token_logprobs(hidden, targets, head, temperature, chunk_size, with_entropy=True)
        want_logp, want_entropy = direct(hidden, targets, head, temperature)
    assert logp.shape == (BATCH, LENGTH) and entropy.shape == (BATCH, LENGTH)
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    torch.testing.assert_close(logp, want_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, want_entropy, atol=1e-5, rtol=1e-5)
    assert (logp <= 0).all()
    assert (entropy >= 0).all()


def test_entropy_none_unless_requested():
    hidden, targets, head = make_case()
    logp, entropy = token_logprobs(hidden, targets, head, chunk_size=4)
    assert entropy is None
    torch.testing.assert_close(logp, direct(hidden, targets, head, 1.0)[0], atol=1e-5, rtol=1e-5)


def test_temperature_changes_logprobs():
    hidden, targets, head = make_case()
    with torch.no_grad():
        hot, _ = token_logprobs(hidden, targets, head, temperature=1.0)
        cold, _ = token_logprobs(hidden, targets, head, temperature=0.7)
    assert not torch.allclose(hot, cold)


def test_bf16_head_returns_fp32_close_to_direct():
    hidden, targets, head = make_case(dtype=torch.bfloat16)
    with torch.no_grad():
        logp, _ = token_logprobs(hidden, targets, head, temperature=0.7, chunk_size=3)
        want, _ = direct(hidden, targets, head, 0.7)  # same bf16 projection, fp32 softmax
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gradients_match_direct(chunk_size, temperature):
    hidden, targets, head = make_case(seed=1)
    g = torch.Generator().manual_seed(2)
    upstream = torch.randn(BATCH, LENGTH, generator=g)  # a generic downstream loss: Σ w·logp

    hidden_a = hidden.clone().requires_grad_(True)
    logp, entropy = token_logprobs(hidden_a, targets, head, temperature, chunk_size, with_entropy=True)
    assert logp.requires_grad
    assert not entropy.requires_grad  # a monitor only
    (logp * upstream).sum().backward()
    grad_hidden, grad_weight = hidden_a.grad.clone(), head.weight.grad.clone()
    head.weight.grad = None

    hidden_b = hidden.clone().requires_grad_(True)
    want, _ = direct(hidden_b, targets, head, temperature)
    (want * upstream).sum().backward()

    torch.testing.assert_close(logp.detach(), want.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_hidden, hidden_b.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_weight, head.weight.grad, atol=1e-5, rtol=1e-5)


def test_gradient_to_head_only_when_hidden_is_frozen():
    # hidden without grad takes the plain (non-checkpointed) path; the head still gets its gradient
    hidden, targets, head = make_case(seed=3)
    logp, _ = token_logprobs(hidden, targets, head, 0.7, chunk_size=2)
    logp.sum().backward()
    grad = head.weight.grad.clone()
    head.weight.grad = None
    direct(hidden, targets, head, 0.7)[0].sum().backward()
    torch.testing.assert_close(grad, head.weight.grad, atol=1e-5, rtol=1e-5)
