"""The factuality reward: the claim parser and scene-graph verifier on hand-written descriptions, the
precision / detail / relevance combination by hand, and bad judges (raising, hanging, garbage, the tiny
random Qwen2.5-VL) giving missing rewards that compute_rewards counts while a Trainer run goes on."""

from __future__ import annotations

import math
import threading

import pytest

from mmrl.config import LoggingConfig, RewardConfig, TrainConfig
from mmrl.logger import read_metrics
from mmrl.policy import Sampling
from mmrl.rewards import RewardFaults, build_reward, compute_rewards
from mmrl.trainer import Trainer
from vision import factuality, task
from vision.claims import Claim, SceneGraphVerifier, check_claim, parse_claims
from vision.data import VisionDataConfig
from vision.judge import ModelJudgeVerifier, parse_claim_list, parse_yes_no
from vision.modeling import VisionModelConfig
from vision.sft import ColdStartConfig

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

SCENE = {"grid": 3, "objects": [
    {"colour": "red", "shape": "circle", "row": 0, "col": 0},
    {"colour": "blue", "shape": "square", "row": 1, "col": 1},
    {"colour": "blue", "shape": "square", "row": 2, "col": 2},
    {"colour": "green", "shape": "triangle", "row": 2, "col": 0},
]}


def truths(text: str) -> list[tuple[str, bool]]:
    return [(c.describe(), check_claim(c, SCENE)) for c in parse_claims(text)]


# -------------------------------------------------------------------------------------------- parser


@pytest.mark.parametrize("text,expected", [
    ("A red circle in the top left.", [("there is at least 1 red circle", True),
                                       ("a red circle is in the top-left cell", True)]),
    ("There are two squares.", [("there are exactly 2 square(s)", True)]),
    ("There are 3 squares", [("there are exactly 3 square(s)", False)]),
    ("I see four shapes", [("there are exactly 4 shape(s)", True)]),
    ("The image shows two blue objects and one green triangle at the bottom left.",
     [("there are exactly 2 blue shape(s)", True), ("there are exactly 1 green triangle(s)", True),
      ("a green triangle is in the bottom-left cell", True)]),
    ("In the center, there is a yellow square.", [("there is at least 1 yellow square", False),
                                                  ("a yellow square is in the center cell", False)]),
    ("A blue square is at the bottom right corner", [("there is at least 1 blue square", True),
                                                     ("a blue square is in the bottom-right cell", True)]),
    ("The red circle is on the right.", [("there is at least 1 red circle", True),
                                         ("a red circle is in the right cell", False)]),
    ("There are no triangles.", [("there are exactly 0 triangle(s)", False)]),
    ("There isn't a purple circle.", [("there are exactly 0 purple circle(s)", True)]),
    ("Some circles.", [("there is at least 2 circles", False)]),
    ("The triangle is green.", [("there is at least 1 green triangle", True)]),
    ("The picture looks nice and calm. It is an image.", []),
    ("", []),
])
def test_claims_and_their_truth(text, expected):
    assert truths(text) == expected


@pytest.mark.parametrize("text", [
    "There is a shape.", "There are shapes.", "There is shape shapes shapes shapes shapes",
    "Shapes shapes shapes. Objects and things.", "There are some objects in the image.",
    "There is shape. There is shape. There is shape.", "A shape, another shape and some items.",
])
def test_generic_and_degenerate_texts_make_no_claim_and_score_zero(text):
    # true of every picture of the task, so they say nothing about this one (the collapse a first GRPO run found)
    assert parse_claims(text) == []
    [verdict] = SceneGraphVerifier().verify([text], [SCENE], [None])
    assert verdict.num_claims == 0 and verdict.relevance == 0.0 and factuality.combine(verdict) == 0.0


def test_generic_nouns_count_with_a_number_a_colour_or_a_position_and_stutters_add_nothing():
    assert truths("There are four shapes.") == [("there are exactly 4 shape(s)", True)]
    assert truths("There is a blue object.") == [("there is at least 1 blue shape", True)]
    assert truths("There is a shape in the center.") == [("a shape is in the center cell", True)]
    assert truths("There are no shapes.") == [("there are exactly 0 shape(s)", False)]
    assert truths("There is a circle circles circles circle.") == [("there is at least 1 circle", True)]
    assert truths("Four shapes shapes shapes. A red circle circle.") == truths("Four shapes. A red circle.")


def test_a_good_description_keeps_all_its_claims():
    text = ("There are four shapes. In the top left there is a red circle, a blue square is in the center "
            "and another blue square is at the bottom right. A green triangle is in the bottom-left.")
    claims = truths(text)
    assert len(claims) == 8 and all(ok for _, ok in claims)
    [verdict] = SceneGraphVerifier().verify([text], [SCENE], [None])
    assert verdict.relevance == 1.0


def test_repeated_claims_count_once_and_plural_mentions_get_no_position():
    claims = parse_claims("There is a red circle. There is a red circle! Two squares in the center.")
    assert claims == [Claim("exists", "red", "circle"), Claim("count", None, "square", 2)]


