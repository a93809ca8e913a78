"""Hand-computed tables for the verifiable VLM rewards in :mod:`vision.rewards`."""

from __future__ import annotations

import concurrent.futures
import math
import threading

import pytest

import vision.rewards as vr
from mmrl.rewards import available_rewards, compute_rewards, get_reward

NAMES = [
    "format",
    "format_answer",
    "format_boxed",
    "accuracy",
    "numeric",
    "multiple_choice",
    "r1_default",
    "r1_default_boxed",
]


def call(fn, completions, **columns):
    return fn([None] * len(completions), completions, **columns)


# --------------------------------------------------------------------------- registry


def test_registered_by_name():
    from mmrl.rewards import get_reward as get

    assert get("r1_default") is vr.r1_default
    assert get("format") is vr.format_think_answer
    for name in NAMES:
        assert name in available_rewards()
        assert callable(get_reward(name))


# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        (r"\boxed{a^{2}+b^{2}}", "a^{2}+b^{2}"),
        (r"first \boxed{1}, then \boxed{2}", "2"),  # several: the last
        (r"\boxed{1} and a broken \boxed{2", "1"),  # unclosed last one is skipped
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces are not grouping
        (r"\boxed{ 7 }", "7"),
        ("no box here", None),
    ],
)
def test_extract_boxed(text, expected):
    assert vr.extract_boxed(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>x</think><answer> 3 </answer>", "3"),
        ("<answer>1</answer> wait <answer>2</answer>", "2"),  # the last block
        (r"<answer>it is \boxed{4}</answer>", "4"),  # boxed inside answer is unwrapped
        (r"<answer>5</answer> \boxed{6}", "5"),  # <answer> wins over \boxed
        (r"reasoning \boxed{\frac{3}{4}}", r"\frac{3}{4}"),
        ("<answer>unclosed", None),
        ("<answer></answer>", ""),
        ("just text", None),
    ],
)
def test_extract_answer(text, expected):
    assert vr.extract_answer(text) == expected


def test_completion_text_forms():
    assert vr.completion_text("plain") == "plain"
    assert vr.completion_text([{"role": "assistant", "content": "hi"}]) == "hi"
    parts = [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}]
    assert vr.completion_text([{"role": "assistant", "content": parts}]) == "a\nb"
    assert vr.completion_text(None) == ""


# --------------------------------------------------------------------------- format


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>a</think><answer>1</answer>", 1.0),
        ("  <think>\nsteps\n</think>\n\n<answer> 1 </answer>\n", 1.0),  # whitespace around/between
        ("<think></think><answer>1</answer>", 1.0),  # empty think is allowed
        ("<think>a<answer>1</answer>", 0.0),  # missing </think>
        ("<think>a</think><answer>1", 0.0),  # missing </answer>
        ("<think>a</think><answer>1</answer> extra", 0.0),  # text after the answer
        ("intro <think>a</think><answer>1</answer>", 0.0),  # text before the think
        ("<think>a</think><answer>  </answer>", 0.0),  # empty answer
        ("<think>a</think><answer>1</answer><answer>2</answer>", 0.0),  # two answers
        ("<think>a</think>b<answer>1</answer>", 0.0),  # text between
        ("<answer>1</answer>", 0.0),
    ],
)
def test_format_think_answer(text, expected):
    assert call(vr.format_think_answer, [text]) == [expected]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("some reasoning <answer>1</answer>", 1.0),
        ("<answer>1</answer>\n", 1.0),
        ("<think>x</think><answer>1</answer>", 1.0),
        ("<answer>1</answer> and more", 0.0),
        ("<answer>1</answer><answer>2</answer>", 0.0),
        ("<answer></answer>", 0.0),
        ("no tags", 0.0),
    ],
)
def test_format_answer(text, expected):
    assert call(vr.format_answer, [text]) == [expected]


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{3}", 1.0),
        (r"\boxed{\frac{1}{2}}", 1.0),
        (r"\boxed{}", 0.0),
        (r"\boxed{1} or \boxed{2}", 0.0),
        (r"\boxed{3", 0.0),
        ("3", 0.0),
    ],
)
def test_format_boxed(text, expected):
    assert call(vr.format_boxed, [text]) == [expected]


# --------------------------------------------------------------------------- accuracy

LONG_NO_ANSWER = "I computed many things and I believe the result is probably 42 in the end."

