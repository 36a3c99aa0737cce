"""Processor of the VLM: image processor + the language model's tokenizer + its chat template.

Each image placeholder in a prompt becomes `num_query_tokens` image tokens, the positions where the model writes
its visual tokens; the rest (batching, padding, chat templates) is `ProcessorMixin`'s own machinery. Each image also
gets its instruction in the Q-Former's vocabulary (`qformer_input_ids`), as InstructBLIP's processor gives, for
models whose Q-Former reads it.
"""

import re

from transformers import BatchFeature, ProcessorMixin

# A minimal ChatML template (the format of SmolLM-Instruct and Qwen3): a message's items in their order, an image item
# as the placeholder (a caller that wants the image after the question puts its item there). An assistant message's
# text and its end token sit inside {% generation %}: `apply_chat_template(..., return_assistant_tokens_mask=True)`
# then marks the tokens a model learns, as the training collator labels them (TRL's SFTTrainer trains on them with
# assistant_only_loss=True).
_CONTENT = ("{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>' }}"
            "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}")
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}" + _CONTENT + "{{ '<|im_end|>' }}{% endgeneration %}"
    "{% else %}" + _CONTENT + "{{ '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class VLMProcessor(ProcessorMixin):
    r"""
    Prepares images and prompts for [`VLMForConditionalGeneration`].

    Args:
        image_processor: the vision encoder's image processor (e.g. `ViTImageProcessor`).
        tokenizer: the language model's tokenizer; it must know `image_token` as a single token.
        qformer_tokenizer: the Q-Former's own (BERT-family) tokenizer, for retrieval through `model.qformer`; saved
            in `qformer_tokenizer/` as InstructBLIP does.
        chat_template (`str`, *optional*): Jinja template for `apply_chat_template`; an `{"type": "image"}` item
            must render as `image_token`.
        image_token (`str`, defaults to `"<image>"`): the placeholder a prompt holds once per image.
        num_query_tokens (`int`, defaults to 32): how many image tokens each placeholder expands into.

    Example:
        >>> inputs = processor(images=[img], text=["<|im_start|>user\n<image>What colour is the circle?<|im_end|>\n"])
        >>> inputs["input_ids"].shape, inputs["pixel_values"].shape  # (1, T), (1, 3, H, W)
        >>> processor.qformer_tokenizer.batch_decode(inputs["qformer_input_ids"], skip_special_tokens=True)
        ['what colour is the circle?']
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        qformer_tokenizer=None,
        chat_template: str | None = None,
        image_token: str = "<image>",
        num_query_tokens: int = 32,
        **kwargs,
    ):
        self.image_token = image_token
        self.num_query_tokens = num_query_tokens
        ids = tokenizer.encode(image_token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(
                f"the tokenizer splits the image placeholder {image_token!r} into {len(ids)} tokens; add it with "
                f"tokenizer.add_special_tokens({{'additional_special_tokens': [{image_token!r}]}}) first"
            )
        self.image_token_id = ids[0]
        chat_template = chat_template or DEFAULT_CHAT_TEMPLATE
        super().__init__(image_processor, tokenizer, qformer_tokenizer, chat_template=chat_template)

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """`ProcessorMixin.__call__` for images and text, padding on the left unless `padding_side` is given.

        Left padding because this processor's batches feed `generate`, which appends to the right end of every row
        (harnesses such as lmms-eval batch prompts without choosing a side); training batches come from the
        collator, which pads on the right itself. Empty `videos`/`audio`/`audios` (lmms-eval passes every modality,
        and audio under its old name) are ignored; non-empty ones raise a `ValueError`.
        """
        for name, value in (("videos", videos), ("audio", audio), ("audios", kwargs.pop("audios", None))):
            if value is not None and len(value):
                raise ValueError(
                    f"{type(self).__name__} takes images and text only, but got {len(value)} {name}; "
                    f"pass {name}=None or leave it out"
                )
        if "padding_side" not in kwargs.get("text_kwargs", {}):
            kwargs.setdefault("padding_side", "left")
        inputs = super().__call__(images=images, text=text, **kwargs)
        prompts = [text] if isinstance(text, str) else list(text or [])
        instructions = [instruction for prompt in prompts for instruction in self.image_instructions(prompt)]
        if instructions and self.qformer_tokenizer is not None:
            inputs.update(self.qformer_inputs(instructions, return_tensors=kwargs.get("return_tensors")))
        return inputs

    def image_instructions(self, prompt: str) -> list[str]:
        """The instruction of each image placeholder of `prompt`, in order: the text of the chat turn that holds it
        (the span between the language model's special tokens), without placeholders and without the turn's role
        line (a first line of one word after a special token, as ChatML's `<|im_start|>user`)."""
        specials = [t for t in self.tokenizer.all_special_tokens if t != self.image_token]
        pieces = re.split("|".join(map(re.escape, specials)), prompt) if specials else [prompt]
        instructions = []
        for i, piece in enumerate(pieces):
            count = piece.count(self.image_token)
            if not count:
                continue
            piece = piece.replace(self.image_token, "")
            if i > 0:
                piece = re.sub(r"^\s*\w+[ \t]*\n", "", piece)
            instructions += [piece.strip()] * count
        return instructions

    def qformer_inputs(self, instructions: list[str], return_tensors: str | None = "pt") -> BatchFeature:
        """`qformer_input_ids` and `qformer_attention_mask`, `(len(instructions), T)`: the instructions tokenized
        by the Q-Former's tokenizer, right-padded, cut at its `model_max_length` (the Q-Former's text positions)."""
        encoded = self.qformer_tokenizer(instructions, padding=True, truncation=True, return_tensors=return_tensors)
        return BatchFeature({"qformer_input_ids": encoded["input_ids"],
                             "qformer_attention_mask": encoded["attention_mask"]}, tensor_type=return_tensors)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        # Every image gives the same number of visual tokens: one per query.
        return self.image_token * self.num_query_tokens

    def save_pretrained(self, save_directory, *args, **kwargs):
        # Ship this file with the processor so AutoProcessor can rebuild it with trust_remote_code.
        if type(self)._auto_class is None:
            type(self).register_for_auto_class("AutoProcessor")
        return super().save_pretrained(save_directory, *args, **kwargs)


__all__ = ["VLMProcessor"]
