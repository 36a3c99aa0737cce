"""Seen vs held-out scores on shapes data generated with held-out combinations: the rules read back, rows and
questions told apart, and retrieval, caption recall and VQA split on inputs whose answers are known."""

import io
import json
import logging
import random
import shutil

import pytest
import torch
from PIL import Image

from cli import UserError
from data.shapes import ShapeObject, caption_for, make_scene, parse_holdout, questions_for
from data.synthetic import generate_dataset, make_sample
from eval.holdout import (
    held_out_question_test,
    held_out_rows,
    question_is_held_out,
    recorded_holdouts,
    row_has_held_out,
)
from eval.retrieval import retrieval_metrics
from eval.run import evaluate_model
from eval.scene import caption_scene_metrics
from eval.vqa import evaluate_vqa, vqa_accuracy
from tests.conftest import tiny_qformer_and_processor, tiny_vlm_and_processor

HOLDOUTS = ["green triangle", "large blue"]
RULES = [parse_holdout(text) for text in HOLDOUTS]
SEEN = ShapeObject("circle", "red", "small", "top", "left")
SEEN_TOO = ShapeObject("square", "blue", "small", "bottom", "right")  # blue, but small: not held out
GREEN_TRIANGLE = ShapeObject("triangle", "green", "small", "middle", "center")
LARGE_BLUE = ShapeObject("circle", "blue", "large", "top", "right")


def _row(*objects: ShapeObject) -> dict:
    return {"caption": caption_for(make_scene(objects), 0)}


def test_recorded_holdouts_come_from_generation_json(tmp_path):
    generate_dataset(tmp_path / "held", {"validation": 2}, holdouts=HOLDOUTS, num_proc=1)
    generate_dataset(tmp_path / "plain", {"validation": 2}, num_proc=1)
    assert recorded_holdouts(tmp_path / "held") == HOLDOUTS
    assert recorded_holdouts(str(tmp_path / "plain")) == []
    assert recorded_holdouts(tmp_path / "plain" / "validation") == []  # no generation.json there
    assert recorded_holdouts("some-org/some-dataset") == []  # a Hub id is no folder

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "generation.json").write_text("{not json")
    with pytest.raises(UserError, match=r"broken/generation.json.*regenerate"):
        recorded_holdouts(tmp_path / "broken")
    (tmp_path / "broken" / "generation.json").write_text(json.dumps({"holdouts": "green triangle"}))
    with pytest.raises(UserError, match="must be a list of strings"):
        recorded_holdouts(tmp_path / "broken")


def test_rows_are_held_out_when_their_scene_holds_a_held_out_object():
    assert not row_has_held_out(_row(SEEN, SEEN_TOO), RULES)
    assert row_has_held_out(_row(SEEN, GREEN_TRIANGLE), RULES)
    assert row_has_held_out(_row(LARGE_BLUE), RULES)
    assert not row_has_held_out({"caption": "a photo of a dog"}, RULES)  # not a shapes scene
    assert not row_has_held_out(_row(GREEN_TRIANGLE), [])


def test_questions_are_held_out_by_the_object_they_are_about():
    for about, expected in [
        ("small green triangle", True),
        ("large green triangle", True),
        ("green triangle", True),     # an exists-"no" question names colour and shape only
        ("large blue circle", True),
        ("small blue circle", False),
        ("blue circle", False),       # no size: cannot match "large blue"
        ("green circle", False),
        ("", False),                  # the count question
    ]:
        assert question_is_held_out({"about": about}, RULES) == expected, about
    # Every question of a scene with one held-out object: only those about it are held out.
    scene = make_scene([SEEN, GREEN_TRIANGLE])
    for qa in questions_for(scene, random.Random(0)):
        assert question_is_held_out(qa, RULES) == (qa["about"] == GREEN_TRIANGLE.description
                                                   or qa["about"].endswith("green triangle")), qa


def test_row_flags_need_rules_and_both_kinds(caplog):
    rows = [_row(SEEN), _row(GREEN_TRIANGLE), _row(SEEN_TOO, LARGE_BLUE)]
    assert held_out_rows(rows, RULES) == [False, True, True]
    assert held_out_rows(rows, []) is None
    with caplog.at_level(logging.WARNING, logger="eval.holdout"):
        assert held_out_rows(rows[:1], RULES) is None
        assert held_out_rows(rows[1:], RULES) is None
    assert [r.message.startswith("no seen vs held-out scores: 0 of the 1") for r in caplog.records] == [True, False]


