"""Named model presets and the builders that assemble models and processors from them.

- `tiny`: everything small and randomly initialised, tokenizers trained on the training captions; runs offline on
  a laptop CPU. The vision encoder trains with the rest.
- `base`: the original recipe: google/vit-base-patch16-224 (frozen), a Q-Former shaped like and initialised from
  distilbert-base-uncased with 32 queries, HuggingFaceTB/SmolLM-135M-Instruct with LoRA.
- `qwen3`: as base, with Qwen/Qwen3-0.6B.

The pretrained presets are just names passed to the same builders; tests run those builders on tiny checkpoints of
the same architectures saved to local folders.
"""

from collections.abc import Iterable

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoProcessor,
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
from .processing_vlm import VLMProcessor
from .tiny_tokenizers import train_chat_tokenizer, train_wordpiece_tokenizer

PRESETS = {
    "base": {
        "vision_model_name_or_path": "google/vit-base-patch16-224",
        "text_model_name_or_path": "distilbert-base-uncased",
        "language_model_name_or_path": "HuggingFaceTB/SmolLM-135M-Instruct",
    },
    "qwen3": {
        "vision_model_name_or_path": "google/vit-base-patch16-224",
        "text_model_name_or_path": "distilbert-base-uncased",
        "language_model_name_or_path": "Qwen/Qwen3-0.6B",
    },
}

# Sizes of the tiny preset (overridable from the YAML configs).
TINY_VISION = {
    "image_size": 64,
    "patch_size": 8,
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 512,
}
TINY_QFORMER = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 512,
    "cross_attention_frequency": 1,
    "max_position_embeddings": 64,
}
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

    `vision`/`qformer` override `TINY_VISION`/`TINY_QFORMER` (`vision={"model_type": "resnet", "image_size": 64, ...}`
    picks another encoder, e.g. a small ResNet); `config_kwargs` go to `QFormerConfig`
    (num_query_tokens, embed_dim, freeze_vision, itc_similarity, temperature).
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
    config_kwargs.setdefault("freeze_vision", False)
    config = QFormerConfig(vision_config=vision_config, qformer_config=qformer_config, **config_kwargs)
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


def load_qformer(name_or_path: str) -> tuple[QFormerModel, BlipProcessor]:
    """A saved stage-1 model and its processor (a stage-1 output folder or a Hub id)."""
    return AutoModel.from_pretrained(name_or_path), AutoProcessor.from_pretrained(name_or_path)


def tiny_language_model(tokenizer: PreTrainedTokenizerBase, **overrides):
    """A randomly initialised Llama-architecture LM sized by `TINY_LM`, over `tokenizer`'s vocabulary."""
    config = LlamaConfig(
        **{**TINY_LM, **overrides},
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
        lm_model = AutoModelForCausalLM.from_pretrained(language_model)
    processor = VLMProcessor(
        image_processor=qformer_processor.image_processor,
        tokenizer=tokenizer,
        qformer_tokenizer=qformer_processor.tokenizer,
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
    "PRESETS",
    "build_pretrained_qformer",
    "build_tiny_qformer",
    "build_vlm",
    "load_qformer",
    "prepare_chat_tokenizer",
    "tiny_image_processor",
    "tiny_language_model",
]
