"""The SFT cold start leaves the model as the config asked for: TRL's SFTConfig turns activation checkpointing
on (and use_cache off) by default, which must not leak into RL — a resumed run skips the cold start, so it
would train with the other setting (the kill-resume harness found this as a bit-level divergence)."""

from __future__ import annotations

import pytest

from mmrl.config import load_config
from vision import task

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def checkpointed(model) -> set[str]:
    return {name for name, m in model.named_modules() if getattr(m, "gradient_checkpointing", False) is True}


@pytest.mark.parametrize("parts", [None, "{language: true}"])
def test_cold_start_restores_checkpointing_and_use_cache(tmp_path, parts):
    overrides = ["cold_start.steps=2", f"output_dir={tmp_path}", "data.max_train_samples=32"]
    if parts:
        overrides.append(f"model.gradient_checkpointing={parts}")
    cfg = load_config("configs/vision/demo.yaml", overrides, section_types=task.SECTION_TYPES)
    built = task.build(cfg)
    model = built.policy.model
    before, config_before = checkpointed(model), dict(vars(model.config))
    text_before = model.config.text_config.use_cache
    task.cold_start(cfg, built, show_progress=False)
    assert checkpointed(model) == before
    assert bool(before) == bool(parts)
    assert vars(model.config).get("use_cache") == config_before.get("use_cache")
    assert model.config.text_config.use_cache == text_before
