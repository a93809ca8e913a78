"""The KL reference π_ref, behind one object the trainer scores, refreshes and checkpoints through.

Two kinds:

* **a frozen copy** of the starting weights (a deep copy of the model, made when a component needs
  ``"logps:ref"``); a checkpoint saves it (``reference/``), ``algorithm.ref_sync_steps`` mixes the policy
  into it;
* **the policy with its adapter disabled**, for a PEFT model (LoRA): the base weights never train, so the
  base *is* the starting point and no second copy of the weights exists. Nothing of it is checkpointed
  (the base loads with the model), and it cannot be refreshed: mixing the policy into it would change the
  base under the adapter. ``model.lora`` with ``algorithm.ref_sync_steps`` is a config error.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import TypeVar

import torch

from mmrl.policy import unwrap_model

logger = logging.getLogger("mmrl.trainer")

T = TypeVar("T")

REFRESH_ERROR = ("the KL reference of a LoRA model is the policy with its adapter disabled: it cannot be refreshed "
                 "(set algorithm.ref_sync_steps: 0, or train without model.lora)")


def is_adapter_model(model: torch.nn.Module) -> bool:
    """A PEFT model whose adapters can be switched off (``disable_adapter()``)."""
    model = unwrap_model(model)
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


class Reference:
    """π_ref of ``model`` (the policy's model before training): see the module docstring."""

    def __init__(self, model: torch.nn.Module, device: torch.device | str | None = None, refreshed: bool = False):
        self.adapter_disabled = is_adapter_model(model)
        if self.adapter_disabled and refreshed:
            raise ValueError(REFRESH_ERROR)
        # The separate frozen copy; None when the reference is the adapter-disabled policy.
        self.model: torch.nn.Module | None = None
        if not self.adapter_disabled:
            self.model = copy.deepcopy(model).eval().requires_grad_(False)
            if "forward" in model.__dict__:
                # An instance-level forward (a wrapper some libraries install) is copied as a closure over the
                # *policy*; the copy would silently score with the live weights. Use the class's forward.
                logger.warning("the model has an instance-level forward wrapper; the reference model drops it")
                del self.model.forward
            if device is not None:
                self.model.to(device)

    def score(self, fn: Callable[[torch.nn.Module], T], policy_model: torch.nn.Module) -> T:
        """``fn(module)`` with the module that computes π_ref: the frozen copy, or ``policy_model`` (the
        trainer's possibly wrapped model, so its forward hooks run) with the adapter disabled."""
        if self.model is not None:
            return fn(self.model)
        with unwrap_model(policy_model).disable_adapter():
            return fn(policy_model)

    @property
    def state(self) -> torch.nn.Module | None:
        """The module whose weights a checkpoint holds (``None``: nothing to save)."""
        return self.model

    @torch.no_grad()
    def sync(self, policy_model: torch.nn.Module, alpha: float) -> None:
        """TRL's ``sync_ref_model``: π_ref ← α·π + (1−α)·π_ref."""
        if self.model is None:
            raise ValueError(REFRESH_ERROR)
        # Parameters, not the state dict: tied weights appear once there (else they would be mixed twice).
        policy = dict(unwrap_model(policy_model).named_parameters())
        for name, ref in self.model.named_parameters():
            ref.mul_(1 - alpha).add_(policy[name].detach().to(ref), alpha=alpha)
