"""Janus-Pro (transformers ``JanusForConditionalGeneration``) as an AR image-generation backend.

Janus' image mode, as transformers and DeepSeek's reference implement it, maps onto our policy interface
without forking anything — every piece is a public submodule we drive ourselves:

* **prompt** — ``BOS + "<|User|>: {text}\\n\\n<|Assistant|>:" + "<begin_of_image>"``: the processor's chat
  template for one user text message with ``add_generation_prompt=True`` (DeepSeek's ``deepseek`` SFT
  format with an empty system prompt), followed by the begin-of-image tag as ``JanusProcessor(...,
  generation_mode="image")`` appends it; BOS as the Llama tokenizer adds it. Prompts are embedded with the
  language model's token embeddings (``get_input_embeddings``).
* **unconditional prompt** for classifier-free guidance — the same row with every token except BOS and
  ``<begin_of_image>`` replaced by the pad token (``JanusForConditionalGeneration.generate`` and DeepSeek's
  ``generation_inference.py`` both do this), same attention mask.
* **image tokens** are fed back through ``prepare_embeddings_for_image_generation`` (generation embedding
  + generation aligner MLP), and scored by ``model.model.generation_head`` on the language model's final
  hidden states — not by ``lm_head``.
* **decoding** — ``model.model.vqmodel.decode`` (codebook lookup, L2-normalised, VQ decoder) gives pixels
  in [−1, 1]; we map them to [0, 1] as DeepSeek's ``(x + 1) / 2`` does.

Sampling is our own KV-cached loop (``transformers.DynamicCache``) over ``[cond; uncond]`` rows with the
guided logits ``u + s·(c − u)`` (Janus samples at s = 5, temperature 1, no top-k/top-p); on request it
records each sampled token's log-prob under the distribution it was drawn from
(:func:`image_gen.sampling.sample_next`) for rollout/training mismatch corrections — the same
``logprob_mode`` (``cond`` | ``cfg``) and ``record_sampler_logp`` contract as
:class:`image_gen.policy.ARImagePolicy`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoTokenizer, DynamicCache, JanusForConditionalGeneration, JanusProcessor

from image_gen.sampling import (
    SampledTokens,
    cfg_logits,
    cfg_scales,
    check_guidance,
    guided_token_logprobs,
    sample_next,
)
from mmrl.ops import token_logprobs
from mmrl.policy import Rollout, SampleInputs, Sampling, unwrap_model

Tensor = torch.Tensor
INPUT_KEYS = ("prompt",)
#: One user turn + the assistant's generation prompt, as Janus' chat template renders it.
PROMPT_TEMPLATE = "<|User|>: {prompt}\n\n<|Assistant|>:"
BOI_TOKEN = "<begin_of_image>"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class JanusSpecialTokens:
    bos: int
    pad: int
    boi: int


def special_tokens(model: torch.nn.Module, tokenizer) -> JanusSpecialTokens:
    """BOS, pad and ``<begin_of_image>`` ids: from the generation config where the HF conversion stored
    them (``pad_token_id`` 100015 and ``boi_token_id`` 100016 for Janus-Pro), else from the tokenizer."""
    gen = getattr(unwrap_model(model), "generation_config", None)
    pad = getattr(gen, "pad_token_id", None)
    pad = pad if isinstance(pad, int) else tokenizer.pad_token_id
    boi = getattr(gen, "boi_token_id", None) or (getattr(gen, "generation_kwargs", None) or {}).get("boi_token_id")
    if not isinstance(boi, int):
        boi = tokenizer.convert_tokens_to_ids(getattr(tokenizer, "boi_token", None) or BOI_TOKEN)
    ids = {"bos": tokenizer.bos_token_id, "pad": pad, "boi": boi}
    missing = [k for k, v in ids.items() if not isinstance(v, int) or v == tokenizer.unk_token_id]
    if missing:
        raise ValueError(f"the tokenizer has no {missing} token(s); Janus needs BOS, a pad token and {BOI_TOKEN}")
    return JanusSpecialTokens(**ids)


def encode_prompts(tokenizer, prompts: list[str], tokens: JanusSpecialTokens,
                   template: str = PROMPT_TEMPLATE) -> tuple[Tensor, Tensor, Tensor]:
    """Left-padded ``(cond_ids, uncond_ids, mask)``, each ``[N, L]``.

    Left padding keeps every row's last prompt token (``<begin_of_image>``) in the last column, so the
    first image token is predicted from the same column for the whole batch."""
    rows = []
    for text in prompts:
        body = tokenizer(template.format(prompt=str(text).strip()), add_special_tokens=False).input_ids
        rows.append([tokens.bos, *body, tokens.boi])
    length = max(len(r) for r in rows)
    cond = torch.full((len(rows), length), tokens.pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        cond[i, length - len(row):] = torch.tensor(row)
        mask[i, length - len(row):] = 1
    keep = (cond == tokens.bos) | (cond == tokens.boi)
    uncond = torch.where(keep & mask.bool(), cond, torch.full_like(cond, tokens.pad))
    return cond, uncond, mask


def positions(mask: Tensor) -> Tensor:
    """Position ids counted over attended tokens only, as transformers' generate does for left padding
    (RoPE scores are shift-invariant, so this is about matching HF and staying within the position range)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _last_hidden(model, embeds: Tensor, mask: Tensor, cache: DynamicCache | None = None) -> Tensor:
    """Final hidden state of the last position; with ``cache``, ``embeds`` are only the new positions."""
    pos = positions(mask)[:, -embeds.shape[1]:]
    out = model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                                     cache=cache, use_cache=cache is not None)
    return out.last_hidden_state[:, -1]


