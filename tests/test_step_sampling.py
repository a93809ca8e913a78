"""Collect-phase and preparation options of the step pipeline on the tiny VLM: DAPO dynamic sampling (rounds
concatenated into one batch), KL as a reward penalty, top-entropy token selection, reference refresh."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch

from mmrl import algorithms
from mmrl.collect import Chunk, CollectOnce, DynamicSampling
from mmrl.policy import Rollout, Sampling
from mmrl.rewards import RewardOutput
from mmrl.trainer import Trainer
from tests.test_step_pipeline import dense_reward, make_config
from vision import task

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


class ScriptedReward:
    """Rewards per call: ``script[call][group]`` is "const" (every sample 1.0) or "mixed" (0/1 alternating)."""

    def __init__(self, script: list[list[str]], group_size: int):
        self.script, self.group_size, self.calls = script, group_size, 0
        self.__name__ = "scripted"

    def __call__(self, prompts, completions, **kwargs):
        plan = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        out = []
        for kind in plan:
            out += [1.0] * self.group_size if kind == "const" else [float(i % 2) for i in range(self.group_size)]
        assert len(out) == len(completions)
        return out


def spy_updates(trainer: Trainer) -> list:
    seen = []
    original = trainer._update

    def spy(batch):
        seen.append(batch)
        return original(batch)

    trainer._update = spy
    return seen


def test_dynamic_sampling_fills_the_batch_with_informative_groups_only(tmp_path):
    cfg = make_config(tmp_path, filters__dynamic_sampling=True, filters__max_sample_batches=5)
    bundle = task.build(cfg)
    # round 1: group 0 constant, group 1 informative; round 2: both informative (one is surplus)
    reward = ScriptedReward([["const", "mixed"], ["mixed", "mixed"]], cfg.group_size)
    trainer = Trainer(cfg, bundle.policy, bundle.train_dataset, reward_funcs=[reward])
    seen = spy_updates(trainer)
    rows = trainer.train()
    assert reward.calls == 2
    batch = seen[0]
    assert batch.size == 2 * cfg.group_size and batch.num_groups == 2
    grouped = batch.rewards.view(2, cfg.group_size)
    assert (grouped.std(dim=1) > 0).all()  # never a zero-variance group
    assert torch.equal(batch.group_id, torch.arange(8) // 4)
    row = rows[0]
    assert row["dynamic_sampling/prompts_drawn"] == 4 and row["dynamic_sampling/groups_dropped"] == 1
    assert row["dynamic_sampling/groups_surplus"] == 1 and row["dynamic_sampling/rounds"] == 2
    assert row["reward"] == pytest.approx((4 + 2 + 2 + 2) / 16)  # every generated sample, dropped ones too
    assert row["update_skipped"] == 0.0 and math.isfinite(row["loss"])


def test_dynamic_sampling_stops_at_its_bound_and_says_so(tmp_path, caplog):
    cfg = make_config(tmp_path, max_steps=2, filters__dynamic_sampling=True, filters__max_sample_batches=3)
    bundle = task.build(cfg)
    reward = ScriptedReward([["const", "const"]], cfg.group_size)
    trainer = Trainer(cfg, bundle.policy, bundle.train_dataset, reward_funcs=[reward])
    seen = spy_updates(trainer)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="mmrl"):
        rows = trainer.train()
    assert reward.calls == 6  # 3 rounds per step, 2 steps
    assert "max_sample_batches=3" in caplog.text and "0 of 2 informative groups" in caplog.text
    assert seen == []  # nothing to train on: no update, the weights are unchanged
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    assert len(rows) == 2 and all(r["update_skipped"] == 1.0 for r in rows)
    assert rows[-1]["dynamic_sampling/bound_hits"] == 2


def test_dynamic_sampling_partial_batch_trains_on_what_was_collected(tmp_path):
    cfg = make_config(tmp_path, filters__dynamic_sampling=True, filters__max_sample_batches=2)
    bundle = task.build(cfg)
    reward = ScriptedReward([["const", "mixed"], ["const", "const"]], cfg.group_size)
    trainer = Trainer(cfg, bundle.policy, bundle.train_dataset, reward_funcs=[reward])
    seen = spy_updates(trainer)
    rows = trainer.train()
    assert seen[0].num_groups == 1 and seen[0].size == cfg.group_size
    assert rows[0]["dynamic_sampling/bound_hits"] == 1


def _chunk(rollout: Rollout, rewards: list[float]) -> Chunk:
    total = torch.tensor(rewards, dtype=torch.float32)
    return Chunk(rollout, [f"c{i}" for i in range(rollout.batch_size)], RewardOutput(total[:, None], total, ["r"]))


def test_concatenated_rounds_score_like_separate_rounds(tmp_path):
    """Rounds with prompts of different lengths (left-padded differently) join into one batch whose
    log-probs equal each round's own — what the update of a dynamic-sampling batch relies on."""
    cfg = make_config(tmp_path)
    bundle = task.build(cfg)
    policy, model = bundle.policy, bundle.policy.model
    records = [bundle.train_dataset[i] for i in range(2)]
    longer = copy.deepcopy(records)
    for record in longer:
        record["prompt"][0]["content"][1]["text"] += " Look carefully at the whole picture first."
    torch.manual_seed(0)
    sampling = Sampling(temperature=1.0, max_new_tokens=4)
    short_rollout = policy.generate(model, records, 2, sampling)
    long_rollout = policy.generate(model, longer, 2, Sampling(temperature=1.0, max_new_tokens=6))
    assert short_rollout.inputs.tensors["input_ids"].shape[1] < long_rollout.inputs.tensors["input_ids"].shape[1]
    joined = Rollout.concat([short_rollout, long_rollout])
    assert joined.batch_size == 8 and joined.completion_ids.shape[1] == long_rollout.completion_ids.shape[1]
    with torch.no_grad():
        together = policy.log_probs(model, joined)[0]
        apart = [policy.log_probs(model, r)[0] for r in (short_rollout, long_rollout)]
    short_len = short_rollout.completion_ids.shape[1]
    mask = short_rollout.completion_mask.bool()
    torch.testing.assert_close(together[:4, :short_len][mask], apart[0][mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[4:] * long_rollout.completion_mask, apart[1] * long_rollout.completion_mask,
                               atol=1e-5, rtol=1e-5)
    assert (joined.completion_mask[:4, short_len:] == 0).all()

    # the collectors keep whole groups in order, renumbered from 0
    collected = DynamicSampling(max_sample_batches=2).collect(
        iter([_chunk(short_rollout, [1, 1, 0, 1]), _chunk(long_rollout, [1, 0, 1, 1])]).__next__, 2, lambda need: need)
    assert collected.batch.size == 4 and torch.equal(collected.batch.group_id, torch.tensor([0, 0, 1, 1]))
    assert collected.completions == ["c2", "c3", "c0", "c1"] and collected.generated.batch_size == 8
    once = CollectOnce().collect(iter([_chunk(short_rollout, [1, 1, 0, 1])]).__next__, 2, lambda need: need)
    assert once.batch.size == 4 and once.generated is short_rollout


def test_kl_in_reward_penalises_the_reward_not_the_loss(tmp_path):
    cfg = make_config(tmp_path, algorithm__beta=0.5, algorithm__kl_in_reward=True, optim__lr=0.0)
    bundle = task.build(cfg)
    trainer = Trainer(cfg, bundle.policy, bundle.train_dataset, reward_funcs=[dense_reward])
    assert "kl" not in trainer.loss_terms and "kl_in_reward" in trainer.components
    # a reference that differs from the policy, so the penalty is visible
    with torch.no_grad():
        for p in trainer.ref_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    seen = spy_updates(trainer)
    rows = trainer.train()
    batch = seen[0]
    kl = algorithms.kl_estimate(batch.logps["old"], batch.logps["ref"], "k3") * batch.rollout.completion_mask
    raw = torch.tensor(dense_reward(None, bundle.policy.decode(batch.rollout)))
    torch.testing.assert_close(batch.rewards, raw - 0.5 * kl.sum(dim=1), atol=1e-5, rtol=1e-5)
    assert rows[0]["kl_reward_penalty"] > 0 and "papo/perception_kl" not in rows[0]


def test_top_entropy_trains_on_the_highest_entropy_tokens_only(tmp_path):
    cfg = make_config(tmp_path, filters__top_entropy_fraction=0.25)
    bundle = task.build(cfg)
    trainer = Trainer(cfg, bundle.policy, bundle.train_dataset, reward_funcs=[dense_reward])
    seen = spy_updates(trainer)
    rows = trainer.train()
    batch = seen[0]
    valid = batch.rollout.completion_mask.bool()
    kept = batch.loss_mask.bool()
    assert int(kept.sum()) == math.ceil(0.25 * int(valid.sum()))
    entropy = batch.entropies["old"]
    assert entropy[kept].min() >= entropy[valid & ~kept].max()
    assert rows[0]["filters/top_entropy_kept_frac"] == pytest.approx(kept.sum().item() / valid.sum().item())
    assert "old" not in batch.logps  # one update per rollout: old log-probs stay the update's own


def test_reference_refresh_mixes_the_policy_into_the_reference(tmp_path):
    cfg = make_config(tmp_path, max_steps=2, algorithm__beta=0.05, algorithm__ref_sync_steps=2,
                      algorithm__ref_sync_alpha=0.25)
    bundle = task.build(cfg)
    trainer = Trainer(cfg, bundle.policy, bundle.train_dataset, reward_funcs=[dense_reward])
    ref_before = {n: p.clone() for n, p in trainer.ref_model.named_parameters()}
    trainer.train()
    policy = dict(trainer.model.named_parameters())
    # one refresh, after update 2: ref = 0.25·policy + 0.75·(initial weights)
    for name, ref in trainer.ref_model.named_parameters():
        torch.testing.assert_close(ref, 0.25 * policy[name].detach() + 0.75 * ref_before[name], atol=1e-6, rtol=1e-5)
    assert any(not torch.equal(ref, ref_before[n]) for n, ref in trainer.ref_model.named_parameters())


def test_adaptive_gfpo_logs_k_and_its_difficulty_thresholds(tmp_path):
    cfg = make_config(tmp_path, max_steps=2, filters__gfpo_k=2, filters__gfpo_adaptive=True,
                      filters__gfpo_k_per_bucket=[4, 3, 2], filters__gfpo_quantiles=[0.34, 0.67])
    bundle = task.build(cfg)
    trainer = Trainer(cfg, bundle.policy, bundle.train_dataset, reward_funcs=[dense_reward])
    rows = trainer.train()
    for row in rows:
        assert 2 <= row["filters/gfpo_k_mean"] <= 4
        assert {"filters/gfpo_difficulty_q34", "filters/gfpo_difficulty_q67"} <= row.keys()


def test_a_text_only_round_joins_a_round_with_images(tmp_path):
    """A round whose prompts have no image has no image chunks at all; joined with a round that has them,
    every sample keeps its own (empty or not) and scores as before."""
    cfg = make_config(tmp_path)
    bundle = task.build(cfg)
    policy, model = bundle.policy, bundle.policy.model
    with_image = bundle.train_dataset[0]
    text_only = {**copy.deepcopy(with_image), "images": []}
    text_only["prompt"][0]["content"] = [c for c in text_only["prompt"][0]["content"] if c["type"] == "text"]
    torch.manual_seed(0)
    sampling = Sampling(temperature=1.0, max_new_tokens=4)
    first, second = policy.generate(model, [text_only], 2, sampling), policy.generate(model, [with_image], 2, sampling)
    assert "pixel_values" not in first.inputs.lists and "pixel_values" in second.inputs.lists
    joined = Rollout.concat([first, second])
    assert [len(chunks) for chunks in joined.inputs.lists["pixel_values"]] == [0, 0, 1, 1]
    with torch.no_grad():
        together = policy.log_probs(model, joined)[0]
        apart = [policy.log_probs(model, r)[0] for r in (first, second)]
    for rows, part, alone in ((slice(0, 2), first, apart[0]), (slice(2, 4), second, apart[1])):
        length, mask = part.completion_ids.shape[1], part.completion_mask.bool()
        torch.testing.assert_close(together[rows, :length][mask], alone[mask], atol=1e-5, rtol=1e-5)


def test_dynamic_sampling_can_judge_one_reward_function(tmp_path):
    """verl's ``filter_groups.metric: acc``: a group whose accuracy is all equal is dropped even when a second
    reward (format) varies; the kept batch still trains on the combined reward."""
    cfg = make_config(tmp_path, filters__dynamic_sampling=True, filters__max_sample_batches=2,
                      filters__dynamic_sampling_reward="scripted")
    bundle = task.build(cfg)
    accuracy = ScriptedReward([["const", "mixed"], ["mixed", "mixed"]], cfg.group_size)
    trainer = Trainer(cfg, bundle.policy, bundle.train_dataset, reward_funcs=[accuracy, dense_reward],
                      reward_weights=[1.0, 0.1])
    assert trainer.reward_names[0] == "scripted"  # a callable's name: its __name__
    seen = spy_updates(trainer)
    rows = trainer.train()
    assert rows[0]["dynamic_sampling/groups_dropped"] == 1  # the constant-accuracy group, whatever its format
    batch = seen[0]
    assert batch.num_groups == 2
    texts = bundle.policy.decode(batch.rollout)
    expected = torch.tensor([0.0, 1.0, 0.0, 1.0] * 2) + 0.1 * torch.tensor(dense_reward(None, texts))  # both "mixed"
    torch.testing.assert_close(batch.rewards, expected)
