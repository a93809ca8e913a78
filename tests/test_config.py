"""Tests for :mod:`mmrl.config`: YAML + overrides into typed dataclasses, with helpful errors."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

import pytest
import yaml

from mmrl.config import (
    ConfigError,
    OptimConfig,
    RewardConfig,
    TrainConfig,
    apply_overrides,
    from_dict,
    load_config,
    to_dict,
)


@dataclass
class ToyModel:
    name_or_path: str = "tiny"
    dtype: str = "bfloat16"
    max_pixels: int | None = None


@dataclass
class ToyData:
    dataset: str = "synthetic"
    splits: list[str] = field(default_factory=lambda: ["train"])
    options: dict = field(default_factory=dict)
    limit: int = 0


SECTIONS = {"model": ToyModel, "data": ToyData}

YAML_TEXT = """\
output_dir: runs/test
seed: 3
max_steps: 20
group_size: 4
reward_timeout: 2.5
rewards:
  - name: format
    weight: 0.2
  - name: accuracy
optim:
  lr: 1e-6
  betas: [0.8, 0.95]
algorithm:
  loss_type: dapo
  epsilon_high: 0.28
sampling:
  temperature: 0.9
  max_new_tokens: 64
logging:
  report_to: [jsonl, tensorboard]
model:
  name_or_path: some/model
  max_pixels: 1024
data:
  dataset: count_shapes
  options: {max_count: 5}
