"""Configuration of the stage-1 Q-Former (vision encoder + query transformer + contrastive heads).

Self-contained on purpose: `save_pretrained` copies this file next to the weights, so a machine that has
never seen this repository can rebuild the model with `trust_remote_code=True`.
"""

from typing import Literal

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


class QFormerConfig(PreTrainedConfig):
    r"""
    Configuration of [`QFormerModel`]: a vision encoder (any `AutoConfig` vision model, ViT by default), a set of
    learnable query tokens that cross-attend to its patch features through transformers' BLIP-2 Q-Former layers,
    and the text path, projections and temperature used for image-text contrastive learning (ITC) and matching (ITM).

    The defaults describe the original recipe's shapes: ViT-B/16 at 224 px and a Q-Former with the layout of
    `distilbert-base-uncased` (6 layers, hidden 768), 32 queries, cross-attention in every layer.

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            Configuration of the vision encoder (`model_type` picks the class; `vit` by default).
        qformer_config (`dict` or `Blip2QFormerConfig`, *optional*):
            Configuration of the query transformer. `encoder_hidden_size` is set from the vision encoder and the
            text path (`use_qformer_text_input`) is always on.
        num_query_tokens (`int`, defaults to 32):
            Number of learnable queries, i.e. visual tokens produced per image.
        embed_dim (`int`, defaults to 256):
            Size of the shared image-text embedding space of the contrastive heads.
        freeze_vision (`bool`, defaults to `True`):
            Keep the vision encoder frozen (the original recipe); the tiny preset trains it.
        itc_similarity (`"max"` or `"mean"`, defaults to `"max"`):
            How the per-query image embeddings are compared with a caption: the best query (BLIP-2) or the mean
            of the query similarities.
        temperature (`float`, defaults to 0.07):
            Initial softmax temperature of the contrastive loss (learned through its logarithm).
        itm_weight (`float`, defaults to 0.0):
            Weight of the image-text matching loss with hard negatives added to ITC (0 turns ITM off).
        vision_position_codes (`bool`, defaults to `False`):
            Add fixed 2-D sine-cosine position codes to a transformer encoder's patch tokens before the queries
            read them. Cross-attention sees the tokens as a set: it knows where a token came from only through
            what the encoder left of its position embedding in the token's content, and a small encoder trained
            from scratch may leave too little (convolutional encoders always get the codes, having no position
            embedding at all).
        regional_queries (`int`, defaults to 0):
            `g > 0`: the first `g * g` queries are regional: the patch grid is cut into `g x g` equal regions and
            query `r` cross-attends only to the patch tokens of region `r` (row-major; never to a class token), so
            each of them describes one part of the image apart from the others; the remaining queries read
            everything. 0: every query reads everything (BLIP-2). The grid side must be a multiple of `g`.
        isolate_regional_queries (`bool`, defaults to `False`):
            With `regional_queries`: a regional query attends to no other query in self-attention either, so its
            output depends on its own region only, and it is not compared with captions (it cannot match a caption
            of the whole image): the other queries read every query and the whole image, and are. Without it, the
            queries' self-attention mixes the regions: a region's token also carries its neighbours' contents.
        initializer_range (`float`, defaults to 0.02):
            Standard deviation of the normal initialisation of the queries and the heads.
    """

    model_type = "qformer_vlm_qformer"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="vit"),
        "qformer_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="blip_2_qformer",
            init_kwargs={
                "num_hidden_layers": 6,
                "hidden_size": 768,
                "num_attention_heads": 12,
                "intermediate_size": 3072,
                "cross_attention_frequency": 1,
            },
        ),
    }

    vision_config: dict | PreTrainedConfig | None = None
    qformer_config: dict | PreTrainedConfig | None = None
    num_query_tokens: int = 32
    embed_dim: int = 256
    freeze_vision: bool = True
    itc_similarity: Literal["max", "mean"] = "max"
    temperature: float = 0.07
    itm_weight: float = 0.0
    vision_position_codes: bool = False
    regional_queries: int = 0
    isolate_regional_queries: bool = False
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.itc_similarity not in ("max", "mean"):
            raise ValueError(f"itc_similarity must be 'max' or 'mean', got {self.itc_similarity!r}")
        for name in ("num_query_tokens", "embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.regional_queries**2 <= self.num_query_tokens:
            raise ValueError(f"regional_queries {self.regional_queries} needs {self.regional_queries**2} of the "
                             f"num_query_tokens ({self.num_query_tokens}); lower it or add queries")
        if self.isolate_regional_queries and not 0 < self.regional_queries**2 < self.num_query_tokens:
            raise ValueError("isolate_regional_queries needs regional_queries and at least one other query to compare "
                             f"with captions, got regional_queries {self.regional_queries} of num_query_tokens "
                             f"{self.num_query_tokens}; set isolate_regional_queries false or add queries")
        if self.temperature <= 0 or self.itm_weight < 0:
            raise ValueError(f"temperature must be above 0 and itm_weight at least 0, got {self.temperature}, "
                             f"{self.itm_weight}")
        # The query transformer's cross-attention reads the vision encoder's features, and the contrastive
        # text path needs BERT-style text embeddings: both follow from the rest of the config.
        vision = self.vision_config
        # Transformers name their width hidden_size; convolutional encoders list one width per stage.
        self.qformer_config.encoder_hidden_size = getattr(vision, "hidden_size", None) or vision.hidden_sizes[-1]
        self.qformer_config.use_qformer_text_input = True


__all__ = ["QFormerConfig"]
