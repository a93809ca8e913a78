"""Answer extraction and grading for benchmark evaluation (MathVista, MMMU, MathVerse, ...).

Training rewards (:mod:`vision.rewards`) score one completion against a format the prompt asked for;
benchmark grading must also cope with whatever a model writes when it ignores the format: a last
``\\boxed{}``, an ``<answer>`` block, "The answer is X", an option letter or the text of an option.

* :func:`extract_final_answer` — the final answer of a free-form output, or None;
* :func:`extract_choice_letter` — the option letter an output picks, or None;
* :func:`grade` — :class:`Grade` (extracted answer, correct) for one output and one gold answer, for each
  of :data:`ANSWER_TYPES`.

Parsing of numbers and math equivalence is shared with the rewards (:func:`vision.rewards.parse_number`,
:func:`vision.rewards.answers_match`), so training and evaluation agree on what "equal" means.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from vision.rewards import (
    MATH_VERIFY_TIMEOUT_S,
    SHORT_ANSWER_CHARS,
    answers_match,
    extract_boxed,
    matching_brace,
    normalize_answer,
    parse_number,
)

ANSWER_TYPES: tuple[str, ...] = ("choice", "number", "math", "text", "list")


@dataclass(frozen=True)
class Grade:
    extracted: str | None  # the answer pulled out of the output (None = no answer found)
    correct: bool


# --- final answer ------------------------------------------------------------------------------

_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
# "\boxed 5": TeX accepts a single token without braces; only used when no braced \boxed exists.
_BARE_BOXED_RE = re.compile(r"\\boxed\s+([^\s${}\\]+)")
# "The (final) answer is X", "Answer: X", "**Answer:** X": X runs to the end of its line.
_PHRASE_RE = re.compile(r"\banswer\b\s*(?:\*\*)?\s*(?:is\b\s*:?|:|=)\s*(?:\*\*)?\s*([^\n]*)", re.IGNORECASE)
_SENTENCE_END_RE = re.compile(r"\.\s")  # "5. So ..." ends the answer; "3.5" does not
_WRAP_CMD_RE = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox)\s*\{")


def _unwrap_whole(text: str) -> str:
    """``\\text{...}`` (and friends) removed when it wraps the *whole* answer, brace-matched."""
    match = _WRAP_CMD_RE.match(text)
    if match and matching_brace(text, match.end() - 1) == len(text) - 1:
        return text[match.end() : -1]
    return text


def _clean(text: str) -> str | None:
    """Answer without decoration: surrounding whitespace, ``**bold**``, ``$...$`` / ``\\(...\\)`` /
    ``\\[...\\]`` wrappers, a whole-answer ``\\text{}`` and trailing periods. None if nothing is left."""
    previous = None
    while text != previous:  # decorations nest in any order ("$\text{5}$.")
        previous = text
        text = text.strip().rstrip(".").strip()
        if len(text) >= 4 and text.startswith("**") and text.endswith("**"):
            text = text[2:-2]
        for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            inner = text[len(left) : -len(right)]
            if len(text) > len(left) + len(right) and text.startswith(left) and text.endswith(right):
                if "$" not in inner:  # "$3$ and $4$" is not one wrapped answer
                    text = inner
                    break
        text = _unwrap_whole(text)
    return text or None


def extract_final_answer(output: str) -> str | None:
    """The final answer of a free-form output: the last ``\\boxed{...}`` (nested braces fine; a bare
    ``\\boxed 5`` if no braced one), else the last ``<answer>...</answer>``, else the last "The (final)
    answer is X" / "Answer: X" (to the end of that sentence), else None. The result is cleaned of
    ``$...$``, a whole ``\\text{...}``, bold markers and trailing periods."""
    boxed = extract_boxed(output)
    if boxed is None:
        bare = _BARE_BOXED_RE.findall(output)
        boxed = bare[-1] if bare else None
    if boxed is not None:
        return _clean(boxed)
    tags = _ANSWER_TAG_RE.findall(output)
    if tags:
        return _clean(tags[-1])
    for match in reversed(list(_PHRASE_RE.finditer(output))):
        phrase = _SENTENCE_END_RE.split(match.group(1), maxsplit=1)[0]
        cleaned = _clean(phrase)
        if cleaned is not None:
            return cleaned
    return None


def _answer_or_short_output(output: str) -> str | None:
    # Benchmarks often prompt "answer with a single word or number": a short bare reply is the answer,
    # as in the training rewards; a longer one without markers has none (we do not guess).
    answer = extract_final_answer(output)
    if answer is None and 0 < len(output.strip()) <= SHORT_ANSWER_CHARS and "\n" not in output.strip():
        answer = _clean(output)
    return answer


# --- multiple choice ---------------------------------------------------------------------------

# After a bare letter: the end, punctuation, a connective ("B because ..."), or anything that is not a
# lower-case word. This is what rejects the article in "A triangle has three sides".
_LETTER_END = r"(?=\s*$|\s*[.,:;)\]!?*]|\s+(?:because|since|as|and|is|which|with|for|so|was)\b|\s+[^a-z\s])"
_KEYWORD_TAIL = r"(?:\s+(?:is|would be|should be)\b|\s*:)?\s*:?\s*(?:\*\*)?\s*"
_ANSWER_KEYWORD = r"(?i:\banswer)" + _KEYWORD_TAIL
_OPTION_KEYWORD = r"(?i:\b(?:option|choice))" + _KEYWORD_TAIL


def _letters(choices: list[str] | None, letters: str | None) -> str:
    if letters is not None:
        return letters.upper()
    count = len(choices) if choices else 10  # no choices given: A..J (MMMU-Pro has ten options)
    return "".join(chr(ord("A") + i) for i in range(min(count, 26)))


def _option_texts(choices: list[str] | None, letters: str) -> dict[str, str]:
    """``{letter: normalised option text}``; a stored "B. 12 cm" / "(B) 12 cm" prefix of the option's
    own letter is dropped so the text compares with what a model writes."""
    out: dict[str, str] = {}
    for letter, choice in zip(letters, choices or []):
        text = str(choice).strip()
        text = re.sub(rf"^(?:\({letter}\)|{letter}\s*[.:)])\s*", "", text, count=1, flags=re.IGNORECASE)
        out[letter] = normalize_answer(text)
    return out


def _exact_option(norm: str, options: dict[str, str]) -> str | None:
    exact = [letter for letter, option in options.items() if option and norm == option]
    return exact[0] if len(exact) == 1 else None  # two options with one text: no telling which


def _text_to_letter(text: str, options: dict[str, str]) -> str | None:
    """Letter of the option whose text ``text`` is (exact, normalised), else of the only option whose
    text occurs in ``text`` as a whole word sequence; None when none or several do."""
    norm = normalize_answer(text)
    exact = _exact_option(norm, options)
    if exact is not None:
        return exact
    found = {
        letter: option
        for letter, option in options.items()
        if option and re.search(rf"(?<![\w.]){re.escape(option)}(?![\w]|\.\d)", norm)
    }
    # "dark red" also contains option "red": an option inside another found option does not count.
    maximal = [k for k, v in found.items() if not any(v != w and v in w for w in found.values())]
    return maximal[0] if len(maximal) == 1 else None


def _read_letter(text: str, letters: str, options: dict[str, str]) -> str | None:
    cls = f"[{re.escape(letters)}]"
    stripped = text.strip()
    # 1. The whole answer is a letter ("B", "(b)", "B."): lower case is fine only here.
    whole = re.fullmatch(rf"\(?({cls})\)?\s*[.:)]?", stripped.upper())
    if whole:
        return whole.group(1)
    # 2. The whole answer is the text of one option.
    exact = _exact_option(normalize_answer(text), options)
    if exact is not None:
        return exact
    # Parenthesised letters anywhere; several different ones are an echoed option list, not an answer.
    parens = set(re.findall(rf"\(({cls})\)", text))
    # 3. A leading letter: "(B) 12 cm", "B. 12 cm", "B: ...", "B because ...".
    lead = re.match(rf"\s*(?:\(({cls})\)|({cls}){_LETTER_END})", text)
    if lead and parens <= {lead.group(1) or lead.group(2)}:
        return lead.group(1) or lead.group(2)
    # 4. "The answer is B" / "Answer: (D)" anywhere, the last one wins; else "option (C)" / "choice C"
    # if every mention names the same letter (reasoning that walks through options A..D names them all).
    for keyword, take_last in ((_ANSWER_KEYWORD, True), (_OPTION_KEYWORD, False)):
        keyed = [a or b for a, b in re.findall(rf"{keyword}(?:\(({cls})\)|({cls}){_LETTER_END})", text)]
        if keyed and (take_last or len(set(keyed)) == 1):
            return keyed[-1]
    # 5. Parenthesised letters, if they all name the same option.
    if len(parens) == 1:
        return parens.pop()
    # 6. The text of exactly one option.
    return _text_to_letter(text, options)


def extract_choice_letter(output: str, choices: list[str], letters: str | None = None) -> str | None:
    """The option letter an output picks, or None. Reads the final answer (:func:`extract_final_answer`)
    when there is one, else the whole output: a bare letter, "(B)", "B.", "B)", "B:", "The answer is B",
    "Answer: (B) 12 cm", or the text of one option ("12 cm"; an exact match beats a substring, and text
    naming several options is ambiguous). ``letters`` defaults to A, B, ... one per choice. A letter in
    prose is only read in an unambiguous position, so the article in "A triangle has ..." is no answer."""
    letters_ = _letters(choices, letters)
    options = _option_texts(choices, letters_)
    final = extract_final_answer(output)
    return _read_letter(final if final is not None else output, letters_, options)


# --- numbers -----------------------------------------------------------------------------------

_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|°|\^\s*\{?\s*o\s*\}?(?![\w])")
# A unit with a power ("cm^2", "m^{3}") holds a second number that would make parse_number ambiguous.
_POWER_UNIT_RE = re.compile(r"(?:(?<=[\d\s}])[a-z]{2,}|(?<=[\s/])[a-z])\s*\^\s*\{?\s*-?\d+\s*\}?\s*$")
_BRACELESS_FRAC_RE = re.compile(r"\\[dt]?frac\s*(\d)\s*(\d)")


def _strip_unit(text: str, unit: str | None) -> str:
    """``text`` without its unit: the given ``unit`` at the end, degree marks, and a unit with a power;
    a unit word without a power ("12 cm") needs no removal, parse_number reads the one number."""
    text = normalize_answer(text)
    if unit:
        unit_norm = normalize_answer(unit)
        if unit_norm and text.endswith(unit_norm):
            text = text[: -len(unit_norm)].strip()
    text = _DEGREE_RE.sub("", text)
    text = _POWER_UNIT_RE.sub("", text)
    return _BRACELESS_FRAC_RE.sub(r"\\frac{\1}{\2}", text).strip()


def _candidates(parsed: tuple[float, bool]) -> tuple[float, ...]:
    # Same reading of a percent sign as the rewards: "30%" is 30 or 0.3.
    value, is_percent = parsed
    return (value, value / 100.0) if is_percent else (value,)


def _rounded(value: float, precision: int) -> float:
    # Python's round(), as MathVista's scorer does (``round(float(x), precision)``), so numbers match
    # the published ones exactly — including its binary ties (round(1.45, 1) == 1.4).
    return round(value, precision)


def _number(text: str, unit: str | None) -> tuple[float, bool] | None:
    stripped = _strip_unit(text, unit)
    # A "^" left after unit removal is a power ("2x^2", "10^3"): parse_number would read the exponent.
    return None if "^" in stripped else parse_number(stripped)


def _numbers_equal(prediction: str, gold: str, precision: int | None, unit: str | None) -> bool:
    gold_parsed, pred_parsed = _number(gold, unit), _number(prediction, unit)
    if gold_parsed is None or pred_parsed is None:
        return False
    pairs = [(p, g) for p in _candidates(pred_parsed) for g in _candidates(gold_parsed)]
    if precision is None:  # the rewards' tolerance (vision.rewards.numbers_match)
        return any(math.isclose(p, g, rel_tol=1e-4, abs_tol=1e-6) for p, g in pairs)
    return any(_rounded(p, precision) == _rounded(g, precision) for p, g in pairs)


# --- lists -------------------------------------------------------------------------------------


def _list_items(text: str) -> list[str]:
    text = normalize_answer(text)
    if len(text) >= 2 and text[0] + text[-1] in ("[]", "()", "{}"):
        text = text[1:-1]
    elif text.startswith("\\{") and text.endswith("\\}"):
        text = text[2:-2]
    return [item.strip() for item in text.split(",")]


def _lists_equal(prediction: str, gold: str, precision: int | None, unit: str | None) -> bool:
    # Thousands separators cannot be told from list commas here: "1,000" is read as [1, 000].
    pred_items, gold_items = _list_items(prediction), _list_items(gold)
    if len(pred_items) != len(gold_items):
        return False
    for p, g in zip(pred_items, gold_items):
        if _number(g, unit) is not None:
            if not _numbers_equal(p, g, precision, unit):
                return False
        elif normalize_answer(p) != normalize_answer(g):
            return False
    return True


# --- grading -----------------------------------------------------------------------------------


def _gold(answer: str) -> str:
    """The gold answer as text; a gold stored as ``\\boxed{..}`` or ``<answer>..</answer>`` is unwrapped."""
    text = str(answer).strip()
    if "\\boxed" in text or "<answer>" in text.lower():
        return extract_final_answer(text) or text
    return _clean(text) or text


def _grade_choice(output: str, answer: str, choices: list[str] | None) -> Grade:
    letters = _letters(choices, None)
    options = _option_texts(choices, letters)
    predicted = extract_choice_letter(output, choices or [], letters)
    gold_letter = _read_letter(_gold(answer), letters, options)
    if gold_letter is None:
        # The gold is neither a letter nor one option's text (a data error or an open question among
        # choice items): compare the answer texts rather than fail the whole evaluation.
        text = _answer_or_short_output(output)
        correct = text is not None and normalize_answer(text) == normalize_answer(_gold(answer))
        return Grade(predicted if predicted is not None else text, correct)
    return Grade(predicted, predicted == gold_letter)


def grade(
    output: str,
    answer: str,
    answer_type: str,
    choices: list[str] | None = None,
    precision: int | None = None,
    unit: str | None = None,
    timeout_seconds: int = MATH_VERIFY_TIMEOUT_S,
) -> Grade:
    """Grade one model ``output`` against the gold ``answer``.

    ``answer_type`` is one of :data:`ANSWER_TYPES`:

    * ``"choice"`` — the option letter (:func:`extract_choice_letter`) equals the gold, given as a letter
      or as an option's text; ``Grade.extracted`` is the letter;
    * ``"number"`` — numeric equality (rel 1e-4), or equality after rounding both to ``precision``
      decimals (MathVista); units ("12 cm", "45°", "$3", "30%", or ``unit``) are dropped; "3/4",
      ``\\frac{3}{4}``, ``\\dfrac34`` and "0.75" are equal;
    * ``"math"`` — symbolic equivalence with math-verify (:func:`vision.rewards.answers_match`);
    * ``"text"`` — normalised, case-insensitive string equality;
    * ``"list"`` — comma-separated lists, equal length, compared element-wise (numbers as numbers).

    The answer graded is :func:`extract_final_answer` of the output, or a short (≤ 20 characters) bare
    output; with neither, ``Grade(None, False)``.
    """
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"unknown answer_type {answer_type!r}; valid: {', '.join(ANSWER_TYPES)}")
    if answer_type == "choice":
        return _grade_choice(output, answer, choices)
    if precision is not None:  # datasets store it as float64 (MathVista), NaN where it does not apply
        precision = None if isinstance(precision, float) and math.isnan(precision) else int(precision)
    extracted = _answer_or_short_output(output)
    if extracted is None:
        return Grade(None, False)
    gold = _gold(answer)
    if answer_type == "number":
        correct = _numbers_equal(extracted, gold, precision, unit)
    elif answer_type == "math":
        correct = answers_match(extracted, gold, timeout_seconds=timeout_seconds)
    elif answer_type == "text":
        correct = normalize_answer(extracted) == normalize_answer(gold)
    else:
        correct = _lists_equal(extracted, gold, precision, unit)
    return Grade(extracted, correct)
