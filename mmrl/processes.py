"""Which processes a run has: accelerate's state, with one decision made explicit.

``accelerate launch --multi_gpu --num_processes N`` (torchrun) on a machine without a GPU starts N
processes, but accelerate treats each of them as a lone process 0 of 1 unless told to use the CPU
(``ACCELERATE_USE_CPU=1``): N independent runs writing one output directory, silently. Several processes
and no GPU therefore mean CPU processes (gloo) here. Everything else is accelerate's.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator, Mapping

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import get_int_from_env, parse_flag_from_env


def use_cpu() -> bool:
    """True when the processes should run on the CPU: asked for, or several processes and no GPU."""
    world = get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)
    return parse_flag_from_env("ACCELERATE_USE_CPU") or (world > 1 and not torch.cuda.is_available())


def process_state() -> PartialState:
    """accelerate's (shared) process state, CPU processes included."""
    return PartialState(cpu=use_cpu())


def make_accelerator(**kwargs) -> Accelerator:
    """The run's ``Accelerator``: the process group first (:func:`process_state`), then accelerate's state.

    Under a DeepSpeed launch on CPU processes the accelerator is made with ``cpu=False``, because accelerate
    only starts DeepSpeed when not told ``cpu`` (``AcceleratorState``: ``ACCELERATE_USE_DEEPSPEED ... and not
    cpu``); the processes themselves were already joined on the CPU (gloo) by :func:`process_state`, and
    DeepSpeed runs on its CPU accelerator. Before, the trainer made its state with ``cpu=True`` and trained as
    DDP, while after a cold start (TRL's ``SFTTrainer`` makes the state in exactly this order) the same launch
    trained under DeepSpeed: the backend depended on whether a cold start ran.
    """
    process_state()
    return Accelerator(cpu=accelerator_on_cpu(), **kwargs)


def accelerator_on_cpu() -> bool:
    """The ``cpu`` flag for the run's ``Accelerator`` (see :func:`make_accelerator`): :func:`use_cpu`, except
    under a DeepSpeed launch."""
    return use_cpu() and not parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")


def end_processes() -> None:
    """Destroy the default process group, when one was started, at the end of a successful run.

    Without it a gloo process can abort at interpreter exit ("terminate called without an active
    exception", SIGABRT; pytorch/pytorch#190489): the group's worker threads are torn down during
    finalisation. Called after success only — after a failure another process may still be inside a
    collective, and destroying an NCCL group then can hang (torchtitan destroys on success only, too).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gc.collect()  # wrappers that hold the group (DDP) and are only reachable through cycles go now
        torch.distributed.destroy_process_group()


_REQUESTED_BACKENDS = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DEEPSPEED"}


def ignored_backend(distributed_type: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The sharding backend an ``accelerate launch`` config asked for (``ACCELERATE_USE_FSDP`` /
    ``ACCELERATE_USE_DEEPSPEED`` in the environment) when accelerate is not running it, else None.

    accelerate turns FSDP on only for accelerator devices: on CPU processes an FSDP config trains as plain
    DDP (``MULTI_CPU``), every process holding all the weights, without a word. That is worth one warning.
    """
    environ = os.environ if environ is None else environ
    for variable, backend in _REQUESTED_BACKENDS.items():
        if environ.get(variable, "false").lower() == "true" and str(distributed_type).split(".")[-1] != backend:
            return backend
    return None


