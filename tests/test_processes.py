"""The process group is ended after a successful run (a gloo process can abort at interpreter exit
otherwise: "terminate called without an active exception"), and only then."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from mmrl import cli
from mmrl.processes import end_processes


def test_end_processes_destroys_the_group_and_is_a_no_op_without_one(tmp_path):
    end_processes()  # no group: nothing to do, no error
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    end_processes()
    assert not dist.is_initialized()
    end_processes()


def test_the_command_ends_the_group_on_success_only(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(cli, "end_processes", lambda: calls.append("ended"))
    assert cli.main(["rewards"]) == 0  # lists the registered rewards
    assert calls == ["ended"]
    assert cli.main(["train", "no/such/config.yaml"]) == 2  # a clear error, and the group left alone
    assert calls == ["ended"]


def test_a_sharding_backend_the_launcher_asked_for_but_accelerate_did_not_start_is_named():
    from accelerate.utils import DistributedType

    from mmrl.processes import ignored_backend

    fsdp = {"ACCELERATE_USE_FSDP": "true"}
    assert ignored_backend(DistributedType.MULTI_CPU, fsdp) == "FSDP"  # accelerate's silent CPU fallback
    assert ignored_backend(DistributedType.FSDP, fsdp) is None
    assert ignored_backend(DistributedType.MULTI_CPU, {"ACCELERATE_USE_DEEPSPEED": "TRUE"}) == "DEEPSPEED"
    assert ignored_backend(DistributedType.DEEPSPEED, {"ACCELERATE_USE_DEEPSPEED": "true"}) is None
    assert ignored_backend(DistributedType.MULTI_CPU, {"ACCELERATE_USE_FSDP": "false"}) is None
    assert ignored_backend(DistributedType.NO, {}) is None


def test_a_deepspeed_launch_on_cpu_processes_gets_deepspeed_not_ddp(monkeypatch):
    from mmrl.processes import accelerator_on_cpu, use_cpu

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    for variable in ("ACCELERATE_USE_CPU", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert use_cpu() and accelerator_on_cpu()  # several processes, no GPU: CPU processes (gloo), DDP
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    # the processes still join on the CPU, but accelerate only starts DeepSpeed for cpu=False
    assert use_cpu() and not accelerator_on_cpu()
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    assert not use_cpu() and not accelerator_on_cpu()


class _Plugin:
    def __init__(self, config: dict):
        self.deepspeed_config = config


class _Accelerator:
    def __init__(self, plugin=None, distributed_type="MULTI_CPU", processes=1, index=0):
        self.state = type("State", (), {"deepspeed_plugin": plugin})()
        self.distributed_type, self.num_processes, self.process_index = distributed_type, processes, index


def test_a_lora_adapter_is_refused_under_fsdp1_only():
    """PEFT finds an adapter's weights by module names, which FSDP1 prefixes: its checkpoints came out empty."""
    from accelerate.utils import DistributedType

    from mmrl.processes import unsupported_setup

    def accelerator(distributed_type, version=None):
        plugin = None if version is None else type("Plugin", (), {"fsdp_version": version})()
        return type("Acc", (), {"distributed_type": distributed_type,
                                "state": type("State", (), {"fsdp_plugin": plugin})()})()

    lora, plain = type("Peft", (torch.nn.Module,), {"peft_config": {}})(), torch.nn.Linear(2, 2)
    assert "FSDP2" in unsupported_setup(accelerator(DistributedType.FSDP, 1), lora)
    assert unsupported_setup(accelerator(DistributedType.FSDP, 2), lora) is None
    assert unsupported_setup(accelerator(DistributedType.FSDP, 1), plain) is None
    assert unsupported_setup(accelerator(DistributedType.MULTI_CPU), lora) is None


