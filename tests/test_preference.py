"""DPO over the trainer's groups (mmrl.preference): the loss by hand, pairs from within a group only, the
reference schedule (s = 1 online, s = 0 offline, semi-online rollouts from the reference), offline pairs
from a dataset, and the same objective on the image generator."""

from __future__ import annotations

import math

import pytest
import torch

from mmrl import algorithms
from mmrl.advantages import AdvantageParams
from mmrl.collect import Chunk, CollectOnce, PreferencePairs
from mmrl.config import PRESETS, ConfigError, merge_dicts, to_dict
from mmrl.config_checks import validate_config
from mmrl.objectives import ObjectiveParams, get_objective
from mmrl.policy import Sampling
from mmrl.preference import dpo_loss, preference_advantages, preference_pairs
from mmrl.rewards import RewardOutput
from mmrl.trainer import Trainer
from tests.test_step_pipeline import dense_reward, make_config
from tests.test_step_sampling import spy_updates
from vision import task

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

F64 = torch.float64


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# --------------------------------------------------------------------------------------------- the loss


def test_dpo_loss_by_hand():
    chosen, rejected = torch.tensor([1.0, 0.5], dtype=F64), torch.tensor([-1.0, 1.5], dtype=F64)
    # h = 2 and -1; beta 0.5 -> beta*h = 1, -0.5
    sigmoid = dpo_loss(chosen, rejected, 0.5)
    assert sigmoid.tolist() == pytest.approx([-log_sigmoid(1.0), -log_sigmoid(-0.5)], abs=1e-12)
    smoothed = dpo_loss(chosen, rejected, 0.5, label_smoothing=0.1)
    assert smoothed[0].item() == pytest.approx(-0.9 * log_sigmoid(1.0) - 0.1 * log_sigmoid(-1.0), abs=1e-12)
    ipo = dpo_loss(chosen, rejected, 0.5, loss="ipo")  # (h - 1/(2 beta))^2 = (2 - 1)^2, (-1 - 1)^2
    assert ipo.tolist() == pytest.approx([1.0, 4.0], abs=1e-12)
    with pytest.raises(ValueError, match="hinge"):
        dpo_loss(chosen, rejected, 0.5, loss="hinge")


