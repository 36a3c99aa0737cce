"""Region names (`build_vlm(region_names=...)`, `VLMConfig.region_token_ids`): each regional query's visual token
carries the language model's own embedding of its region's name, so that "the circle in the top left" and the token
of the top-left region share words."""

import pytest
import torch

from cli import UserError
from modeling import VLMForConditionalGeneration
from modeling.presets import build_vlm
from tests.conftest import tiny_qformer_and_processor
from tests.helpers import TINY_CORPUS, TINY_LM

NAMES = ["top left", "top right", "bottom left", "bottom right"]


def tiny_vlm(region_names=None):
    # 6 queries on the 4x4 patch grid, the first 4 reading one 2x2 region each
    qformer, qformer_processor = tiny_qformer_and_processor(num_query_tokens=6, regional_queries=2,
                                                            isolate_regional_queries=True)
    torch.manual_seed(1)
    return build_vlm(qformer, qformer_processor, corpus=TINY_CORPUS * 5, lm=TINY_LM, lm_vocab_size=400,
                     region_names=region_names)


def test_each_regional_token_carries_its_region_name(shape_images):
    plain, _ = tiny_vlm()
    named, processor = tiny_vlm(NAMES)
    ids = [processor.tokenizer(" " + name, add_special_tokens=False)["input_ids"] for name in NAMES]
    assert named.config.region_token_ids == ids
    assert plain.config.region_token_ids is None
    pixels = processor.image_processor(shape_images[:2], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        before, after = plain.eval().get_image_features(pixels), named.eval().get_image_features(pixels)
        embeddings = named.get_input_embeddings().weight
        for region, token_ids in enumerate(ids):
            torch.testing.assert_close(after[:, region] - before[:, region],
                                       embeddings[token_ids].mean(0).expand(2, -1))
    torch.testing.assert_close(after[:, 4:], before[:, 4:])  # the two queries that read the whole image


def test_region_names_survive_save_and_load(tmp_path, shape_images):
    model, processor = tiny_vlm(NAMES)
    model.save_pretrained(tmp_path)
    loaded = VLMForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.region_token_ids == model.config.region_token_ids
    pixels = processor.image_processor(shape_images[:2], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.get_image_features(pixels), model.eval().get_image_features(pixels))


def test_one_name_per_region():
    with pytest.raises(UserError, match="region_names gives 3 names but the Q-Former has 4 regional queries"):
        tiny_vlm(NAMES[:3])
