"""Which processes a run has: accelerate's state, with one decision made explicit.

``accelerate launch --multi_gpu --num_processes N`` (torchrun) on a machine without a GPU starts N
processes, but accelerate treats each of them as a lone process 0 of 1 unless told to use the CPU
(``ACCELERATE_USE_CPU=1``): N independent runs writing one output directory, silently. Several processes
and no GPU therefore mean CPU processes (gloo) here. Everything else is accelerate's.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Mapping

import torch
from accelerate import PartialState
from accelerate.utils import get_int_from_env, parse_flag_from_env


def use_cpu() -> bool:
    """True when the processes should run on the CPU: asked for, or several processes and no GPU."""
    world = get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)
    return parse_flag_from_env("ACCELERATE_USE_CPU") or (world > 1 and not torch.cuda.is_available())


def process_state() -> PartialState:
    """accelerate's (shared) process state, CPU processes included."""
    return PartialState(cpu=use_cpu())


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
