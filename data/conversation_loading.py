"""`load_conversations`: any stage-2 (instruction / VQA) source -> a `datasets` dataset of checked conversations.

Sources: what `data.sources.open_dataset` opens (save_to_disk folders, parquet/csv files, data folders, Hub names)
and JSON / JSONL files, which are read here: LLaVA's JSON gives `image` as a string in one record, a list in the
next and nothing in a third, which pyarrow's schema inference rejects, so each record is kept as its JSON text
until its reader sees it. Every record goes once through its format's reader (`data.conversation_readers`) and
`check_conversation` in a cached `map`; bad records are counted by reason in a `SkipReport` and dropped, also when
`datasets` answers from its cache. Images stay undecoded until rows are read, then come as RGB.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from typing import Any

from datasets import Dataset, Features, Image, LargeList, List, Value

from cli import UserError, check_at_least, missing_path

from . import conversation_readers, conversations, sanitize
from .conversation_readers import CONVERSATION_FORMATS, Fields, check_format, detect_format, read_record, resolve_fields
from .conversations import (
    CHECKED_FEATURES,
    CONVERSATION_MALFORMED,
    HIDDEN_FEATURES,
    RecordSkipped,
    check_conversation,
    verdict_row,
)
from .skip_report import SkipReport
from .sources import open_dataset

__all__ = ["CONVERSATION_FORMATS", "detect_format", "load_conversations"]

logger = logging.getLogger(__name__)

RECORD_NOT_JSON = "record not valid JSON"
_JSON_EXTENSIONS = (".json", ".jsonl")
RECORD_FIELD = "record"  # a JSON file's only column: each record as JSON text
_KEY_FIELD = "id"


def _fingerprint(*parts: Any) -> str:
    """Cache key of a pass over the data: its inputs and the code that reads and checks the records (`datasets`
    would hash our functions by name only, and keep serving rows made by code since fixed)."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for path in (conversations.__file__, conversation_readers.__file__, sanitize.__file__, __file__):
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:32]


