"""The official VQAv2 accuracy: hand-computed cases, the official answer normalisation, the loader keeping every
human answer, and `python -m eval` on a VQAv2-style parquet set (questions with ten human answers, no captions)."""

import csv
import io
import json
import logging

import pytest
from datasets import Dataset, Features, Image, List, Value

from cli import UserError
from data.cleaning import CleaningOptions, clean_dataset_row
from data.loading import load_image_text_dataset
from eval.__main__ import main
from eval.vqav2_accuracy import (
    normalize_vqa_answer,
    process_digit_article,
    process_punctuation,
    vqav2_accuracy,
    vqav2_scores,
)
from tests.conftest import tiny_qformer_and_processor, tiny_vlm_and_processor

THREE_YES = ["yes"] * 3 + ["no"] * 7


@pytest.mark.parametrize(
    ("prediction", "humans", "expected"),
    [
        # Dropping one of the 3 "yes" leaves 2 (2/3), dropping one of the 7 "no" leaves 3 (1): (3 * 2/3 + 7) / 10.
        ("yes", THREE_YES, 0.9),
        ("no", THREE_YES, 1.0),  # at least 6 "no" remain in every subset
        ("maybe", THREE_YES, 0.0),
        # One "yes": 9 subsets keep it (1/3), the one dropping it has none: 9 * 1/3 / 10.
        ("yes", ["yes"] + ["no"] * 9, 0.3),
        # Two: 2 subsets keep one (1/3), 8 keep both (2/3): (2/3 + 16/3) / 10.
        ("yes", ["yes"] * 2 + ["no"] * 8, 0.6),
        ("yes", ["yes"] * 4 + ["no"] * 6, 1.0),
        # The humans disagree, so both sides are normalised: "Two!" and "two" are "2".
        ("Two!", ["2"] * 2 + ["two"] * 2 + ["3"] * 6, 1.0),
        # The humans agree: the script compares as written (after the whitespace step), as its current version does.
        ("yes", ["yes"] * 10, 1.0),
        (" yes\n", ["yes"] * 10, 1.0),
        ("Yes", ["yes"] * 10, 0.0),
        ("yes.", ["yes"] * 10, 0.0),
    ],
)
def test_vqav2_accuracy_by_hand(prediction, humans, expected):
    assert vqav2_accuracy(prediction, humans) == pytest.approx(expected)


def test_fewer_than_two_human_answers_are_refused():
    with pytest.raises(ValueError, match="1 human answers"):
        vqav2_accuracy("yes", ["yes"])


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Two", "2"),                    # number words (zero..ten) as digits, after lowercasing
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),            # the script's map stops at ten
        ("dont", "don't"),               # contractions get their apostrophe
        ("don't", "don't"),              # the apostrophe is no punctuation mark to the script
        ("whats", "what's"),
        ("the cat.", "cat"),             # articles dropped; a period not before a digit removed
        ("An apple", "apple"),
        ("yes!", "yes"),
        ("1,000", "1000"),               # a comma between digits goes
        ("1,000 cats!", "1000 cats"),    # ... and then every mark goes rather than becoming a space
        ("red,blue", "red blue"),        # a mark touching no space becomes one
        ("red, blue", "red blue"),       # a mark touching a space goes
        ("top-left", "top left"),
        ("2.5", "2.5"),                  # a period before a digit stays
        ("5.", "5"),
        ("U.S.A.", "usa"),
        ("(a) cat", "cat"),
        ("  yes\tno\n", "yes no"),       # tabs and newlines are spaces; spaces collapse
        ("3:00", "3:00"),                # colons are not in the script's list
    ],
)
def test_normalize_vqa_answer(raw, normalised):
    assert normalize_vqa_answer(raw) == normalised


def test_the_two_official_steps_apart():
    assert process_punctuation("yes!") == "yes "  # case and spacing are the digit-article step's
    assert process_punctuation("x - y") == "x  y"
    assert process_digit_article("The  Two Dogs") == "2 dogs"


