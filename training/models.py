"""The model (and processor) each training stage starts from, built one way for every caller: the training scripts,
the feature-cache command and the demo's untrained baselines.

Every model folder or Hub name an option gives is checked before it is loaded (`modeling.model_folders`): a folder
of the wrong kind, without weights or with truncated ones, or a local path with a typo ends in one clear line.
"""

import logging
from collections.abc import Callable

from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor

from cli import UserError
from modeling.lora import add_lora
from modeling.model_folders import (
    BERT_TEXT_ENCODER,
    CAUSAL_LM,
    QFORMER,
    VISION_ENCODER,
    VLM,
    check_model_source,
    hub_errors,
    load_pretrained,
)
from modeling.presets import build_pretrained_qformer, build_tiny_qformer, build_vlm

from .arguments import QFormerModelArguments, VLMModelArguments, config_overrides

logger = logging.getLogger(__name__)


def build_stage1_model(
    model_args: QFormerModelArguments, corpus: Callable[[], list[str]], resume_from: str | None = None
):
    """The stage-1 Q-Former and its processor: a saved one, one on pretrained encoders, or the tiny preset.

    `corpus()` (the training texts) trains the tiny preset's tokenizer, and is called only then (it reads every
    caption of the training data); resuming, the checkpoint's own tokenizer is used instead (the interrupted run
    trained it at its start).
    """
    model, processor = _stage1_model(model_args, corpus, resume_from)
    _set_attention(model, model_args.attn_implementation)
    return model, processor


def _stage1_model(model_args: QFormerModelArguments, corpus: Callable[[], list[str]], resume_from: str | None):
    settings = config_overrides(model_args)
    if model_args.model_name_or_path:
        option = "--model_name_or_path"
        model = load_pretrained(AutoModel, model_args.model_name_or_path, option, QFORMER, **settings)
        return model, load_pretrained(AutoProcessor, model_args.model_name_or_path, option, QFORMER)
    vision, text = model_args.vision_model_name_or_path, model_args.text_model_name_or_path
    if vision or text:
        if not (vision and text):
            raise UserError(
                "a pretrained stage 1 needs both --vision_model_name_or_path and --text_model_name_or_path "
                "(or neither, with preset: tiny)"
            )
        vision = check_model_source(vision, "--vision_model_name_or_path", VISION_ENCODER)
        text = check_model_source(text, "--text_model_name_or_path", BERT_TEXT_ENCODER)
        with hub_errors("--vision_model_name_or_path/--text_model_name_or_path", f"{vision}, {text}"):
            return build_pretrained_qformer(vision, text, qformer_config=model_args.qformer_config, **settings)
    sizes = {} if model_args.text_vocab_size is None else {"text_vocab_size": model_args.text_vocab_size}
    model, processor = build_tiny_qformer(
        corpus(), vision=model_args.vision_config, qformer=model_args.qformer_config, **sizes, **settings,
    )
    if resume_from is not None:
        processor = AutoProcessor.from_pretrained(resume_from)
    return model, processor


def build_stage2_model(
    model_args: VLMModelArguments, corpus: Callable[[], list[str]], resume_from: str | None = None
):
    """The stage-2 VLM and its processor: a saved VLM, or a stage-1 Q-Former + adapter + language model (the tiny
    preset's LM with a tokenizer trained on `corpus()`, called only then, or a pretrained one); then LoRA when asked
    for.

    Resuming with the tiny LM, the checkpoint's own tokenizer is used (the interrupted run trained it at its start).
    """
    settings = config_overrides(model_args)
    if model_args.model_name_or_path:
        option = "--model_name_or_path"
        model = load_pretrained(AutoModelForImageTextToText, model_args.model_name_or_path, option, VLM, **settings)
        processor = load_pretrained(AutoProcessor, model_args.model_name_or_path, option, VLM)
    else:
        option = "--qformer_name_or_path"
        qformer = load_pretrained(AutoModel, model_args.qformer_name_or_path, option, QFORMER)
        qformer_processor = load_pretrained(AutoProcessor, model_args.qformer_name_or_path, option, QFORMER)
        language_model = model_args.language_model_name_or_path
        if language_model:
            language_model = check_model_source(language_model, "--language_model_name_or_path", CAUSAL_LM)
        with hub_errors("--language_model_name_or_path", language_model or ""):
            model, processor = build_vlm(
                qformer, qformer_processor, language_model=language_model,
                corpus=None if language_model else corpus(), lm=model_args.lm_config,
                **({} if model_args.lm_vocab_size is None else {"lm_vocab_size": model_args.lm_vocab_size}),
                **settings,
            )
        if resume_from is not None and language_model is None:
            processor = AutoProcessor.from_pretrained(resume_from)
    _set_attention(model, model_args.attn_implementation)
    if model_args.freeze_qformer:
        model.qformer.requires_grad_(False)
    if model_args.use_lora:
        model = add_lora(
            model, r=model_args.lora_r, alpha=model_args.lora_alpha, dropout=model_args.lora_dropout,
            target_modules=model_args.lora_target_modules.split(","),
            trainable_modules=("adapter",) if model_args.freeze_qformer else ("qformer", "adapter"),
        )
    return model, processor


def _set_attention(model, implementation: str | None) -> None:
    """Every sub-model's attention kernels (transformers' `set_attn_implementation` reaches the vision encoder, the
    Q-Former layers and the language model). A training-time choice: saved configs do not keep it."""
    if implementation:
        model.set_attn_implementation(implementation)


def log_parameter_count(model, stage: str) -> None:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("%s model: %.2fM parameters, %.2fM trainable", stage, total / 1e6, trainable / 1e6)


__all__ = ["build_stage1_model", "build_stage2_model", "log_parameter_count"]
