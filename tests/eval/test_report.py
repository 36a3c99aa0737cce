"""The report: metrics.json, markdown tables with the given numbers, curves from Trainer logs."""

import json

from PIL import Image

from eval.report import load_log_history, plot_training_curves, write_report

METRICS = {
    "meta": {"model": "m", "data": "d", "num_samples": 4, "decoding": "beam"},
    "retrieval": {"i2t_r1": 0.25, "i2t_r5": 1.0, "i2t_r10": 1.0, "i2t_mean_rank": 2.5, "i2t_median_rank": 2.0,
                  "t2i_r1": 0.5, "t2i_r5": 1.0, "t2i_r10": 1.0, "t2i_mean_rank": 1.75, "t2i_median_rank": 1.5},
    "captioning": {"bleu_1": 0.8, "bleu_2": 0.6, "bleu_3": 0.4, "bleu_4": 0.2, "rouge_l": 0.7, "cider": 1.234},
    "captioning_shuffled": {"bleu_1": 0.5, "bleu_2": 0.3, "bleu_3": 0.1, "bleu_4": 0.004321, "rouge_l": 0.4,
                            "cider": 0.1},
    "vqa": {"exact_match": 0.5, "accuracy": 0.75, "num_questions": 4,
            "per_type": {"color": {"exact_match": 0.0, "accuracy": 0.5, "num_questions": 2},
                         "count": {"exact_match": 1.0, "accuracy": 1.0, "num_questions": 2}}},
}


def _history(scale: float, with_eval_metric: bool) -> list[dict]:
    history = [{"step": s, "epoch": s / 10, "loss": scale / s, "learning_rate": 1e-3, "grad_norm": 1.0}
               for s in range(1, 11)]
    history.append({"step": 10, "eval_loss": scale / 8, "eval_runtime": 1.0, "eval_samples_per_second": 9.0,
                    **({"eval_i2t_r1": 0.3} if with_eval_metric else {})})
    history.append({"step": 10, "train_runtime": 5.0, "train_loss": 0.3})  # the Trainer's closing entry
    return history


def test_report_tables_hold_the_numbers(tmp_path):
    assert write_report(tmp_path, METRICS) == tmp_path / "report.md"
    assert json.loads((tmp_path / "metrics.json").read_text()) == METRICS
    report = (tmp_path / "report.md").read_text()
    assert "| image -> text | 0.250 | 1.000 | 1.000 | 2.500 | 2.000 |" in report
    assert "| text -> image | 0.500 | 1.000 | 1.000 | 1.750 | 1.500 |" in report
    # Columns in COCO order; METEOR is absent from both runs so it has no column; tiny values keep 4 digits.
    assert "| images | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | ROUGE-L | CIDEr-D |" in report
    assert "| right images | 0.800 | 0.600 | 0.400 | 0.200 | 0.700 | 1.234 |" in report
    assert "| shuffled images | 0.500 | 0.300 | 0.100 | 0.004321 | 0.400 | 0.100 |" in report
    assert "| color | 2 | 0.000 | 0.500 |" in report and "| **all** | 4 | 0.500 | 0.750 |" in report
    assert "beam decoding" in report
    assert "![" not in report  # no picture files in the folder, so none is linked


def test_curves_from_trainer_state(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "trainer_state.json").write_text(json.dumps({"log_history": _history(2.0, True)}))
    histories = {"stage 1": load_log_history(tmp_path / "run"), "stage 2": _history(3.0, False)}
    path = plot_training_curves(histories, tmp_path / "curves.png")
    with Image.open(path) as png:  # three panels: loss, learning rate, eval metrics
        assert png.format == "PNG" and png.size == (1500, 380)
    plot_training_curves({"stage 2": _history(3.0, False)}, tmp_path / "two.png")
    with Image.open(tmp_path / "two.png") as png:  # no eval metric besides the loss: two panels
        assert png.size == (1000, 380)

    write_report(tmp_path / "report", METRICS, histories)
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Training curves" in report and "(curves.png)" in report
    assert (tmp_path / "report" / "curves.png").exists()
