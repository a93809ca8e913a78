"""vision.policy.VisionPolicy: group sampling, completion masks, log-probs against a direct forward pass,
the sampler's own log-probs, decoding, sub-rollouts, suppressed vision tokens and gradients."""

from __future__ import annotations

import contextlib
import copy
import dataclasses

import pytest
import torch
from PIL import Image
from transformers import StoppingCriteriaList

from mmrl.policy import Policy, Rollout, Sampling
from vision.data import VisionDataConfig, build_datasets
from vision.modeling import VisionModelConfig, load_model_and_processor
from vision.policy import SampledTokenLogp, VisionPolicy

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


@pytest.fixture(scope="module")
def setup():
    model, processor = load_model_and_processor(
        VisionModelConfig(min_pixels=3136, max_pixels=12544, dtype="float32"))
    model.eval()
    return model, processor, VisionPolicy(model, processor)


@pytest.fixture(scope="module")
def synthetic_records():
    train, _ = build_datasets(VisionDataConfig(train="synthetic:single_shape", template="answer", max_train_samples=6,
                                               synthetic_options={"image_size": 56}))
    return [train[i] for i in range(len(train))]


def _two_image_record() -> dict:
    # On-grid sizes (multiples of 28 inside the bounds): no resizing, so a hand-built reference sees the same pixels.
    images = [Image.new("RGB", (112, 112), (220, 30, 30)), Image.new("RGB", (84, 56), (30, 70, 220))]
    prompt = [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "text", "text": "and"},
                                     {"type": "image"},
                                     {"type": "text", "text": "Which one is red? Answer with <answer>...</answer>."}]},
    ]
    return {"prompt": prompt, "images": images, "answer": "first"}


def _text_only_record() -> dict:
    return {"prompt": [{"role": "user", "content": [{"type": "text", "text": "Say hi."}]}], "images": [], "answer": "hi"}


@contextlib.contextmanager
def logit_bias(model, bias: dict[int, float]):
    """Add constant biases to some vocabulary entries of the LM head's output (generation and scoring alike:
    the head's ``forward`` is wrapped, the function scoring projects each slice with; vision.output_head)."""
    head = model.get_output_embeddings()
    project = head.forward

    def biased(hidden):
        output = project(hidden).clone()
        for token, value in bias.items():
            output[..., token] += value
        return output

    head.forward = biased
    try:
        yield
    finally:
        del head.forward


def _eos_bias(policy: VisionPolicy, value: float = 5.0) -> dict[int, float]:
    return {policy.eos_token_ids[0]: value}


def _full_inputs(rollout: Rollout) -> tuple[dict, int]:
    """prompt + completion inputs built by hand from the rollout's stored prompt tensors."""
    t = rollout.inputs.tensors
    prompt_length = t["input_ids"].shape[1]
    kwargs = {
        "input_ids": torch.cat([t["input_ids"], rollout.completion_ids], dim=1),
        "attention_mask": torch.cat([t["attention_mask"], rollout.completion_mask.to(t["attention_mask"].dtype)], dim=1),
    }
    if "mm_token_type_ids" in t:
        kwargs["mm_token_type_ids"] = torch.cat(
            [t["mm_token_type_ids"], torch.zeros_like(rollout.completion_ids, dtype=t["mm_token_type_ids"].dtype)], dim=1)
    pixels = [p for chunk in rollout.inputs.lists.get("pixel_values", []) for p in chunk]
    if pixels:
        kwargs["pixel_values"] = torch.cat(pixels)
        kwargs["image_grid_thw"] = torch.cat([g for chunk in rollout.inputs.lists["image_grid_thw"] for g in chunk])
    return kwargs, prompt_length


