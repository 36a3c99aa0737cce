"""Stage-2 vision-language model: vision encoder -> Q-Former -> 2-layer MLP adapter -> causal language model.

The layout is transformers 5's for vision-language models (as `LlavaModel` / `LlavaForConditionalGeneration`):
`VLMModel` holds the vision side, the adapter and the language model's decoder and returns hidden states;
`VLMForConditionalGeneration` adds `lm_head`. Trainers built for transformers' VLMs (TRL's `SFTTrainer` runs
`model.model` and projects with `lm_head` itself) train it unchanged. Each image of a batch, from any row, gives
`num_query_tokens` visual tokens that replace, in order, the image placeholder tokens of the prompts: a row may hold
several images or none. Self-contained apart from sibling relative imports, so that `save_pretrained` ships it with
the weights.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.modeling_outputs import BaseModelOutputWithPast, ModelOutput
from transformers.utils import logging

from .configuration_vlm import VLMConfig
from .modeling_qformer import QFormerModel, own_class, ship_code_with_weights

logger = logging.get_logger(__name__)

# Folders saved before this layout (the whole causal LM under `language_model`, no `model.` level) load into it:
# transformers renames their weights while loading. Registered on import, so the code shipped with a folder
# registers it too in a process that loads it with trust_remote_code.
register_checkpoint_conversion_mapping(
    VLMConfig.model_type,
    [
        WeightRenaming(source_patterns=r"^language_model\.lm_head\.", target_patterns="lm_head."),
        WeightRenaming(source_patterns=r"^language_model\.model\.", target_patterns="model.language_model."),
        WeightRenaming(source_patterns=r"^qformer\.", target_patterns="model.qformer."),
        WeightRenaming(source_patterns=r"^adapter\.", target_patterns="model.adapter."),
    ],
    overwrite=True,
)


@dataclass
class VLMModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    Output of [`VLMModel`]: the language model's outputs, and the visual tokens that were placed in its input.

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, lm_hidden_size)`):
            The decoder's last hidden states.
        image_features (`torch.FloatTensor` of shape `(num_images, num_query_tokens, lm_hidden_size)`, *optional*):
            The adapter's outputs placed at the image-token positions.
    """

    image_features: torch.FloatTensor | None = None


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
        image_features (`torch.FloatTensor` of shape `(num_images, num_query_tokens, lm_hidden_size)`, *optional*):
            The adapter's outputs placed at the image-token positions.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_features: torch.FloatTensor | None = None


class VLMAdapter(nn.Module):
    """2-layer MLP from the Q-Former's width to the language model's embedding width: `(N, Q, Hq)` -> `(N, Q, Hlm)`."""

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
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _no_split_modules = ["Blip2QFormerLayer", "ViTLayer", "LlamaDecoderLayer", "Qwen3DecoderLayer"]

    def save_pretrained(self, save_directory, *args, **kwargs):
        # pipeline("image-text-to-text") resolves AutoModelForImageTextToText; plain loaders use AutoModel. The
        # weights are written in this layout: transformers would otherwise write them back in the old one, the
        # source of the renaming registered above.
        kwargs.setdefault("save_original_format", False)
        with own_class(self):
            ship_code_with_weights(self, ("AutoModelForImageTextToText", "AutoModel"))
            return super().save_pretrained(save_directory, *args, **kwargs)


