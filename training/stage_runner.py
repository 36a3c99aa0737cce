"""What both training scripts do once their Trainer is built: train, evaluate, save, write the model card or push."""

import logging
import sys
from collections.abc import Callable

import transformers
from transformers import Trainer, TrainingArguments, set_seed

from .arguments import DataArguments, parse_args
from .checkpoints import resolve_resume_checkpoint
from .data_setup import load_splits, text_corpus

logger = logging.getLogger(__name__)


def configure_logging(training_args: TrainingArguments) -> None:
    """Readable logs on the main process, warnings only elsewhere; transformers' own chatter at warning level."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if training_args.should_log else logging.WARNING,
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    transformers.utils.logging.set_verbosity(logging.WARNING)


def start_stage(model_arguments_class: type, argv: list[str] | None):
    """Both scripts' opening: model, data and training arguments from YAML + command line, logging, seed."""
    model_args, data_args, training_args = parse_args((model_arguments_class, DataArguments, TrainingArguments), argv)
    configure_logging(training_args)
    set_seed(training_args.seed)
    return model_args, data_args, training_args


def prepare_stage(model_args, data_args: DataArguments, training_args: TrainingArguments, label_names: list[str],
                  build_model: Callable, stage: str):
    """What both stages do before building their Trainer: the checkpoint to resume from, the splits, and the model
    and processor (`build_model(model_args, corpus, resume_from)`, the corpus being the training texts).

    The collators return dicts the models take as they are, and `label_names` are the keys evaluation needs.
    Returns `(resume_from, train_dataset, eval_dataset, model, processor)`.
    """
    training_args.remove_unused_columns = False
    training_args.label_names = label_names
    resume_from = resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    train_dataset, eval_dataset = load_splits(data_args, training_args.seed)
    model, processor = build_model(model_args, text_corpus(train_dataset), resume_from)
    logger.info("%s model: %.2fM parameters, %.2fM trainable", stage,
                sum(p.numel() for p in model.parameters()) / 1e6,
                sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6)
    return resume_from, train_dataset, eval_dataset, model, processor


def run_stage(
    trainer: Trainer,
    training_args: TrainingArguments,
    resume_from: str | None,
    save_outputs: Callable[[], None],
    card: dict,
) -> dict:
    """Trains (resuming from `resume_from`), evaluates, calls `save_outputs` on every process (saving may need all
    of them, e.g. under DeepSpeed), then writes the model card, or pushes the output folder with it to the Hub.

    Returns the train and eval metrics, also saved as `train_results.json`/`eval_results.json`.
    """
    metrics = {}
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=resume_from)
        trainer.save_state()
        metrics.update(result.metrics)
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
    if training_args.do_eval:
        eval_metrics = trainer.evaluate()
        metrics.update(eval_metrics)
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
    save_outputs()
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)
    elif trainer.is_world_process_zero():
        trainer.create_model_card(**card)
    return metrics
