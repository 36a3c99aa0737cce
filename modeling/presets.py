"""The tiny preset, and the builders that assemble models and processors (tiny, or from pretrained checkpoints).

- The tiny preset (below): everything small and randomly initialised, tokenizers trained on the training captions;
  runs offline on a laptop CPU, and its vision encoder trains with the rest. Its sizes and settings are defined
  here, once: configs/tiny/*.yaml pick the preset by naming no pretrained model, and may change any value
  (`vision_config: {num_hidden_layers: 6}`); those files hold the run's settings (data, steps, learning rates).
- The pretrained recipes (configs/base, configs/qwen3) name their checkpoints in the YAML files and go through the
  same builders; tests run those builders on tiny checkpoints of the same architectures saved to local folders.
"""

from collections.abc import Iterable

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    BlipProcessor,
    LlamaConfig,
    PreTrainedTokenizerBase,
    ViTConfig,
)
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

from .configuration_qformer import QFormerConfig
from .modeling_qformer import QFormerModel
from .modeling_vlm import VLMForConditionalGeneration
from .processing_vlm import DEFAULT_CHAT_TEMPLATE, VLMProcessor
from .tiny_tokenizers import train_chat_tokenizer, train_wordpiece_tokenizer

# The tiny preset. Measured on the synthetic shapes set (docs/tiny-recipe.md has the runs behind each choice):
# - 63-pixel images cut into 21-pixel patches: a 3x3 grid of patches that coincides with the shapes world's 3x3 grid
#   of cells, so each object lies whole inside one patch (16-pixel patches cut objects across up to four tokens, and
#   a linear probe found shape at chance in the query outputs). An inductive bias of this synthetic world: the
#   pretrained recipes keep ViT-B/16.
# - Weights drawn with std 0.1 instead of transformers' 0.02: at 0.02 these 128-wide layers sit at chance for
#   much of a short run. No dropout: a model this small trained for a few epochs underfits, it does not overfit.
TINY_VISION = {
    "image_size": 63,
    "patch_size": 21,
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 512,
    "initializer_range": 0.1,
}
TINY_QFORMER = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 512,
    "cross_attention_frequency": 1,
    "max_position_embeddings": 64,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "initializer_range": 0.1,
}
# QFormerConfig settings of the tiny preset:
# - 16 queries into a 128-wide embedding space; the vision encoder trains (it starts from random weights).
# - itc_similarity "max": the best query per caption (BLIP-2's rule). The mean over queries pulls every query
#   towards the caption's embedding; with the best query the others stay free to carry other parts of the scene
#   (the demo answered VQA better).
# - vision_position_codes: fixed 2-D position codes on the patch tokens the queries read. Without them the queries
#   lost where each object is (position answers at chance with the 3x3 patches); with them stage-1 retrieval rose
#   sharply as well.
TINY_SETTINGS = {
    "num_query_tokens": 16,
    "embed_dim": 128,
    "freeze_vision": False,
    "itc_similarity": "max",
    "vision_position_codes": True,
}
# A 2-layer Llama-architecture language model. Its weights are drawn with std 1/sqrt(hidden_size) (0.0625 at 256)
# rather than transformers' 0.02, which suits widths in the thousands: on one stage-1 model, the two stage-2 seeds
# measured answered shape questions better and wrote more exact scenes (docs/tiny-recipe.md, round seven).
# `tiny_language_model` applies it; an explicit `initializer_range` wins.
TINY_LM = {
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}

# ChatML scaffolding the tiny LM tokenizer must know as whole words, beside the captions and answers.
CHAT_WORDS = ("user", "assistant", "system", "\n")


def tiny_image_processor(image_size: int) -> ViTImageProcessorPil:
    """Resize to `image_size` and scale pixels to [-1, 1]."""
    return ViTImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )


def build_tiny_qformer(
    corpus: Iterable[str],
    vision: dict | None = None,
    qformer: dict | None = None,
    text_vocab_size: int = 1000,
    **config_kwargs,
) -> tuple[QFormerModel, BlipProcessor]:
    """A randomly initialised Q-Former with a WordPiece tokenizer trained on `corpus` (the training captions).

    `vision`/`qformer` change `TINY_VISION`/`TINY_QFORMER` (`vision={"model_type": "resnet", "image_size": 64, ...}`
    picks another encoder, e.g. a small ResNet, whose config starts from its own defaults); `config_kwargs` change
    `TINY_SETTINGS` or set other `QFormerConfig` fields (temperature, itm_weight, ...).
    """
    tokenizer = train_wordpiece_tokenizer(corpus, vocab_size=text_vocab_size)
    vision = dict(vision or {})
    model_type = vision.pop("model_type", "vit")
    if model_type == "vit":
        vision_config = ViTConfig(**{**TINY_VISION, **vision})
        image_size = vision_config.image_size
    else:
        # A convolutional encoder has no image size in its config: the processor's resolution is given beside it.
        image_size = vision.pop("image_size", TINY_VISION["image_size"])
        vision_config = AutoConfig.for_model(model_type, **vision)
    qformer_config = {**TINY_QFORMER, **(qformer or {}), "vocab_size": len(tokenizer)}
    qformer_config["pad_token_id"] = tokenizer.pad_token_id
    settings = {**TINY_SETTINGS, **config_kwargs}
    config = QFormerConfig(vision_config=vision_config, qformer_config=qformer_config, **settings)
    processor = BlipProcessor(tiny_image_processor(image_size), tokenizer)
    return QFormerModel(config), processor


