"""Visual question answering: answers from a VLM, answer normalisation, and accuracy per question type.

Two scores per question: exact match (the stripped strings are equal) and normalised accuracy
(equal after `normalize_answer`, in the spirit of the VQA benchmark's answer processing: case,
punctuation, articles, number words and spacing do not count). Questions that come with a list of
human answers (VQAv2, TextVQA) are also scored by the official VQAv2 accuracy (`eval.vqav2_accuracy`).
"""

import csv
import json
import logging
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

from .generation import generate_texts
from .vqav2_accuracy import vqav2_accuracy, vqav2_scores

logger = logging.getLogger(__name__)

_NUMBER_WORDS = {
    word: str(value)
    for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split()
    )
}
_ARTICLES = {"a", "an", "the"}
_APOSTROPHES = str.maketrans({"'": "", "\u2019": "", "\u2018": ""})


def normalize_answer(text: str) -> str:
    """Canonical form of a short answer: "Two  dogs." -> "2 dogs", "the RED one" -> "red 1".

    Lowercase; thousands separators and decimal points between digits kept as numbers ("1,000" ->
    "1000", "2.5" stays); apostrophes dropped ("what's" -> "whats"); any other punctuation becomes
    a space; the articles a/an/the removed; number words zero..twenty written as digits; runs of
    spaces collapsed.
    """
    text = text.lower().translate(_APOSTROPHES)
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)
    # every punctuation mark but a decimal point between digits, and the underscore \w lets through
    text = re.sub(r"(?!(?<=\d)\.(?=\d))[^\w\s]|_", " ", text)
    return " ".join(_NUMBER_WORDS.get(word, word) for word in text.split() if word not in _ARTICLES)


def vqa_accuracy(
    predictions: Sequence[str],
    answers: Sequence[str],
    question_types: Sequence[str] | None = None,
    held_out: Sequence[bool] | None = None,
) -> dict:
    """Exact-match and normalised accuracy, overall, per question type and, given `held_out`, seen vs held out.

    Args:
        held_out: one flag per question, True when it is about a combination held out of training.

    Returns:
        `{"exact_match", "accuracy", "num_questions", "per_type": {type: {same three keys}}}`;
        `per_type` is empty when no types are given. With `held_out` also `"seen"` and `"held_out"`,
        each `{same three keys}` over its questions.
    """
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers; they must pair up.")
    for name, values in (("question types", question_types), ("held-out flags", held_out)):
        if values is not None and len(values) != len(answers):
            raise ValueError(f"{len(values)} {name} for {len(answers)} answers; give one per question.")
    if not answers:
        raise ValueError("no questions to score; the evaluation rows hold no QA pairs.")
    exact = [p.strip() == a.strip() for p, a in zip(predictions, answers)]
    normalised = [normalize_answer(p) == normalize_answer(a) for p, a in zip(predictions, answers)]
    by_type: dict[str, list[int]] = defaultdict(list)
    for index, kind in enumerate(question_types or []):
        by_type[kind].append(index)
    scores = {
        **_scores(exact, normalised, range(len(answers))),
        "per_type": {kind: _scores(exact, normalised, indices) for kind, indices in sorted(by_type.items())},
    }
    if held_out is not None:
        for name, flag in (("seen", False), ("held_out", True)):
            indices = [i for i, value in enumerate(held_out) if bool(value) == flag]
            if not indices:
                raise ValueError(f"no {name.replace('_', '-')} question among {len(answers)}; the seen vs held-out "
                                 "split needs both kinds (evaluate more samples, or pass no held-out flags)")
            scores[name] = _scores(exact, normalised, indices)
    return scores


def _scores(exact: list[bool], normalised: list[bool], indices) -> dict:
    indices = list(indices)
    return {
        "exact_match": sum(exact[i] for i in indices) / len(indices),
        "accuracy": sum(normalised[i] for i in indices) / len(indices),
        "num_questions": len(indices),
    }


def evaluate_vqa(
    model,
    processor,
    rows: Sequence[dict],
    out_dir: str | Path | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    held_out: Callable[[dict], bool] | None = None,
) -> dict:
    """Asks the VLM every question of every row (greedy) and scores the answers.

    Args:
        rows: dicts with `"image"` (PIL), `"qa"` (list of `{"question", "answer", "type"}`, optionally also
            `"answers"`, the human answers, and `"question_type"`, `"answer_type"`) and `"key"`.
        out_dir: when given, `vqa.csv` (id, type, question, answer, prediction, correct; with human answers also
            answers as a JSON list and vqav2_accuracy, empty for a question without them) goes there.
        held_out: tells from a question-answer dict whether it is about a held-out combination; when given,
            the questions are also scored seen vs held out.

    Returns:
        `vqa_accuracy`'s dict; when some question has 2 or more human answers, also `"vqav2_accuracy"`:
        `vqav2_scores` over those questions.
    """
    asked = [(row, qa) for row in rows for qa in row.get("qa") or []]
    if not asked:
        raise ValueError("none of the evaluation rows has a 'qa' list; VQA needs question-answer pairs.")
    predictions = generate_texts(
        model, processor, [row["image"] for row, _ in asked], [qa["question"] for _, qa in asked],
        batch_size=batch_size, max_new_tokens=max_new_tokens, desc="vqa",
    )
    answers = [qa["answer"] for _, qa in asked]
    types = [qa.get("type") or "unknown" for _, qa in asked]
    human = [list(qa.get("answers") or []) for _, qa in asked]
    # Leave-one-out needs two answers; a question with one gets exact match and normalised accuracy only.
    listed = [i for i in range(len(asked)) if len(human[i]) >= 2]
    if out_dir is not None:
        _write_csv(Path(out_dir) / "vqa.csv", asked, types, predictions, human if listed else None)
    flags = [held_out(qa) for _, qa in asked] if held_out is not None else None
    scores = vqa_accuracy(predictions, answers, types, flags)
    if listed:
        if len(listed) < len(asked):
            logger.warning("VQAv2 accuracy over %d of %d questions: the others have fewer than 2 human answers",
                           len(listed), len(asked))
        scores["vqav2_accuracy"] = vqav2_scores(
            [predictions[i] for i in listed], [human[i] for i in listed],
            _types_of([asked[i][1] for i in listed], "question_type"),
            _types_of([asked[i][1] for i in listed], "answer_type"),
        )
    return scores


def _types_of(pairs: Sequence[dict], field: str) -> list[str | None] | None:
    """Each pair's `field`, or None when no pair has one (the data gives no such types)."""
    values = [qa.get(field) for qa in pairs]
    return values if any(values) else None


def _write_csv(
    path: Path, asked: Sequence[tuple[dict, dict]], types: Sequence[str], predictions: Sequence[str],
    human: Sequence[list[str]] | None,
) -> None:
    """`vqa.csv`: one line per question; with `human` (each question's human answers) two more columns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "type", "question", "answer", "prediction", "correct"]
                        + (["answers", "vqav2_accuracy"] if human is not None else []))
        for index, ((row, qa), kind, prediction) in enumerate(zip(asked, types, predictions)):
            correct = normalize_answer(prediction) == normalize_answer(qa["answer"])
            line = [row.get("key", ""), kind, qa["question"], qa["answer"], prediction, int(correct)]
            if human is not None:
                answers = human[index]
                line += [json.dumps(answers), vqav2_accuracy(prediction, answers) if len(answers) >= 2 else ""]
            writer.writerow(line)