def test_scores_overall_and_per_type():
    predictions = ["yes", "no", "2", "red"]
    humans = [THREE_YES, THREE_YES, ["2"] * 10, ["blue"] * 9 + ["red"]]  # 0.9, 1.0, 1.0, 0.3
    scores = vqav2_scores(predictions, humans, ["is the", "is the", "how many", None],
                          ["yes/no", "yes/no", "number", "other"])
    assert scores["accuracy"] == pytest.approx((0.9 + 1.0 + 1.0 + 0.3) / 4) and scores["num_questions"] == 4
    assert scores["per_answer_type"] == {
        "number": {"accuracy": 1.0, "num_questions": 1},
        "other": {"accuracy": pytest.approx(0.3), "num_questions": 1},
        "yes/no": {"accuracy": pytest.approx(0.95), "num_questions": 2},
    }
    assert scores["per_question_type"]["unknown"]["num_questions"] == 1  # a question without a type
    assert vqav2_scores(predictions, humans)["per_answer_type"] == {}
    with pytest.raises(ValueError, match="pair up"):
        vqav2_scores(predictions[:1], humans)


# ---------------------------------------------------------------------------------------------------------------
# Loading: every human answer kept, the most frequent one as the answer
# ---------------------------------------------------------------------------------------------------------------

VQAV2_ANSWER = {"answer": Value("string"), "answer_confidence": Value("string"), "answer_id": Value("int64")}


def _vqav2_answers(texts: list[str]) -> list[dict]:
    return [{"answer": t, "answer_confidence": "yes", "answer_id": i + 1} for i, t in enumerate(texts)]


def _write_vqa_parquet(path, images, questions, answers, answer_types, question_types=None):
    """A parquet file with VQAv2's columns (lmms-lab/VQAv2): image, question, answers (dicts), types; no caption."""
    Dataset.from_dict({
        "question_id": list(range(len(questions))), "question": questions,
        "question_type": question_types or ["what is"] * len(questions), "answer_type": answer_types,
        "multiple_choice_answer": [a[0] for a in answers], "answers": [_vqav2_answers(a) for a in answers],
        "image": images,
    }, features=Features({
        "question_id": Value("int64"), "question": Value("string"), "question_type": Value("string"),
        "answer_type": Value("string"), "multiple_choice_answer": Value("string"), "answers": List(VQAV2_ANSWER),
        "image": Image(),
    })).to_parquet(path)
    return path


def test_loader_keeps_ten_answers_and_picks_the_most_frequent(shape_images, tmp_path):
    answers = [["no"] * 3 + ["yes"] * 7, ["2", "3", "3", "2", "4", "1", "5", "6", "7", "8"]]  # the second: a tie
    parquet = _write_vqa_parquet(tmp_path / "vqa.parquet", shape_images[:2], ["is it red?", "how many?"], answers,
                                 ["yes/no", "number"])
    dataset = load_image_text_dataset(str(parquet), question_column="question", answer_column="answers",
                                      answer_lists=True, cache_dir=str(tmp_path / "cache"))
    assert dataset["caption"] == ["", ""]
    assert dataset["qa"] == [
        [{"question": "is it red?", "answer": "yes", "type": "open", "about": None, "answers": answers[0],
          "question_type": "what is", "answer_type": "yes/no"}],
        [{"question": "how many?", "answer": "2", "type": "open", "about": None, "answers": answers[1],
          "question_type": "what is", "answer_type": "number"}],
    ]
    # Without answer_lists the pairs keep the four standard fields; the answer is still the most frequent.
    plain = load_image_text_dataset(str(parquet), question_column="question", answer_column="answers",
                                    cache_dir=str(tmp_path / "cache"))
    assert plain["qa"][0] == [{"question": "is it red?", "answer": "yes", "type": "open", "about": None}]


@pytest.mark.parametrize(
    "cell",
    [
        ["a", "b", "b"],                                                  # TextVQA: strings
        [{"answer": "a"}, {"answer": "b"}, {"answer": "b"}],              # VQAv2: dicts
        {"answer": ["a", "b", "b"], "answer_id": [1, 2, 3]},              # dicts read from a Sequence feature
    ],
)
def test_answer_cells_of_each_layout(shape_images, cell):
    row = {"image": {"bytes": _png(shape_images[0]), "path": None}, "q": "which?", "a": cell}
    columns = {"image": "image", "caption": None, "question": "q", "answer": "a", "group": None, "key": None,
               "negative_captions": None}
    options = CleaningOptions(require_caption=False, answer_lists=True)
    qa = clean_dataset_row(row, 0, columns=columns, options=options)["qa"]
    assert qa == [{"question": "which?", "answer": "b", "type": "open", "about": None, "answers": ["a", "b", "b"],
                   "question_type": None, "answer_type": None}]


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# python -m eval on a VQAv2-style set
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vlm_folder(tmp_path_factory):
    model, processor = tiny_vlm_and_processor()
    folder = tmp_path_factory.mktemp("vlm")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


