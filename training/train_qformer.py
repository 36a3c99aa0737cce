"""Stage 1: align a Q-Former with text by image-text contrastive learning, through the Hugging Face Trainer.

    accelerate launch --config_file accelerate_config.yaml -m training.train_qformer configs/base/stage1.yaml
    python -m training.train_qformer configs/tiny/stage1.yaml --max_steps 100 --output_dir outputs/q

Evaluation reports retrieval Recall@1/5/10 both ways on the evaluation split; checkpoints resume with
`--resume_from_checkpoint`; every saved folder gets the model card; `--push_to_hub` uploads the model, its code,
its processor and the card.
"""

from functools import partial

import torch
from transformers import EvalPrediction, TrainingArguments

from cli import run_command
from eval.retrieval import retrieval_metrics
from modeling.qformer_losses import query_text_similarity

from .arguments import DataArguments, QFormerModelArguments
from .checkpoints import AtomicSavesMixin, resolve_resume_checkpoint
from .collators import ContrastiveCollator
from .device_normalize import DeviceNormalizeMixin
from .feature_cache import with_feature_cache
from .fsdp import wrap_declared_layers
from .models import build_stage1_model, log_parameter_count
from .stage import load_splits, run_stage, start_stage, text_corpus
from .streaming import StreamingTrainerMixin, rows_to_check
from .trainer import ModelCardTrainerMixin, ParamGroupTrainer

# Weights that a pretrained preset copies from its vision and text checkpoints (not the new cross-attention,
# queries or heads): they train at `pretrained_lr_ratio` times the learning rate.
PRETRAINED_WEIGHTS = (
    r"^(vision_model\.|embeddings\.|query_transformer\.layernorm\."
    r"|query_transformer\.encoder\.layer\.\d+\.(attention|intermediate|output)[._])"
)


class QFormerTrainer(
    AtomicSavesMixin, StreamingTrainerMixin, DeviceNormalizeMixin, ModelCardTrainerMixin, ParamGroupTrainer
):
    """Evaluation returns each sample's image and caption embeddings, so retrieval can rank the whole split."""

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            outputs = model(**inputs)
        loss = outputs.loss.detach().mean() if outputs.loss is not None else None
        if prediction_loss_only:
            return loss, None, None
        return loss, (outputs.image_embeds.float(), outputs.text_embeds.float()), inputs["group_ids"]


def retrieval_compute_metrics(similarity_mode: str):
    """`compute_metrics` for the Trainer: Recall@K both ways over the whole evaluation split, duplicate-aware."""

    def compute(prediction: EvalPrediction) -> dict[str, float]:
        image_embeds, text_embeds = (torch.as_tensor(x) for x in prediction.predictions)
        group_ids = torch.as_tensor(prediction.label_ids).tolist()
        similarity = query_text_similarity(image_embeds, text_embeds, similarity_mode)
        scores = retrieval_metrics(similarity, group_ids, group_ids)
        return {k: v for k, v in scores.items() if k.endswith(("_r1", "_r5", "_r10"))}

    return compute


def build_trainer(
    model_args: QFormerModelArguments, data_args: DataArguments, training_args: TrainingArguments
) -> tuple[QFormerTrainer, str | None]:
    """Data, model, batches and the Trainer, exactly as `main` runs them; also the checkpoint to resume from."""
    # The checkpoint to resume from, if any (first: a wrong --resume_from_checkpoint fails before any work).
    resume_from = resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)

    # Data: the training and evaluation splits.
    train_dataset, eval_dataset = load_splits(data_args, training_args)

    # Model: saved, pretrained encoders or the tiny preset (resuming, with the checkpoint's own tokenizer).
    model, processor = build_stage1_model(model_args, partial(text_corpus, train_dataset), resume_from)
    log_parameter_count(model, "stage-1")

    # Batches: images, captions, duplicate-aware group ids (and hard-negative captions); checked against the data
    # now, not at the batch that would fail.
    collator = ContrastiveCollator(processor, data_args.max_caption_length, data_args.hard_negatives,
                                   pixel_format=data_args.pixel_format)
    collator.check_dataset(rows_to_check(train_dataset), "the training data")
    collator.check_dataset(eval_dataset, "the evaluation data")  # its loss uses the same negatives
    if data_args.feature_cache:
        collator, train_dataset, eval_dataset = with_feature_cache(
            collator, (train_dataset, eval_dataset), data_args.feature_cache, model, processor.image_processor,
            training_args.bf16)

    # Trainer: the collator's group ids are the labels evaluation needs (retrieval credits duplicates by them);
    # pretrained weights train at their own learning rate.
    training_args.remove_unused_columns = False
    training_args.label_names = ["group_ids"]
    pretrained = bool(model_args.vision_model_name_or_path and model_args.text_model_name_or_path)
    pretrained_lr = training_args.learning_rate * model_args.pretrained_lr_ratio
    trainer = QFormerTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=processor,
        compute_metrics=retrieval_compute_metrics(model.config.itc_similarity),
        param_group_lrs=[(PRETRAINED_WEIGHTS, pretrained_lr)] if pretrained else [],
    )
    trainer.card_info = {
        "dataset": data_args.train_data,
        "base_models": [model_args.vision_model_name_or_path, model_args.text_model_name_or_path],
    }
    wrap_declared_layers(trainer)
    return trainer, resume_from


def main(argv: list[str] | None = None) -> dict:
    # Arguments, logging, seed.
    model_args, data_args, training_args = start_stage(QFormerModelArguments, argv)
    # Data, model, Trainer.
    trainer, resume_from = build_trainer(model_args, data_args, training_args)
    # Train, evaluate, save (model, processor, card), push.
    return run_stage(trainer, training_args, resume_from, trainer.save_final_weights)


if __name__ == "__main__":
    run_command(main)
