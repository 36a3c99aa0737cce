"""Training and evaluation splits for both stages, through the one loading path in data.loading."""

import logging

from datasets import Dataset

from data.loading import SkipReport, load_image_text_dataset, split_train_eval

from .arguments import DataArguments

logger = logging.getLogger(__name__)


def load_splits(data_args: DataArguments, seed: int) -> tuple[Dataset, Dataset]:
    """The train split and the evaluation split (`eval_data`, or a duplicate-safe hold-out of `train_data`).

    Bad samples are dropped by the loader, counted by reason and logged here.
    """
    report = SkipReport()
    columns = {"image_column": data_args.image_column, "caption_column": data_args.caption_column}
    if data_args.eval_data:
        train = load_image_text_dataset(data_args.train_data, split="train", report=report, **columns)
        evaluation = load_image_text_dataset(data_args.eval_data, split="validation", report=report, **columns)
    else:
        full = load_image_text_dataset(data_args.train_data, split="train", report=report, **columns)
        parts = split_train_eval(full, eval_size=data_args.eval_size, seed=seed)
        train, evaluation = parts["train"], parts["eval"]
    report.log(logger, prefix="data: ")
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    if data_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(data_args.max_eval_samples, len(evaluation))))
    logger.info("%d training and %d evaluation samples", len(train), len(evaluation))
    return train, evaluation


def text_corpus(dataset: Dataset) -> list[str]:
    """Every caption, reference, question and answer: what a tiny preset's tokenizers are trained on."""
    texts = []
    for row in dataset.select_columns(["caption", "references", "qa", "negative_captions"]):
        texts.append(row["caption"])
        texts.extend(row["references"])
        texts.extend(row["negative_captions"])
        for pair in row["qa"]:
            texts.extend((pair["question"], pair["answer"]))
    return texts
