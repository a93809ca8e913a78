"""The autoregressive image-generation policy: a LlamaGen-style GPT + a VQ tokenizer behind
:class:`mmrl.policy.Policy`, so AR-GRPO runs through the same trainer, group sampling and advantages as
the VLM work.

Conditions: class ids (c2i) or, for text-conditional (t2i) models, T5 caption features of each record's
``prompt`` from the policy's ``text_encoder`` (features + mask ride in the rollout, so log-prob
recomputation sees exactly what the sampler saw).

A "completion" is the sequence of image tokens (h·w of them, always the same length: the mask is all
ones); :meth:`ARImagePolicy.decode` turns them into images for the reward functions.

``logprob_mode`` — which distribution the policy ratio and KL are computed on:

* ``cond`` (default; AR-GRPO and T2I-R1): the conditional logits only. Tokens were sampled from the
  *guided* distribution, so this ratio is not exactly on-policy — the choice of the published recipes,
  kept as default so they can be reproduced.
* ``cfg``: the guided distribution u + s·(c − u) the tokens were actually sampled from (two forwards per
  micro-batch, cond and null, batched together): the ratio is on-policy and gradients flow through both
  branches.

``record_sampler_logp`` (off by default: training without a mismatch correction computes nothing extra;
the trainer turns it on when a component needs the sampler's log-probs) fills ``Rollout.sampler_logp``
with each token's log-prob under the distribution it was drawn from — guided, tempered, top-k/top-p
filtered; 0 when greedy — so TIS/MIS can correct for whatever the trainer's π_old differs in (the
conditional distribution in ``cond`` mode, the unfiltered one in both).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file, save_model

from image_gen.sampling import check_guidance, guided_token_logprobs, sample_image_tokens
from image_gen.text_encoder import TEXT_ENCODER_FILE
from mmrl.ops import token_logprobs
from mmrl.policy import Rollout, SampleInputs, Sampling, unwrap_model

Tensor = torch.Tensor
INPUT_KEYS = ("prompt",)




class ARImagePolicy:
    """Samples image-token sequences with classifier-free guidance and scores them."""

    def __init__(self, model: torch.nn.Module, tokenizer, cfg_scale: float = 2.0,
                 cfg_interval: tuple[float, float] = (0.0, 1.0), logprob_mode: str = "cond",
                 use_cache: bool = True, logprob_chunk_size: int = 1024, text_encoder=None,
                 record_sampler_logp: bool = False):
        self.cfg_interval = check_guidance(cfg_scale, cfg_interval, logprob_mode)
        self.model = model
        self.tokenizer = tokenizer
        self.cfg_scale = cfg_scale
        self.logprob_mode = logprob_mode
        self.use_cache = use_cache
        self.logprob_chunk_size = logprob_chunk_size
        self.record_sampler_logp = record_sampler_logp
        self.num_tokens = model.config.block_size
        # t2i: something with ``encode(prompts) -> (features [B, L, D], mask [B, L])``, e.g.
        # image_gen.text_encoder.T5TextEncoder. It is frozen and not part of the trained model.
        self.text_encoder = text_encoder
        if model.config.model_type == "t2i":
            if text_encoder is None:
                raise ValueError("a text-conditional (t2i) model needs a text encoder (model.text_encoder)")
            if getattr(text_encoder, "dim", model.config.caption_dim) != model.config.caption_dim:
                raise ValueError(f"text encoder features have {text_encoder.dim} dims but the model expects "
                                 f"caption_dim={model.config.caption_dim}")

    def _conditions(self, records: list[dict]) -> dict[str, Tensor]:
        """Model conditions for ``records``: ``{"cond": class ids [B]}`` (c2i) or ``{"cond": caption
        features [B, L, D], "cond_mask": [B, L]}`` (t2i, from each record's ``prompt``)."""
        config = unwrap_model(self.model).config
        if config.model_type == "t2i":
            features, mask = self.text_encoder.encode([record.get("prompt") for record in records])
            return {"cond": features, "cond_mask": mask}
        ids = []
        for i, record in enumerate(records):
            class_id = record.get("class_id")
            if not isinstance(class_id, int) or not 0 <= class_id < config.num_classes:
                raise ValueError(f"record {i}: class_id={class_id!r} is not a valid class id "
                                 f"(0..{config.num_classes - 1}); prompt={record.get('prompt')!r}")
            ids.append(class_id)
        return {"cond": torch.tensor(ids, dtype=torch.long)}

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, records: list[dict], group_size: int, sampling: Sampling) -> Rollout:
        repeat = torch.arange(len(records)).repeat_interleave(group_size)
        conditions = {k: v[repeat] for k, v in self._conditions(records).items()}
        tokens, sampler_logp = sample_image_tokens(
            model, conditions["cond"], self.num_tokens, self.cfg_scale, self.cfg_interval, sampling.temperature,
            sampling.top_k, sampling.top_p, use_cache=self.use_cache, cond_mask=conditions.get("cond_mask"),
            with_logp=self.record_sampler_logp)
        keys = dict.fromkeys(k for record in records for k in record if k not in INPUT_KEYS)
        tokens = tokens.cpu()
        return Rollout(
            completion_ids=tokens, completion_mask=torch.ones_like(tokens), inputs=SampleInputs(tensors=conditions),
            prompts=[records[i].get("prompt") for i in repeat.tolist()],
            columns={k: [records[i].get(k) for i in repeat.tolist()] for k in keys}, group_size=group_size,
            truncated=torch.zeros(tokens.shape[0], dtype=torch.bool),
            sampler_logp=None if sampler_logp is None else sampler_logp.cpu(),
            temperature=sampling.temperature if sampling.temperature > 0 else 1.0)

    def rollout_from_completions(self, records: list[dict], completions: list[list], sampling: Sampling) -> Rollout:
        """A rollout of given image-token sequences (``completions[i]``: record ``i``'s group, each a sequence
        of ``num_tokens`` VQ codes), teacher-forced: offline DPO's pairs of images."""
        group_size = len(completions[0]) if completions else 0
        if any(len(group) != group_size for group in completions) or len(completions) != len(records):
            raise ValueError("rollout_from_completions needs one group of equally many completions per record")
        tokens = torch.stack([torch.as_tensor(c, dtype=torch.long).flatten() for group in completions for c in group])
        if tokens.shape[1] != self.num_tokens:
            raise ValueError(f"each completion must hold {self.num_tokens} image tokens, got {tokens.shape[1]}")
        repeat = torch.arange(len(records)).repeat_interleave(group_size)
        keys = dict.fromkeys(k for record in records for k in record if k not in INPUT_KEYS)
        return Rollout(
            completion_ids=tokens, completion_mask=torch.ones_like(tokens),
            inputs=SampleInputs(tensors={k: v[repeat] for k, v in self._conditions(records).items()}),
            prompts=[records[i].get("prompt") for i in repeat.tolist()],
            columns={k: [records[i].get(k) for i in repeat.tolist()] for k in keys}, group_size=group_size,
            truncated=torch.zeros(tokens.shape[0], dtype=torch.bool),
            temperature=sampling.temperature if sampling.temperature > 0 else 1.0)

    def log_probs(self, model: torch.nn.Module, rollout: Rollout, with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
        inner = unwrap_model(model)
        device = inner.output.weight.device
        ids = rollout.completion_ids.to(device)
        cond = rollout.inputs.tensors["cond"].to(device)
        mask = rollout.inputs.tensors.get("cond_mask")
        mask = None if mask is None else mask.to(device)
        batch, length = ids.shape
        if self.logprob_mode == "cond":
            hidden = model(ids, cond, mask, return_hidden=True)[:, :length]
            return token_logprobs(hidden, ids, inner.output, rollout.temperature, self.logprob_chunk_size, with_entropy)
        # cfg: cond and null rows in one forward, mixed into the guided logits chunk by chunk
        both = torch.cat([cond, inner.null_condition(batch, device)])
        both_mask = None if mask is None else torch.cat([mask, mask])  # null rows keep the mask (see sampling)
        hidden = model(torch.cat([ids, ids]), both, both_mask, return_hidden=True)[:, :length]
        return guided_token_logprobs(hidden, ids, inner.output, self.cfg_scale, self.cfg_interval,
                                     rollout.temperature, self.logprob_chunk_size, with_entropy)

    @torch.no_grad()
    def decode(self, rollout: Rollout) -> list[Tensor]:
        """Images [3, H, W] in [0, 1], one per sample (the tokenizer decodes the whole batch at once)."""
        images = self.tokenizer.decode(rollout.completion_ids)
        return list(images.float().cpu())

    def save_pretrained(self, model: torch.nn.Module, path: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        inner = unwrap_model(model)
        if state_dict is None:
            save_model(inner, str(out / "model.safetensors"))
        else:  # the whole weights of a sharded model (see mmrl.policy.Policy); the GPT ties no weights
            save_file({key: value.contiguous() for key, value in state_dict.items()}, str(out / "model.safetensors"))
        (out / "gpt_config.json").write_text(json.dumps(vars(inner.config), indent=1, default=str))
        if self.text_encoder is not None:  # so the saved model loads with the T5 it was trained with
            (out / TEXT_ENCODER_FILE).write_text(json.dumps(
                {"name_or_path": getattr(self.text_encoder, "source", None), "max_length": inner.config.cls_token_num}))
        if hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(str(out / "vq"))
