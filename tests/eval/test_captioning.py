"""Captioning and VQA on a tiny VLM: generation, files, pictures, and scores that match their inputs."""

import csv
import io
import json
import random

import pytest
import torch
from PIL import Image

from data.shapes import position_phrase, scene_from_json
from data.synthetic import make_sample
from eval.captioning import caption_gallery, evaluate_captioning, fixed_derangement, load_caption_metric
from eval.generation import generate_texts
from eval.scene import caption_scene_metrics
from eval.vqa import evaluate_vqa, normalize_answer


def shapes_rows(n: int, seed: int = 0) -> list[dict]:
    """Synthetic shapes samples as evaluation rows (image, caption, references, key, group_id, qa, scene)."""
    rng = random.Random(seed)
    rows = []
    for index in range(n):
        jpg, record = make_sample(rng, f"{index:05d}", image_size=32)
        rows.append({
            "image": Image.open(io.BytesIO(jpg)).convert("RGB"),
            "caption": record["caption"],
            "references": [record["caption"], *record["references"]],
            "key": record["key"],
            "group_id": record["group_id"],
            "qa": record["qa"][:2],
            "scene": record["scene"],
        })
    return rows


def wordy(processor) -> dict:
    """Generation settings under which a random tiny LM writes words: it tends to emit special tokens
    or one newline over and over, so those are suppressed and no token may repeat."""
    return {"suppress_tokens": sorted(set(processor.tokenizer.all_special_ids) | {processor.image_token_id}),
            "no_repeat_ngram_size": 1}


def test_fixed_derangement_moves_every_image_to_another_scene():
    groups = ["a", "a", "b", "c", "c", "c", "d", "e"]
    perm = fixed_derangement(groups, seed=3)
    assert sorted(perm) == list(range(len(groups)))
    assert all(groups[perm[i]] != groups[i] for i in range(len(groups)))
    assert fixed_derangement(groups, seed=3) == perm
    assert any(fixed_derangement(groups, seed=s) != perm for s in range(4, 10))
    with pytest.raises(ValueError, match="one scene holds 3"):
        fixed_derangement(["a", "a", "a", "b"])


def test_batched_generation_equals_one_at_a_time(tiny_vlm, shape_images):
    model, processor = tiny_vlm
    # At the initialisation's std of 0.02 the random LM's greedy output hardly depends on the prompt,
    # so even wrong (right) padding would give the same words; larger weights make it depend on it.
    torch.manual_seed(0)
    with torch.no_grad():
        for weight in model.language_model.parameters():
            if weight.dim() == 2:
                weight.normal_(0.0, 2.0 / weight.shape[1] ** 0.5)
    # Questions of different lengths, so the batch is left padded.
    prompts = ["what color is the circle?", "how many shapes are there?", "is there a triangle?", "describe the image."]
    kwargs = {"max_new_tokens": 6, **wordy(processor)}
    batched = generate_texts(model, processor, shape_images, prompts, batch_size=4, **kwargs)
    single = [generate_texts(model, processor, [image], [prompt], batch_size=1, **kwargs)[0]
              for image, prompt in zip(shape_images, prompts)]
    assert batched == single
    assert all(batched)  # words came out, so the comparison means something
    assert processor.tokenizer.padding_side == "right"  # restored after generating