@torch.no_grad()
def direct_logprobs(model, rollout: Rollout, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(full logits / T) gathered at the completion tokens: the textbook computation."""
    kwargs, prompt_length = _full_inputs(rollout)
    logits = model(**kwargs, use_cache=False).logits.float()[:, prompt_length - 1:-1] / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def unpadded_logprobs(model, processor, record: dict, completion: torch.Tensor) -> torch.Tensor:
    """The same quantity for one record on its own: no batch, no padding, prompt encoded from scratch."""
    text = processor.apply_chat_template(record["prompt"], tokenize=False, add_generation_prompt=True)
    enc = processor(text=[text], images=record["images"] or None, return_tensors="pt")
    completion = completion.unsqueeze(0)
    kwargs = {"input_ids": torch.cat([enc["input_ids"], completion], dim=1)}
    kwargs["attention_mask"] = torch.ones_like(kwargs["input_ids"])
    if "mm_token_type_ids" in enc:
        kwargs["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros_like(completion)], dim=1)
    if "pixel_values" in enc:
        kwargs["pixel_values"], kwargs["image_grid_thw"] = enc["pixel_values"], enc["image_grid_thw"]
    logits = model(**kwargs, use_cache=False).logits.float()[0, enc["input_ids"].shape[1] - 1:-1]
    return torch.log_softmax(logits, dim=-1).gather(-1, completion[0].unsqueeze(-1)).squeeze(-1)


def _assert_close_on_mask(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, atol: float = 1e-5) -> None:
    assert a.shape == b.shape == mask.shape
    m = mask.bool()
    assert m.any()
    diff = (a[m] - b[m]).abs().max().item()
    assert diff <= atol, f"max |difference| {diff:.2e} > {atol:.0e}"


def _mixed_records(synthetic_records) -> list[dict]:
    return [synthetic_records[0], _two_image_record(), _text_only_record(), synthetic_records[1]]


# ---------------------------------------------------------------------------------------------- generate


def test_policy_satisfies_protocol(setup):
    _, _, policy = setup
    assert isinstance(policy, Policy)
    vocab = policy.tokenizer.get_vocab()
    assert sorted(policy.suppress_token_ids) == sorted(vocab[t] for t in VISION_TOKENS)
    assert policy.eos_token_ids == [policy.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert policy.size_factor == 28


def test_generate_groups_masks_and_truncation(setup, synthetic_records):
    model, _, policy = setup
    records = synthetic_records[:3]
    group = 4
    torch.manual_seed(0)
    with logit_bias(model, _eos_bias(policy)):  # stop often, but not always, within 5 tokens
        rollout = policy.generate(model, records, group, Sampling(temperature=1.0, max_new_tokens=5))
    batch = len(records) * group
    assert rollout.batch_size == batch and rollout.group_size == group
    assert rollout.completion_ids.shape == rollout.completion_mask.shape
    assert rollout.completion_ids.shape[0] == batch and 1 <= rollout.completion_ids.shape[1] <= 5
    assert rollout.truncated.shape == (batch,) and rollout.truncated.dtype == torch.bool
    assert rollout.temperature == 1.0 and rollout.sampler_logp is None
    # groups are contiguous: row i belongs to record i // group
    assert rollout.prompts == [records[i // group]["prompt"] for i in range(batch)]
    assert set(rollout.columns) == {"answer", "task", "choices"}
    for key, values in rollout.columns.items():
        assert values == [records[i // group][key] for i in range(batch)]
    ids = rollout.inputs.tensors["input_ids"]
    assert ids.shape[0] == batch
    for i in range(batch):
        first = (i // group) * group
        assert torch.equal(ids[i], ids[first])
        assert len(rollout.inputs.lists["pixel_values"][i]) == 1
        assert torch.equal(rollout.inputs.lists["pixel_values"][i][0], rollout.inputs.lists["pixel_values"][first][0])
    # mask: up to and including the first EOS, zeros after (pad there); truncated iff no EOS
    eos = policy.eos_token_ids[0]
    length = rollout.completion_ids.shape[1]
    for row, mask, truncated in zip(rollout.completion_ids, rollout.completion_mask, rollout.truncated):
        hits = (row == eos).nonzero().flatten().tolist()
        if hits:
            k = hits[0]
            assert not truncated
            assert mask[: k + 1].tolist() == [1] * (k + 1)
            assert mask[k + 1:].sum() == 0
            assert (row[k + 1:] == policy.pad_token_id).all()
        else:
            assert truncated
            assert mask.tolist() == [1] * length
    assert rollout.truncated.any() and not rollout.truncated.all(), "the seed should give both kinds of rows"


def test_completion_mask_hand_cases(setup):
    _, _, policy = setup
    eos, pad = policy.eos_token_ids[0], policy.pad_token_id
    ids = torch.tensor([[eos, 7, 8, 9], [7, 8, eos, pad], [7, 8, 9, eos], [7, 8, 9, 10], [7, eos, 8, eos]])
    mask, truncated = policy._completion_mask(ids)
    assert mask.tolist() == [[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert truncated.tolist() == [False, False, False, True, False]


def test_greedy_is_identical_within_group_and_repeatable(setup, synthetic_records):
    model, _, policy = setup
    records = synthetic_records[:2]
    greedy = Sampling(temperature=0.0, max_new_tokens=6)
    a = policy.generate(model, records, 3, greedy)
    b = policy.generate(model, records, 3, greedy)
    assert a.temperature == 1.0  # greedy completions are scored on the untempered distribution
    assert torch.equal(a.completion_ids, b.completion_ids)
    for g in range(2):
        rows = a.completion_ids[3 * g: 3 * g + 3]
        assert (rows == rows[0]).all()
    # the greedy tokens are the argmax of the model's own logits
    kwargs, prompt_length = _full_inputs(a)
    with torch.no_grad():
        logits = model(**kwargs, use_cache=False).logits[:, prompt_length - 1:-1]
    mask = a.completion_mask.bool()
    assert torch.equal(logits.argmax(-1)[mask], a.completion_ids[mask])


def test_sampling_differs_within_group(setup, synthetic_records):
    model, _, policy = setup
    torch.manual_seed(1)
    rollout = policy.generate(model, synthetic_records[:1], 4, Sampling(temperature=1.0, max_new_tokens=6))
    assert len({tuple(r) for r in rollout.completion_ids.tolist()}) > 1


# ---------------------------------------------------------------------------------------------- log_probs


def test_log_probs_match_direct_forward_mixed_batch(setup, synthetic_records):
    """Left padding, a two-image record and a text-only record in one batch."""
    model, processor, policy = setup
    records = _mixed_records(synthetic_records)
    torch.manual_seed(2)
    with logit_bias(model, _eos_bias(policy, 4.0)):
        rollout = policy.generate(model, records, 2, Sampling(temperature=1.0, max_new_tokens=5))
        attn = rollout.inputs.tensors["attention_mask"]
        assert not attn.all(dim=1).all() and attn.all(dim=1).any()  # prompts of different lengths, left-padded
        assert (attn[:, -1] == 1).all()
        assert [len(c) for c in rollout.inputs.lists["pixel_values"]] == [1, 1, 2, 2, 0, 0, 1, 1]
        logp, entropy = policy.log_probs(model, rollout, with_entropy=True)
        expected = direct_logprobs(model, rollout)
        _assert_close_on_mask(logp, expected, rollout.completion_mask)
        # entropy of the full distribution, against the textbook formula
        kwargs, prompt_length = _full_inputs(rollout)
        with torch.no_grad():
            logits = model(**kwargs, use_cache=False).logits.float()[:, prompt_length - 1:-1]
        ref_entropy = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
        _assert_close_on_mask(entropy, ref_entropy, rollout.completion_mask, atol=1e-4)
        # each row equals the same record scored alone, with no padding at all
        for i in range(rollout.batch_size):
            n = int(rollout.completion_mask[i].sum())
            alone = unpadded_logprobs(model, processor, records[i // 2], rollout.completion_ids[i, :n])
            assert torch.allclose(logp[i, :n], alone, atol=1e-5), (i, (logp[i, :n] - alone).abs().max())
    assert logp.dtype == torch.float32
    no_entropy = policy.log_probs(model, rollout)
    assert no_entropy[1] is None


def test_log_probs_at_sampling_temperature(setup, synthetic_records):
    model, _, policy = setup
    records = _mixed_records(synthetic_records)[:3]
    torch.manual_seed(3)
    rollout = policy.generate(model, records, 2, Sampling(temperature=0.7, max_new_tokens=4))
    assert rollout.temperature == 0.7
    logp, _ = policy.log_probs(model, rollout)
    _assert_close_on_mask(logp, direct_logprobs(model, rollout, temperature=0.7), rollout.completion_mask)
    untempered = direct_logprobs(model, rollout, temperature=1.0)
    assert not torch.allclose(logp[rollout.completion_mask.bool()], untempered[rollout.completion_mask.bool()])


def test_log_probs_chunking_does_not_change_values(setup, synthetic_records):
    model, processor, policy = setup
    torch.manual_seed(4)
    rollout = policy.generate(model, synthetic_records[:2], 2, Sampling(max_new_tokens=5))
    chunked = VisionPolicy(model, processor, logprob_chunk_size=3)
    a, _ = policy.log_probs(model, rollout)
    b, _ = chunked.log_probs(model, rollout)
    _assert_close_on_mask(a, b, rollout.completion_mask, atol=1e-6)


@pytest.mark.parametrize("share_prompt", [True, False])
def test_scoring_calls_the_output_head_module_once(setup, synthetic_records, share_prompt):
    """Sharded backends hook the head module: FSDP2 (accelerate groups it with the tied embeddings) treats each
    further call as a new forward and reduces the group's gradient too early. Scoring therefore calls the head
    module once — the model's own call — which returns the log-probs (vision.output_head); the slices are
    projected inside it, by the head's forward function (no hooks). Gradients still reach the head."""
    model, processor, policy = setup
    model = copy.deepcopy(model)  # the backward below must not leave gradients on the shared fixture
    torch.manual_seed(5)
    rollout = policy.generate(model, synthetic_records[:2], 2, Sampling(max_new_tokens=5))
    scorer = VisionPolicy(model, processor, logprob_chunk_size=3, share_prompt=share_prompt)  # several slices
    calls = []
    handle = model.get_output_embeddings().register_forward_hook(lambda module, args, output: calls.append(output))
    try:
        model.zero_grad()
        logp, _ = scorer.log_probs(model, rollout)
        (logp * rollout.completion_mask).sum().backward()
    finally:
        handle.remove()
    assert len(calls) == 1 and calls[0].shape == (*rollout.completion_ids.shape, 1)  # the log-probs
    _assert_close_on_mask(logp.detach(), direct_logprobs(model, rollout), rollout.completion_mask)
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0
    assert "forward" not in vars(model.get_output_embeddings())  # restored


def test_select_subsets_consistently(setup, synthetic_records):
    model, _, policy = setup
    records = _mixed_records(synthetic_records)
    torch.manual_seed(5)
    with logit_bias(model, _eos_bias(policy, 4.0)):
        rollout = policy.generate(model, records, 2, Sampling(max_new_tokens=5))
        full, _ = policy.log_probs(model, rollout)
        index = torch.tensor([6, 3, 0, 4])
        sub = rollout.select(index)
        assert sub.batch_size == 4 and sub.group_size == rollout.group_size
        assert torch.equal(sub.completion_ids, rollout.completion_ids[index])
        assert torch.equal(sub.completion_mask, rollout.completion_mask[index])
        assert torch.equal(sub.truncated, rollout.truncated[index])
        assert sub.prompts == [rollout.prompts[i] for i in index.tolist()]
        assert sub.columns["answer"] == [rollout.columns["answer"][i] for i in index.tolist()]
        assert [len(c) for c in sub.inputs.lists["pixel_values"]] == [1, 2, 1, 0]
        part, _ = policy.log_probs(model, sub)
        _assert_close_on_mask(part, full[index], sub.completion_mask)
        # text-only rows alone: no image inputs at all
        text_only = rollout.select(torch.tensor([4, 5]))
        assert "pixel_values" not in policy._model_inputs(text_only.inputs, torch.device("cpu"))
        part, _ = policy.log_probs(model, text_only)
        _assert_close_on_mask(part, full[4:6], text_only.completion_mask)


def test_text_only_batch(setup):
    model, _, policy = setup
    torch.manual_seed(6)
    rollout = policy.generate(model, [_text_only_record(), _text_only_record()], 2, Sampling(max_new_tokens=4))
    assert "pixel_values" not in rollout.inputs.lists and "pixel_values" not in policy._model_inputs(
        rollout.inputs, torch.device("cpu"))
    logp, _ = policy.log_probs(model, rollout)
    _assert_close_on_mask(logp, direct_logprobs(model, rollout), rollout.completion_mask)


# ---------------------------------------------------------------------------------------------- decode


def test_decode_strips_special_tokens(setup, synthetic_records):
    model, _, policy = setup
    tok = policy.tokenizer
    torch.manual_seed(7)
    rollout = policy.generate(model, synthetic_records[:2], 2, Sampling(max_new_tokens=4))
    answer = tok("<answer>red</answer>", add_special_tokens=False)["input_ids"]
    eos, pad = policy.eos_token_ids[0], policy.pad_token_id
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    width = len(answer) + 3
    rows = [answer + [eos, pad, pad], [image_pad] + answer + [eos, pad], answer + [image_pad, image_pad, image_pad],
            answer + [eos, 17, 18]]  # tokens after the stop token are masked out
    ids = torch.tensor([r[:width] for r in rows])
    mask, truncated = policy._completion_mask(ids)
    hand = dataclasses.replace(rollout, completion_ids=ids, completion_mask=mask, truncated=truncated)
    texts = policy.decode(hand)
    assert texts == ["<answer>red</answer>"] * 4
    sampled = policy.decode(rollout)
    assert len(sampled) == rollout.batch_size and all(isinstance(t, str) for t in sampled)
    for text in sampled:
        assert not any(s in text for s in ("<|im_end|>", "<|endoftext|>", *VISION_TOKENS))


# ---------------------------------------------------------------------------------------------- suppression


def test_vision_tokens_are_never_sampled(setup, synthetic_records):
    model, _, policy = setup
    vision_ids = list(policy.suppress_token_ids)
    records = [synthetic_records[0], _text_only_record()]
    with logit_bias(model, {t: 30.0 for t in vision_ids}):
        # without suppression these would be the top tokens everywhere
        kwargs = policy._model_inputs(policy.encode_prompts(records), torch.device("cpu"))
        with torch.no_grad():
            top = model(**kwargs).logits[:, -1].argmax(-1)
        assert all(int(t) in vision_ids for t in top)
        for sampling in (Sampling(temperature=1.0, max_new_tokens=6), Sampling(temperature=0.0, max_new_tokens=6)):
            torch.manual_seed(8)
            rollout = policy.generate(model, records, 3, sampling)
            assert not torch.isin(rollout.completion_ids, torch.tensor(vision_ids)).any()
        # the completions can be re-scored (placeholders would break a forward with images)
        logp, _ = policy.log_probs(model, rollout)
        assert torch.isfinite(logp[rollout.completion_mask.bool()]).all()


# ---------------------------------------------------------------------------------------------- sampler log-probs


@torch.no_grad()
def sampler_reference(model, policy: VisionPolicy, rollout: Rollout, temperature: float, top_k: int = 0) -> torch.Tensor:
    """The log-prob of each completion token under the distribution ``generate`` samples from, by hand: the
    model's logits, vision tokens suppressed (−inf), divided by T, top-k (transformers' rule: drop < k-th)."""
    kwargs, prompt_length = _full_inputs(rollout)
    logits = model(**kwargs, use_cache=False).logits.float()[:, prompt_length - 1:-1]
    logits[..., policy.suppress_token_ids] = float("-inf")
    logits = logits / temperature
    if top_k:
        logits = logits.masked_fill(logits < logits.topk(top_k, -1).values[..., -1:], float("-inf"))
    return torch.log_softmax(logits, dim=-1).gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)


