"""What trains in stage 2: LoRA on the language model only; vision frozen; Q-Former, adapter and queries trained."""

import re

import torch

from modeling.lora import LORA_TARGET_MODULES, add_lora
from tests.conftest import tiny_vlm_and_processor


def _batch(processor, images):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=images, text=[prompt + "a red circle<|im_end|>"] * len(images), return_tensors="pt")
    labels = inputs["input_ids"].clone()
    labels[:, :-4] = -100
    return {**inputs, "labels": labels}


def test_lora_wraps_only_language_model_projections():
    model, _ = tiny_vlm_and_processor(freeze_vision=True)
    peft_model = add_lora(model, r=4, alpha=8, dropout=0.0)
    lora_modules = {n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_parameters() if ".lora_A." in n}
    assert lora_modules, "no LoRA layer was created"
    assert all(".language_model." in n for n in lora_modules)
    # every linear projection of every decoder layer got one
    num_layers = model.config.text_config.num_hidden_layers
    assert len(lora_modules) == num_layers * len(LORA_TARGET_MODULES)
    assert all(re.search(rf"\.({'|'.join(LORA_TARGET_MODULES)})$", n) for n in lora_modules)


def test_frozen_vision_gets_no_gradient_and_the_rest_does(shape_images):
    model, processor = tiny_vlm_and_processor(freeze_vision=True)
    peft_model = add_lora(model, r=4, alpha=8, dropout=0.0)
    # LoRA B starts at zero, which would zero LoRA A's gradient; give it a value so both must receive one.
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    peft_model.train()
    loss = peft_model(**_batch(processor, shape_images[:2])).loss
    loss.backward()

    grads = {n: p.grad for n, p in peft_model.named_parameters()}
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    vision = [n for n in grads if ".vision_model." in n]
    assert vision and all(grads[n] is None for n in vision)
    assert not any(".vision_model." in n for n in trainable)

    def has_grad(pattern):
        names = [n for n in trainable if re.search(pattern, n)]
        assert names, pattern
        return all(grads[n] is not None and grads[n].abs().sum() > 0 for n in names)

    assert has_grad(r"\.lora_[AB]\.")
    assert has_grad(r"\.adapter\.")
    assert has_grad(r"\.qformer\.query_tokens$")
    assert has_grad(r"\.qformer\.query_transformer\.encoder\.layer\.\d+\.crossattention\.")
    # the language model's own weights stay frozen under LoRA
    base_lm = [n for n in grads if ".language_model." in n and "lora_" not in n]
    assert base_lm and all(grads[n] is None for n in base_lm)


def test_trainable_vision_gets_gradient(shape_images):
    model, processor = tiny_vlm_and_processor(freeze_vision=False)
    model.train()
    model(**_batch(processor, shape_images[:2])).loss.backward()
    vision = [p for n, p in model.named_parameters() if n.startswith("model.qformer.vision_model.")]
    assert vision and all(p.grad is not None for p in vision)
