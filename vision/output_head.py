"""The completion's log-probs computed inside the output head's own forward call.

Scoring needs the head (``get_output_embeddings()``) on every completion position, in slices
(:func:`mmrl.ops.token_logprobs`) so that the ``[B, T, vocab]`` logits never exist at once. Where those slices
are projected matters under sharding, because the head's weight is only whole at certain moments:

- FSDP1: inside the root module's forward (outside it, the rank's slice of the FlatParameter);
- DeepSpeed ZeRO-3: inside the head module's forward (gathered by its hooks, released after);
- FSDP2 as accelerate shards a model with tied embeddings: the input embeddings and the head are *one*
  shard group (their shared weight may not be in two). FSDP2 runs a group's hooks once per forward: the
  first module of the group to run (the embeddings) gathers it, the last (the head) ends it. Every further
  call of the head — one per slice — starts a new "forward" of the group, whose backward hook fires as soon
  as the gradient reaches that slice's input: the group's gradient is then reduce-scattered before the
  embeddings' share of it exists, and the embeddings' share is never reduced (measured with the trainer on
  2 processes: the shared weight's gradient was missing entirely with one micro-batch, partial with four).

So the head module is called exactly once, by the model's own forward (``logits_to_keep=1``), and that call
returns the log-probs: for its duration the head's ``forward`` is replaced by one that projects the captured
final hidden states slice by slice with the head's own forward function (no module call, hence no hooks).
Every sharding above then sees one ordinary forward of the head, with the weight whole, and gathers it
again for the backward of what that forward returned. (verl's fused-kernel path likewise projects with
``lm_head.weight`` inside the model's forward.)

Consequence for users: forward hooks registered on the head run once per scoring call, on the log-probs. To
change the logits themselves (a bias, a processor), wrap the head's ``forward`` — the function this module
calls for each slice, and what generation calls too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

Tensor = torch.Tensor


@contextmanager
def head_returns(lm: torch.nn.Module, compute: Callable[[Callable[[Tensor], Tensor]], Tensor]) -> Iterator[None]:
    """While active, a call of ``lm``'s output head returns ``compute(project)`` whatever its input, where
    ``project(hidden) -> logits`` is the head's own forward (an instance-level override included)."""
    head = lm.get_output_embeddings()
    project = head.forward
    own = vars(head).get("forward")

    def forward(*args, **kwargs):
        return compute(project)

    head.forward = forward
    try:
        yield
    finally:
        if own is not None:
            head.forward = own
        else:
            del head.forward
