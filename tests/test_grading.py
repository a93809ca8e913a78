"""Hand-written tables for benchmark answer extraction and grading in :mod:`vision.grading`."""

from __future__ import annotations

import pytest

from vision.grading import ANSWER_TYPES, Grade, extract_choice_letter, extract_final_answer, grade

CM = ["10 cm", "12 cm", "2 cm", "14 cm"]  # "2 cm" is a substring of "12 cm" but not a word match

# --------------------------------------------------------------------------- extract_final_answer


@pytest.mark.parametrize(
    "output, expected",
    [
        (r"so the result is \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),  # nested braces
        (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}"),
        (r"first \boxed{1}, then \boxed{2}", "2"),  # several boxed: the last wins
        (r"The answer is \boxed 5", "5"),  # TeX's brace-less argument
        (r"$\boxed{\text{Paris}}$", "Paris"),  # \text{} around the whole answer is dropped
        (r"\boxed{\text{12 cm}}.", "12 cm"),
        ("<think>2+2</think><answer> 4 </answer>", "4"),
        ("<answer>1</answer> no, <answer>2.</answer>", "2"),  # last tag, trailing period stripped
        (r"<answer>x</answer> but \boxed{y}", "y"),  # \boxed outranks the tag
        ("The final answer is $\\frac{3}{4}$.", r"\frac{3}{4}"),  # $...$ and period stripped
        ("Hence the answer is 12 cm.", "12 cm"),
        ("The answer is 5. So we are done.", "5"),  # the sentence ends the answer
        ("The answer is 3.5 cm", "3.5 cm"),  # a decimal point does not end it
        ("**Answer:** 12", "12"),
        ("Reasoning...\nAnswer:\n(B) 12 cm", "(B) 12 cm"),  # answer on the next line
        ("Answer: 3\nWait, recheck.\nAnswer: 4", "4"),  # the last phrasing wins
        ("I don't know.", None),
        ("The triangle has sides 3, 4 and 5.", None),  # numbers in prose are not an answer
        (r"\boxed{}", None),  # an empty box is no answer
        ("", None),
    ],
)
def test_extract_final_answer(output, expected):
    assert extract_final_answer(output) == expected


# --------------------------------------------------------------------------- extract_choice_letter


@pytest.mark.parametrize(
    "output, expected",
    [
        ("B", "B"),
        ("b", "B"),  # lower case only as the whole answer
        ("(B)", "B"),
        ("B.", "B"),
        ("B)", "B"),
        ("B:", "B"),
        ("The answer is B", "B"),
        ("The answer is (C).", "C"),
        (r"\boxed{B}", "B"),
        ("<answer>D</answer>", "D"),
        ("Answer: (B) 12 cm", "B"),
        ("B. 12 cm", "B"),
        ("The answer is A because the base is shortest.", "A"),  # connective after the letter
        ("The correct option is (D)", "D"),
        ("12 cm", "B"),  # the text of a choice
        ("<answer>12 cm</answer>", "B"),
        ("I measured it: 2 cm", "C"),  # "2 cm" found as a word sequence, "12 cm" not
        ("A triangle has three sides, so the side is 12 cm.", "B"),  # article "A" is not option A
        ("A triangle has three sides.", None),
        ("Answer: A triangle", None),  # "A" before a lower-case word is the article
        ("(A) 10 cm (B) 12 cm (C) 2 cm (D) 14 cm", None),  # an echoed option list picks nothing
        ("It is either 10 cm or 14 cm.", None),  # text of two options: ambiguous
        ("Option A is out; comparing option B and option C ...", None),  # options walked through
        ("E", None),  # not one of the four letters
        ("The answer is 13 cm", None),
        ("", None),
    ],
)
def test_extract_choice_letter(output, expected):
    assert extract_choice_letter(output, CM) == expected


def test_extract_choice_letter_exact_text_beats_substring_and_prefixed_options():
    choices = ["A. red", "B. dark red", "C. blue"]  # stored with their letters
    assert extract_choice_letter("dark red", choices) == "B"  # exact, though "red" is inside it
    assert extract_choice_letter("It is red.", choices) == "A"
    assert extract_choice_letter("The colour is dark red, not blue", choices) is None  # two options


def test_extract_choice_letter_custom_letters():
    assert extract_choice_letter("(2)", ["x", "y"], letters="12") == "2"
    assert extract_choice_letter("The answer is C", ["x", "y"]) is None  # letters default to A, B


# --------------------------------------------------------------------------- grade


@pytest.mark.parametrize(
    "output, answer, answer_type, kwargs, extracted, correct",
    [
        # numbers: fractions vs decimals
        (r"\boxed{0.5}", r"\frac{1}{2}", "number", {}, "0.5", True),
        (r"\boxed{\frac{1}{2}}", "0.5", "number", {}, r"\frac{1}{2}", True),
        ("The answer is 1/2.", "0.5", "number", {}, "1/2", True),
        (r"\boxed{\dfrac{3}{4}}", "0.75", "number", {}, r"\dfrac{3}{4}", True),
        (r"\boxed{\tfrac34}", "3/4", "number", {}, r"\tfrac34", True),
        (r"\boxed{-\frac{1}{2}}", "-0.5", "number", {}, r"-\frac{1}{2}", True),
        (r"\boxed{0.33}", "1/3", "number", {}, "0.33", False),  # outside rel 1e-4
        # numbers: units
        ("The answer is 12 cm.", "12", "number", {}, "12 cm", True),
        (r"\boxed{45^\circ}", "45", "number", {}, r"45^\circ", True),
        (r"\boxed{45^{\circ}}", "45°", "number", {}, r"45^{\circ}", True),
        (r"\boxed{\$3.50}", "3.5", "number", {}, r"\$3.50", True),
        ("Answer: $3.50", "3.5", "number", {}, "$3.50", True),
        (r"\boxed{30\%}", "30", "number", {}, r"30\%", True),
        (r"\boxed{30\%}", "0.3", "number", {}, r"30\%", True),  # a percentage read either way
        (r"\boxed{24 cm^2}", "24", "number", {}, "24 cm^2", True),  # the "2" of cm^2 is no number
        (r"\boxed{24 \text{m}^{2}}", "24", "number", {"unit": "m^2"}, r"24 \text{m}^{2}", True),
        (r"\boxed{2x^2}", "2", "number", {}, "2x^2", False),  # an exponent is not the answer
        (r"\boxed{1,000}", "1000", "number", {}, "1,000", True),
        # numbers: MathVista precision (Python's round, as MathVista's scorer: round(1.45, 1) == 1.4)
        (r"\boxed{1.4500001}", "1.45", "number", {"precision": 2}, "1.4500001", True),
        (r"\boxed{1.46}", "1.45", "number", {"precision": 2}, "1.46", False),
        (r"\boxed{1.45}", "1.5", "number", {"precision": 1}, "1.45", False),
        (r"\boxed{1.46}", "1.5", "number", {"precision": 1}, "1.46", True),
        (r"\boxed{1.44}", "1.5", "number", {"precision": 1}, "1.44", False),
        (r"\boxed{3.0}", "3", "number", {"precision": 0}, "3.0", True),
        # math: symbolic equivalence
        (r"\boxed{\frac{1}{2}}", "0.5", "math", {}, r"\frac{1}{2}", True),
        (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}", "math", {}, r"\frac{\sqrt{2}}{2}", True),
        (r"\boxed{x^2+2x+1}", "(x+1)^2", "math", {}, "x^2+2x+1", True),
        (r"\boxed{2\pi}", r"\boxed{2\pi}", "math", {}, r"2\pi", True),  # gold stored boxed
        (r"\boxed{3}", "4", "math", {}, "3", False),
        # text
        (r"\boxed{\text{Blue}}", "blue", "text", {}, "Blue", True),
        ("The answer is Paris.", "paris", "text", {}, "Paris", True),
        ("blue", "red", "text", {}, "blue", False),  # a short bare output is the answer
        # lists
        (r"\boxed{[1, 2, 3]}", "1,2,3", "list", {}, "[1, 2, 3]", True),
        (r"\boxed{0.5, 2}", r"\frac{1}{2}, 2", "list", {}, "0.5, 2", True),
        (r"\boxed{1, 2}", "2, 1", "list", {}, "1, 2", False),  # order matters
        (r"\boxed{1, 2}", "1, 2, 3", "list", {}, "1, 2", False),
        (r"\boxed{cat, Dog}", "[cat, dog]", "list", {}, "cat, Dog", True),
        (r"\boxed{1.449, 2}", "1.45, 2", "list", {"precision": 2}, "1.449, 2", True),
        # choices: gold as a letter or as the option's text
        ("The answer is (B)", "B", "choice", {"choices": CM}, "B", True),
        ("The answer is (B)", "12 cm", "choice", {"choices": CM}, "B", True),
        ("12 cm", "B", "choice", {"choices": CM}, "B", True),
        ("Answer: C", "(B)", "choice", {"choices": CM}, "C", False),
        ("A triangle has three sides.", "A", "choice", {"choices": CM}, None, False),
        ("The answer is D.", "D", "choice", {}, "D", True),  # no choices: letters A..J
        # no answer at all
        ("I cannot determine this from the image, sorry about that.", "5", "number", {}, None, False),
        ("Let me think step by step about this long problem", "5", "math", {}, None, False),
        ("", "cat", "text", {}, None, False),
    ],
)
def test_grade(output, answer, answer_type, kwargs, extracted, correct):
    assert grade(output, answer, answer_type, **kwargs) == Grade(extracted, correct)


def test_grade_unknown_answer_type_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"'integer'.*choice, number, math, text, list"):
        grade("5", "5", "integer")
    assert ANSWER_TYPES == ("choice", "number", "math", "text", "list")


def test_grade_choice_gold_not_among_options_compares_text():
    # A data error (gold not an option) must not crash an evaluation run: texts are compared.
    assert grade("<answer>purple</answer>", "purple", "choice", choices=["red", "blue"]).correct
    assert not grade("<answer>red</answer>", "purple", "choice", choices=["red", "blue"]).correct


def test_grade_precision_stored_as_float():
    assert grade(r"\boxed{1.4500001}", "1.45", "number", precision=2.0).correct
    assert grade(r"\boxed{1.4500001}", "1.45", "number", precision=float("nan")).correct  # NaN: none


def test_grade_is_frozen():
    g = grade(r"\boxed{1}", "1", "number")
    with pytest.raises(AttributeError):
        g.correct = False  # type: ignore[misc]