def test_deepspeed_takes_the_trainers_clipping_accumulation_and_micro_batch():
    from mmrl.processes import configure_deepspeed

    assert configure_deepspeed(_Accelerator(), 1.0, 8) == []  # not DeepSpeed: nothing to do
    config = {"gradient_clipping": 1.0, "gradient_accumulation_steps": 4, "train_micro_batch_size_per_gpu": "auto",
              "train_batch_size": "auto", "zero_optimization": {"stage": 2}}
    notes = configure_deepspeed(_Accelerator(_Plugin(config), "DEEPSPEED", processes=2), 0.5, 8)
    assert config == {"gradient_clipping": 0.5, "gradient_accumulation_steps": 1, "train_micro_batch_size_per_gpu": 8,
                      "train_batch_size": 16, "zero_optimization": {"stage": 2}}
    assert len(notes) == 2 and "gradient_clipping: 1.0" in notes[0] and "gradient_accumulation_steps: 4" in notes[1]
    config = {"gradient_clipping": 0.0}
    assert configure_deepspeed(_Accelerator(_Plugin(config), "DEEPSPEED"), 0.0, 4) == []
    assert config["gradient_clipping"] == 0.0  # optim.max_grad_norm 0: no clipping on either side


def test_sharded_optimizer_state_is_per_process_and_deepspeed_reads_its_own_entry():
    from mmrl.processes import load_sharded_optimizer, per_process_optimizer_state

    assert not per_process_optimizer_state(_Accelerator(distributed_type="MULTI_CPU"))
    assert per_process_optimizer_state(_Accelerator(distributed_type="DistributedType.DEEPSPEED"))
    assert not per_process_optimizer_state(_Accelerator(distributed_type="FSDP"))  # gathered whole instead
    loaded = []
    optimizer = type("Optimizer", (), {"load_state_dict": lambda self, state: loaded.append(state)})()
    load_sharded_optimizer(_Accelerator(distributed_type="DEEPSPEED", processes=3, index=1), optimizer, {"mine": 1})
    load_sharded_optimizer(_Accelerator(distributed_type="FSDP", processes=3, index=1), optimizer, {"mine": 1})
    assert loaded == [[None, {"mine": 1}, None], {"mine": 1}]  # ZeRO: state_dict_list[dp_rank]; FSDP: its own


class NotDeepSpeed:
    pass


def test_an_optimizer_shard_loads_plain_data_and_refuses_foreign_classes(tmp_path):
    import pytest
    import torch

    from mmrl import checkpoint
    from mmrl.checkpoint import CheckpointError

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight])
    weight.grad = torch.full((3,), 0.5)
    optimizer.step()
    checkpoint.save_optimizer_shard(tmp_path, 1, optimizer)
    state = checkpoint.load_optimizer_shard(tmp_path, 1)
    assert torch.equal(state["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(CheckpointError, match="optimizer-rank-0.pt"):
        checkpoint.load_optimizer_shard(tmp_path, 0)  # written by another process count or backend
    torch.save({"scaler": NotDeepSpeed()}, tmp_path / "optimizer-rank-2.pt")
    with pytest.raises(CheckpointError, match="outside DeepSpeed"):
        checkpoint.load_optimizer_shard(tmp_path, 2)


def test_whole_parameters_is_a_no_op_without_zero3_partitions():
    import torch

    from mmrl.processes import whole_parameters

    model = torch.nn.Linear(2, 2)
    with whole_parameters(model, modifier_rank=0):
        model.weight.data.fill_(1.0)
    assert torch.equal(model.weight, torch.ones(2, 2))


def test_deepspeed_trains_like_ddp_resumes_exactly_and_skips_non_finite_updates(tmp_path):
    """The end-to-end DeepSpeed checks (2 CPU processes each): only where deepspeed is installed — it is not a
    dependency; configs/accelerate/README.md has the results and how to run them."""
    import importlib.util
    import sys

    import pytest

    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (optional): python tests/sharded_training_check.py --backends "
                    "zero2 zero3 zero3_partitioned runs these checks")
    sys.path.insert(0, str(Path(__file__).parent))
    import sharded_training_check

    report = sharded_training_check.main(["--backends", *sharded_training_check.DEEPSPEED, "--out", str(tmp_path)])
    for backend in sharded_training_check.DEEPSPEED:
        assert report[f"{backend}: 2 steps + resume to 4 vs 4 straight (max difference)"] == 0.0