def test_questions_without_about_give_no_held_out_vqa(caplog):
    with_about = [{"qa": questions_for(make_scene([GREEN_TRIANGLE]), random.Random(0))}, {"qa": []}]
    test = held_out_question_test(with_about, RULES)
    assert test({"about": "small green triangle"}) and not test({"about": "small red circle"})
    without = [{"qa": [{"question": "how many shapes are there?", "answer": "one", "type": "count"}] * 3}]
    filled_with_none = [{"qa": [{"question": "q", "answer": "a", "type": "count", "about": None}]}]
    with caplog.at_level(logging.WARNING, logger="eval.holdout"):
        assert held_out_question_test(without, RULES) is None
        assert held_out_question_test(filled_with_none, RULES) is None
    assert len(caplog.records) == 2 and "'about'" in caplog.records[0].message  # one warning per call


def test_caption_recall_split_seen_and_held_out():
    scenes = [make_scene([SEEN, GREEN_TRIANGLE]), make_scene([SEEN_TOO, LARGE_BLUE]), make_scene([SEEN])]
    # Each caption names exactly the seen objects of its scene: every held-out object is missed.
    generated = [caption_for(make_scene([SEEN]), 1), caption_for(make_scene([SEEN_TOO]), 2), caption_for(scenes[2], 3)]
    m = caption_scene_metrics(generated, scenes, RULES)
    assert m["object_recall_seen"] == 1.0 and m["object_recall_held_out"] == 0.0
    assert (m["objects_seen"], m["objects_held_out"]) == (3, 2)
    assert m["object_recall"] == pytest.approx(3 / 5) and m["object_precision"] == 1.0
    # The same objects named in the wrong cell, or left unparsed, are not recalled either.
    moved = caption_for(make_scene([SEEN, ShapeObject("triangle", "green", "small", "top", "center")]), 0)
    m = caption_scene_metrics([moved, "garbage", caption_for(scenes[2], 0)], scenes, RULES)
    assert (m["object_recall_seen"], m["object_recall_held_out"]) == (2 / 3, 0.0)

    plain = caption_scene_metrics(generated, scenes)  # no holdouts: the keys of old
    assert set(plain) == {"scene_exact_match", "parse_rate", "object_precision", "object_recall", "object_f1"}
    assert plain == {k: v for k, v in caption_scene_metrics(generated, scenes, RULES).items() if k in plain}
    with pytest.raises(ValueError, match="no held-out object"):
        caption_scene_metrics(generated[2:], scenes[2:], RULES)


def test_vqa_accuracy_split_seen_and_held_out():
    answers = ["red", "two", "green", "yes", "large"]
    held_out = [False, False, True, True, True]
    predictions = ["red", "2", "blue", "no", "large"]  # right on every seen question, one of three held out
    m = vqa_accuracy(predictions, answers, ["color", "count", "color", "exists", "size"], held_out)
    assert m["seen"] == {"exact_match": 0.5, "accuracy": 1.0, "num_questions": 2}
    assert m["held_out"] == {"exact_match": pytest.approx(1 / 3), "accuracy": pytest.approx(1 / 3), "num_questions": 3}
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert "seen" not in vqa_accuracy(predictions, answers)
    with pytest.raises(ValueError, match="4 held-out flags for 5 answers"):
        vqa_accuracy(predictions, answers, held_out=held_out[:4])
    with pytest.raises(ValueError, match="no held-out question"):
        vqa_accuracy(predictions, answers, held_out=[False] * 5)


def _held_out_queries_rank_wrong() -> torch.Tensor:
    """6 images x 6 texts, image i with text i; 0-3 seen, 4-5 held out. Seen queries rank their match first."""
    similarity = torch.full((6, 6), 0.1) + 0.8 * torch.eye(6)
    similarity[4, 4], similarity[4, 0] = 0.2, 0.5  # image 4: seen text 0 first, its own text second
    similarity[5, 5] = 0.0  # image 5 and text 5: their match is last of all 6
    similarity[1, 4] = 0.6  # text 4: seen image 1 first (image 1 still prefers its own 0.9)
    return similarity


