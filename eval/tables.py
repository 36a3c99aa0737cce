"""Markdown tables of evaluation numbers: the one table builder behind the report, the model card and the demo.

`markdown_table` formats any table; the others lay out one evaluation's metrics (the dict `eval.run.evaluate_model`
returns) the same way wherever they are shown, and `metric_tables` gives each evaluation present with its title.
"""

from collections.abc import Mapping, Sequence

_CAPTION_COLUMNS = [("bleu_1", "BLEU-1"), ("bleu_2", "BLEU-2"), ("bleu_3", "BLEU-3"), ("bleu_4", "BLEU-4"),
                    ("meteor", "METEOR"), ("rouge_l", "ROUGE-L"), ("cider", "CIDEr-D")]
_SCENE_COLUMNS = [("scene_exact_match", "exact scene"), ("parse_rate", "parses"), ("object_precision", "object P"),
                  ("object_recall", "object R"), ("object_f1", "object F1")]


def _cell(value) -> str:
    """Floats with 3 decimals (4 significant digits under 0.01, so small values keep their size); text made safe
    inside a cell (an untrained model writes pipes and control bytes too)."""
    if isinstance(value, float):
        return f"{value:.4g}" if 0 < abs(value) < 0.01 else f"{value:.3f}"
    text = "".join(ch if ch.isprintable() else " " for ch in str(value))
    return text.replace("|", "\\|")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A markdown table: `header` and one line per row, values formatted by `_cell`."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def retrieval_table(scores: Mapping[str, float]) -> str:
    """Recall@1/5/10 and ranks, one row per direction."""
    keys = ["r1", "r5", "r10", "mean_rank", "median_rank"]
    rows = [[label] + [scores[f"{d}_{k}"] for k in keys] for d, label in (("i2t", "image -> text"),
                                                                            ("t2i", "text -> image"))]
    return markdown_table(["direction", "R@1", "R@5", "R@10", "mean rank", "median rank"], rows)


def _right_and_shuffled_table(metrics: Mapping, key: str, columns: list[tuple[str, str]]) -> str:
    """One row for `metrics[key]` (right images) and one for `metrics[key + "_shuffled"]` when present;
    only the columns every row has."""
    runs = [(label, metrics[k]) for k, label in ((key, "right images"), (f"{key}_shuffled", "shuffled images"))
            if k in metrics]
    shown = [(k, name) for k, name in columns if all(k in scores for _, scores in runs)]
    rows = [[label] + [s[k] for k, _ in shown] for label, s in runs]
    return markdown_table(["images"] + [name for _, name in shown], rows)


def captioning_table(metrics: Mapping) -> str:
    """COCO caption scores for the right images and, when present, for the shuffled ones."""
    return _right_and_shuffled_table(metrics, "captioning", _CAPTION_COLUMNS)


def scene_table(metrics: Mapping) -> str:
    """Caption-vs-scene agreement (synthetic data) for the right and, when present, the shuffled images."""
    return _right_and_shuffled_table(metrics, "caption_scene", _SCENE_COLUMNS)


def vqa_table(scores: Mapping) -> str:
    """Exact-match and normalised accuracy, per question type and overall."""
    rows = [[kind, s["num_questions"], s["exact_match"], s["accuracy"]] for kind, s in scores["per_type"].items()]
    rows.append(["**all**", scores["num_questions"], scores["exact_match"], scores["accuracy"]])
    return markdown_table(["question type", "questions", "exact match", "accuracy"], rows)


def metric_tables(metrics: Mapping) -> list[tuple[str, str]]:
    """`(title, table)` for each evaluation present in `metrics`, in the report's order."""
    tables = []
    if "retrieval" in metrics:
        tables.append(("Image-text retrieval", retrieval_table(metrics["retrieval"])))
    if "captioning" in metrics:
        tables.append(("Captioning", captioning_table(metrics)))
    if "caption_scene" in metrics:
        tables.append(("Captions against the drawn scene", scene_table(metrics)))
    if "vqa" in metrics:
        tables.append(("Visual question answering", vqa_table(metrics["vqa"])))
    return tables


def metric_notes(metrics: Mapping) -> list[str]:
    """How each number present was computed, one line per evaluation."""
    meta = metrics.get("meta", {})
    decoding = meta.get("decoding", "greedy")
    notes = []
    if "retrieval" in metrics:
        if meta.get("retrieval_texts") == "references":
            texts = ("every reference caption of every image (each a text -> image query; an image -> text query hits "
                     "at K when any caption of its image is in the top K)")
        else:
            texts = "every caption of the split"
        notes.append(f"Retrieval: every image against {texts}; a caption of the same image or a duplicate of it counts "
                     "as correct; exactly tied scores count at their expected place under a random order.")
    if "captioning" in metrics:
        notes.append("Captioning: pycocoevalcap's BLEU, ROUGE-L and CIDEr-D (with METEOR when Java was available) "
                     f"against every reference caption of each image, computed once over the whole split; {decoding} "
                     "decoding.")
    if "captioning_shuffled" in metrics:
        notes.append("Shuffled images: each image captioned from another scene's picture and scored against its own "
                     "references, i.e. what the caption template earns without looking.")
    if "vqa" in metrics:
        notes.append("VQA: accuracy after lowercasing and removing punctuation and articles, number words as digits.")
    return notes


__all__ = [
    "captioning_table", "markdown_table", "metric_notes", "metric_tables", "retrieval_table", "scene_table",
    "vqa_table",
]
