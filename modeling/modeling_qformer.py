"""Stage-1 Q-Former: learnable queries cross-attend to a vision encoder's patch features and are aligned with text.

Built from transformers' BLIP-2 Q-Former layers (`Blip2QFormerModel`, `Blip2TextEmbeddings`). The same layers
encode captions (text-only path, no cross-attention), which is what makes image-text contrastive learning (ITC)
possible without a separate text encoder. Self-contained apart from sibling relative imports, so that
`save_pretrained` can ship it with the weights.
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import ModelOutput
from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel, Blip2TextEmbeddings
from transformers.utils import logging

from .configuration_qformer import QFormerConfig
from .qformer_losses import (
    MAX_LOGIT_SCALE,
    contrastive_loss,
    gather_with_grad,
    itm_loss,
    query_text_similarity,
    sample_itm_negatives,
)

logger = logging.get_logger(__name__)


# Where BERT-family text-encoder weights go in the Q-Former. BLIP-2 initialises the query feed-forward layers
# (`*_query`) from the text ones too, so a feed-forward weight has two destinations.
_BERT_LAYER_MAP = {
    "attention.self.query": ["attention.attention.query"],
    "attention.self.key": ["attention.attention.key"],
    "attention.self.value": ["attention.attention.value"],
    "attention.output.dense": ["attention.output.dense"],
    "attention.output.LayerNorm": ["attention.output.LayerNorm"],
    "intermediate.dense": ["intermediate.dense", "intermediate_query.dense"],
    "output.dense": ["output.dense", "output_query.dense"],
    "output.LayerNorm": ["output.LayerNorm", "output_query.LayerNorm"],
}
_DISTILBERT_LAYER_MAP = {
    "attention.q_lin": ["attention.attention.query"],
    "attention.k_lin": ["attention.attention.key"],
    "attention.v_lin": ["attention.attention.value"],
    "attention.out_lin": ["attention.output.dense"],
    "sa_layer_norm": ["attention.output.LayerNorm"],
    "ffn.lin1": ["intermediate.dense", "intermediate_query.dense"],
    "ffn.lin2": ["output.dense", "output_query.dense"],
    "output_layer_norm": ["output.LayerNorm", "output_query.LayerNorm"],
}
_EMBEDDING_MAP = {
    "embeddings.word_embeddings": ["embeddings.word_embeddings"],
    "embeddings.position_embeddings": ["embeddings.position_embeddings"],
    "embeddings.LayerNorm": ["query_transformer.layernorm"],
}


def map_bert_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Renames a BERT or DistilBERT encoder's weights to this model's Q-Former names.

    Accepts bare encoder keys or keys under a `bert.`/`distilbert.` prefix (task-head checkpoints).

    Returns:
        `(mapped, unmapped)`: `mapped` has Q-Former parameter names (a feed-forward weight appears under both its
        text and its query name); `unmapped` lists the source keys with no place in the Q-Former (token-type
        embeddings, pooler, task heads).
    """
    mapped, unmapped = {}, []
    for key, tensor in state_dict.items():
        name = key.removeprefix("bert.").removeprefix("distilbert.")
        stem, _, leaf = name.rpartition(".")
        targets = _EMBEDDING_MAP.get(stem)
        if targets is None:
            parts = stem.split(".")
            # encoder.layer.{i}.<rest> (BERT) or transformer.layer.{i}.<rest> (DistilBERT)
            if len(parts) > 3 and parts[1] == "layer" and parts[0] in ("encoder", "transformer"):
                table = _BERT_LAYER_MAP if parts[0] == "encoder" else _DISTILBERT_LAYER_MAP
                rest = ".".join(parts[3:])
                if rest in table:
                    targets = [f"query_transformer.encoder.layer.{parts[2]}.{t}" for t in table[rest]]
        if targets is None:
            unmapped.append(key)
            continue
        for target in targets:
            mapped[f"{target}.{leaf}"] = tensor
    return mapped, unmapped