@torch.no_grad()
def sample_janus_tokens(model, cond_ids: Tensor, uncond_ids: Tensor, mask: Tensor, num_tokens: int,
                        cfg_scale: float = 5.0, cfg_interval: tuple[float, float] = (0.0, 1.0),
                        temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                        generator: torch.Generator | None = None, use_cache: bool = True,
                        with_logp: bool = False) -> SampledTokens:
    """Sample ``num_tokens`` image tokens per prompt row with CFG (``model``: the unwrapped Janus model);
    with ``with_logp`` also the sampler's own log-prob of each (:func:`image_gen.sampling.sample_next`).
    ``use_cache=False`` re-runs the whole prefix every step: the reference the cached path is tested against."""
    batch = cond_ids.shape[0]
    device = model.model.generation_head.vision_head.weight.device
    prompt = model.get_input_embeddings()(torch.cat([cond_ids, uncond_ids]).to(device))
    mask = torch.cat([mask, mask]).to(device)
    scales = cfg_scales(num_tokens, cfg_scale, cfg_interval, device)
    cache = DynamicCache(config=model.config.text_config) if use_cache else None
    hidden = _last_hidden(model, prompt, mask, cache)
    tokens = torch.zeros(batch, 0, dtype=torch.long, device=device)
    logps = []
    for t in range(num_tokens):
        logits = model.model.generation_head(hidden).float()
        guided = cfg_logits(logits[:batch], logits[batch:], scales[t])
        nxt, logp = sample_next(guided, temperature, top_k, top_p, generator, with_logp)
        logps.append(logp)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        if t + 1 == num_tokens:
            break
        mask = torch.cat([mask, mask.new_ones(2 * batch, 1)], dim=1)
        if use_cache:
            step = model.prepare_embeddings_for_image_generation(torch.cat([nxt, nxt])[:, None])
            hidden = _last_hidden(model, step.to(prompt.dtype), mask, cache)
        else:
            image = model.prepare_embeddings_for_image_generation(torch.cat([tokens, tokens]))
            hidden = _last_hidden(model, torch.cat([prompt, image.to(prompt.dtype)], dim=1), mask)
    return SampledTokens(tokens, torch.stack(logps, 1) if with_logp else None)


