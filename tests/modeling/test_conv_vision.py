"""A convolutional vision encoder (any AutoConfig) works in the Q-Former: its feature map becomes tokens that
carry their grid position; a ViT's patch tokens get the same codes when the config asks."""

import pytest
import torch

from modeling.modeling_qformer import sincos_positions_2d
from tests.conftest import tiny_qformer_and_processor


def test_resnet_encoder_trains_and_knows_positions(shape_images):
    resnet = {"model_type": "resnet", "image_size": 32, "embedding_size": 16, "hidden_sizes": [16, 32],
              "depths": [1, 1], "layer_type": "basic"}
    model, processor = tiny_qformer_and_processor(vision=resnet)
    assert model.config.qformer_config.encoder_hidden_size == 32
    inputs = processor(images=shape_images, text=["a red circle", "a green circle", "a blue one", "yellow"],
                       padding=True, return_tensors="pt")
    features = model.get_vision_features(inputs["pixel_values"])
    assert features.shape == (4, 4 * 4, 32)  # 32 px -> stride 4 stem -> 8x8 -> stride 2 stage -> 4x4 tokens
    # The same feature map without position codes: tokens differ from it by exactly the codes of their cell.
    raw = model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state.flatten(2).transpose(1, 2)
    torch.testing.assert_close(features - raw, sincos_positions_2d(4, 4, 32).expand(4, -1, -1))
    out = model(**inputs)
    out.loss.backward()
    assert all(p.grad is not None for p in model.vision_model.parameters() if p.requires_grad)


def test_position_codes_are_distinct_per_cell():
    codes = sincos_positions_2d(3, 5, 16)
    assert codes.shape == (15, 16)
    assert torch.cdist(codes, codes).add(torch.eye(15)).min() > 0.1


def test_vit_patch_tokens_get_position_codes_when_asked(shape_images):
    model, processor = tiny_qformer_and_processor(vision_position_codes=True)
    pixels = processor(images=shape_images, return_tensors="pt")["pixel_values"]
    features = model.get_vision_features(pixels)
    raw = model.vision_model(pixel_values=pixels).last_hidden_state
    # 32 px / patch 8 (the test model's) -> a 4x4 grid after the class token, which gets no code.
    expected = torch.cat([torch.zeros(1, 32), sincos_positions_2d(4, 4, 32)])
    torch.testing.assert_close(features - raw, expected.expand(len(shape_images), -1, -1))


def test_position_codes_refuse_a_token_count_that_is_no_grid():
    model, _ = tiny_qformer_and_processor(vision_position_codes=True)
    with pytest.raises(ValueError, match="square grid of patch tokens.*returned 7 tokens"):
        model._patch_position_codes(7, 32)
