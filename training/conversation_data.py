"""Stage-2 instruction / VQA data: which sources are conversations, their splits, and each sample's length.

A stage-2 source is either image-text data (shards, image folders, caption datasets: `data.loading`, one image, a
caption and question-answer pairs per sample) or conversations in one of `data.conversation_readers`' formats
(LLaVA JSON, the Cauldron / FineVision, TRL's messages, VQA columns: `data.conversation_loading`). Both reach the
`ConversationCollator`. `length_column` gives every sample its token count (text + image tokens, as the collator
builds it), so that samples longer than `max_length` are dropped and counted before training, never cut inside an
answer, and so that `--train_sampling_strategy group_by_length` batches samples of similar length (the Trainer
reads the `length` column; without it, it would count `input_ids`, which the rows do not have).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from datasets import Dataset
from transformers import TrainingArguments

from cli import UserError
from data.conversation_loading import load_conversations
from data.conversation_readers import CONVERSATION_FORMATS, detect_format
from data.conversation_stream import ConversationStream
from data.loading import split_train_eval
from data.sources import open_dataset
from data.tar_shards import is_tar_path, shard_folder

from .arguments import DataArguments
from .conversation_collator import ConversationCollator

logger = logging.getLogger(__name__)

IMAGE_TEXT = "image_text"
LENGTH_COLUMN = "length"
TOO_LONG = "longer (text + image tokens) than max_length"


def data_format(source: str, data_args: DataArguments, streaming: bool = False) -> str:
    """`IMAGE_TEXT` or the conversation format of `source` ("auto": a JSON file, told apart by its records when it
    is read). `data_format` when given; otherwise shards and image folders are image-text, question/answer columns
    named on the command line mean VQA, JSON files are conversations (image-text metadata comes as image folders),
    and a dataset is conversations when its columns fit a conversation format. With `streaming`, a source that is
    neither shards nor an image folder is conversations ("auto": `ConversationStream` tells each file's format):
    opening it as a dataset to look at its columns would copy it whole into the `datasets` cache."""
    if data_args.data_format != "auto":
        return data_args.data_format
    if data_args.question_column or data_args.answer_column:
        return "vqa"
    image_folder = any(os.path.isfile(os.path.join(source, name)) for name in ("metadata.jsonl", "metadata.csv"))
    if image_folder or shard_folder(source, "train") is not None or is_tar_path(source) or "*" in source:
        return IMAGE_TEXT
    if streaming or (os.path.isfile(source) and source.lower().endswith((".json", ".jsonl"))):
        return "auto"
    try:
        return detect_format(open_dataset(source, config_name=data_args.dataset_config_name).column_names, source)
    except UserError:
        return IMAGE_TEXT  # a caption dataset; its loader names any missing column


def load_source(
    data_args: DataArguments, source: str, format: str, split: str, load_image_text: Callable[[str, str], Dataset],
    config_name: str | None = None,
) -> Dataset:
    """One stage-2 source, map-style: conversations of `format` (bad records counted and logged by the loader), or
    image-text rows from `load_image_text(source, split)` when `format` is `IMAGE_TEXT`."""
    if format == IMAGE_TEXT:
        return load_image_text(source, split)
    return load_conversations(
        source, format=format, split=split, config_name=config_name, image_folder=data_args.image_folder,
        image_column=data_args.image_column, question_column=data_args.question_column,
        answer_column=data_args.answer_column, min_ratings=data_args.min_ratings_dict(),
        max_images_per_sample=data_args.max_images_per_sample, num_proc=data_args.preprocessing_num_workers,
    )


def load_conversation_splits(
    data_args: DataArguments, training_args: TrainingArguments, formats: tuple[str, str],
    load_image_text: Callable[[str, str], Dataset],
) -> tuple[Dataset, Dataset]:
    """The train and evaluation data (`eval_data`, or a hold-out of `train_data`) when either is conversations
    (`formats`, from `data_format`); an image-text one of the two comes from `load_image_text(source, split)`."""
    train = load_source(data_args, data_args.train_data, formats[0], "train", load_image_text,
                        data_args.dataset_config_name)
    if data_args.eval_data:
        evaluation = load_source(data_args, data_args.eval_data, formats[1], "validation", load_image_text)
    else:
        # Every record is its own group: the readers keep no duplicate marker.
        parts = split_train_eval(train.add_column("group_id", train["key"]), eval_size=data_args.eval_size,
                                 seed=training_args.seed)
        train, evaluation = (parts[name].remove_columns("group_id") for name in ("train", "eval"))
    return train, evaluation


def conversation_stream(data_args: DataArguments, training_args: TrainingArguments, format: str) -> ConversationStream:
    """This process's share of `train_data`'s parquet / JSON-lines files, streamed (`data.conversation_stream`)."""
    return ConversationStream.from_source(
        data_args.train_data, format=format, image_folder=data_args.image_folder, image_column=data_args.image_column,
        question_column=data_args.question_column, answer_column=data_args.answer_column,
        min_ratings=data_args.min_ratings_dict(), max_images_per_sample=data_args.max_images_per_sample,
        seed=training_args.seed, buffer_size=data_args.shuffle_buffer_size, rank=training_args.process_index,
        world_size=training_args.world_size,
    )


@dataclass(frozen=True)
class TooLong:
    """A `ConversationStream.extra_check`: skips (and so counts) conversations longer than the collator's
    `max_length`, as `length_column` drops them from map-style data. A class, not a closure: DataLoader workers
    started by spawn get it pickled."""

    collator: ConversationCollator

    def __call__(self, row: dict) -> str | None:
        return TOO_LONG if len(self.collator.encode(row["turns"])[0]) > self.collator.max_length else None


def _lengths(rows: dict[str, list], collator: ConversationCollator) -> dict[str, list[int]]:
    if "turns" in rows:
        samples = [{"key": key, "turns": turns} for key, turns in zip(rows["key"], rows["turns"])]
    else:
        samples = [{"key": key, "caption": caption, "qa": qa, "image": None}
                   for key, caption, qa in zip(rows["key"], rows["caption"], rows["qa"])]
    return {LENGTH_COLUMN: [len(collator.encode(collator.conversation(s)["turns"])[0]) for s in samples]}


def length_column(dataset: Dataset, collator: ConversationCollator, name: str, num_proc: int | None) -> Dataset:
    """`dataset` with a `length` column (tokens of each sample's conversation, image tokens included), without the
    conversations longer than the collator's `max_length` (counted and logged). Caption + question-answer samples
    are never dropped: the collator leaves out their trailing exchanges instead."""
    text_columns = ["key", "turns"] if "turns" in dataset.column_names else ["key", "caption", "qa"]
    if LENGTH_COLUMN in dataset.column_names:
        dataset = dataset.remove_columns(LENGTH_COLUMN)
    lengths = dataset.select_columns(text_columns).map(
        _lengths, batched=True, fn_kwargs={"collator": collator}, remove_columns=text_columns, num_proc=num_proc,
        desc=f"counting tokens of {name}",
    )[LENGTH_COLUMN]
    dataset = dataset.add_column(LENGTH_COLUMN, lengths)
    if "turns" not in dataset.column_names:
        return dataset
    too_long = [i for i, length in enumerate(lengths) if length > collator.max_length]
    if len(too_long) == len(dataset):
        raise UserError(f"every sample of {name} is longer than max_length: {collator.max_length} (the shortest has "
                        f"{min(lengths)} tokens with its image tokens); raise max_length")
    if too_long:
        keys = dataset["key"]
        logger.warning("%s: skipped %d of %d samples: %s %d (e.g. %s); raise max_length to keep them", name,
                       len(too_long), len(dataset), TOO_LONG, collator.max_length,
                       ", ".join(keys[i] for i in too_long[:3]))
        dataset = dataset.select(sorted(set(range(len(dataset))) - set(too_long)))
    return dataset


def with_lengths(
    train: Dataset | ConversationStream, evaluation: Dataset, collator: ConversationCollator, num_proc: int | None
) -> tuple[Dataset | ConversationStream, Dataset]:
    """Both splits with their `length` column and without the conversations longer than the collator's
    `max_length` (`length_column`); a stream has no lengths beforehand and skips and counts those as it reads them
    (`TooLong`)."""
    if isinstance(train, ConversationStream):
        train.extra_check = TooLong(collator)
    elif isinstance(train, Dataset):
        train = length_column(train, collator, "the training data", num_proc)
    return train, length_column(evaluation, collator, "the evaluation data", num_proc)


__all__ = ["CONVERSATION_FORMATS", "IMAGE_TEXT", "LENGTH_COLUMN", "TooLong", "conversation_stream", "data_format",
           "length_column", "load_conversation_splits", "load_source", "with_lengths"]
