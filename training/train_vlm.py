"""Stage 2: teach a causal LM to read the Q-Former's visual tokens (captioning and VQA), through the Trainer.

    accelerate launch --config_file accelerate_config.yaml -m training.train_vlm configs/base/stage2.yaml
    python -m training.train_vlm configs/tiny/stage2.yaml --qformer_name_or_path outputs/q --output_dir outputs/v

The language model gets LoRA (or trains fully in the tiny preset); the Q-Former trains at its own learning rate;
the adapter and LoRA at `--learning_rate`. Evaluation logs the loss and captions generated for a fixed sample. The
output folder holds the merged model (loads with `AutoModel`/`AutoModelForImageTextToText`), its processor, and,
with LoRA, the peft adapter in `adapter/`.
"""

import logging
from pathlib import Path

import torch
import transformers
from transformers import TrainerCallback, TrainingArguments

import modeling  # noqa: F401  (registers the models with the Auto classes and for code shipping)
from modeling.modeling_vlm import VLMForConditionalGeneration, add_lora
from modeling.presets import build_vlm, load_qformer

from .arguments import DataArguments, VLMModelArguments
from .collators import CAPTION_INSTRUCTIONS, CaptioningCollator
from .device_normalize import DeviceNormalizeMixin
from .feature_cache import with_feature_cache
from .model_card import ModelCardTrainerMixin
from .stage_runner import prepare_stage, run_stage, start_stage
from .trainer import ParamGroupTrainer

logger = logging.getLogger(__name__)

# Parameters of the stage-1 model inside the VLM (also when peft wraps it as a module to save).
QFORMER_WEIGHTS = r"(^|\.)qformer\."


class VLMTrainer(DeviceNormalizeMixin, ModelCardTrainerMixin, ParamGroupTrainer):
    pass


class SampleCaptionsCallback(TrainerCallback):
    """After each evaluation, captions a fixed handful of evaluation images and logs them next to the references."""

    def __init__(self, trainer: VLMTrainer, rows: list[dict], processor, max_new_tokens: int = 40):
        self.trainer, self.rows, self.processor, self.max_new_tokens = trainer, rows, processor, max_new_tokens

    def on_evaluate(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        samples = caption_samples(self.trainer.model, self.processor, self.rows, self.max_new_tokens)
        self.trainer.card_samples = samples
        text = "\n".join(f"  reference: {ref}\n  generated: {gen}" for ref, gen in samples)
        logger.info("sample captions at step %d:\n%s", state.global_step, text)
        for callback in self.trainer.callback_handler.callbacks:
            writer = getattr(callback, "tb_writer", None)
            if writer is not None:
                writer.add_text("eval/sample_captions", text.replace("\n", "  \n"), state.global_step)


@torch.no_grad()
def caption_samples(model, processor, rows: list[dict], max_new_tokens: int) -> list[tuple[str, str]]:
    """Greedy captions for `rows` as (reference, generated) pairs, with the first captioning instruction."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTION_INSTRUCTIONS[0]}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    side = processor.tokenizer.padding_side
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=[r["image"] for r in rows], text=[prompt] * len(rows), padding=True, return_tensors="pt")
    processor.tokenizer.padding_side = side
    was_training = model.training
    model.eval()
    inputs = inputs.to(next(model.parameters()).device)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    model.train(was_training)
    texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [(row["caption"], text.strip()) for row, text in zip(rows, texts)]


def build_model(model_args: VLMModelArguments, corpus: list[str], resume_from: str | None):
    if model_args.model_name_or_path:
        model = VLMForConditionalGeneration.from_pretrained(model_args.model_name_or_path)
        processor = transformers.AutoProcessor.from_pretrained(model_args.model_name_or_path)
    else:
        qformer, qformer_processor = load_qformer(model_args.qformer_name_or_path)
        model, processor = build_vlm(
            qformer,
            qformer_processor,
            language_model=model_args.language_model_name_or_path,
            corpus=corpus,
            lm=model_args.lm_config,
            lm_vocab_size=model_args.lm_vocab_size,
            adapter_hidden_size=model_args.adapter_hidden_size,
        )
        if resume_from is not None and model_args.language_model_name_or_path is None:
            # The tiny LM's tokenizer was trained when the interrupted run started: reuse that exact one.
            processor = transformers.AutoProcessor.from_pretrained(resume_from)
    if model_args.freeze_qformer:
        model.qformer.requires_grad_(False)
    if model_args.use_lora:
        model = add_lora(
            model,
            r=model_args.lora_r,
            alpha=model_args.lora_alpha,
            dropout=model_args.lora_dropout,
            target_modules=model_args.lora_target_modules.split(","),
            trainable_modules=("adapter",) if model_args.freeze_qformer else ("qformer", "adapter"),
        )
    return model, processor


def save_outputs(trainer: VLMTrainer, processor, output_dir: str) -> None:
    """Writes the merged model and processor to `output_dir` and, with LoRA, the peft adapter to `adapter/` (on the
    main process)."""
    if not trainer.is_world_process_zero():
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "merge_and_unload"):
        model.save_pretrained(Path(output_dir) / "adapter")
        model = model.merge_and_unload()
        trainer.model = model
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)


def build_trainer(
    model_args: VLMModelArguments, data_args: DataArguments, training_args: TrainingArguments
) -> tuple[VLMTrainer, str | None]:
    """The stage-2 Trainer exactly as `main` runs it, and the checkpoint it resumes from (tests inspect both)."""
    resume_from, train_dataset, eval_dataset, model, processor = prepare_stage(
        model_args, data_args, training_args, ["labels"], build_model, "stage-2")

    collator = CaptioningCollator(processor, max_length=data_args.max_length, qa_turns=data_args.qa_turns,
                                  seed=training_args.seed, pixel_format=data_args.pixel_format)
    trainer_eval_dataset = eval_dataset  # the sample-captions callback below keeps the decoded images
    if data_args.feature_cache:
        collator, train_dataset, trainer_eval_dataset = with_feature_cache(
            collator, (train_dataset, eval_dataset), data_args.feature_cache, model, processor.image_processor,
            training_args.bf16)
    trainer = VLMTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=trainer_eval_dataset,
        data_collator=collator,
        processing_class=processor,
        param_group_lrs=[(QFORMER_WEIGHTS, model_args.qformer_learning_rate)],
    )
    sample_rows = [eval_dataset[i] for i in range(min(4, len(eval_dataset)))]
    trainer.add_callback(SampleCaptionsCallback(trainer, sample_rows, processor))
    return trainer, resume_from


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = start_stage(VLMModelArguments, argv)
    trainer, resume_from = build_trainer(model_args, data_args, training_args)
    card = {"finetuned_from": model_args.language_model_name_or_path, "tasks": "image-text-to-text",
            "dataset": data_args.train_data}
    save = lambda: save_outputs(trainer, trainer.processing_class, training_args.output_dir)  # noqa: E731
    return run_stage(trainer, training_args, resume_from, save, card)


if __name__ == "__main__":
    main()
