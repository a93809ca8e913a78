"""The seam between the one trainer and a task: the :class:`Policy` interface.

A policy wraps a model that produces token sequences (text for a VLM, image codes for an
autoregressive image generator) and knows three things the trainer does not:

1. how to sample a group of completions for a batch of prompt records (:meth:`Policy.generate`),
2. how to score given completions token by token under some weights (:meth:`Policy.log_probs`),
3. how to turn completions into what reward functions read (:meth:`Policy.decode`).

Everything else — group advantages, losses, KL, optimisation, logging, checkpoints — is the
trainer's, and is the same for every task.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import torch

Tensor = torch.Tensor


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / DeepSpeed wrappers (they keep it in ``.module``): where a policy finds its
    output head and config while still calling the wrapper's forward for gradient synchronisation."""
    while hasattr(model, "module"):
        model = model.module
    return model


@dataclass
class SampleInputs:
    """Per-sample model inputs a policy needs to re-score its completions, in a form that can be
    sliced by sample: ``tensors`` are batch-first ``[B, ...]``; ``lists`` hold one item per sample for
    ragged data (e.g. a variable number of image patches per sample)."""

    tensors: dict[str, Tensor] = field(default_factory=dict)
    lists: dict[str, list] = field(default_factory=dict)
    # Left-padding value of each tensor whose dim 1 is a padded length (e.g. prompt ids, attention
    # mask): lets :meth:`concat` join batches padded to different lengths, as one batch would have been.
    pad_values: dict[str, float] = field(default_factory=dict)

    def select(self, index: Tensor) -> SampleInputs:
        idx = index.tolist()
        return SampleInputs(
            tensors={k: v[index.to(v.device)] for k, v in self.tensors.items()},
            lists={k: [v[i] for i in idx] for k, v in self.lists.items()},
            pad_values=dict(self.pad_values),
        )

    @property
    def size(self) -> int:
        """Number of samples."""
        for value in self.tensors.values():
            return value.shape[0]
        for value in self.lists.values():
            return len(value)
        return 0

    @staticmethod
    def concat(parts: Sequence[SampleInputs]) -> SampleInputs:
        """The samples of every part, in order. A tensor listed in ``pad_values`` is left-padded to the
        longest part; any other tensor must have the same shape past the batch dimension in every part."""
        first = parts[0]
        tensors = {}
        for key in first.tensors:
            values = [part.tensors[key] for part in parts]
            if key in first.pad_values:
                length = max(v.shape[1] for v in values)
                values = [torch.nn.functional.pad(v, (*([0, 0] * (v.dim() - 2)), length - v.shape[1], 0),
                                                  value=first.pad_values[key]) for v in values]
            shapes = {tuple(v.shape[1:]) for v in values}
            if len(shapes) > 1:
                raise ValueError(f"cannot concatenate inputs {key!r} of shapes {sorted(shapes)}: a policy "
                                 "must declare padded tensors in SampleInputs.pad_values")
            tensors[key] = torch.cat(values)
        # A list key one part lacks (a text-only batch has no image chunks) is an empty list per sample there.
        keys = dict.fromkeys(key for part in parts for key in part.lists)
        lists = {key: [item for part in parts
                       for item in part.lists.get(key, [[] for _ in range(part.size)])] for key in keys}
        return SampleInputs(tensors=tensors, lists=lists, pad_values=dict(first.pad_values))


