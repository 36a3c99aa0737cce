"""Regional queries (`regional_queries: g`): each of the first g*g queries reads one region of the patch grid only,
so what it carries comes from that part of the image and no other; `isolate_regional_queries` keeps it so through
every layer's self-attention too."""

import pytest
import torch

from tests.conftest import tiny_qformer_and_processor


def one_layer_qformer(num_hidden_layers=1, **settings):
    # One layer: the queries' self-attention runs before they read the image, so a query's output depends on the
    # tokens its own cross-attention reads and nothing else. From the second layer on, self-attention passes
    # what each query has read to the others, unless the regional queries are isolated.
    model, _ = tiny_qformer_and_processor(num_query_tokens=6, qformer={"hidden_size": 32, "num_attention_heads": 2,
                                                                       "intermediate_size": 64,
                                                                       "num_hidden_layers": num_hidden_layers},
                                          **settings)
    return model.eval()


def changed_queries(model, token: int) -> list[int]:
    """The queries whose output moves when vision token `token` (0 = class token, then a 4x4 grid) changes."""
    torch.manual_seed(0)
    features = torch.randn(2, 17, 32)
    moved = features.clone()
    moved[:, token] += 3.0
    with torch.no_grad():
        before = model.get_query_outputs(vision_features=features)
        after = model.get_query_outputs(vision_features=moved)
    return [q for q in range(6) if not torch.allclose(before[:, q], after[:, q], atol=1e-6)]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_each_regional_query_reads_its_own_region_only(attn_implementation):
    model = one_layer_qformer(regional_queries=2)
    model.query_transformer.config._attn_implementation = attn_implementation
    # 4x4 patches in 2x2 regions of 2x2: patch (row, col) -> token 1 + 4 * row + col, region 2 * (row // 2) + col // 2.
    for (row, col), region in (((0, 0), 0), ((1, 3), 1), ((3, 0), 2), ((2, 2), 3)):
        assert changed_queries(model, 1 + 4 * row + col) == [region, 4, 5], (row, col)
    assert changed_queries(model, 0) == [4, 5]  # the class token is for the global queries only


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_isolated_regional_queries_read_their_own_region_through_every_layer(attn_implementation):
    mixed = one_layer_qformer(num_hidden_layers=2, regional_queries=2)
    assert changed_queries(mixed, 1) == list(range(6))  # a second layer hands region 0 to every query
    model = one_layer_qformer(num_hidden_layers=2, regional_queries=2, isolate_regional_queries=True)
    model.query_transformer.config._attn_implementation = attn_implementation
    for (row, col), region in (((0, 0), 0), ((1, 3), 1), ((3, 0), 2), ((2, 2), 3)):
        assert changed_queries(model, 1 + 4 * row + col) == [region, 4, 5], (row, col)
    assert changed_queries(model, 0) == [4, 5]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_isolated_regional_queries_learn_through_the_others(attn_implementation, shape_images):
    model, processor = tiny_qformer_and_processor(num_query_tokens=6, regional_queries=2,
                                                  isolate_regional_queries=True)
    model.query_transformer.config._attn_implementation = attn_implementation
    captions = ["a red circle", "a green circle", "a blue one", "yellow"]
    inputs = processor(images=shape_images, text=captions, padding=True, return_tensors="pt")
    outputs = model(**inputs)
    # Only the two other queries are compared with captions ...
    assert outputs.image_embeds.shape == (4, 2, 32)
    assert outputs.query_output.shape[1] == 6
    outputs.loss.backward()
    # ... and the regional ones still learn: the others read them in self-attention.
    assert model.query_tokens.grad[0, :4].abs().sum() > 0
    # Matching (ITM) keeps the isolation and ignores the captions' padding.
    model.eval()
    with torch.no_grad():
        logits = model.match(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
        padded = processor(images=shape_images, text=captions, padding="max_length", max_length=12,
                           return_tensors="pt")
        torch.testing.assert_close(model.match(padded["input_ids"], padded["attention_mask"],
                                               padded["pixel_values"]), logits)


def test_without_regional_queries_every_query_reads_everything():
    model = one_layer_qformer()
    assert changed_queries(model, 1) == list(range(6))


def test_regional_queries_train_and_load_back(tmp_path, shape_images):
    model, processor = tiny_qformer_and_processor(num_query_tokens=6, regional_queries=2)
    inputs = processor(images=shape_images, text=["a red circle", "a green circle", "a blue one", "yellow"],
                       padding=True, return_tensors="pt")
    model(**inputs).loss.backward()
    assert model.query_tokens.grad[0, :4].abs().sum() > 0
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert loaded.config.regional_queries == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded.get_image_embeds(inputs["pixel_values"]),
                                   model.eval().get_image_embeds(inputs["pixel_values"]))


def test_regional_queries_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="regional_queries 3 needs 9 of the num_query_tokens \\(6\\)"):
        tiny_qformer_and_processor(num_query_tokens=6, regional_queries=3)
    with pytest.raises(ValueError, match="isolate_regional_queries needs regional_queries and at least one other"):
        tiny_qformer_and_processor(num_query_tokens=4, regional_queries=2, isolate_regional_queries=True)
    model, _ = tiny_qformer_and_processor(num_query_tokens=9, regional_queries=3)  # a 4x4 grid has no 3x3 regions
    with pytest.raises(ValueError, match="regional_queries 3 must divide the 4x4 patch grid"):
        model.get_query_outputs(vision_features=torch.randn(1, 17, 32))
