"""The offline "shapes" dataset: generate train/validation/test shards in img2dataset's layout.

Each sample is a JPEG of a scene from `data.shapes`, a caption (one of several paraphrase templates),
and a JSON record with everything evaluation and training need beyond img2dataset's own fields:

    scene             [{"shape", "color", "size", "row", "col"}, ...] in reading order of the cells
    group_id          canonical text of the scene: equal ids <=> equal scenes (true duplicates; the loader's
                      generic duplicate-group field, so a split never puts one scene on both sides)
    template          which template wrote `caption`
    references        the same scene in every other template (extra references for CIDEr)
    negative_captions the caption's template applied to the scene with exactly one attribute of one
                      object changed (every object's colour, one shape, one size, one position):
                      text-side hard negatives that force colour to be bound to objects
    caption_color_first, negative_captions_color_first
                      the same caption and negatives with each object named "size colour shape" (the
                      caption names the colour last): what the tiny stage 1 reads (its caption_column)
    qa                [{"question", "answer", "type", "about"}], type in count/color/shape/size/position/
                      exists; about: the noun phrase of the object asked about ("" for count), which
                      tells evaluation the questions about held-out combinations

Every shard is generated from its own seeded RNG, so the output depends only on the arguments,
never on the number of processes. Held-out combinations (`--holdout "green triangle"`) never appear
in the train split: not in images, captions, negatives or questions.

    python -m data.synthetic --out data/shapes --train 20000 --validation 1000 --test 1000 --seed 0
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import time
from argparse import RawDescriptionHelpFormatter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from tqdm.auto import tqdm

from cli import ArgumentParser, UserError, non_negative_int, positive_int, run_command

from .shapes import (
    COLORS,
    SHAPES,
    SIZES,
    TEMPLATES,
    Holdout,
    ShapeObject,
    caption_for,
    generate_scene,
    is_held_out,
    negative_scenes,
    parse_caption,
    parse_holdout,
    questions_for,
    render,
    scene_id,
    scene_to_json,
)
from .shard_writer import ShardWriter, sample_key

__all__ = [
    "generate_scene",
    "render",
    "caption_for",
    "parse_caption",
    "questions_for",
    "make_sample",
    "write_split",
    "generate_dataset",
]

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")

# img2dataset's parquet columns, then ours; the tar's .json carries these plus the nested fields.
PARQUET_SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("caption", pa.string()),
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("exif", pa.string()),
        ("sha256", pa.string()),
        ("group_id", pa.string()),
        ("template", pa.int32()),
    ]
)


def make_sample(
    rng: random.Random,
    key: str,
    *,
    image_size: int = 64,
    holdouts: Sequence[Holdout] = (),
    jpeg_quality: int = 95,
) -> tuple[bytes, dict[str, Any]]:
    """One sample: the JPEG bytes and its JSON record (img2dataset's fields plus ours)."""
    scene = generate_scene(rng, holdouts=holdouts)
    template = rng.randrange(len(TEMPLATES))
    caption = caption_for(scene, template)
    buffer = io.BytesIO()
    render(scene, image_size, rng).save(buffer, format="JPEG", quality=jpeg_quality)
    jpg = buffer.getvalue()
    negatives = negative_scenes(rng, scene, holdouts)  # drawn after the picture, as before: same draws per seed
    record = {
        "url": None,
        "caption": caption,
        "key": key,
        "status": "success",
        "error_message": None,
        "width": image_size,
        "height": image_size,
        "original_width": image_size,
        "original_height": image_size,
        "exif": None,
        "sha256": hashlib.sha256(jpg).hexdigest(),
        "group_id": scene_id(scene),
        "template": template,
        "scene": scene_to_json(scene),
        "references": [caption_for(scene, t) for t in range(len(TEMPLATES)) if t != template],
        "negative_captions": [caption_for(s, template) for s in negatives],
        "caption_color_first": caption_for(scene, template, color_first=True),
        "negative_captions_color_first": [caption_for(s, template, color_first=True) for s in negatives],
        "qa": questions_for(scene, rng, holdouts),
    }
    return jpg, record


@dataclass(frozen=True)
class _ShardTask:
    folder: str
    split: str
    shard_id: int
    count: int
    seed: int
    image_size: int
    holdouts: tuple[Holdout, ...]
    samples_per_shard: int
    jpeg_quality: int


def _write_shard(task: _ShardTask) -> int:
    # A string seed is hashed with SHA-512 by `random`: stable across runs, platforms and versions.
    rng = random.Random(f"shapes/{task.seed}/{task.split}/{task.shard_id}")
    with ShardWriter(task.folder, task.shard_id, PARQUET_SCHEMA) as writer:
        for index in range(task.count):
            key = sample_key(task.shard_id, index, task.samples_per_shard)
            jpg, record = make_sample(
                rng, key, image_size=task.image_size, holdouts=task.holdouts, jpeg_quality=task.jpeg_quality
            )
            files = {
                "jpg": jpg,
                "txt": record["caption"].encode("utf-8"),
                "json": json.dumps(record, separators=(",", ":")).encode("utf-8"),
            }
            writer.write(key, files, {name: record[name] for name in PARQUET_SCHEMA.names})
    return task.count


def _check_holdouts_leave_choices(holdouts: Sequence[Holdout]) -> None:
    allowed = [
        (shape, color, size)
        for shape in SHAPES
        for color in COLORS
        for size in SIZES
        if not is_held_out(ShapeObject(shape, color, size, "top", "left"), holdouts)
    ]
    if not allowed:
        raise UserError("the holdouts exclude every shape/colour/size combination; hold out fewer")


def _prepare_folder(folder: Path, overwrite: bool) -> None:
    ours = [p for pattern in ("*.tar", "*.parquet", "*_stats.json") for p in folder.glob(pattern)]
    if ours and not overwrite:
        raise UserError(
            f"{folder} already holds {len(ours)} shard files; pass --overwrite (overwrite=True) to replace them, or "
            "choose another output folder"
        )
    for path in ours:
        path.unlink()
    folder.mkdir(parents=True, exist_ok=True)


def write_split(
    out_dir: str | os.PathLike,
    split: str,
    num_samples: int,
    *,
    seed: int = 0,
    image_size: int = 64,
    holdouts: Sequence[Holdout] = (),
    samples_per_shard: int = 1000,
    num_proc: int | None = None,
    jpeg_quality: int = 95,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write `num_samples` samples into `out_dir/split/` as shards; return a summary dict.

    `holdouts` are excluded from this split (pass them for train only). `num_proc` processes write
    shards in parallel (default: one per CPU); the bytes do not depend on it.
    """
    if num_samples < 0 or samples_per_shard < 1:
        raise UserError(f"need num_samples >= 0 and samples_per_shard >= 1, got {num_samples}, {samples_per_shard}")
    if image_size < 24:
        raise UserError(f"image_size {image_size} is too small to draw a readable 3x3 grid; use 24 or more")
    _check_holdouts_leave_choices(holdouts)
    folder = Path(out_dir) / split
    _prepare_folder(folder, overwrite)
    tasks = [
        _ShardTask(
            str(folder), split, shard_id, min(samples_per_shard, num_samples - start), seed, image_size,
            tuple(holdouts), samples_per_shard, jpeg_quality,
        )
        for shard_id, start in enumerate(range(0, num_samples, samples_per_shard))
    ]
    workers = max(1, min(num_proc or os.cpu_count() or 1, len(tasks)))
    started = time.perf_counter()
    progress = tqdm(total=num_samples, desc=f"shapes {split}", unit="img")
    if workers == 1:
        for task in tasks:
            progress.update(_write_shard(task))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for done in as_completed([pool.submit(_write_shard, task) for task in tasks]):
                progress.update(done.result())
    progress.close()
    seconds = time.perf_counter() - started
    logger.info("wrote %d %s samples in %d shards to %s in %.1f s", num_samples, split, len(tasks), folder, seconds)
    return {"split": split, "samples": num_samples, "shards": len(tasks), "folder": str(folder), "seconds": seconds}


def generate_dataset(
    out_dir: str | os.PathLike,
    sizes: dict[str, int],
    *,
    seed: int = 0,
    image_size: int = 64,
    holdouts: Sequence[str] = (),
    samples_per_shard: int = 1000,
    num_proc: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write every split in `sizes` ({"train": n, ...}); holdouts apply to "train" only.

    Also writes `out_dir/generation.json` recording the arguments and the vocabulary.
    """
    rules = [parse_holdout(text) for text in holdouts]
    summary: dict[str, Any] = {
        "seed": seed,
        "image_size": image_size,
        "holdouts": list(holdouts),
        "vocabulary": {"shapes": SHAPES, "colors": list(COLORS), "sizes": SIZES},
        "templates": len(TEMPLATES),
        "splits": {},
    }
    for split, num_samples in sizes.items():
        summary["splits"][split] = write_split(
            out_dir, split, num_samples, seed=seed, image_size=image_size,
            holdouts=rules if split == "train" else (), samples_per_shard=samples_per_shard,
            num_proc=num_proc, overwrite=overwrite,
        )
    with open(Path(out_dir) / "generation.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return summary


def _parse_args(argv: Sequence[str] | None):
    parser = ArgumentParser(
        prog="python -m data.synthetic",
        description=(
            "Generate the synthetic 'shapes' image-caption-QA dataset as webdataset shards in img2dataset's "
            "layout (OUT/<split>/NNNNN.tar with .jpg/.txt/.json, NNNNN.parquet, NNNNN_stats.json). "
            "Works offline; the same arguments always give the same bytes."
        ),
        epilog=(
            "example: python -m data.synthetic --out data/shapes --train 20000 --validation 1000 "
            "--test 1000 --seed 0 --holdout 'green triangle'\n"
            "then load a split with data.loading.load_image_text_dataset('data/shapes', split='train')"
        ),
        formatter_class=RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="output folder; one sub-folder per split is created")
    for split, default in zip(SPLITS, (20000, 1000, 0)):
        parser.add_argument(f"--{split}", type=non_negative_int, default=default,
                            help=f"{split} samples (default {default})")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")
    parser.add_argument("--image-size", type=positive_int, default=64, help="image side in pixels (default 64)")
    parser.add_argument(
        "--holdout", action="extend", nargs="+", default=[], metavar="COMBO",
        help="attribute combination never shown in train, e.g. 'green triangle' or 'large blue'; repeatable",
    )
    parser.add_argument("--samples-per-shard", type=positive_int, default=1000,
                        help="samples per tar shard (default 1000)")
    parser.add_argument("--num-proc", type=positive_int, default=None, help="worker processes (default: one per CPU)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in the output folders")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sizes = {split: getattr(args, split) for split in SPLITS if getattr(args, split) > 0}
    if not sizes:
        raise UserError("every split has 0 samples; ask for some, e.g. --train 20000 --validation 1000")
    summary = generate_dataset(
        args.out, sizes, seed=args.seed, image_size=args.image_size, holdouts=args.holdout,
        samples_per_shard=args.samples_per_shard, num_proc=args.num_proc, overwrite=args.overwrite,
    )
    for split, info in summary["splits"].items():
        rate = info["samples"] / info["seconds"] if info["seconds"] else float("inf")
        print(f"{split}: {info['samples']} samples, {info['shards']} shards, {info['seconds']:.1f} s ({rate:.0f}/s)")


if __name__ == "__main__":
    run_command(main)
