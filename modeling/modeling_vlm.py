"""Stage-2 vision-language model: vision encoder -> Q-Former -> 2-layer MLP adapter -> causal language model.

The adapter's outputs replace the embeddings of the image placeholder tokens in the prompt (one visual token per
query), and the language model does the rest. Self-contained apart from sibling relative imports, so that
`save_pretrained` ships it with the weights.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import ModelOutput
from transformers.utils import logging

from .configuration_vlm import VLMConfig
from .modeling_qformer import QFormerModel, own_class, ship_code_with_weights

logger = logging.get_logger(__name__)


@dataclass
class VLMCausalLMOutputWithPast(ModelOutput):
    r"""
    Output of [`VLMForConditionalGeneration`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            Next-token cross-entropy over the positions whose label is not -100 (the answer tokens).
        logits (`torch.FloatTensor`):
            `(batch_size, sequence_length, vocab_size)`; with `config.label_logits_only` and labels given, only
            the labelled positions: `(num_label_tokens, vocab_size)`.
        cache (`Cache`, *optional*):
            The language model's key/value cache, for generation.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            The language model's hidden states, when asked for.
        image_features (`torch.FloatTensor` of shape `(batch_size, num_query_tokens, lm_hidden_size)`, *optional*):
            The adapter's outputs placed at the image-token positions.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_features: torch.FloatTensor | None = None


class VLMAdapter(nn.Module):
    """2-layer MLP from the Q-Former's width to the language model's embedding width: `(B, Q, Hq)` -> `(B, Q, Hlm)`."""

    def __init__(self, config: VLMConfig):
        super().__init__()
        self.linear_1 = nn.Linear(config.qformer_config.qformer_config.hidden_size, config.adapter_hidden_size)
        self.act = ACT2FN[config.adapter_act]
        self.linear_2 = nn.Linear(config.adapter_hidden_size, config.text_config.hidden_size)

    def forward(self, query_output: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(query_output)))


class VLMPreTrainedModel(PreTrainedModel):
    config: VLMConfig
    config_class = VLMConfig
    base_model_prefix = "vlm"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _no_split_modules = ["Blip2QFormerLayer", "ViTLayer", "LlamaDecoderLayer", "Qwen3DecoderLayer"]

    def save_pretrained(self, save_directory, *args, **kwargs):
        # pipeline("image-text-to-text") resolves AutoModelForImageTextToText; plain loaders use AutoModel.
        with own_class(self):
            ship_code_with_weights(self, ("AutoModelForImageTextToText", "AutoModel"))
            return super().save_pretrained(save_directory, *args, **kwargs)