def test_evaluate_captioning_writes_csv_gallery_and_scores(tiny_vlm, tmp_path):
    model, processor = tiny_vlm
    rows = shapes_rows(5)
    result = evaluate_captioning(
        model, processor, rows, out_dir=tmp_path, batch_size=3, max_new_tokens=8, shuffled=True,
        gallery_size=5, meteor=False, **wordy(processor),
    )
    with open(tmp_path / "captions.csv", newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert [r["id"] for r in table] == [r["key"] for r in rows]
    assert [json.loads(r["references"]) for r in table] == [r["references"] for r in rows]
    generated = [r["generated"] for r in table]
    assert generated == result["captions"] and all(generated)
    # The scores are the metric module's on exactly what the CSV holds.
    assert result["captioning"] == load_caption_metric().compute(
        predictions=generated, references=[r["references"] for r in rows], meteor=False
    )
    assert {"bleu_1", "bleu_4", "rouge_l", "cider"} <= set(result["captioning"])
    with open(tmp_path / "captions_shuffled.csv", newline="", encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == 5
    assert set(result["captioning_shuffled"]) == set(result["captioning"])
    with Image.open(tmp_path / "captions.png") as png:  # 4 columns x 2 rows of 3.2 x 4.0 inches at 100 dpi
        assert png.format == "PNG" and png.size == (1280, 800)


def test_caption_gallery_shows_each_image(tmp_path):
    colours = [(255, 0, 0), (0, 0, 255)]
    images = [Image.new("RGB", (20, 20), c) for c in colours]
    path = caption_gallery(images, ["red", "blue"], ["a red one", "a blue one"], tmp_path / "g.png", columns=4)
    with Image.open(path) as png:
        assert png.size == (640, 400)  # two columns (no more than images) x one row
        pixels = list(png.convert("RGB").getdata())
    for colour in colours:
        assert pixels.count(colour) > 1000, colour


def test_caption_gallery_draws_dollar_signs_as_text(tmp_path):
    # An untrained model wrote "tuser$$$$stems..." in a demo run and matplotlib failed to parse it as TeX.
    images = [Image.new("RGB", (20, 20), (255, 0, 0))] * 2
    path = caption_gallery(images, ["tuser$$$$stems", "a $5 and $6 note"], ["costs $\\alpha", "$x^$"],
                           tmp_path / "g.png")
    with Image.open(path) as png:
        assert png.size == (640, 400)


def test_evaluate_vqa_scores_what_it_wrote(tiny_vlm, tmp_path):
    model, processor = tiny_vlm
    rows = shapes_rows(3)
    scores = evaluate_vqa(model, processor, rows, out_dir=tmp_path, batch_size=4, max_new_tokens=4)
    with open(tmp_path / "vqa.csv", newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert len(table) == scores["num_questions"] == 6
    assert [r["question"] for r in table] == [qa["question"] for row in rows for qa in row["qa"]]
    for r in table:
        assert int(r["correct"]) == (normalize_answer(r["prediction"]) == normalize_answer(r["answer"]))
    assert scores["accuracy"] == pytest.approx(sum(int(r["correct"]) for r in table) / 6)
    assert set(scores["per_type"]) == {r["type"] for r in table}


def test_caption_scene_metrics_on_hand_cases():
    rows = shapes_rows(3, seed=1)
    scenes = [scene_from_json(r["scene"]) for r in rows]
    sizes = [len(s) for s in scenes]
    # 1: the true caption (exact); 2: unparseable; 3: only the first object of the scene, described right.
    first = scenes[2][0]
    partial = f"a {first.description} in the {position_phrase(first.row, first.col)}"
    generated = [rows[0]["caption"], "a picture", partial]
    m = caption_scene_metrics(generated, scenes)
    # Predicted objects: sizes[0] + 0 + 1, all correct; true objects: sum(sizes).
    exact_third = sizes[2] == 1
    assert m["scene_exact_match"] == pytest.approx((1 + exact_third) / 3)
    assert m["parse_rate"] == pytest.approx(2 / 3)
    assert m["object_precision"] == 1.0
    assert m["object_recall"] == pytest.approx((sizes[0] + 1) / sum(sizes))
    recall = (sizes[0] + 1) / sum(sizes)
    assert m["object_f1"] == pytest.approx(2 * recall / (1 + recall))


def test_beam_and_seeded_sampling(tiny_vlm, shape_images):
    model, processor = tiny_vlm
    prompts = ["describe the image."] * len(shape_images)
    kwargs = {"max_new_tokens": 5, "batch_size": 4, **wordy(processor)}
    assert len(generate_texts(model, processor, shape_images, prompts, strategy="beam", **kwargs)) == 4
    first = generate_texts(model, processor, shape_images, prompts, strategy="sample", seed=1, **kwargs)
    assert generate_texts(model, processor, shape_images, prompts, strategy="sample", seed=1, **kwargs) == first
    others = [generate_texts(model, processor, shape_images, prompts, strategy="sample", seed=s, **kwargs)
              for s in (2, 3)]
    assert any(o != first for o in others)  # it does sample
    with pytest.raises(ValueError, match="greedy"):
        generate_texts(model, processor, shape_images, prompts, strategy="nucleus")
