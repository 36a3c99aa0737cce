"""What both training scripts do once their Trainer is built: train, evaluate, save, write the model card or push."""

import logging
import sys
from collections.abc import Callable

import transformers
from transformers import Trainer, TrainingArguments


def configure_logging(training_args: TrainingArguments) -> None:
    """Readable logs on the main process, warnings only elsewhere; transformers' own chatter at warning level."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if training_args.should_log else logging.WARNING,
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    transformers.utils.logging.set_verbosity(logging.WARNING)


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
