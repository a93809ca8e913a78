"""Staged training data (:class:`mmrl.data.Stages`, :class:`mmrl.data.StagedSampler`; the vision task's
``data.stages``): SRPO's two-stage cross-domain schedule, and weighted mixtures, resumable exactly."""

from __future__ import annotations

import importlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from mmrl.config import ConfigError, TrainConfig, load_config
from mmrl.config_checks import config_problems, validate_config
from mmrl.data import PromptSampler, Stage, StagedSampler, Stages, make_sampler
from mmrl.group_filters import SRPOHistory

REPO = Path(__file__).resolve().parents[1]
VISION_DEMO = REPO / "configs/vision/demo.yaml"


def source(name: str, n: int) -> list[dict]:
    return [{"source": name, "id": i} for i in range(n)]


def sources(batch: list[dict]) -> list[str]:
    return [record["source"] for record in batch]


def two_stages(steps: int = 3) -> Stages:
    return Stages([Stage(steps, {"a": source("a", 5)}), Stage(None, {"b": source("b", 7)})])


def mixture(wa: float = 0.7, wb: float = 0.3, steps: int | None = None) -> Stage:
    return Stage(steps, {"a": source("a", 11), "b": source("b", 13)}, {"a": wa, "b": wb})


# ---------------------------------------------------------------------------------------------- schedule


def test_the_stage_switches_at_exactly_step_n():
    sampler = StagedSampler(two_stages(steps=3), batch_size=4, seed=0)
    for step in range(8):
        batch = sampler.next_batch(step)
        assert sources(batch) == ["a" if step < 3 else "b"] * 4, step
        assert sampler.metrics()["data/stage"] == (0.0 if step < 3 else 1.0)
    assert sampler.last_indices == [f"b:{r['id']}" for r in batch]


def test_each_stage_dataset_is_drawn_like_its_own_prompt_sampler():
    staged = StagedSampler(two_stages(steps=2), batch_size=3, seed=5)
    alone = staged.samplers[1]["b"]
    twin = PromptSampler(source("b", 7), 3, alone.seed)
    staged.next_batch(0), staged.next_batch(1)
    for step in range(2, 8):  # epochs roll over inside the stage (7 records, 3 per batch)
        assert staged.next_batch(step) == twin.next_batch()
    assert staged.epoch == twin.epoch == 2


def test_the_step_defaults_to_the_batches_drawn():
    sampler = StagedSampler(two_stages(steps=2), batch_size=2, seed=0)
    assert [sources(sampler.next_batch())[0] for _ in range(4)] == ["a", "a", "b", "b"]


def test_the_last_stage_continues_past_its_steps():
    stages = Stages([Stage(1, {"a": source("a", 3)}), Stage(2, {"b": source("b", 3)})])
    assert [stages.stage_at(step) for step in range(6)] == [0, 1, 1, 1, 1, 1]


def test_mixture_proportions_follow_the_weights():
    sampler = StagedSampler(Stages([mixture(0.7, 0.3)]), batch_size=10, seed=3)
    drawn = [s for step in range(300) for s in sources(sampler.next_batch(step))]
    share = drawn.count("a") / len(drawn)
    assert abs(share - 0.7) < 0.03, share  # 3000 draws: the standard error is 0.008
    again = StagedSampler(Stages([mixture(0.7, 0.3)]), batch_size=10, seed=3)
    assert [s for step in range(300) for s in sources(again.next_batch(step))] == drawn  # seeded


def test_mixture_draws_each_source_without_repeats_within_its_epoch():
    sampler = StagedSampler(Stages([mixture(1.0, 1.0)]), batch_size=4, seed=0)
    seen: dict[str, list[int]] = {"a": [], "b": []}
    for step in range(4):
        for record in sampler.next_batch(step):
            seen[record["source"]].append(record["id"])
    for name, n in (("a", 11), ("b", 13)):
        assert len(set(seen[name][:n])) == len(seen[name][:n])


