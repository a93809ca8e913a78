"""Every shipped YAML config loads against the current schema (a renamed key must not rot a config)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmrl.config import load_config
from vision.task import SECTION_TYPES

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def test_configs_exist():
    assert len(CONFIGS) >= 4


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    cfg = load_config(path, section_types=SECTION_TYPES)
    assert cfg.task == "vision"
    assert cfg.rewards and cfg.max_steps > 0
    if "papo" in path.name:
        assert cfg.papo.enabled and cfg.papo.kl_estimator == "k3"
