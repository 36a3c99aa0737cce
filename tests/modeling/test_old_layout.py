"""A folder saved before the transformers 5 layout (a causal LM nested under `language_model`) loads into
`VLMForConditionalGeneration` and gives the outputs it gave when it was saved.

The fixture folder was written by commit a5aab5e's code: its tiny VLM, two images, two prompts, and the last-position
logits and greedy tokens that code computed on them."""

import json
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoProcessor

from modeling import VLMForConditionalGeneration

OLD = Path(__file__).resolve().parents[1] / "fixtures" / "vlm_layout_a5aab5e"


def _inputs(folder):
    processor = AutoProcessor.from_pretrained(folder)
    expected = json.loads((OLD / "expected_outputs.json").read_text())
    images = [Image.open(OLD / f"image{i}.png").convert("RGB") for i in range(2)]
    return processor(images=images, text=expected["prompts"], return_tensors="pt", padding=True), expected


def test_old_folder_loads_every_weight_and_gives_the_saved_logits_and_tokens():
    model, info = VLMForConditionalGeneration.from_pretrained(OLD, output_loading_info=True)
    assert not any(info.values()), info
    inputs, expected = _inputs(OLD)
    model.eval()
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(logits[:, -1], torch.tensor(expected["logits_last"]), rtol=0, atol=1e-5)
    assert generated[:, inputs["input_ids"].shape[1]:].tolist() == expected["generated"]


def test_a_resaved_old_folder_has_the_new_key_names_and_loads_to_the_same_weights(tmp_path):
    model = VLMForConditionalGeneration.from_pretrained(OLD)
    model.save_pretrained(tmp_path / "new")
    with safe_open(tmp_path / "new" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert all(k.startswith("model.") or k == "lm_head.weight" for k in keys), sorted(keys)[:10]
    assert "model.language_model.embed_tokens.weight" in keys
    assert not any(k.startswith(("language_model.", "qformer.", "adapter.")) for k in keys)
    reloaded, info = VLMForConditionalGeneration.from_pretrained(tmp_path / "new", output_loading_info=True)
    assert not any(info.values()), info
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
