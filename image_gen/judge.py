"""VLM-as-judge reward: a Qwen-VL model from :mod:`vision` is asked a yes/no question about each generated
image, and the reward is P(yes) — the two halves of the package working together.

The probability is read off the judge's next-token distribution after the chat prompt, renormalised over
the first token of "yes" and of "no" (both capitalisations), so it is in [0, 1] whatever else the model
would have said. Images are batched: one forward pass per ``batch_size`` images.

Time limit: the judge runs no generation loop of its own — one forward pass per batch, called by
:func:`mmrl.rewards.compute_rewards` like every reward — so each call is bounded by that per-call timeout
(``reward_timeout``, 300 s by default; :data:`mmrl.rewards.DEFAULT_REWARD_TIMEOUT_S` for callers that pass
none). A call that times out cannot be stopped: it finishes on its daemon thread (holding the judge's device
memory meanwhile) while the batch's judge rewards count as missing, and the judge is not called again until
it returns, so two forward passes never overlap.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from mmrl.rewards import register_reward_factory
from vision.modeling import VisionModelConfig, load_model_and_processor, pixel_bounds, resize_image

DEFAULT_QUESTION = 'Does this image show "{prompt}"? Answer yes or no.'


def _to_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    tensor = torch.as_tensor(image).detach().float().cpu()
    if tensor.dim() == 3 and tensor.shape[0] == 3:
        tensor = tensor.permute(1, 2, 0)
    return Image.fromarray((tensor.clamp(0, 1) * 255).round().byte().numpy())


class VLMJudgeReward:
    """``fn(prompts, completions, **kw) -> list[float]``: P(yes) from a Qwen-VL judge per image.

    Bounded in time by the caller's per-call reward timeout (see the module docstring)."""

    def __init__(self, model_name_or_path: str, question: str = DEFAULT_QUESTION, batch_size: int = 16,
                 device: str | None = None, min_pixels: int = 56 * 56, max_pixels: int = 448 * 448):
        if "{prompt}" not in question:
            raise ValueError("the judge question must contain '{prompt}' (where the generation prompt goes)")
        self.model, self.processor = load_model_and_processor(
            VisionModelConfig(name_or_path=model_name_or_path, min_pixels=min_pixels, max_pixels=max_pixels))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device).eval().requires_grad_(False)
        self.question = question
        self.batch_size = batch_size
        tokenizer = self.processor.tokenizer
        yes = set(self._first_tokens(tokenizer, ("yes", "Yes", " yes", " Yes")))
        no = set(self._first_tokens(tokenizer, ("no", "No", " no", " No")))
        # A first token both words share (e.g. a lone space in a small vocabulary) says nothing either way.
        self.yes_ids, self.no_ids = sorted(yes - no), sorted(no - yes)
        if not self.yes_ids or not self.no_ids:
            raise ValueError("the judge's tokenizer gives 'yes' and 'no' no distinct first token")
        ip = self.processor.image_processor
        self.bounds, self.factor = pixel_bounds(ip), ip.patch_size * ip.merge_size
        self.__name__ = "vlm_judge"

    @staticmethod
    def _first_tokens(tokenizer, words: tuple[str, ...]) -> list[int]:
        return sorted({tokenizer.encode(w, add_special_tokens=False)[0] for w in words})

    @torch.no_grad()
    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(completions), self.batch_size):
            texts, images = [], []
            for prompt, image in zip(prompts[start:start + self.batch_size], completions[start:start + self.batch_size]):
                message = [{"role": "user", "content": [
                    {"type": "image"}, {"type": "text", "text": self.question.format(prompt=prompt)}]}]
                texts.append(self.processor.apply_chat_template(message, tokenize=False, add_generation_prompt=True))
                images.append(resize_image(_to_pil(image), *self.bounds, self.factor))
            batch = self.processor(text=texts, images=images, return_tensors="pt", padding=True).to(self.device)
            logits = self.model(**batch, logits_to_keep=1).logits[:, -1].float()  # left padding: last = next
            yes = torch.logsumexp(logits[:, self.yes_ids], -1)
            no = torch.logsumexp(logits[:, self.no_ids], -1)
            scores.extend(torch.sigmoid(yes - no).tolist())  # P(yes | yes or no)
        return scores


@register_reward_factory("vlm_judge")
def vlm_judge(model: str, question: str = DEFAULT_QUESTION, batch_size: int = 16, device: str | None = None,
              min_pixels: int = 56 * 56, max_pixels: int = 448 * 448) -> VLMJudgeReward:
    """Config: ``{name: vlm_judge, args: {model: Qwen/Qwen2.5-VL-7B-Instruct, question: "..."}}``."""
    return VLMJudgeReward(model, question, batch_size, device, min_pixels, max_pixels)