def test_state_dict_mid_stage_resumes_exactly():
    def build() -> StagedSampler:
        stages = Stages([Stage(2, {"a": source("a", 5)}), mixture(0.6, 0.4, steps=4), Stage(None, {"b": source("b", 3)})])
        return StagedSampler(stages, batch_size=3, seed=9, history=lambda: SRPOHistory())

    original = build()
    for step in range(4):  # into the mixture stage
        original.next_batch(step)
        original.record(torch.ones(3 * 2), torch.arange(6) // 2)
    state = json.loads(json.dumps(original.state_dict()))  # as the checkpoint stores it
    resumed = build()
    resumed.seed = 0  # comes from the state
    resumed.load_state_dict(state)
    for step in range(4, 12):
        assert resumed.next_batch(step) == original.next_batch(step)
        assert resumed.last_indices == original.last_indices
        rewards = torch.tensor([float(i % 3 == 0) for i in range(6)])
        resumed.record(rewards, torch.arange(6) // 2)
        original.record(rewards, torch.arange(6) // 2)
        assert resumed.metrics() == original.metrics()
        assert resumed.epoch == original.epoch and resumed.skipped == original.skipped


def test_a_state_of_other_stages_is_an_error():
    state = StagedSampler(two_stages(), 2, 0).state_dict()
    with pytest.raises(ValueError, match="stages"):
        StagedSampler(Stages([mixture()]), 2, 0).load_state_dict(state)


def test_history_resampling_runs_per_source():
    stages = Stages([Stage(None, {"a": source("a", 4), "b": source("b", 4)}, {"a": 1.0, "b": 1.0})])
    sampler = StagedSampler(stages, batch_size=4, seed=1, history=lambda: SRPOHistory())
    batch = sampler.next_batch(0)
    # every "a" prompt all-correct (group of 2), every "b" prompt all wrong
    rewards = torch.tensor([1.0 if r["source"] == "a" else 0.0 for r in batch for _ in range(2)])
    sampler.record(rewards, torch.arange(8) // 2)
    a, b = sampler.samplers[0]["a"].history, sampler.samplers[0]["b"].history
    n_a = sources(batch).count("a")
    assert a.counts()["srpo/recorded"] == n_a and a.counts()["srpo/all_correct"] == n_a
    assert b.counts()["srpo/recorded"] == 4 - n_a and b.counts()["srpo/all_correct"] == 0
    assert sampler.metrics()["srpo/all_correct"] == n_a


def test_make_sampler_builds_a_staged_sampler():
    cfg = TrainConfig()
    cfg.filters.history_resampling = True
    sampler = make_sampler(two_stages(), cfg)
    assert isinstance(sampler, StagedSampler)
    assert all(s.history is not None for stage in sampler.samplers for s in stage.values())


@pytest.mark.parametrize("make, message", [
    (lambda: Stage(0, {"a": source("a", 2)}), "positive integer"),
    (lambda: Stage(True, {"a": source("a", 2)}), "positive integer"),
    (lambda: Stage(2, {}), "at least one dataset"),
    (lambda: Stage(2, {"a": source("a", 2)}, {"b": 1.0}), "must name exactly its datasets"),
    (lambda: mixture(0.5, -1.0), "weight of 'b' must be a positive number"),
    (lambda: Stages([Stage(None, {"a": source("a", 2)}), Stage(1, {"b": source("b", 2)})]), "only the last"),
    (lambda: Stages([]), "at least one stage"),
])
def test_bad_stages_are_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ---------------------------------------------------------------------------------------------- vision


TWO_STAGES = ('data.stages=[{steps: 2, train: "synthetic:colour_at_position"}, '
              '{mix: {"synthetic:single_shape": 0.7, "synthetic:colour_at_position": 0.3}}]')


def vision_config(overrides: list[str]):
    module = importlib.import_module("vision.task")
    return load_config(VISION_DEMO, overrides, section_types=module.SECTION_TYPES), module


def test_vision_stages_build_from_the_data_section():
    from vision.data import build_datasets
    from vision.task import build_stages

    cfg, module = vision_config([TWO_STAGES, "data.max_train_samples=6", "data.template=none"])
    validate_config(cfg, task_checks=module.validate)
    first = build_datasets(replace(cfg.data, train="synthetic:colour_at_position", eval=None))[0]
    stages = build_stages(cfg.data, first)
    assert stages[0].steps == 2 and stages[1].steps is None
    assert stages[0].datasets["synthetic:colour_at_position"] is first  # built once, reused by the mixture
    assert stages[1].datasets["synthetic:colour_at_position"] is first
    assert stages[1].weights == {"synthetic:single_shape": 0.7, "synthetic:colour_at_position": 0.3}
    mixed = stages[1].datasets["synthetic:single_shape"]
    assert len(mixed) == 6 and mixed.config.template == "none"  # every other key comes from data
    sampler = StagedSampler(stages, batch_size=4, seed=0)
    tasks = [[r["task"] for r in sampler.next_batch(step)] for step in range(4)]
    assert tasks[0] == tasks[1] == ["colour_at_position"] * 4
    assert "single_shape" in tasks[2] + tasks[3]


@pytest.mark.parametrize("stages, expected", [
    ('[{steps: 2, train: "synthetic:single_shape", lr: 1}, {train: "synthetic:single_shape"}]',
     "data.stages[0].lr=1: unknown stage key; valid keys: ['steps', 'train', 'mix']"),
    ('[{train: "synthetic:single_shape"}, {train: "synthetic:single_shape"}]',
     "data.stages[0].steps=None: must be an integer >= 1"),
    ('[{steps: 0, train: "synthetic:single_shape"}]', "data.stages[0].steps=0: must be >= 1"),
    ('[{steps: 2.5, train: "synthetic:single_shape"}]', "data.stages[0].steps=2.5: must be an integer"),
    ('[{steps: 2}]', "needs exactly one of train (a source) or mix"),
    ('[{train: "synthetic:single_shape", mix: {"synthetic:single_shape": 1}}]', "needs exactly one of train"),
    ('[{mix: {"synthetic:single_shape": 0}}]', "data.stages[0].mix['synthetic:single_shape']=0: must be > 0"),
    ('[{mix: {}}]', "data.stages[0].mix={}: must be a non-empty mapping"),
    ('[{train: "synthetic:no_such_task"}]', "data.stages[0].train='synthetic:no_such_task'"),
    ('[{train: "benchmark:mathvista"}]', "'benchmark:NAME' is for data.eval only"),
])
def test_bad_vision_stages_are_named(stages, expected, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    cfg, module = vision_config([f"data.stages={stages}"])
    lines = config_problems(cfg, module.validate)
    assert any(expected in line for line in lines), lines
    with pytest.raises(ConfigError):
        validate_config(cfg, task_checks=module.validate)


def test_a_stage_that_is_not_a_mapping_is_a_config_error():
    with pytest.raises(ConfigError, match="data.stages"):
        vision_config(["data.stages=[2]"])


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_train_through_the_cli_with_two_stages(tmp_path, capsys):
    from mmrl.cli import main

    config = yaml.safe_load(VISION_DEMO.read_text())
    config["data"]["stages"] = [{"steps": 2, "train": "synthetic:colour_at_position"},
                                {"mix": {"synthetic:single_shape": 0.5, "synthetic:colour_at_position": 0.5}}]
    path = tmp_path / "staged.yaml"
    path.write_text(yaml.safe_dump(config))
    out_dir = tmp_path / "run"
    code = main(["train", str(path), "max_steps=4", "prompts_per_step=2", "group_size=2", "micro_batch_size=4",
                 "data.max_train_samples=8", "data.max_eval_samples=4", "eval.batch_size=4", "cold_start.steps=2",
                 "cold_start.batch_size=4", "filters.history_resampling=true", "logging.report_to=[jsonl]",
                 "logging.progress_bar=false", "mixed_precision='no'", f"output_dir={out_dir}"])
    assert code == 0, capsys.readouterr().err[-3000:]
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["data/stage"] for r in rows] == [0.0, 0.0, 1.0, 1.0]
    assert all("srpo/dropped" in r and "srpo/dropped_total" in r for r in rows)
    state = json.loads((out_dir / "checkpoint-4" / "rank-0.json").read_text())["sampler"]
    assert state["batches"] == 4 and state["mix_draws"] == [2, 2]
