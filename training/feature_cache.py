"""A cache of frozen vision-encoder features, so training never runs the ViT.

With a frozen encoder, its output for an image never changes, yet it costs 35 of the 84 GFLOPs per pair of a base-size
stage-1 step (torch's FLOP counter, ViT-B/16 224, 48-token captions) and more of its time. This module
computes the patch features once, stores them in safetensors shards, and feeds them to the model as
`vision_features` (which `QFormerModel` and `VLMForConditionalGeneration` accept in place of `pixel_values`).

A cache lives in `<root>/<key>/`, where `key` hashes everything that decides the features: the vision config, the
image-processor config, the encoder's weights and the stored dtype. Change any of them and the key changes, so a
stale cache is never read: opening fails and says how to build the right one. `index.json` is written last, so an
interrupted build is never mistaken for a cache. Inside a cache, each image is found by a hash of its encoded bytes:
sample keys repeat across splits while bytes identify the image itself, and the loader never has to decode it.

    python -m training.feature_cache qformer configs/base/stage1.yaml --feature_cache outputs/cache
    python -m training.feature_cache vlm configs/base/stage2.yaml --feature_cache outputs/cache

then train with the same `--feature_cache outputs/cache`. Size: ViT-B/16 at 224 px stores 197 x 768 values per
image, ~0.3 MB in bf16: ~1 GB per 3,300 images, ~1 TB for all 3.3M of Conceptual Captions.
"""

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path

import datasets
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cli import UserError, run_command

from .arguments import QFormerModelArguments, VLMModelArguments
from .models import build_stage1_model, build_stage2_model
from .stage import load_splits, start_stage, text_corpus

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX = "index.json"
# Config entries that name, label or route a model without changing what its encoder computes (private `_...` ones
# such as `_name_or_path` and the attention implementation are left out too). The weights' own dtype is in their hash.
NON_FEATURE_KEYS = frozenset({
    "transformers_version", "architectures", "id2label", "label2id", "auto_map", "dtype", "torch_dtype",
    "problem_type", "finetuning_task", "return_dict", "output_hidden_states", "output_attentions", "use_cache",
    "processor_class",
})


def feature_source(model: torch.nn.Module) -> torch.nn.Module:
    """The stage-1 model (vision encoder + `get_vision_features`) inside `model`: itself, a VLM, or a peft wrapper."""
    for module in model.modules():
        if hasattr(module, "get_vision_features") and hasattr(module, "vision_model"):
            return module
    raise TypeError(f"{type(model).__name__} holds no Q-Former with a vision encoder; a feature cache needs one")


def _clean(config: dict) -> dict:
    return {k: v for k, v in sorted(config.items()) if k not in NON_FEATURE_KEYS and not k.startswith("_")}


def image_id(image: dict) -> str:
    """Identity of an undecoded image (`{"bytes", "path"}`, as `datasets.Image(decode=False)` gives): a hash of its
    bytes."""
    if not isinstance(image, dict):
        raise TypeError(
            f"feature-cache lookups need undecoded images, got {type(image).__name__}: pass the datasets through "
            "with_feature_cache (or cast_column('image', datasets.Image(decode=False)))"
        )
    data = image["bytes"]
    if data is None:
        with open(image["path"], "rb") as f:
            data = f.read()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def undecoded(dataset):
    """`dataset` with its "image" column left as encoded bytes."""
    return dataset.cast_column("image", datasets.Image(decode=False))


