"""The official VQAv2 accuracy: each machine answer against the ten human answers of its question.

For one question, the answer's accuracy is averaged over the leave-one-out subsets of the human answers, each
subset giving min(#humans in it who gave that answer / 3, 1): with 10 answers, 3 matching ones of 10 score 0.9,
one of 10 scores 0.3. TextVQA uses the same measure.

Rules and data come from the official evaluation script, GT-Vision-Lab/VQA
PythonEvaluationTools/vqaEvaluation/vqaEval.py at its current version (commit a013f00, "Fixed processing answers
bug", 2021): tabs and newlines become spaces and the ends are stripped on every answer; then, only when the human
answers of a question disagree, every human answer and the machine answer go through `process_punctuation` and
`process_digit_article`. When the humans all agree, the comparison is exact (after the whitespace step): "Yes" or
"yes." scores 0 against ten "yes". The script's earlier version (2015-2021, still copied by LAVIS) always normalised
the machine answer and gave disagreeing human answers the punctuation step only; lmms-eval's vqav2 task normalises
both sides always. Where the humans disagree, all three agree.

Leave-one-out is by position here; the script removes the human answers equal to the left-out one as dicts, which is
the same thing for VQAv2's annotations (each has its own answer_id). Scores are fractions (the script reports
percentages rounded to 2 decimals).
"""

import re
from collections import defaultdict
from collections.abc import Sequence

# vqaEval.py's `contractions`, as data: a word written without its apostrophe(s) -> the written form. The
# capitalised keys can never match (words are lowercased first); they are kept as the script has them.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
# vqaEval.py's `manualMap`: only these number words become digits ("none" counts as zero).
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
# vqaEval.py's `punct`: the marks `process_punctuation` removes. Apostrophes, colons, "#", "$", "%", "&", "*" stay.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")
# vqaEval.py's `commaStrip`: a comma between digits anywhere in the answer ("1,000") makes every mark vanish
# rather than become a space.
_COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")
# vqaEval.py's `periodStrip`, "(?!<=\d)(\.)(?!\d)": its first group is a lookahead (meant as a lookbehind) that
# never fails before a period, so a period goes unless a digit follows ("2.5" stays, "5." -> "5", ".5" stays).
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# The script passes re.UNICODE (32) where `sub` takes its count: at most 32 periods go.
_MAX_PERIODS_REMOVED = 32


def clean_whitespace(text: str) -> str:
    """The script's first step on every answer: tabs and newlines become spaces, the ends are stripped."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """vqaEval.py's processPunctuation: "yes!" -> "yes ", "top-left" -> "top left", "1,000" -> "1000".

    A mark of `PUNCTUATION` is removed when it touches a space somewhere in `text` (" - " or "x, y") or when a comma
    stands between digits anywhere in `text`; otherwise each of its occurrences becomes a space. Then periods not
    followed by a digit are removed. Case and spacing are left to `process_digit_article`.
    """
    strip_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if strip_all or touches_space else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_MAX_PERIODS_REMOVED)


def process_digit_article(text: str) -> str:
    """vqaEval.py's processDigitArticle: lowercase, split on whitespace, number words zero..ten (and "none") as
    digits, the articles a/an/the dropped, contractions written with their apostrophe ("dont" -> "don't"), words
    joined by single spaces. "The Two dogs" -> "2 dogs"."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_vqa_answer(text: str) -> str:
    """An answer as the script compares it when the human answers disagree: `clean_whitespace`, then
    `process_punctuation`, then `process_digit_article`. "  The Two dogs!" -> "2 dogs"."""
    return process_digit_article(process_punctuation(clean_whitespace(text)))


def vqav2_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """The machine answer's VQAv2 accuracy against the human answers of one question, in [0, 1].

    Args:
        prediction: the machine answer.
        human_answers: every human answer (10 in VQAv2 and TextVQA), duplicates included.

    Returns:
        the mean over i of min(#{j != i: human_answers[j] == prediction} / 3, 1), compared as the module docstring
        says: normalised only when the human answers disagree.
    """
    if len(human_answers) < 2:
        raise ValueError(f"{len(human_answers)} human answers; VQAv2 accuracy leaves one out, so give 2 or more")
    humans = [clean_whitespace(answer) for answer in human_answers]
    machine = clean_whitespace(prediction)
    if len(set(humans)) > 1:
        humans = [process_digit_article(process_punctuation(answer)) for answer in humans]
        machine = process_digit_article(process_punctuation(machine))
    matches = sum(answer == machine for answer in humans)
    # Leaving answer i out leaves `matches` matching answers, one fewer when answer i matched.
    return sum(min(1.0, (matches - (answer == machine)) / 3) for answer in humans) / len(humans)


def vqav2_scores(
    predictions: Sequence[str],
    human_answers: Sequence[Sequence[str]],
    question_types: Sequence[str | None] | None = None,
    answer_types: Sequence[str | None] | None = None,
) -> dict:
    """VQAv2 accuracy overall and, where the data gives them, per question type and per answer type.

    Args:
        predictions: one machine answer per question.
        human_answers: the human answers of each question (at least 2 each).
        question_types, answer_types: one per question (VQAv2's "what color is the" ..., "yes/no" / "number" /
            "other"), or None; a None entry counts as "unknown".

    Returns:
        `{"accuracy", "num_questions", "per_question_type": {type: {"accuracy", "num_questions"}},
        "per_answer_type": {same}}`; a `per_` dict is empty when its types are not given.
    """
    if len(predictions) != len(human_answers):
        raise ValueError(f"{len(predictions)} predictions for {len(human_answers)} questions; they must pair up.")
    for name, values in (("question types", question_types), ("answer types", answer_types)):
        if values is not None and len(values) != len(predictions):
            raise ValueError(f"{len(values)} {name} for {len(predictions)} questions; give one per question.")
    if not predictions:
        raise ValueError("no questions to score; VQAv2 accuracy needs questions with human answers.")
    accuracies = [vqav2_accuracy(p, answers) for p, answers in zip(predictions, human_answers)]
    return {
        **_mean(accuracies, range(len(accuracies))),
        "per_question_type": _per_type(accuracies, question_types),
        "per_answer_type": _per_type(accuracies, answer_types),
    }


def _mean(accuracies: list[float], indices) -> dict:
    indices = list(indices)
    return {"accuracy": sum(accuracies[i] for i in indices) / len(indices), "num_questions": len(indices)}


def _per_type(accuracies: list[float], types: Sequence[str | None] | None) -> dict[str, dict]:
    by_type: dict[str, list[int]] = defaultdict(list)
    for index, kind in enumerate(types or []):
        by_type[kind or "unknown"].append(index)
    return {kind: _mean(accuracies, indices) for kind, indices in sorted(by_type.items())}
