"""Saved folders load with the Auto classes in a process that has never imported this project."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from modeling.lora import add_lora
from tests.helpers import run_isolated

PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image."}]}]


def _vlm_inputs(processor, images):
    prompt = processor.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    return processor(images=images, text=[prompt] * len(images), padding=True, return_tensors="pt")


@pytest.mark.slow  # a fresh process: the slow tier
def test_qformer_loads_in_fresh_process(tiny_qformer, shape_images, tmp_path):
    model, processor = tiny_qformer
    model.eval()
    inputs = processor(images=shape_images, text=["a red circle", "a blue square in the center", "two", "x"],
                       padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    model.save_pretrained(tmp_path / "qformer")
    processor.save_pretrained(tmp_path / "qformer")
    save_file({k: v.contiguous() for k, v in inputs.items()}, tmp_path / "inputs.safetensors")

    run_isolated(
        """
        import torch
        from safetensors.torch import load_file, save_file
        from transformers import AutoModel, AutoProcessor
        model = AutoModel.from_pretrained("qformer", trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained("qformer", trust_remote_code=True)
        assert type(model).__name__ == "QFormerModel", type(model)
        assert type(processor).__name__ == "BlipProcessor", type(processor)
        with torch.no_grad():
            out = model(**load_file("inputs.safetensors"))
        tensors = {"logits": out.logits_per_image, "image": out.image_embeds, "text": out.text_embeds}
        save_file(tensors, "out.safetensors")
        """,
        cwd=tmp_path,
    )
    loaded = load_file(tmp_path / "out.safetensors")
    torch.testing.assert_close(loaded["logits"], out.logits_per_image, atol=1e-6, rtol=0)
    torch.testing.assert_close(loaded["image"], out.image_embeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(loaded["text"], out.text_embeds, atol=1e-6, rtol=0)


def _check_vlm_folder(model, processor, images, folder, tmp_path):
    model.eval()
    inputs = _vlm_inputs(processor, images)
    with torch.no_grad():
        logits = model(**inputs).logits
    save_file({k: v.contiguous() for k, v in inputs.items()}, tmp_path / "inputs.safetensors")
    run_isolated(
        f"""
        import torch
        from safetensors.torch import load_file, save_file
        from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor
        inputs = load_file("inputs.safetensors")
        outs = {{}}
        for auto in (AutoModel, AutoModelForImageTextToText):
            model = auto.from_pretrained("{folder}", trust_remote_code=True).eval()
            assert type(model).__name__ == "VLMForConditionalGeneration", type(model)
            with torch.no_grad():
                outs[auto.__name__] = model(**inputs).logits
        processor = AutoProcessor.from_pretrained("{folder}", trust_remote_code=True)
        assert type(processor).__name__ == "VLMProcessor", type(processor)
        assert processor.num_query_tokens == {processor.num_query_tokens}
        save_file(outs, "out.safetensors")
        """,
        cwd=tmp_path,
    )
    loaded = load_file(tmp_path / "out.safetensors")
    for name in ("AutoModel", "AutoModelForImageTextToText"):
        torch.testing.assert_close(loaded[name], logits, atol=1e-6, rtol=0)


@pytest.mark.slow  # a fresh process: the slow tier
def test_vlm_loads_in_fresh_process(tiny_vlm, shape_images, tmp_path):
    model, processor = tiny_vlm
    model.save_pretrained(tmp_path / "vlm")
    processor.save_pretrained(tmp_path / "vlm")
    _check_vlm_folder(model, processor, shape_images[:2], "vlm", tmp_path)


@pytest.mark.slow  # a fresh process: the slow tier
def test_vlm_after_lora_merge_loads_in_fresh_process(tiny_vlm, shape_images, tmp_path):
    model, processor = tiny_vlm
    peft_model = add_lora(model, r=4, alpha=8, dropout=0.0)
    # LoRA B starts at zero; move it so the merge changes the weights and the comparison means something.
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    merged = peft_model.merge_and_unload()
    assert type(merged).__name__ == "VLMForConditionalGeneration"
    assert not any("lora" in n for n, _ in merged.named_parameters())
    merged.save_pretrained(tmp_path / "merged")
    processor.save_pretrained(tmp_path / "merged")
    _check_vlm_folder(merged, processor, shape_images[:2], "merged", tmp_path)
