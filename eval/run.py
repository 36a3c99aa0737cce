"""Evaluate a saved model folder (or Hub id) on a data source: the steps behind `python -m eval`.

A stage-1 Q-Former gets retrieval. A VLM gets captioning (optionally also with shuffled images),
VQA when the rows have question-answer pairs, caption-vs-scene checks on synthetic shapes data, and
retrieval through its Q-Former when the Q-Former's text tokenizer can be found. On shapes data generated
with held-out combinations (recorded in its generation.json) each of these is also scored seen vs held out
(`eval.holdout`).

Standard sets (COCO Karpathy test, Flickr30k test) come as one row per image with a list of
reference captions: the column mapping names the image, caption-list and image-id columns, every
caption of an image is a captioning reference, and `retrieval_texts="references"` makes each of
them a retrieval text (the standard protocol). VQA sets (VQAv2, TextVQA) come as one row per question
with a list of human answers and no captions: the question and answer columns are mapped, VQA is scored
(also by the official VQAv2 accuracy), and captioning and retrieval are skipped.
"""

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from cli import UserError
from data.loading import load_image_text_dataset
from data.shapes import Holdout, parse_caption, parse_holdout
from modeling import QFormerConfig
from modeling.model_folders import QFORMER_OR_VLM, check_model_source, hub_errors, load_whole_model

from .captioning import caption_gallery, evaluate_captioning, reference_captions
from .holdout import held_out_question_test, held_out_rows, recorded_holdouts
from .report import write_report
from .retrieval import evaluate_retrieval
from .scene import caption_scene_metrics
from .tables import markdown_table
from .vqa import evaluate_vqa

logger = logging.getLogger(__name__)

# Where a VLM folder keeps its Q-Former's text tokenizer (the sub-folder name InstructBLIP's processor uses).
QFORMER_TOKENIZER_SUBFOLDER = "qformer_tokenizer"
# What retrieval matches each image against: its caption only, or all its reference captions.
RETRIEVAL_TEXTS = ("caption", "references")


def load_rows(
    data: str, split: str | None, max_samples: int | None, *, image_column: str | None = None,
    caption_column: str | None = None, id_column: str | None = None, question_column: str | None = None,
    answer_column: str | None = None,
) -> list[dict]:
    """The evaluation rows (decoded), at most `max_samples` from the start of the split.

    The columns are for `datasets` sources (guessed when None); `caption_column` also names a field of each shard
    sample's .json (default there: the .txt member). `caption_column` may hold a list of captions per image;
    `id_column` names each image: it becomes the row's key (the id in captions.csv) and its duplicate group,
    so images with different ids never count as each other's duplicates. `question_column` and `answer_column`
    (together) give each row a question-answer pair; an answer column holding a list of human answers (VQAv2,
    TextVQA) keeps them all in the pair's `answers`. Without a caption column such rows have an empty caption.
    """
    dataset = load_image_text_dataset(
        data, split=split, image_column=image_column, caption_column=caption_column, key_column=id_column,
        group_column=id_column, question_column=question_column, answer_column=answer_column, answer_lists=True,
    )
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    return [dataset[i] for i in range(len(dataset))]


def qformer_text_tokenizer(model_name_or_path: str, processor, override: str | None = None):
    """The tokenizer of a VLM's Q-Former text side, or None when it cannot be found.

    Looked for in this order: `override`, a `qformer_tokenizer` attribute of the processor, the
    `qformer_tokenizer/` sub-folder of the model.
    """
    if override is not None:
        return AutoTokenizer.from_pretrained(override)
    if getattr(processor, "qformer_tokenizer", None) is not None:
        return processor.qformer_tokenizer
    try:
        return AutoTokenizer.from_pretrained(model_name_or_path, subfolder=QFORMER_TOKENIZER_SUBFOLDER)
    except (OSError, ValueError):
        return None


def _scene_checks(rows: list[dict], generated: list[str], holdouts: list[Holdout]) -> dict | None:
    """Caption-vs-scene scores (split seen vs held out by `holdouts`, when any) when every reference caption
    parses as a shapes scene (synthetic data)."""
    scenes = [parse_caption(row["caption"]) for row in rows]
    if any(scene is None for scene in scenes):
        return None
    return caption_scene_metrics(generated, scenes, holdouts)


