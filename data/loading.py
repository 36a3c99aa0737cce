"""One loading path for training and evaluation: any image-text source -> a `datasets` dataset.

Sources: a folder of webdataset shards (the shapes generator's or img2dataset's output), a list or
glob of .tar files, an image folder with a metadata file (`imagefolder` convention), a folder
written by `save_to_disk`, data files (parquet/csv/json), or a dataset on the Hub.

Every source goes through the same cleaning (`data.cleaning.clean_sample`), so every row has the columns

    image (PIL RGB)  caption (str)  key (str, unique)  group_id (str: same for true duplicates)
    references (list[str], caption first)  qa (list of {question, answer, type, about}; with answer_lists also
    answers, question_type, answer_type)
    negative_captions (list[str])

Bad samples never stop a load: each is skipped or repaired and counted by reason in a `SkipReport`
(see `data.sanitize` for the reasons). The cleaning step writes the verdict into hidden columns,
which are counted and dropped at load time, also when `datasets` answers from its cache, so the counts
are always those of the data. Training that reads shards while it runs goes through
`data.streaming.ShardStream`, which cleans each sample with the same functions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from typing import Any, Literal

import datasets
from datasets import Dataset, DatasetDict, Features

from cli import UserError, closest

from . import cleaning, sanitize, tar_shards
from .cleaning import (
    HIDDEN_FEATURES,
    OUTPUT_FEATURES,
    CleaningOptions,
    check_text_fields,
    clean_dataset_row,
    cleaned_features,
    sample_from_files,
    verdict_row,
)
from .hashing import seeded_hash
from .skip_report import SkipReport
from .sources import open_dataset
from .tar_shards import (
    SHARD_DAMAGED,
    SHARD_EMPTY,
    SHARD_MISSING,
    TAR_READ_ERRORS,
    ShardRef,
    is_tar_path,
    iter_tar_samples,
    list_shards,
    shard_folder,
)

__all__ = ["OUTPUT_FEATURES", "SkipReport", "load_image_text_dataset", "split_train_eval"]

logger = logging.getLogger(__name__)

CAPTION_COLUMN_GUESSES = ("caption", "captions", "text", "txt", "sentence", "sentences", "alt_text", "description")
IMAGE_COLUMN_GUESSES = ("image", "img", "jpg", "png", "picture")


def _fingerprint(*parts: Any) -> str:
    """Cache key of a cleaning pass: its inputs and the cleaning code itself.

    `datasets` would hash our functions by name only, so a fixed bug in the cleaning code would
    keep serving rows cleaned by the old code; hashing the source files prevents that.
    """
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for module in (cleaning, sanitize, tar_shards):
        with open(module.__file__, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:32]


# ----------------------------------------------------------------------------------------------
# Webdataset shards
# ----------------------------------------------------------------------------------------------


def _rows_from_shards(shards: list[dict[str, Any]], options: CleaningOptions) -> Iterator[dict[str, Any]]:
    """Generator for `from_generator`: cleaned rows of each shard, then a row per shard problem."""
    for shard in shards:
        ref = ShardRef(**shard)
        if ref.size < 0:
            yield verdict_row(ref.path, shard_problem=SHARD_MISSING)
            continue
        count = 0
        try:
            for key, files in iter_tar_samples(ref.path):
                count += 1
                yield sample_from_files(ref.key_prefix + key, files, options)
        except TAR_READ_ERRORS as err:
            # tarfile calls a zero-byte file "empty file"; anything else is damage.
            problem = SHARD_EMPTY if count == 0 and "empty file" in str(err) else SHARD_DAMAGED
            logger.warning("%s: %s, after %d samples (%s); going on with the next shard", ref.path, problem, count, err)
            yield verdict_row(ref.path, shard_problem=problem)
            continue
        if count == 0:
            yield verdict_row(ref.path, shard_problem=SHARD_EMPTY)


def _load_shards(
    paths: Sequence[str], *, split: str, options: CleaningOptions, num_proc: int | None, cache_dir: str | None,
) -> Dataset:
    refs = list_shards(paths)
    check_text_fields(refs, options)
    folders = ", ".join(sorted({os.path.dirname(r.path) for r in refs}))
    logger.info("reading %d shards as split %r from %s", len(refs), split, folders)
    gen_kwargs = {"shards": [asdict(ref) for ref in refs], "options": options}
    features = cleaned_features(options.answer_lists)
    return Dataset.from_generator(
        _rows_from_shards, features=features, gen_kwargs=gen_kwargs, split=datasets.NamedSplit(split),
        num_proc=num_proc if num_proc and num_proc > 1 and len(refs) > 1 else None, cache_dir=cache_dir,
        fingerprint=_fingerprint(gen_kwargs["shards"], asdict(options), split),
    )


# ----------------------------------------------------------------------------------------------
# `datasets` sources: Hub, save_to_disk folders, data files, image folders
# ----------------------------------------------------------------------------------------------


def _resolve_columns(
    features: Features | None, *, image: str | None, caption: str | None, question: str | None,
    answer: str | None, group: str | None, key: str | None, negative_captions: str | None, source: str,
) -> dict[str, str | None]:
    if features is None:
        raise UserError(f"{source} does not declare its columns; give a source with known features (e.g. parquet)")
    names = list(features)

    def check(role: str, column: str | None) -> str | None:
        if column is not None and column not in names:
            raise UserError(
                f"{role} column {column!r} not found in {source}{closest(column, names)}; "
                f"columns are: {', '.join(names)}"
            )
        return column

    if image is None:
        typed = [n for n, f in features.items() if isinstance(f, datasets.Image)]
        image = (typed or [n for n in IMAGE_COLUMN_GUESSES if n in names] or [None])[0]
        if image is None:
            raise UserError(
                f"no image column found in {source}; columns are: {', '.join(names)}; set image_column"
            )
    if caption is None:
        caption = next((n for n in CAPTION_COLUMN_GUESSES if n in names), None)
        if caption is None and not (question and answer):
            raise UserError(
                f"no caption column found in {source}; columns are: {', '.join(names)}; set caption_column "
                "(or question_column and answer_column for question-answer data)"
            )
    if (question is None) != (answer is None):
        raise UserError("give question_column and answer_column together")
    # The id (key) column is checked before the group column: evaluation passes one column as both.
    key = check("id", key)
    return {
        "image": check("image", image), "caption": check("caption", caption), "question": check("question", question),
        "answer": check("answer", answer), "group": check("group", group), "key": key,
        "negative_captions": check("negative captions", negative_captions),
    }


def _load_datasets_source(
    source: str, *, split: str | None, config_name: str | None, columns: dict[str, Any], options: CleaningOptions,
    num_proc: int | None,
) -> Dataset:
    raw = open_dataset(source, split=split, config_name=config_name)
    resolved = _resolve_columns(raw.features, source=source, **columns)
    options = CleaningOptions(**{**asdict(options), "require_caption": resolved["caption"] is not None})
    if isinstance(raw.features[resolved["image"]], datasets.Image):
        raw = raw.cast_column(resolved["image"], datasets.Image(decode=False))
    return raw.map(
        clean_dataset_row, with_indices=True, fn_kwargs={"columns": resolved, "options": options},
        remove_columns=list(raw.features), features=cleaned_features(options.answer_lists), num_proc=num_proc,
        desc="cleaning samples", new_fingerprint=_fingerprint(raw._fingerprint, resolved, asdict(options)),
    )


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def _is_kept(skips: list[str | None], problems: list[str | None]) -> list[bool]:
    return [skip is None and problem is None for skip, problem in zip(skips, problems)]


def _count_and_drop(dataset: Dataset, report: SkipReport, source: str) -> Dataset:
    hidden = list(HIDDEN_FEATURES)
    verdicts = dataset.select_columns(["key", *hidden])[:]
    for key, skip, repairs, problem in zip(*(verdicts[c] for c in ["key", *hidden])):
        report.add(key, skip=skip, repairs=repairs, shard_problem=problem)
    report.log(logger, prefix=f"{source}: ")
    dataset = dataset.filter(_is_kept, input_columns=["_skip", "_shard_problem"], batched=True, desc="dropping skipped")
    if len(dataset) == 0:
        raise UserError(f"no usable samples in {source}: " + "; ".join(report.summary_lines()))
    return dataset.remove_columns(hidden).cast_column("image", datasets.Image(mode="RGB"))


def load_image_text_dataset(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    split: str | None = None,
    config_name: str | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    question_column: str | None = None,
    answer_column: str | None = None,
    group_column: str | None = None,
    key_column: str | None = None,
    negative_captions_column: str | None = None,
    answer_lists: bool = False,
    max_caption_chars: int = 512,
    long_caption_policy: Literal["truncate", "skip"] = "truncate",
    min_image_side: int = 8,
    max_image_pixels: int = 64_000_000,
    num_proc: int | None = None,
    cache_dir: str | None = None,
    report: SkipReport | None = None,
) -> Dataset:
    """Load image-text pairs (and question-answer pairs) from any supported source, cleaned, as a map-style
    `Dataset` (cached by `datasets`; `data.streaming.ShardStream` reads shards while training instead).

    Args:
        source: a folder of .tar shards (with `<split>/` sub-folders, as the shapes generator writes,
            or flat, as img2dataset writes), a .tar path, a list or glob of .tar paths, an image folder
            with metadata.jsonl/csv, a `save_to_disk` folder, a parquet/csv/json file, or a Hub name.
        split: which split; None takes the only one (or "train").
        config_name: Hub dataset configuration.
        image_column, caption_column: for `datasets` sources; guessed when None (an `Image` column;
            caption/text/...). A caption column holding lists gives the first as caption, the rest
            as references. For shards, `caption_column` names the field of each sample's .json that
            holds the caption (default: the .txt member).
        question_column, answer_column: add one question-answer pair per row (type "open"). An answer column
            holding several human answers (strings, or VQAv2's dicts with "answer") gives the most frequent one as
            the answer (among equals, the first to occur).
        group_column: column whose value marks true duplicates (default: the normalised caption); for shards, the
            .json field (default "group_id", which the shapes generator writes).
        key_column: column with a unique sample id (default: the row index).
        negative_captions_column: column (shards: .json field; default "negative_captions") holding a
            list of counterfactual captions per image, stage 1's hard negatives.
        answer_lists: give each question-answer pair also `answers` (every human answer of a list-valued answer
            column, as given; [] otherwise; shards: the pair's "answers" in the .json), `question_type` and
            `answer_type` (the row's columns of those names, as VQAv2 has them; else None), for evaluation's VQAv2
            accuracy (`eval.vqav2_accuracy`).
        max_caption_chars, long_caption_policy: longer captions are cut at a word boundary
            ("truncate", counted as a repair) or left out ("skip", counted as a skip).
        min_image_side, max_image_pixels: smaller images are skipped; larger ones are skipped from
            their header before decoding (decompression bombs).
        num_proc: processes for the map-style cleaning pass.
        cache_dir: `datasets` cache folder for the cleaned map-style data.
        report: a `SkipReport` to fill.

    Returns:
        a `Dataset` with the columns of `OUTPUT_FEATURES` (with `answer_lists`, the wider
        question-answer pairs of `data.cleaning.cleaned_features`).
    """
    if long_caption_policy not in ("truncate", "skip"):
        raise ValueError(f"long_caption_policy must be 'truncate' or 'skip', got {long_caption_policy!r}")
    report = report if report is not None else SkipReport()
    options = CleaningOptions(max_caption_chars, long_caption_policy, min_image_side, max_image_pixels,
                              answer_lists=answer_lists)
    if isinstance(source, (str, os.PathLike)):
        source = os.fspath(source)
        folder = shard_folder(source, split)
        looks_like_tars = folder is not None or is_tar_path(source) or "*" in source
        shard_paths = [folder or source] if looks_like_tars else None
        name = source
    else:
        shard_paths = [os.fspath(path) for path in source]
        name = f"{len(shard_paths)} shard paths"
    if shard_paths is not None:
        options = options.with_text_fields(caption_column, negative_captions_column, group_column)
        dataset = _load_shards(
            shard_paths, split=split or "train", options=options, num_proc=num_proc, cache_dir=cache_dir,
        )
    else:
        columns = {
            "image": image_column, "caption": caption_column, "question": question_column,
            "answer": answer_column, "group": group_column, "key": key_column,
            "negative_captions": negative_captions_column,
        }
        dataset = _load_datasets_source(
            name, split=split, config_name=config_name, columns=columns, options=options, num_proc=num_proc,
        )
    return _count_and_drop(dataset, report, name)


def split_train_eval(dataset: Dataset, *, eval_size: int, seed: int = 0) -> DatasetDict:
    """Split into {"train", "eval"} by `group_id`, so duplicates never straddle the two.

    Each group gets a rank from a hash of (seed, group_id): the split depends only on the data and the seed, not on
    row order. Groups are taken in rank order until `eval_size` rows are reached; the eval set can overshoot by less
    than one group.
    """
    groups = dataset["group_id"]
    target = eval_size
    sizes = Counter(groups)
    if not 0 < target < len(groups) or len(sizes) < 2:
        raise UserError(
            f"cannot take {target} eval samples from {len(groups)} samples in {len(sizes)} duplicate groups; "
            "ask for fewer, or bring more distinct samples"
        )
    chosen: set[str] = set()
    taken = 0
    for group in sorted(sizes, key=lambda g: seeded_hash(g, seed)):
        if taken >= target:
            break
        chosen.add(group)
        taken += sizes[group]
    if len(chosen) == len(sizes):
        raise UserError(f"eval_size {target} would take every duplicate group; ask for fewer eval samples")
    train_rows = [i for i, group in enumerate(groups) if group not in chosen]
    eval_rows = [i for i, group in enumerate(groups) if group in chosen]
    return DatasetDict({"train": dataset.select(train_rows), "eval": dataset.select(eval_rows)})
