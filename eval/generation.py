"""Batched text generation with a VLM: one image and one user prompt per sample, new tokens decoded.

Shared by captioning and VQA. Prompts go through the processor's chat template, batches are left
padded (so every sample's new tokens start at the same column), and only the new tokens are decoded.
"""

from collections.abc import Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

# The captioning instruction evaluation asks (training varies it, starting with this one).
CAPTION_PROMPT = "Describe the image."

# Decoding presets. "sample" is the original project's setting.
GENERATION_PRESETS: dict[str, dict] = {
    "greedy": {"do_sample": False, "num_beams": 1},
    "beam": {"do_sample": False, "num_beams": 4},
    "sample": {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.2},
}


def chat_prompt(processor, text: str) -> str:
    """The processor's chat template around one image and `text`, ending where the assistant speaks."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@torch.no_grad()
def generate_texts(
    model,
    processor,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    batch_size: int = 16,
    strategy: str = "greedy",
    max_new_tokens: int = 32,
    seed: int | None = 0,
    desc: str = "generate",
    **generate_kwargs,
) -> list[str]:
    """Generates one answer per (image, prompt) pair.

    Args:
        model: a `VLMForConditionalGeneration`.
        processor: its `VLMProcessor`.
        images: PIL images, one per prompt.
        prompts: the user's text for each image (e.g. "Describe the image." or a question).
        strategy: a key of `GENERATION_PRESETS`; `generate_kwargs` override single settings.
        seed: seeds torch before generating so that sampling is repeatable; `None` leaves it alone.

    Returns:
        the decoded new tokens of each sample, stripped, in input order.
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts; give one prompt per image.")
    if strategy not in GENERATION_PRESETS:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {sorted(GENERATION_PRESETS)}.")
    settings = {**GENERATION_PRESETS[strategy], "max_new_tokens": max_new_tokens, **generate_kwargs}
    if seed is not None:
        torch.manual_seed(seed)
    model.eval()
    device = next(model.parameters()).device
    tokenizer = processor.tokenizer
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    texts: list[str] = []
    try:
        for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch"):
            batch_prompts = [chat_prompt(processor, p) for p in prompts[start : start + batch_size]]
            batch_images = [img.convert("RGB") for img in images[start : start + batch_size]]
            inputs = processor(images=batch_images, text=batch_prompts, padding=True, return_tensors="pt")
            inputs = inputs.to(device, model.dtype)  # casts only the float tensors (pixel values)
            output = model.generate(**inputs, pad_token_id=tokenizer.pad_token_id, **settings)
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            texts.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = padding_side
    return texts
