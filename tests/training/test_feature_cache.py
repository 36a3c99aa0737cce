"""The frozen-vision feature cache: same loss as running the encoder, keyed so that a stale cache is never read."""

import copy
import pickle

import datasets
import pytest
import torch

from cli import UserError
from modeling.presets import tiny_image_processor
from training.collators import ContrastiveCollator
from training.conversation_collator import ConversationCollator
from training.feature_cache import (
    FeatureCache,
    FeatureCacheCollator,
    build_feature_cache,
    cache_key,
    image_id,
    undecoded,
    with_feature_cache,
)

from .frozen_models import frozen_qformer, frozen_vlm, make_rows

TIGHT = {"rtol": 1e-5, "atol": 1e-6}


def as_dataset(rows):
    return datasets.Dataset.from_list(rows)


def decoded_and_raw(rows):
    """The same rows twice: with decoded images (the pixel path) and with encoded ones (the cache path)."""
    dataset = as_dataset(rows)
    return list(dataset), list(undecoded(dataset))


def build(model, processor, rows, root, dtype=torch.float32):
    return build_feature_cache(model, processor.image_processor, [as_dataset(rows)], root, dtype=dtype,
                               batch_size=3, shard_size=2)


def test_stage1_cached_features_give_the_pixel_loss(rows, tmp_path):
    model, processor = frozen_qformer()
    cache = build(model, processor, rows, tmp_path)
    assert len(cache) == len(rows) and len(cache.index["shards"]) == 2  # several shards, read across
    decoded, raw = decoded_and_raw(rows)
    pixels = ContrastiveCollator(processor, max_length=16)(decoded)
    cached = FeatureCacheCollator(ContrastiveCollator(processor, max_length=16, pixel_format="none"), cache)(raw)
    assert "pixel_values" not in cached
    model.eval()
    torch.testing.assert_close(model(**cached).loss, model(**pixels).loss, **TIGHT)


def test_stage2_cached_features_give_the_pixel_loss(rows, tmp_path):
    model, processor = frozen_vlm()
    cache = build(model, processor, rows, tmp_path)
    decoded, raw = decoded_and_raw(rows)
    pixels = ConversationCollator(processor, max_length=64, qa_turns=1)(decoded)
    cached = FeatureCacheCollator(ConversationCollator(processor, max_length=64, qa_turns=1, pixel_format="none"),
                                  cache)(raw[::-1])  # order must follow the rows, not the cache
    model.eval()
    reordered = {k: v.flip(0) for k, v in cached.items()}
    torch.testing.assert_close(model(**reordered).loss, model(**pixels).loss, **TIGHT)


def test_cached_features_follow_the_collators_copies_and_left_out_samples(rows, tmp_path):
    """Separate turns with an instruction-aware Q-Former show each image once per turn, and an over-long sample is
    left out of its batch: the cached features must follow the images the batch holds, not the rows it was given."""
    model, processor = frozen_vlm(instruction_aware_qformer=True)
    cache = build(model, processor, rows, tmp_path)
    words = " ".join(["a red circle"] * 40)
    long = {**rows[1], "key": "long", "caption": words, "qa": [{**rows[1]["qa"][0], "answer": words}]}
    batch_rows = [rows[0], long, rows[2]]
    decoded, raw = decoded_and_raw(batch_rows)
    settings = {"max_length": 72, "qa_turns": 1, "separate_turns": True, "instruction_aware": True}
    pixels_collator = ConversationCollator(processor, **settings)
    pixels = pixels_collator(decoded)
    assert list(pixels_collator.samples_left_out) == ["long"]
    cached = FeatureCacheCollator(ConversationCollator(processor, pixel_format="none", **settings), cache)(raw)
    assert len(cached["vision_features"]) == len(pixels["pixel_values"]) == 2 and "image_rows" not in cached
    assert cached["image_index"].tolist() == pixels["image_index"].tolist() == [0, 0, 1, 1]
    model.eval()
    torch.testing.assert_close(model(**cached).loss, model(**pixels).loss, **TIGHT)


def test_a_vlm_finds_the_cache_its_stage1_model_built(rows, tmp_path):
    qformer, processor = frozen_qformer()
    build(qformer, processor, rows, tmp_path, dtype=torch.bfloat16)
    vlm, vlm_processor = frozen_vlm()
    assert cache_key(vlm, vlm_processor.image_processor) == cache_key(qformer, processor.image_processor)
    FeatureCache.open(tmp_path, vlm, vlm_processor.image_processor)