def sincos_positions_2d(height: int, width: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position codes for a `height x width` grid: `(height * width, dim)`.

    Half of the channels encode the row, half the column, each as sines and cosines of geometric frequencies.
    """
    if dim % 4:
        raise ValueError(f"2-D position codes need a channel count divisible by 4, got {dim}")
    quarter = dim // 4
    frequencies = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    rows = torch.arange(height, dtype=torch.float32)[:, None] * frequencies
    cols = torch.arange(width, dtype=torch.float32)[:, None] * frequencies
    row_codes = torch.cat([rows.sin(), rows.cos()], dim=1)[:, None, :].expand(height, width, 2 * quarter)
    col_codes = torch.cat([cols.sin(), cols.cos()], dim=1)[None, :, :].expand(height, width, 2 * quarter)
    return torch.cat([row_codes, col_codes], dim=-1).reshape(height * width, dim)


def _square_grid(num_tokens: int, setting: str) -> tuple[int, int]:
    """`(prefix, side)`: vision tokens laid out as an optional class token and a `side x side` patch grid."""
    for prefix in (0, 1):
        side = math.isqrt(num_tokens - prefix)
        if side * side == num_tokens - prefix:
            return prefix, side
    raise ValueError(
        f"{setting} needs a square grid of patch tokens (plus at most one class token), but the vision encoder "
        f"returned {num_tokens} tokens; turn {setting} off for this encoder"
    )


def ship_code_with_weights(model: PreTrainedModel, auto_classes: tuple[str, ...]) -> None:
    """Makes `save_pretrained` copy this model's code and write `auto_map` entries for `auto_classes`.

    `register_for_auto_class` is per process, and a folder whose `auto_map` names code it does not contain cannot be
    loaded; so every save registers (a no-op when already done) and lists each Auto class that should resolve it.
    """
    cls = type(model)
    if cls._auto_class is None:
        cls.register_for_auto_class(auto_classes[0])
    if type(model.config)._auto_class is None:
        type(model.config).register_for_auto_class()
    auto_map = dict(getattr(model.config, "auto_map", None) or {})
    module = cls.__module__.rsplit(".", 1)[-1]
    for auto_class in auto_classes:
        auto_map[auto_class] = f"{module}.{cls.__name__}"
    model.config.auto_map = auto_map


@contextmanager
def own_class(model: nn.Module):
    """Gives an FSDP2-sharded model back its own class for the block (a no-op otherwise).

    `fully_shard` turns the model's class into a `FSDP<Name>` subclass defined in torch; saved as it is, the folder
    would ship torch's FSDP files as the model's code and name `FSDP<Name>` in `auto_map`.
    """
    sharded = type(model)
    model.__class__ = next(cls for cls in sharded.__mro__ if not issubclass(cls, FSDPModule))
    try:
        yield
    finally:
        model.__class__ = sharded


@dataclass
class QFormerModelOutput(ModelOutput):
    r"""
    Output of [`QFormerModel`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            Image-text contrastive loss, returned when both images and captions are given and `return_loss`.
        logits_per_image (`torch.FloatTensor` of shape `(batch_size, global_batch_size + K)`):
            Scaled similarities of each image with every caption (of all processes under data parallelism), then
            with its own `K` hard-negative captions when `negative_input_ids` are given (`K = 0` otherwise). Without
            the loss (`return_loss=False`), local images against local captions: `(batch_size, batch_size)`.
        logits_per_text (`torch.FloatTensor` of shape `(batch_size, global_batch_size)`):
            Scaled similarities of each caption with every image (`(batch_size, batch_size)` without the loss).
        image_embeds (`torch.FloatTensor` of shape `(batch_size, num_query_tokens, embed_dim)`):
            L2-normalised per-query image embeddings.
        text_embeds (`torch.FloatTensor` of shape `(batch_size, embed_dim)`):
            L2-normalised caption embeddings (projection of the first token).
        query_output (`torch.FloatTensor` of shape `(batch_size, num_query_tokens, hidden_size)`):
            Last hidden state of the queries: the visual tokens stage 2 feeds to the language model.
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    query_output: torch.FloatTensor | None = None


class QFormerPreTrainedModel(PreTrainedModel):
    config: QFormerConfig
    config_class = QFormerConfig
    base_model_prefix = "qformer_model"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _no_split_modules = ["Blip2QFormerLayer", "ViTLayer"]

    def save_pretrained(self, save_directory, *args, **kwargs):
        with own_class(self):
            ship_code_with_weights(self, ("AutoModel",))
            return super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module):
        super()._init_weights(module)
        # `transformers.initialization` skips tensors already loaded from a checkpoint; torch.nn.init would not.
        if isinstance(module, QFormerModel):
            init.normal_(module.query_tokens, std=self.config.initializer_range)
            init.constant_(module.logit_scale, math.log(1.0 / self.config.temperature))
        elif isinstance(module, Blip2TextEmbeddings):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))


