"""The vision-language policy: Qwen2-VL / Qwen2.5-VL / Qwen3-VL behind :class:`mmrl.policy.Policy`.

Prompts are chat messages with images (see :mod:`vision`). A group is sampled by running each prompt (and
its images, each unique image encoded once) through the model once and copying its KV cache to the ``G``
rows of its group (:func:`vision.shared_vision.prefill_groups`); mmrl's own loop then decodes all rows
(:mod:`vision.decoding`; ``lean_decoding=False`` uses transformers' ``model.generate`` instead — the same
tokens from the same seed). Re-scoring a completion runs the model on prompt + completion and turns only
the completion's final hidden states into log-probs, slice by slice (:func:`mmrl.ops.token_logprobs`), so
full-vocabulary fp32 logits never exist at once.

``record_sampler_logp`` (off by default; the trainer turns it on when a component needs the sampler's
log-probs, e.g. TIS/MIS) fills ``Rollout.sampler_logp`` with the log-prob of each sampled token under the
scores it was drawn from — *processed* scores: suppressed tokens, temperature, top-k, top-p, −inf where
filtered — while the trainer's log-probs are of the tempered, unfiltered distribution. They are kept as
``B·T`` fp32 values, never as full ``[B, T, V]`` scores (for Qwen2.5-VL's 151,936-token vocabulary that would
be 0.61 MB per row and step, 40 GB for 64 rows × 1024 tokens). Through ``model.generate`` they are read one
step at a time (:class:`SampledTokenLogp`). Greedy decoding (temperature 0) is a point mass: its log-prob
is 0. Positions after the stop token hold 0.
"""

from __future__ import annotations

from dataclasses import replace
from io import BytesIO

import torch
from PIL import Image
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from mmrl.ops import token_logprobs
from mmrl.policy import Rollout, SampleInputs, Sampling, unwrap_model
from vision.decoding import sample_tokens
from vision.masking import MaskingConfig, mask_images
from vision.modeling import pixel_bounds, resize_image
from vision.output_head import head_returns
from vision.shared_prompt import causal_lm, checkpointing_active, prompt_groups, shared_prompt_forward
from vision.shared_vision import ImagePlan, plan_images, prefill_groups, shared_image_features, vision_model

Tensor = torch.Tensor

# Record keys that are model inputs, not columns for reward functions.
INPUT_KEYS = ("prompt", "images")

# Logits-processor settings pinned to their neutral values: transformers fills every setting a
# GenerationConfig leaves at None from the checkpoint's generation_config.json (Qwen2.5-VL's sets
# repetition_penalty=1.05), which would sample from a distribution the trainer never scores.
NEUTRAL_PROCESSING = dict(repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
                          encoder_no_repeat_ngram_size=0, min_length=0, typical_p=1.0, epsilon_cutoff=0.0,
                          eta_cutoff=0.0, renormalize_logits=False)


class SampledTokenLogp(StoppingCriteria):
    """Records, at every decoding step, the log-prob of the token ``generate`` has just drawn under the
    scores it drew it from, then frees those scores.

    A stopping criterion runs after the new token is appended and, with ``output_scores``, receives every
    step's processed scores as a tuple whose last entry is the current step's (transformers'
    ``ConfidenceCriteria`` reads it the same way). Emptying that entry (``Tensor.set_()``: the tensor object
    gets empty storage, tensors sharing the old storage keep it) means ``generate`` holds one step's
    ``[B, V]`` scores instead of all of them; the sampling itself is untouched (it already happened)."""

    def __init__(self) -> None:
        self.steps: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: tuple[Tensor, ...] | None, **kwargs) -> Tensor:
        if not scores:
            raise RuntimeError("SampledTokenLogp needs generate(..., output_scores=True, return_dict_in_generate=True)")
        last = scores[-1]
        token = input_ids[:, -1:].to(last.device)
        self.steps.append((last.gather(-1, token).squeeze(-1) - last.logsumexp(-1)).float())
        last.set_()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def logp(self, length: int) -> Tensor:
        """[B, length] on the CPU (a backend that defers its stop check may have run extra steps)."""
        return torch.stack(self.steps, dim=1)[:, :length].cpu()