def test_sampler_logp_at_temperature_one_is_the_training_logp(setup, synthetic_records):
    model, processor, _ = setup
    policy = VisionPolicy(model, processor, record_sampler_logp=True)
    records = _mixed_records(synthetic_records)
    # a checkpoint's generation_config.json must not reach the sampler (Qwen2.5-VL's sets 1.05)
    saved, model.generation_config.repetition_penalty = model.generation_config.repetition_penalty, 1.5
    try:
        torch.manual_seed(10)
        with logit_bias(model, _eos_bias(policy, 4.0)):
            rollout = policy.generate(model, records, 2, Sampling(temperature=1.0, max_new_tokens=5))
            logp, _ = policy.log_probs(model, rollout)
            reference = sampler_reference(model, policy, rollout, 1.0)
        # with the suppressed vision tokens at zero mass for the trainer too, the two distributions agree
        with logit_bias(model, {**_eos_bias(policy, 4.0), **{t: -1e4 for t in policy.suppress_token_ids}}):
            torch.manual_seed(10)
            same = policy.generate(model, records, 2, Sampling(temperature=1.0, max_new_tokens=5))
            same_logp, _ = policy.log_probs(model, same)
    finally:
        model.generation_config.repetition_penalty = saved
    mask = rollout.completion_mask
    _assert_close_on_mask(rollout.sampler_logp, reference, mask)
    assert (mask == 0).any() and (rollout.sampler_logp[mask == 0] == 0).all()  # 0 after the stop token
    assert torch.isfinite(rollout.sampler_logp).all()
    # otherwise the sampler renormalises over the vocabulary minus the vision tokens: never less likely
    assert (rollout.sampler_logp - logp.detach())[mask.bool()].min() >= -1e-6
    _assert_close_on_mask(same.sampler_logp, same_logp.detach(), same.completion_mask)


