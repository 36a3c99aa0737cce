"""Turn one raw sample, from any source, into a clean output row or a row that says why it is skipped.

A raw sample is image bytes, caption text and optional extras (references, question-answer pairs,
hard-negative captions, a duplicate-group id), as they come out of a tar shard or a `datasets` row.
Everything is treated as untrusted: the result is either a row with `OUTPUT_FEATURES`' columns, or
a "verdict" row that only says why not. `data.loading` counts the verdicts and drops those rows.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import datasets
import fsspec
from datasets import Features, List, Value

from cli import UserError, closest

from .sanitize import CAPTION_MISSING, clean_caption, decode_image, normalize_caption
from .tar_shards import TAR_READ_ERRORS, ShardRef, iter_tar_samples

METADATA_UNREADABLE = "metadata json unreadable"
NO_CAPTION_NO_QA = "no caption and no usable question-answer pair"
REFERENCE_DROPPED = "unusable reference or negative caption dropped"
QA_DROPPED = "unusable question-answer pair dropped"
HUMAN_ANSWER_DROPPED = "human answer that is not text dropped"

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
# "about": the noun phrase of the object a question asks about (synthetic shapes data; None elsewhere), which tells
# evaluation the questions about held-out attribute combinations.
_QA_FEATURE = {"question": Value("string"), "answer": Value("string"), "type": Value("string"),
               "about": Value("string")}
# With `CleaningOptions.answer_lists` (evaluation's VQAv2 accuracy): every human answer of the question ([] for
# single-answer data) and VQAv2's question and answer types (None where the data has none).
_QA_LISTS_FEATURE = {**_QA_FEATURE, "answers": List(Value("string")), "question_type": Value("string"),
                     "answer_type": Value("string")}
OUTPUT_FEATURES = Features(
    {
        "image": datasets.Image(mode="RGB"),
        "caption": Value("string"),
        "key": Value("string"),
        "group_id": Value("string"),
        "references": List(Value("string")),
        "qa": List(_QA_FEATURE),
        "negative_captions": List(Value("string")),
    }
)
# The cleaning step's verdict rides along in these columns until it has been counted.
HIDDEN_FEATURES = {"_skip": Value("string"), "_repairs": List(Value("string")), "_shard_problem": Value("string")}
# Images stay undecoded until the very end, so each kept image is decoded once, when read.
CLEANED_FEATURES = Features({**OUTPUT_FEATURES, "image": datasets.Image(decode=False), **HIDDEN_FEATURES})


def cleaned_features(answer_lists: bool) -> Features:
    """`CLEANED_FEATURES`, with the answer-list fields in each question-answer pair when `answer_lists`."""
    if not answer_lists:
        return CLEANED_FEATURES
    return Features({**CLEANED_FEATURES, "qa": List(_QA_LISTS_FEATURE)})


@dataclass(frozen=True)
class CleaningOptions:
    """Where a shard sample's texts are and the limits applied to every sample; see `load_image_text_dataset`."""

    max_caption_chars: int = 512
    long_caption_policy: Literal["truncate", "skip"] = "truncate"
    min_image_side: int = 8
    max_image_pixels: int = 64_000_000
    require_caption: bool = True
    # Shards: the fields of a sample's .json that hold its caption (None: the .txt member), its hard negatives and its
    # duplicate group (samples with equal values are true duplicates; without one, the normalised caption).
    caption_field: str | None = None
    negatives_field: str = "negative_captions"
    group_field: str = "group_id"
    # Keep every human answer of a question, and its VQAv2 types (`cleaned_features(True)`); off, the pairs have
    # the four standard fields.
    answer_lists: bool = False

    def with_text_fields(self, caption: str | None, negative_captions: str | None,
                         group: str | None = None) -> CleaningOptions:
        """These options reading a shard's caption, hard negatives and duplicate group from the named .json fields
        (None: the defaults)."""
        return replace(self, caption_field=caption, negatives_field=negative_captions or type(self).negatives_field,
                       group_field=group or type(self).group_field)


def verdict_row(key: str, *, skip: str | None = None, shard_problem: str | None = None) -> dict[str, Any]:
    """A row that carries no sample, only why: a skipped sample, or a shard that could not be read."""
    return {
        "image": None, "caption": None, "key": key, "group_id": None, "references": [], "qa": [],
        "negative_captions": [], "_skip": skip, "_repairs": [], "_shard_problem": shard_problem,
    }


def _as_list(value: Any, repairs: list[str], reason: str) -> list[Any]:
    """Metadata lists arrive from files: None means absent; anything else that is not a list is noted."""
    if value is None or isinstance(value, list):
        return value or []
    repairs.append(reason)
    return []


