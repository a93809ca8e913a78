"""Driver for tests/test_multiprocess_training.py: are the vision policy's log-probs and gradients right when
the model is sharded with FSDP? This shards with torch itself: each of the model's ``_no_split_modules`` its
own unit, then the root. (accelerate's FSDP2 also puts the tied embeddings and head in a group of their own,
which broke the gradient of the tied weight until the head moved into its own forward call: that sharding is
checked through the trainer, tests/sharded_training_check.py.)

``VisionPolicy.log_probs`` applies the output head (``get_output_embeddings()``) to the final hidden states
inside the wrapped forward (the model's own call of the head returns the log-probs: vision.output_head), where
FSDP1 has the head's weight whole; outside it
the weight is this rank's 1-D shard of the FlatParameter (reported as ``head_shape_outside_forward``). Each rank scores its own rollout; the unsharded reference scores both
and averages the gradients (as the sharded run's reduce-scatter does). Prints one JSON line per rank.

Run with ``python -m torch.distributed.run --nproc_per_node 2 fsdp_logprob_driver.py fsdp2|fsdp1``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixed_rollout_driver import ROOT, UidDataset, fixed_generate  # noqa: E402

from mmrl.config import load_config  # noqa: E402
from mmrl.policy import Sampling  # noqa: E402
from mmrl.processes import end_processes  # noqa: E402
from vision import task  # noqa: E402


def shard(model: torch.nn.Module, mode: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the model to call, the module whose parameters to read)."""
    classes = {type(m) for m in model.modules() if type(m).__name__ in model._no_split_modules}
    if mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for module in model.modules():
            if type(module) in classes:
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, model
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    wrapped = FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"),
                                       auto_wrap_policy=functools.partial(transformer_auto_wrap_policy,
                                                                          transformer_layer_cls=classes))
    return wrapped, wrapped.module


def main() -> None:
    mode = sys.argv[1]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = load_config(str(ROOT / "configs/vision/demo.yaml"), ["data.max_train_samples=8", "data.max_eval_samples=4"],
                      section_types=task.SECTION_TYPES)
    built = task.build(cfg)
    policy, model = built.policy, built.policy.model
    reference = copy.deepcopy(model)
    data = UidDataset(built.train_dataset)
    generate = fixed_generate(policy, [])
    sampling = Sampling(max_new_tokens=8, temperature=1.0)
    rollouts = [generate(model, [data[2 * r], data[2 * r + 1]], 2, sampling) for r in range(dist.get_world_size())]
    with torch.no_grad():
        expected = policy.log_probs(reference, rollouts[rank])[0]
    for rollout in rollouts:
        (policy.log_probs(reference, rollout)[0] * rollout.completion_mask).sum().div(len(rollouts)).backward()

    wrapped, inner = shard(model, mode)
    head = inner.get_output_embeddings().weight
    report: dict = {"rank": rank, "head_shape_outside_forward": list(head.shape)}
    try:
        with torch.no_grad():
            scored = policy.log_probs(wrapped, rollouts[rank])[0]
        report["scoring_max_abs_err"] = float((scored - expected).abs().max())
        logp = policy.log_probs(wrapped, rollouts[rank])[0]
        report["train_logp_max_abs_err"] = float((logp.detach() - expected).abs().max())
        (logp * rollouts[rank].completion_mask).sum().backward()
        ref_params = dict(reference.named_parameters())
        worst = 0.0
        # FSDP1 keeps this rank's shard of each gradient: gather the full ones to compare
        full = (contextlib.nullcontext() if mode == "fsdp2" else
                torch.distributed.fsdp.FullyShardedDataParallel.summon_full_params(wrapped, with_grads=True))
        with full:
            for name, param in inner.named_parameters():
                grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
                want = ref_params[name.replace("_fsdp_wrapped_module.", "")].grad
                worst = max(worst, float((grad - want).abs().max() / want.abs().max().clamp(min=1e-12)))
        report["grad_max_rel_err"] = worst
    except Exception as exc:  # what goes wrong is the finding
        report["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    for turn in range(dist.get_world_size()):  # one rank at a time: two prints may otherwise share a line
        if turn == rank:
            print("REPORT " + json.dumps(report), flush=True)
        dist.barrier()


if __name__ == "__main__":
    main()
    end_processes()  # after main's locals (the wrapped model holds the group) are gone
