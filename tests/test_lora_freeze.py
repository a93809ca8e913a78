"""Speed and scale options of the vision model on the tiny Qwen2.5-VL: LoRA through PEFT (only the adapter
trains, the reference is the base with the adapter disabled, checkpoints hold the adapter, `mmrl eval` loads
it), ``freeze_vision_tower``, and activation checkpointing per part (same gradients as without)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_step_pipeline import dense_reward, make_config

from mmrl.checkpoint import load_model_weights
from mmrl.config import ConfigError, load_config
from mmrl.config_checks import validate_config
from mmrl.trainer import Trainer
from vision import task
from vision.evaluate import cli_main
from vision.modeling import (
    GradientCheckpointingConfig,
    LoraConfig,
    VisionModelConfig,
    build_tiny_model,
    load_model_and_processor,
    lora_target_names,
    vision_and_language,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def lora_trainer(tmp_path: Path, **changes) -> Trainer:
    cfg = make_config(tmp_path, **changes)
    cfg.model.lora = LoraConfig(r=4, alpha=8.0)
    bundle = task.build(cfg)
    return Trainer(cfg, bundle.policy, bundle.train_dataset, reward_funcs=[dense_reward])


def base_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items() if "lora_" not in k}


# ------------------------------------------------------------------------------------------------ LoRA


def test_lora_targets_only_language_model_linear_layers():
    model, _ = build_tiny_model("tiny-qwen2.5-vl")
    names = lora_target_names(model, LoraConfig())
    assert len(names) == 14  # 2 decoder layers x (q, k, v, o, gate, up, down)
    assert all(n.startswith("model.language_model.layers.") for n in names)
    # the vision blocks have gate/up/down_proj too: full names keep them out
    assert any(n.startswith("model.visual.") and n.endswith("down_proj") for n, _ in model.named_modules())
    assert lora_target_names(model, LoraConfig(target_modules=["q_proj", "v_proj"])) == [
        f"model.language_model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    every = lora_target_names(model, LoraConfig(target_modules=None))
    assert "lm_head" not in every and not any(n.startswith("model.visual.") for n in every)
    with_vision = lora_target_names(model, LoraConfig(target_modules=None, vision_tower=True))
    assert any(n.startswith("model.visual.") for n in with_vision)


def test_lora_trains_only_the_adapter_and_the_reference_is_the_base(tmp_path):
    trainer = lora_trainer(tmp_path, algorithm__beta=0.05, max_steps=2)
    model = trainer.model
    assert trainer.ref_model is None and trainer.reference.adapter_disabled  # no deep copy
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for n, p in model.named_parameters() if p.requires_grad}
    # one copy of the weights: the tiny model's parameters plus the adapter's
    plain, _ = build_tiny_model("tiny-qwen2.5-vl")
    adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters()) + adapter

    base_before = base_state(trainer)
    adapter_before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    captured = {}
    prepare = trainer._prepare

    def record(batch):
        prepare(batch)
        captured["batch"] = batch

    trainer._prepare = record
    rows = trainer.train()
    assert all(r["update_skipped"] == 0.0 for r in rows)
    for key, value in base_state(trainer).items():  # every base weight bit-identical
        assert torch.equal(value, base_before[key]), key
    after = model.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in adapter_before.items())
    assert rows[-1]["kl"] > 0  # the trained adapter moved the policy away from the base

    # the reference log-probs are the base model's (the same weights without any adapter)
    batch = captured["batch"]
    base, _ = build_tiny_model("tiny-qwen2.5-vl")
    base.load_state_dict({k.replace("base_model.model.", "").replace(".base_layer", ""): v
                          for k, v in base_state(trainer).items()})
    with torch.no_grad():
        expected, _ = trainer.policy.log_probs(base.eval(), batch.rollout)
    mask = batch.rollout.completion_mask.bool()
    assert torch.allclose(batch.logps["ref"][mask], expected[mask], atol=1e-5)
    with torch.no_grad():
        policy_logp, _ = trainer.policy.log_probs(model.eval(), batch.rollout)
    assert not torch.allclose(policy_logp[mask], expected[mask], atol=1e-5)  # the adapter is on again


def test_lora_checkpoint_holds_the_adapter_and_eval_loads_it(tmp_path, capsys):
    trainer = lora_trainer(tmp_path / "run", save_final=True, max_steps=2)
    trainer.train()
    model_dir = tmp_path / "run" / "checkpoint-2" / "model"
    files = {p.name for p in model_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    assert json.loads((model_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-qwen2.5-vl"
    assert not (tmp_path / "run" / "checkpoint-2" / "reference").exists()

    # the adapter loads into a fresh LoRA model exactly
    cfg = VisionModelConfig(min_pixels=3136, max_pixels=12544, dtype="float32", lora=LoraConfig(r=4, alpha=8.0))
    fresh, _ = load_model_and_processor(cfg)
    load_model_weights(fresh, model_dir)
    trained = trainer.model.state_dict()
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, trained[key]), key
    # ... and not into a model without an adapter, nor a full model's weights into a LoRA model
    plain, _ = load_model_and_processor(VisionModelConfig(dtype="float32"))
    with pytest.raises(RuntimeError, match="LoRA adapter"):
        load_model_weights(plain, model_dir)

    # loading the adapter directory by path: the base with the adapter merged in, same outputs
    merged, _ = load_model_and_processor(VisionModelConfig(name_or_path=str(model_dir), min_pixels=3136,
                                                           max_pixels=12544, dtype="float32"))
    assert not hasattr(merged, "peft_config")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, trainer.model.eval()(input_ids=ids).logits, atol=1e-5)

    rc = cli_main(["--model", str(model_dir), "--benchmarks", "synthetic_single_shape", "--limit", "2",
                   "--max-new-tokens", "2", "--output", str(tmp_path / "eval")])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["synthetic_single_shape"]["n"] == 2


def test_lora_with_reference_refresh_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="cannot be refreshed"):
        lora_trainer(tmp_path, algorithm__beta=0.05, algorithm__ref_sync_steps=2)


@pytest.mark.parametrize("override, message", [
    ("model.lora.r=0", "model.lora.r=0"),
    ("model.lora.r=2.5", "model.lora.r=2.5"),
    ("model.lora.alpha=0", "model.lora.alpha=0.0"),
    ("model.lora.dropout=1.0", "model.lora.dropout=1.0"),
    ("model.lora.dropout=-0.1", "model.lora.dropout=-0.1"),
    ("model.lora.target_modules=[]", "model.lora.target_modules=[]"),
])
def test_bad_lora_values_are_config_errors(override, message):
    try:
        cfg = load_config("configs/vision/demo.yaml", [override], section_types=task.SECTION_TYPES)
    except ConfigError as exc:  # a type error found while loading
        assert message.split("=")[0] in str(exc)
        return
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("[", r"\[").replace("]", r"\]")):
        validate_config(cfg, task.validate)


def test_lora_config_checks():
    ok = load_config("configs/vision/demo.yaml", ["model.lora.r=4", "algorithm.beta=0.05"],
                     section_types=task.SECTION_TYPES)
    assert ok.model.lora == LoraConfig(r=4)
    validate_config(ok, task.validate)
    refreshed = load_config("configs/vision/demo.yaml", ["model.lora.r=4", "algorithm.beta=0.05",
                                                         "algorithm.ref_sync_steps=4"], section_types=task.SECTION_TYPES)
    with pytest.raises(ConfigError, match="algorithm.ref_sync_steps=4: with model.lora"):
        validate_config(refreshed, task.validate)
    assert load_config("configs/vision/demo.yaml", [], section_types=task.SECTION_TYPES).model.lora is None


# ------------------------------------------------------------------------------------- freeze_vision_tower


def test_freeze_vision_tower_leaves_vision_weights_unchanged(tmp_path):
    cfg = make_config(tmp_path)
    cfg.model.freeze_vision_tower = True
    bundle = task.build(cfg)
    trainer = Trainer(cfg, bundle.policy, bundle.train_dataset, reward_funcs=[dense_reward])
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    after = trainer.model.state_dict()
    vision = [k for k in before if k.startswith("model.visual.")]
    language = [k for k in before if k.startswith("model.language_model.")]
    assert vision and language
    assert all(torch.equal(before[k], after[k]) for k in vision)  # merger included
    assert any(not torch.equal(before[k], after[k]) for k in language)


# ---------------------------------------------------------------------------------- gradient checkpointing


def _gradients(tmp_path: Path, top: bool, vision: bool | None, language: bool | None) -> dict[str, torch.Tensor]:
    cfg = make_config(tmp_path, gradient_checkpointing=top)
    cfg.model.gradient_checkpointing = GradientCheckpointingConfig(vision=vision, language=language)
    bundle = task.build(cfg)
    trainer = Trainer(cfg, bundle.policy, bundle.train_dataset, reward_funcs=[dense_reward])
    visual, language_model = vision_and_language(trainer.model)
    on = (top if vision is None else vision, top if language is None else language)
    assert all(block.gradient_checkpointing == on[0] for block in visual.blocks)
    assert all(layer.gradient_checkpointing == on[1] for layer in language_model.layers)
    grads: dict[str, torch.Tensor] = {}
    apply = trainer._apply_update

    def record(sums):
        grads.update({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        return apply(sums)

    trainer._apply_update = record
    trainer.train()
    return grads


def test_gradient_checkpointing_per_part_gives_the_same_gradients(tmp_path):
    reference = _gradients(tmp_path / "off", False, None, None)
    assert any(n.startswith("model.visual.") for n in reference)
    for name, (top, vision, language) in {"vision": (False, True, None), "language": (False, None, True),
                                          "both_top_level": (True, None, None),
                                          "top_level_but_vision": (True, False, None)}.items():
        grads = _gradients(tmp_path / name, top, vision, language)
        assert grads.keys() == reference.keys()
        for key, value in grads.items():
            assert torch.allclose(value, reference[key], atol=1e-6, rtol=1e-5), (name, key)


def test_gradient_checkpointing_off_everywhere_with_top_level_on_is_a_config_error():
    cfg = load_config("configs/vision/demo.yaml", ["gradient_checkpointing=true",
                                                   "model.gradient_checkpointing={vision: false, language: false}"],
                      section_types=task.SECTION_TYPES)
    with pytest.raises(ConfigError, match="gradient_checkpointing=True: model.gradient_checkpointing turns"):
        validate_config(cfg, task.validate)