def test_sampler_logp_with_top_k_matches_generate_scores(setup, synthetic_records):
    model, processor, _ = setup
    policy = VisionPolicy(model, processor, record_sampler_logp=True)
    records = _mixed_records(synthetic_records)[:3]
    sampling = Sampling(temperature=0.7, top_k=5, max_new_tokens=5)
    torch.manual_seed(11)
    rollout = policy.generate(model, records, 2, sampling)
    mask = rollout.completion_mask
    _assert_close_on_mask(rollout.sampler_logp, sampler_reference(model, policy, rollout, 0.7, top_k=5), mask)
    # top-k renormalises over 5 tokens: above the trainer's log-prob at the same temperature everywhere
    logp, _ = policy.log_probs(model, rollout)
    assert rollout.temperature == 0.7
    assert (rollout.sampler_logp - logp.detach())[mask.bool()].min() > 1e-3
    # the same draw through generate's own output_scores (every step's [B, V] kept): identical values
    config = policy.generation_config(sampling)
    config.output_scores = config.return_dict_in_generate = True
    torch.manual_seed(11)
    out = model.generate(**policy._model_inputs(rollout.inputs, torch.device("cpu")), generation_config=config)
    width = rollout.completion_ids.shape[1]
    assert torch.equal(out.sequences[:, -width:].masked_fill(mask == 0, policy.pad_token_id), rollout.completion_ids)
    scores = torch.stack(out.scores, 1).log_softmax(-1).gather(-1, out.sequences[:, -width:, None]).squeeze(-1)
    _assert_close_on_mask(rollout.sampler_logp, scores, mask, atol=1e-6)
    # the recorder empties each step's scores once read: generate keeps no [B, T, V] of them
    recorder = SampledTokenLogp()
    torch.manual_seed(11)
    out = model.generate(**policy._model_inputs(rollout.inputs, torch.device("cpu")), generation_config=config,
                         stopping_criteria=StoppingCriteriaList([recorder]))
    assert len(out.scores) == width and all(step.numel() == 0 for step in out.scores)
    _assert_close_on_mask(recorder.logp(width), scores, mask, atol=1e-6)