def unsupported_setup(accelerator, model: torch.nn.Module) -> str | None:
    """Why the run cannot train ``model`` under ``accelerator``'s backend, or None.

    A PEFT adapter under FSDP1: PEFT picks the adapter's entries of a state dict by the names of its modules,
    which FSDP1 prefixes (``_fsdp_wrapped_module.``) while the gathered state dict does not — the checkpoint's
    adapter came out empty (measured: 0 of 28 tensors) and could not be loaded back. FSDP2 keeps the names:
    there an adapter trains like under DDP and resumes exactly."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    fsdp1 = str(accelerator.distributed_type).endswith("FSDP") and getattr(plugin, "fsdp_version", 1) == 1
    if fsdp1 and hasattr(model, "peft_config"):
        return ("a LoRA adapter (model.lora) cannot be checkpointed under FSDP1 (PEFT looks its weights up by "
                "module names, which FSDP1 changes): launch with FSDP2 (configs/accelerate/fsdp2.yaml) instead")
    return None


def configure_deepspeed(accelerator, max_grad_norm: float, micro_batch_size: int) -> list[str]:
    """Fit the DeepSpeed engine's settings to the trainer's, before ``prepare``; returns what it overrode
    (empty when DeepSpeed is not running).

    - **Clipping**: the engine clips inside ``backward`` with its own ``gradient_clipping`` (from the accelerate
      YAML) and the trainer's ``clip_grad_norm_`` only reads the norm back: two settings for one thing. The
      training config's ``optim.max_grad_norm`` wins (0: no clipping), so a config means the same under every
      backend.
    - **Accumulation**: the trainer sums the micro-batches of a mini-batch itself — each loss already divided
      by the mini-batch's global token count — and marks the last one as the step boundary. DeepSpeed's
      ``gradient_accumulation_steps`` > 1 would divide every loss once more, so it is 1.
    - **Micro-batch size**: DeepSpeed wants ``train_micro_batch_size_per_gpu`` for its bookkeeping and takes it
      from a dataloader the trainer does not have: ``micro_batch_size`` (sequences per process and backward).
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return []
    config, notes = plugin.deepspeed_config, []
    wanted = {"gradient_clipping": (float(max_grad_norm or 0.0), f"optim.max_grad_norm={max_grad_norm}"),
              "gradient_accumulation_steps": (1, "the trainer's own accumulation over micro-batches"),
              "train_micro_batch_size_per_gpu": (int(micro_batch_size), f"micro_batch_size={micro_batch_size}")}
    for key, (value, why) in wanted.items():
        asked = config.get(key, "auto")
        if asked not in ("auto", None) and float(asked) != float(value):
            notes.append(f"DeepSpeed {key}: {asked} in the accelerate config, {value} used ({why})")
        config[key] = value
    config["train_batch_size"] = int(micro_batch_size) * accelerator.num_processes  # × accumulation (1)
    return notes


def per_process_optimizer_state(accelerator) -> bool:
    """True under DeepSpeed, whose ZeRO optimizers hold only this process's part of the state and checkpoint it
    so (each process its own file). FSDP's parts are gathered into one whole state instead
    (:func:`full_optimizer_state`); under DDP or one process the main process's state is everyone's."""
    kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type)).split(".")[-1]
    return kind == "DEEPSPEED"


def load_sharded_optimizer(accelerator, optimizer, state) -> None:
    """Load this process's part of a sharded optimizer state. DeepSpeed's ZeRO optimizers take a list of
    every process's state and read their own entry (``state_dict_list[dp_rank]``): the others stay None here,
    so a layout that needs them (ZeRO's elastic checkpoints, a changed process count) fails loudly."""
    if per_process_optimizer_state(accelerator):
        state = [state if rank == accelerator.process_index else None for rank in range(accelerator.num_processes)]
    optimizer.load_state_dict(state)


@contextlib.contextmanager
def whole_parameters(model: torch.nn.Module, modifier_rank: int | None = None) -> Iterator[None]:
    """Inside: every parameter whole on every process, also under DeepSpeed ZeRO-3 (which keeps only a
    partition of each large parameter outside its forward); ``modifier_rank``: whose in-place changes are
    kept when they are partitioned again (None: none). A collective under ZeRO-3 — every process enters it."""
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