def test_retrieval_subsets_rank_among_all_candidates():
    similarity = _held_out_queries_rank_wrong()
    held_out = [False] * 4 + [True] * 2
    seen = [not flag for flag in held_out]
    m = retrieval_metrics(similarity, query_subsets={"held_out": (held_out, held_out), "seen": (seen, seen)})
    assert m["seen"] == {"i2t_r1": 1.0, "i2t_r5": 1.0, "t2i_r1": 1.0, "t2i_r5": 1.0, "num_images": 4, "num_texts": 4}
    # Held-out queries: one second (within 5), one sixth; the wrong candidates above them are seen ones.
    assert m["held_out"] == {"i2t_r1": 0.0, "i2t_r5": 0.5, "t2i_r1": 0.0, "t2i_r5": 0.5, "num_images": 2,
                             "num_texts": 2}
    plain = retrieval_metrics(similarity)
    assert {k: v for k, v in m.items() if k not in ("seen", "held_out")} == plain
    assert plain["i2t_r1"] == pytest.approx(4 / 6)

    with pytest.raises(ValueError, match="'held_out' has 5 i2t flags for 6 queries"):
        retrieval_metrics(similarity, query_subsets={"held_out": (held_out[1:], held_out)})
    with pytest.raises(ValueError, match="'none' has no t2i query"):
        retrieval_metrics(similarity, query_subsets={"none": (held_out, [False] * 6)})


@pytest.fixture(scope="module")
def held_out_data(tmp_path_factory):
    """Validation shards generated with the holdouts (train is not needed to evaluate)."""
    out = tmp_path_factory.mktemp("held")
    generate_dataset(out, {"validation": 16}, seed=1, image_size=32, holdouts=HOLDOUTS, samples_per_shard=8,
                     num_proc=1)
    return out


def test_evaluate_model_splits_retrieval_on_data_with_holdouts(held_out_data, tmp_path):
    model, processor = tiny_qformer_and_processor()
    model.save_pretrained(tmp_path / "qformer")
    processor.save_pretrained(tmp_path / "qformer")
    metrics = evaluate_model(str(tmp_path / "qformer"), str(held_out_data), tmp_path / "held", split="validation",
                             batch_size=8)
    retrieval = metrics["retrieval"]
    assert metrics["meta"]["holdouts"] == HOLDOUTS
    assert 0 < retrieval["held_out"]["num_images"] < 16
    assert retrieval["held_out"]["num_images"] + retrieval["seen"]["num_images"] == 16
    assert retrieval["held_out"]["num_texts"] == retrieval["held_out"]["num_images"]
    report = (tmp_path / "held" / "report.md").read_text()
    assert "## Seen vs held-out combinations" in report and "*green triangle*, *large blue*" in report
    assert "| held out |" in report

    # The same shards without generation.json: exactly the evaluation of data generated without holdouts.
    plain = tmp_path / "plain"
    shutil.copytree(held_out_data / "validation", plain / "validation")
    before = evaluate_model(str(tmp_path / "qformer"), str(plain), tmp_path / "plain-report", split="validation",
                            batch_size=8)
    assert "holdouts" not in before["meta"] and "held_out" not in before["retrieval"]
    assert before["retrieval"] == {k: v for k, v in retrieval.items() if k not in ("seen", "held_out")}
    assert "held-out" not in (tmp_path / "plain-report" / "report.md").read_text()


def test_evaluate_vqa_scores_questions_by_what_they_are_about(tmp_path):
    rng = random.Random(3)
    records = [make_sample(rng, f"{i:02d}", image_size=32) for i in range(12)]
    rows = [{"image": Image.open(io.BytesIO(jpg)).convert("RGB"), "qa": record["qa"], "key": record["key"]}
            for jpg, record in records]
    about_held_out = [question_is_held_out(qa, RULES) for row in rows for qa in row["qa"]]
    assert 0 < sum(about_held_out) < len(about_held_out)
    model, processor = tiny_vlm_and_processor()
    m = evaluate_vqa(model, processor, rows, batch_size=32, max_new_tokens=2,
                     held_out=held_out_question_test(rows, RULES))
    assert m["held_out"]["num_questions"] == sum(about_held_out)
    assert m["seen"]["num_questions"] + m["held_out"]["num_questions"] == m["num_questions"]