def test_positions_bind_only_to_a_lone_mention_in_the_clause():
    # two objects in one clause: which one is "on the left" is not said, so no position claim
    assert [c.kind for c in parse_claims("A red circle beside a blue square on the left")] == ["exists", "exists"]


# ------------------------------------------------------------------------------------ the combination


def test_components_and_combination_by_hand():
    text = "There are four shapes. A red circle is in the top-left. A yellow triangle is in the center."
    # claims: count 4 (T), red circle (T), red circle top-left (T), yellow triangle (F), ... center (F)
    [verdict] = SceneGraphVerifier().verify([text], [SCENE], [None])
    assert verdict.supported == (True, True, True, False, False)
    assert verdict.relevance == pytest.approx(1 / 4)  # only the red circle of the four objects is named
    assert factuality.precision(verdict) == pytest.approx(3 / 5)
    assert factuality.detail(verdict) == pytest.approx(math.log(4))
    assert factuality.combine(verdict) == pytest.approx(0.6 + 0.1 * math.log(4) + 0.1 * 0.25)
    assert factuality.combine(verdict, 2.0, 0.5, 1.0) == pytest.approx(1.2 + 0.5 * math.log(4) + 0.25)


def test_registered_rewards_through_compute_rewards():
    names = ["factuality", "factuality_precision", "factuality_detail", "factuality_relevance", "factuality_claims",
             "factuality_supported"]
    fns = [build_reward(n) for n in names]
    completions = ["There is a red circle in the top left.", "There are four shapes.", "", "I cannot tell.",
                   [{"role": "assistant", "content": "A blue square is in the center."}]]
    out = compute_rewards(fns, [1.0, 0.0, 0.0, 0.0, 0.0, 0.0], ["p"] * 5, completions, {"scene": [SCENE] * 5})
    table = out.per_function
    # one true total count: precision 1, detail log 2, no object named -> the precision-only reward cannot tell it
    # from a real description, the combined one can
    assert table[1].tolist() == pytest.approx([1.0 + 0.1 * math.log(2), 1.0, math.log(2), 0.0, 1.0, 1.0])
    assert table[0].tolist() == pytest.approx([1.0 + 0.1 * math.log(3) + 0.1 * 0.25, 1.0, math.log(3), 0.25, 2.0,
                                               2.0])
    # no claims (empty, refusal): 0 everywhere, the lowest reward, not missing
    assert table[2].tolist() == table[3].tolist() == [0.0] * 6
    assert table[4, 3] == pytest.approx(0.5)  # both squares are blue: a blue square names 2 of 4 objects
    assert out.failures == {}


def test_rows_without_a_scene_are_missing_and_counted():
    faults = RewardFaults()
    out = compute_rewards([build_reward("factuality")], [1.0], ["p", "p"], ["A red circle.", "A red circle."],
                          {"scene": [SCENE, None]}, faults=faults)
    assert not math.isnan(float(out.total[0])) and math.isnan(float(out.total[1]))
    assert faults.counts == {"factuality": {"none": 1}}


# ------------------------------------------------------------------------------------------ bad judges


def _judge_reward(judge, **args):
    return factuality.factuality(verifier="judge", judge=judge, **args)


def good_judge(texts, images):
    """Extraction: the sentences; verification: "yes" when the claim names red; relevance: yes."""
    replies = []
    for text, image in zip(texts, images, strict=True):
        if text.startswith("List every"):
            description = text.split("Description: ", 1)[1]
            replies.append("\n".join(f"- {s.strip()}" for s in description.split(".") if s.strip()) or "NONE")
        elif text.startswith("Is this claim"):
            assert image is not None and image.size == (112, 112)  # the scene, re-drawn
            replies.append("Yes." if "red" in text.split("Claim: ", 1)[1] else "no")
        else:
            replies.append("yes")
    return replies


def test_model_judge_verifier_with_a_well_behaved_judge():
    reward = _judge_reward(good_judge)
    values = reward(["p"] * 3, ["A red circle. A blue star.", "", "A red square"], scene=[SCENE] * 3)
    assert values == pytest.approx([0.5 + 0.1 * math.log(2) + 0.1, 0.0 + 0.1, 1.0 + 0.1 * math.log(2) + 0.1])
    assert parse_claim_list("NONE") == [] and parse_claim_list("blah") is None
    assert parse_yes_no("Yes, it is") is True and parse_yes_no("maybe") is None


def test_bad_judges_give_missing_rewards_counted_by_compute_rewards():
    def raising(texts, images):
        raise RuntimeError("judge crashed")

    def garbage(texts, images):
        return ["%$#@ lorem" for _ in texts]

    def short(texts, images):
        return ["yes"]

    gate = threading.Event()

    def hanging(texts, images):
        gate.wait(10.0)
        return good_judge(texts, images)

    fns = [_judge_reward(j) for j in (raising, garbage, short)] + [_judge_reward(hanging, judge_timeout_s=0.2)]
    names = ["raising", "garbage", "short", "hanging"]
    faults = RewardFaults()
    try:
        out = compute_rewards(fns, [1.0] * 4, ["p"] * 2, ["A red circle.", "A blue square."],
                              {"scene": [SCENE] * 2}, names=names, faults=faults, timeout=5.0)
    finally:
        gate.set()
    assert all(math.isnan(float(x)) for x in out.total)  # every judge failed: no reward, advantage 0
    assert faults.counts == {"raising": {"exception": 2}, "garbage": {"none": 2}, "short": {"exception": 2},
                             "hanging": {"timeout": 2}}