class QFormerModel(QFormerPreTrainedModel):
    """Vision encoder + Q-Former + contrastive (ITC) and matching (ITM) heads.

    Example:
        >>> model = AutoModel.from_pretrained("path/to/qformer", trust_remote_code=True)
        >>> out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
        >>> out.loss, out.logits_per_image.shape  # (), (B, B)
    """

    def __init__(self, config: QFormerConfig):
        super().__init__(config)
        qcfg = config.qformer_config
        # The dtype the model is being built in (bfloat16 under `from_pretrained(dtype=torch.bfloat16)`, as lmms-eval
        # loads), not the float32 recorded in the nested vision config, which would keep the encoder in float32.
        self.vision_model = AutoModel.from_config(config.vision_config, dtype=torch.get_default_dtype())
        pooler = getattr(self.vision_model, "pooler", None)
        if pooler is not None and any(True for _ in pooler.parameters()):
            # A pooled output is never read; an unused trainable layer would also trip DDP's unused-parameter check.
            self.vision_model.pooler = None
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, qcfg.hidden_size))
        self.embeddings = Blip2TextEmbeddings(qcfg)
        self.query_transformer = Blip2QFormerModel(qcfg)
        self.vision_projection = nn.Linear(qcfg.hidden_size, config.embed_dim)
        self.text_projection = nn.Linear(qcfg.hidden_size, config.embed_dim)
        self.itm_head = nn.Linear(qcfg.hidden_size, 2)
        # One element, not a 0-d tensor: FSDP2 cannot shard a scalar parameter and DeepSpeed 0.19 cannot broadcast one.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / config.temperature)))
        self.post_init()
        if config.freeze_vision:
            self.vision_model.requires_grad_(False)

    @classmethod
    def from_vision_and_text_pretrained(
        cls, vision_model_name_or_path: str, text_model_name_or_path: str, **config_kwargs
    ) -> "QFormerModel":
        """Builds a Q-Former whose vision encoder and text layers start from pretrained checkpoints.

        The vision encoder's weights are loaded as they are; the Q-Former takes the shape of the BERT-family
        text model (layers, hidden size, heads, vocabulary) and its weights through `map_bert_state_dict`.
        Cross-attention layers, queries and heads start fresh. Loading reports are logged.

        Example:
            >>> QFormerModel.from_vision_and_text_pretrained("google/vit-base-patch16-224", "distilbert-base-uncased")
        """
        from transformers import AutoConfig

        vision = AutoModel.from_pretrained(vision_model_name_or_path)
        text = AutoModel.from_pretrained(text_model_name_or_path)
        tcfg = text.config
        shape = {  # DistilBERT names its sizes differently from BERT
            "vocab_size": tcfg.vocab_size,
            "hidden_size": getattr(tcfg, "dim", None) or tcfg.hidden_size,
            "num_hidden_layers": getattr(tcfg, "n_layers", None) or tcfg.num_hidden_layers,
            "num_attention_heads": getattr(tcfg, "n_heads", None) or tcfg.num_attention_heads,
            "intermediate_size": getattr(tcfg, "hidden_dim", None) or tcfg.intermediate_size,
            "max_position_embeddings": tcfg.max_position_embeddings,
            "pad_token_id": tcfg.pad_token_id if tcfg.pad_token_id is not None else 0,
        }
        qformer_config = {**shape, "cross_attention_frequency": 1, **config_kwargs.pop("qformer_config", {})}
        qformer_config = AutoConfig.for_model("blip_2_qformer", **qformer_config)
        config = QFormerConfig(vision_config=vision.config, qformer_config=qformer_config, **config_kwargs)
        model = cls(config)
        report = model.load_vision_state_dict(vision.state_dict())
        report.update(model.load_text_state_dict(text.state_dict()))
        logger.info("Initialised from %s and %s: %s", vision_model_name_or_path, text_model_name_or_path, report)
        return model

    def load_vision_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, list[str]]:
        """Copies a vision encoder's weights (e.g. a pretrained ViT); returns the keys it could not place."""
        result = self.vision_model.load_state_dict(state_dict, strict=False)
        return {"vision_missing": list(result.missing_keys), "vision_unexpected": list(result.unexpected_keys)}

    def load_text_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, list[str]]:
        """Copies a BERT/DistilBERT encoder into the Q-Former's text layers (see `map_bert_state_dict`).

        Returns `{"text_unmapped": source keys without a destination, "text_not_initialised": Q-Former
        parameters that kept their fresh initialisation (cross-attention, queries, heads)}`.
        """
        mapped, unmapped = map_bert_state_dict(state_dict)
        own = self.state_dict()
        for name, tensor in mapped.items():
            if own[name].shape != tensor.shape:
                raise ValueError(
                    f"text weight {name} has shape {tuple(tensor.shape)} but the Q-Former expects "
                    f"{tuple(own[name].shape)}; build the Q-Former with the text model's sizes"
                )
        self.load_state_dict(mapped, strict=False)
        fresh = [k for k in own if k not in mapped and not k.startswith("vision_model.")]
        return {"text_unmapped": unmapped, "text_not_initialised": fresh}

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Module):
        self.embeddings.word_embeddings = value

    def get_vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch features of the vision encoder: `(B, 3, H, W)` -> `(B, num_patches (+1), vision_hidden)`.

        Convolutional encoders (ResNet, ConvNeXt, ...) give a `(B, C, h, w)` feature map: it becomes `h * w` tokens
        with a fixed 2-D sine-cosine position code added, since cross-attention itself does not know where a
        token came from.
        """
        # A frozen encoder needs no activations kept for backward.
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_vision):
            features = self.vision_model(pixel_values=pixel_values).last_hidden_state
        if features.dim() == 4:
            features = features.flatten(2).transpose(1, 2) + sincos_positions_2d(
                features.shape[2], features.shape[3], features.shape[1]
            ).to(features)
        elif self.config.vision_position_codes:
            features = features + self._patch_position_codes(features.shape[1], features.shape[2]).to(features)
        return features

    def _patch_position_codes(self, num_tokens: int, dim: int) -> torch.Tensor:
        """2-D sine-cosine codes for a square grid of patch tokens, zeros for a leading class token if there is one."""
        prefix, side = _square_grid(num_tokens, "vision_position_codes")
        return torch.cat([torch.zeros(prefix, dim), sincos_positions_2d(side, side, dim)])

    def _cross_attention_mask(self, vision_features: torch.Tensor) -> torch.Tensor | None:
        """`(1, 1, num_query_tokens, num_tokens)` boolean: which vision tokens each query may read
        (`config.regional_queries`), or None when every query reads every token."""
        g = self.config.regional_queries
        if not g:
            return None
        prefix, side = _square_grid(vision_features.shape[1], "regional_queries")
        if side % g:
            raise ValueError(f"regional_queries {g} must divide the {side}x{side} patch grid; choose a divisor of "
                             f"{side}")
        cells = torch.arange(side, device=vision_features.device) // (side // g)
        region = (cells[:, None] * g + cells[None, :]).flatten()  # region of each patch, row-major
        visible = torch.ones(self.config.num_query_tokens, vision_features.shape[1], dtype=torch.bool,
                             device=vision_features.device)
        visible[: g * g] = False
        visible[: g * g, prefix:] = region[None, :] == torch.arange(g * g, device=region.device)[:, None]
        return self._as_attention_mask(visible[None, None], vision_features)

    def _query_self_attention_mask(self, like: torch.Tensor, text_mask: torch.Tensor | None = None
                                   ) -> torch.Tensor | None:
        """Which of the queries (and the text tokens after them, `text_mask` `(B, T)`, 0 at padding) each query and
        text token may attend to in self-attention: `(B or 1, 1, Q + T, Q + T)`. With
        `config.isolate_regional_queries` a regional query sees itself and the text only; None when that is off."""
        g = self.config.regional_queries
        if not (g and self.config.isolate_regional_queries):
            return None
        q, t = self.config.num_query_tokens, 0 if text_mask is None else text_mask.shape[1]
        visible = torch.ones(q + t, q + t, dtype=torch.bool, device=like.device)
        visible[: g * g, :q] = torch.eye(g * g, q, dtype=torch.bool, device=like.device)
        visible = visible[None, None]
        if text_mask is not None:
            padding = torch.cat([text_mask.new_ones(text_mask.shape[0], q), text_mask], dim=1).bool()
            visible = visible & padding[:, None, None, :]
        return self._as_attention_mask(visible, like)

    def _as_attention_mask(self, visible: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A 4-D boolean visibility `(B or 1, 1, rows, columns)` as the Q-Former's attention kernels take it:
        boolean for sdpa, additive (0 or the dtype's minimum) for eager."""
        if self.query_transformer.config._attn_implementation == "eager":
            return torch.zeros(visible.shape, dtype=like.dtype, device=visible.device).masked_fill(
                ~visible, torch.finfo(like.dtype).min)
        return visible

    def get_query_outputs(
        self,
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        instruction_ids: torch.Tensor | None = None,
        instruction_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Visual tokens: the queries after cross-attending to the image, `(B, num_query_tokens, hidden_size)`.

        `vision_features` (`(B, num_patches, vision_hidden)`, e.g. read from a feature cache) replace
        `pixel_values` when the vision encoder is frozen and its outputs were precomputed. `instruction_ids`
        (`(B, T)`, tokenized by the Q-Former's own tokenizer; `instruction_mask` 0 at padding) make the queries
        instruction-aware, as InstructBLIP's: the instruction's tokens join the queries in self-attention (they do
        not read the image themselves), so what the queries pull out of the image depends on what is asked.
        """
        if vision_features is None:
            if pixel_values is None:
                raise ValueError("get_query_outputs needs pixel_values or vision_features")
            vision_features = self.get_vision_features(pixel_values)
        hidden = self._queries_and_text(vision_features, instruction_ids, instruction_mask)
        return hidden[:, : self.config.num_query_tokens]

    def _queries_and_text(
        self, vision_features: torch.Tensor, input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last hidden states of the queries, then of the text `input_ids` `(B, T)` when given: `(B, Q (+ T), hidden)`.
        Only the queries cross-attend to the image; in self-attention queries and text see each other (within
        `_query_self_attention_mask`'s limits) and no token sees the text's padding (`attention_mask` 0)."""
        batch, num_queries = vision_features.shape[0], self.config.num_query_tokens
        queries = self.query_tokens.expand(batch, -1, -1)
        if input_ids is None:
            embeds, mask = queries, self._query_self_attention_mask(vision_features)
        else:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            embeds = self.embeddings(input_ids=input_ids, query_embeds=queries)
            mask = self._query_self_attention_mask(vision_features, attention_mask)
            if mask is None:
                mask = torch.cat([attention_mask.new_ones(batch, num_queries), attention_mask], dim=1)
        return self.query_transformer(
            query_embeds=embeds,
            query_length=num_queries,
            attention_mask=mask,
            encoder_hidden_states=vision_features,
            encoder_attention_mask=self._cross_attention_mask(vision_features),
        ).last_hidden_state

    def get_image_embeds(
        self, pixel_values: torch.Tensor | None = None, vision_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """L2-normalised per-query image embeddings, `(B, num_query_tokens, embed_dim)`."""
        return self._image_embeds(self.get_query_outputs(pixel_values, vision_features))

    def _image_embeds(self, query_output: torch.Tensor) -> torch.Tensor:
        """The queries compared with captions, projected and L2-normalised. Isolated regional queries are left out:
        each has read one region only and cannot match a caption of the whole image."""
        if self.config.isolate_regional_queries:
            query_output = query_output[:, self.config.regional_queries**2:]
        return F.normalize(self.vision_projection(query_output), dim=-1)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Text-only pass through the Q-Former's self-attention layers: `(B, T)` -> `(B, T, hidden_size)`."""
        text = self.query_transformer(
            query_embeds=self.embeddings(input_ids=input_ids), query_length=0, attention_mask=attention_mask
        )
        return text.last_hidden_state

    def get_text_embeds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised caption embeddings from the first ([CLS]) token, `(B, embed_dim)`."""
        return F.normalize(self.text_projection(self.get_text_features(input_ids, attention_mask)[:, 0]), dim=-1)

    def similarity(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """`(N_img, Q, D)` x `(N_txt, D)` -> `(N_img, N_txt)` cosine similarities (`config.itc_similarity`)."""
        return query_text_similarity(image_embeds, text_embeds, self.config.itc_similarity)

    def match(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Image-text matching logits `(B, 2)` (index 1 = match), BLIP-2 style: the queries and the caption attend to
        each other while the queries cross-attend to the image; the head is averaged over the query outputs."""
        if vision_features is None:
            vision_features = self.get_vision_features(pixel_values)
        hidden = self._queries_and_text(vision_features, input_ids, attention_mask)
        return self.itm_head(hidden[:, : self.config.num_query_tokens]).mean(dim=1)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        group_ids: torch.Tensor | None = None,
        negative_input_ids: torch.Tensor | None = None,
        negative_attention_mask: torch.Tensor | None = None,
        return_loss: bool = True,
        **kwargs,
    ) -> QFormerModelOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`, *optional*):
                Images, as the image processor returns them.
            input_ids (`torch.LongTensor` of shape `(batch_size, text_length)`, *optional*):
                Captions, tokenized with a [CLS]-first tokenizer (BERT family).
            attention_mask (`torch.LongTensor` of shape `(batch_size, text_length)`, *optional*):
                1 for caption tokens, 0 for padding.
            vision_features (`torch.FloatTensor` of shape `(batch_size, num_patches, vision_hidden)`, *optional*):
                Precomputed vision-encoder outputs (feature cache); used instead of `pixel_values`.
            group_ids (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Duplicate-aware sample ids for the loss (see `contrastive_loss`).
            negative_input_ids (`torch.LongTensor` of shape `(batch_size * K, text_length)`, *optional*):
                K captions per image known to be wrong for it (e.g. one colour swapped), extra negatives of the
                image->text direction.
            negative_attention_mask (`torch.LongTensor` of shape `(batch_size * K, text_length)`, *optional*):
                Their attention mask.
            return_loss (`bool`, defaults to `True`):
                Compute the loss (ITC, plus ITM when `config.itm_weight > 0`) when images and captions are given.
                Under `torch.distributed` the loss contrasts against the whole global batch.
        """
        has_image = pixel_values is not None or vision_features is not None
        if has_image and vision_features is None:
            vision_features = self.get_vision_features(pixel_values)
        query_output = self.get_query_outputs(vision_features=vision_features) if has_image else None
        image_embeds = self._image_embeds(query_output) if has_image else None
        text_embeds = self.get_text_embeds(input_ids, attention_mask) if input_ids is not None else None

        loss = logits_per_image = logits_per_text = None
        if image_embeds is not None and text_embeds is not None:
            if return_loss:
                negatives = None
                if negative_input_ids is not None:
                    negatives = self.get_text_embeds(negative_input_ids, negative_attention_mask)
                    negatives = negatives.view(text_embeds.shape[0], -1, negatives.shape[-1])
                itc = contrastive_loss(
                    image_embeds,
                    text_embeds,
                    self.logit_scale.exp(),
                    group_ids=group_ids,
                    negative_text_embeds=negatives,
                    similarity=self.config.itc_similarity,
                )
                loss, logits_per_image, logits_per_text = itc.loss, itc.logits_per_image, itc.logits_per_text
                if self.config.itm_weight > 0:
                    num_columns = itc.logits_per_text.shape[1]
                    loss = loss + self.config.itm_weight * self._itm_loss(
                        itc.logits_per_image[:, :num_columns], itc.logits_per_text, group_ids,
                        vision_features, input_ids, attention_mask,
                    )
            else:
                scale = self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
                logits_per_image = scale * self.similarity(image_embeds, text_embeds)
                logits_per_text = logits_per_image.t()
        return QFormerModelOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            query_output=query_output,
        )

    def _itm_loss(self, sim_i2t, sim_t2i, group_ids, vision_features, input_ids, attention_mask) -> torch.Tensor:
        """BLIP-2's image-text matching: each pair, plus a hard negative caption per image and a hard negative image
        per caption, drawn by similarity from the global batch (never a duplicate of the sample)."""
        neg_text, neg_image = sample_itm_negatives(sim_i2t.detach(), sim_t2i.detach(), group_ids)
        input_ids, attention_mask = self._pad_to_global_length(input_ids, attention_mask)
        all_features = gather_with_grad(vision_features)
        all_ids, all_mask = gather_with_grad(input_ids), gather_with_grad(attention_mask)
        features = torch.cat([vision_features, vision_features, all_features[neg_image]])
        ids = torch.cat([input_ids, all_ids[neg_text], input_ids])
        mask = torch.cat([attention_mask, all_mask[neg_text], attention_mask])
        batch = input_ids.shape[0]
        labels = torch.cat([input_ids.new_ones(batch), input_ids.new_zeros(2 * batch)])
        return itm_loss(self.match(ids, mask, vision_features=features), labels)

    def _pad_to_global_length(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Pads captions to the longest length of any process, so they can be gathered (batches are padded to
        their own longest caption)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return input_ids, attention_mask
        length = torch.tensor([input_ids.shape[1]], device=input_ids.device)
        dist.all_reduce(length, op=dist.ReduceOp.MAX)
        extra = int(length) - input_ids.shape[1]
        pad_id = self.config.qformer_config.pad_token_id or 0
        return F.pad(input_ids, (0, extra), value=pad_id), F.pad(attention_mask, (0, extra), value=0)


__all__ = [
    "QFormerModel", "QFormerPreTrainedModel", "QFormerModelOutput", "map_bert_state_dict", "ship_code_with_weights"
]