def _weights_digest(module: torch.nn.Module) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key(model: torch.nn.Module, image_processor, dtype: torch.dtype = torch.bfloat16) -> str:
    """Hash of what decides the cached features: vision config, image-processor config, encoder weights, dtype."""
    source = feature_source(model)
    parts = {
        "format": FORMAT_VERSION,
        "vision_config": _clean(source.vision_model.config.to_dict()),
        "image_processor": _clean(image_processor.to_dict()),
        "weights": _weights_digest(source.vision_model),
        "dtype": str(dtype),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _check_frozen(source: torch.nn.Module) -> None:
    if not source.config.freeze_vision:
        raise UserError(
            "the vision encoder trains (freeze_vision: false), so its features change every step and cannot be "
            "cached; set freeze_vision: true or leave feature_cache unset"
        )


class FeatureCache:
    """Read side of a built cache: `features(image_ids)` -> `(B, num_patches, vision_hidden)` in the stored dtype.

    Shards are memory-mapped and read row by row; handles are opened lazily in each process, so the cache can be
    shared with DataLoader workers.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index_file = self.path / INDEX
        if not index_file.is_file():
            raise UserError(f"{self.path} is not a complete feature cache (no {INDEX}); build it again")
        self.index = json.loads(index_file.read_text())
        self._where: dict[str, tuple[int, int]] = {}
        for shard_id, shard in enumerate(self.index["shards"]):
            for row, image in enumerate(shard["image_ids"]):
                self._where[image] = (shard_id, row)
        self._handles: dict[int, object] = {}
        self._pid = None

    @classmethod
    def open(cls, root: str | os.PathLike, model: torch.nn.Module, image_processor,
             dtype: torch.dtype = torch.bfloat16) -> "FeatureCache":
        """The cache under `root` that matches `model`'s vision encoder and `image_processor`; never a stale one."""
        _check_frozen(feature_source(model))
        key = cache_key(model, image_processor, dtype)
        path = Path(root) / key
        if not (path / INDEX).is_file():
            others = sorted(p.name for p in Path(root).glob("*") if (p / INDEX).is_file())
            raise UserError(
                f"no feature cache for this vision encoder and image processor in {root} (key {key}"
                + (f"; the caches there, {others}, were built for another encoder, processor or dtype"
                   if others else "")
                + "); build it with `python -m training.feature_cache <qformer|vlm> <config.yaml> --feature_cache "
                f"{root}` using the same model and data settings as training"
            )
        return cls(path)

    def __len__(self) -> int:
        return len(self._where)

    def __getstate__(self):
        # safetensors handles do not pickle; each worker process opens its own.
        return {**self.__dict__, "_handles": {}, "_pid": None}

    def _slice(self, shard_id: int):
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        if shard_id not in self._handles:
            handle = safe_open(str(self.path / self.index["shards"][shard_id]["file"]), framework="pt")
            self._handles[shard_id] = handle.get_slice("features")
        return self._handles[shard_id]

    def features_exist(self, ids: Sequence[str]) -> None:
        """Raises `UserError` when an image of these `image_id`s is not in the cache."""
        missing = [k for k in ids if k not in self._where]
        if missing:
            raise UserError(
                f"{len(missing)} images (e.g. {missing[0]!r}) are not in the feature cache {self.path}; it was built "
                "from other data: rebuild it with the training data settings"
            )

    def features(self, ids: Sequence[str]) -> torch.Tensor:
        """Features of the images with these `image_id`s, in that order."""
        self.features_exist(ids)
        return torch.cat([self._slice(s)[r:r + 1] for s, r in (self._where[k] for k in ids)])


def build_feature_cache(
    model: torch.nn.Module,
    image_processor,
    image_sets: Iterable,
    root: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    batch_size: int = 64,
    shard_size: int = 4096,
    device: str | torch.device | None = None,
) -> FeatureCache:
    """Computes the features of every image of `image_sets` (datasets with an "image" column) once; returns the
    opened cache.

    An existing cache for the same key is reused as it is. Features are computed with the same
    `get_vision_features` the model calls in training, under bf16 autocast when the cache stores bf16.
    """
    source = feature_source(model)
    _check_frozen(source)
    key = cache_key(model, image_processor, dtype)
    final = Path(root) / key
    if (final / INDEX).is_file():
        logger.info("feature cache %s already built", final)
        return FeatureCache(final)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    partial = Path(root) / f"{key}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    was_training, original_device = source.training, next(source.parameters()).device
    source.eval().to(device)
    shards, pending, pending_ids, seen, shape = [], [], [], set(), None

    def flush():
        name = f"features-{len(shards):05d}.safetensors"
        save_file({"features": torch.cat(pending).contiguous()}, str(partial / name))
        shards.append({"file": name, "image_ids": list(pending_ids)})
        pending.clear()
        pending_ids.clear()

    autocast = dtype in (torch.bfloat16, torch.float16)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=autocast):
        for dataset in image_sets:
            decoder = datasets.Image(mode=dataset.features["image"].mode)  # decodes exactly as training would
            for rows in undecoded(dataset).select_columns(["image"]).iter(batch_size=batch_size):
                ids = [image_id(image) for image in rows["image"]]
                new = [i for i, k in enumerate(ids) if k not in seen and k not in ids[:i]]
                if not new:
                    continue
                images = [decoder.decode_example(rows["image"][i]) for i in new]
                pixels = image_processor(images, return_tensors="pt")["pixel_values"]
                feats = source.get_vision_features(pixels.to(device)).to(dtype).cpu()
                shape = tuple(feats.shape[1:])
                pending.append(feats)
                pending_ids.extend(ids[i] for i in new)
                seen.update(ids[i] for i in new)
                if len(pending_ids) >= shard_size:
                    flush()
    if pending:
        flush()
    source.train(was_training).to(original_device)
    if not shards:
        raise ValueError("no rows to cache: the datasets are empty")
    index = {
        "format_version": FORMAT_VERSION, "key": key, "dtype": str(dtype), "feature_shape": shape,
        "num_samples": len(seen), "shards": shards,
        "vision_config": _clean(source.vision_model.config.to_dict()),
        "image_processor": _clean(image_processor.to_dict()),
    }
    (partial / INDEX).write_text(json.dumps(index))
    if final.exists():  # another process finished the same cache meanwhile: theirs is as good as ours
        shutil.rmtree(partial)
    else:
        partial.rename(final)
    logger.info("feature cache: %d samples, %d shards in %s", len(seen), len(shards), final)
    return FeatureCache(final)