def test_greedy_sampler_logp_is_zero(setup, synthetic_records):
    model, processor, _ = setup
    policy = VisionPolicy(model, processor, record_sampler_logp=True)
    rollout = policy.generate(model, synthetic_records[:2], 2, Sampling(temperature=0.0, max_new_tokens=4))
    assert torch.equal(rollout.sampler_logp, torch.zeros(rollout.completion_ids.shape))


# ---------------------------------------------------------------------------------------------- gradients


def test_gradients_reach_language_and_vision_parameters(setup, synthetic_records):
    model, processor, policy = setup
    trainable = copy.deepcopy(model).train()
    torch.manual_seed(9)
    rollout = policy.generate(trainable, _mixed_records(synthetic_records), 2, Sampling(max_new_tokens=4))
    logp, _ = policy.log_probs(trainable, rollout)
    assert logp.requires_grad
    mask = rollout.completion_mask.float()
    loss = -(logp * mask).sum() / mask.sum()
    loss.backward()
    grads = {n: p.grad for n, p in trainable.named_parameters()}
    language = [n for n in grads if n.startswith("model.language_model.layers.")]
    visual = [n for n in grads if n.startswith("model.visual.")]
    assert language and visual
    for group in (language, visual):
        assert all(grads[n] is not None and torch.isfinite(grads[n]).all() for n in group)
        assert any(grads[n].abs().sum() > 0 for n in group)
    assert grads["model.visual.patch_embed.proj.weight"].abs().sum() > 0
    assert grads["model.language_model.embed_tokens.weight"].abs().sum() > 0
    # the shared fixture model is untouched
    assert all(p.grad is None for p in model.parameters())


def test_min_new_tokens_forces_the_completion_length(setup, synthetic_records):
    """With the stop token made very likely, ``min_new_tokens`` still holds it back until then (the length
    forcing the TRL side-by-side benchmark uses); the recorded sampler log-probs see the same suppression."""
    model, _, policy = setup
    policy.record_sampler_logp = True
    try:
        torch.manual_seed(0)
        with logit_bias(model, _eos_bias(policy)):
            free = policy.generate(model, synthetic_records[:2], 4, Sampling(temperature=1.0, max_new_tokens=6))
            forced = policy.generate(model, synthetic_records[:2], 4,
                                     Sampling(temperature=1.0, max_new_tokens=6, min_new_tokens=4))
    finally:
        policy.record_sampler_logp = False
    assert free.completion_mask.sum(dim=1).min() < 4  # the bias makes early stops common
    assert (forced.completion_mask.sum(dim=1) >= 4).all()
    assert torch.isfinite(forced.sampler_logp).all()
