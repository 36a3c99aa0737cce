"""What the demo reports: the headline numbers of each stage, untrained against trained, as metrics.json, a table
and report.md."""

import json
from pathlib import Path

from eval.tables import markdown_table

STAGE1_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
# Seen vs held-out twins, when the data was generated with held-out combinations (see `eval.holdout`).
GROUPS = ("seen", "held_out")


def stage1_scores(metrics: dict) -> dict:
    """The demo's stage-1 numbers from `eval.run.evaluate_model`'s metrics: Recall@K both ways, and R@1 both ways
    seen vs held out (`i2t_r1_seen`, `i2t_r1_held_out`, `t2i_r1_seen`, `t2i_r1_held_out`) when evaluated."""
    retrieval = metrics["retrieval"]
    scores = {key: retrieval[key] for key in STAGE1_KEYS}
    if "held_out" in retrieval:
        scores |= {f"{key}_{group}": retrieval[group][key] for key in ("i2t_r1", "t2i_r1") for group in GROUPS}
    return scores


def stage2_scores(metrics: dict) -> dict:
    """The demo's stage-2 numbers from `eval.run.evaluate_model`'s metrics; with held-out combinations also
    `caption_object_recall_seen`/`_held_out` and `vqa_accuracy_seen`/`_held_out` (each when evaluated)."""
    vqa, scene = metrics["vqa"], metrics["caption_scene"]
    scores = {
        "bleu_4": metrics["captioning"]["bleu_4"],
        "cider": metrics["captioning"]["cider"],
        "cider_shuffled": metrics["captioning_shuffled"]["cider"],
        "vqa_accuracy": vqa["accuracy"],
        "vqa_accuracy_by_type": {kind: block["accuracy"] for kind, block in sorted(vqa["per_type"].items())},
        "caption_scene_exact": scene["scene_exact_match"],
        "caption_object_f1": scene["object_f1"],
    }
    if "object_recall_held_out" in scene:
        scores |= {f"caption_object_recall_{group}": scene[f"object_recall_{group}"] for group in GROUPS}
    if "held_out" in vqa:
        scores |= {f"vqa_accuracy_{group}": vqa[group]["accuracy"] for group in GROUPS}
    return scores


def table(metrics: dict) -> str:
    """`| stage | metric | untrained | trained |` for every number of `metrics` (the demo's metrics.json); "n/a" where
    the untrained evaluation lacks a number (its fewer samples held no held-out combination)."""
    untrained = metrics["untrained"]
    rows = []
    for stage, label in (("stage1", "stage 1"), ("stage2", "stage 2")):
        for key, value in metrics[stage].items():
            if isinstance(value, dict):
                rows += [(label, f"vqa {kind}", untrained[stage][key].get(kind, 0.0), score)
                         for kind, score in value.items()]
            else:
                rows.append((label, key, untrained[stage].get(key, "n/a"), value))
    return markdown_table(["stage", "metric", "untrained", "trained"], rows)


def _holdout_note(metrics: dict) -> list[str]:
    """The sentence explaining the `_seen`/`_held_out` rows, when there are any."""
    if not metrics.get("holdouts"):
        return []
    combos = ", ".join(f"*{text}*" for text in metrics["holdouts"])
    return [
        f"`_held_out` rows: held-out combinations {combos}, which no training image, caption, hard negative or "
        "question shows (validation images do): retrieval with the images holding one (and their captions) as "
        "queries, caption recall of those objects, and the questions about them. `_seen` rows: all the others. "
        "A model that composes colour, shape and size scores about as well on both.", "",
    ]


def write_report(out: Path, metrics: dict) -> None:
    """`out/metrics.json` and `out/report.md` (the table, the pictures, where the details are)."""
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    samples = metrics["samples"]
    body = [
        "# qformer-vlm demo", "",
        f"Tiny models trained from random weights on {samples['train']} synthetic images, evaluated on "
        f"{samples['validation']} validation images (the untrained baselines on the first "
        f"{samples['untrained_validation']}); {metrics['wall_seconds']:.0f} s on {metrics['device']}.",
        "", table(metrics), "",
        "`cider_shuffled`: the trained VLM captioning each image with another image's features. The gap to `cider` "
        "is what the model reads from the picture rather than from the caption template.", "",
        *_holdout_note(metrics),
        "![similarity grid](similarity_grid.png)", "", "![captions](captions.png)", "",
        *(["![captions of held-out combinations](captions_held_out.png)", ""]
          if (out / "captions_held_out.png").exists() else []),
        "![curves](curves.png)", "",
        "Details: eval/qformer/report.md, eval/vlm/report.md, captions.csv, eval/vlm/vqa.csv; the model cards "
        "qformer/README.md and vlm/README.md carry the same evaluation.",
    ]
    (out / "report.md").write_text("\n".join(body) + "\n", encoding="utf-8")


__all__ = ["STAGE1_KEYS", "stage1_scores", "stage2_scores", "table", "write_report"]
