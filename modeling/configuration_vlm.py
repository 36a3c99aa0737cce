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
        region_token_ids (`list[list[int]]`, *optional*):
            For each regional query of the Q-Former (`qformer_config.regional_queries` squared, in reading order),
            the language model's token ids of its region's name ("top left", ...). The mean of their input
            embeddings is added to that query's visual token, so that a prompt naming a place finds its token by
            the same words, and an answer naming a place can copy them. Built from names by `build_vlm`.
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
    region_token_ids: list[list[int]] | None = None
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
        if self.region_token_ids is not None:
            regions = self.qformer_config.regional_queries ** 2
            if len(self.region_token_ids) != regions or not all(self.region_token_ids):
                raise ValueError(f"region_token_ids must give a non-empty list of token ids for each of the Q-Former's "
                                 f"{regions} regional queries, got {len(self.region_token_ids)} lists")

    @property
    def vision_config(self) -> PreTrainedConfig:
        return self.qformer_config.vision_config

    @property
    def num_query_tokens(self) -> int:
        return self.qformer_config.num_query_tokens


__all__ = ["VLMConfig"]
