"""The model card (README.md) of every model folder this project saves.

One card, built here: Hub metadata, what the model is and how to load it, its shapes, how it was trained, its
evaluation numbers (the tables of the evaluation report) and sample outputs. The Trainer writes it into the output
folder and every checkpoint, pushed or not (`training.trainer.ModelCardTrainerMixin`); stage 2 writes it into
`adapter/` too. Its evaluation section holds the Trainer's evaluation metrics until a full evaluation replaces it
with the report's tables (`update_evaluation`: `python -m eval --update-card`, and the demo).
"""

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import huggingface_hub
import torch
import transformers
from huggingface_hub import ModelCard, ModelCardData

from cli import UserError, looks_like_local_path

from .tables import markdown_table, metric_notes, metric_tables

CARD_NAME = "README.md"
# The evaluation section sits between these, so a later evaluation can replace it.
EVALUATION_START, EVALUATION_END = "<!-- evaluation -->", "<!-- /evaluation -->"

USAGE = {
    "QFormerModel": """```python
from transformers import AutoModel, AutoProcessor
model = AutoModel.from_pretrained("{repo}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{repo}")
inputs = processor(images=images, text=captions, padding=True, return_tensors="pt")
similarity = model.similarity(model.get_image_embeds(inputs["pixel_values"]),
                              model.get_text_embeds(inputs["input_ids"], inputs["attention_mask"]))
```""",
    "VLMForConditionalGeneration": """```python
from transformers import pipeline
pipe = pipeline("image-text-to-text", model="{repo}", trust_remote_code=True)
content = [{{"type": "image", "image": image}}, {{"type": "text", "text": "Describe the image."}}]
messages = [{{"role": "user", "content": content}}]
print(pipe(text=messages, max_new_tokens=40, return_full_text=False)[0]["generated_text"])
```""",
}
# The adapter holds LoRA (peft's file), the Q-Former's trained weights and the MLP adapter (`modeling.lora`'s
# file); its base is the VLM training started from (the merged model in the parent folder already has it applied).
ADAPTER_USAGE = """```python
from modeling.lora import load_adapter  # qformer-vlm; peft's own loader would miss the Q-Former and the MLP adapter
base = VLMForConditionalGeneration.from_qformer_and_lm(qformer, language_model, image_token_id=...)
model = load_adapter(base, "{repo}").merge_and_unload()
```"""


def _shapes(config) -> list[list[str]]:
    """`[part, shape]` rows: vision encoder, Q-Former and, for a VLM, the language model."""
    qformer = config.qformer_config if hasattr(config, "text_config") else config  # a VLM holds its stage-1 config
    vision = qformer.vision_config
    width = getattr(vision, "hidden_size", None) or vision.hidden_sizes[-1]
    layers = getattr(vision, "num_hidden_layers", None) or sum(getattr(vision, "depths", []))
    size = getattr(vision, "image_size", None)
    rows = [
        ["vision encoder", f"{vision.model_type}, {layers} layers x {width}" + (f", {size} px" if size else "")],
        ["Q-Former", f"{qformer.qformer_config.num_hidden_layers} layers x {qformer.qformer_config.hidden_size}, "
                     f"{qformer.num_query_tokens} queries"],
    ]
    if hasattr(config, "text_config"):
        text = config.text_config
        rows.append(["language model", f"{text.model_type}, {text.num_hidden_layers} layers x {text.hidden_size}"])
    return rows


def evaluation_section(metrics: Mapping | None) -> str:
    """The evaluation section: a full evaluation's tables (`eval.run.evaluate_model`'s metrics), or the Trainer's
    `eval_*` numbers, or a line saying there are none yet."""
    lines = [EVALUATION_START, "## Evaluation", ""]
    if metrics and metric_tables(metrics):
        meta = metrics.get("meta", {})
        if meta:
            lines += [f"On `{meta.get('data', '?')}` ({meta.get('num_samples', '?')} images).", ""]
        for title, table in metric_tables(metrics):
            lines += [f"### {title}", "", table, ""]
        lines += [f"- {note}" for note in metric_notes(metrics)] + [""]
    elif metrics:
        lines += ["The Trainer's last evaluation:", "",
                  markdown_table(["metric", "value"], sorted(metrics.items())), ""]
    else:
        lines += ["Not evaluated yet: run `python -m eval --model <this folder> --data <data>`.", ""]
    return "\n".join([*lines, EVALUATION_END])