def _trim_left_padding(ids: Tensor, uncond: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Drop columns that are padding in every row (a micro-batch may hold only short prompts)."""
    first = int(mask.any(0).long().argmax())
    return ids[:, first:], uncond[:, first:], mask[:, first:]


class JanusImagePolicy:
    """Samples Janus image-token sequences with classifier-free guidance and scores them.

    ``logprob_mode``: ``cond`` scores the conditional distribution (AR-GRPO / T2I-R1's choice), ``cfg`` the
    guided one the tokens were actually sampled from (on-policy; gradients reach both branches).
    ``record_sampler_logp`` (off by default) fills ``Rollout.sampler_logp`` with the log-prob of each token
    under the guided, tempered, filtered distribution it was drawn from (0 when greedy), for TIS/MIS."""

    def __init__(self, model: torch.nn.Module, processor, cfg_scale: float = 5.0,
                 cfg_interval: tuple[float, float] = (0.0, 1.0), logprob_mode: str = "cond",
                 use_cache: bool = True, logprob_chunk_size: int = 1024, decode_batch_size: int = 8,
                 prompt_template: str = PROMPT_TEMPLATE, record_sampler_logp: bool = False):
        self.cfg_interval = check_guidance(cfg_scale, cfg_interval, logprob_mode)
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)  # a JanusProcessor or a bare tokenizer
        self.cfg_scale = cfg_scale
        self.logprob_mode = logprob_mode
        self.use_cache = use_cache
        self.logprob_chunk_size = logprob_chunk_size
        self.decode_batch_size = decode_batch_size
        self.prompt_template = prompt_template
        self.record_sampler_logp = record_sampler_logp
        self.tokens = special_tokens(model, self.tokenizer)
        self.num_tokens = num_image_tokens(model)

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, records: list[dict], group_size: int, sampling: Sampling) -> Rollout:
        for i, record in enumerate(records):
            if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
                raise ValueError(f"record {i}: Janus needs a text 'prompt', got {record.get('prompt')!r}")
        repeat = torch.arange(len(records)).repeat_interleave(group_size)
        cond, uncond, mask = encode_prompts(self.tokenizer, [r["prompt"] for r in records], self.tokens,
                                            self.prompt_template)
        cond, uncond, mask = cond[repeat], uncond[repeat], mask[repeat]
        tokens, sampler_logp = sample_janus_tokens(
            unwrap_model(model), cond, uncond, mask, self.num_tokens, self.cfg_scale, self.cfg_interval,
            sampling.temperature, sampling.top_k, sampling.top_p, use_cache=self.use_cache,
            with_logp=self.record_sampler_logp)
        tokens = tokens.cpu()
        keys = dict.fromkeys(k for record in records for k in record if k not in INPUT_KEYS)
        return Rollout(
            completion_ids=tokens, completion_mask=torch.ones_like(tokens),
            inputs=SampleInputs(tensors={"prompt_ids": cond, "uncond_ids": uncond, "prompt_mask": mask},
                                pad_values={"prompt_ids": self.tokens.pad, "uncond_ids": self.tokens.pad,
                                            "prompt_mask": 0}),
            prompts=[records[i]["prompt"] for i in repeat.tolist()],
            columns={k: [records[i].get(k) for i in repeat.tolist()] for k in keys}, group_size=group_size,
            truncated=torch.zeros(tokens.shape[0], dtype=torch.bool),
            sampler_logp=None if sampler_logp is None else sampler_logp.cpu(),
            temperature=sampling.temperature if sampling.temperature > 0 else 1.0)

    def _hidden(self, model: torch.nn.Module, prompt_ids: Tensor, mask: Tensor, ids: Tensor) -> Tensor:
        """Teacher-forced final hidden states that predict ``ids`` [N, T]: one forward over
        ``[prompt embeds; image-token embeds of ids[:, :-1]]`` through ``model`` (the possibly wrapped
        module, so DDP sees the forward). ``logits_to_keep=1``: the text head runs on one position only."""
        inner = unwrap_model(model)
        prompt = inner.get_input_embeddings()(prompt_ids)
        image = inner.prepare_embeddings_for_image_generation(ids[:, :-1]).to(prompt.dtype)
        full_mask = torch.cat([mask, mask.new_ones(ids.shape[0], ids.shape[1] - 1)], dim=1)
        out = model(inputs_embeds=torch.cat([prompt, image], dim=1), attention_mask=full_mask,
                    position_ids=positions(full_mask), output_hidden_states=True, logits_to_keep=1, use_cache=False)
        return out.hidden_states[-1][:, prompt_ids.shape[1] - 1:]

    def log_probs(self, model: torch.nn.Module, rollout: Rollout,
                  with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
        inner = unwrap_model(model)
        head = inner.model.generation_head
        device = head.vision_head.weight.device
        ids = rollout.completion_ids.to(device)
        tensors = rollout.inputs.tensors
        cond, uncond, mask = _trim_left_padding(tensors["prompt_ids"], tensors["uncond_ids"], tensors["prompt_mask"])
        cond, uncond, mask = cond.to(device), uncond.to(device), mask.to(device)
        if self.logprob_mode == "cond":
            hidden = self._hidden(model, cond, mask, ids)
            return token_logprobs(hidden, ids, head, rollout.temperature, self.logprob_chunk_size, with_entropy)
        # cfg: cond and uncond rows in one forward, mixed into the guided logits chunk by chunk
        hidden = self._hidden(model, torch.cat([cond, uncond]), torch.cat([mask, mask]), torch.cat([ids, ids]))
        return guided_token_logprobs(hidden, ids, head, self.cfg_scale, self.cfg_interval, rollout.temperature,
                                     self.logprob_chunk_size, with_entropy)

    @torch.no_grad()
    def decode(self, rollout: Rollout) -> list[Tensor]:
        """Images [3, H, W] in [0, 1], one per sample, through Janus' VQ decoder (in slices: at 384 px the
        decoder's activations dominate memory)."""
        vq = unwrap_model(self.model).model.vqmodel
        device = vq.post_quant_conv.weight.device
        images = []
        for part in rollout.completion_ids.split(self.decode_batch_size):
            pixels = vq.decode(part.to(device)).float()
            images.extend(((pixels.clamp(-1, 1) + 1) / 2).cpu())
        return images

    def save_pretrained(self, model: torch.nn.Module, path: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """HF format: ``JanusForConditionalGeneration.from_pretrained(path)`` and :func:`load_janus` read it.
        ``state_dict``: the whole weights of a sharded model (see :class:`mmrl.policy.Policy`)."""
        unwrap_model(model).save_pretrained(path, **({} if state_dict is None else {"state_dict": state_dict}))
        self.processor.save_pretrained(path)


def num_image_tokens(model: torch.nn.Module) -> int:
    """Image tokens per image (576 for Janus-Pro's 384-px, 24×24 grid); the VQ decoder needs the full grid."""
    config = unwrap_model(model).config
    count = config.vision_config.num_image_tokens
    grid = config.vq_config.num_patches
    if count != grid * grid:
        raise ValueError(f"vision_config.num_image_tokens={count} but the VQ decodes a {grid}x{grid} grid "
                         f"(vision image_size / patch_size); they must agree")
    return count


def load_processor(name_or_path: str):
    """The ``JanusProcessor`` without torchvision: its image processor resolves to the PIL backend
    (``JanusImageProcessorPil``) when torchvision is missing. A directory with a tokenizer only (e.g. an
    mmrl checkpoint of a model built from a config) gives that tokenizer — all generation needs."""
    try:
        return JanusProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError, TypeError, AttributeError):
        return AutoTokenizer.from_pretrained(name_or_path)


def load_janus(name_or_path: str, dtype: str | torch.dtype = "bfloat16",
               device: str | torch.device | None = None) -> tuple[JanusForConditionalGeneration, object]:
    """``(model, processor)`` from a hub id (e.g. ``deepseek-community/Janus-Pro-1B``, the transformers-format
    conversion — not ``deepseek-ai/Janus-Pro-1B``, which needs DeepSeek's own code) or a local directory."""
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    model = JanusForConditionalGeneration.from_pretrained(name_or_path, dtype=torch_dtype)
    if device is not None:
        model.to(device)
    return model, load_processor(name_or_path)


def freeze_understanding_and_vq(model: JanusForConditionalGeneration) -> None:
    """Image generation never runs the understanding encoder (SigLIP + aligner); the VQ only decodes and is
    frozen in Janus. Without gradients they take no optimizer state, and DDP sees no unused parameters."""
    for module in (model.model.vision_model, model.model.aligner, model.model.vqmodel):
        module.requires_grad_(False)


def build_janus_policy(name_or_path: str, cfg_scale: float = 5.0, logprob_mode: str = "cond",
                       cfg_interval: tuple[float, float] = (0.0, 1.0), use_cache: bool = True,
                       logprob_chunk_size: int = 1024, dtype: str | torch.dtype = "bfloat16",
                       device: str | torch.device | None = None, decode_batch_size: int = 8) -> JanusImagePolicy:
    """Load Janus and wrap it as a trainable policy (``model.backend: janus``)."""
    model, processor = load_janus(name_or_path, dtype=dtype, device=device)
    freeze_understanding_and_vq(model)
    return JanusImagePolicy(model, processor, cfg_scale, cfg_interval, logprob_mode, use_cache, logprob_chunk_size,
                            decode_batch_size)
