"""Generation: batching with left padding, the KV cache, and the image-text-to-text pipeline."""

import pytest
import torch
from transformers import pipeline

QUESTIONS = ["describe the image.", "what color is the circle? how many shapes are there? is there a triangle?"]


@pytest.fixture
def spread_vlm(tiny_vlm):
    """The tiny VLM with widely spread random weights, so greedy decoding is not a chain of near-ties."""
    model, processor = tiny_vlm
    torch.manual_seed(3)
    with torch.no_grad():
        for param in model.language_model.parameters():
            if param.dim() > 1:
                param.normal_(std=0.3)
    return model.eval(), processor


def _prompt(processor, question):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _new_tokens(model, inputs, **kwargs):
    out = model.generate(**inputs, max_new_tokens=10, do_sample=False, **kwargs)
    return out[:, inputs["input_ids"].shape[1]:]


def test_left_padded_batch_equals_each_prompt_alone(spread_vlm, shape_images):
    model, processor = spread_vlm
    processor.tokenizer.padding_side = "left"
    prompts = [_prompt(processor, q) for q in QUESTIONS]
    batch = processor(images=shape_images[:2], text=prompts, padding=True, return_tensors="pt")
    assert (batch["attention_mask"][0] == 0).any(), "the shorter prompt must be padded for this test to mean anything"
    batched = _new_tokens(model, batch)
    for i in range(2):
        alone = _new_tokens(model, processor(images=[shape_images[i]], text=[prompts[i]], return_tensors="pt"))
        assert batched[i].tolist() == alone[0].tolist()
    # The two rows see different images and prompts: a model that ignored its inputs would fail here.
    assert batched[0].tolist() != batched[1].tolist()


def test_kv_cache_gives_the_same_tokens(spread_vlm, shape_images):
    model, processor = spread_vlm
    inputs = processor(images=shape_images[:1], text=[_prompt(processor, QUESTIONS[1])], return_tensors="pt")
    with_cache = _new_tokens(model, inputs, use_cache=True)
    without_cache = _new_tokens(model, inputs, use_cache=False)
    assert with_cache.tolist() == without_cache.tolist()
    assert processor.image_token_id not in with_cache.tolist()[0]


def test_image_changes_the_answer(spread_vlm, shape_images):
    model, processor = spread_vlm
    prompt = _prompt(processor, QUESTIONS[0])
    inputs = processor(images=shape_images[:1], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        a = model(**inputs).logits[0, -1]
        inputs["pixel_values"] = torch.flip(inputs["pixel_values"], dims=[-1, -2])
        b = model(**inputs).logits[0, -1]
    assert not torch.allclose(a, b)


def test_pipeline_returns_text(tiny_vlm, shape_images, tmp_path):
    model, processor = tiny_vlm
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    pipe = pipeline("image-text-to-text", model=str(tmp_path), trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image", "image": shape_images[0]},
                                             {"type": "text", "text": "describe the image."}]}]
    out = pipe(text=messages, max_new_tokens=5, return_full_text=False)
    assert isinstance(out[0]["generated_text"], str)
