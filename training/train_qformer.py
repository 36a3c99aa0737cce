"""Stage 1: align a Q-Former with text by image-text contrastive learning, through the Hugging Face Trainer.

    accelerate launch --config_file accelerate_config.yaml -m training.train_qformer configs/base/stage1.yaml
    python -m training.train_qformer configs/tiny/stage1.yaml --max_steps 100 --output_dir outputs/q

Evaluation reports retrieval Recall@1/5/10 both ways on the evaluation split; checkpoints resume with
`--resume_from_checkpoint`; `--push_to_hub` uploads the model, its code, its processor and a model card.
"""

import logging

import torch
from transformers import EvalPrediction, TrainingArguments

import modeling  # noqa: F401  (registers the models with the Auto classes and for code shipping)
from eval.retrieval import retrieval_metrics
from modeling.presets import build_pretrained_qformer, build_tiny_qformer, load_qformer

from .arguments import DataArguments, QFormerModelArguments
from .collators import ContrastiveCollator
from .device_normalize import DeviceNormalizeMixin
from .feature_cache import with_feature_cache
from .losses import query_text_similarity
from .model_card import ModelCardTrainerMixin
from .stage_runner import prepare_stage, run_stage, start_stage
from .trainer import ParamGroupTrainer

logger = logging.getLogger(__name__)

# Weights that a pretrained preset copies from its vision and text checkpoints (not the new cross-attention,
# queries or heads): they train at `pretrained_lr_ratio` times the learning rate.
PRETRAINED_WEIGHTS = (
    r"^(vision_model\.|embeddings\.|query_transformer\.layernorm\."
    r"|query_transformer\.encoder\.layer\.\d+\.(attention|intermediate|output)[._])"
)


class QFormerTrainer(DeviceNormalizeMixin, ModelCardTrainerMixin, ParamGroupTrainer):
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


def build_model(model_args: QFormerModelArguments, corpus: list[str], resume_from: str | None):
    config_kwargs = {
        "num_query_tokens": model_args.num_query_tokens,
        "embed_dim": model_args.embed_dim,
        "freeze_vision": model_args.freeze_vision,
        "itc_similarity": model_args.itc_similarity,
        "temperature": model_args.temperature,
        "itm_weight": model_args.itm_weight,
        "vision_position_codes": model_args.vision_position_codes,
    }
    if model_args.model_name_or_path:
        return load_qformer(model_args.model_name_or_path)
    if model_args.vision_model_name_or_path and model_args.text_model_name_or_path:
        return build_pretrained_qformer(
            model_args.vision_model_name_or_path,
            model_args.text_model_name_or_path,
            qformer_config=model_args.qformer_config,
            **config_kwargs,
        )
    model, processor = build_tiny_qformer(
        corpus,
        vision=model_args.vision_config,
        qformer=model_args.qformer_config,
        text_vocab_size=model_args.text_vocab_size,
        **config_kwargs,
    )
    if resume_from is not None:
        # The tokenizer was trained at the start of the interrupted run; the checkpoint holds that exact one.
        _, processor = load_qformer(resume_from)
    return model, processor


def build_trainer(
    model_args: QFormerModelArguments, data_args: DataArguments, training_args: TrainingArguments
) -> tuple[QFormerTrainer, str | None]:
    """The stage-1 Trainer exactly as `main` runs it, and the checkpoint it resumes from (tests inspect both)."""
    # The collator's group ids are the labels evaluation needs (retrieval credits duplicates by them).
    resume_from, train_dataset, eval_dataset, model, processor = prepare_stage(
        model_args, data_args, training_args, ["group_ids"], build_model, "stage-1")

    pretrained = bool(model_args.vision_model_name_or_path and model_args.text_model_name_or_path)
    pretrained_lr = training_args.learning_rate * model_args.pretrained_lr_ratio
    lr_rules = [(PRETRAINED_WEIGHTS, pretrained_lr)] if pretrained else []
    collator = ContrastiveCollator(processor, data_args.max_caption_length, data_args.hard_negatives,
                                   pixel_format=data_args.pixel_format)
    if data_args.feature_cache:
        collator, train_dataset, eval_dataset = with_feature_cache(
            collator, (train_dataset, eval_dataset), data_args.feature_cache, model, processor.image_processor,
            training_args.bf16)
    trainer = QFormerTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=processor,
        compute_metrics=retrieval_compute_metrics(model.config.itc_similarity),
        param_group_lrs=lr_rules,
    )
    return trainer, resume_from


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = start_stage(QFormerModelArguments, argv)
    trainer, resume_from = build_trainer(model_args, data_args, training_args)
    card = {"finetuned_from": model_args.text_model_name_or_path, "tasks": "image-text retrieval",
            "dataset": data_args.train_data}
    return run_stage(trainer, training_args, resume_from, trainer.save_model, card)


if __name__ == "__main__":
    main()
