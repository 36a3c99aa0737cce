"""The base/qwen3 code paths (pretrained ViT, BERT-family text layers, SmolLM/Qwen3 LMs) on tiny local checkpoints."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    DistilBertConfig,
    DistilBertModel,
    LlamaConfig,
    Qwen3Config,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

from modeling.modeling_qformer import QFormerModel, map_bert_state_dict
from modeling.presets import build_pretrained_qformer, build_vlm
from modeling.tiny_tokenizers import train_chat_tokenizer, train_wordpiece_tokenizer
from tests.helpers import TINY_CORPUS

TEXT_MODELS = {
    "bert": lambda vocab: BertModel(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=64,
                                               max_position_embeddings=64)),
    "distilbert": lambda vocab: DistilBertModel(DistilBertConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=2,
                                                                 hidden_dim=64, max_position_embeddings=64)),
}


@pytest.fixture
def vit_folder(tmp_path):
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64))
    vit.save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    return tmp_path / "vit", vit


def _text_folder(tmp_path, kind):
    tokenizer = train_wordpiece_tokenizer(TINY_CORPUS * 3, vocab_size=200)
    torch.manual_seed(1)
    text = TEXT_MODELS[kind](len(tokenizer))
    text.save_pretrained(tmp_path / kind)
    tokenizer.save_pretrained(tmp_path / kind)
    return tmp_path / kind, text


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_qformer_text_layers_are_copied_from_bert_family(tmp_path, vit_folder, kind):
    vit_dir, vit = vit_folder
    text_dir, text = _text_folder(tmp_path, kind)
    model, processor = build_pretrained_qformer(str(vit_dir), str(text_dir), num_query_tokens=4, embed_dim=16)

    own = model.state_dict()
    mapped, unmapped = map_bert_state_dict(text.state_dict())
    assert len(mapped) >= len(text.state_dict()) - len(unmapped)
    for name, tensor in mapped.items():
        assert torch.equal(own[name], tensor), name
    # query feed-forward layers start as copies of the text ones, as in BLIP-2
    assert torch.equal(own["query_transformer.encoder.layer.1.intermediate_query.dense.weight"],
                       own["query_transformer.encoder.layer.1.intermediate.dense.weight"])
    expected_unmapped = {"bert": {"embeddings.token_type_embeddings.weight", "pooler.dense.weight",
                                  "pooler.dense.bias"}, "distilbert": set()}[kind]
    assert set(unmapped) == expected_unmapped
    for name, tensor in vit.state_dict().items():
        if not name.startswith("pooler."):
            assert torch.equal(own[f"vision_model.{name}"], tensor), name

    report = model.load_text_state_dict(text.state_dict())
    assert set(report["text_unmapped"]) == expected_unmapped
    assert any("crossattention" in k for k in report["text_not_initialised"])
    assert "query_tokens" in report["text_not_initialised"]
    assert type(processor.image_processor).__name__.startswith("ViTImageProcessor")


def test_shape_mismatch_names_the_weight(tmp_path, vit_folder):
    _, vit = vit_folder
    text_dir, text = _text_folder(tmp_path, "distilbert")
    from modeling.configuration_qformer import QFormerConfig

    model = QFormerModel(QFormerConfig(vision_config=vit.config, qformer_config={
        "hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "vocab_size": len(text.embeddings.word_embeddings.weight)}))
    with pytest.raises(ValueError, match="build the Q-Former with the text model's sizes"):
        model.load_text_state_dict(text.state_dict())


@pytest.mark.parametrize("lm_config", [
    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=128),
    Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, max_position_embeddings=128),
], ids=["llama", "qwen3"])
def test_vlm_from_pretrained_language_model(tmp_path, vit_folder, lm_config, shape_images):
    vit_dir, _ = vit_folder
    text_dir, _ = _text_folder(tmp_path, "distilbert")
    qformer, qformer_processor = build_pretrained_qformer(str(vit_dir), str(text_dir), num_query_tokens=4, embed_dim=16)

    tokenizer = train_chat_tokenizer(TINY_CORPUS * 3, vocab_size=350)
    lm_config.vocab_size = len(tokenizer)
    torch.manual_seed(2)
    lm = AutoModelForCausalLM.from_config(lm_config)
    lm.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")

    vlm, processor = build_vlm(qformer, qformer_processor, language_model=str(tmp_path / "lm"))
    # The LM's decoder is the VLM's language_model, its head the VLM's lm_head: every weight carried over.
    assert type(vlm.language_model) is type(lm.model)
    for name, tensor in lm.model.state_dict().items():
        assert torch.equal(vlm.language_model.state_dict()[name], tensor), name
    assert torch.equal(vlm.lm_head.weight, lm.lm_head.weight)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=shape_images[:1], text=[prompt], return_tensors="pt")
    assert int((inputs["input_ids"] == vlm.config.image_token_id).sum()) == 4
    out = vlm.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_placeholder_added_to_a_tokenizer_grows_the_embeddings(tiny_qformer):
    qformer, _ = tiny_qformer
    tokenizer = train_chat_tokenizer(TINY_CORPUS * 3, vocab_size=350)
    lm = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<extra_image>"]})
    from modeling.modeling_vlm import VLMForConditionalGeneration

    vlm = VLMForConditionalGeneration.from_qformer_and_lm(
        qformer, lm, image_token_id=tokenizer.convert_tokens_to_ids("<extra_image>"), vocab_size=len(tokenizer))
    rows = vlm.get_input_embeddings().weight
    assert rows.shape[0] >= len(tokenizer) and rows.shape[0] % 64 == 0
    assert torch.equal(rows[: lm.config.vocab_size], lm.get_input_embeddings().weight[: lm.config.vocab_size])