def _check_vqa_only(rows: list[dict], is_qformer: bool, vqa: bool, data: str) -> None:
    """Raises `UserError` when rows without captions leave nothing to evaluate."""
    if is_qformer:
        raise UserError(f"{data} has no captions, and a stage-1 Q-Former is evaluated by retrieval against captions; "
                        "give data with captions (--caption-column), or evaluate a VLM for VQA")
    if not vqa or not any(row.get("qa") for row in rows):
        raise UserError(f"{data} has no captions and no questions to evaluate; give --caption-column, or "
                        "--question-column and --answer-column" + (" without --no-vqa" if not vqa else ""))


def evaluate_model(
    model_name_or_path: str,
    data: str,
    out_dir: str | Path,
    *,
    split: str | None = None,
    max_samples: int | None = None,
    batch_size: int = 32,
    strategy: str = "greedy",
    max_new_tokens: int = 40,
    shuffled: bool = True,
    vqa: bool = True,
    meteor: bool | None = None,
    qformer_tokenizer: str | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    id_column: str | None = None,
    question_column: str | None = None,
    answer_column: str | None = None,
    retrieval_texts: str = "caption",
    log_histories: Mapping[str, list[dict]] | None = None,
    device: str | None = None,
) -> dict:
    """Runs every evaluation that fits the model and writes the report into `out_dir`.

    `image_column`, `caption_column`, `id_column`, `question_column`, `answer_column` map a `datasets` source's
    columns (see `load_rows`). Rows without captions (a VQA set) get VQA only: captioning and retrieval are skipped.
    `retrieval_texts`: "caption" matches each image with its caption; "references" with every reference caption
    of every image, an image -> text hit being any of its own (COCO/Flickr30k's protocol).

    Shapes data generated with held-out combinations adds, when the rows hold both seen and held-out objects,
    seen vs held-out scores: `retrieval["seen"]`, `retrieval["held_out"]` (queries restricted to the rows whose
    scene holds no / some held-out object, ranked among all candidates), `caption_scene["object_recall_seen"]`,
    `["object_recall_held_out"]`, `["objects_seen"]`, `["objects_held_out"]`, and `vqa["seen"]`, `vqa["held_out"]`
    (by the object each question is about); `meta["holdouts"]` names the combinations.

    Returns:
        the metrics, also written to `out_dir/metrics.json` (the files are described in `eval.report.write_report`).
    """
    if retrieval_texts not in RETRIEVAL_TEXTS:
        raise ValueError(f"retrieval_texts must be one of {RETRIEVAL_TEXTS}, got {retrieval_texts!r}")
    out_dir = Path(out_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_name_or_path = check_model_source(model_name_or_path, "--model", QFORMER_OR_VLM)
    # Read before the model loads, so a damaged generation.json is reported at once.
    holdouts = recorded_holdouts(data)
    # The model before the rows: a model that does not fit this code is reported before minutes of data.
    with hub_errors("--model", model_name_or_path):
        processor = AutoProcessor.from_pretrained(model_name_or_path, trust_remote_code=True)
        config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=True)
        is_qformer = config.model_type == QFormerConfig.model_type
        auto_class = AutoModel if is_qformer else AutoModelForImageTextToText
        model = load_whole_model(auto_class, model_name_or_path, "--model", trust_remote_code=True).to(device)
    rows = load_rows(
        data, split, max_samples, image_column=image_column, caption_column=caption_column, id_column=id_column,
        question_column=question_column, answer_column=answer_column,
    )
    # The loader gives every row a caption or none (question-answer data without a caption column).
    captioned = any(row["caption"] for row in rows)
    if not captioned:
        _check_vqa_only(rows, is_qformer, vqa, data)
        logger.info("no captions in %s: captioning and retrieval skipped, VQA only", data)
    texts = [reference_captions(row) for row in rows] if retrieval_texts == "references" and captioned else None
    rules = [parse_holdout(text) for text in holdouts]
    held_out = held_out_rows(rows, rules)
    if held_out is None:
        rules = []  # no split: no holdouts, or the rows are not of both kinds
    subsets = {"held_out": held_out, "seen": [not flag for flag in held_out]} if held_out else None
    model_type = config.model_type
    logger.info("evaluating %s (%s) on %d samples of %s", model_name_or_path, model_type, len(rows), data)
    metrics: dict = {"meta": {"model": str(model_name_or_path), "data": f"{data}" + (f" [{split}]" if split else ""),
                              "num_samples": len(rows), "model_type": model_type, "decoding": strategy,
                              "retrieval_texts": retrieval_texts}}
    if caption_column is not None:  # which of the data's captions the texts were (e.g. stage 1's word order)
        metrics["meta"]["caption_column"] = caption_column
    if rules:
        metrics["meta"]["holdouts"] = holdouts

    if not captioned:
        metrics["vqa"] = evaluate_vqa(model, processor, rows, out_dir, batch_size=batch_size)
    elif is_qformer:
        metrics["retrieval"] = evaluate_retrieval(
            model, rows, processor.image_processor, processor.tokenizer, out_dir, batch_size=batch_size, texts=texts,
            row_subsets=subsets,
        )
    else:
        captions = evaluate_captioning(
            model, processor, rows, out_dir, batch_size=batch_size, strategy=strategy,
            max_new_tokens=max_new_tokens, shuffled=shuffled, meteor=meteor,
        )
        metrics["captioning"] = captions["captioning"]
        if shuffled:
            metrics["captioning_shuffled"] = captions["captioning_shuffled"]
        for suffix in ("", "_shuffled") if shuffled else ("",):
            scene = _scene_checks(rows, captions[f"captions{suffix}"], rules)
            if scene is not None:
                metrics[f"caption_scene{suffix}"] = scene
        if held_out:  # the pictures people look for first: what the model says of what it never saw
            shown = [i for i, flag in enumerate(held_out) if flag][:8]
            caption_gallery([rows[i]["image"] for i in shown], [captions["captions"][i] for i in shown],
                            [rows[i]["caption"] for i in shown], out_dir / "captions_held_out.png")
        if vqa and any(row.get("qa") for row in rows):
            metrics["vqa"] = evaluate_vqa(model, processor, rows, out_dir, batch_size=batch_size,
                                          held_out=held_out_question_test(rows, rules) if rules else None)
        tokenizer = qformer_text_tokenizer(model_name_or_path, processor, qformer_tokenizer)
        if tokenizer is None:
            logger.warning(
                "no retrieval: the Q-Former's text tokenizer is not in %s/%s; pass --qformer-tokenizer "
                "<stage-1 folder> to evaluate retrieval through the VLM's Q-Former",
                model_name_or_path, QFORMER_TOKENIZER_SUBFOLDER,
            )
        else:
            metrics["retrieval"] = evaluate_retrieval(
                model.qformer, rows, processor.image_processor, tokenizer, out_dir, batch_size=batch_size, texts=texts,
                row_subsets=subsets,
            )
    report = write_report(out_dir, metrics, log_histories)
    if "vqav2_accuracy" in metrics.get("vqa", {}):
        _add_vqav2_section(report, metrics["vqa"]["vqav2_accuracy"])
    return metrics


