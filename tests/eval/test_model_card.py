"""The one model card: Hub metadata that parses, the model's shapes, the Trainer's numbers, and after a full
evaluation the report's own tables in place of them."""

import pytest
from huggingface_hub import ModelCard

from cli import UserError
from eval.model_card import EVALUATION_START, update_evaluation, write_model_card
from eval.report import write_report
from tests.conftest import tiny_qformer_and_processor, tiny_vlm_and_processor
from tests.eval.test_report import METRICS


def test_card_of_a_trained_model_then_its_full_evaluation(tmp_path):
    model, _ = tiny_vlm_and_processor()
    (tmp_path / "local_lm").mkdir()
    path = write_model_card(
        tmp_path, model, repo="someone/tiny-vlm", training=[["steps", 40], ["data", "outputs/demo/data"]],
        metrics={"eval_loss": 1.25, "eval_runtime": 0.5}, samples=[("a red circle", "a red | circle")],
        base_models=["HuggingFaceTB/SmolLM-135M-Instruct", None, str(tmp_path / "local_lm")], dataset=str(tmp_path),
    )
    card = ModelCard.load(path)
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-text-to-text"
    assert "qformer-vlm" in card.data.tags
    # Only Hub names are metadata: local paths mean nothing on a model page.
    assert card.data.base_model == ["HuggingFaceTB/SmolLM-135M-Instruct"] and card.data.datasets is None
    text = card.text
    assert 'pipeline("image-text-to-text", model="someone/tiny-vlm"' in text
    assert "| language model | llama, 2 layers x 64 |" in text and "| steps | 40 |" in text
    assert "| eval_loss | 1.250 |" in text
    assert "| a red circle | a red \\| circle |" in text  # a pipe inside a caption does not break the table
    assert "More information needed" not in text and "More Information Needed" not in text

    # A full evaluation replaces the Trainer's numbers with the report's tables, once, whatever the repetitions.
    write_report(tmp_path / "report", METRICS)
    report = (tmp_path / "report" / "report.md").read_text()
    for _ in range(2):
        update_evaluation(tmp_path, METRICS)
    text = path.read_text()
    assert text.count(EVALUATION_START) == 1 and "eval_loss" not in text
    for line in ("| image -> text | 0.250 | 1.000 | 1.000 | 2.500 | 2.000 |",
                 "| shuffled images | 0.500 | 0.300 | 0.100 | 0.004321 | 0.400 | 0.100 |",
                 "| **all** | 4 | 0.500 | 0.750 |"):
        assert line in report and line in text
    assert "| a red circle |" in text  # the rest of the card stays


def test_stage1_card_and_a_folder_without_one(tmp_path):
    model, _ = tiny_qformer_and_processor()
    card = ModelCard.load(write_model_card(tmp_path / "q", model, repo="q"))
    assert card.data.pipeline_tag is None and "model.similarity(" in card.text
    assert "| Q-Former | 2 layers x 32, 4 queries |" in card.text and "Not evaluated yet" in card.text
    with pytest.raises(UserError, match="no evaluation section"):
        update_evaluation(tmp_path / "elsewhere", METRICS)
