"""push_to_hub runs its real code path; only the Hub's HTTP API is replaced by a local folder."""


import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import run_isolated


@pytest.mark.slow  # a fresh process: the slow tier
def test_pushed_files_are_exactly_what_a_fresh_process_needs(tiny_vlm, shape_images, folder_hub, tmp_path):
    model, processor = tiny_vlm
    repo = "someone/tiny-vlm"
    model.push_to_hub(repo)
    processor.push_to_hub(repo)

    uploaded = set(folder_hub.uploaded[repo])
    expected = {
        "README.md", "config.json", "generation_config.json", "model.safetensors",
        "configuration_qformer.py", "configuration_vlm.py", "modeling_qformer.py", "modeling_vlm.py",
        "qformer_losses.py", "processing_vlm.py", "qformer_tokenizer/tokenizer.json",
        "qformer_tokenizer/tokenizer_config.json", "processor_config.json", "chat_template.jinja", "tokenizer.json",
        "tokenizer_config.json",
    }
    assert uploaded == expected
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in uploaded)

    # The uploaded files alone, and nothing else, are enough for the Auto classes in an isolated process.
    model.eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=shape_images[:1], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        expected_logits = model(**inputs).logits
    shape_images[0].save(tmp_path / "image.png")
    run_isolated(
        f"""
        import torch
        from PIL import Image
        from safetensors.torch import save_file
        from transformers import AutoModelForImageTextToText, AutoProcessor
        folder = "hub/{repo}"
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        inputs = processor(images=[Image.open("image.png")], text=[{prompt!r}], return_tensors="pt")
        with torch.no_grad():
            save_file({{"logits": model(**inputs).logits}}, "logits.safetensors")
        """,
        cwd=tmp_path,
    )
    torch.testing.assert_close(load_file(tmp_path / "logits.safetensors")["logits"], expected_logits, atol=1e-6, rtol=0)
