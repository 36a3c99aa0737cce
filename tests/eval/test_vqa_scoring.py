"""VQA answer normalisation and accuracy on tables of hand-checked cases."""

import pytest

from eval.vqa import normalize_answer, vqa_accuracy


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Red", "red"),                      # case
        ("  blue  ", "blue"),                # outer whitespace
        ("big   red\tcircle", "big red circle"),  # inner whitespace
        ("the circle", "circle"),            # articles
        ("A cat, an apple", "cat apple"),
        ("yes.", "yes"),                     # punctuation
        ("top-left!", "top left"),
        ("what's", "whats"),                 # apostrophes vanish rather than split the word
        ("it\u2019s", "its"),
        ("two", "2"),                        # number words become digits
        ("Three.", "3"),
        ("zero", "0"),
        ("twenty", "20"),
        ("2", "2"),                          # digits stay digits
        ("1,000", "1000"),                   # thousands separator
        ("2.5", "2.5"),                      # a decimal point is kept
        ("there is 1.", "there is 1"),       # a full stop after a number is not
        ("theatre", "theatre"),              # "the" only goes as a whole word
    ],
)
def test_normalize_answer(raw, normalised):
    assert normalize_answer(raw) == normalised


# prediction, answer, exact match, normalised match
CASES = [
    ("red", "red", True, True),
    ("Red", "red", False, True),
    (" red ", "red", True, True),            # exact match compares stripped strings
    ("2", "two", False, True),
    ("two circles", "2 circles", False, True),
    ("a square", "square", False, True),
    ("square.", "square", False, True),
    ("blue", "red", False, False),
    ("3", "2", False, False),
    ("red circle", "red", False, False),
]


@pytest.mark.parametrize(("prediction", "answer", "exact", "normalised"), CASES)
def test_single_answers(prediction, answer, exact, normalised):
    scores = vqa_accuracy([prediction], [answer])
    assert scores["exact_match"] == float(exact) and scores["accuracy"] == float(normalised)


def test_overall_and_per_type():
    predictions = [p for p, *_ in CASES]
    answers = [a for _, a, *_ in CASES]
    types = ["colour", "colour", "colour", "count", "count", "shape", "shape", "colour", "count", "colour"]
    scores = vqa_accuracy(predictions, answers, types)
    # From the CASES table: 2 exact and 7 normalised matches of 10.
    assert scores["exact_match"] == pytest.approx(2 / 10) and scores["accuracy"] == pytest.approx(7 / 10)
    assert scores["num_questions"] == 10
    # colour: rows 1,2,3,8,10 -> exact 2/5 (rows 1, 3), normalised 3/5 (rows 1-3)
    # count: rows 4,5,9 -> exact 0/3, normalised 2/3; shape: rows 6,7 -> exact 0/2, normalised 2/2
    assert scores["per_type"] == {
        "colour": {"exact_match": pytest.approx(2 / 5), "accuracy": pytest.approx(3 / 5), "num_questions": 5},
        "count": {"exact_match": 0.0, "accuracy": pytest.approx(2 / 3), "num_questions": 3},
        "shape": {"exact_match": 0.0, "accuracy": 1.0, "num_questions": 2},
    }


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="pair up"):
        vqa_accuracy(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="question types"):
        vqa_accuracy(["a"], ["a"], ["colour", "count"])