QUESTIONS = ["what color is the circle?", "how many shapes are there?", "what shape is it?", "is it large?"]
FILLER = "qqq"  # a word the tiny model cannot write (not in its corpus), so it never matches its answers


def _eval_args(vlm_folder, parquet, out):
    return ["--model", str(vlm_folder), "--data", str(parquet), "--question-column", "question", "--answer-column",
            "answers", "--out", str(out), "--batch-size", "4", "--meteor", "off"]


def _read_csv(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_eval_command_scores_vqav2_accuracy(vlm_folder, shape_images, tmp_path, caplog):
    # First run: whatever the untrained model answers. Second run, same images and questions: the human answers
    # hold the model's own (greedy, so identical) answer k = 1..4 times of 10, which scores 0.3, 0.6, 0.9, 1.0.
    types = ["other", "other", "number", "number"]
    first = _write_vqa_parquet(tmp_path / "first.parquet", shape_images, QUESTIONS, [[FILLER] * 10] * 4, types)
    main(_eval_args(vlm_folder, first, tmp_path / "first"))
    predictions = [r["prediction"] for r in _read_csv(tmp_path / "first" / "vqa.csv")]
    assert len(predictions) == 4

    answers = [[p] * k + [FILLER] * (10 - k) for k, p in zip(range(1, 5), predictions)]
    second = _write_vqa_parquet(tmp_path / "second.parquet", shape_images, QUESTIONS, answers, types)
    out = tmp_path / "second"
    with caplog.at_level(logging.INFO, logger="eval.run"):
        metrics = main(_eval_args(vlm_folder, second, out))
    assert set(metrics) == {"meta", "vqa"}  # no captions: no captioning, no retrieval
    assert "captioning and retrieval skipped" in caplog.text
    assert json.loads((out / "metrics.json").read_text()) == metrics
    table = _read_csv(out / "vqa.csv")
    assert [r["prediction"] for r in table] == predictions
    assert [json.loads(r["answers"]) for r in table] == answers
    assert [float(r["vqav2_accuracy"]) for r in table] == pytest.approx([0.3, 0.6, 0.9, 1.0])
    assert metrics["vqa"]["vqav2_accuracy"] == {
        "accuracy": pytest.approx(0.7), "num_questions": 4,
        "per_question_type": {"what is": {"accuracy": pytest.approx(0.7), "num_questions": 4}},
        "per_answer_type": {"number": {"accuracy": pytest.approx(0.95), "num_questions": 2},
                            "other": {"accuracy": pytest.approx(0.45), "num_questions": 2}},
    }
    # The demo's own scores stay, against the most frequent human answer (the filler, never written).
    assert metrics["vqa"]["num_questions"] == 4 and metrics["vqa"]["accuracy"] == 0.0
    report = (out / "report.md").read_text()
    assert "### VQAv2 accuracy" in report and "| **all** | 4 | 0.700 |" in report and "| number | 2 | 0.950 |" in report


def test_vqa_data_needs_a_vlm_and_both_columns(vlm_folder, shape_images, tmp_path):
    parquet = _write_vqa_parquet(tmp_path / "vqa.parquet", shape_images[:2], QUESTIONS[:2], [["yes"] * 10] * 2,
                                 ["yes/no"] * 2)
    with pytest.raises(UserError, match="--question-column and --answer-column go together"):
        main(["--model", str(vlm_folder), "--data", str(parquet), "--question-column", "question",
              "--out", str(tmp_path / "x")])
    model, processor = tiny_qformer_and_processor()
    model.save_pretrained(tmp_path / "qformer")
    processor.save_pretrained(tmp_path / "qformer")
    with pytest.raises(UserError, match="has no captions, and a stage-1 Q-Former is evaluated by retrieval"):
        main(_eval_args(tmp_path / "qformer", parquet, tmp_path / "y"))
    with pytest.raises(UserError, match="no captions and no questions to evaluate"):
        main([*_eval_args(vlm_folder, parquet, tmp_path / "z"), "--no-vqa"])
