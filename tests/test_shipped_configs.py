"""Every shipped YAML config loads against the current schema of its task (a renamed key must not rot a
config)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from mmrl.cli import TASKS
from mmrl.config import load_config, load_yaml

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


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