def build_pretrained_qformer(
    vision_model_name_or_path: str, text_model_name_or_path: str, **config_kwargs
) -> tuple[QFormerModel, BlipProcessor]:
    """A Q-Former on a pretrained vision encoder, its text layers initialised from a BERT-family checkpoint."""
    model = QFormerModel.from_vision_and_text_pretrained(
        vision_model_name_or_path, text_model_name_or_path, **config_kwargs
    )
    processor = BlipProcessor(
        AutoImageProcessor.from_pretrained(vision_model_name_or_path),
        AutoTokenizer.from_pretrained(text_model_name_or_path),
    )
    return model, processor


def tiny_language_model(tokenizer: PreTrainedTokenizerBase, **overrides):
    """A randomly initialised Llama-architecture LM sized by `TINY_LM`, over `tokenizer`'s vocabulary; weights drawn
    with std 1/sqrt(hidden_size) unless `overrides` name an `initializer_range`."""
    settings = {**TINY_LM, **overrides}
    settings.setdefault("initializer_range", settings["hidden_size"] ** -0.5)
    config = LlamaConfig(
        **settings,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return AutoModelForCausalLM.from_config(config)


def prepare_chat_tokenizer(tokenizer: PreTrainedTokenizerBase, image_token: str = "<image>") -> PreTrainedTokenizerBase:
    """Adds the image placeholder (and a pad token if missing) to a pretrained LM's tokenizer."""
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_vlm(
    qformer: QFormerModel,
    qformer_processor: BlipProcessor,
    language_model: str | None = None,
    corpus: Iterable[str] | None = None,
    lm: dict | None = None,
    lm_vocab_size: int = 800,
    **config_kwargs,
) -> tuple[VLMForConditionalGeneration, VLMProcessor]:
    """Assembles the stage-2 model and its processor from a stage-1 Q-Former.

    Args:
        qformer / qformer_processor: the stage-1 model and processor (its image processor is reused).
        language_model: a causal LM name or path (SmolLM, Qwen3, ...). `None` builds the tiny LM with a chat
            tokenizer trained on `corpus` (captions, questions and answers); `lm` overrides `TINY_LM`.
        config_kwargs: other `VLMConfig` fields.
    """
    if language_model is None:
        if corpus is None:
            raise ValueError("the tiny language model needs a corpus to train its tokenizer on")
        tokenizer = train_chat_tokenizer([*corpus, *CHAT_WORDS], vocab_size=lm_vocab_size)
        lm_model = tiny_language_model(tokenizer, **(lm or {}))
    else:
        tokenizer = prepare_chat_tokenizer(AutoTokenizer.from_pretrained(language_model))
        # float32 like the rest of the VLM, whatever dtype the Hub file has (SmolLM and Qwen3 are bfloat16, which
        # transformers 5 keeps by default): `bf16` then means autocast over float32 weights, as for the Q-Former,
        # rather than an LM that trains, merges LoRA and is saved in bfloat16 even with `bf16: false`.
        lm_model = AutoModelForCausalLM.from_pretrained(language_model, dtype=torch.float32)
    if language_model is None:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE  # the tiny tokenizer's own template says the same
    processor = VLMProcessor(
        image_processor=qformer_processor.image_processor,
        tokenizer=tokenizer,
        qformer_tokenizer=qformer_processor.tokenizer,
        chat_template=DEFAULT_CHAT_TEMPLATE,
        num_query_tokens=qformer.config.num_query_tokens,
    )
    model = VLMForConditionalGeneration.from_qformer_and_lm(
        qformer, lm_model, image_token_id=processor.image_token_id, vocab_size=len(tokenizer), **config_kwargs
    )
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # The placeholder only marks where visual tokens go; the model must never write one.
    model.generation_config.suppress_tokens = [processor.image_token_id]
    return model, processor


__all__ = [
    "CHAT_WORDS",
    "TINY_LM",
    "TINY_QFORMER",
    "TINY_SETTINGS",
    "TINY_VISION",
    "build_pretrained_qformer",
    "build_tiny_qformer",
    "build_vlm",
    "prepare_chat_tokenizer",
    "tiny_image_processor",
    "tiny_language_model",
]