def _clean_texts(values: Any, options: CleaningOptions, repairs: list[str]) -> list[str]:
    """Clean a list of extra captions; drop (and note) the unusable ones."""
    cleaned = []
    for value in _as_list(values, repairs, REFERENCE_DROPPED):
        text = clean_caption(value, max_chars=options.max_caption_chars).text
        if text is None:
            repairs.append(REFERENCE_DROPPED)
        else:
            cleaned.append(text)
    return cleaned


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _human_answers(values: Any, repairs: list[str]) -> list[str]:
    """The human answers as given: the VQAv2 accuracy does its own whitespace and punctuation handling, and every
    answer counts in its leave-one-out average. Those that are not text are dropped and noted."""
    answers = []
    for value in _as_list(values, repairs, HUMAN_ANSWER_DROPPED):
        if isinstance(value, str):
            answers.append(value)
        else:
            repairs.append(HUMAN_ANSWER_DROPPED)
    return answers


def _clean_qa(pairs: Any, options: CleaningOptions, repairs: list[str]) -> list[dict[str, Any]]:
    """Keep the pairs whose question and answer are usable text; type defaults to "open", about to None.
    With `options.answer_lists` each pair also gets `answers`, `question_type` and `answer_type`."""
    cleaned = []
    for pair in _as_list(pairs, repairs, QA_DROPPED):
        if not isinstance(pair, dict):
            repairs.append(QA_DROPPED)
            continue
        question = clean_caption(pair.get("question"), max_chars=options.max_caption_chars).text
        answer = clean_caption(pair.get("answer"), max_chars=options.max_caption_chars).text
        kind = pair.get("type") if isinstance(pair.get("type"), str) else "open"
        if question is None or answer is None:
            repairs.append(QA_DROPPED)
            continue
        kept = {"question": question, "answer": answer, "type": kind, "about": _text_or_none(pair.get("about"))}
        if options.answer_lists:
            kept |= {"answers": _human_answers(pair.get("answers"), repairs),
                     "question_type": _text_or_none(pair.get("question_type")),
                     "answer_type": _text_or_none(pair.get("answer_type"))}
        cleaned.append(kept)
    return cleaned


def clean_sample(
    key: str,
    image: bytes | None,
    caption: Any,
    options: CleaningOptions,
    *,
    references: Any = None,
    qa: Any = None,
    negative_captions: Any = None,
    group_id: Any = None,
) -> dict[str, Any]:
    """Decide one sample: a clean row, or a row that only says why it is skipped.

    `caption` may be a list (several captions of one image): the first is the caption, the others
    become references. The other text arguments come from files and may be anything.
    """
    repairs: list[str] = []
    extra_captions: list[Any] = []
    if isinstance(caption, list):
        caption, extra_captions = (caption[0], caption[1:]) if caption else (None, [])
    text = clean_caption(caption, max_chars=options.max_caption_chars, long_policy=options.long_caption_policy)
    qa_pairs = _clean_qa(qa, options, repairs)
    if text.skip is not None and (options.require_caption or text.skip != CAPTION_MISSING):
        return verdict_row(key, skip=text.skip)
    if text.text is None and not qa_pairs:
        return verdict_row(key, skip=NO_CAPTION_NO_QA)
    decoded = decode_image(image, min_side=options.min_image_side, max_pixels=options.max_image_pixels)
    if decoded.skip is not None:
        return verdict_row(key, skip=decoded.skip)
    repairs += [r for r in (text.repair, decoded.repair) if r is not None]
    caption_text = text.text or ""
    refs = [caption_text] if caption_text else []
    for reference in _clean_texts(extra_captions, options, repairs) + _clean_texts(references, options, repairs):
        if reference not in refs:
            refs.append(reference)
    if isinstance(group_id, str) and group_id:
        group = group_id
    else:
        # A caption identifies true duplicates; without one, the image bytes do.
        group = normalize_caption(caption_text) or caption_text or hashlib.sha1(decoded.data).hexdigest()
    return {
        "image": {"bytes": decoded.data, "path": None},
        "caption": caption_text,
        "key": key,
        "group_id": group,
        "references": refs,
        "qa": qa_pairs,
        "negative_captions": _clean_texts(negative_captions, options, repairs),
        "_skip": None,
        "_repairs": repairs,
        "_shard_problem": None,
    }