# The line of report.md that ends its VQA section; the VQAv2 accuracy goes right after it.
_VQA_SECTION_END = "Every answer is in `vqa.csv`.\n"


def _add_vqav2_section(report: Path, scores: Mapping) -> None:
    """Adds the VQAv2 accuracy (`eval.vqav2_accuracy.vqav2_scores`'s dict) to report.md after its VQA section:
    overall and per answer type, then per question type when the data gives them."""
    lines = ["### VQAv2 accuracy", "",
             f"The official VQAv2 measure over the {scores['num_questions']} questions with human answers: each answer "
             "scores min(#humans who gave it / 3, 1), averaged over the 10 leave-one-out subsets of the human "
             "answers. As in the official script, where the human answers disagree all are compared lowercased, "
             "without punctuation and articles and with number words as digits; where they agree, as written.", ""]
    for key, title in (("per_answer_type", "answer type"), ("per_question_type", "question type")):
        per_type = scores[key]
        if per_type or key == "per_answer_type":
            rows = [[kind, s["num_questions"], s["accuracy"]] for kind, s in per_type.items()]
            rows.append(["**all**", scores["num_questions"], scores["accuracy"]])
            lines += [markdown_table([title, "questions", "VQAv2 accuracy"], rows), ""]
    text = report.read_text(encoding="utf-8")
    section = "\n".join(lines) + "\n"
    at = text.find(_VQA_SECTION_END)
    at = len(text) if at < 0 else at + len(_VQA_SECTION_END)
    report.write_text(text[:at] + "\n" + section + text[at:], encoding="utf-8")