class VLMForConditionalGeneration(VLMPreTrainedModel, GenerationMixin):
    """Captioning and visual question answering with a Q-Former, an MLP adapter and a causal LM.

    Example:
        >>> model = AutoModelForImageTextToText.from_pretrained("path/to/vlm", trust_remote_code=True)
        >>> processor = AutoProcessor.from_pretrained("path/to/vlm", trust_remote_code=True)
        >>> content = [{"type": "image"}, {"type": "text", "text": "Describe the image."}]
        >>> messages = [{"role": "user", "content": content}]
        >>> prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        >>> inputs = processor(images=[image], text=[prompt], return_tensors="pt")
        >>> processor.batch_decode(model.generate(**inputs, max_new_tokens=30)[:, inputs["input_ids"].shape[1]:])
    """

    def __init__(self, config: VLMConfig):
        super().__init__(config)
        self.qformer = QFormerModel(config.qformer_config)
        self.adapter = VLMAdapter(config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()
        if config.qformer_config.freeze_vision:
            self.qformer.vision_model.requires_grad_(False)

    @classmethod
    def from_qformer_and_lm(
        cls,
        qformer: QFormerModel | str,
        language_model: PreTrainedModel | str,
        image_token_id: int,
        vocab_size: int | None = None,
        **config_kwargs,
    ) -> "VLMForConditionalGeneration":
        """Assembles a VLM from a (trained) stage-1 Q-Former and any causal LM, keeping both sets of weights.

        Args:
            qformer: a `QFormerModel` or the path/Hub id of a saved one (a stage-1 output folder).
            language_model: a causal LM or its name/path (e.g. `HuggingFaceTB/SmolLM-135M-Instruct`).
            image_token_id: id of the image placeholder in the tokenizer the processor uses.
            vocab_size: the tokenizer's length; the LM's embeddings grow to it when the placeholder was added.
            config_kwargs: other `VLMConfig` fields (adapter sizes, ...).
        """
        if isinstance(qformer, str):
            qformer = QFormerModel.from_pretrained(qformer)
        if isinstance(language_model, str):
            # float32 like the Q-Former, whatever dtype the checkpoint has (see `modeling.presets.build_vlm`)
            language_model = AutoModelForCausalLM.from_pretrained(language_model, dtype=torch.float32)
        if vocab_size is not None and vocab_size > language_model.get_input_embeddings().num_embeddings:
            language_model.resize_token_embeddings(vocab_size, pad_to_multiple_of=64)
        config = cls.config_class(
            qformer_config=qformer.config.to_dict(),
            text_config=language_model.config.to_dict(),
            image_token_id=image_token_id,
            **config_kwargs,
        )
        model = cls(config)
        model.qformer.load_state_dict(qformer.state_dict())
        model.language_model.load_state_dict(language_model.state_dict())
        return model

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module):
        self.language_model.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    def get_image_features(
        self, pixel_values: torch.Tensor | None = None, vision_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Visual tokens in the LM's embedding space: `(B, 3, H, W)` -> `(B, num_query_tokens, lm_hidden_size)`.

        `vision_features` (`(B, num_patches, vision_hidden)`, from a feature cache of the frozen encoder) replace
        `pixel_values`.
        """
        features = self.adapter(self.qformer.get_query_outputs(pixel_values, vision_features))
        if self.config.region_token_ids is None:
            return features
        names = self._region_name_embeddings().to(features.dtype)
        return torch.cat([features[:, : len(names)] + names, features[:, len(names) :]], dim=1)

    def _region_name_embeddings(self) -> torch.Tensor:
        """`(regions, lm_hidden_size)`: the mean input embedding of each region's name (`config.region_token_ids`)."""
        embeddings = self.get_input_embeddings()
        return torch.stack([embeddings(torch.tensor(ids, device=embeddings.weight.device)).mean(dim=0)
                            for ids in self.config.region_token_ids])

    def _merge_image_features(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, image_features: torch.Tensor):
        """Writes `image_features` `(B, Q, H)` at the image-token positions of `inputs_embeds` `(B, T, H)`.

        A row may hold its image's `Q` tokens more than once (the collator's `separate_turns` batches when the
        chat template puts the image after each question): every copy receives the same visual tokens.
        """
        image_mask = input_ids == self.config.image_token_id
        per_row = image_mask.sum(dim=1)
        queries = image_features.shape[1]
        if image_features.shape[0] != input_ids.shape[0] or bool((per_row == 0).any() | (per_row % queries).any()):
            raise ValueError(
                f"the prompts hold {per_row.tolist()} image tokens per row but the images give {queries} visual "
                f"tokens each ({image_features.shape[0]} images); build prompts with the processor, which expands "
                "each image placeholder into num_query_tokens image tokens"
            )
        copies = (per_row // queries).tolist()
        if max(copies) > 1:
            image_features = torch.cat([features.repeat(n, 1) for features, n in zip(image_features, copies)])
        return inputs_embeds.masked_scatter(image_mask.unsqueeze(-1), image_features.to(inputs_embeds.dtype))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        vision_features: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> VLMCausalLMOutputWithPast:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Prompt tokens; each image contributes `num_query_tokens` consecutive `image_token_id` tokens.
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`, *optional*):
                One image per sample. Only the first (prefill) step of generation receives them.
            attention_mask (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                1 for tokens, 0 for padding (left padding for generation, right padding for training). Or a boolean
                `(batch_size, 1, sequence_length, sequence_length)` mask, True where a token may attend (the
                collator's `separate_turns` batches), used with `position_ids`.
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Target ids aligned with `input_ids`; -100 everywhere except the answer tokens.
            vision_features (`torch.FloatTensor` of shape `(batch_size, num_patches, vision_hidden)`, *optional*):
                Precomputed outputs of the frozen vision encoder, used instead of `pixel_values`.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        image_features = None
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
            if pixel_values is not None or vision_features is not None:
                image_features = self.get_image_features(pixel_values, vision_features)
                inputs_embeds = self._merge_image_features(input_ids, inputs_embeds, image_features)

        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = self._custom_mask(attention_mask, inputs_embeds.dtype)
        if labels is not None and self.config.label_logits_only:
            return self._forward_label_logits_only(
                inputs_embeds, attention_mask, position_ids, labels, image_features, **kwargs
            )

        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        return VLMCausalLMOutputWithPast(
            loss=outputs.loss,
            logits=outputs.logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_features=image_features,
        )

    def _custom_mask(self, visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A boolean `(B, 1, T, T)` mask in the form the LM's attention takes a prepared mask: as it is for SDPA and
        flex attention, additive (0 or the dtype's minimum) for eager attention."""
        implementation = self.language_model.config._attn_implementation
        if implementation in ("sdpa", "flex_attention"):
            return visible
        if implementation == "eager":
            return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(
                ~visible, torch.finfo(dtype).min)
        raise ValueError(f"a (B, 1, T, T) attention mask (separate_turns) needs sdpa or eager attention, not "
                         f"{implementation!r}; load the model with attn_implementation='sdpa'")

    def _forward_label_logits_only(
        self, inputs_embeds, attention_mask, position_ids, labels, image_features, num_items_in_batch=None, **kwargs
    ) -> VLMCausalLMOutputWithPast:
        """Training path: the decoder runs on the whole sequence, the LM head only where a next token is a label.

        With answers of ~20 tokens in ~60-token prompts and a 49k vocabulary, this skips most of the head's matmul
        and the largest activation of the step, and gives the same loss as the full path.
        """
        hidden = self.get_decoder()(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        shift_labels = labels[:, 1:]
        keep = shift_labels != -100
        logits = self.get_output_embeddings()(hidden[:, :-1][keep])
        targets = shift_labels[keep]
        # Trainer passes the token count of the whole accumulated batch so that gradient accumulation averages
        # over tokens, not over micro-batches (the same convention as transformers' causal-LM loss).
        if num_items_in_batch is not None:
            loss = F.cross_entropy(logits.float(), targets, reduction="sum") / num_items_in_batch
        else:
            loss = F.cross_entropy(logits.float(), targets)
        return VLMCausalLMOutputWithPast(loss=loss, logits=logits, image_features=image_features)

    def prepare_inputs_for_generation(self, *args, is_first_iteration: bool = False, **kwargs):
        # Visual tokens are already in the KV cache after the prefill step: only the prompt step needs features.
        if not is_first_iteration and kwargs.get("use_cache", True):
            kwargs.pop("vision_features", None)
        return super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)


__all__ = [
    "VLMAdapter",
    "VLMCausalLMOutputWithPast",
    "VLMForConditionalGeneration",
    "VLMPreTrainedModel",
]
