"""Configuration of the stage-2 vision-language model (Q-Former -> MLP adapter -> causal LM)."""

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .configuration_qformer import QFormerConfig


class VLMConfig(PreTrainedConfig):
    r"""
    Configuration of [`VLMForConditionalGeneration`].

    The vision encoder's configuration lives inside `qformer_config` because the stage-1 model owns the encoder
    (a trained stage-1 folder drops in whole); `vision_config` and `num_query_tokens` read through to it.

    Args:
        qformer_config (`dict` or [`QFormerConfig`], *optional*):
            The stage-1 model: vision encoder, query transformer and its contrastive heads.
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            The causal language model (`model_type` picks the class: `llama` for SmolLM, `qwen3`, ...).
        image_token_id (`int`, *optional*):
            Vocabulary id of the image placeholder; each of the `num_query_tokens` positions holding it receives
            one visual token.
        adapter_hidden_size (`int`, *optional*):
            Inner width of the 2-layer MLP adapter; defaults to the language model's hidden size.
        adapter_act (`str`, defaults to `"gelu"`):
            Activation between the adapter's two layers.
        label_logits_only (`bool`, defaults to `True`):
            When labels are given, run the LM head only at positions that carry a label (answer tokens), instead
            of over the whole sequence and vocabulary. Same loss, far less work and memory.
        instruction_aware_qformer (`bool`, defaults to `False`):
            The user turn that holds an image also enters the Q-Former: its text, tokenized by the Q-Former's own
            tokenizer (the processor's `qformer_input_ids`), joins the queries in self-attention, so the visual
            tokens carry what the question asks about (InstructBLIP). The stage-1 Q-Former's text layers read it
            from the start: they were trained on captions. Off: the visual tokens of an image are the same whatever
            is asked (BLIP-2).
        initializer_range (`float`, defaults to 0.02):
            Standard deviation of the normal initialisation of the adapter.
        tie_word_embeddings (`bool`, *optional*):
            Whether `lm_head` shares the language model's input embeddings; defaults to the language model's own
            setting (`text_config.tie_word_embeddings`), as the LM was trained.
    """

    model_type = "qformer_vlm"
    sub_configs_defaults = {
        "qformer_config": SubConfigSpec(config_class=QFormerConfig),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    qformer_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int | None = None
    adapter_hidden_size: int | None = None
    adapter_act: str = "gelu"
    label_logits_only: bool = True
    instruction_aware_qformer: bool = False
    initializer_range: float = 0.02
    tie_word_embeddings: bool | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.adapter_hidden_size is not None and self.adapter_hidden_size < 1:
            raise ValueError(f"adapter_hidden_size must be at least 1, got {self.adapter_hidden_size}")
        if self.tie_word_embeddings is None:
            self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
        if self.adapter_hidden_size is None:
            self.adapter_hidden_size = self.text_config.hidden_size
        if kwargs.get("region_token_ids") is not None or getattr(self, "region_token_ids", None) is not None:
            # Names of the shapes grid's cells added to its visual tokens: removed, a model trained with them would
            # answer differently without them.
            raise ValueError("this model was saved with region_token_ids, which this version no longer has; load "
                             "it with the code saved beside its weights (trust_remote_code=True) or train it again")

    @property
    def vision_config(self) -> PreTrainedConfig:
        return self.qformer_config.vision_config

    @property
    def num_query_tokens(self) -> int:
        return self.qformer_config.num_query_tokens


__all__ = ["VLMConfig"]
