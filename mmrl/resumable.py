"""Saving and resuming the trainer's whole state (the :class:`~mmrl.trainer.Trainer` mixes this in).

What a checkpoint holds and how it is written crash-safely is :mod:`mmrl.checkpoint`'s; this file decides
*which* state of the run goes where: shared state in ``trainer_state.json`` (the same on every process),
per-process state (RNG streams, sampler position, fault counters, components' per-process history) in
``rank-<r>``. A stateful component joins by exposing ``state_dict()`` / ``load_state_dict()`` and being
listed in :meth:`Resumable._stateful`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from mmrl import checkpoint
from mmrl.checkpoint import CheckpointError
from mmrl.processes import (
    as_own_class,
    fsdp_sharded,
    full_optimizer_state,
    full_state_dict,
    load_full_optimizer_state,
    load_sharded_optimizer,
    per_process_optimizer_state,
    whole_parameters,
)

logger = logging.getLogger("mmrl.trainer")


class Resumable:
    """Checkpoint methods of the trainer (needs its accelerator, model, optimizer, scheduler, sampler...)."""

    def _stateful(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(shared, per-process) components with ``state_dict`` / ``load_state_dict``, by name. Shared ones
        are identical on every process (decided from reduced metrics) and saved once."""
        shared = {"update_guard": self.update_guard, "collapse_monitor": self.collapse_monitor}
        per_process = {"sampler": self.sampler, "reward_faults": self.reward_faults}
        if hasattr(self.collector, "state_dict"):  # dynamic sampling's counters
            per_process["collector"] = self.collector
        for name, component in self.components.items():  # filters and shapers with a memory (e.g. SRPO history)
            if hasattr(component, "state_dict"):
                per_process[f"component:{name}"] = component
        return ({k: v for k, v in shared.items() if v is not None},
                {k: v for k, v in per_process.items() if v is not None})

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoint-<rollout_step>`` crash-safely (see :mod:`mmrl.checkpoint`); every process
        adds its own RNG and component state. Returns the path on the main process."""
        acc, cfg = self.accelerator, self.config
        shared, per_process = self._stateful()
        staging = checkpoint.staging_dir(self.output_dir, self.rollout_step)
        sharded = per_process_optimizer_state(acc)  # DeepSpeed: each process saves its own optimizer part
        acc.wait_for_everyone()
        model = acc.unwrap_model(self.model)
        # Sharded weights are gathered by every process together (collectives): ZeRO-3's in place, FSDP's into
        # a whole state dict on the main process, which writes them; FSDP's optimizer state likewise.
        optimizer_state = full_optimizer_state(self.model, self.optimizer)
        with whole_parameters(model):
            whole = full_state_dict(self.model)  # the wrapped model: FSDP1's root unit holds top-level weights
            if acc.is_main_process:
                previous = checkpoint.latest_checkpoint(self.output_dir)
                checkpoint.begin_save(self.output_dir, self.rollout_step)
                with as_own_class(model):  # FSDP2's class is unknown to transformers' key conversions
                    self.policy.save_pretrained(model, str(staging / "model"),
                                                **({} if whole is None else {"state_dict": whole}))
                state = {"rollout_step": self.rollout_step, "global_step": self.global_step,
                         "num_processes": acc.num_processes, "run_info": self.run_info,
                         **{name: c.state_dict() for name, c in shared.items()}}
                optimizer = None if sharded else self.optimizer if optimizer_state is None else optimizer_state
                checkpoint.save_main_state(staging, optimizer, self.scheduler, state,
                                           reference=self.ref_model,
                                           # a refreshed reference changes: write it, do not link the last copy
                                           previous=None if cfg.algorithm.ref_sync_steps else previous)
        acc.wait_for_everyone()  # the staging directory exists before the other processes write into it
        checkpoint.save_rank_state(staging, acc.process_index, self._generators(),
                                   {name: c.state_dict() for name, c in per_process.items()})
        if sharded:
            checkpoint.save_optimizer_shard(staging, acc.process_index, self.optimizer)
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return None
        path = checkpoint.finish_save(staging, self.rollout_step, cfg.save_total_limit)
        logger.info("saved checkpoint to %s", path)
        return path

    def _generators(self) -> dict[str, torch.Generator]:
        return {"minibatch": self.generator, "mask": self.mask_generator}

    def _resume(self, path: Path) -> None:
        acc = self.accelerator
        if acc.is_main_process:  # a damaged file is an error naming it, before anything is loaded
            checkpoint.verify_checkpoint(path)
        acc.wait_for_everyone()
        state = checkpoint.load_trainer_state(path)
        if state["num_processes"] != acc.num_processes:
            raise CheckpointError(
                f"{path} was written by {state['num_processes']} processes, this run has {acc.num_processes}: "
                "every process's sampler and random state is part of the run; resume with the same number")
        # The weights before the optimizer: DeepSpeed's ZeRO optimizers refill their fp32 master copy from the
        # model's weights when their state is loaded.
        model = acc.unwrap_model(self.model)
        with whole_parameters(model, modifier_rank=0):
            checkpoint.load_model_weights(self.model if fsdp_sharded(self.model) else model, path / "model")
        sharded = per_process_optimizer_state(acc)
        if sharded:
            load_optimizer = None
        elif fsdp_sharded(self.model):  # the whole state, by parameter name: each process keeps its shards
            def load_optimizer(state):
                load_full_optimizer_state(self.model, self.optimizer, state)
        else:
            load_optimizer = self.optimizer.load_state_dict
        checkpoint.load_main_state(path, load_optimizer, self.scheduler)
        if sharded:
            load_sharded_optimizer(acc, self.optimizer, checkpoint.load_optimizer_shard(path, acc.process_index))
        if self.ref_model is not None:  # the reference is the run's starting point (e.g. after the cold start)
            checkpoint.load_reference(path, self.ref_model)
        rank_state = checkpoint.load_rank_state(path, acc.process_index, self._generators())
        shared, per_process = self._stateful()
        for name, component in shared.items():
            if name not in state:
                raise CheckpointError(f"{path} has no state for {name!r}: it was saved with other options")
            component.load_state_dict(state[name])
        for name, component in per_process.items():
            if name not in rank_state:
                raise CheckpointError(f"{path} has no state for {name!r}: it was saved with other options")
            component.load_state_dict(rank_state[name])
        self.rollout_step = state["rollout_step"]
        self.global_step = state["global_step"]
        self.run_info = dict(state.get("run_info") or {})
        self.resumed_from = path
        logger.info("resumed from %s at rollout step %d", path, self.rollout_step)
