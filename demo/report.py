"""What the demo reports: the headline numbers of each stage, untrained against trained, as metrics.json, a table
and report.md."""

import json
from pathlib import Path

from eval.tables import markdown_table

STAGE1_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


def stage1_scores(metrics: dict) -> dict:
    """The demo's stage-1 numbers from `eval.run.evaluate_model`'s metrics: Recall@K both ways."""
    return {key: metrics["retrieval"][key] for key in STAGE1_KEYS}


def stage2_scores(metrics: dict) -> dict:
    """The demo's stage-2 numbers from `eval.run.evaluate_model`'s metrics."""
    vqa = metrics["vqa"]
    return {
        "bleu_4": metrics["captioning"]["bleu_4"],
        "cider": metrics["captioning"]["cider"],
        "cider_shuffled": metrics["captioning_shuffled"]["cider"],
        "vqa_accuracy": vqa["accuracy"],
        "vqa_accuracy_by_type": {kind: scores["accuracy"] for kind, scores in sorted(vqa["per_type"].items())},
        "caption_scene_exact": metrics["caption_scene"]["scene_exact_match"],
        "caption_object_f1": metrics["caption_scene"]["object_f1"],
    }


def table(metrics: dict) -> str:
    """`| stage | metric | untrained | trained |` for every number of `metrics` (the demo's metrics.json)."""
    untrained = metrics["untrained"]
    rows = [("stage 1", key, untrained["stage1"][key], metrics["stage1"][key]) for key in STAGE1_KEYS]
    for key, value in metrics["stage2"].items():
        if isinstance(value, dict):
            rows += [("stage 2", f"vqa {kind}", untrained["stage2"][key].get(kind, 0.0), score)
                     for kind, score in value.items()]
        else:
            rows.append(("stage 2", key, untrained["stage2"][key], value))
    return markdown_table(["stage", "metric", "untrained", "trained"], rows)


def write_report(out: Path, metrics: dict) -> None:
    """`out/metrics.json` and `out/report.md` (the table, the pictures, where the details are)."""
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    body = [
        "# qformer-vlm demo", "",
        f"Tiny models trained from random weights on {metrics['samples']['train']} synthetic images, evaluated on "
        f"{metrics['samples']['validation']} held-out ones; {metrics['wall_seconds']:.0f} s on {metrics['device']}.",
        "", table(metrics), "",
        "`cider_shuffled`: the trained VLM captioning each image with another image's features. The gap to `cider` "
        "is what the model reads from the picture rather than from the caption template.", "",
        "![similarity grid](similarity_grid.png)", "", "![captions](captions.png)", "", "![curves](curves.png)", "",
        "Details: eval/qformer/report.md, eval/vlm/report.md, captions.csv, eval/vlm/vqa.csv; the model cards "
        "qformer/README.md and vlm/README.md carry the same evaluation.",
    ]
    (out / "report.md").write_text("\n".join(body) + "\n", encoding="utf-8")


__all__ = ["STAGE1_KEYS", "stage1_scores", "stage2_scores", "table", "write_report"]
