"""Model cards that say what the model is, how it scored and what it says: appended to the Trainer's own card."""

from pathlib import Path

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


def card_sections(model, metrics: dict, samples: list[tuple[str, str]] | None, repo: str) -> str:
    """Markdown: usage, architecture sizes, the latest evaluation metrics and sample outputs."""
    config = model.config
    name = type(model).__name__
    lines = ["", "## qformer-vlm", "", f"A `{name}` trained with qformer-vlm. Load it with `trust_remote_code=True`: "
             "the model's code ships in this folder.", "", USAGE.get(name, "").format(repo=repo), ""]
    qformer = config.qformer_config if hasattr(config, "text_config") else config  # a VLM holds its stage-1 config
    sizes = {
        "vision encoder": f"{qformer.vision_config.model_type}, {qformer.vision_config.num_hidden_layers} layers x "
        f"{qformer.vision_config.hidden_size}, {qformer.vision_config.image_size}px",
        "Q-Former": f"{qformer.qformer_config.num_hidden_layers} layers x {qformer.qformer_config.hidden_size}, "
        f"{qformer.num_query_tokens} queries",
    }
    if hasattr(config, "text_config"):
        text = config.text_config
        sizes["language model"] = f"{text.model_type}, {text.num_hidden_layers} layers x {text.hidden_size}"
    lines += ["| part | shape |", "|---|---|", *[f"| {k} | {v} |" for k, v in sizes.items()], ""]
    if metrics:
        lines += ["### Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                  for k, v in sorted(metrics.items())]
        lines.append("")
    if samples:
        lines += ["### Sample outputs", "", "| reference | generated |", "|---|---|"]
        lines += [f"| {ref.replace('|', '/')} | {gen.replace('|', '/')} |" for ref, gen in samples]
        lines.append("")
    return "\n".join(lines)


class ModelCardTrainerMixin:
    """Extends `Trainer.create_model_card` (also used by `push_to_hub`) with `card_sections`."""

    card_samples: list[tuple[str, str]] | None = None

    def create_model_card(self, *args, **kwargs):
        super().create_model_card(*args, **kwargs)
        evals = [entry for entry in self.state.log_history if any(k.startswith("eval_") for k in entry)]
        metrics = {k: v for k, v in (evals[-1] if evals else {}).items() if k.startswith("eval_")}
        repo = self.args.hub_model_id or Path(self.args.output_dir).name
        model = self.accelerator.unwrap_model(self.model)
        model = getattr(model, "base_model", model)
        model = getattr(model, "model", model)  # the VLM inside a peft wrapper
        card = Path(self.args.output_dir) / "README.md"
        with card.open("a", encoding="utf-8") as f:
            f.write(card_sections(model, metrics, self.card_samples, repo))
