"""The processor's chat template: a message's items in their order (the image where its item stands), that it
travels with a saved processor (so every harness that renders prompts with it, lmms-eval, the app and `python -m
eval`, asks as training did), and that generation handles an image inside the prompt."""

import pytest
import torch
from transformers import AutoProcessor

from modeling.processing_vlm import DEFAULT_CHAT_TEMPLATE
from tests.conftest import tiny_vlm_and_processor
from tests.helpers import run_isolated

QUESTIONS = ["where is the small red circle? how many shapes are there?", "describe the image."]


def _messages(question: str, image_first: bool = True) -> list[dict]:
    # The image item first is how LLaVA-style callers (lmms-eval, transformers' pipeline) build a message.
    items = [{"type": "image"}, {"type": "text", "text": question}]
    return [{"role": "user", "content": items if image_first else items[::-1]}]


def test_the_image_goes_where_its_item_stands():
    _, processor = tiny_vlm_and_processor()
    assert processor.chat_template == DEFAULT_CHAT_TEMPLATE
    before = processor.apply_chat_template(_messages(QUESTIONS[0]), add_generation_prompt=True, tokenize=False)
    assert before == "<|im_start|>user\n<image>" + QUESTIONS[0] + "<|im_end|>\n<|im_start|>assistant\n"
    after = processor.apply_chat_template(_messages(QUESTIONS[0], image_first=False), add_generation_prompt=True,
                                          tokenize=False)
    assert after == "<|im_start|>user\n" + QUESTIONS[0] + "<image><|im_end|>\n<|im_start|>assistant\n"
    # The tiny tokenizer's own template says the same, and plain-string messages are unchanged.
    assert processor.tokenizer.chat_template == processor.chat_template
    plain = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
    assert processor.apply_chat_template(plain, tokenize=False) == "<|im_start|>user\nhello<|im_end|>\n" \
        "<|im_start|>assistant\nhi<|im_end|>\n"


@pytest.mark.slow  # a fresh process: the slow tier
def test_a_saved_processor_renders_as_the_training_one(tmp_path):
    model, processor = tiny_vlm_and_processor()
    model.save_pretrained(tmp_path / "vlm")
    processor.save_pretrained(tmp_path / "vlm")
    # Loaded in a process that has never imported this project, as a harness loads it.
    prompt = run_isolated(
        f"""
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained("vlm", trust_remote_code=True)
        messages = {_messages(QUESTIONS[0], image_first=False)!r}
        print(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), end="")
        """,
        cwd=tmp_path,
    )
    assert prompt == processor.apply_chat_template(_messages(QUESTIONS[0], image_first=False),
                                                   add_generation_prompt=True, tokenize=False)
    assert AutoProcessor.from_pretrained(tmp_path / "vlm", trust_remote_code=True).chat_template == \
        DEFAULT_CHAT_TEMPLATE


def test_generation_with_the_image_inside_the_prompt(shape_images):
    """Left-padded prompts whose image tokens start at different places give what each prompt gives alone, and
    the image still decides the answer."""
    model, processor = tiny_vlm_and_processor()
    torch.manual_seed(3)
    with torch.no_grad():
        for param in model.language_model.parameters():
            if param.dim() > 1:
                param.normal_(std=0.3)  # widely spread weights: greedy decoding is not a chain of near-ties
    model.eval()
    prompts = [processor.apply_chat_template(_messages(q, image_first=False), add_generation_prompt=True,
                                             tokenize=False) for q in QUESTIONS]
    batch = processor(images=shape_images[:2], text=prompts, padding=True, return_tensors="pt")
    assert (batch["attention_mask"][1] == 0).any(), "the shorter prompt must be padded for this test to mean anything"
    for row, mask in zip(batch["input_ids"], batch["attention_mask"]):
        first_image, first_token = int((row == processor.image_token_id).nonzero()[0]), int(mask.nonzero()[0])
        assert first_image > first_token + 3, "the image tokens must follow the question"

    def new_tokens(inputs):
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        return out[:, inputs["input_ids"].shape[1]:].tolist()

    batched = new_tokens(batch)
    for i in range(2):
        assert batched[i] == new_tokens(processor(images=[shape_images[i]], text=[prompts[i]], return_tensors="pt"))[0]
    with torch.no_grad():
        logits = [model(**processor(images=[image], text=[prompts[0]], return_tensors="pt")).logits[0, -1]
                  for image in shape_images[:2]]
    assert not torch.allclose(logits[0], logits[1])
