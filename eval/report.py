"""The evaluation report: metrics.json, report.md with tables and pictures, curves.png from training logs.

The same tables go into the model card: `write_report` returns them as a markdown section
(`model_card_section`), so the numbers on the Hub page are the numbers of the report.
"""

import csv
import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

from .figures import plt, save_figure

_CAPTION_COLUMNS = [("bleu_1", "BLEU-1"), ("bleu_2", "BLEU-2"), ("bleu_3", "BLEU-3"), ("bleu_4", "BLEU-4"),
                    ("meteor", "METEOR"), ("rouge_l", "ROUGE-L"), ("cider", "CIDEr-D")]
_SCENE_COLUMNS = [("scene_exact_match", "exact scene"), ("parse_rate", "parses"), ("object_precision", "object P"),
                  ("object_recall", "object R"), ("object_f1", "object F1")]


def _table(header: list[str], rows: list[list]) -> str:
    """A markdown table; floats get 3 decimals (4 significant digits for values under 0.01)."""
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}" if 0 < abs(value) < 0.01 else f"{value:.3f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def retrieval_table(scores: Mapping[str, float]) -> str:
    """Recall@1/5/10 and ranks, one row per direction."""
    keys = ["r1", "r5", "r10", "mean_rank", "median_rank"]
    rows = [[label] + [scores[f"{d}_{k}"] for k in keys] for d, label in (("i2t", "image -> text"),
                                                                            ("t2i", "text -> image"))]
    return _table(["direction", "R@1", "R@5", "R@10", "mean rank", "median rank"], rows)


def _right_and_shuffled_table(metrics: Mapping, key: str, columns: list[tuple[str, str]]) -> str:
    """One row for `metrics[key]` (right images) and one for `metrics[key + "_shuffled"]` when present;
    only the columns every row has."""
    runs = [(label, metrics[k]) for k, label in ((key, "right images"), (f"{key}_shuffled", "shuffled images"))
            if k in metrics]
    shown = [(k, name) for k, name in columns if all(k in scores for _, scores in runs)]
    return _table(["images"] + [name for _, name in shown], [[label] + [s[k] for k, _ in shown] for label, s in runs])


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
    return _table(["question type", "questions", "exact match", "accuracy"], rows)


def _metric_notes(metrics: Mapping) -> list[str]:
    """How each number present was computed, one line per evaluation."""
    decoding = metrics.get("meta", {}).get("decoding", "greedy")
    notes = []
    if "retrieval" in metrics:
        notes.append("Retrieval: every image against every caption of the split; a caption of the same scene counts "
                     "as correct; exactly tied scores count at their expected place under a random order.")
    if "captioning" in metrics:
        notes.append("Captioning: pycocoevalcap's BLEU, ROUGE-L and CIDEr-D (with METEOR when Java was available), "
                     f"computed once over the whole split; {decoding} decoding.")
    if "captioning_shuffled" in metrics:
        notes.append("Shuffled images: each image captioned from another scene's picture and scored against its own "
                     "references, i.e. what the caption template earns without looking.")
    if "vqa" in metrics:
        notes.append("VQA: accuracy after lowercasing and removing punctuation and articles, number words as digits.")
    return notes


def model_card_section(metrics: Mapping) -> str:
    """The evaluation tables as a markdown section for a model card (no pictures)."""
    meta = metrics.get("meta", {})
    lines = ["## Evaluation", ""]
    if meta:
        lines += [f"Evaluated on `{meta.get('data', '?')}` ({meta.get('num_samples', '?')} images).", ""]
    if "retrieval" in metrics:
        lines += ["### Image-text retrieval", "", retrieval_table(metrics["retrieval"]), ""]
    if "captioning" in metrics:
        lines += ["### Captioning", "", captioning_table(metrics), ""]
    if "caption_scene" in metrics:
        lines += ["### Captions against the drawn scene", "", scene_table(metrics), ""]
    if "vqa" in metrics:
        lines += ["### Visual question answering", "", vqa_table(metrics["vqa"]), ""]
    lines += [f"- {note}" for note in _metric_notes(metrics)]
    return "\n".join(lines).rstrip() + "\n"


def load_log_history(path: str | Path) -> list[dict]:
    """The `log_history` of a Trainer's `trainer_state.json` (a file, or a folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "trainer_state.json"
    with path.open(encoding="utf-8") as f:
        state = json.load(f)
    if "log_history" not in state:
        raise ValueError(f"{path} has no 'log_history'; pass the trainer_state.json the Trainer saved.")
    return state["log_history"]


def plot_training_curves(log_histories: Mapping[str, list[dict]], path: str | Path) -> Path:
    """Loss (train and eval), learning rate and any other eval metric against the step, one colour per run.

    Args:
        log_histories: run label (e.g. "stage 1") -> a Trainer `log_history`.
        path: where the PNG goes: 5 x 3.8 inches per panel at 100 dpi, 2 panels, 3 with eval metrics.
    """
    def series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
        points = [(e["step"], e[key]) for e in history if "step" in e and _finite(e.get(key))]
        return [s for s, _ in points], [v for _, v in points]

    # Evaluation metrics other than the loss; the Trainer's timing entries are not curves worth drawing.
    eval_keys = sorted({k for h in log_histories.values() for e in h for k in e
                        if k.startswith("eval_") and k != "eval_loss" and not k.endswith(("_runtime", "_per_second"))})
    titles = ["loss", "learning rate"] + (["eval metrics"] if eval_keys else [])
    fig, axes = plt.subplots(1, len(titles), figsize=(5.0 * len(titles), 3.8), squeeze=False)
    axes = axes[0]
    for index, (label, history) in enumerate(log_histories.items()):
        colour = f"C{index}"
        axes[0].plot(*series(history, "loss"), color=colour, label=f"{label} train")
        axes[0].plot(*series(history, "eval_loss"), "o--", color=colour, label=f"{label} eval")
        axes[1].plot(*series(history, "learning_rate"), color=colour, label=label)
        for style, key in enumerate(eval_keys):
            axes[2].plot(*series(history, key), marker="o", linestyle=["-", "--", ":", "-."][style % 4],
                         color=colour, label=f"{label} {key.removeprefix('eval_')}")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        # Runs without a series still got an (empty) line; only labelled data belong in the legend.
        handles = [(h, lab) for h, lab in zip(*ax.get_legend_handles_labels()) if len(h.get_xdata())]
        if handles:
            ax.legend(*zip(*handles), fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _sample_captions(out_dir: Path, limit: int = 8) -> str | None:
    """A table of the first generated captions next to their first reference, from captions.csv."""
    path = out_dir / "captions.csv"
    if not path.exists():
        return None
    with path.open(newline="", encoding="utf-8") as f:
        rows = [r for _, r in zip(range(limit), csv.DictReader(f))]
    return _table(["id", "generated", "reference"],
                  [[r["id"], _cell_text(r["generated"]), _cell_text(json.loads(r["references"])[0])] for r in rows])


def _cell_text(text: str) -> str:
    """Text safe inside a markdown table cell (an untrained model writes pipes and control bytes too)."""
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    return text.replace("|", "\\|")


def _picture(out_dir: Path, name: str, caption: str) -> list[str]:
    """Markdown lines showing `out_dir/name` with a caption, or nothing when the file is not there."""
    return [f"![{caption}]({name})", "", f"*{caption}*", ""] if (out_dir / name).exists() else []


def write_report(
    out_dir: str | Path,
    metrics: Mapping,
    log_histories: Mapping[str, list[dict]] | None = None,
) -> str:
    """Writes `metrics.json`, `curves.png` (when training logs are given) and `report.md` into `out_dir`.

    Args:
        metrics: `{"meta": {"model", "data", "num_samples", "decoding"}, "retrieval": ..., "captioning": ...,
            "captioning_shuffled": ..., "caption_scene": ..., "caption_scene_shuffled": ..., "vqa": ...}`;
            any part may be missing. Pictures already in `out_dir` (similarity_grid.png, captions.png) are shown.
        log_histories: run label -> Trainer `log_history` (see `load_log_history`).

    Returns:
        the model-card section (`model_card_section`).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    if log_histories:
        plot_training_curves(log_histories, out_dir / "curves.png")

    meta = metrics.get("meta", {})
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# Evaluation report", "", f"Model `{meta.get('model', '?')}` on `{meta.get('data', '?')}` "
             f"({meta.get('num_samples', '?')} images), {when}.", ""]
    if "retrieval" in metrics:
        lines += ["## Image-text retrieval", "", retrieval_table(metrics["retrieval"]), ""]
        lines += _picture(out_dir, "similarity_grid.png",
                          "Similarity of the first images and captions; outlined cells are true pairs.")
    if "captioning" in metrics:
        lines += ["## Captioning", "", captioning_table(metrics), ""]
        if "caption_scene" in metrics:
            lines += ["Captions read back into scenes and compared with the drawn scene:", "", scene_table(metrics), ""]
        lines += _picture(out_dir, "captions.png", "Generated (blue) and reference (grey) captions.")
        samples = _sample_captions(out_dir)
        if samples:
            lines += ["All captions are in `captions.csv`; the first ones:", "", samples, ""]
    if "vqa" in metrics:
        lines += ["## Visual question answering", "", vqa_table(metrics["vqa"]), ""]
        lines += ["Every answer is in `vqa.csv`.", ""]
    if log_histories:
        lines += ["## Training curves", ""]
        lines += _picture(out_dir, "curves.png", "Loss, learning rate and evaluation metrics against the step.")
    notes = _metric_notes(metrics)
    if notes:
        lines += ["## How these numbers are computed", ""] + [f"- {note}" for note in notes] + [""]
    (out_dir / "report.md").write_text("\n".join(lines), encoding="utf-8")
    return model_card_section(metrics)
