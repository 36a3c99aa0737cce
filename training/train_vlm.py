"""Stage 2: teach a causal LM to read the Q-Former's visual tokens (captioning and VQA), through the Trainer.

    accelerate launch --config_file accelerate_config.yaml -m training.train_vlm configs/base/stage2.yaml
    python -m training.train_vlm configs/tiny/stage2.yaml --qformer_name_or_path outputs/q --output_dir outputs/v

The language model gets LoRA (or trains fully in the tiny preset); the Q-Former trains at its own learning rate;
the adapter and LoRA at `--learning_rate`. Evaluation logs the loss and captions generated for a fixed sample. The
output folder holds the merged model (loads with `AutoModel`/`AutoModelForImageTextToText`), its processor, the
model card, and, with LoRA, the peft adapter in `adapter/`.
"""

import logging
from functools import partial
from pathlib import Path

from transformers import TrainerCallback, TrainingArguments

from cli import UserError, run_command
from data.conversation_stream import ConversationStream
from data.conversations import IMAGE_PLACEHOLDER
from eval.generation import CAPTION_PROMPT, generate_texts
from modeling.lora import save_adapter

from .arguments import DataArguments, VLMModelArguments
from .checkpoints import AtomicSavesMixin, resolve_resume_checkpoint
from .conversation_collator import ConversationCollator
from .conversation_data import with_lengths
from .device_normalize import DeviceNormalizeMixin
from .feature_cache import with_feature_cache
from .fsdp import wrap_declared_layers
from .models import build_stage2_model, log_parameter_count
from .stage import load_splits, run_stage, start_stage, text_corpus
from .streaming import StreamingTrainerMixin, rows_to_check
from .trainer import ModelCardTrainerMixin, ParamGroupTrainer

logger = logging.getLogger(__name__)

# Parameters of the stage-1 model inside the VLM (also when peft wraps it as a module to save).
QFORMER_WEIGHTS = r"(^|\.)qformer\."


class VLMTrainer(
    AtomicSavesMixin, StreamingTrainerMixin, DeviceNormalizeMixin, ModelCardTrainerMixin, ParamGroupTrainer
):
    pass


def sample_prompts(dataset, count: int = 4) -> list[tuple[object, str, str]]:
    """(image, prompt, reference) for the first `count` one-image samples of `dataset`: the captioning prompt and
    the caption of an image-text sample, the first question and answer of a conversation."""
    samples = []
    for i in range(len(dataset)):
        if len(samples) == count:
            break
        row = dataset[i]
        if "turns" not in row:
            samples.append((row["image"], CAPTION_PROMPT, row["caption"]))
        elif len(row["images"]) == 1:
            samples.append((row["images"][0], row["turns"][0]["text"].replace(IMAGE_PLACEHOLDER, "").strip(),
                            row["turns"][1]["text"]))
    return samples


class SampleCaptionsCallback(TrainerCallback):
    """After each evaluation, answers a fixed handful of evaluation prompts (captions, or a conversation's first
    question) and logs the answers next to the references."""

    def __init__(self, trainer: VLMTrainer, samples: list[tuple[object, str, str]], processor,
                 max_new_tokens: int = 40):
        self.trainer, self.samples, self.processor, self.max_new_tokens = trainer, samples, processor, max_new_tokens

    def on_evaluate(self, args, state, control, **kwargs):
        # A model sharded by FSDP runs a forward pass only with every process taking part: all of them generate.
        if not (state.is_world_process_zero or self.trainer.is_fsdp_enabled):
            return
        model = self.trainer.model
        was_training = model.training
        images, prompts, references = zip(*self.samples)
        # Greedy, so no seed: the training run's random streams stay untouched.
        generated = generate_texts(model, self.processor, images, prompts, batch_size=len(self.samples),
                                   max_new_tokens=self.max_new_tokens, seed=None, desc="sample captions")
        model.train(was_training)
        if not state.is_world_process_zero:
            return
        samples = list(zip(references, generated))
        self.trainer.card_samples = samples
        text = "\n".join(f"  reference: {ref}\n  generated: {gen}" for ref, gen in samples)
        logger.info("sample captions at step %d:\n%s", state.global_step, text)
        for callback in self.trainer.callback_handler.callbacks:
            writer = getattr(callback, "tb_writer", None)
            if writer is not None:
                writer.add_text("eval/sample_captions", text.replace("\n", "  \n"), state.global_step)


