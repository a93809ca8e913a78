"""vision.decoding: mmrl's sampling loop draws, seeded, exactly the tokens transformers' ``model.generate``
draws (and records the same sampler log-probs) — for tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL models, with
images, several images per prompt and a text-only prompt in one batch, greedy and sampled, with top-k,
top-p, min_new_tokens, and rows that stop at different steps."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mmrl.policy import Sampling
from tests.test_shared_vision import FAMILIES, GROUP, _records, _tiny
from vision.decoding import process_scores
from vision.policy import VisionPolicy

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return _tiny(request.param)


def test_process_scores_hand_computed():
    """Logits [2, 1, 0, -1] at temperature 2 → [1, .5, 0, -.5]; top-k 3 drops -.5; the softmax of the
    three left is ≈ [.506, .307, .186]; top-p 0.6 drops a token when the mass of the tokens at most as likely
    as it is ≤ 1 − 0.6 = .4: .186 goes, .186 + .307 = .493 stays."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    eos, suppress = torch.tensor([0]), torch.tensor([3])
    out = process_scores(logits, Sampling(temperature=2.0, top_k=3, top_p=0.6), 5, eos, None)
    inf = float("-inf")
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.5, inf, inf]]))
    # before min_new_tokens the stop token is masked; suppressed tokens always are; greedy: masks only
    out = process_scores(logits, Sampling(temperature=0.0, min_new_tokens=2), 1, eos, suppress)
    torch.testing.assert_close(out, torch.tensor([[inf, 1.0, 0.0, inf]]))
    out = process_scores(logits, Sampling(temperature=0.0, min_new_tokens=2), 2, eos, suppress)
    torch.testing.assert_close(out, torch.tensor([[2.0, 1.0, 0.0, inf]]))


@pytest.mark.parametrize("top_k,top_p,temperature", [(0, 1.0, 1.0), (5, 1.0, 0.7), (0, 0.8, 1.3), (7, 0.5, 1.0)])
def test_process_scores_equals_transformers_processors(top_k, top_p, temperature):
    """The same scores as transformers' processors in ``generate``'s order, on random logits."""
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    ids = torch.zeros(6, 9, dtype=torch.long)  # 4 prompt tokens + 5 new
    eos, suppress = [3, 11], [7, 8]
    expected = MinNewTokensLengthLogitsProcessor(4, 6, eos)(ids, logits.clone())
    expected = SuppressTokensLogitsProcessor(suppress)(ids, expected)
    if temperature != 1.0:
        expected = TemperatureLogitsWarper(temperature)(ids, expected)
    if top_k:
        expected = TopKLogitsWarper(top_k)(ids, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(ids, expected)
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_new_tokens=6)
    got = process_scores(logits, sampling, 5, torch.tensor(eos), torch.tensor(suppress))
    assert torch.equal(got.isinf(), expected.isinf())
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def _pair(model, processor, share_prompt: bool, stop_ids: list[int] | None):
    policies = [VisionPolicy(model, processor, record_sampler_logp=True, share_prompt=share_prompt, lean_decoding=lean)
                for lean in (True, False)]
    if stop_ids is not None:  # many stop tokens: rows stop at different steps
        for policy in policies:
            policy.eos_token_ids = stop_ids
    return policies


@pytest.mark.parametrize("share_prompt", [True, False])
@pytest.mark.parametrize("sampling", [
    Sampling(max_new_tokens=8, temperature=0.0),
    Sampling(max_new_tokens=8, temperature=1.0),
    Sampling(max_new_tokens=8, temperature=0.8, top_k=20, top_p=0.9, min_new_tokens=3),
], ids=["greedy", "sample", "filtered"])
def test_loop_samples_what_generate_samples(family, share_prompt, sampling):
    model, processor = family
    vocab = len(processor.tokenizer)
    for stop_ids in (None, list(range(0, vocab, 3))):
        lean, reference = _pair(model, processor, share_prompt, stop_ids)
        runs = []
        for policy in (lean, reference):
            torch.manual_seed(1)
            runs.append(policy.generate(model, _records(), GROUP, sampling))
        a, b = runs
        torch.testing.assert_close(a.completion_ids, b.completion_ids, rtol=0, atol=0)
        torch.testing.assert_close(a.completion_mask, b.completion_mask, rtol=0, atol=0)
        assert torch.equal(a.truncated, b.truncated)
        torch.testing.assert_close(a.sampler_logp, b.sampler_logp, rtol=1e-5, atol=1e-5)
        if stop_ids is not None and sampling.temperature > 0 and sampling.min_new_tokens == 0:
            assert not a.truncated.all()  # the stop path was exercised
        if sampling.min_new_tokens:
            assert bool((a.completion_mask.sum(1) >= sampling.min_new_tokens).all())


