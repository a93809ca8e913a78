"""A local model as a judge: claim extraction and verification for the factuality reward
(:class:`ModelJudgeVerifier`) and free-form answer extraction for ``mmrl eval --judge`` (:func:`judge_answers`).

A *judge* is any callable ``judge(texts, images) -> list[str]``: one reply per prompt, ``images[i]`` a PIL
image or None (text only). :class:`LocalJudge` is one: a Qwen-VL model loaded through
:func:`vision.modeling.load_model_and_processor` (a hub id, a local directory or ``tiny-qwen2.5-vl``),
greedy decoding, batched. Tests pass plain functions.

Judges are asked for strict formats ("- claim" lines or NONE; yes / no; "ANSWER: ..."), and whatever does
not follow the format is *garbage*: that description or answer gets no verdict (None), it is never guessed.
A reward built on a judge therefore returns None for it (a missing reward, counted by
:func:`mmrl.rewards.compute_rewards`); a judge that raises or exceeds ``timeout_s`` takes out the whole batch
the same way, and training goes on.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from mmrl.rewards import call_with_timeout
from vision.claims import Verdict

Judge = Callable[[list[str], list[Image.Image | None]], list[str]]

EXTRACT_PROMPT = ("List every atomic factual claim the following description makes about the image, one per "
                  "line, each line starting with '- '. If it makes no claim, reply NONE.\n\nDescription: {text}")
VERIFY_PROMPT = "Is this claim about the image true? Claim: {claim}\nAnswer yes or no."
RELEVANCE_PROMPT = ("Does this description talk about what the image shows? Description: {text}\n"
                    "Answer yes or no.")
ANSWER_PROMPT = ("Here is a response to a question.\n\nResponse: {text}\n\nWhat final answer does the response "
                 "give? Reply with 'ANSWER: ' followed by the answer alone, or 'ANSWER: NONE' if it gives none.")
_ANSWER_RE = re.compile(r"^\s*ANSWER:\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)


class LocalJudge:
    """A local Qwen-VL model as a :data:`Judge`: greedy replies of at most ``max_new_tokens`` tokens,
    ``batch_size`` prompts per ``generate`` call (prompts with and without an image in separate calls)."""

    def __init__(self, model: str, batch_size: int = 8, max_new_tokens: int = 128, device: str | None = None,
                 min_pixels: int = 56 * 56, max_pixels: int = 448 * 448):
        from vision.modeling import VisionModelConfig, load_model_and_processor, pixel_bounds

        self.model, self.processor = load_model_and_processor(
            VisionModelConfig(name_or_path=model, min_pixels=min_pixels, max_pixels=max_pixels))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # generation appends on the right: prompts must end together
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        ip = self.processor.image_processor
        self.bounds, self.factor = pixel_bounds(ip), ip.patch_size * ip.merge_size
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id

    @torch.no_grad()
    def _generate(self, texts: list[str], images: list[Image.Image] | None) -> list[str]:
        from vision.modeling import resize_image

        chats = [self.processor.apply_chat_template(
            [{"role": "user", "content": ([{"type": "image"}] if images else []) + [{"type": "text", "text": t}]}],
            tokenize=False, add_generation_prompt=True) for t in texts]
        pictures = [resize_image(im.convert("RGB"), *self.bounds, self.factor) for im in images] if images else None
        batch = self.processor(text=chats, images=pictures, return_tensors="pt", padding=True).to(self.device)
        out = self.model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False,
                                  pad_token_id=self.pad_id)
        return self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)

    def __call__(self, texts: list[str], images: list[Image.Image | None]) -> list[str]:
        replies: list[str] = [""] * len(texts)
        for with_image in (True, False):
            idx = [i for i, im in enumerate(images) if (im is not None) == with_image]
            for start in range(0, len(idx), self.batch_size):
                part = idx[start:start + self.batch_size]
                out = self._generate([texts[i] for i in part], [images[i] for i in part] if with_image else None)
                for i, reply in zip(part, out, strict=True):
                    replies[i] = reply
        return replies


@functools.lru_cache(maxsize=4)
def _load_local(model: str, batch_size: int, max_new_tokens: int) -> LocalJudge:
    return LocalJudge(model, batch_size, max_new_tokens)


def get_judge(judge: str | Judge, batch_size: int = 8, max_new_tokens: int = 128) -> Judge:
    """A callable judge as is; a model name or path loaded once per process (cached) as a :class:`LocalJudge`."""
    return judge if callable(judge) else _load_local(str(judge), batch_size, max_new_tokens)


def _ask(judge: Judge, texts: list[str], images: list[Image.Image | None], timeout_s: float | None) -> list[str]:
    """Replies of ``judge``, within ``timeout_s`` (raises :class:`mmrl.rewards.RewardTimeout`); a reply list
    of the wrong length or type is a broken judge (ValueError), not garbage to be skipped item by item."""
    if not texts:
        return []
    replies = call_with_timeout(judge, timeout_s, (texts, images), {})
    if not isinstance(replies, (list, tuple)) or len(replies) != len(texts):
        raise ValueError(f"the judge returned {type(replies).__name__} for {len(texts)} prompts")
    return [r if isinstance(r, str) else "" for r in replies]


def parse_claim_list(reply: str) -> list[str] | None:
    """Claims of an extraction reply: its "- " lines; [] for NONE; None for anything else (garbage)."""
    lines = [line.strip() for line in reply.strip().splitlines() if line.strip()]
    if lines and lines[0].strip(" .").upper() == "NONE":
        return []
    claims = [line[1:].strip() for line in lines if line.startswith(("-", "*")) and line[1:].strip()]
    return claims or None


def parse_yes_no(reply: str) -> bool | None:
    """True / False for a reply starting with yes / no, None for anything else."""
    words = re.findall(r"[a-z]+", reply.lower())
    return {"yes": True, "no": False}.get(words[0]) if words else None


class ModelJudgeVerifier:
    """:class:`vision.claims.Verifier` through a judge: it extracts each description's claims (text only),
    checks each claim against the image (yes / no), and says whether the description is about the image
    (relevance 1 or 0). Every stage is batched over the whole call. The image of a row comes from
    ``images``; without one the judge answers from the text alone. A description whose replies break the
    format gets None."""

    def __init__(self, judge: str | Judge, batch_size: int = 8, max_new_tokens: int = 128,
                 timeout_s: float | None = None):
        self.judge = get_judge(judge, batch_size, max_new_tokens)
        self.timeout_s = timeout_s

    def verify(self, descriptions: Sequence[str], scenes: Sequence[dict[str, Any] | None],
               images: Sequence[Image.Image | None]) -> list[Verdict | None]:
        texts, images = list(descriptions), list(images)
        extracted = [parse_claim_list(r) for r in _ask(
            self.judge, [EXTRACT_PROMPT.format(text=t) for t in texts], [None] * len(texts), self.timeout_s)]
        pairs = [(i, c) for i, claims in enumerate(extracted) if claims for c in claims]
        checks = [parse_yes_no(r) for r in _ask(
            self.judge, [VERIFY_PROMPT.format(claim=c) for _, c in pairs], [images[i] for i, _ in pairs],
            self.timeout_s)]
        relevant = [parse_yes_no(r) for r in _ask(
            self.judge, [RELEVANCE_PROMPT.format(text=t) for t in texts], images, self.timeout_s)]
        verdicts: list[Verdict | None] = []
        for i, claims in enumerate(extracted):
            mine = [ok for (j, _), ok in zip(pairs, checks, strict=True) if j == i]
            if claims is None or relevant[i] is None or any(ok is None for ok in mine):
                verdicts.append(None)
            else:
                verdicts.append(Verdict(tuple(claims), tuple(bool(ok) for ok in mine), float(relevant[i])))
        return verdicts


def judge_answers(judge: Judge, outputs: Sequence[str], timeout_s: float | None = None) -> list[str | None]:
    """The final answer the judge reads in each output, or None (it says NONE, or replies garbage)."""
    replies = _ask(judge, [ANSWER_PROMPT.format(text=o) for o in outputs], [None] * len(outputs), timeout_s)
    answers: list[str | None] = []
    for reply in replies:
        match = _ANSWER_RE.search(reply)
        answer = match.group(1).strip() if match else None
        answers.append(None if answer is None or answer.upper().strip(" .") == "NONE" else answer)
    return answers


def judge_grades(judge: str | Judge | None, outputs: Sequence[str], grades: list, regrade: Callable[[str], Any],
                 timeout_s: float | None = None) -> tuple[list, list[bool]]:
    """``mmrl eval --judge``: rules first, the judge only where they found no answer (``extracted`` None).
    An answer the judge reads is graded by ``regrade`` as ``<answer>X</answer>`` and marked judged; a judge
    reply without an answer leaves the rule grade (no answer: wrong). Returns (grades, judged flags);
    ``judge`` None: the grades as they are."""
    todo = [i for i, g in enumerate(grades) if g.extracted is None] if judge is not None else []
    judged = [False] * len(grades)
    if not todo:
        return grades, judged
    grades = list(grades)
    answers = judge_answers(get_judge(judge), [outputs[i] for i in todo], timeout_s)
    for i, answer in zip(todo, answers, strict=True):
        if answer is not None:
            grades[i], judged[i] = regrade(f"<answer>{answer}</answer>"), True
    return grades, judged