def save_outputs(trainer: VLMTrainer, processor, output_dir: str) -> None:
    """Writes the model (merged, with LoRA), its processor and card to `output_dir` and, with LoRA, the peft adapter
    and its card to `adapter/`."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not hasattr(model, "merge_and_unload"):
        # The Trainer's save, on every process: under FSDP the weights are gathered from all of them.
        trainer.save_final_weights(output_dir)
        return
    if not trainer.is_world_process_zero():
        return
    save_adapter(model, Path(output_dir) / "adapter")
    trainer.write_card(Path(output_dir) / "adapter", adapter=True)
    model = model.merge_and_unload()
    trainer.model = model
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    trainer.write_card(output_dir)


def build_trainer(
    model_args: VLMModelArguments, data_args: DataArguments, training_args: TrainingArguments
) -> tuple[VLMTrainer, str | None]:
    """Data, model, batches and the Trainer, exactly as `main` runs them; also the checkpoint to resume from."""
    # The checkpoint to resume from, if any (first: a wrong --resume_from_checkpoint fails before any work).
    resume_from = resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)

    # Data: the training and evaluation splits (image-text samples, or conversations of any supported format).
    grouped = training_args.train_sampling_strategy == "group_by_length"
    if data_args.streaming and grouped:
        raise UserError("train_sampling_strategy group_by_length needs every sample's length before training; a "
                        "stream has none: leave it out, or set streaming: false")
    train_dataset, eval_dataset = load_splits(data_args, training_args, conversations=True)
    conversations = "turns" in eval_dataset.column_names or isinstance(train_dataset, ConversationStream)
    if data_args.feature_cache and conversations:
        raise UserError("feature_cache holds one image's features per image-text sample; conversation data is read "
                        "from its images: leave feature_cache out")

    # Model: a saved VLM, or the stage-1 Q-Former + adapter + language model, with LoRA when asked for.
    model, processor = build_stage2_model(model_args, partial(text_corpus, train_dataset), resume_from)
    log_parameter_count(model, "stage-2")

    # Batches: a chat conversation per sample (the data's own, or an image's caption and question-answer turns), loss
    # on the answers only; conversations longer than max_length dropped and counted; checked against the data now,
    # not at the batch that would fail.
    collator = ConversationCollator(processor, max_length=data_args.max_length, qa_turns=data_args.qa_turns,
                                    seed=training_args.seed, pixel_format=data_args.pixel_format,
                                    separate_turns=data_args.separate_turns,
                                    instruction_aware=model.config.instruction_aware_qformer)
    if conversations or grouped:
        train_dataset, eval_dataset = with_lengths(train_dataset, eval_dataset, collator,
                                                   data_args.preprocessing_num_workers)
    collator.check_dataset(rows_to_check(train_dataset), "the training data")
    trainer_eval_dataset = eval_dataset  # the sample-captions callback below keeps the decoded images
    if data_args.feature_cache:
        collator, train_dataset, trainer_eval_dataset = with_feature_cache(
            collator, (train_dataset, eval_dataset), data_args.feature_cache, model, processor.image_processor,
            training_args.bf16)

    # Trainer: labels are what evaluation needs; the Q-Former trains at its own learning rate.
    training_args.remove_unused_columns = False
    training_args.label_names = ["labels"]
    trainer = VLMTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=trainer_eval_dataset,
        data_collator=collator,
        processing_class=processor,
        param_group_lrs=[(QFORMER_WEIGHTS, model_args.qformer_learning_rate)],
    )
    trainer.card_info = {"dataset": data_args.train_data, "base_models": [model_args.language_model_name_or_path]}
    samples = sample_prompts(eval_dataset)
    if samples:
        trainer.add_callback(SampleCaptionsCallback(trainer, samples, processor))
    wrap_declared_layers(trainer)
    return trainer, resume_from


def main(argv: list[str] | None = None) -> dict:
    # Arguments, logging, seed.
    model_args, data_args, training_args = start_stage(VLMModelArguments, argv)
    # Data, model, Trainer.
    trainer, resume_from = build_trainer(model_args, data_args, training_args)
    # Train, evaluate, save (merged model, adapter, processor, cards), push.
    return run_stage(trainer, training_args, resume_from,
                     lambda folder: save_outputs(trainer, trainer.processing_class, folder))


if __name__ == "__main__":
    run_command(main)