@dataclass
class Rollout:
    """One step's sampled completions: ``B = P * group_size`` rows, each prompt's group contiguous.

    ``completion_ids``/``completion_mask`` are ``[B, T]``, right-padded; the mask covers the tokens up to
    and including the stop token. ``prompts`` and ``columns`` are what reward functions receive (one
    entry per sample). ``truncated`` marks samples that hit the length limit without stopping.
    ``sampler_logp`` ``[B, T]`` holds the sampling engine's own log-prob of each sampled token — under the
    distribution it was actually drawn from (after temperature, top-k/top-p, suppressed tokens, guidance),
    0 on padding and for greedy decoding (a point mass) — when the policy records it (the built-in ones do
    with ``record_sampler_logp = True``), for rollout/training mismatch corrections; ``None`` otherwise.
    """

    completion_ids: Tensor
    completion_mask: Tensor
    inputs: SampleInputs
    prompts: list
    columns: dict[str, list]
    group_size: int
    truncated: Tensor
    sampler_logp: Tensor | None = None
    temperature: float = 1.0  # log-probs are computed at the temperature the completions were sampled at

    @property
    def batch_size(self) -> int:
        return self.completion_ids.shape[0]

    def select(self, index: Tensor) -> Rollout:
        """The sub-rollout of samples ``index`` (a 1-D long tensor), e.g. one mini-batch."""
        idx = index.tolist()
        return replace(
            self,
            completion_ids=self.completion_ids[index],
            completion_mask=self.completion_mask[index],
            inputs=self.inputs.select(index),
            prompts=[self.prompts[i] for i in idx],
            columns={k: [v[i] for i in idx] for k, v in self.columns.items()},
            truncated=self.truncated[index],
            sampler_logp=None if self.sampler_logp is None else self.sampler_logp[index],
        )

    @staticmethod
    def concat(parts: Sequence[Rollout]) -> Rollout:
        """One rollout of every part's samples, in order (e.g. the chunks DAPO's dynamic sampling kept).
        Completions are right-padded to the longest part (pad id 0, outside the mask); prompt inputs as
        :meth:`SampleInputs.concat`. Columns missing from a part are ``None`` for its samples."""
        if len({(p.group_size, p.temperature) for p in parts}) > 1:
            raise ValueError("cannot concatenate rollouts sampled with different group sizes or temperatures")
        if len({p.sampler_logp is None for p in parts}) > 1:
            raise ValueError("cannot concatenate rollouts with and without sampler log-probs")
        length = max(p.completion_ids.shape[1] for p in parts)

        def right_pad(t: Tensor) -> Tensor:
            return torch.nn.functional.pad(t, (0, length - t.shape[1]))

        keys = dict.fromkeys(k for p in parts for k in p.columns)
        return Rollout(
            completion_ids=torch.cat([right_pad(p.completion_ids) for p in parts]),
            completion_mask=torch.cat([right_pad(p.completion_mask) for p in parts]),
            inputs=SampleInputs.concat([p.inputs for p in parts]),
            prompts=[x for p in parts for x in p.prompts],
            columns={k: [x for p in parts for x in p.columns.get(k, [None] * p.batch_size)] for k in keys},
            group_size=parts[0].group_size,
            truncated=torch.cat([p.truncated for p in parts]),
            sampler_logp=None if parts[0].sampler_logp is None
            else torch.cat([right_pad(p.sampler_logp) for p in parts]),
            temperature=parts[0].temperature,
        )


@dataclass
class Sampling:
    """How to sample. ``temperature == 0`` means greedy. ``top_k == 0`` / ``top_p == 1`` disable them."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    # The stop token is suppressed until this many tokens were generated (transformers' min_new_tokens):
    # forces a completion length, e.g. to compare step times with TRL on identical work. Text policies only.
    min_new_tokens: int = 0


@runtime_checkable
class Policy(Protocol):
    """What a task implements to be trained by :class:`mmrl.Trainer`.

    Optional methods, asked for only by the options that need them: ``masked_view(rollout, generator)``
    (PAPO), ``rollout_from_completions(records, completions, sampling)`` (given completions, teacher-forced:
    offline DPO from a preference dataset) and the ``record_sampler_logp`` flag (TIS / MIS)."""

    #: The trainable module. The trainer builds the optimizer over its parameters, wraps it with
    #: ``accelerate`` and passes the (possibly wrapped) module back into the methods below.
    model: torch.nn.Module

    def generate(self, model: torch.nn.Module, records: list[dict], group_size: int, sampling: Sampling) -> Rollout:
        """Sample ``group_size`` completions for each record (no gradient)."""
        ...

    def log_probs(
        self, model: torch.nn.Module, rollout: Rollout, with_entropy: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Per-token log-probs ``[B, T]`` of ``rollout.completion_ids`` under ``model`` (with gradient if
        enabled), and per-token entropies of the full distribution when ``with_entropy`` (without gradient
        for ``True``, with gradient for ``"grad"``: pass it on to :func:`mmrl.ops.token_logprobs`)."""
        ...

    def decode(self, rollout: Rollout) -> list[Any]:
        """Completions as reward functions read them (text for a VLM, images for an image generator)."""
        ...

    def save_pretrained(self, model: torch.nn.Module, path: str, state_dict: dict[str, Tensor] | None = None) -> None:
        """Write ``model`` and whatever else is needed to load it again by path (tokenizer, config...).
        ``state_dict``: the weights to write in place of ``model.state_dict()`` — the whole weights of a model
        sharded by FSDP, gathered by the trainer (the model itself then holds only this process's shards)."""
        ...