def objective_case():
    # two pairs; pair 0: chosen first, pair 1: chosen second (the advantage says which)
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5], [-1.0, -1.0, 0.0], [-3.0, 0.0, 0.0]], dtype=F64)
    ref = torch.tensor([[-1.5, -1.5, 0.0], [-1.0, -1.0, -1.0], [-2.0, -1.0, 0.0], [-1.0, 0.0, 0.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=F64)
    advantages = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=F64)
    return logp, ref, advantages, mask


def test_dpo_objective_by_hand():
    logp, ref, adv, mask = objective_case()
    # log-ratios (sums over valid tokens): rows 0: 0.5 + -0.5 = 0; 1: 1.5; 2: 1.0; 3: -2.0
    # pair 0: chosen row 0 (0), rejected row 1 (1.5): h = -1.5; pair 1: chosen row 3 (-2), rejected row 2 (1): h = -3
    beta = 0.1
    expected = [-log_sigmoid(beta * -1.5), -log_sigmoid(beta * -3.0)]
    x = logp.clone().requires_grad_(True)
    params = ObjectiveParams(dpo_beta=beta)
    loss, metrics = algorithms.policy_loss(x, ref, adv, mask, "grpo", objective="dpo", params=params)
    assert loss.item() == pytest.approx(sum(expected) / 2, abs=1e-12)
    # d loss / d logp_t = (1/2) * -beta * sigmoid(-beta h) * (+1 chosen tokens, -1 rejected tokens)
    loss.backward()
    s0, s1 = 1 / (1 + math.exp(beta * -1.5)), 1 / (1 + math.exp(beta * -3.0))
    grad = torch.tensor([[-1, -1, 0], [1, 1, 1], [1, 1, 0], [-1, 0, 0]], dtype=F64)
    grad[:2] *= 0.5 * beta * s0
    grad[2:] *= 0.5 * beta * s1
    torch.testing.assert_close(x.grad, grad, atol=1e-12, rtol=0)
    assert metrics["dpo/reward_accuracy"].item() == 0.0
    assert metrics["dpo/margin"].item() == pytest.approx(beta * (-1.5 - 3.0) / 2)
    assert metrics["dpo/chosen_logratio"].item() == pytest.approx((0.0 - 2.0) / 2)
    assert metrics["dpo/rejected_logratio"].item() == pytest.approx((1.5 + 1.0) / 2)
    assert metrics["dpo/nll"].item() == pytest.approx((1.5 + 3.0) / 2)  # chosen rows' mean token NLL


def test_dpo_nll_term_and_ipo_by_hand():
    logp, ref, adv, mask = objective_case()
    plain, _ = algorithms.policy_loss(logp, ref, adv, mask, "grpo", objective="dpo", params=ObjectiveParams())
    with_nll, _ = algorithms.policy_loss(logp, ref, adv, mask, "grpo", objective="dpo",
                                         params=ObjectiveParams(dpo_nll_coef=0.5))
    # + alpha * mean over pairs of the chosen completion's mean token NLL: rows 0 (1.5) and 3 (3.0)
    assert with_nll.item() - plain.item() == pytest.approx(0.5 * (1.5 + 3.0) / 2, abs=1e-12)
    ipo, _ = algorithms.policy_loss(logp, ref, adv, mask, "grpo", objective="dpo",
                                    params=ObjectiveParams(dpo_loss="ipo", dpo_beta=0.5))
    # length-averaged log-ratios: rows 0: 0/2, 1: 1.5/3, 2: 1/2, 3: -2/1 -> h = -0.5, -2.5; 1/(2 beta) = 1
    assert ipo.item() == pytest.approx(((-0.5 - 1) ** 2 + (-2.5 - 1) ** 2) / 2, abs=1e-12)


def test_dpo_objective_rejects_an_odd_batch():
    logp, ref, adv, mask = objective_case()
    with pytest.raises(ValueError, match="pairs"):
        get_objective("dpo")(logp[:3], ref[:3], adv[:3], mask[:3], ObjectiveParams())


# --------------------------------------------------------------------------------------------- pairs


def test_pairs_are_best_and_worst_of_each_group_only():
    nan = float("nan")
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 2.0, nan, 3.0, 3.0, nan, 1.0, nan, nan])
    group_id = torch.arange(16) // 4
    chosen, rejected, paired = preference_pairs(rewards, group_id)
    # group 0: best index 0 (tie with 2: lowest), worst 1; group 1 constant; group 2: best 10, worst 8;
    # group 3 has one valid reward: no pair
    assert chosen.tolist() == [0, 10] and rejected.tolist() == [1, 8]
    assert paired.tolist() == [True, False, True, False]
    assert (group_id[chosen] == group_id[rejected]).all()
    adv = preference_advantages(rewards, group_id, AdvantageParams())
    assert adv.tolist() == [1, -1, 0, 0, 0, 0, 0, 0, -1, 0, 1, 0, 0, 0, 0, 0]


def test_pair_collector_keeps_adjacent_pairs_and_counts_groups_without_one(tmp_path):
    cfg = make_config(tmp_path)
    bundle = task.build(cfg)
    torch.manual_seed(0)
    rollout = bundle.policy.generate(bundle.policy.model, [bundle.train_dataset[i] for i in range(3)], 4, Sampling(max_new_tokens=3))
    total = torch.tensor([0.0, 1.0, 0.5, 1.0, 2.0, 2.0, 2.0, 2.0, 0.3, 0.1, 0.2, 0.9])
    rewards = RewardOutput(total=total, per_function=total.unsqueeze(1), names=["r"], failures={})
    collector = PreferencePairs(CollectOnce())
    collected = collector.collect(lambda: Chunk(rollout, [f"c{i}" for i in range(12)], rewards), 3, lambda f: f)
    batch = collected.batch
    assert batch.size == 4 and batch.group_id.tolist() == [0, 0, 1, 1]
    assert batch.rewards.tolist() == pytest.approx([1.0, 0.0, 0.9, 0.1])
    assert collected.completions == ["c1", "c0", "c11", "c9"]
    assert torch.equal(batch.rollout.completion_ids, rollout.completion_ids[[1, 0, 11, 9]])
    m = collector.metrics()
    assert m["dpo/pairs"] == 2 and m["dpo/groups_without_pair"] == 1
    assert m["dpo/reward_margin"] == pytest.approx((1.0 + 0.8) / 2)


# --------------------------------------------------------------------------------------------- config


