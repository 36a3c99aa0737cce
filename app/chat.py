"""The app's model side, free of any UI: load a VLM (and a stage-1 Q-Former), caption an image, answer a question
about it, and rank captions by image-text similarity.

Generation goes through `eval.generation` (the chat template, the decoding presets and the new-token decoding
evaluation uses) and ranking through the Q-Former's own `similarity`, so the app shows what evaluation measures.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor

from cli import UserError
from eval.generation import CAPTION_PROMPT, generate_texts
from eval.retrieval import pairwise_similarity
from modeling.model_folders import QFORMER, VLM, hub_errors, load_pretrained

# The longest caption or answer by default, in new tokens (as `python -m eval`).
MAX_NEW_TOKENS = 40


@dataclass
class Models:
    """A VLM and its processor; the stage-1 Q-Former and its processor when one was given (for ranking)."""

    vlm: torch.nn.Module
    processor: object
    qformer: torch.nn.Module | None = None
    qformer_processor: object | None = None


def load_models(vlm: str, qformer: str | None = None) -> Models:
    """Loads `vlm` (a stage-2 folder or Hub id) and `qformer` (a stage-1 folder or Hub id, optional) for inference,
    on the GPU when there is one.

    A wrong folder or an unreachable Hub id raises `UserError` naming the option (`--model`, `--qformer`).
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = Models(
        vlm=load_pretrained(AutoModelForImageTextToText, vlm, "--model", VLM, whole=True, trust_remote_code=True),
        processor=_processor(vlm, "--model"),
    )
    if qformer is not None:
        models.qformer = load_pretrained(AutoModel, qformer, "--qformer", QFORMER, whole=True, trust_remote_code=True)
        models.qformer_processor = _processor(qformer, "--qformer")
    for model in (models.vlm, models.qformer):
        if model is not None:
            model.to(device).eval()
    return models


def _processor(name_or_path: str, option: str):
    with hub_errors(option, name_or_path):
        return AutoProcessor.from_pretrained(name_or_path, trust_remote_code=True)


def answer(models: Models, image: Image.Image, question: str, strategy: str = "greedy",
           max_new_tokens: int = MAX_NEW_TOKENS) -> str:
    """The VLM's answer to `question` about `image`, decoded with the preset `strategy` (a key of
    `eval.generation.GENERATION_PRESETS`).

    Each question is asked about the image on its own, as evaluation asks them. Sampling is not reseeded, so asking
    again draws another answer.
    """
    return generate_texts(models.vlm, models.processor, [image], [question], batch_size=1, strategy=strategy,
                          max_new_tokens=max_new_tokens, seed=None, desc="answer")[0]


def caption(models: Models, image: Image.Image, strategy: str = "greedy",
            max_new_tokens: int = MAX_NEW_TOKENS) -> str:
    """The VLM's caption of `image`: its answer to the captioning instruction evaluation uses."""
    return answer(models, image, CAPTION_PROMPT, strategy, max_new_tokens)


@torch.no_grad()
def rank(models: Models, image: Image.Image, captions: Sequence[str]) -> list[tuple[str, float]]:
    """`(caption, similarity)` for each caption, most similar to `image` first (the Q-Former's `similarity`, the
    score retrieval ranks by). Blank captions are left out; ties keep the given order."""
    if models.qformer is None:
        raise UserError("ranking captions needs a stage-1 Q-Former: start the app with --qformer <folder or Hub id>")
    captions = [c.strip() for c in captions if c.strip()]
    if not captions:
        raise UserError("no caption to rank: write one or more captions, one per line")
    model, processor = models.qformer, models.qformer_processor
    device = next(model.parameters()).device
    pixel_values = processor.image_processor(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"]
    # The tokenizer itself, cutting only at its model_max_length: through the processor, the max_length saved with
    # a stage-1 tokenizer (training's caption length, 32 in the tiny recipe) would cut the shapes set's longer captions.
    text = processor.tokenizer(captions, padding=True, truncation=True, return_tensors="pt")
    image_embeds = model.get_image_embeds(pixel_values.to(device, model.dtype))
    text_embeds = model.get_text_embeds(text["input_ids"].to(device), text["attention_mask"].to(device))
    scores = pairwise_similarity(model, image_embeds, text_embeds)[0].tolist()
    return sorted(zip(captions, scores), key=lambda pair: -pair[1])


__all__ = ["MAX_NEW_TOKENS", "Models", "answer", "caption", "load_models", "rank"]
