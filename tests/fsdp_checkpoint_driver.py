"""Driver for tests/test_multiprocess_training.py: do the trainer's checkpoint helpers save and load a model
sharded with FSDP (whole weights written, each process's shards restored)? Sharded with torch itself as
accelerate does (accelerate runs FSDP on accelerators only): see ``fsdp_logprob_driver.shard``.

Per rank: after one AdamW step on both, the whole optimizer state gathered by
:func:`mmrl.processes.full_optimizer_state` against the unsharded optimizer's, saved, overwritten and loaded back
(:func:`mmrl.processes.load_full_optimizer_state`); the whole state dict gathered by
:func:`mmrl.processes.full_state_dict` (main process) against the unsharded model's; the policy's ``save_pretrained`` with it; the shards overwritten; then
:func:`mmrl.checkpoint.load_model_weights` and the gathered weights compared with the saved ones again.
Prints one ``REPORT`` JSON line per rank.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_checkpoint_driver.py fsdp2|fsdp1 OUT_DIR
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixed_rollout_driver import ROOT  # noqa: E402
from fsdp_logprob_driver import shard  # noqa: E402

from mmrl.checkpoint import load_model_weights  # noqa: E402
from mmrl.config import load_config  # noqa: E402
from mmrl.processes import (  # noqa: E402
    end_processes,
    full_optimizer_state,
    full_state_dict,
    load_full_optimizer_state,
)
from vision import task  # noqa: E402


def largest_difference(state: dict, expected: dict) -> float:
    assert set(state) == set(expected), sorted(set(state) ^ set(expected))[:5]
    return max((state[k].float() - expected[k].float()).abs().max().item() for k in expected)


def full_optimizer_state_unsharded(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))


def optimizer_difference(state: dict, expected: dict) -> float:
    assert set(state["state"]) == set(expected["state"]), sorted(set(state["state"]) ^ set(expected["state"]))[:5]
    return max((torch.as_tensor(value).float() - torch.as_tensor(expected["state"][name][key]).float()).abs().max().item()
               for name, entry in state["state"].items() for key, value in entry.items())


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = load_config(str(ROOT / "configs/vision/demo.yaml"), ["data.max_train_samples=8", "data.max_eval_samples=4"],
                      section_types=task.SECTION_TYPES)
    policy = task.build(cfg).policy
    expected = copy.deepcopy(policy.model.state_dict())
    reference = copy.deepcopy(policy.model)
    wrapped, inner = shard(policy.model, mode)
    report: dict = {"rank": rank}
    try:
        # the optimizer: one AdamW step with the same gradient (ones) on the sharded and the unsharded model
        optimizers = [torch.optim.AdamW(model.parameters(), lr=0.1) for model in (wrapped, reference)]
        for optimizer, model in zip(optimizers, (wrapped, reference)):
            for parameter in model.parameters():
                parameter.grad = torch.ones_like(parameter)
            optimizer.step()
        expected = copy.deepcopy(reference.state_dict())
        whole_optimizer = full_optimizer_state(wrapped, optimizers[0])
        expected_optimizer = full_optimizer_state_unsharded(reference, optimizers[1])
        if rank == 0:
            report["optimizer_vs_unsharded"] = optimizer_difference(whole_optimizer, expected_optimizer)
            torch.save(whole_optimizer, out.parent / f"{out.name}-optimizer.pt")
        dist.barrier()
        for state in optimizers[0].state.values():
            state["exp_avg"].zero_()
        saved = torch.load(out.parent / f"{out.name}-optimizer.pt", weights_only=True)
        load_full_optimizer_state(wrapped, optimizers[0], saved)
        reloaded_optimizer = full_optimizer_state(wrapped, optimizers[0])
        if rank == 0:
            report["optimizer_reloaded_vs_unsharded"] = optimizer_difference(reloaded_optimizer, expected_optimizer)
        whole = full_state_dict(wrapped)
        report["gathered_keys"] = len(whole)
        if rank == 0:
            report["gathered_vs_unsharded"] = largest_difference(whole, expected)
            policy.save_pretrained(inner, str(out), state_dict=whole)
        dist.barrier()
        with torch.no_grad():
            for parameter in wrapped.parameters():  # this rank's shards (FSDP1: its flat parameter's slice)
                parameter.add_(1.0)
        perturbed = full_state_dict(wrapped)  # a collective: every rank
        if rank == 0:
            report["perturbed_vs_unsharded"] = largest_difference(perturbed, expected)
        load_model_weights(wrapped, out)
        reloaded = full_state_dict(wrapped)
        if rank == 0:
            report["reloaded_vs_unsharded"] = largest_difference(reloaded, expected)
    except Exception as error:  # reported, so that the test shows it
        report["error"] = f"{type(error).__name__}: {error}"
    print("REPORT " + json.dumps(report), flush=True)
    end_processes()


if __name__ == "__main__":
    main()