def dpo_config(tmp_path, preset: str, **changes):
    cfg = make_config(tmp_path, **changes)
    for key, value in PRESETS[preset]["algorithm"].items():
        setattr(cfg.algorithm, key, value)
    return cfg


def test_dpo_presets_validate_and_wrong_settings_name_the_key(tmp_path):
    for preset in ("dpo_online", "dpo_semi", "dpo_offline"):
        validate_config(dpo_config(tmp_path, preset))
    bad = dpo_config(tmp_path, "dpo_online", micro_batch_size=3)
    bad.algorithm.loss_type = "dapo"
    bad.algorithm.advantage_estimator = "grpo"
    with pytest.raises(ConfigError) as info:
        validate_config(bad)
    text = str(info.value)
    assert "micro_batch_size=3" in text and "algorithm.loss_type='dapo'" in text
    assert "algorithm.advantage_estimator='grpo'" in text
    data = dpo_config(tmp_path, "dpo_offline")
    data.algorithm.pairs = "dataset"
    with pytest.raises(ConfigError, match="group_size=4.*set group_size: 2"):
        validate_config(data)
    assert merge_dicts(to_dict(make_config(tmp_path)), PRESETS["dpo_semi"])["algorithm"]["rollout_model"] == "reference"


# --------------------------------------------------------------------------------------------- the reference schedule


def params_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def run_recording(cfg, reward=dense_reward):
    """Train, recording before each update: the reference's and the policy's weights and which model generated."""
    bundle = task.build(cfg)
    trainer = Trainer(cfg, bundle.policy, bundle.train_dataset, reward_funcs=[reward])
    seen = spy_updates(trainer)
    snapshots = []
    original_update = trainer._update

    def update(batch):
        snapshots.append((params_of(trainer.ref_model), params_of(trainer.accelerator.unwrap_model(trainer.model))))
        return original_update(batch)

    trainer._update = update
    generated_by = []
    original_generate = bundle.policy.generate

    def generate(model, *args, **kwargs):
        generated_by.append(model)
        return original_generate(model, *args, **kwargs)

    bundle.policy.generate = generate
    initial = params_of(trainer.ref_model)
    rows = trainer.train()
    return trainer, rows, snapshots, generated_by, initial, seen


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_online_reference_is_the_policy_before_each_update(tmp_path):
    cfg = dpo_config(tmp_path, "dpo_online", max_steps=3)
    trainer, rows, snapshots, generated_by, initial, _ = run_recording(cfg)
    assert len(snapshots) == 3
    for ref, policy in snapshots:
        assert same(ref, policy)
    assert not same(snapshots[-1][0], initial)  # it moved with the policy
    assert all(m is trainer.accelerator.unwrap_model(trainer.model) for m in generated_by)
    for row in rows:
        assert {"dpo/pairs", "dpo/reward_accuracy", "dpo/margin", "dpo/reward_margin"} <= row.keys()


def test_offline_reference_stays_frozen_and_generates(tmp_path):
    cfg = dpo_config(tmp_path, "dpo_offline", max_steps=3)
    trainer, _, snapshots, generated_by, initial, seen = run_recording(cfg)
    for ref, _policy in snapshots:
        assert same(ref, initial)
    assert not same(snapshots[-1][1], initial)  # the policy trained
    assert all(m is trainer.ref_model for m in generated_by)  # pairs from the initial model throughout
    for batch in seen:  # adjacent pairs of one group each, the chosen row first
        assert batch.size % 2 == 0
        assert (batch.group_id[0::2] == batch.group_id[1::2]).all()
        assert (batch.rewards[0::2] > batch.rewards[1::2]).all()
        assert batch.advantages[0::2].eq(1).all() and batch.advantages[1::2].eq(-1).all()


def test_semi_online_syncs_reference_and_generator_every_s_steps(tmp_path):
    cfg = dpo_config(tmp_path, "dpo_semi", max_steps=4)
    cfg.algorithm.ref_sync_steps = 2
    trainer, _, snapshots, generated_by, initial, _ = run_recording(cfg)
    refs = [ref for ref, _ in snapshots]
    policies = [policy for _, policy in snapshots]
    assert same(refs[0], initial) and same(refs[1], initial)  # before updates 1, 2: the initial weights
    assert same(refs[2], policies[2]) and same(refs[3], refs[2])  # synced after update 2, held for update 4
    assert not same(refs[3], policies[3])
    assert all(m is trainer.ref_model for m in generated_by)