ACCURACY_TABLE = [
    ("<answer>0.5</answer>", r"\frac{1}{2}", 1.0),  # decimal vs fraction
    (r"\boxed{\frac{1}{2}}", "0.5", 1.0),  # nested braces, fraction vs decimal
    (r"\boxed{\dfrac{1}{2}}", "1/2", 1.0),
    (r"first \boxed{1} then \boxed{2}", "2", 1.0),  # the last boxed
    (r"first \boxed{1} then \boxed{2}", "1", 0.0),
    ("<answer>\\text{Paris}.</answer>", "paris", 1.0),  # normalised strings
    ("<answer>$3$</answer>", 3, 1.0),  # int ground truth
    ("<answer>x^2 + 1</answer>", "$x^2+1$", 1.0),
    ("<answer>1,000</answer>", "1000", 1.0),
    ("<answer>5</answer>", "6", 0.0),
    ("<answer></answer>", "1", 0.0),
    ("<answer>\\frac{</answer>", "1", 0.0),  # unparseable prediction is wrong, not missing
    ("42", "42", 1.0),  # short bare completion counts as the answer
    (LONG_NO_ANSWER, "42", 0.0),  # long completion without answer: no answer
    ("", "1", 0.0),
    ("<answer>2</answer>", None, None),  # missing ground truth
    ("<answer>2</answer>", float("nan"), None),
]


@pytest.mark.parametrize("completion, gold, expected", ACCURACY_TABLE)
def test_accuracy_table(completion, gold, expected):
    assert call(vr.accuracy, [completion], answer=[gold]) == [expected]


def test_accuracy_solution_column_and_extra_columns():
    out = call(
        vr.accuracy, [r"\boxed{4}", "<answer>5</answer>"], solution=["<answer>4</answer>"] * 2, foo=[1, 2]
    )
    assert out == [1.0, 0.0]


def test_accuracy_missing_column_raises():
    with pytest.raises(KeyError):
        call(vr.accuracy, ["<answer>1</answer>"], question=["q"])


def test_accuracy_conversational():
    completions = [
        [{"role": "assistant", "content": "<think>t</think><answer>0.25</answer>"}],
        [{"role": "assistant", "content": [{"type": "text", "text": r"\boxed{\frac{1}{4}}"}]}],
        [{"role": "assistant", "content": [{"type": "text", "text": r"\boxed{3}"}]}],
    ]
    assert call(vr.accuracy, completions, answer=["1/4"] * 3) == [1.0, 1.0, 0.0]
    assert call(vr.format_think_answer, completions) == [1.0, 0.0, 0.0]


def _accuracy_in_thread(completions, golds):
    assert threading.current_thread() is not threading.main_thread()
    return call(vr.accuracy, completions, answer=golds)


def test_accuracy_in_worker_thread():
    # These pairs need math-verify (no string match): signal-based timeouts would fail off the main thread.
    completions = [
        r"\boxed{\frac{1}{2}}",
        "<answer>0.5</answer>",
        "<answer>0.3</answer>",
        "<answer>2</answer>",
    ]
    golds = ["0.5", r"\frac{1}{2}", r"\frac{1}{3}", None]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(_accuracy_in_thread, completions, golds) for _ in range(4)]
        results = [f.result(timeout=60) for f in futures]
    assert results == [[1.0, 1.0, 0.0, None]] * 4


def test_compute_rewards_with_timeout_runs_in_thread():
    completions = [
        "<think>a</think><answer>0.5</answer>",
        r"\boxed{\frac{1}{2}}",
        "<think>b</think><answer>7</answer>",
    ]
    out = compute_rewards(
        [get_reward("accuracy"), get_reward("format")],
        [1.0, 1.0],
        [None] * 3,
        completions,
        columns={"answer": [r"\frac{1}{2}", "0.5", "8"]},
        timeout=60,
    )
    assert out.per_function.tolist() == [[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]]
    assert not out.failures


# --------------------------------------------------------------------------- numeric

NUMERIC_TABLE = [
    ("<answer>3.0</answer>", "3", 1.0),
    ("<answer>1/2</answer>", "0.5", 1.0),
    (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
    ("<answer>1,000</answer>", "1000", 1.0),
    ("<answer>50%</answer>", "0.5", 1.0),  # a percent reads as 50 or 0.5
    ("<answer>50%</answer>", "50", 1.0),
    ("<answer>0.5</answer>", "50%", 1.0),
    ("<answer>-2</answer>", "2", 0.0),
    ("<answer>-2</answer>", "-2", 1.0),
    ("<answer>3.00003</answer>", "3", 1.0),  # within rel_tol 1e-4
    ("<answer>3.001</answer>", "3", 0.0),
    ("<answer>0.0000005</answer>", "0", 1.0),  # within abs_tol 1e-6
    ("<answer>3 apples</answer>", "3", 1.0),  # exactly one number in the answer
    ("<answer>1 or 3</answer>", "3", 0.0),  # ambiguous
    ("<answer>seven</answer>", "7", 0.0),  # unparseable prediction
    (LONG_NO_ANSWER, "42", 0.0),
    (r"\boxed{12}", 12, 1.0),  # numeric ground truth
    ("<answer>3</answer>", "three", None),  # unparseable gold
    ("<answer>3</answer>", None, None),
]


@pytest.mark.parametrize("completion, gold, expected", NUMERIC_TABLE)
def test_numeric_table(completion, gold, expected):
    assert call(vr.numeric, [completion], answer=[gold]) == [expected]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("3", (3.0, False)),
        ("-2", (-2.0, False)),
        ("1,000", (1000.0, False)),
        ("1/2", (0.5, False)),
        (r"-\frac{3}{4}", (-0.75, False)),
        ("50%", (50.0, True)),
        (r"50\%", (50.0, True)),
        ("1e-3", (0.001, False)),
        ("1,2", None),
        ("1/0", None),
        ("", None),
    ],
)
def test_parse_number(text, expected):
    assert vr.parse_number(text) == expected


