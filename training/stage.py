"""The steps every training stage shares, in the order its script runs them.

1. `start_stage`: arguments (YAML file + command line; a Hub token never stays in them), logging, the run's lock on
   its output_dir, seed.
2. `load_splits`: the training and evaluation splits through the one loading path of their kind (image-text data:
   `data.loading`; conversations: `training.conversation_data`), bad samples counted and logged; `text_corpus`:
   the texts a tiny preset's tokenizers are trained on.
3. (each script: its model, batches and Trainer)
4. `run_stage`: train (resuming if asked), evaluate, save (with the model card), push to the Hub if asked; a
   preemption signal ends it after a checkpoint instead (`training.preemption`).

The training scripts, the feature-cache command and the demo all start through here.
"""

import logging
import os
import shlex
import sys
from collections.abc import Callable
from functools import partial

import torch
import transformers
from datasets import Dataset
from transformers import Trainer, TrainingArguments, set_seed

from data.cleaning import CleaningOptions
from data.conversation_stream import ConversationStream
from data.conversations import IMAGE_PLACEHOLDER
from data.loading import SkipReport, load_image_text_dataset, split_train_eval
from data.streaming import ShardStream

from .arguments import DataArguments, parse_args
from .checkpoints import remove_staging_leftovers
from .conversation_data import IMAGE_TEXT, conversation_stream, data_format, load_conversation_splits, load_source
from .hub_push import check_push, push_or_explain
from .output_lock import OutputDirLock
from .preemption import PreemptionCallback, TrainingPreempted

logger = logging.getLogger(__name__)


def configure_logging(training_args: TrainingArguments) -> None:
    """Readable logs on stdout from the main process, warnings only elsewhere; transformers' own chatter at warning
    level. stderr is left to progress bars and errors."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if training_args.should_log else logging.WARNING,
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    transformers.utils.logging.set_verbosity(logging.WARNING)


def keep_token_out_of_files(training_args: TrainingArguments) -> None:
    """Moves a Hub token given as `hub_token` (flag or YAML) into this process's environment (`HF_TOKEN`, where
    huggingface_hub finds it for every push) and out of the arguments: the Trainer pickles those into
    training_args.bin in the output folder and in every checkpoint, and uploads that file with them."""
    if training_args.hub_token:
        os.environ["HF_TOKEN"] = training_args.hub_token
        training_args.hub_token = None


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX-512 BF16 or AMX). Without them PyTorch emulates it:
    a matmul ran slower in bfloat16 than in float32 on an AVX-512 Xeon that lacks them (docs/tiny-recipe.md,
    round ten), and faster on CPUs that have them (docs/measurements.md)."""
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def start_stage(model_arguments_class: type, argv: list[str] | None, lock_output_dir: bool = True):
    """Every stage's opening: model, data and training arguments from YAML + command line (the Hub token kept out
    of them), logging, the run's lock on its output_dir (`training.output_lock`; the first process takes it), seed."""
    model_args, data_args, training_args = parse_args((model_arguments_class, DataArguments, TrainingArguments), argv)
    keep_token_out_of_files(training_args)
    configure_logging(training_args)
    if training_args.process_index == 0:
        check_push(training_args)  # before minutes of data loading, and before the Trainer creates the repository
        if lock_output_dir:
            OutputDirLock(training_args.output_dir).acquire()
            remove_staging_leftovers(training_args.output_dir)  # no other run writes there: this one holds the lock
    set_seed(training_args.seed)
    on_cpu = training_args.use_cpu or not torch.cuda.is_available()
    if training_args.bf16 and on_cpu and not cpu_has_bf16():
        logger.warning("bf16 on a CPU without bfloat16 instructions (AVX-512 BF16 or AMX) is emulated and slower "
                       "than float32 here; set bf16: false")
    return model_args, data_args, training_args


def load_splits(
    data_args: DataArguments, training_args: TrainingArguments, conversations: bool = False
) -> tuple[Dataset | ShardStream, Dataset]:
    """The train split and the evaluation split (`eval_data`, or a duplicate-safe hold-out of `train_data`).

    With `conversations` (stage 2), sources in a conversation format (`training.conversation_data.data_format`)
    are read as conversations; image-text sources stay image-text rows either way.

    Bad samples are dropped by the loader, counted by reason and logged here. With `streaming`, the train split is
    a `ShardStream` of this process's share of the shards (stage 2: or a `ConversationStream` of its share of the
    parquet / JSON-lines files; nothing is read yet); evaluation stays map-style.
    """
    columns = {"image_column": data_args.image_column, "caption_column": data_args.caption_column,
               "negative_captions_column": data_args.negative_captions_column,
               "num_proc": data_args.preprocessing_num_workers}
    if data_args.streaming:
        return _streaming_splits(data_args, training_args, conversations, columns)
    formats = [data_format(source, data_args) if source and conversations else IMAGE_TEXT
               for source in (data_args.train_data, data_args.eval_data)]
    if any(f != IMAGE_TEXT for f in formats):
        train, evaluation = load_conversation_splits(data_args, training_args, tuple(formats),
                                                     partial(_image_text_split, columns=columns))
        return _capped(train, evaluation, data_args)
    report = SkipReport()
    if data_args.eval_data:
        train = load_image_text_dataset(data_args.train_data, split="train", report=report, **columns)
        evaluation = load_image_text_dataset(data_args.eval_data, split="validation", report=report, **columns)
    else:
        full = load_image_text_dataset(data_args.train_data, split="train", report=report, **columns)
        parts = split_train_eval(full, eval_size=data_args.eval_size, seed=training_args.seed)
        train, evaluation = parts["train"], parts["eval"]
    report.log(logger, prefix="data: ")
    return _capped(train, evaluation, data_args)