# --------------------------------------------------------------------------------------------- offline dataset


def test_offline_dpo_from_a_preference_dataset(tmp_path):
    cfg = dpo_config(tmp_path, "dpo_offline", max_steps=2, group_size=2, micro_batch_size=2)
    cfg.algorithm.pairs = "dataset"
    cfg.rewards = [type(cfg.rewards[0])("preference_label", 1.0)]
    validate_config(cfg)
    bundle = task.build(cfg)
    records = [{**r, "chosen": f"<answer>{r['answer']}</answer>", "rejected": "<answer>no</answer>"}
               for r in (bundle.train_dataset[i] for i in range(len(bundle.train_dataset)))]
    trainer = Trainer(cfg, bundle.policy, records)
    seen = spy_updates(trainer)
    rows = trainer.train()
    batch = seen[0]
    texts = bundle.policy.decode(batch.rollout)
    assert texts[0].startswith("<answer>") and texts[1] == "<answer>no</answer>"
    assert batch.rewards.tolist() == [1.0, 0.0] * (batch.size // 2)
    assert rows[-1]["dpo/pairs"] == cfg.prompts_per_step
    assert math.isfinite(rows[-1]["loss"])


def test_image_pairs_teacher_forced_score_like_sampled_ones():
    """A pair of images is as good as a pair of texts: given token sequences score exactly as when sampled."""
    from image_gen.gpt import GPT, get_config
    from image_gen.policy import ARImagePolicy
    from image_gen.vq import build_tiny_diffusers_vq

    torch.manual_seed(0)
    model = GPT(get_config("GPT-tiny", vocab_size=64, block_size=64, num_classes=5))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    policy = ARImagePolicy(model.eval(), build_tiny_diffusers_vq(), cfg_scale=2.0, logprob_mode="cfg")
    records = [{"prompt": "a", "class_id": 1}, {"prompt": "b", "class_id": 3}]
    sampled = policy.generate(model, records, 2, Sampling(temperature=1.0))
    pairs = [[sampled.completion_ids[2 * i], sampled.completion_ids[2 * i + 1]] for i in range(2)]
    given = policy.rollout_from_completions(records, pairs, Sampling(temperature=1.0))
    assert torch.equal(given.completion_ids, sampled.completion_ids) and given.columns["class_id"] == [1, 1, 3, 3]
    torch.testing.assert_close(policy.log_probs(model, given)[0], policy.log_probs(model, sampled)[0])
    with pytest.raises(ValueError, match="image tokens"):
        policy.rollout_from_completions(records[:1], [[torch.zeros(3), torch.zeros(3)]], Sampling())


def test_semi_online_dpo_trains_the_image_generator(tmp_path):
    """The same objective on pairs of images: best vs worst decoded image of each group by the rule reward,
    rollouts from the synced reference, the policy moves and the metrics are finite."""
    from image_gen import task as image_task
    from mmrl.config import load_config

    cfg = load_config("configs/image_gen/demo.yaml", [
        f"output_dir={tmp_path}", "preset=dpo_semi", "algorithm.ref_sync_steps=2", "max_steps=3",
        "prompts_per_step=4", "group_size=4", "micro_batch_size=8", "data.num_train=16",
        "logging.progress_bar=false", "logging.report_to=[jsonl]", "save_final=false"],
        section_types=image_task.SECTION_TYPES)
    built = image_task.build(cfg)
    trainer = Trainer(cfg, built.policy, built.train_dataset)
    before = params_of(trainer.accelerator.unwrap_model(trainer.model))
    rows = trainer.train()
    assert len(rows) == 3
    assert all(0 < row["dpo/pairs"] <= 4 for row in rows)
    assert all(math.isfinite(row["loss"]) and math.isfinite(row["dpo/margin"]) for row in rows)
    # update 2 compares the once-updated policy with the initial reference; after it the reference is synced,
    # so update 3 compares the policy with itself: log-ratios exactly 0
    assert rows[1]["dpo/chosen_logratio"] != 0.0
    assert rows[2]["dpo/chosen_logratio"] == 0.0 and rows[2]["dpo/rejected_logratio"] == 0.0
    assert not same(params_of(trainer.accelerator.unwrap_model(trainer.model)), before)
