"""Verifiable rewards for VLM reasoning: answer extraction, format checks, math / numeric /
multiple-choice accuracy, and the R1-style ``0.9 * accuracy + 0.1 * format`` combination.

Importing this module registers (see :func:`mmrl.rewards.register_reward`):

* ``"format"`` — ``<think>...</think>`` then ``<answer>...</answer>``, nothing after;
* ``"format_answer"`` — optional free text, then exactly one ``<answer>...</answer>`` at the end;
* ``"format_boxed"`` — exactly one non-empty ``\\boxed{...}``;
* ``"accuracy"`` — normalised string equality, else symbolic equivalence with math-verify;
* ``"numeric"`` — number parsed from the answer, ``rel_tol=1e-4`` / ``abs_tol=1e-6``;
* ``"multiple_choice"`` — option letter (or option text mapped through a ``choices`` column);
* ``"r1_default"`` / ``"r1_default_boxed"`` — ``0.9 * accuracy + 0.1 * format`` (resp. ``format_boxed``).

Every function has TRL's signature ``fn(prompts, completions, **columns) -> list[float | None]``;
the ground truth comes from the ``answer`` column (or ``solution``). A wrong, empty or unparseable
prediction scores 0.0; only a missing ground truth gives ``None`` (missing, ignored by the trainer).

The prediction of a completion is :func:`extract_answer` of its text; when the completion has neither
an ``<answer>`` block nor a ``\\boxed{}``, a completion of at most :data:`SHORT_ANSWER_CHARS`
characters counts as the bare answer (a model that simply replies "42" is right), while a longer one
has no answer and scores 0 — we do not guess which number inside free-form reasoning was meant.
"""

from __future__ import annotations

import math
import re
import threading
from typing import Any

import math_verify
from math_verify.errors import TimeoutException

from mmrl.rewards import register_reward

SHORT_ANSWER_CHARS = 20
MATH_VERIFY_TIMEOUT_S = 5  # per parse / per comparison; math-verify's signal.alarm takes whole seconds
FORMAT_WEIGHT = 0.1  # EasyR1's default format weight

# --- text extraction ---------------------------------------------------------------------------


def completion_text(completion: Any) -> str:
    """Text of a completion: a plain string, or TRL's conversational form (a list of
    ``{"role", "content"}`` messages whose content is a string or a list of ``{"type": "text"}``
    parts). Non-text parts are ignored; several messages are joined with newlines."""
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):  # a single message
        completion = [completion]
    texts = []
    for message in completion:
        content = message.get("content", "") if isinstance(message, dict) else message
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(
                p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text"
            )
    return "\n".join(texts)