def test_tiny_random_model_judge_is_garbage_so_missing(tmp_path):
    verifier = ModelJudgeVerifier("tiny-qwen2.5-vl", batch_size=2, max_new_tokens=6)
    replies = verifier.judge(["List every claim: a red circle", "Is it red?"], [None, None])
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)
    reward = _judge_reward("tiny-qwen2.5-vl", judge_max_new_tokens=6)
    faults = RewardFaults()
    out = compute_rewards([reward], [1.0], ["p"] * 3, ["A red circle.", "Two squares.", ""],
                          {"scene": [SCENE] * 3}, faults=faults)
    assert all(math.isnan(float(x)) for x in out.total)
    assert faults.counts == {"factuality": {"none": 3}}


def test_a_trainer_run_goes_on_with_a_garbage_judge(tmp_path):
    judge_args = {"verifier": "judge", "judge": "tiny-qwen2.5-vl", "judge_max_new_tokens": 4}
    cfg = TrainConfig(
        output_dir=str(tmp_path), seed=0, max_steps=2, prompts_per_step=2, group_size=2, micro_batch_size=4,
        mixed_precision="no", save_final=False,
        model=VisionModelConfig(min_pixels=3136, max_pixels=12544, dtype="float32"),
        data=VisionDataConfig(train="synthetic:describe_scene", template="none", max_train_samples=8),
        cold_start=ColdStartConfig(steps=0),
        rewards=[RewardConfig("factuality", 1.0, judge_args), RewardConfig("factuality_precision", 1.0)],
        sampling=Sampling(temperature=1.0, max_new_tokens=8),
        logging=LoggingConfig(report_to=["jsonl"], progress_bar=False, log_completions=0))
    bundle = task.build(cfg)
    Trainer(cfg, bundle.policy, bundle.train_dataset, None).train()
    steps = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "rewards/factuality/failures" in r]
    assert len(steps) == 2
    assert all(r["rewards/factuality/failures"] == 4.0 for r in steps)  # every judge verdict was garbage
    assert all(r["rewards/factuality_precision/failures"] == 0.0 for r in steps)  # the scene verifier works
    assert steps[-1]["reward_missing_total"] == 8.0


def test_the_two_configs_differ_only_in_the_weights_and_precision_alone_prefers_saying_less():
    from pathlib import Path

    from mmrl.config import load_config

    root = Path(__file__).resolve().parents[1] / "configs" / "vision"
    combined = load_config(root / "describe_scene_tiny.yaml", section_types=task.SECTION_TYPES)
    alone = load_config(root / "describe_scene_tiny_precision_only.yaml", section_types=task.SECTION_TYPES)
    assert [r.name for r in combined.rewards] == [r.name for r in alone.rewards]
    weights = {r.name: (r.weight, a.weight) for r, a in zip(combined.rewards, alone.rewards, strict=True)}
    assert weights == {"factuality_precision": (1.0, 1.0), "factuality_detail": (0.5, 0.0),
                       "factuality_relevance": (0.5, 0.0), "factuality_claims": (0.0, 0.0),
                       "factuality_supported": (0.0, 0.0), "factuality": (0.0, 0.0)}
    # both are evaluated on the same held-out yardstick: the combined reward at 0.5 / 0.5
    assert combined.eval.reward == alone.eval.reward == "factuality"
    assert combined.rewards[-1].args == alone.rewards[-1].args == {"detail_weight": 0.5, "relevance_weight": 0.5}
    full = "There are four shapes. A red circle is in the top-left. A blue square is in the center. " \
           "A blue square is in the bottom-right. A green triangle is in the bottom-left."
    one_slip = full.replace("green triangle", "green circle")
    safe = "There is a red circle."  # one true claim
    fns = [build_reward(r.name, r.args) for r in combined.rewards]

    def totals(cfg):
        out = compute_rewards(fns, [r.weight for r in cfg.rewards], ["p"] * 3, [full, safe, one_slip],
                              {"scene": [SCENE] * 3})
        return out.total.tolist()

    # precision alone: the full description and one safe claim tie, so nothing pays for saying more
    assert totals(alone)[0] == totals(alone)[1] == 1.0
    # combined: the full description wins; a slip costing two claims ranks below it (hallucinating never
    # pays) but, at lambda = w_r = 0.5, above one safe claim: six true claims at precision 0.75 are more detail
    full_total, safe_total, slip_total = totals(combined)
    assert full_total == pytest.approx(1.0 + 0.5 * math.log(9) + 0.5)  # 8 distinct claims, all true
    assert safe_total == pytest.approx(1.0 + 0.5 * math.log(2) + 0.5 * 0.25)
    assert slip_total == pytest.approx(0.75 + 0.5 * math.log(7) + 0.5 * 0.75)
    assert full_total > slip_total > safe_total
