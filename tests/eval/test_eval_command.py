"""`python -m eval` end to end on tiny saved models and a few synthetic shards."""

import json
import re

import pytest
import torch
from PIL import Image

from data.loading import load_image_text_dataset
from data.synthetic import write_split
from eval.__main__ import main
from eval.model_card import write_model_card
from eval.retrieval import evaluate_retrieval, retrieval_metrics
from eval.run import QFORMER_TOKENIZER_SUBFOLDER, load_rows
from tests.conftest import tiny_qformer_and_processor, tiny_vlm_and_processor

NUM_SAMPLES = 10


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    write_split(out, "validation", NUM_SAMPLES, image_size=32, samples_per_shard=4, num_proc=1)
    return out


def _pictures_in(report: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)


def test_stage1_qformer_gets_retrieval(shapes_dir, tmp_path):
    model, processor = tiny_qformer_and_processor()
    model.save_pretrained(tmp_path / "qformer")
    processor.save_pretrained(tmp_path / "qformer")
    out = tmp_path / "report"
    metrics = main(["--model", str(tmp_path / "qformer"), "--data", str(shapes_dir), "--split", "validation",
                    "--out", str(out), "--batch-size", "3"])
    assert set(metrics) == {"meta", "retrieval"} and metrics["meta"]["num_samples"] == NUM_SAMPLES
    assert json.loads((out / "metrics.json").read_text()) == metrics

    # The same numbers from one unbatched pass of the in-memory model over the same rows.
    rows = load_rows(str(shapes_dir), "validation", None)
    model.eval()
    with torch.no_grad():
        pixels = processor.image_processor(images=[r["image"] for r in rows], return_tensors="pt")["pixel_values"]
        text = processor.tokenizer([r["caption"] for r in rows], padding=True, return_tensors="pt")
        similarity = model.similarity(model.get_image_embeds(pixels),
                                      model.get_text_embeds(text["input_ids"], text["attention_mask"]))
    groups = [r["group_id"] for r in rows]
    expected = retrieval_metrics(similarity, groups, groups)
    assert {k: metrics["retrieval"][k] for k in expected} == pytest.approx(expected)

    report = (out / "report.md").read_text()
    assert "| image -> text |" in report and _pictures_in(report) == ["similarity_grid.png"]
    with Image.open(out / "similarity_grid.png") as png:  # 8 images x 8 captions, as documented
        assert png.format == "PNG" and png.size == (round((3.5 + 1.1 * 8) * 100), round((1.6 + 0.55 * 8) * 100))


def test_vlm_gets_captioning_vqa_retrieval_and_curves(shapes_dir, tmp_path):
    model, processor = tiny_vlm_and_processor()
    folder = tmp_path / "vlm"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    write_model_card(folder, model, repo="vlm", metrics={"eval_loss": 1.2})  # as training leaves it
    _, qformer_processor = tiny_qformer_and_processor()
    qformer_processor.tokenizer.save_pretrained(folder / QFORMER_TOKENIZER_SUBFOLDER)
    # A Trainer state as `Trainer.save_state` writes it (only the part the report reads).
    history = [{"step": s, "epoch": s / 8, "loss": 4.0 / s, "learning_rate": 1e-3 * (1 - s / 8)} for s in range(1, 8)]
    history.append({"step": 7, "epoch": 0.875, "eval_loss": 1.2, "eval_runtime": 0.5})
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 7, "log_history": history}))

    out = tmp_path / "report"
    metrics = main(["--model", str(folder), "--data", str(shapes_dir), "--split", "validation", "--out", str(out),
                    "--max-samples", "6", "--batch-size", "4", "--max-new-tokens", "6", "--meteor", "off",
                    "--update-card"])
    assert set(metrics) == {"meta", "captioning", "captioning_shuffled", "caption_scene", "caption_scene_shuffled",
                            "vqa", "retrieval"}
    assert metrics["meta"]["num_samples"] == 6 and metrics["retrieval"]["num_pairs"] == 6
    assert metrics["vqa"]["num_questions"] == sum(len(r["qa"]) for r in load_rows(str(shapes_dir), "validation", 6))
    assert json.loads((out / "metrics.json").read_text()) == metrics

    report = (out / "report.md").read_text()
    pictures = _pictures_in(report)
    assert sorted(pictures) == ["captions.png", "curves.png", "similarity_grid.png"]
    for name in pictures:
        with Image.open(out / name) as png:
            assert png.format == "PNG"
    with Image.open(out / "captions.png") as png:  # 6 images: 4 columns x 2 rows
        assert png.size == (1280, 800)
    for name in ("captions.csv", "captions_shuffled.csv", "vqa.csv"):
        assert len((out / name).read_text().splitlines()) > 1, name
    card = (folder / "README.md").read_text()  # --update-card: the report's tables replace the Trainer's numbers
    assert "### Captioning" in card and "CIDEr-D" in card and "| **all** |" in card and "eval_loss" not in card


def test_retrieval_reads_a_datasets_dataset_like_a_list_of_rows(shapes_dir, tmp_path):
    model, processor = tiny_qformer_and_processor()
    dataset = load_image_text_dataset(str(shapes_dir), split="validation")
    rows = [dataset[i] for i in range(len(dataset))]
    from_dataset = evaluate_retrieval(model, dataset, processor.image_processor, processor.tokenizer, tmp_path / "a", 4)
    from_rows = evaluate_retrieval(model, rows, processor.image_processor, processor.tokenizer, tmp_path / "b", 4)
    assert from_dataset == from_rows
    grids = [(tmp_path / run / "similarity_grid.png").read_bytes() for run in ("a", "b")]
    assert grids[0] == grids[1]