def matching_brace(text: str, open_index: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_index``, else None. Escaped characters are skipped:
    ``\\{`` and ``\\}`` are literal braces, not grouping."""
    depth, i = 0, open_index
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _boxed_spans(text: str) -> list[str | None]:
    """Content of every ``\\boxed{...}`` in order, ``None`` for one whose braces never close."""
    out: list[str | None] = []
    for match in re.finditer(r"\\boxed\s*\{", text):
        close = matching_brace(text, match.end() - 1)
        out.append(None if close is None else text[match.end():close])
    return out


def extract_boxed(text: str) -> str | None:
    """Stripped content of the last well-formed ``\\boxed{...}`` (nested braces allowed), else None."""
    for content in reversed(_boxed_spans(text)):
        if content is not None:
            return content.strip()
    return None


_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(text: str) -> str | None:
    """The last ``<answer>...</answer>`` block (stripped; a ``\\boxed{}`` inside it is unwrapped),
    else the last ``\\boxed{...}``, else None."""
    blocks = _ANSWER_RE.findall(text)
    if blocks:
        answer = blocks[-1]
        boxed = extract_boxed(answer)
        return boxed if boxed is not None else answer.strip()
    return extract_boxed(text)


def _prediction(completion: Any) -> str | None:
    text = completion_text(completion)
    answer = extract_answer(text)
    if answer is None:
        stripped = text.strip()
        if 0 < len(stripped) <= SHORT_ANSWER_CHARS:
            return stripped
    return answer


def _ground_truth(kwargs: dict[str, Any], n: int) -> list[Any]:
    for key in ("answer", "solution"):
        if key in kwargs and kwargs[key] is not None:
            column = kwargs[key]
            if len(column) != n:
                raise ValueError(f"column {key!r} has {len(column)} values for {n} completions")
            return list(column)
    # Raising (not returning Nones) makes the misconfiguration visible: compute_rewards logs it.
    raise KeyError(f"ground truth column 'answer' (or 'solution') not found; columns: {sorted(kwargs)}")


def _gold_text(gold: Any) -> str | None:
    """Ground truth as a string; a ``solution`` holding tags or ``\\boxed{}`` is reduced to its answer."""
    if gold is None or (isinstance(gold, float) and math.isnan(gold)):
        return None
    text = str(gold).strip()
    extracted = extract_answer(text)
    text = extracted if extracted is not None else text
    return text or None


# --- format rewards ----------------------------------------------------------------------------
_TAG_FREE = r"(?:(?!</?think>|</?answer>).)*"  # no nested / repeated tags inside a block
_THINK_ANSWER_RE = re.compile(
    rf"\s*<think>{_TAG_FREE}</think>\s*<answer>({_TAG_FREE})</answer>\s*", re.DOTALL
)
_FINAL_ANSWER_RE = re.compile(r"(?:(?!</?answer>).)*<answer>((?:(?!</?answer>).)*)</answer>\s*", re.DOTALL)


def _regex_format(regex: re.Pattern, completions: list) -> list[float | None]:
    # group(1) is the answer: a well-formed but empty answer block does not count as formatted.
    matches = [regex.fullmatch(completion_text(c)) for c in completions]
    return [1.0 if m and m.group(1).strip() else 0.0 for m in matches]


@register_reward("format")
def format_think_answer(prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
    """1.0 for ``<think>...</think> <answer>...</answer>`` and nothing else around them (whitespace
    allowed). The think block may be empty; the answer must not be."""
    return _regex_format(_THINK_ANSWER_RE, completions)


@register_reward("format_answer")
def format_answer(prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
    """1.0 when the completion ends with its only, non-empty ``<answer>...</answer>`` block, optionally
    preceded by free reasoning — for models that are not trained to emit ``<think>``."""
    return _regex_format(_FINAL_ANSWER_RE, completions)


@register_reward("format_boxed")
def format_boxed(prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
    """1.0 when the completion has exactly one ``\\boxed{...}``, well-formed and non-empty."""
    spans = [_boxed_spans(completion_text(c)) for c in completions]
    return [1.0 if len(s) == 1 and (s[0] or "").strip() else 0.0 for s in spans]


# --- accuracy ----------------------------------------------------------------------------------

_WRAPPER_RE = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf)\s*\{([^{}]*)\}")


def normalize_answer(text: str) -> str:
    """Loose canonical form for string equality: ``\\text{}``-like wrappers and surrounding ``$``
    removed, trailing period dropped, whitespace collapsed, lower-cased."""
    text = text.strip()
    while len(text) >= 2 and text.startswith("$") and text.endswith("$"):
        text = text[1:-1].strip()
    for _ in range(3):  # innermost first, so nested wrappers such as \text{\textbf{x}} disappear too
        text = _WRAPPER_RE.sub(r"\1", text)
    text = re.sub(r"\s+", " ", text).strip().rstrip(".").strip()
    return text.lower()


_PLAIN_WORDS_RE = re.compile(r"[a-z]+(?: [a-z]+)*")


def _latex_wrap(text: str) -> str:
    # math-verify's LaTeX extraction is anchored on $...$ / \(...\) / \boxed; bare text gets wrapped.
    if "$" in text or "\\(" in text or "\\[" in text or "\\boxed" in text:
        return text
    return f"${text}$"


def answers_match(prediction: str, gold: str, timeout_seconds: int | None = MATH_VERIFY_TIMEOUT_S) -> bool:
    """True if ``prediction`` equals ``gold`` after :func:`normalize_answer`, or math-verify finds them
    equivalent (``\\frac{1}{2}`` == ``0.5``). Never raises: any math-verify error counts as a mismatch.

    math-verify enforces its timeouts with ``signal.alarm``, which only works in the main thread;
    ``compute_rewards`` may call rewards from a worker thread, so there the signal timeouts are turned
    off (``None``) and the bound on run time is ``compute_rewards``' own per-function timeout.
    """
    pred_norm, gold_norm = normalize_answer(prediction), normalize_answer(gold)
    if pred_norm == gold_norm:
        return True
    if not prediction.strip():
        return False
    if _PLAIN_WORDS_RE.fullmatch(pred_norm) and _PLAIN_WORDS_RE.fullmatch(gold_norm):
        # Words are not maths: math-verify reads "blue" as the product b·l·u·e and would accept "lube".
        return False
    if threading.current_thread() is not threading.main_thread():
        timeout_seconds = None
    try:
        gold_parsed = math_verify.parse(_latex_wrap(gold), parsing_timeout=timeout_seconds)
        pred_parsed = math_verify.parse(_latex_wrap(prediction), parsing_timeout=timeout_seconds)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(math_verify.verify(gold_parsed, pred_parsed, timeout_seconds=timeout_seconds))
    except (Exception, TimeoutException):  # TimeoutException derives from BaseException, not Exception
        return False


@register_reward("accuracy")
def accuracy(prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
    """1.0 if the extracted answer matches the ``answer`` (or ``solution``) column, see
    :func:`answers_match`; 0.0 if not or if there is no answer; None where the ground truth is None."""
    golds = _ground_truth(kwargs, len(completions))
    out: list[float | None] = []
    for c, g in zip(completions, golds, strict=True):
        gold = _gold_text(g)
        if gold is None:
            out.append(None)
            continue
        pred = _prediction(c)
        out.append(1.0 if pred is not None and answers_match(pred, gold) else 0.0)
    return out


# --- numeric -----------------------------------------------------------------------------------
_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?"
_NUMBER_RE = re.compile(rf"(?<![\w.])([-+]?)({_UNSIGNED})(?:\s*/\s*({_UNSIGNED}))?(\s*%)?(?![\w.])")


def parse_number(text: Any) -> tuple[float, bool] | None:
    """``(value, is_percent)`` of the number in ``text``, or None.

    Accepts ``3``, ``3.0``, ``-2``, ``1,000`` (thousands separators), ``1/2``, ``\\frac{1}{2}``,
    ``1e-3``, ``50%`` (value 50, ``is_percent``). If the whole text is not a number but contains exactly
    one (``"3 apples"``, ``"x = 5"``), that one is used; with several numbers it is ambiguous → None.
    """
    if isinstance(text, bool) or text is None:
        return None
    if isinstance(text, (int, float)):
        return (float(text), False) if math.isfinite(text) else None
    s = normalize_answer(str(text))
    s = s.replace("\u2212", "-").replace("\\!", "").replace("\\,", "").replace("{,}", ",")
    s = s.replace("\\%", "%").replace("\\$", "")
    s = re.sub(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"\1/\2", s)
    s = re.sub(r"(?<![\w.])([-+])\s+(?=[\d.])", r"\1", s)
    matches = list(_NUMBER_RE.finditer(s))
    if len(matches) != 1:
        return None
    sign, num, den, pct = matches[0].groups()
    try:
        value = float(num.replace(",", ""))
        if den is not None:
            value /= float(den.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None
    value = -value if sign == "-" else value
    return (value, pct is not None) if math.isfinite(value) else None


def _number_candidates(parsed: tuple[float, bool]) -> tuple[float, ...]:
    # "50%" is read as either 50 or 0.5: datasets disagree on whether a percentage answer is stored
    # as "50" or "0.5", and both readings of a percent sign are legitimate.
    value, is_percent = parsed
    return (value, value / 100.0) if is_percent else (value,)


def numbers_match(prediction: Any, gold: Any, rel_tol: float = 1e-4, abs_tol: float = 1e-6) -> bool | None:
    """Numeric equality with tolerance; None if ``gold`` has no number, False if ``prediction`` has none."""
    gold_parsed = parse_number(gold)
    if gold_parsed is None:
        return None
    pred_parsed = parse_number(prediction)
    if pred_parsed is None:
        return False
    return any(
        math.isclose(p, g, rel_tol=rel_tol, abs_tol=abs_tol)
        for p in _number_candidates(pred_parsed)
        for g in _number_candidates(gold_parsed)
    )


@register_reward("numeric")
def numeric(prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
    """1.0 if the number in the extracted answer equals the gold number (rel 1e-4, abs 1e-6), see
    :func:`parse_number`; 0.0 for a wrong or unparseable prediction; None if the gold is no number."""
    golds = _ground_truth(kwargs, len(completions))
    out: list[float | None] = []
    for c, g in zip(completions, golds, strict=True):
        gold = g if isinstance(g, (int, float)) and not isinstance(g, bool) else _gold_text(g)
        pred = _prediction(c)
        match = numbers_match(pred, gold) if gold is not None else None
        out.append(None if match is None else float(match))
    return out


# --- multiple choice ---------------------------------------------------------------------------
_OPTION_PREFIX_RE = re.compile(r"^\s*\(?[A-Za-z]\)?\s*[.:)]\s*|^\s*\([A-Za-z]\)\s*")


def _options(choices: Any) -> dict[str, str]:
    """``{letter: normalised option text}`` from a list of options or a ``{letter: text}`` dict."""
    if isinstance(choices, dict):
        items = [(str(k).strip().upper(), v) for k, v in choices.items()]
    elif isinstance(choices, (list, tuple)):
        items = [(chr(ord("A") + i), v) for i, v in enumerate(choices[:26])]
    else:
        return {}
    # Options are often stored as "A. cat" / "(A) cat"; compare on the bare text.
    return {k: normalize_answer(_OPTION_PREFIX_RE.sub("", str(v), count=1)) for k, v in items}


def extract_choice(answer: str, letters: str = "ABCDE", options: dict[str, str] | None = None) -> str | None:
    """Option letter named by ``answer``: ``B``, ``(B)``, ``B.``, ``B) text``, ``The answer is B``,
    ``\\boxed{B}``, or the text of an option in ``options`` (``{letter: normalised text}``)."""
    text = answer.strip()
    boxed = extract_boxed(text)
    text = boxed if boxed is not None else text
    norm = normalize_answer(text)
    cls = f"[{letters}]"
    # A bare letter may be lower-case; inside sentences only upper-case letters are read as options,
    # so that words like "a" are not mistaken for option A.
    match = re.fullmatch(rf"\(?({cls})\)?\s*[.:)]?", norm.upper())
    if match:
        return match.group(1)
    for letter, option_text in (options or {}).items():
        if option_text and norm == option_text:
            return letter
    plain = _WRAPPER_RE.sub(r"\1", text).strip().strip("$").strip()
    match = re.match(rf"(?:\(({cls})\)|({cls})\s*[.:)])(?:\s|$)", plain)
    if match:
        return match.group(1) or match.group(2)
    # Only the keyword is case-insensitive: "the answer is a triangle" must not read as option A.
    matches = re.findall(rf"(?i:answer|option|choice)\s*(?:is|:)?\s*:?\s*\(?({cls})\)?(?![A-Za-z])", plain)
    return matches[-1] if matches else None


@register_reward("multiple_choice")
def multiple_choice(prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
    """1.0 if the chosen option equals the gold option. The gold is a letter or an option's text; an
    optional ``choices`` / ``options`` column (list of option strings, or ``{letter: text}``) maps option
    text to letters on both sides. Without it, a text gold is compared to the text answer."""
    golds = _ground_truth(kwargs, len(completions))
    choices_col = kwargs.get("choices", kwargs.get("options"))
    out: list[float | None] = []
    for i, (c, g) in enumerate(zip(completions, golds, strict=True)):
        gold = _gold_text(g)
        if gold is None:
            out.append(None)
            continue
        options = _options(choices_col[i]) if choices_col is not None else {}
        letters = "".join(k for k in sorted(options) if len(k) == 1 and k.isalpha()) or "ABCDE"
        pred = _prediction(c)
        if pred is None:
            out.append(0.0)
            continue
        gold_letter = extract_choice(gold, letters, options)
        pred_letter = extract_choice(pred, letters, options)
        if gold_letter is not None:
            out.append(1.0 if pred_letter == gold_letter else 0.0)
        else:  # free-text gold that is not one of the options: compare texts
            out.append(1.0 if normalize_answer(pred) == normalize_answer(gold) else 0.0)
    return out


# --- combined ----------------------------------------------------------------------------------


def _combine(acc: list[float | None], fmt: list[float | None]) -> list[float | None]:
    w = FORMAT_WEIGHT
    return [None if a is None else (1 - w) * a + w * (f or 0.0) for a, f in zip(acc, fmt, strict=True)]


@register_reward("r1_default")
def r1_default(prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
    """EasyR1's default reward shape: ``0.9 * accuracy + 0.1 * format`` with the think/answer format,
    so values are 0, 0.1, 0.9 or 1.0; None (missing) where the ground truth is missing."""
    return _combine(
        accuracy(prompts, completions, **kwargs), format_think_answer(prompts, completions, **kwargs)
    )


@register_reward("r1_default_boxed")
def r1_default_boxed(prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
    """``0.9 * accuracy + 0.1 * format_boxed`` — for prompts that ask for the answer in ``\\boxed{}``."""
    return _combine(accuracy(prompts, completions, **kwargs), format_boxed(prompts, completions, **kwargs))
