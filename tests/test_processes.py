"""The process group is ended after a successful run (a gloo process can abort at interpreter exit
otherwise: "terminate called without an active exception"), and only then."""

from __future__ import annotations

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