def _streaming_splits(
    data_args: DataArguments, training_args: TrainingArguments, conversations: bool, columns: dict
) -> tuple[ShardStream, Dataset]:
    """The train stream (webdataset shards, or with `conversations` parquet / JSON-lines conversation files) and the
    map-style evaluation data."""
    train_format = data_format(data_args.train_data, data_args, streaming=True) if conversations else IMAGE_TEXT
    if train_format == IMAGE_TEXT:
        train = ShardStream.from_source(
            data_args.train_data, seed=training_args.seed, buffer_size=data_args.shuffle_buffer_size,
            rank=training_args.process_index, world_size=training_args.world_size,
            options=CleaningOptions().with_text_fields(data_args.caption_column, data_args.negative_captions_column))
    else:
        train = conversation_stream(data_args, training_args, train_format)
    eval_format = data_format(data_args.eval_data, data_args) if conversations else IMAGE_TEXT
    evaluation = load_source(data_args, data_args.eval_data, eval_format, "validation",
                             partial(_image_text_split, columns=columns))
    evaluation = _first(evaluation, data_args.max_eval_samples)
    logger.info("streaming %d training shards; %d evaluation samples", len(train.shards), len(evaluation))
    return train, evaluation


def _image_text_split(source: str, split: str, columns: dict) -> Dataset:
    report = SkipReport()
    dataset = load_image_text_dataset(source, split=split, report=report, **columns)
    report.log(logger, prefix=f"{source}: ")
    return dataset


def _first(dataset: Dataset, count: int | None) -> Dataset:
    return dataset if count is None else dataset.select(range(min(count, len(dataset))))


def _capped(train: Dataset, evaluation: Dataset, data_args: DataArguments) -> tuple[Dataset, Dataset]:
    train, evaluation = _first(train, data_args.max_train_samples), _first(evaluation, data_args.max_eval_samples)
    logger.info("%d training and %d evaluation samples", len(train), len(evaluation))
    return train, evaluation


def text_corpus(dataset: Dataset | ShardStream) -> list[str]:
    """Every caption, reference, question and answer (of conversations: every turn's text without image
    placeholders): what a tiny preset's tokenizers are trained on."""
    if isinstance(dataset, ConversationStream) or (isinstance(dataset, Dataset) and "turns" in dataset.column_names):
        rows = dataset.text_rows() if isinstance(dataset, ConversationStream) else dataset.select_columns(["turns"])
        return [turn["text"].replace(IMAGE_PLACEHOLDER, "") for row in rows for turn in row["turns"]]
    texts = []
    rows = dataset.text_rows() if isinstance(dataset, ShardStream) else dataset.select_columns(
        ["caption", "references", "qa", "negative_captions"])
    for row in rows:
        texts.append(row["caption"])
        texts.extend(row["references"])
        texts.extend(row["negative_captions"])
        for pair in row["qa"]:
            texts.extend((pair["question"], pair["answer"]))
    return texts


def resume_hint(training_args: TrainingArguments) -> str:
    """How to go on from the newest checkpoint: the same command again (it resumes without being told)."""
    if training_args.world_size > 1:
        return ("Run the same launch command again to resume from it (the newest complete checkpoint in output_dir "
                "is picked up)")
    return f"Resume from it with the same command: {shlex.join(sys.orig_argv)}"


def run_stage(
    trainer: Trainer,
    training_args: TrainingArguments,
    resume_from: str | None,
    save_outputs: Callable[[str], None],
) -> dict:
    """Trains (resuming from `resume_from`), evaluates, calls `save_outputs(folder)` on every process (saving may
    need all of them, e.g. under DeepSpeed; it writes the model card with the model) with a staging folder that is
    moved into output_dir once written (`training.checkpoints`), then pushes the output folder to the Hub when
    `push_to_hub` is set.

    SIGTERM, SIGUSR1 or SIGINT (Ctrl-C) during training saves a checkpoint at the next step and raises
    `TrainingPreempted` (exit status 0, after Ctrl-C 130; nothing after training runs): running the same command
    again resumes from that checkpoint.

    Returns the train and eval metrics, also saved as `train_results.json`/`eval_results.json`.
    """
    metrics = {}
    if training_args.do_train:
        preemption = PreemptionCallback(trainer.accelerator)
        trainer.add_callback(preemption)
        result = trainer.train(resume_from_checkpoint=resume_from)
        if preemption.stopped_at is not None:
            if trainer.is_world_process_zero():
                logger.warning(
                    "stopped by %s at step %d; checkpoint saved in %s/checkpoint-%d. %s",
                    preemption.received.name if preemption.received else "a signal on another process",
                    preemption.stopped_at, training_args.output_dir, preemption.stopped_at,
                    resume_hint(training_args))
            raise TrainingPreempted(preemption.received)
        trainer.save_state()
        metrics.update(result.metrics)
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
    if training_args.do_eval:
        eval_metrics = trainer.evaluate()
        metrics.update(eval_metrics)
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
    trainer.save_final_model(save_outputs, training_args.output_dir)
    if training_args.push_to_hub:
        push_or_explain(trainer, training_args)
    return metrics


__all__ = [
    "configure_logging", "keep_token_out_of_files", "load_splits", "resume_hint", "run_stage", "start_stage",
    "text_corpus",
]
