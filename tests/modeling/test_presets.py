"""The tiny preset's language model: its initial weight scale follows its width (docs/tiny-recipe.md, round seven)."""

import pytest
import torch

from modeling.presets import tiny_language_model
from modeling.tiny_tokenizers import train_chat_tokenizer
from tests.helpers import TINY_CORPUS


@pytest.mark.parametrize(("overrides", "expected_std"), [
    ({"hidden_size": 64, "intermediate_size": 128}, 64 ** -0.5),  # 1/sqrt(width), not transformers' 0.02
    ({"hidden_size": 144, "intermediate_size": 256}, 144 ** -0.5),
    ({"hidden_size": 64, "intermediate_size": 128, "initializer_range": 0.02}, 0.02),  # an explicit one wins
])
def test_tiny_lm_weights_start_at_the_fan_in_scale(overrides, expected_std):
    torch.manual_seed(0)
    tokenizer = train_chat_tokenizer(TINY_CORPUS * 5, vocab_size=300)
    model = tiny_language_model(tokenizer, num_attention_heads=2, num_key_value_heads=2, **overrides)
    assert model.config.initializer_range == pytest.approx(expected_std)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
                 "model.embed_tokens.weight"):
        assert model.get_parameter(name).std().item() == pytest.approx(expected_std, rel=0.05), name
