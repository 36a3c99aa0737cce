"""Under LoRA nothing is held twice: the Q-Former trains in place (no peft copy of the module, frozen ViT included),
and the adapter folder holds LoRA, the Q-Former's trained weights and the MLP adapter, enough to rebuild the model."""

import copy

import torch
from safetensors import safe_open

from modeling.lora import NON_LORA_WEIGHTS, add_lora, load_adapter, save_adapter
from tests.conftest import tiny_vlm_and_processor


def _keys(path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def _train_a_little(peft_model) -> None:
    """Moves every trainable weight, as training would (LoRA B starts at zero, which a merge would not show)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)


def test_parameter_count_is_the_sum_of_the_parts_plus_lora():
    model, _ = tiny_vlm_and_processor(freeze_vision=True)
    parts = {name: sum(p.numel() for p in getattr(model, name).parameters())
             for name in ("qformer", "adapter", "language_model")}
    # The tiny LM ties its head to its input embeddings, as SmolLM does: the head adds no parameter.
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert sum(p.numel() for p in model.parameters()) == sum(parts.values())
    peft_model = add_lora(model, r=4, alpha=8, dropout=0.0)
    lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert lora > 0
    assert sum(p.numel() for p in peft_model.parameters()) == sum(parts.values()) + lora
    trainable = {n for n, p in peft_model.get_base_model().named_parameters() if p.requires_grad}
    vision = {n for n, _ in model.named_parameters() if n.startswith("model.qformer.vision_model.")}
    assert vision and not trainable & vision
    assert "model.qformer.query_tokens" in trainable and any(n.startswith("model.adapter.") for n in trainable)


def test_adapter_folder_holds_only_trained_weights_and_rebuilds_the_model(tmp_path, shape_images):
    model, processor = tiny_vlm_and_processor(freeze_vision=True)
    start = copy.deepcopy(model)  # what a user rebuilds: the VLM training started from
    peft_model = add_lora(model, r=4, alpha=8, dropout=0.0)
    _train_a_little(peft_model)
    save_adapter(peft_model, tmp_path / "adapter")

    lora_keys = _keys(tmp_path / "adapter" / "adapter_model.safetensors")
    assert lora_keys and all("lora_" in k for k in lora_keys)
    trained = _keys(tmp_path / "adapter" / NON_LORA_WEIGHTS)
    expected = {n for n, p in peft_model.get_base_model().named_parameters() if p.requires_grad and "lora_" not in n}
    assert set(trained) == expected
    assert not [k for k in trained if "vision_model" in k or "language_model" in k]

    merged = peft_model.merge_and_unload().eval()
    rebuilt = load_adapter(start, tmp_path / "adapter").merge_and_unload().eval()
    assert merged.state_dict().keys() == rebuilt.state_dict().keys()
    different = [k for k, v in merged.state_dict().items() if not torch.equal(v, rebuilt.state_dict()[k])]
    assert not different, different[:5]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=shape_images[:2], text=[prompt] * 2, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(**inputs).logits, merged(**inputs).logits, rtol=0, atol=0)