def test_loop_stops_when_every_row_has_stopped(family):
    """Every token is a stop token: one step, one token per row, no further forward."""
    model, processor = family
    policy = VisionPolicy(model, processor)
    policy.eos_token_ids = list(range(len(processor.tokenizer)))
    calls = []
    handle = model.model.language_model.embed_tokens.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        rollout = policy.generate(model, _records(), GROUP, Sampling(max_new_tokens=8, temperature=1.0))
    finally:
        handle.remove()
    assert rollout.completion_ids.shape == (len(_records()) * GROUP, 1)
    assert len(calls) == 2  # the prefill and one decoding step embed their tokens


class _StopAt(torch.nn.Module):
    """A stand-in model: the stop token (0) is certain from forward call ``stop_at`` on; counts its calls."""

    def __init__(self, stop_at: int, vocab: int = 5):
        super().__init__()
        self.stop_at, self.vocab, self.calls = stop_at, vocab, 0
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, cache=None, **kwargs):
        logits = torch.zeros(input_ids.shape[0], 1, self.vocab)
        logits[..., 0] = 100.0 if self.calls >= self.stop_at else -100.0
        self.calls += 1
        return type("Out", (), {"logits": logits, "cache": cache})()


def _synced_worker(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    import vision.decoding as decoding

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        decoding._sharded = lambda model: True  # as under FSDP / ZeRO-3: every forward is a collective
        model = _StopAt(stop_at=1 if rank == 0 else 4)
        torch.manual_seed(rank)
        tokens, _ = decoding.sample_tokens(model, torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long),
                                           None, torch.zeros(2, 1, dtype=torch.long), Sampling(max_new_tokens=8),
                                           eos_ids=[0], pad_id=4)
        results[rank] = (model.calls, tokens.tolist())
    finally:
        dist.destroy_process_group()


def test_sharded_processes_keep_stepping_until_all_have_stopped():
    """Under sharded weights a process whose rows stopped keeps calling the model (collective forwards)
    until every process has stopped; its completions still end at its own stop."""
    import torch.multiprocessing as mp

    from tests.launching import free_port

    results = mp.Manager().dict()
    mp.spawn(_synced_worker, args=(free_port(), results), nprocs=2)
    assert results[0][0] == results[1][0] == 5  # both stepped until rank 1's rows stopped at its 5th call
    assert [len(row) for row in results[0][1]] == [2, 2]  # rank 0: one token, then the stop token
    assert all(row[-1] == 0 for row in results[1][1]) and len(results[1][1][0]) == 5


@pytest.mark.parametrize("padded", [True, False])
def test_text_step_equals_the_whole_models_step(family, padded):
    """The language-model-only decoding step and the written-out one (vision.text_decoder) give the whole
    model's logits bit for bit, over two steps, with and without padded rows (the prepared mask of Qwen2-VL /
    Qwen2.5-VL must match what the model would build)."""
    import copy

    from vision.decoding import _model_step, _text_step
    from vision.shared_vision import prefill_groups, vision_model
    from vision.text_decoder import decode_step, supports

    model, processor = family
    policy = VisionPolicy(model, processor)
    records = _records() if padded else [_records()[2]]
    inputs, plan = policy._shared_inputs(policy.encode_prompts(records), torch.device("cpu"))
    assert bool((inputs["attention_mask"] == 0).any()) == padded
    with torch.no_grad():
        model_inputs, cache = prefill_groups(model, inputs, plan, GROUP)
        mask = model_inputs["attention_mask"]
        position = mask.sum(-1, keepdim=True) - 1 + vision_model(model).rope_deltas
        feed = model_inputs["input_ids"][:, -1:]

        def sdpa_form(m):  # what the loop passes: None when nothing is padded
            return None if bool(m.all()) else m.bool()[:, None, None, :]

        keep = sdpa_form(mask)
        a, _ = _model_step(model, feed, mask, keep, position, copy.deepcopy(cache))
        b, _ = _text_step(model, feed, mask, keep, position, copy.deepcopy(cache))
        assert supports(model)
        c, later = decode_step(model, feed, mask, keep, position, copy.deepcopy(cache))
        # a second step from the extended cache, with the token drawn from the first
        mask2 = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        step2 = dict(feed=a.argmax(-1, keepdim=True), mask=mask2, keep=sdpa_form(mask2), position=position + 1)
        cache_a = copy.deepcopy(cache)
        _model_step(model, feed, mask, keep, position, cache_a)
        d, _ = _model_step(model, cache=cache_a, **step2)
        e, _ = decode_step(model, cache=later, **step2)
    assert torch.equal(a, b)
    assert torch.equal(a, c), (a - c).abs().max()
    assert torch.equal(d, e), (d - e).abs().max()