# --------------------------------------------------------------------------- multiple choice


@pytest.mark.parametrize(
    "answer",
    ["B", "(B)", "B.", "b", "B) cat", "(B) cat", "The answer is B", "Answer: (B)", r"\boxed{B}", r"\text{B}"],
)
def test_multiple_choice_letter_forms(answer):
    assert call(vr.multiple_choice, [f"<answer>{answer}</answer>"], answer=["B"]) == [1.0]


CHOICES = ["dog", "cat", "bird"]
MC_TABLE = [
    # completion, gold, choices, expected
    ("<answer>cat</answer>", "B", CHOICES, 1.0),  # option text → letter
    ("<answer>Cat.</answer>", "B", CHOICES, 1.0),
    ("<answer>dog</answer>", "B", CHOICES, 0.0),
    ("<answer>cat</answer>", "B", None, 0.0),  # no choices: text cannot be mapped
    ("<answer>B</answer>", "cat", CHOICES, 1.0),  # gold given as option text
    ("<answer>A</answer>", "cat", CHOICES, 0.0),
    ("<answer>cat</answer>", "cat", ["A. dog", "B. cat"], 1.0),  # prefixed options
    ("<answer>Cat</answer>", "cat", None, 1.0),  # text gold, no choices: text compare
    ("<answer>the answer is a triangle</answer>", "A", None, 0.0),  # "a" is not option A
    ("<answer>C</answer>", "B", None, 0.0),
    (LONG_NO_ANSWER, "B", None, 0.0),
    ("no", "B", None, 0.0),
    ("<answer>B</answer>", None, None, None),
]


@pytest.mark.parametrize("completion, gold, choices, expected", MC_TABLE)
def test_multiple_choice_table(completion, gold, choices, expected):
    columns = {"answer": [gold]}
    if choices is not None:
        columns["choices"] = [choices]
    assert call(vr.multiple_choice, [completion], **columns) == [expected]


def test_multiple_choice_options_column_and_dict():
    out = call(vr.multiple_choice, ["<answer>bird</answer>"], answer=["C"], options=[CHOICES])
    assert out == [1.0]
    out = call(vr.multiple_choice, ["<answer>cat</answer>"], answer=["B"], choices=[{"A": "dog", "B": "cat"}])
    assert out == [1.0]


# --------------------------------------------------------------------------- combined

R1_COMPLETIONS = [
    "<think>t</think><answer>0.5</answer>",  # right, formatted
    r"the answer is \boxed{\frac{1}{2}}",  # right, no think/answer format
    "<think>t</think><answer>3</answer>",  # wrong, formatted
    "no idea, really no idea at all whatsoever",  # wrong, unformatted
    "<think>t</think><answer>0.5</answer>",  # missing gold
]
R1_GOLDS = ["1/2", "1/2", "1/2", "1/2", None]


def test_r1_default_values():
    out = call(vr.r1_default, R1_COMPLETIONS, answer=R1_GOLDS)
    assert out[:4] == pytest.approx([1.0, 0.9, 0.1, 0.0])
    assert out[4] is None
    acc = call(vr.accuracy, R1_COMPLETIONS, answer=R1_GOLDS)
    fmt = call(vr.format_think_answer, R1_COMPLETIONS, answer=R1_GOLDS)
    for value, a, f in zip(out[:4], acc[:4], fmt[:4], strict=True):
        assert math.isclose(value, 0.9 * a + 0.1 * f)


def test_r1_default_boxed_values():
    out = call(vr.r1_default_boxed, R1_COMPLETIONS, answer=R1_GOLDS)
    assert out[:4] == pytest.approx([0.9, 1.0, 0.0, 0.0])
    assert out[4] is None


def test_words_are_not_compared_as_algebra():
    """math-verify reads a word as a product of symbols ("blue" = b·l·u·e = "lube"); words must match as words."""
    from vision.rewards import answers_match

    assert not answers_match("lube", "blue")
    assert not answers_match("<answer>der</answer>", "red")
    assert answers_match("Blue.", "blue")
    assert answers_match("x + 1", "1 + x")  # expressions still go through math-verify