def test_key_changes_with_vision_config_processor_weights_and_dtype():
    model, processor = frozen_qformer()
    key = cache_key(model, processor.image_processor)
    assert cache_key(copy.deepcopy(model), copy.deepcopy(processor.image_processor)) == key
    other_config, _ = frozen_qformer(vision={"layer_norm_eps": 1e-6})
    other_weights = copy.deepcopy(model)
    with torch.no_grad():
        other_weights.vision_model.embeddings.patch_embeddings.projection.weight.mul_(1.01)
    other_processor = tiny_image_processor(32)
    other_processor.image_mean = [0.48, 0.45, 0.4]
    assert len({
        key,
        cache_key(other_config, processor.image_processor),
        cache_key(other_weights, processor.image_processor),
        cache_key(model, other_processor),
        cache_key(model, processor.image_processor, dtype=torch.float32),
    }) == 5
    # Names and labels of the encoder's checkpoint do not change what it computes.
    renamed = copy.deepcopy(model)
    renamed.vision_model.config._name_or_path = "somewhere/else"
    renamed.vision_model.config.architectures = ["ViTForImageClassification"]
    assert cache_key(renamed, processor.image_processor) == key


def test_a_stale_cache_is_not_used(rows, tmp_path):
    model, processor = frozen_qformer()
    build(model, processor, rows, tmp_path, dtype=torch.bfloat16)
    changed = copy.deepcopy(processor.image_processor)
    changed.image_std = [0.25, 0.25, 0.25]
    with pytest.raises(UserError, match="built for another encoder"):
        FeatureCache.open(tmp_path, model, changed)
    # Building for the new processor makes a second cache beside the first, with other features.
    fresh = build_feature_cache(model, changed, [as_dataset(rows)], tmp_path)
    first = FeatureCache.open(tmp_path, model, processor.image_processor)
    assert fresh.path != first.path
    ids = [image_id(row["image"]) for row in decoded_and_raw(rows)[1]]
    assert not torch.allclose(fresh.features(ids).float(), first.features(ids).float())


def test_an_interrupted_build_is_not_a_cache(rows, tmp_path):
    model, processor = frozen_qformer()
    cache = build(model, processor, rows, tmp_path)
    (cache.path / "index.json").unlink()
    with pytest.raises(UserError, match="build it with"):
        FeatureCache.open(tmp_path, model, processor.image_processor, dtype=torch.float32)


def test_unknown_samples_and_trainable_encoders_are_refused(rows, tmp_path):
    model, processor = frozen_qformer()
    cache = build(model, processor, rows[:2], tmp_path)
    raw = decoded_and_raw(rows)[1]
    with pytest.raises(UserError, match="rebuild it"):
        cache.features([image_id(raw[3]["image"])])
    with pytest.raises(TypeError, match="undecoded images"):
        FeatureCacheCollator(ContrastiveCollator(processor, pixel_format="none"), cache)(rows[:2])
    trainable, trainable_processor = frozen_qformer(freeze_vision=False)
    with pytest.raises(ValueError, match="freeze_vision: true"):
        build(trainable, trainable_processor, rows, tmp_path / "other")


def test_training_hook_reads_features_in_loader_workers(rows, tmp_path):
    model, processor = frozen_qformer()
    build_feature_cache(model, processor.image_processor, [as_dataset(rows)], tmp_path)  # bf16, as the CLI does
    collator, train = with_feature_cache(ContrastiveCollator(processor, max_length=16), [as_dataset(rows)],
                                         str(tmp_path), model, processor.image_processor, bf16=False)
    assert isinstance(train[0]["image"], dict), "the training split no longer decodes images"
    collator = pickle.loads(pickle.dumps(collator))  # what a DataLoader worker receives
    batch = collator(list(train))
    assert batch["vision_features"].dtype == torch.float32 and "pixel_values" not in batch
    assert batch["vision_features"].shape == (len(rows), 17, 32)


def test_splits_whose_keys_repeat_get_their_own_features(tmp_path):
    """Sample keys restart in every split; the cache tells images apart by their bytes, and stores each once."""
    model, processor = frozen_qformer()
    train, validation = make_rows(5), make_rows(7)[4:]  # validation: one image shared with train, two new
    for i, row in enumerate(validation):
        row["key"] = train[i]["key"]
    cache = build_feature_cache(model, processor.image_processor, [as_dataset(train), as_dataset(validation)],
                                tmp_path, dtype=torch.float32, batch_size=2, shard_size=3)
    assert len(cache) == 7 and sum(len(s["image_ids"]) for s in cache.index["shards"]) == 7
    _, raw = decoded_and_raw(validation)
    decoded, _ = decoded_and_raw(validation)
    expected = model.get_vision_features(processor.image_processor([r["image"] for r in decoded],
                                                                   return_tensors="pt")["pixel_values"])
    torch.testing.assert_close(cache.features([image_id(r["image"]) for r in raw]), expected, **TIGHT)