"""


def write(tmp_path, text: str = YAML_TEXT, name: str = "config.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_load_nested_yaml_with_section_types(tmp_path):
    cfg = load_config(write(tmp_path), section_types=SECTIONS)
    assert isinstance(cfg, TrainConfig)
    assert (cfg.output_dir, cfg.seed, cfg.max_steps, cfg.group_size) == ("runs/test", 3, 20, 4)
    assert cfg.reward_timeout == 2.5
    assert cfg.rewards == [RewardConfig("format", 0.2), RewardConfig("accuracy", 1.0)]
    assert cfg.optim.lr == 1e-6 and isinstance(cfg.optim.lr, float)  # YAML reads "1e-6" as a string
    assert cfg.optim.betas == (0.8, 0.95)
    assert cfg.optim.scheduler == "constant"  # untouched defaults survive
    assert cfg.algorithm.loss_type == "dapo" and cfg.algorithm.epsilon_high == 0.28
    assert cfg.algorithm.epsilon == 0.2
    assert cfg.sampling.temperature == 0.9 and cfg.sampling.max_new_tokens == 64
    assert cfg.logging.report_to == ["jsonl", "tensorboard"]
    assert cfg.model == ToyModel(name_or_path="some/model", max_pixels=1024)
    assert cfg.data == ToyData(dataset="count_shapes", options={"max_count": 5})


def test_yaml_1e6_string_is_read_as_float(tmp_path):
    assert yaml.safe_load("lr: 1e-6")["lr"] == "1e-6"  # the YAML 1.1 quirk the loader works around
    cfg = load_config(write(tmp_path, "optim:\n  lr: 1e-6\n  weight_decay: 5e-2\n"))
    assert cfg.optim.lr == pytest.approx(1e-6)
    assert cfg.optim.weight_decay == pytest.approx(0.05)


def test_int_accepted_for_float():
    cfg = from_dict(TrainConfig, {"optim": {"max_grad_norm": 2}})
    assert cfg.optim.max_grad_norm == 2.0 and isinstance(cfg.optim.max_grad_norm, float)


def test_missing_task_sections_get_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "seed: 1\n"), section_types=SECTIONS)
    assert cfg.model == ToyModel() and cfg.data == ToyData()
    assert cfg.cold_start is None


def test_no_file_gives_defaults():
    cfg = load_config(None)
    assert cfg == TrainConfig()


def test_cli_overrides(tmp_path):
    cfg = load_config(
        write(tmp_path),
        ["optim.lr=1e-5", "rewards=[{name: accuracy, weight: 0.5}]", "sampling.max_new_tokens=32",
         "model.dtype=float32", "eval.every_steps=5"],
        section_types=SECTIONS,
    )
    assert cfg.optim.lr == pytest.approx(1e-5)
    assert cfg.rewards == [RewardConfig("accuracy", 0.5)]
    assert cfg.sampling.max_new_tokens == 32
    assert cfg.sampling.temperature == 0.9  # the rest of the section is kept
    assert cfg.model.dtype == "float32" and cfg.model.name_or_path == "some/model"
    assert cfg.eval.every_steps == 5


def test_overrides_without_a_file():
    cfg = load_config(None, ["max_steps=7", "algorithm.epsilon_high=null"])
    assert cfg.max_steps == 7 and cfg.algorithm.epsilon_high is None


def test_override_malformed():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


@pytest.mark.parametrize(
    "overrides, key, suggestion",
    [
        (["optim.lrr=1e-5"], "optim.lrr", "lr"),
        (["max_step=10"], "max_step", "max_steps"),
        (["sampling.max_new_token=8"], "sampling.max_new_token", "max_new_tokens"),
        (["algorithm.epsilon_hi=0.3"], "algorithm.epsilon_hi", "epsilon_high"),
    ],
)
def test_unknown_key_names_key_and_nearest(overrides, key, suggestion):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert repr(key) in message
    assert f"Did you mean {suggestion!r}" in message


def test_unknown_key_in_yaml_and_in_task_section(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "optim:\n  lrr: 1e-5\n"))
    assert "'optim.lrr'" in str(info.value) and "'lr'" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "model:\n  name_or_pth: x\n"), section_types=SECTIONS)
    assert "'model.name_or_pth'" in str(info.value) and "'name_or_path'" in str(info.value)


def test_unknown_key_in_list_item():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["rewards=[{name: accuracy, wieght: 0.5}]"])
    assert "wieght" in str(info.value) and "'weight'" in str(info.value)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["max_steps=ten"], "max_steps"),
        (["group_size=2.5"], "group_size"),
        (["optim.warmup_steps=abc"], "optim.warmup_steps"),
        (["optim.lr=fast"], "optim.lr"),
        (["gradient_checkpointing=maybe"], "gradient_checkpointing"),
        (["seed=true"], "seed"),
        (["logging.report_to=jsonl"], "logging.report_to"),
        (["optim=3"], "optim"),
        (["sampling.max_new_tokens='32'"], "sampling.max_new_tokens"),
    ],
)
def test_type_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert f"{key}:" in str(info.value)


def test_type_error_in_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="max_steps"):
        load_config(write(tmp_path, "max_steps: '100'\n"))


def test_missing_required_field():
    with pytest.raises(ConfigError, match="rewards"):
        load_config(None, ["rewards=[{weight: 0.5}]"])


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_top_level_must_be_mapping(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == TrainConfig()


def test_to_dict_round_trip(tmp_path):
    cfg = load_config(write(tmp_path), ["optim.lr=3e-6"], section_types=SECTIONS)
    plain = to_dict(cfg)
    assert plain["optim"]["betas"] == [0.8, 0.95]
    assert plain["model"] == {"name_or_path": "some/model", "dtype": "bfloat16", "max_pixels": 1024}
    assert plain["rewards"][0] == {"name": "format", "weight": 0.2, "args": {}}
    # through a YAML file and back
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(yaml.safe_dump(plain))
    again = load_config(dumped, section_types=SECTIONS)
    assert again == cfg
    assert to_dict(again) == plain
    # and directly
    assert from_dict(TrainConfig, plain, section_types=SECTIONS) == cfg


def test_to_dict_plain_types():
    plain = to_dict(OptimConfig())
    assert plain == {"lr": 1e-6, "weight_decay": 0.0, "betas": [0.9, 0.999], "max_grad_norm": 1.0,
                     "warmup_steps": 0, "scheduler": "constant"}
    assert to_dict({"a": (1, 2)}) == {"a": [1, 2]}


def test_unquoted_yaml_no_gets_a_hint(tmp_path):
    with pytest.raises(ConfigError, match="quote it"):
        load_config(write(tmp_path, "mixed_precision: no\n"))
    assert load_config(write(tmp_path, "mixed_precision: 'no'\n")).mixed_precision == "no"


def test_a_preset_on_the_command_line_sits_over_the_file(tmp_path, caplog):
    """``demo.yaml preset=gspo`` trains with GSPO's clip range even though the file sets a PPO epsilon; a
    preset written in the file sits under the file's values; either way a shadowed preset value is warned."""
    path = write(tmp_path, "algorithm: {epsilon: 0.2, beta: 0.0}\n")
    cfg = load_config(path, ["preset=gspo"])
    assert (cfg.algorithm.objective, cfg.algorithm.epsilon, cfg.algorithm.epsilon_high) == ("gspo", 3e-4, 4e-4)
    with caplog.at_level("WARNING", logger="mmrl.config"):
        cfg = load_config(path, ["preset=gspo", "algorithm.epsilon=1e-3"])
    assert cfg.algorithm.epsilon == 1e-3 and "preset gspo sets algorithm.epsilon=0.0003" in caplog.text
    in_file = write(tmp_path, "preset: gspo\nalgorithm: {epsilon: 0.2}\n")
    cfg = load_config(in_file)
    assert (cfg.algorithm.epsilon, cfg.algorithm.epsilon_high) == (0.2, 4e-4)