def sample_from_files(key: str, files: dict[str, bytes], options: CleaningOptions) -> dict[str, Any]:
    """Clean one webdataset sample, {extension: bytes}: image, .txt caption, .json metadata.

    The JSON may carry references, qa, negative_captions and a duplicate group (the shapes generator writes
    them; from img2dataset they arrive the same way when passed through its save_additional_columns). The
    caption is the .txt member, or the JSON field `options.caption_field` when set; the hard negatives and
    the group are the JSON fields `options.negatives_field` and `options.group_field`.
    """
    meta: Any = {}
    if "json" in files:
        try:
            meta = json.loads(files["json"])
        except ValueError:  # also UnicodeDecodeError
            return verdict_row(key, skip=METADATA_UNREADABLE)
        if not isinstance(meta, dict):
            return verdict_row(key, skip=METADATA_UNREADABLE)
    image = next((files[ext] for ext in IMAGE_EXTENSIONS if ext in files), None)
    if options.caption_field is not None:
        caption = meta.get(options.caption_field)
    else:  # img2dataset also keeps the caption in the JSON; the .txt member is the primary copy.
        caption = files["txt"] if "txt" in files else meta.get("caption")
    return clean_sample(
        key, image, caption, options,
        references=meta.get("references"), qa=meta.get("qa"), negative_captions=meta.get(options.negatives_field),
        group_id=meta.get(options.group_field),
    )


def check_text_fields(shards: Sequence[ShardRef], options: CleaningOptions) -> None:
    """Raise `UserError` when the first sample's .json lacks a field `options` names for its texts: a misspelt
    field would otherwise skip or strip every sample. Shards without a readable sample are left to the loader."""
    wanted = {"caption": options.caption_field}
    if options.negatives_field != CleaningOptions.negatives_field:
        wanted["negative captions"] = options.negatives_field
    if options.group_field != CleaningOptions.group_field:
        wanted["group"] = options.group_field
    wanted = {role: name for role, name in wanted.items() if name is not None}
    if not wanted:
        return
    for ref in shards:
        samples = iter_tar_samples(ref.path)
        try:
            key, files = next(samples)
            meta = json.loads(files["json"])
        except (*TAR_READ_ERRORS, StopIteration, KeyError, ValueError):
            continue
        finally:
            samples.close()
        if not isinstance(meta, dict):
            continue
        for role, name in wanted.items():
            if name not in meta:
                raise UserError(
                    f"{role} field {name!r} not found in the .json of sample {key} in {ref.path}"
                    f"{closest(name, meta)}; its fields are: {', '.join(meta)}"
                )
        return


def _read_path(path: str) -> bytes | None:
    """The file's bytes, or None when it cannot be read (counted as a missing image)."""
    try:
        with fsspec.open(path, "rb") as f:
            return f.read()
    except (OSError, ValueError):
        return None


def _image_bytes(value: Any) -> bytes | None:
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        return _read_path(value["path"]) if value.get("path") else None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return _read_path(value)
    return None


def _answer_list(value: Any) -> list[Any] | None:
    """The human answers in an answer cell holding several (None for a single answer): a list of strings
    (TextVQA), of dicts with "answer" (VQAv2), or such dicts read from a `Sequence` feature as a dict of lists."""
    if isinstance(value, dict) and isinstance(value.get("answer"), list):
        return value["answer"]
    if not isinstance(value, list):
        return None
    return [item.get("answer") if isinstance(item, dict) else item for item in value]


def _most_frequent(answers: list[Any]) -> Any:
    """The answer most annotators gave (the first to occur among equals), None when there is none: the one a
    question is trained on and scored against by exact match."""
    counts = Counter(answer for answer in answers if isinstance(answer, str))
    return counts.most_common(1)[0][0] if counts else None  # most_common keeps first-seen order among ties


def _qa_from_row(row: dict[str, Any], columns: dict[str, str | None]) -> dict[str, Any]:
    """The row's question-answer pair, before cleaning. VQAv2's `question_type`/`answer_type` columns are read when
    the data has them; `_clean_qa` keeps them (and the answer list) only with `CleaningOptions.answer_lists`."""
    value = row[columns["answer"]]
    answers = _answer_list(value)
    single = value.get("answer") if isinstance(value, dict) else value
    return {
        "question": row[columns["question"]], "answer": single if answers is None else _most_frequent(answers),
        "type": "open", "answers": answers, "question_type": row.get("question_type"),
        "answer_type": row.get("answer_type"),
    }


def clean_dataset_row(
    row: dict[str, Any], index: int, *, columns: dict[str, str | None], options: CleaningOptions
) -> dict[str, Any]:
    """Clean one row of a `datasets` source; `columns` maps image/caption/question/answer/group/key/negative_captions
    to names."""
    key = str(row[columns["key"]]) if columns["key"] else str(index)
    qa = [_qa_from_row(row, columns)] if columns["question"] and columns["answer"] else []
    caption = row[columns["caption"]] if columns["caption"] else None
    group = row[columns["group"]] if columns["group"] else None
    negatives = row[columns["negative_captions"]] if columns["negative_captions"] else None
    return clean_sample(
        key, _image_bytes(row[columns["image"]]), caption, options, qa=qa, negative_captions=negatives,
        group_id=str(group) if group is not None else None,
    )
