"""Score each prompt once per group: the prompt's forward (images included) runs once, its KV cache — with
gradient — serves the G completions that follow it.

A group's ``G`` samples share their prompt tokens and images (:meth:`mmrl.policy.SampleInputs.select`
repeats them), so the unshared scoring forward runs the same prompt ``G`` times. Here one call of the
(possibly DDP/FSDP-wrapped) model does, inside its own forward:

1. **prefix**: the ``U`` unique prompts of the batch through the inner Qwen-VL model with ``use_cache``;
2. **expand**: the cache's keys and values indexed to the ``B`` rows (an indexing op: each prompt's
   gradient is the sum over its rows, as when every copy ran);
3. **suffix**: the completions (all but their last token) on top of that cache, with the M-RoPE positions the
   full sequence would have (the prompt's own positions, then the text positions continuing from the
   prompt's offset — ``rope_deltas`` — exactly as ``get_rope_index`` numbers them over prompt + completion);
4. the output head on the last prompt position and the suffix positions → the completion's log-probs.

Both passes run inside one call of the wrapped model: the inner ``Qwen*VLModel``'s ``forward`` is swapped
for the two passes for the duration of the call, and the model's own call of its output head returns the
log-probs (:mod:`vision.output_head`, as in the unshared scoring), so DDP sees one forward per backward,
FSDP / ZeRO-3 have the head's weight whole inside it, and an
autocast wrapper around the top model's forward still applies. Positions after a
completion's stop token differ from the unshared forward's, but they come after every valid token (causal
attention) and are outside the loss. Activation checkpointing of the language model cannot keep a cache, so
with it on (and gradients enabled) the caller scores unshared.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mmrl.policy import SampleInputs, unwrap_model
from vision.output_head import head_returns
from vision.shared_vision import ImagePlan, shared_image_features, vision_model

Tensor = torch.Tensor


def prompt_groups(inputs: SampleInputs) -> tuple[Tensor, Tensor]:
    """``(first [U], row_to_prompt [B])``: the first row of each distinct prompt, and each row's prompt.
    Two rows share a prompt when their tokens, attention mask and image tensors (by object) are the same."""
    ids, mask = inputs.tensors["input_ids"], inputs.tensors["attention_mask"]
    pixels = inputs.lists.get("pixel_values")
    seen: dict[tuple, int] = {}
    first, index = [], []
    for row, (tokens, valid) in enumerate(zip(ids.tolist(), mask.tolist())):
        key = (tuple(tokens), tuple(valid), tuple(id(p) for p in pixels[row]) if pixels else ())
        if key not in seen:
            seen[key] = len(first)
            first.append(row)
        index.append(seen[key])
    return torch.tensor(first, dtype=torch.long), torch.tensor(index, dtype=torch.long)


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The ``Qwen*VLForConditionalGeneration`` inside DDP/FSDP/DeepSpeed and PEFT wrappers."""
    inner = unwrap_model(model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def checkpointing_active(model: torch.nn.Module) -> bool:
    """True when a backward would replay the language model's layers (they then cannot fill a cache)."""
    language_model = vision_model(model).language_model
    return torch.is_grad_enabled() and language_model.training and any(
        getattr(m, "gradient_checkpointing", False) is True for m in language_model.modules())


def _prompt_positions(base: torch.nn.Module, prompt: dict[str, Tensor]) -> tuple[Tensor | None, Tensor]:
    """The prompts' M-RoPE position ids ``[3, U, L]`` as the unshared forward computes them
    (``compute_3d_position_ids``; ``None``: the model's default, 0..L-1 over the padded row) and the position
    ``[U]`` the first completion token gets: one past the largest position of the prompt's valid tokens, as
    ``get_rope_index`` numbers text that follows (``L`` when the default applies)."""
    base.rope_deltas = None
    positions = base.compute_3d_position_ids(
        input_ids=prompt["input_ids"], inputs_embeds=None, image_grid_thw=prompt.get("image_grid_thw"),
        video_grid_thw=None, attention_mask=prompt["attention_mask"], cache=None,
        mm_token_type_ids=prompt.get("mm_token_type_ids"))
    rows, length = prompt["input_ids"].shape
    if positions is None:
        return None, torch.full((rows,), length, dtype=torch.long, device=prompt["input_ids"].device)
    valid = prompt["attention_mask"].bool().unsqueeze(0).to(positions.device)
    return positions, positions.masked_fill(~valid, -1).amax(dim=(0, 2)) + 1


def shared_prompt_forward(model: torch.nn.Module, prompt: dict[str, Tensor], plan: ImagePlan | None,
                          row_to_prompt: Tensor, completion_ids: Tensor, completion_mask: Tensor,
                          head: Callable[[Callable[[Tensor], Tensor], Tensor], Tensor]) -> Tensor:
    """``head(project, hidden [B, T, H])`` of every completion position (``project``: the output head's
    forward, see :mod:`vision.output_head`) (the hidden state that predicts each
    completion token), computed with each of the ``U`` prompts in ``prompt`` run once; see the module
    docstring. ``prompt`` holds the model inputs of the unique prompts (``plan``: their unique images)."""
    lm = causal_lm(model)
    base = vision_model(model)
    device = completion_ids.device
    rows = row_to_prompt.to(device)
    positions, start = _prompt_positions(base, prompt)
    suffix_ids = completion_ids[:, :-1]
    steps = torch.arange(suffix_ids.shape[1], device=device)
    suffix_positions = (start.to(device)[rows].unsqueeze(1) + steps).unsqueeze(0).expand(3, -1, -1)

    base_forward = type(base).forward.__get__(base)  # the class's forward: the swapped-in one calls it
    hidden_out: list[Tensor] = []

    def two_passes(**inputs):
        prefix = {k: v for k, v in inputs.items() if k in prompt and v is not None}
        if positions is not None:
            prefix["position_ids"] = positions
        out = base_forward(**prefix, use_cache=True)
        hidden = out.last_hidden_state[rows, -1:]
        if suffix_ids.shape[1]:
            cache = getattr(out, "cache", None) or out.past_key_values
            cache.batch_select_indices(rows)  # each prompt's keys and values, with gradient, for its rows
            mask = torch.cat([prefix["attention_mask"][rows], completion_mask[:, :-1].to(prefix["attention_mask"])], 1)
            suffix = base_forward(input_ids=suffix_ids, attention_mask=mask, position_ids=suffix_positions,
                                  cache=cache, use_cache=True)
            hidden = torch.cat([hidden, suffix.last_hidden_state], dim=1)
        hidden_out.append(hidden)
        return type(out)(last_hidden_state=hidden)

    own = vars(base).get("forward")
    base.forward = two_passes  # the top model's forward (and any wrapper around it) calls self.model(...)
    try:
        with shared_image_features(model, plan), head_returns(lm, lambda project: head(project, hidden_out[-1])):
            out = model(**prompt, logits_to_keep=1, use_cache=False)
    finally:
        if own is not None:
            base.forward = own
        else:
            del base.forward
        base.rope_deltas = None
    return out["logits"]
