"""T5 caption features for text-conditional (t2i) LlamaGen models.

LlamaGen's T2I models are conditioned on the last hidden state of FLAN-T5-XL over a fixed window of
``max_length = 120`` tokens. We follow its conventions so official T2I checkpoints see the features they
were trained on:

* tokenised with T5's tokenizer (end-of-sequence token appended), cut at ``max_length`` tokens;
* **left padding**: the valid tokens' features sit at the *end* of the window, padded rows are zeros and
  the mask is ``False`` there (LlamaGen's T2I dataset and ``sample_t2i.py`` both right-align captions);
* the unconditional branch of classifier-free guidance uses the model's learned null caption with the
  *same* mask as its conditional row, as LlamaGen's sampler does (it is how caption dropout was trained).

LlamaGen also runs a caption-cleaning step (HTML, URLs, CJK punctuation) before T5; we pass text as is —
procedural prompts and ordinary captions do not need it.

A prompt longer than ``max_length`` tokens is truncated with a warning naming it; an empty prompt is an
error (the null caption is the model's, not the encoder's of an empty string).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)

LLAMAGEN_T5 = "google/flan-t5-xl"
LLAMAGEN_T5_MAX_LENGTH = 120
TEXT_ENCODER_FILE = "text_encoder.json"  # saved with a t2i model: which T5 it reads


def right_align(features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's valid (mask=True, assumed leading) tokens to the end of the window; zero the rest.

    ``features`` [B, L, D] right-padded as the tokenizer returns them, ``mask`` [B, L] bool. Vectorised:
    row b's valid count n_b shifts its tokens right by L - n_b (a gather with a per-row offset).
    """
    batch, length = mask.shape
    valid = mask.long().sum(1, keepdim=True)  # [B, 1]
    positions = torch.arange(length, device=mask.device).expand(batch, -1)
    source = positions - (length - valid)  # target position p takes source token p - (L - n)
    new_mask = source >= 0
    gathered = features.gather(1, source.clamp(min=0).unsqueeze(-1).expand(-1, -1, features.shape[-1]))
    return gathered * new_mask.unsqueeze(-1).to(features.dtype), new_mask


class T5TextEncoder:
    """Caption features [B, max_length, d_model] + mask [B, max_length] from a T5 encoder.

    ``name_or_path`` is a hub id (e.g. ``google/flan-t5-xl``, LlamaGen's) or a local directory holding a
    transformers ``T5EncoderModel`` / ``T5ForConditionalGeneration`` checkpoint and its tokenizer.
    The encoder is frozen; it runs under ``torch.no_grad`` in ``dtype`` (bf16 on GPU by default, as
    LlamaGen runs it).
    """

    def __init__(self, name_or_path: str = LLAMAGEN_T5, max_length: int = LLAMAGEN_T5_MAX_LENGTH,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 source: str | None = None) -> None:
        from transformers import AutoTokenizer, T5EncoderModel

        if max_length < 1:
            raise ValueError(f"text encoder max_length must be >= 1, got {max_length}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            self.model = T5EncoderModel.from_pretrained(name_or_path, dtype=dtype)
        except OSError as exc:
            raise OSError(f"could not load the T5 text encoder {name_or_path!r} (model.text_encoder): it must be "
                          "a hub id available offline in the cache or a local directory with a T5 checkpoint "
                          f"and its tokenizer ({exc})") from exc
        self.model.to(self.device).eval().requires_grad_(False)
        self.max_length = max_length
        self.dim = self.model.config.d_model
        self.source = source or name_or_path  # what a config named (e.g. "tiny"), recorded with saved models

    def _check(self, prompts: Sequence[str]) -> list[str]:
        texts = []
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"prompt {i} is empty ({prompt!r}): a text-conditional model needs a caption; "
                                 "for unconditional samples use CFG's null caption, not an empty prompt")
            texts.append(prompt)
        return texts

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features [B, max_length, d_model] (float32, on CPU) and bool mask [B, max_length], left-padded."""
        texts = self._check(prompts)
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=True)["input_ids"]]
        for text, n in zip(texts, lengths):
            if n > self.max_length:
                logger.warning("prompt has %d tokens, more than the text encoder's %d: truncated (%r)",
                               n, self.max_length, text[:80])
        batch = self.tokenizer(texts, max_length=self.max_length, padding="max_length", truncation=True,
                               add_special_tokens=True, return_tensors="pt").to(self.device)
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        features, mask = right_align(hidden.float(), batch["attention_mask"].bool())
        return features.cpu(), mask.cpu()