class VisionPolicy:
    """Samples and scores text completions of a Qwen-VL model for image+text prompts."""

    def __init__(self, model: torch.nn.Module, processor, logprob_chunk_size: int = 1024,
                 masking: MaskingConfig | None = None, record_sampler_logp: bool = False,
                 share_vision: bool = True, share_prompt: bool = True, lean_decoding: bool = True):
        self.model = model
        # Sample with mmrl's own loop over the model's forward (vision.decoding); False uses transformers'
        # model.generate. Seeded, both draw the same tokens; the loop skips generate's per-step machinery.
        self.lean_decoding = lean_decoding
        # Each prompt runs once per call: generation prefills it and copies its KV cache to the G rows of its
        # group (vision.shared_vision.prefill_groups); scoring runs it once and the completions on top of its
        # cache, with gradient (vision.shared_prompt). False runs every row. Same samples, log-probs and
        # gradients either way.
        self.share_prompt = share_prompt
        # Encode each unique image once per forward / generate call (vision.shared_vision); False encodes
        # every sample's copy, as a reference for the tests. Results are the same either way.
        self.share_vision = share_vision
        self.images_encoded = 0  # images given to the vision tower by generate / log_probs, all calls together
        self.record_sampler_logp = record_sampler_logp
        self.processor = processor
        self.masking = masking or MaskingConfig()  # PAPO's masked view (used only when PAPO is on)
        self.tokenizer = processor.tokenizer
        self.logprob_chunk_size = logprob_chunk_size
        image_processor = processor.image_processor
        self.min_pixels, self.max_pixels = pixel_bounds(image_processor)
        # Qwen2/2.5-VL: 14-px patches merged 2×2 → 28-px tokens; Qwen3-VL: 16-px patches → 32.
        self.size_factor = image_processor.patch_size * image_processor.merge_size
        eos = {self.tokenizer.eos_token_id}
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        self.eos_token_ids = sorted(i for i in eos if i is not None)
        # A sampled image placeholder would break the next forward (placeholders must match features).
        vocab = self.tokenizer.get_vocab()
        self.suppress_token_ids = [vocab[t] for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                      "<|vision_end|>") if t in vocab]
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.eos_token_ids[0]

    # ------------------------------------------------------------------ prompt processing

    def encode_prompts(self, records: list[dict]) -> SampleInputs:
        """Chat template + image processing for a batch of records, split per record."""
        texts, images, counts = [], [], []
        for record in records:
            texts.append(self.processor.apply_chat_template(record["prompt"], tokenize=False,
                                                            add_generation_prompt=True))
            record_images = [resize_image(im, self.min_pixels, self.max_pixels, self.size_factor)
                             for im in record.get("images") or []]
            images.extend(record_images)
            counts.append(len(record_images))
        batch = self.processor(text=texts, images=images or None, return_tensors="pt", padding=True)
        tensors = {k: v for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw")}
        # The raw images stay with the rollout (references, not copies): PAPO masks them before resizing.
        lists: dict[str, list] = {"raw_images": [list(record.get("images") or []) for record in records]}
        if images:
            # pixel_values stacks every image's patches; split it back into per-record chunks.
            grids = batch["image_grid_thw"]
            patches_per_image = grids.prod(dim=1).tolist()
            per_image_pixels = list(batch["pixel_values"].split(patches_per_image))
            per_image_grids = list(grids.split(1))
            lists["pixel_values"], lists["image_grid_thw"] = [], []
            start = 0
            for count in counts:
                lists["pixel_values"].append(per_image_pixels[start:start + count])
                lists["image_grid_thw"].append(per_image_grids[start:start + count])
                start += count
        # Prompts are left-padded: every tensor along the prompt's length pads with 0, the ids with the pad id.
        length = tensors["input_ids"].shape[1]
        pad_values = {k: (self.pad_token_id if k == "input_ids" else 0) for k, v in tensors.items()
                      if v.dim() >= 2 and v.shape[1] == length}
        return SampleInputs(tensors=tensors, lists=lists, pad_values=pad_values)

    def _pixel_chunks(self, images_per_record: list[list[Image.Image]]) -> tuple[list, list]:
        """Image-processor output for several records' images in one call, split per record."""
        flat = [resize_image(im, self.min_pixels, self.max_pixels, self.size_factor)
                for images in images_per_record for im in images]
        if not flat:
            return [[] for _ in images_per_record], [[] for _ in images_per_record]
        out = self.processor.image_processor(images=flat, return_tensors="pt")
        grids = out["image_grid_thw"]
        pixels = list(out["pixel_values"].split(grids.prod(dim=1).tolist()))
        grid_list = list(grids.split(1))
        pixel_chunks, grid_chunks, start = [], [], 0
        for images in images_per_record:
            pixel_chunks.append(pixels[start:start + len(images)])
            grid_chunks.append(grid_list[start:start + len(images)])
            start += len(images)
        return pixel_chunks, grid_chunks

    def _model_inputs(self, inputs: SampleInputs, device: torch.device) -> dict[str, Tensor]:
        """Every sample's inputs, each image occurrence's pixels included (no sharing)."""
        out = {k: v.to(device) for k, v in inputs.tensors.items()}
        pixels = [p for chunk in inputs.lists.get("pixel_values", []) for p in chunk]
        if pixels:
            out["pixel_values"] = torch.cat(pixels).to(device)
            out["image_grid_thw"] = torch.cat([g for chunk in inputs.lists["image_grid_thw"] for g in chunk]).to(device)
        return out

    def _shared_inputs(self, inputs: SampleInputs, device: torch.device) -> tuple[dict[str, Tensor], ImagePlan | None]:
        """The model inputs with each unique image's pixels once, and the plan that expands its features
        to every occurrence (use the inputs inside :func:`shared_image_features`); with ``share_vision``
        off, :meth:`_model_inputs` and no plan."""
        if not self.share_vision:
            out = self._model_inputs(inputs, device)
            self.images_encoded += len(out.get("image_grid_thw", ()))
            return out, None
        out = {k: v.to(device) for k, v in inputs.tensors.items()}
        plan = plan_images(inputs.lists.get("pixel_values", []), inputs.lists.get("image_grid_thw", []))
        if plan is not None:
            out["pixel_values"] = plan.pixel_values.to(device)
            out["image_grid_thw"] = plan.image_grid_thw.to(device)
            self.images_encoded += plan.num_unique
        return out, plan

    # ------------------------------------------------------------------ Policy interface

    def generation_config(self, sampling: Sampling) -> GenerationConfig:
        """An explicit config: a checkpoint's generation_config.json (e.g. top_k=1 in Qwen instruct models)
        must not silently change how the policy samples."""
        greedy = sampling.temperature <= 0
        return GenerationConfig(
            max_new_tokens=sampling.max_new_tokens, do_sample=not greedy,
            temperature=None if greedy else sampling.temperature, top_p=None if greedy else sampling.top_p,
            top_k=None if greedy else sampling.top_k, eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id, suppress_tokens=self.suppress_token_ids or None,
            min_new_tokens=sampling.min_new_tokens or None, **NEUTRAL_PROCESSING)

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, records: list[dict], group_size: int, sampling: Sampling) -> Rollout:
        device = next(model.parameters()).device
        prompt_inputs = self.encode_prompts(records)
        repeat = torch.arange(len(records)).repeat_interleave(group_size)
        inputs = prompt_inputs.select(repeat)
        greedy = sampling.temperature <= 0
        if self.share_prompt:
            # Each prompt (and its images) through the model once; its KV cache serves the G rows of its group.
            prompt_model_inputs, plan = self._shared_inputs(prompt_inputs, device)
            model_inputs, cache = prefill_groups(model, prompt_model_inputs, plan, group_size)
        else:  # each prompt's images once (not once per sample); the G rows of its group share their features
            model_inputs, plan = self._shared_inputs(inputs, device)
            if self.lean_decoding:
                model_inputs, cache = prefill_groups(model, model_inputs, plan, 1)
        record_logp = self.record_sampler_logp and not greedy
        if self.lean_decoding:  # vision.decoding: the model's forward in a loop, no per-step generate machinery
            completion_ids, recorded = sample_tokens(
                model, model_inputs["input_ids"], model_inputs["attention_mask"], cache, vision_model(model).rope_deltas,
                sampling, self.eos_token_ids, self.pad_token_id, self.suppress_token_ids, record_logp)
            completion_ids = completion_ids.cpu()
            recorded = recorded.cpu() if recorded is not None else None
        else:
            completion_ids, recorded = self._generate(model, model_inputs, None if self.share_prompt else plan,
                                                      cache if self.share_prompt else None, sampling, record_logp)
        completion_mask, truncated = self._completion_mask(completion_ids)
        completion_ids = completion_ids.masked_fill(completion_mask == 0, self.pad_token_id)
        sampler_logp = None
        if self.record_sampler_logp:  # greedy: a point mass, log-prob 0
            sampler_logp = torch.zeros(completion_ids.shape) if recorded is None else recorded
            sampler_logp = sampler_logp.masked_fill(completion_mask == 0, 0.0)
        keys = dict.fromkeys(k for record in records for k in record if k not in INPUT_KEYS)  # union, in order
        columns = {key: [records[i].get(key) for i in repeat.tolist()] for key in keys}
        return Rollout(completion_ids=completion_ids, completion_mask=completion_mask, inputs=inputs,
                       prompts=[records[i]["prompt"] for i in repeat.tolist()], columns=columns,
                       group_size=group_size, truncated=truncated, sampler_logp=sampler_logp,
                       temperature=1.0 if greedy else sampling.temperature)

    def _generate(self, model: torch.nn.Module, model_inputs: dict[str, Tensor], plan: ImagePlan | None, cache,
                  sampling: Sampling, record: bool) -> tuple[Tensor, Tensor | None]:
        """The same sampling through transformers' ``model.generate`` (``lean_decoding=False``): the new
        tokens (on CPU) and, with ``record``, the sampler's log-prob of each."""
        gen_config = self.generation_config(sampling)
        if cache is not None:
            model_inputs = {**model_inputs, "cache": cache}
        prompt_length = model_inputs["input_ids"].shape[1]
        recorder = SampledTokenLogp() if record else None
        with shared_image_features(model, plan):
            if recorder is None:
                sequences = model.generate(**model_inputs, generation_config=gen_config)
            else:
                gen_config.output_scores = gen_config.return_dict_in_generate = True
                sequences = model.generate(**model_inputs, generation_config=gen_config,
                                           stopping_criteria=StoppingCriteriaList([recorder])).sequences
        completion_ids = sequences[:, prompt_length:].cpu()
        return completion_ids, (recorder.logp(completion_ids.shape[1]) if recorder is not None else None)

    def rollout_from_completions(self, records: list[dict], completions: list[list[str]], sampling: Sampling) -> Rollout:
        """A rollout of given completion texts (``completions[i]``: record ``i``'s group), teacher-forced:
        each text tokenised as the model would write it after the chat prompt, then the end-of-turn token;
        longer than ``sampling.max_new_tokens`` → cut there and marked truncated. Offline DPO's pairs."""
        group_size = len(completions[0]) if completions else 0
        if any(len(group) != group_size for group in completions) or len(completions) != len(records):
            raise ValueError("rollout_from_completions needs one group of equally many completions per record")
        repeat = torch.arange(len(records)).repeat_interleave(group_size)
        stop = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        stop = stop if stop in self.eos_token_ids else self.eos_token_ids[0]
        rows, truncated = [], []
        for group in completions:
            for text in group:
                ids = self.tokenizer(str(text), add_special_tokens=False)["input_ids"] + [stop]
                truncated.append(len(ids) > sampling.max_new_tokens)
                rows.append(ids[:sampling.max_new_tokens])
        length = max((len(r) for r in rows), default=0)
        completion_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        completion_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, ids in enumerate(rows):
            completion_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            completion_mask[i, :len(ids)] = 1
        keys = dict.fromkeys(k for record in records for k in record if k not in INPUT_KEYS)
        return Rollout(completion_ids=completion_ids, completion_mask=completion_mask,
                       inputs=self.encode_prompts(records).select(repeat),
                       prompts=[records[i]["prompt"] for i in repeat.tolist()],
                       columns={key: [records[i].get(key) for i in repeat.tolist()] for key in keys},
                       group_size=group_size, truncated=torch.tensor(truncated, dtype=torch.bool),
                       temperature=sampling.temperature if sampling.temperature > 0 else 1.0)

    def _completion_mask(self, completion_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Mask up to and including the first stop token; ``truncated`` where no stop token appears."""
        is_eos = torch.isin(completion_ids, torch.tensor(self.eos_token_ids))
        has_eos = is_eos.any(dim=1)
        length = completion_ids.shape[1]
        first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, length, dtype=torch.long))
        positions = torch.arange(length).unsqueeze(0)
        mask = (positions <= first_eos.unsqueeze(1)).long()
        return mask, ~has_eos

    def log_probs(self, model: torch.nn.Module, rollout: Rollout, with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
        device = next(model.parameters()).device
        completion_ids = rollout.completion_ids.to(device)
        completion_mask = rollout.completion_mask.to(device)

        def head(project, hidden: Tensor) -> Tensor:
            logp, entropy = token_logprobs(hidden, completion_ids, project,
                                           temperature=rollout.temperature, chunk_size=self.logprob_chunk_size,
                                           with_entropy=with_entropy)
            return logp.unsqueeze(-1) if entropy is None else torch.stack([logp, entropy], dim=-1)

        if self.share_prompt and completion_ids.shape[1] and not checkpointing_active(model):
            first, row_to_prompt = prompt_groups(rollout.inputs)
            if len(first) < rollout.batch_size:  # some prompt repeats: score it once (vision.shared_prompt)
                prompt, plan = self._shared_inputs(rollout.inputs.select(first), device)
                packed = shared_prompt_forward(model, prompt, plan, row_to_prompt, completion_ids, completion_mask, head)
                return packed[..., 0], (packed[..., 1] if with_entropy else None)
        inputs, plan = self._shared_inputs(rollout.inputs, device)
        prompt_length = inputs["input_ids"].shape[1]
        inputs["input_ids"] = torch.cat([inputs["input_ids"], completion_ids], dim=1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], completion_mask.to(inputs["attention_mask"].dtype)], dim=1)
        if "mm_token_type_ids" in inputs:  # completion tokens are text
            pad = torch.zeros_like(completion_ids, dtype=inputs["mm_token_type_ids"].dtype)
            inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], pad], dim=1)
        # Through the (possibly wrapped) model's own forward so DDP/DeepSpeed hooks run (image sharing
        # included: see vision.shared_vision); logits for one position only — the completion's logits are
        # made below from the final hidden states, in slices. Those are read off the inner model's output
        # by a hook instead of output_hidden_states, which would keep every layer's (and the vision
        # tower's) hidden states until the call returns.
        # The head is applied inside the wrapped forward too: the model's own call of its output head returns
        # the log-probs (vision.output_head) — under FSDP / ZeRO-3 its weight is whole only there, and as the
        # forward's output the log-probs make FSDP gather it again for their backward.
        last_hidden: list[Tensor] = []
        handle = vision_model(model).register_forward_hook(lambda module, args, output: last_hidden.append(output[0]))
        try:
            with shared_image_features(model, plan), head_returns(
                    causal_lm(model), lambda project: head(project, last_hidden[-1][:, prompt_length - 1:-1])):
                out = model(**inputs, logits_to_keep=1, use_cache=False)
        finally:
            handle.remove()
        # The wrapper's output, not a tensor kept aside: FSDP attaches its pre-backward hooks to what it returns.
        packed = out["logits"]
        return packed[..., 0], (packed[..., 1] if with_entropy else None)

    def masked_view(self, rollout: Rollout, generator: torch.Generator) -> tuple[Rollout, Tensor]:
        """PAPO's counterfactual: every image masked (``self.masking``), one mask per prompt shared by its
        group, prompt tokens unchanged (a masked image has the size of the original, hence the same image
        tokens). Returns the masked rollout and which samples have images at all."""
        group = rollout.group_size
        raw = rollout.inputs.lists["raw_images"]
        firsts = range(0, rollout.batch_size, group)
        masked_per_prompt = []
        for i in firsts:  # masks are drawn per prompt (a handful per step), the heavy work is batched below
            precomputed = None
            if self.masking.strategy == "column":
                if self.masking.column not in rollout.columns:
                    raise ValueError(f"masking.strategy 'column' needs dataset column {self.masking.column!r}; "
                                     f"columns present: {sorted(rollout.columns)}")
                precomputed = [_as_image(x) for x in _as_list(rollout.columns[self.masking.column][i])]
            masked_per_prompt.append(mask_images(raw[i], self.masking, generator, precomputed) if raw[i] else [])
        pixel_chunks, grid_chunks = self._pixel_chunks(masked_per_prompt)
        for i, grids in zip(firsts, grid_chunks):
            original = rollout.inputs.lists["image_grid_thw"][i] if raw[i] else []
            if any(not torch.equal(a, b) for a, b in zip(grids, original)):
                raise ValueError("a masked image was sized differently from its original (a precomputed masked "
                                 "image must have the original image's size)")
        repeat = [p for p in range(len(masked_per_prompt)) for _ in range(group)]
        lists = dict(rollout.inputs.lists)
        if "pixel_values" in lists:
            lists["pixel_values"] = [pixel_chunks[p] for p in repeat]
        inputs = SampleInputs(tensors=rollout.inputs.tensors, lists=lists, pad_values=rollout.inputs.pad_values)
        has_view = torch.tensor([len(images) > 0 for images in raw], dtype=torch.bool)
        return replace(rollout, inputs=inputs), has_view

    def decode(self, rollout: Rollout) -> list[str]:
        ids = rollout.completion_ids.masked_fill(rollout.completion_mask == 0, self.pad_token_id)
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def save_pretrained(self, model: torch.nn.Module, path: str, state_dict: dict[str, Tensor] | None = None) -> None:
        model = unwrap_model(model)  # a PEFT model saves its adapter (no embedding layers: no hub look-up)
        options = {"save_embedding_layers": False} if hasattr(model, "peft_config") else {}
        if state_dict is not None:  # the whole weights of a sharded model (see mmrl.policy.Policy)
            options["state_dict"] = state_dict
        model.save_pretrained(path, **options)
        self.processor.save_pretrained(path)


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _as_image(value) -> Image.Image:
    """A precomputed masked image from a dataset column: PIL, a path, raw bytes or an HF image dict."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes):
        return Image.open(BytesIO(value)).convert("RGB")
    if isinstance(value, str):
        return Image.open(value).convert("RGB")
    raise TypeError(f"cannot read a masked image from a {type(value).__name__}")
