"""The trainer's step pipeline on the tiny VLM: micro-batching never changes the update, every objective and
estimator trains through the same loop, components (GFPO, overlong shaping, truncation masks) act on the
loss mask, and a new loss term joins without a trainer edit."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from mmrl.config import LoggingConfig, OptimConfig, RewardConfig, TrainConfig
from mmrl.loss_terms import LOSS_TERMS, register_loss_term
from mmrl.objectives import OBJECTIVES, objective_spec
from mmrl.policy import Sampling
from mmrl.trainer import Trainer
from vision import task
from vision.data import VisionDataConfig
from vision.modeling import VisionModelConfig
from vision.sft import ColdStartConfig

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def make_config(output_dir: Path, **changes) -> TrainConfig:
    cfg = TrainConfig(
        output_dir=str(output_dir), seed=0, max_steps=1, prompts_per_step=2, group_size=4, micro_batch_size=8,
        mixed_precision="no", save_final=False,
        model=VisionModelConfig(min_pixels=3136, max_pixels=12544, dtype="float32"),
        data=VisionDataConfig(train="synthetic:single_shape", template="answer", max_train_samples=16,
                              synthetic_options={"image_size": 56}),
        cold_start=ColdStartConfig(steps=0), rewards=[RewardConfig("accuracy", 1.0)],
        sampling=Sampling(temperature=1.0, max_new_tokens=5), optim=OptimConfig(lr=1e-2, max_grad_norm=0.0),
        logging=LoggingConfig(report_to=["jsonl"], progress_bar=False, log_completions=0))
    for key, value in changes.items():
        *path, leaf = key.split("__")
        target = cfg
        for part in path:
            target = getattr(target, part)
        setattr(target, leaf, value)
    return cfg


def dense_reward(prompts, completions, **kwargs):
    return [float(sum(map(ord, c)) % 7) / 6 for c in completions]


def train(cfg: TrainConfig, reward=dense_reward) -> tuple[Trainer, list[dict]]:
    bundle = task.build(cfg)
    trainer = Trainer(cfg, bundle.policy, bundle.train_dataset, reward_funcs=[reward])
    return trainer, trainer.train()


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_micro_batching_leaves_the_gradient_unchanged(tmp_path, loss_type):
    """1, 2 and 4 micro-batches (8, 4, 2 samples) accumulate to the same loss and gradient: the loss is
    normalised by the whole mini-batch's counts, never per micro-batch."""
    results = []
    for micro in (8, 4, 2):
        cfg = make_config(tmp_path / f"{loss_type}{micro}", micro_batch_size=micro, algorithm__loss_type=loss_type,
                          algorithm__beta=0.05)
        bundle = task.build(cfg)
        trainer = Trainer(cfg, bundle.policy, bundle.train_dataset, reward_funcs=[dense_reward])
        grads = {}
        apply = trainer._apply_update

        def record(sums, trainer=trainer, grads=grads, apply=apply):
            grads.update({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
            return apply(sums)

        trainer._apply_update = record
        rows = trainer.train()
        results.append((grads, rows[0]["loss"]))
    (grads_ref, loss_ref), others = results[0], results[1:]
    assert any(g.abs().max() > 0 for g in grads_ref.values())
    for grads, loss in others:
        assert loss == pytest.approx(loss_ref, rel=1e-5, abs=1e-7)
        assert grads.keys() == grads_ref.keys()
        for key in grads_ref:
            torch.testing.assert_close(grads[key], grads_ref[key], rtol=1e-4, atol=1e-7)


# Policy-ratio objectives; dpo (pairs, against the reference) trains through the loop in tests/test_preference.py
@pytest.mark.parametrize("objective", sorted(n for n in OBJECTIVES if not objective_spec(n).pairwise))
def test_every_objective_trains_through_the_loop(tmp_path, objective):
    cfg = make_config(tmp_path, max_steps=2, algorithm__objective=objective, algorithm__ppo_epochs=2,
                      mini_batch_size=4, micro_batch_size=4)
    trainer, rows = train(cfg)
    assert len(rows) == 2 * 2 * 2  # 2 steps x 2 epochs x 2 mini-batches
    assert all(math.isfinite(r["loss"]) and r["update_skipped"] == 0.0 for r in rows)
    assert any(r["policy_loss"] != 0 for r in rows)


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"])
def test_every_advantage_estimator_trains_through_the_loop(tmp_path, estimator):
    _, rows = train(make_config(tmp_path, max_steps=2, algorithm__advantage_estimator=estimator))
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)


def test_gfpo_keeps_k_per_group_and_the_rest_leave_the_loss(tmp_path):
    seen = {}
    cfg = make_config(tmp_path, filters__gfpo_k=2)
    bundle = task.build(cfg)
    trainer = Trainer(cfg, bundle.policy, bundle.train_dataset, reward_funcs=[dense_reward])
    original = trainer._update

    def spy(batch):
        seen["mask"] = batch.loss_mask.clone()
        seen["advantages"] = batch.advantages.clone()
        seen["lengths"] = batch.rollout.completion_mask.sum(1)
        return original(batch)

    trainer._update = spy
    rows = trainer.train()
    kept = seen["mask"].sum(dim=1) > 0
    assert kept.view(-1, 4).sum(dim=1).tolist() == [2, 2]  # k = 2 of each group of 4
    assert (seen["advantages"][~kept] == 0).all()
    for g in range(2):  # the kept ones are the shortest of their group
        lengths, keep = seen["lengths"].view(-1, 4)[g], kept.view(-1, 4)[g]
        assert lengths[keep].max() <= lengths[~keep].min()
    assert rows[0]["filters/gfpo_kept_frac"] == 0.5


def test_overlong_penalty_and_truncation_mask(tmp_path):
    cfg = make_config(tmp_path, filters__overlong_cache_length=3, filters__mask_truncated=True)
    trainer, rows = train(cfg, reward=lambda prompts, completions, **kw: [0.0] * len(completions))
    # 5 new tokens max, the last 3 ramp to -1: an untrained model rarely stops, so the penalty is visible
    assert rows[0]["filters/overlong_penalty_mean"] < 0
    assert 0 <= rows[0]["filters/truncated_masked_frac"] <= 1
    assert rows[0]["reward"] == 0.0  # the task's reward, as the reward functions gave it
    assert rows[0]["reward_shaped"] == pytest.approx(rows[0]["filters/overlong_penalty_mean"], abs=1e-6)


def test_a_new_loss_term_joins_without_a_trainer_edit(tmp_path):
    @dataclasses.dataclass
    class LengthPenalty:
        coef: float
        needs: frozenset = frozenset()

        def __call__(self, mb):
            value = self.coef * mb.aggregate(-mb.logp, mb.mask, "loss")
            return value, {"length_penalty": value.detach()}

    register_loss_term("test_length_penalty")(lambda cfg: LengthPenalty(0.5))
    try:
        _, rows = train(make_config(tmp_path))
        assert rows[0]["length_penalty"] > 0
    finally:
        del LOSS_TERMS["test_length_penalty"]


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_mismatch_correction_weights_every_token_from_the_sampler_logps(tmp_path, mode):
    seen = {}
    cfg = make_config(tmp_path, mismatch__mode=mode, mismatch__cap=1.5, mismatch__low=0.5,
                      sampling=Sampling(temperature=0.7, top_k=5, max_new_tokens=5))
    bundle = task.build(cfg)
    trainer = Trainer(cfg, bundle.policy, bundle.train_dataset, reward_funcs=[dense_reward])
    assert bundle.policy.record_sampler_logp  # turned on because the component needs it
    original = trainer._update

    def spy(batch):
        seen["batch"] = batch
        return original(batch)

    trainer._update = spy
    rows = trainer.train()
    batch = seen["batch"]
    valid = batch.rollout.completion_mask.bool()
    ratio = torch.exp(batch.logps["old"] - batch.logps["sampler"])[valid]
    weights = batch.token_weights["mismatch"][valid]
    assert (weights <= 1.5 + 1e-6).all()
    if mode == "token_truncate":  # top-k renormalises the sampler's distribution: ratios below 1
        torch.testing.assert_close(weights, ratio.clamp(min=0.5, max=1.5))  # C_min as TRL
    if mode == "token_mask":
        kept = batch.loss_mask.bool()[valid]
        assert torch.equal(kept, (ratio >= 0.5) & (ratio <= 1.5))
    assert any(k.startswith("mismatch/") for k in rows[0])


def test_entropy_bonus_has_a_gradient_and_raises_entropy_of_the_update(tmp_path):
    grads = {}
    for coef in (0.0, 1.0):
        cfg = make_config(tmp_path / str(coef), algorithm__entropy_coef=coef)
        bundle = task.build(cfg)
        trainer = Trainer(cfg, bundle.policy, bundle.train_dataset,
                          reward_funcs=[lambda prompts, completions, **kw: [0.0] * len(completions)])
        apply = trainer._apply_update

        def record(sums, trainer=trainer, coef=coef, apply=apply):
            grads[coef] = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
            return apply(sums)

        trainer._apply_update = record
        trainer.train()
    # zero rewards: the policy term has no gradient, the bonus alone moves the weights
    assert all(g.abs().max() == 0 for g in grads[0.0].values())
    assert any(g.abs().max() > 0 for g in grads[1.0].values())


def test_gradients_sync_only_at_the_last_micro_batch(tmp_path, monkeypatch):
    """accelerate's ``sync_gradients`` is off for all but the last micro-batch of a mini-batch: its DeepSpeed
    backward steps the engine whenever it is on (once per micro-batch otherwise — seen with ZeRO-2)."""
    cfg = make_config(tmp_path, micro_batch_size=2)  # 8 samples: 4 micro-batches
    bundle = task.build(cfg)
    trainer = Trainer(cfg, bundle.policy, bundle.train_dataset, reward_funcs=[dense_reward])
    seen: list[bool] = []
    backward = trainer.accelerator.backward
    monkeypatch.setattr(trainer.accelerator, "backward",
                        lambda loss, **kw: (seen.append(trainer.accelerator.sync_gradients), backward(loss, **kw)))
    trainer.train()
    assert seen == [False, False, False, True]
    assert trainer.accelerator.sync_gradients
