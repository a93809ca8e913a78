"""Every shipped YAML config loads against the current schema of its task (a renamed key must not rot a
config)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from mmrl.cli import TASKS
from mmrl.config import load_config, load_yaml

ROOT = Path(__file__).resolve().parents[1] / "configs"
EVAL_CONFIGS = sorted((ROOT / "eval").glob("*.yaml"))  # `mmrl eval --config`, not training configs
ACCELERATE_CONFIGS = sorted((ROOT / "accelerate").glob("*.yaml"))  # `accelerate launch --config_file`
CONFIGS = sorted(p for p in ROOT.rglob("*.yaml") if p not in EVAL_CONFIGS and p not in ACCELERATE_CONFIGS)


def test_configs_exist():
    assert len(CONFIGS) >= 4
    assert {load_yaml(p).get("task", "vision") for p in CONFIGS} == set(TASKS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    task = load_yaml(path).get("task", "vision")
    cfg = load_config(path, section_types=importlib.import_module(TASKS[task]).SECTION_TYPES)
    assert cfg.task == task
    assert cfg.rewards and cfg.max_steps > 0
    if "papo" in path.name:
        assert cfg.papo.enabled and cfg.papo.kl_estimator == "k3"


@pytest.mark.parametrize("name,beta,condition", [("llamagen_c2i_xl_384.yaml", 0.1, "c2i"),
                                                 ("llamagen_t2i_xl_256.yaml", 1.0, "t2i")])
def test_llamagen_configs_use_ar_grpo_settings(name, beta, condition):
    from image_gen import task as image_task
    from mmrl.rewards import available_rewards

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "image_gen" / name,
                      section_types=image_task.SECTION_TYPES)
    assert (cfg.group_size, cfg.model.cfg_scale, cfg.optim.lr, cfg.algorithm.beta) == (8, 2.0, 1e-5, beta)
    assert (cfg.sampling.temperature, cfg.sampling.top_k, cfg.sampling.top_p) == (1.0, 0, 1.0)
    assert cfg.model.condition == condition and cfg.model.gpt_config == "GPT-XL"
    assert all(r.name in available_rewards() for r in cfg.rewards)


@pytest.mark.parametrize("path", EVAL_CONFIGS, ids=lambda p: p.name)
def test_eval_config_loads(path):
    from vision.benchmarks import available_benchmarks
    from vision.evaluate import load_eval_config

    cfg = load_eval_config(path)
    assert cfg.benchmarks and set(cfg.benchmarks) <= set(available_benchmarks())


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=[p.name for p in ACCELERATE_CONFIGS])
def test_accelerate_config_is_accelerates_format(path):
    """The launcher's files: accelerate's own keys (its ``config`` loader reads them), never a training config."""
    from accelerate.commands.config.config_args import ClusterConfig

    raw = load_yaml(path)
    assert raw["compute_environment"] == "LOCAL_MACHINE" and "distributed_type" in raw
    ClusterConfig.from_yaml_file(str(path))  # unknown or mistyped keys raise here