class VLMModel(VLMPreTrainedModel):
    """The vision encoder, Q-Former and adapter, and the language model's decoder (no LM head): hidden states."""

    def __init__(self, config: VLMConfig):
        super().__init__(config)
        self.qformer = QFormerModel(config.qformer_config)
        self.adapter = VLMAdapter(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()
        if config.qformer_config.freeze_vision:
            self.qformer.vision_model.requires_grad_(False)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        self.language_model.set_input_embeddings(value)

    def get_image_features(
        self,
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Visual tokens in the LM's embedding space: `(N, 3, H, W)` -> `(N, num_query_tokens, lm_hidden_size)`.

        `vision_features` (`(N, num_patches, vision_hidden)`, from a feature cache of the frozen encoder) replace
        `pixel_values`. With `config.instruction_aware_qformer`, `qformer_input_ids` `(N, T)` (and their mask) give
        each image's instruction in the Q-Former's vocabulary; otherwise they are not read.

        `image_index` `(M,)` shows images more than once without encoding them again (e.g. one image asked several
        questions, each in a turn of its own): copy `m` shows image `image_index[m]`, with the instruction of row `m`
        of `qformer_input_ids` `(M, T)`; the vision encoder runs once per image and the result is
        `(M, num_query_tokens, lm_hidden_size)`.
        """
        images = len(pixel_values) if vision_features is None else len(vision_features)
        if image_index is not None and len(image_index) and not (
                0 <= int(image_index.min()) and int(image_index.max()) < images):
            raise ValueError(f"image_index holds {image_index.tolist()}: each entry is an image, from 0 to "
                             f"{images - 1}")
        copies = images if image_index is None else len(image_index)
        if not self.config.instruction_aware_qformer:
            features = self.adapter(self.qformer.get_query_outputs(pixel_values, vision_features))
            return features if image_index is None else features[image_index]
        if qformer_input_ids is None:
            raise ValueError("this model's Q-Former reads the instruction (instruction_aware_qformer): pass the "
                             "processor's qformer_input_ids and qformer_attention_mask, one row per image")
        if len(qformer_input_ids) != copies:
            raise ValueError(f"qformer_input_ids has {len(qformer_input_ids)} rows for {copies} images; it needs "
                             "one instruction per image (per entry of image_index when given), as the processor gives")
        if image_index is not None:
            if vision_features is None:
                vision_features = self.qformer.get_vision_features(pixel_values)
            vision_features = vision_features[image_index]
        return self.adapter(self.qformer.get_query_outputs(
            pixel_values, vision_features, instruction_ids=qformer_input_ids, instruction_mask=qformer_attention_mask))

    def merge_image_features(
        self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, image_features: torch.Tensor
    ) -> torch.Tensor:
        """Writes the images' visual tokens `(N, Q, H)` at the image-token positions of `inputs_embeds` `(B, T, H)`:
        image 0 at the first `Q` image tokens of the batch (row by row, left to right), image 1 at the next `Q`."""
        image_mask = input_ids == self.config.image_token_id
        images, queries = image_features.shape[:2]
        if int(image_mask.sum()) != images * queries:
            raise ValueError(
                f"the prompts hold {image_mask.sum(dim=1).tolist()} image tokens per row but the {images} images give "
                f"{queries} visual tokens each; build prompts with the processor, which expands each image "
                "placeholder into num_query_tokens image tokens, and pass one image per placeholder"
            )
        return inputs_embeds.masked_scatter(
            image_mask.unsqueeze(-1), image_features.reshape(-1, image_features.shape[-1]).to(inputs_embeds.dtype)
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        vision_features: torch.FloatTensor | None = None,
        qformer_input_ids: torch.LongTensor | None = None,
        qformer_attention_mask: torch.LongTensor | None = None,
        image_index: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> VLMModelOutputWithPast:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Prompt tokens; each image contributes `num_query_tokens` consecutive `image_token_id` tokens.
            pixel_values (`torch.FloatTensor` of shape `(num_images, 3, height, width)`, *optional*):
                Every image of the batch, in the order of their placeholders (row by row); a text-only batch has
                none. Only the first (prefill) step of generation receives them.
            attention_mask (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                1 for tokens, 0 for padding. Or a boolean `(batch_size, 1, sequence_length, sequence_length)` mask,
                True where a token may attend (the collator's `separate_turns` batches), used with `position_ids`.
            vision_features (`torch.FloatTensor` of shape `(num_images, num_patches, vision_hidden)`, *optional*):
                Precomputed outputs of the frozen vision encoder, used instead of `pixel_values`.
            qformer_input_ids (`torch.LongTensor` of shape `(num_images, instruction_length)`, *optional*):
                Each image's instruction (the text of the user turn that holds it) in the Q-Former's vocabulary, read
                with `config.instruction_aware_qformer`; the processor returns them.
            qformer_attention_mask (`torch.LongTensor` of shape `(num_images, instruction_length)`, *optional*):
                1 for instruction tokens, 0 for padding.
            image_index (`torch.LongTensor` of shape `(num_copies,)`, *optional*):
                For prompts that show images more than once (the collator's separate turns, each with its own copy):
                the image each copy shows, in the order of the copies' image tokens. Each image is encoded once;
                with `qformer_input_ids` (one row per copy) each copy's visual tokens read its own instruction.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        image_features = None
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
            has_images = (pixel_values is not None and len(pixel_values)) or (
                vision_features is not None and len(vision_features))
            if has_images:
                image_features = self.get_image_features(
                    pixel_values, vision_features, qformer_input_ids, qformer_attention_mask, image_index)
                inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, image_features)
            elif (input_ids == self.config.image_token_id).any():
                raise ValueError("the prompts hold image tokens but no pixel_values or vision_features were given")
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = self._custom_mask(attention_mask, inputs_embeds.dtype)
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )
        return VLMModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
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

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: VLMConfig):
        super().__init__(config)
        self.model = VLMModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    # The parts, by the names the rest of the project (and users of the previous layout) reach them by.
    @property
    def qformer(self) -> QFormerModel:
        return self.model.qformer

    @property
    def adapter(self) -> VLMAdapter:
        return self.model.adapter

    @property
    def language_model(self) -> PreTrainedModel:
        return self.model.language_model

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
        model.language_model.load_state_dict(language_model.get_decoder().state_dict())
        model.lm_head.load_state_dict(language_model.get_output_embeddings().state_dict())
        model.tie_weights()
        return model

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module):
        self.lm_head = value

    def get_decoder(self) -> nn.Module:
        return self.model.language_model

    def get_image_features(
        self,
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """See [`VLMModel.get_image_features`]: `(N, 3, H, W)` -> `(N, num_query_tokens, lm_hidden_size)`."""
        return self.model.get_image_features(pixel_values, vision_features, qformer_input_ids, qformer_attention_mask,
                                             image_index)

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
        qformer_input_ids: torch.LongTensor | None = None,
        qformer_attention_mask: torch.LongTensor | None = None,
        image_index: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> VLMCausalLMOutputWithPast:
        r"""
        Args:
            input_ids, pixel_values, attention_mask, position_ids, cache, inputs_embeds, vision_features,
            qformer_input_ids, qformer_attention_mask, image_index:
                as in [`VLMModel.forward`]; `pixel_values` is `(num_images, 3, height, width)` for the whole batch.
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Target ids aligned with `input_ids`; -100 everywhere except the answer tokens.
            logits_to_keep (`int` or `torch.Tensor`, *optional*):
                Compute the logits of the last `logits_to_keep` positions only (0: all), or of the given indices.
            num_items_in_batch (*optional*):
                The Trainer's count of label tokens in the whole accumulated batch: the loss is summed and divided
                by it, so gradient accumulation averages over tokens, not over micro-batches.
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            vision_features=vision_features,
            qformer_input_ids=qformer_input_ids,
            qformer_attention_mask=qformer_attention_mask,
            image_index=image_index,
            use_cache=use_cache if labels is None else False,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        loss = None
        if labels is not None and self.config.label_logits_only:
            # The LM head only where a next token is a label: with answers of ~20 tokens in longer prompts and a large
            # vocabulary, this skips most of the head's matmul and the largest activation of the step; same loss.
            shift_labels = labels[:, 1:]
            keep = shift_labels != -100
            logits = self.lm_head(hidden[:, :-1][keep])
            loss = self._token_loss(logits, shift_labels[keep], num_items_in_batch)
        else:
            keep_slice = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden[:, keep_slice])
            if labels is not None:
                shift_labels = labels[:, 1:]
                loss = self._token_loss(logits[:, :-1].reshape(-1, logits.shape[-1]), shift_labels.reshape(-1),
                                        num_items_in_batch)
        return VLMCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_features=outputs.image_features,
        )

    @staticmethod
    def _token_loss(logits: torch.Tensor, targets: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        """Mean cross-entropy over the target tokens (-100 ignored), or their sum over `num_items_in_batch`."""
        if num_items_in_batch is not None:
            return F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum") / num_items_in_batch
        return F.cross_entropy(logits.float(), targets, ignore_index=-100)

    def prepare_inputs_for_generation(self, *args, is_first_iteration: bool = False, **kwargs):
        # Visual tokens are already in the KV cache after the prefill step: only the prompt step needs features and
        # instructions (transformers drops `pixel_values` itself).
        if not is_first_iteration and kwargs.get("use_cache", True):
            for name in ("vision_features", "qformer_input_ids", "qformer_attention_mask", "image_index"):
                kwargs.pop(name, None)
        return super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)


__all__ = [
    "VLMAdapter",
    "VLMCausalLMOutputWithPast",
    "VLMForConditionalGeneration",
    "VLMModel",
    "VLMModelOutputWithPast",
    "VLMPreTrainedModel",
]