def fsdp_sharded(model: torch.nn.Module) -> bool:
    """True when ``model`` (or part of it) is sharded by FSDP: FSDP2 parameters are DTensors, FSDP1 wraps
    modules in ``FullyShardedDataParallel``."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters()) or any(
        type(m).__name__ == "FullyShardedDataParallel" for m in model.modules())


@contextlib.contextmanager
def whole_root_parameters(model: torch.nn.Module) -> Iterator[None]:
    """For work that calls the model's inner modules rather than its top-level forward — generation (the
    decode loop runs the language model and the head step by step) and evaluation. FSDP1 keeps the weights
    its root unit owns (embeddings, head, final norm, the vision tower's patch embedding) whole only inside
    the root's forward, and a 1-D slice of its flat parameter elsewhere; they are gathered here (not the
    nested units': their own forwards gather those), as TRL does around generation. A collective: every
    process generates together. Other backends need nothing: DDP and ZeRO-2 hold whole weights, ZeRO-3 and
    FSDP2 gather on each module call (FSDP2 keeps the root's and the tied embedding group's weights gathered
    after a forward)."""
    if type(model).__name__ != "FullyShardedDataParallel":
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(model, recurse=False, writeback=False):
        yield


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Under FSDP the model's whole state dict, on the CPU, on the main process (on accelerators {} on the
    others) — a collective: every process calls it. None when the model's own ``state_dict()`` is already whole (one
    process, DDP, ZeRO-2; ZeRO-3 inside :func:`whole_parameters`)."""
    if not fsdp_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # cpu_offload also means "only the main process gets it"; with weights already on the CPU torch's FSDP1 then
    # frees the gathered storage before copying it (a segfault here, torch 2.13): there every process gets it.
    on_accelerator = next(model.parameters()).device.type != "cpu"
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=on_accelerator))
    # Tied parameters (lm_head = embed_tokens) come back as separate copies; the model's own state_dict() has
    # one tensor under both names, which is what transformers' save_pretrained recognises (and saves once).
    names_of: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        clean = name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
        names_of.setdefault(id(parameter), []).append(clean)
    for names in names_of.values():
        present = [name for name in names if name in state]
        for name in present[1:]:
            state[name] = state[present[0]]
    return state


def own_class(module: torch.nn.Module) -> type:
    """The class ``module`` was built as: FSDP2's ``fully_shard`` swaps it for a subclass (``FSDP<Class>``), which
    transformers' look-ups by class name (its checkpoint key conversions) do not know."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(module)
    return next(base for base in cls.__mro__ if not issubclass(base, FSDPModule)) if issubclass(cls, FSDPModule) else cls


@contextlib.contextmanager
def as_own_class(module: torch.nn.Module) -> Iterator[None]:
    """``module`` with its :func:`own_class` for the duration (for saving: transformers then writes the same
    checkpoint keys as for the unsharded model; nothing may run the module's forward meanwhile)."""
    sharded = type(module)
    module.__class__ = own_class(module)
    try:
        yield
    finally:
        module.__class__ = sharded


def load_full_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]):
    """Under FSDP, load a whole state dict (every process holds it) into the sharded model, each process
    keeping its shards — a collective; returns the missing / unexpected keys as ``load_state_dict`` does. None,
    loading nothing, when the model is not sharded."""
    if not fsdp_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    return set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def full_optimizer_state(model: torch.nn.Module, optimizer) -> dict | None:
    """Under FSDP the optimizer's whole state (plain tensors keyed by parameter name, what
    :func:`load_full_optimizer_state` takes back on any sharding of the same model) — a collective. None when
    the model is not sharded by FSDP."""
    if not fsdp_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    on_accelerator = next(model.parameters()).device.type != "cpu"  # see full_state_dict
    return get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=on_accelerator))


def load_full_optimizer_state(model: torch.nn.Module, optimizer, state: dict) -> None:
    """Load :func:`full_optimizer_state`'s result into the optimizer of the FSDP-sharded ``model`` (a
    collective: every process holds ``state``; each keeps its shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), state,
                             options=StateDictOptions(full_state_dict=True))