@dataclasses.dataclass
class FeatureCacheCollator:
    """Wraps a stage collator built with `pixel_format="none"`: adds `vision_features` looked up by each row's image.

    `dtype` converts the stored features (e.g. to float32 when training without bf16 autocast).
    """

    collator: object
    cache: FeatureCache
    dtype: torch.dtype | None = None

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        batch = self.collator(rows)
        # A conversation collator names the rows whose images its batch holds (it leaves out over-long samples).
        kept = batch.pop("image_rows").tolist() if "image_rows" in batch else range(len(rows))
        features = self.cache.features([image_id(rows[i]["image"]) for i in kept])
        batch["vision_features"] = features if self.dtype is None else features.to(self.dtype)
        return batch


def with_feature_cache(collator, image_sets: Sequence, cache_root: str, model: torch.nn.Module, image_processor,
                       bf16: bool) -> tuple:
    """The training hook: `(collator, *image_sets)` that read vision features from the cache instead of images.

    The collator stops processing images and the returned datasets stop decoding them (keep the decoded ones for
    anything that shows images, such as sample captions).
    """
    if not hasattr(collator, "pixel_format"):
        raise TypeError(f"{type(collator).__name__} has no pixel_format; a feature cache needs a stage collator")
    cache = FeatureCache.open(cache_root, model, image_processor)
    logger.info("reading vision features from %s (%d images)", cache.path, len(cache))
    image_sets = [undecoded(d) for d in image_sets]
    for dataset in image_sets:  # every image, now: not at the batch that would miss one
        for rows in dataset.select_columns(["image"]).iter(batch_size=1024):
            cache.features_exist([image_id(image) for image in rows["image"]])
    wrapped = FeatureCacheCollator(dataclasses.replace(collator, pixel_format="none"), cache,
                                   dtype=None if bf16 else torch.float32)
    return (wrapped, *image_sets)


STAGES = {"qformer": (QFormerModelArguments, build_stage1_model), "vlm": (VLMModelArguments, build_stage2_model)}


def main(argv: list[str] | None = None) -> FeatureCache:
    """`python -m training.feature_cache {qformer,vlm} config.yaml [--field value ...] --feature_cache DIR`.

    Starts like the training script of that stage (same arguments, seed, data and model builder), so the cache is
    built for exactly the encoder training will use.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    stage = argv.pop(0) if argv else None
    if stage not in STAGES:
        raise UserError(
            f"the first argument is the stage, qformer or vlm, got {stage!r}: python -m training.feature_cache "
            "{qformer,vlm} config.yaml --feature_cache DIR"
        )
    arguments_class, build_model = STAGES[stage]
    # The cache is written to --feature_cache, not to output_dir: no run's lock to take.
    model_args, data_args, training_args = start_stage(arguments_class, argv, lock_output_dir=False)
    if not data_args.feature_cache:
        raise UserError("say where the cache goes: --feature_cache DIR (the same value training will use)")
    train, evaluation = load_splits(data_args, training_args)
    model, processor = build_model(model_args, partial(text_corpus, train))
    return build_feature_cache(model, processor.image_processor, [train, evaluation], data_args.feature_cache)


if __name__ == "__main__":
    run_command(main)
