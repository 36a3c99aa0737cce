"""The evaluation report: metrics.json, report.md with tables and pictures, curves.png from training logs.

Its tables come from `eval.tables`, which the model card (`training.model_card`) shows too: the numbers on a model's
page are the numbers of its report.
"""

import csv
import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

from cli import UserError

from .figures import plt, save_figure
from .tables import captioning_table, markdown_table, metric_notes, retrieval_table, scene_table, vqa_table


def load_log_history(path: str | Path) -> list[dict]:
    """The `log_history` of a Trainer's `trainer_state.json` (a file, or a folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "trainer_state.json"
    with path.open(encoding="utf-8") as f:
        state = json.load(f)
    if "log_history" not in state:
        raise UserError(f"{path} has no 'log_history'; pass the trainer_state.json the Trainer saved")
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
    return markdown_table(["id", "generated", "reference"],
                          [[r["id"], r["generated"], json.loads(r["references"])[0]] for r in rows])


def _picture(out_dir: Path, name: str, caption: str) -> list[str]:
    """Markdown lines showing `out_dir/name` with a caption, or nothing when the file is not there."""
    return [f"![{caption}]({name})", "", f"*{caption}*", ""] if (out_dir / name).exists() else []


def _holdout_table(metrics: Mapping) -> str | None:
    """Seen vs held-out scores side by side (data generated with held-out combinations), or None without them."""
    columns = []  # (header, seen, held out)
    retrieval, scene, vqa = (metrics.get(key, {}) for key in ("retrieval", "caption_scene", "vqa"))
    if "held_out" in retrieval:
        columns += [(name, retrieval["seen"][key], retrieval["held_out"][key])
                    for key, name in (("i2t_r1", "image -> text R@1"), ("t2i_r1", "text -> image R@1"),
                                      ("num_images", "images"))]
    if "object_recall_held_out" in scene:
        columns += [("caption object R", scene["object_recall_seen"], scene["object_recall_held_out"]),
                    ("objects", scene["objects_seen"], scene["objects_held_out"])]
    if "held_out" in vqa:
        columns += [("VQA accuracy", vqa["seen"]["accuracy"], vqa["held_out"]["accuracy"]),
                    ("questions", vqa["seen"]["num_questions"], vqa["held_out"]["num_questions"])]
    if not columns:
        return None
    rows = [[label] + [column[index] for column in columns] for index, label in ((1, "seen"), (2, "held out"))]
    return markdown_table(["combinations"] + [column[0] for column in columns], rows)


def write_report(
    out_dir: str | Path,
    metrics: Mapping,
    log_histories: Mapping[str, list[dict]] | None = None,
) -> Path:
    """Writes `metrics.json`, `curves.png` (when training logs are given) and `report.md` into `out_dir`.

    Args:
        metrics: `{"meta": {"model", "data", "num_samples", "decoding"}, "retrieval": ..., "captioning": ...,
            "captioning_shuffled": ..., "caption_scene": ..., "caption_scene_shuffled": ..., "vqa": ...}`;
            any part may be missing. Seen vs held-out scores (see `eval.run.evaluate_model`) get a table of their
            own. Pictures already in `out_dir` (similarity_grid.png, captions.png) are shown.
        log_histories: run label -> Trainer `log_history` (see `load_log_history`).

    Returns:
        the path of `report.md`.
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
        lines += _picture(out_dir, "captions_held_out.png",
                          "Images holding a held-out combination (never in training): generated (blue) and reference "
                          "(grey) captions.")
        samples = _sample_captions(out_dir)
        if samples:
            lines += ["All captions are in `captions.csv`; the first ones:", "", samples, ""]
    if "vqa" in metrics:
        lines += ["## Visual question answering", "", vqa_table(metrics["vqa"]), ""]
        lines += ["Every answer is in `vqa.csv`.", ""]
    holdouts = _holdout_table(metrics)
    if holdouts:
        combos = ", ".join(f"*{text}*" for text in meta.get("holdouts", []))
        lines += ["## Seen vs held-out combinations", "",
                  f"Held out of training: {combos} (in no training image, caption, hard negative or question). "
                  "Retrieval: the images showing one, and their captions, as queries among all candidates; caption "
                  "recall: the objects of those combinations; VQA: the questions about them. Seen: all the others.",
                  "", holdouts, ""]
    if log_histories:
        lines += ["## Training curves", ""]
        lines += _picture(out_dir, "curves.png", "Loss, learning rate and evaluation metrics against the step.")
    notes = metric_notes(metrics)
    if notes:
        lines += ["## How these numbers are computed", ""] + [f"- {note}" for note in notes] + [""]
    (out_dir / "report.md").write_text("\n".join(lines), encoding="utf-8")
    return out_dir / "report.md"