def _json_texts(path: str) -> list[str]:
    """Each record of a JSON list or a JSONL file as JSON text; a JSONL line that does not parse is kept, to be
    counted as a skip."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        whole = json.loads(text)
    except ValueError as err:
        lines = [line for line in text.splitlines() if line.strip()]
        if not any(parsed_json(line) is not None for line in lines):
            raise UserError(
                f"cannot read {path}: it is neither a JSON list of records nor JSON lines ({err})"
            ) from err
        return lines
    return [json.dumps(record) for record in whole] if isinstance(whole, list) else [text]


def parsed_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _json_rows(texts: list[str]):
    for text in texts:
        yield {RECORD_FIELD: text}


def _open(source: str, *, split: str | None, config_name: str | None, cache_dir: str | None):
    """(raw dataset, its records' fields, a function giving one field's values over all records, from JSON?)."""
    if os.path.isfile(source) and source.lower().endswith(_JSON_EXTENSIONS):
        texts = _json_texts(source)
        records = [record if isinstance(record, dict) else {} for record in map(parsed_json, texts)]
        fields = list(dict.fromkeys(name for record in records for name in record))
        stat = os.stat(source)
        raw = Dataset.from_generator(
            _json_rows, features=Features({RECORD_FIELD: Value("string")}), gen_kwargs={"texts": texts},
            cache_dir=cache_dir, fingerprint=_fingerprint(os.path.abspath(source), stat.st_size, stat.st_mtime_ns),
        )
        return raw, fields, lambda name: [record.get(name) for record in records], True
    raw = open_dataset(source, split=split, config_name=config_name)
    return raw, list(raw.column_names), lambda name: raw[name], False


def is_image_feature(feature: Any) -> bool:
    if isinstance(feature, (List, LargeList)):
        feature = feature.feature
    return isinstance(feature, Image)


def _undecoded(raw: Dataset) -> Dataset:
    """`raw` with its image columns undecoded: checking a record reads the bytes, and PIL images are not kept."""
    for name, feature in raw.features.items():
        if isinstance(feature, Image):
            raw = raw.cast_column(name, Image(decode=False))
        elif is_image_feature(feature):
            raw = raw.cast_column(name, type(feature)(Image(decode=False)))
    return raw


def check_image_paths(values: Any, image_folder: str | None, source: str) -> None:
    if image_folder is not None:
        if not os.path.isdir(image_folder):
            raise missing_path("--image_folder", image_folder, "the folder the image paths of the data are under")
        return
    for value in values:
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and not os.path.isabs(item):
                raise UserError(
                    f"{source} names its images by relative paths (e.g. {item!r}); pass the folder they are "
                    "relative to with --image_folder"
                )


def _renamed_keys(ids: Any) -> dict[int, str]:
    """{row index: key} for the rows whose id (or index, without one) repeats an earlier row's: the index is
    appended, so every key is unique."""
    seen: set[str] = set()
    renamed = {}
    for index, ident in enumerate(ids):
        key = str(ident) if ident is not None else str(index)
        if key in seen:
            key = renamed[index] = f"{key}-{index}"
        seen.add(key)
    return renamed


def check_row(
    row: dict[str, Any], index: int, *, fields: Fields, image_folder: str | None, from_json: bool,
    renamed: dict[int, str], max_images_per_sample: int | None,
) -> dict[str, Any]:
    record = parsed_json(row[RECORD_FIELD]) if from_json else dict(row)  # `map` passes a lazy row, not a dict
    ident = record.get(_KEY_FIELD) if isinstance(record, dict) else None
    key = renamed.get(index) or (str(ident) if ident is not None else str(index))
    if not isinstance(record, dict):
        return verdict_row(key, RECORD_NOT_JSON if record is None else CONVERSATION_MALFORMED)
    try:
        draft = read_record(record, fields, image_folder)
    except RecordSkipped as skipped:
        return verdict_row(key, skipped.reason)
    return check_conversation(
        key, draft.images, draft.turns, repairs=draft.repairs, max_images_per_sample=max_images_per_sample
    )


def _is_kept(skips: list[str | None]) -> list[bool]:
    return [skip is None for skip in skips]


def _count_and_drop(checked: Dataset, report: SkipReport, source: str) -> Dataset:
    verdicts = checked.select_columns(["key", *HIDDEN_FEATURES])[:]
    warned: set[str] = set()
    for key, skip, repairs in zip(verdicts["key"], verdicts["_skip"], verdicts["_repairs"]):
        report.add(key, skip=skip, repairs=repairs, shard_problem=None)
        if skip is not None and skip not in warned:
            warned.add(skip)
            logger.warning("%s: skipping %s: %s (later ones are only counted; see the SkipReport)", source, key, skip)
    report.log(logger, prefix=f"{source}: ")
    kept = checked.filter(_is_kept, input_columns=["_skip"], batched=True, desc="dropping skipped")
    if len(kept) == 0:
        raise UserError(f"no usable conversations in {source}: " + "; ".join(report.summary_lines()))
    return kept.remove_columns(list(HIDDEN_FEATURES)).cast_column("images", List(Image(mode="RGB")))


def load_conversations(
    source: str,
    *,
    format: str = "auto",
    split: str | None = None,
    config_name: str | None = None,
    image_folder: str | None = None,
    image_column: str | None = None,
    question_column: str | None = None,
    answer_column: str | None = None,
    min_ratings: dict[str, int] | None = None,
    max_images_per_sample: int | None = None,
    num_proc: int | None = None,
    cache_dir: str | None = None,
    report: SkipReport | None = None,
) -> Dataset:
    """Load conversations (instruction or VQA data) of any supported format, checked; rows of `CONVERSATION_FEATURES`.

    Args:
        source: a LLaVA-style .json list or .jsonl file, a save_to_disk folder, a parquet/csv file or data folder,
            or a Hub name.
        format: one of `CONVERSATION_FORMATS`, or "auto" to tell it from the fields (`detect_format`).
        split, config_name: which split (None: the only one, or "train") and Hub configuration.
        image_folder: the folder that relative image paths (LLaVA's `image`) are under.
        image_column: the field holding the image(s), when not the format's usual one.
        question_column, answer_column: VQA columns, when not question / answers or answer.
        min_ratings: {rating: minimum} for FineVision's per-turn 1-5 ratings (e.g. {"relevance": 3}; the
            `relevance_ratings` column); lower-rated turns are dropped.
        max_images_per_sample: records with more images are skipped (None: no limit).
        num_proc: processes for the checking pass.
        cache_dir: `datasets` cache folder for a JSON file's records.
        report: a `SkipReport` to fill with what was kept, skipped and repaired.
    """
    check_format(format)
    check_at_least({"max_images_per_sample": max_images_per_sample}, 0)
    report = report if report is not None else SkipReport()
    raw, names, values, from_json = _open(source, split=split, config_name=config_name, cache_dir=cache_dir)
    if format == "auto":
        format = "vqa" if question_column or answer_column else detect_format(names, source)
    image_types = tuple(n for n, f in raw.features.items() if is_image_feature(f))
    fields = resolve_fields(
        format, names, source=source, image_types=image_types, image_column=image_column,
        question_column=question_column, answer_column=answer_column, min_ratings=min_ratings,
    )
    if fields.image is not None and fields.image not in image_types:
        check_image_paths(values(fields.image), image_folder, source)
    renamed = _renamed_keys(values(_KEY_FIELD) if _KEY_FIELD in names else [])
    raw = _undecoded(raw)
    folder = os.path.abspath(image_folder) if image_folder else None
    checked = raw.map(
        check_row, with_indices=True, remove_columns=raw.column_names, features=CHECKED_FEATURES,
        fn_kwargs={"fields": fields, "image_folder": folder, "from_json": from_json, "renamed": renamed,
                   "max_images_per_sample": max_images_per_sample},
        num_proc=num_proc, desc="checking conversations",
        new_fingerprint=_fingerprint(raw._fingerprint, asdict(fields), folder, max_images_per_sample),
    )
    return _count_and_drop(checked, report, source)
