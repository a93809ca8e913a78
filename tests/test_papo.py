"""PAPO: the perception-KL estimator on hand values, the sign of its gradient, the entropy terms, the γ
schedule, the collapse monitor, the masked view of a vision rollout, and a short end-to-end run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mmrl import algorithms
from mmrl.config import ConfigError, PAPOConfig, load_config
from mmrl.perception import CollapseMonitor, perception_term
from vision.papo import perception_kl


def test_perception_kl_hand_values():
    logp = torch.tensor([[math.log(0.5), math.log(0.2)]])
    masked = torch.tensor([[math.log(0.25), math.log(0.4)]])
    x = torch.tensor([[math.log(0.5), math.log(2.0)]])  # masked − logp
    torch.testing.assert_close(perception_kl(logp, masked, "k1"), -x)
    torch.testing.assert_close(perception_kl(logp, masked, "k2"), 0.5 * x**2)
    # k3 = e^x − x − 1: 0.5 − ln 0.5 − 1 = 0.193147, 2 − ln 2 − 1 = 0.306853
    torch.testing.assert_close(perception_kl(logp, masked), torch.tensor([[0.193147, 0.306853]]), atol=1e-6, rtol=0)


def test_perception_kl_clamps_and_dtype():
    logp = torch.tensor([0.0, 0.0, -50.0], dtype=torch.bfloat16)
    masked = torch.tensor([30.0, -30.0, 0.0], dtype=torch.bfloat16)
    kl = perception_kl(logp, masked)
    assert kl.dtype == torch.float32
    # x clamped to ±20 first, then the estimate clamped to ≤ 10
    assert kl.max() <= 10.0
    assert kl[1] == 10.0  # x = −20 after the clamp: k3 = e^−20 + 19 ≈ 19, clamped to 10
    with pytest.raises(ValueError, match="k1"):
        perception_kl(logp, masked, "k4")


def test_gradient_step_on_papo_term_raises_perception_kl():
    """The term is *subtracted*: descending the loss must increase KL(π(·|I) ‖ π(·|I_masked))."""
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 10, requires_grad=True)
    masked_logits = torch.randn(4, 6, 10)
    tokens = torch.randint(0, 10, (4, 6))
    mask = torch.ones(4, 6)

    def kl_now() -> torch.Tensor:
        logp = logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        masked_logp = masked_logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return logp, masked_logp

    logp, masked_logp = kl_now()
    term, metrics = perception_term(logp, masked_logp, mask, torch.ones(4, dtype=torch.bool), PAPOConfig(),
                                    gamma=0.5, loss_type="grpo", max_completion_length=None)
    before = metrics["papo/perception_kl"].item()
    term.backward()
    with torch.no_grad():
        logits -= 1.0 * logits.grad
    after = algorithms.masked_mean(perception_kl(*kl_now()), mask).item()
    assert after > before


def test_perception_term_composition_and_views():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.5]])
    masked = torch.tensor([[-2.0, -1.0], [-3.0, -3.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    has_view = torch.tensor([True, False])  # second sample is text-only: no perception term
    cfg = PAPOConfig(eta_orig=0.1, eta_mask=0.2)
    term, metrics = perception_term(logp, masked, mask, has_view, cfg, gamma=0.02, loss_type="dapo",
                                    max_completion_length=None)
    kl = perception_kl(logp[:1], masked[:1])  # only sample 0 counts; dapo = token mean over its 2 tokens
    expected = -0.02 * kl.mean() + 0.1 * 1.5 + 0.2 * 1.5
    torch.testing.assert_close(term, expected)
    assert metrics["papo/entropy_orig"].item() == pytest.approx(1.5)
    assert metrics["papo/entropy_masked"].item() == pytest.approx(1.5)
    clipped, _ = perception_term(logp, masked, mask, has_view, PAPOConfig(kl_token_clip=0.1), 1.0, "dapo", None)
    torch.testing.assert_close(clipped, -perception_kl(logp[:1], masked[:1]).clamp(max=0.1).mean())


def test_gamma_schedule():
    assert algorithms.scheduled_weight(0.02, 50, 100) == 0.02
    assert algorithms.scheduled_weight(0.02, 0, 100, "linear") == pytest.approx(0.02)
    assert algorithms.scheduled_weight(0.02, 25, 100, "linear", 0.5) == pytest.approx(0.01)
    assert algorithms.scheduled_weight(0.02, 50, 100, "linear", 0.5) == 0.0
    assert algorithms.scheduled_weight(0.02, 90, 100, "linear", 0.5) == 0.0
    with pytest.raises(ValueError, match="constant"):
        algorithms.scheduled_weight(0.02, 1, 10, "cosine")
    with pytest.raises(ValueError, match="anneal_fraction"):
        algorithms.scheduled_weight(0.02, 1, 10, "linear", 0.0)


def test_collapse_monitor_warns_on_kl_drop_and_entropy_rise(caplog):
    monitor = CollapseMonitor(window=3)
    for step in range(3):
        assert monitor.update(1.0, 0.5, 0.6, step) == []
    messages = []
    for step in range(3, 6):
        messages += monitor.update(0.2, 1.0, 1.2, step)
    assert any("perception KL fell" in m for m in messages)
    assert any("entropy rose" in m for m in messages)
    assert monitor.warnings == 1
    steady = CollapseMonitor(window=3)
    assert all(steady.update(1.0, 0.5, 0.5, s) == [] for s in range(12))


def test_presets_and_unknown_preset():
    cfg = load_config(None, ["preset=papo_grpo"])
    assert cfg.papo.enabled and cfg.papo.gamma == 0.02 and cfg.papo.kl_estimator == "k3"
    assert cfg.algorithm.beta == 0.01 and cfg.algorithm.epsilon_high == 0.3 and cfg.group_size == 5
    dapo = load_config(None, ["preset=papo_dapo", "papo.gamma=0.005"])
    assert dapo.algorithm.loss_type == "dapo" and dapo.algorithm.beta == 0.0 and dapo.papo.gamma == 0.005
    with pytest.raises(ConfigError, match="papo_grpo"):
        load_config(None, ["preset=papo_grp"])


def _tiny_vision_setup(overrides):
    from vision import task as vision_task

    cfg = load_config("configs/vision/demo.yaml", [
        "cold_start.steps=0", "data.max_train_samples=32", "data.max_eval_samples=8", "prompts_per_step=2",
        "group_size=3", "sampling.max_new_tokens=4", "logging.progress_bar=false", *overrides],
        section_types=vision_task.SECTION_TYPES)
    return cfg, vision_task.build(cfg)


def test_masked_view_shares_mask_in_group_and_changes_across_steps():
    cfg, task = _tiny_vision_setup([])
    policy = task.policy
    from mmrl.policy import Sampling

    records = [task.train_dataset[i] for i in range(2)]
    text_only = {"prompt": [{"role": "user", "content": [{"type": "text", "text": "Hi?"}]}], "images": [],
                 "answer": "x", "task": "t", "choices": []}
    rollout = policy.generate(policy.model, [*records, text_only], 3, Sampling(max_new_tokens=3))
    generator = torch.Generator().manual_seed(0)
    masked, has_view = policy.masked_view(rollout, generator)
    assert has_view.tolist() == [True] * 6 + [False] * 3
    pixels = masked.inputs.lists["pixel_values"]
    original = rollout.inputs.lists["pixel_values"]
    for group in range(2):
        first = pixels[3 * group][0]
        assert all(torch.equal(pixels[3 * group + k][0], first) for k in range(3))  # one mask per prompt
        assert not torch.equal(first, original[3 * group][0])  # and it does change the image
    torch.testing.assert_close(masked.completion_ids, rollout.completion_ids)
    assert torch.equal(masked.inputs.tensors["input_ids"], rollout.inputs.tensors["input_ids"])
    again, _ = policy.masked_view(rollout, generator)  # next step: a fresh mask
    assert not torch.equal(again.inputs.lists["pixel_values"][0][0], pixels[0][0])
    # The masked view scores the same completions (batched), and differs from the original view.
    logp, _ = policy.log_probs(policy.model, rollout)
    masked_logp, _ = policy.log_probs(policy.model, masked)
    assert masked_logp.shape == logp.shape
    assert not torch.allclose(masked_logp[:6], logp[:6])
    torch.testing.assert_close(masked_logp[6:], logp[6:])  # text-only: nothing to mask


def test_end_to_end_papo_run_logs_monitors(tmp_path):
    from mmrl.trainer import Trainer

    cfg, task = _tiny_vision_setup([f"output_dir={tmp_path}", "max_steps=3", "papo.enabled=true",
                                    "papo.gamma=0.02", "papo.eta_orig=0.01", "papo.eta_mask=0.01",
                                    "papo.gamma_schedule=linear", "save_final=false"])
    Trainer(cfg, task.policy, task.train_dataset).train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for key in ("papo/perception_kl", "papo/entropy_orig", "papo/entropy_masked", "papo/gamma",
                "clip_ratio/high_mean", "papo/samples_without_view"):
        assert key in rows[-1], key
    assert rows[0]["papo/perception_kl"] > 0
    assert rows[0]["papo/gamma"] == pytest.approx(0.02) and rows[2]["papo/gamma"] < rows[0]["papo/gamma"]


def test_papo_needs_a_policy_with_masked_view(tmp_path):
    from mmrl.config import TrainConfig
    from mmrl.trainer import Trainer

    class NoView:
        model = torch.nn.Linear(2, 2)

    cfg = TrainConfig(output_dir=str(tmp_path))
    cfg.papo.enabled = True
    with pytest.raises(ValueError, match="masked_view"):
        Trainer(cfg, NoView(), [{"prompt": "x"}])