def build_model_card(
    model,
    *,
    repo: str,
    training: Sequence[Sequence] = (),
    metrics: Mapping | None = None,
    samples: Sequence[tuple[str, str]] | None = None,
    base_models: Sequence[str | None] = (),
    dataset: str | None = None,
    adapter: bool = False,
) -> ModelCard:
    """The card of `model` (a `QFormerModel` or `VLMForConditionalGeneration`).

    Args:
        repo: the Hub id (or folder name) the usage snippet loads.
        training: `[setting, value]` rows for the training section.
        metrics: for the evaluation section (see `evaluation_section`).
        samples: `(reference, generated)` caption pairs.
        base_models, dataset: Hub names the model came from; local paths are left out of the metadata.
        adapter: the card of the LoRA adapter folder rather than of the model.
    """
    name = type(model).__name__
    on_hub = [m for m in base_models if m and not looks_like_local_path(m)]
    data = ModelCardData(
        library_name="peft" if adapter else "transformers",
        tags=["qformer-vlm", "blip-2", "vision-language", "custom_code"],
        pipeline_tag="image-text-to-text" if name == "VLMForConditionalGeneration" and not adapter else None,
        base_model=on_hub or None,
        datasets=[dataset] if dataset and not looks_like_local_path(dataset) else None,
    )
    what = "the LoRA adapter of a" if adapter else "a"
    lines = [
        f"# {repo}", "",
        f"This is {what} `{name}` trained with qformer-vlm: a BLIP-2-style Q-Former "
        + ("feeding an MLP adapter and a causal language model." if hasattr(model.config, "text_config")
           else "aligned with text by image-text contrastive learning."),
        "Its code ships in this folder: load it with `trust_remote_code=True`.", "",
        "## Usage", "", (ADAPTER_USAGE if adapter else USAGE.get(name, "")).format(repo=repo), "",
        "## Architecture", "", markdown_table(["part", "shape"], _shapes(model.config)), "",
    ]
    if training:
        lines += ["## Training", "", markdown_table(["setting", "value"], training), ""]
    lines += [evaluation_section(metrics), ""]
    if samples:
        lines += ["## Sample outputs", "", markdown_table(["reference", "generated"], samples), ""]
    versions = f"transformers {transformers.__version__}, torch {torch.__version__}"
    lines += [f"Framework versions: {versions}, huggingface_hub {huggingface_hub.__version__}.", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def write_model_card(folder: str | os.PathLike, model, **card_kwargs) -> Path:
    """Writes `build_model_card(model, **card_kwargs)` to `folder/README.md`; returns the path."""
    path = Path(folder) / CARD_NAME
    build_model_card(model, **card_kwargs).save(path)
    return path


def update_evaluation(folder: str | os.PathLike, metrics: Mapping) -> Path:
    """Replaces the evaluation section of `folder/README.md` (written by `write_model_card`) with `metrics`'."""
    path = Path(folder) / CARD_NAME
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    pattern = re.compile(re.escape(EVALUATION_START) + ".*?" + re.escape(EVALUATION_END), re.DOTALL)
    if not pattern.search(text):
        raise UserError(
            f"{path} is missing or has no evaluation section: only a card written by this project's training (in a "
            "local model folder) can be updated"
        )
    path.write_text(pattern.sub(lambda _: evaluation_section(metrics), text, count=1), encoding="utf-8")
    return path


__all__ = ["CARD_NAME", "build_model_card", "evaluation_section", "update_evaluation", "write_model_card"]
