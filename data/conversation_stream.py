"""Stage-2 conversations streamed from parquet and JSON-lines files, with the shard stream's guarantees.

`load_conversations` checks every record in a `datasets` map before the first step, and that map writes every
kept image into the `datasets` cache: for FineVision (24M samples) a second copy of the whole set. `ConversationStream`
reads the files as training asks for them, through the same readers and checks (`data.conversation_readers`,
`data.conversations.check_conversation`, bad records counted by reason), and writes nothing.

It is a `data.streaming.ShardStream` whose shards are pieces of files (`FilePart`), so it keeps that stream's
guarantees and its checkpoint format: every record once per epoch across processes x DataLoader workers, a new order
each epoch, and exact resume that reads nothing it skips. A piece is at most about `shard_bytes` of one file, cut
where records start: a parquet file at row-group boundaries (its row count is in the footer, read once when the
stream is made), a JSON-lines file at byte offsets (a reader scans its piece for line starts when it opens it). One
large file (LLaVA's 665k records) is so still read by many readers at once.

Reading record i: a JSON line is read with one seek; a parquet record comes with its whole row group (the smallest
piece parquet reads), so a reader keeps each row group it has read until every record of it has been drawn: each
row group is read once per epoch whatever the shuffle buffer, and what is held is the records drawn later (about
`buffer_size` of them) plus the rest of the row group being filled from. Images are decoded when a record is drawn.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import os
import posixpath
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Features

from cli import UserError, check_at_least, missing_path

from . import streaming
from .conversation_loading import RECORD_FIELD, check_image_paths, check_row, is_image_feature, parsed_json
from .conversation_readers import IMAGE_FIELDS, Fields, check_format, detect_format, resolve_fields
from .conversations import verdict_row
from .streaming import ShardStream, StreamPosition

logger = logging.getLogger(__name__)

SHARD_BYTES = 16 * 2**20
ROW_GROUP_UNREADABLE = "parquet row group unreadable"
RECORD_UNREADABLE = "record unreadable (file read error)"
PARQUET, JSON_LINES = (".parquet",), (".jsonl", ".json")
# JSON has no schema: a file's fields are those of its first records, and its format's image field counts as present
# even when none of those records has an image (LLaVA files may open with text-only conversations), so that the
# images of the records after them are not left out.
SAMPLED_RECORDS = 1000
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class FilePart:
    """One shard of a `ConversationStream`: a piece of one file.

    Parquet: row groups [start, stop) of `rows` records each, the first of them record `first_row` of the file.
    JSON lines: the records whose lines start at a byte offset in [start, stop). `fields`: where the file's records
    keep what their format reads; `problem`: why the file could not be read (the part then holds no record).
    """

    path: str
    key_prefix: str
    fields: Fields | None
    start: int = 0
    stop: int = 0
    rows: tuple[int, ...] = ()
    first_row: int = 0
    problem: str | None = None

    @property
    def is_parquet(self) -> bool:
        return self.path.lower().endswith(PARQUET)


class _ParquetPart:
    """A parquet part opened for reading records by index; each row group read is kept until all of it is drawn."""

    def __init__(self, part: FilePart):
        self.part, self.problem = part, part.problem
        self._ends = list(itertools.accumulate(part.rows))
        self._drawn = bytearray(len(self))
        self._groups: dict[int, dict[int, Any]] = {}  # row group -> {index: record} of its records not drawn yet
        self._file = self._parquet = None

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def _read_group(self, group: int) -> dict[int, Any]:
        first = self._ends[group] - self.part.rows[group]
        try:
            if self._parquet is None:
                self._file = fsspec.open(self.part.path, "rb").open()
                self._parquet = pq.ParquetFile(self._file)
            records = self._parquet.read_row_group(self.part.start + group).to_pylist()
        except (OSError, pa.ArrowException) as err:
            logger.warning("%s: row group %d unreadable (%s); its records are skipped", self.part.path,
                           self.part.start + group, err)
            records = []
        records += [None] * (self.part.rows[group] - len(records))  # None: counted as unreadable
        return {first + i: record for i, record in enumerate(records) if not self._drawn[first + i]}

    def _take(self, index: int, read: bool) -> Any:
        group = bisect.bisect_right(self._ends, index)
        if group not in self._groups:
            if not read:
                self._drawn[index] = 1
                return None
            self._groups[group] = self._read_group(group)
        self._drawn[index] = 1
        record = self._groups[group].pop(index)
        if not self._groups[group]:
            del self._groups[group]
        return record

    def skip(self, index: int) -> None:
        self._take(index, read=False)

    def read(self, index: int) -> tuple[FilePart, int, Any, str | None]:
        record = self._take(index, read=True)
        return self.part, self.part.first_row + index, record, ROW_GROUP_UNREADABLE if record is None else None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._groups.clear()


class _JsonLinesPart:
    """A JSON-lines part opened for reading records by index: the byte offsets of its lines, from one scan."""

    def __init__(self, part: FilePart):
        self.part, self.problem, self.offsets = part, part.problem, array("q")
        self._file = None
        try:
            self._file = fsspec.open(part.path, "rb").open()
            at = part.start
            if at > 0:  # the line that starts at or after `start` (a line crossing it belongs to the part before)
                self._file.seek(at - 1)
                at += len(self._file.readline()) - 1
            while at < part.stop:
                line = self._file.readline()
                if not line:
                    break
                if line.strip():
                    self.offsets.append(at)
                at += len(line)
        except OSError as err:
            self.problem = f"{part.path}: {err}"

    def __len__(self) -> int:
        return len(self.offsets)

    def skip(self, index: int) -> None:
        pass

    def read(self, index: int) -> tuple[FilePart, int, Any, str | None]:
        offset = self.offsets[index]
        try:
            self._file.seek(offset)
            return self.part, offset, self._file.readline(), None
        except OSError:
            return self.part, offset, None, RECORD_UNREADABLE

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _expand(source: str) -> list[str]:
    fs, local = fsspec.core.url_to_fs(os.fspath(source))
    if _GLOB_CHARS & set(local):
        found = fs.glob(local)
    elif fs.isdir(local):
        found = fs.find(local)
    elif fs.exists(local):
        if not local.lower().endswith(PARQUET + JSON_LINES):
            raise UserError(f"streaming conversations reads .parquet and .jsonl files; {source} is neither; set "
                            "streaming: false to load it map-style")
        return [fs.unstrip_protocol(local)]
    else:
        raise missing_path("data source", source, "parquet or JSON-lines files, or a folder of them")
    return sorted(fs.unstrip_protocol(p) for p in found if p.lower().endswith(PARQUET + JSON_LINES))


def conversation_files(sources: str | Sequence[str]) -> list[str]:
    """The parquet and JSON-lines files of `sources` (files, folders searched recursively, or glob patterns),
    sorted and de-duplicated; `UserError` when there are none."""
    sources = [sources] if isinstance(sources, str) else list(sources)
    files = sorted({path for source in sources for path in _expand(source)})
    if not files:
        raise UserError(f"no .parquet or .jsonl files in {', '.join(map(str, sources))}; streaming conversations "
                        "reads those (save_to_disk folders and Hub datasets: set streaming: false)")
    return files


@dataclass(frozen=True)
class _Options:
    format: str
    image_folder: str | None
    image_column: str | None
    question_column: str | None
    answer_column: str | None
    min_ratings: dict[str, int] | None


def _fields(options: _Options, names: list[str], path: str, image_types: tuple[str, ...] = ()) -> Fields:
    format = options.format
    if format == "auto":
        format = "vqa" if options.question_column or options.answer_column else detect_format(names, path)
    return resolve_fields(
        format, names, source=path, image_types=image_types, image_column=options.image_column,
        question_column=options.question_column, answer_column=options.answer_column, min_ratings=options.min_ratings,
    )


def _image_columns(schema: pa.Schema) -> tuple[str, ...]:
    """The columns `datasets` wrote as images (the schema's metadata says so), or none where it cannot tell."""
    try:
        features = Features.from_arrow_schema(schema)
    except (ValueError, TypeError, KeyError):  # a schema `datasets` has no features for: no column is typed
        return ()
    return tuple(name for name, feature in features.items() if is_image_feature(feature))


def _parquet_parts(path: str, prefix: str, options: _Options, shard_bytes: int) -> list[FilePart]:
    try:
        with fsspec.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            metadata, schema = parquet.metadata, parquet.schema_arrow
            image_types = _image_columns(schema)
            fields = _fields(options, schema.names, path, image_types)
            if fields.image is not None and fields.image not in image_types and metadata.num_row_groups:
                values = parquet.read_row_group(0, columns=[fields.image]).column(0).to_pylist()
                check_image_paths(values, options.image_folder, path)
    except (OSError, pa.ArrowException) as err:
        logger.warning("%s cannot be read as parquet (%s); it is counted as unreadable", path, err)
        return [FilePart(path, prefix, None, problem=f"{path}: {err}")]
    # Row group g goes to piece (bytes before g) // shard_bytes: pieces of about shard_bytes, none empty.
    pieces, offset, first_row = [], 0, 0
    for group in range(metadata.num_row_groups):
        meta = metadata.row_group(group)
        piece = offset // shard_bytes
        if not pieces or pieces[-1][0] != piece:
            pieces.append((piece, group, []))
        pieces[-1][2].append(meta.num_rows)
        offset += sum(meta.column(c).total_compressed_size for c in range(meta.num_columns))
    parts = []
    for _, start, rows in pieces:
        parts.append(FilePart(path, prefix, fields, start, start + len(rows), tuple(rows), first_row))
        first_row += sum(rows)
    return parts


def _json_lines_parts(path: str, prefix: str, options: _Options, shard_bytes: int) -> list[FilePart]:
    fs, local = fsspec.core.url_to_fs(path)
    lines, size = [], fs.size(local)
    with fs.open(local, "rb") as f:
        head = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
        f.seek(0)
        while len(lines) < SAMPLED_RECORDS and (line := f.readline()):
            lines += [line] if line.strip() else []
    if not lines:
        logger.warning("%s holds no records", path)
        return []
    if head.startswith(b"["):
        raise UserError(
            f"{path} is a JSON list; streaming reads JSON lines (one record per line), which can be read from "
            "anywhere in the file. Write it once as JSON lines, e.g. python -c \"import json,sys; [print(json.dumps("
            f"r)) for r in json.load(open(sys.argv[1]))]\" {path} > {posixpath.splitext(path)[0]}.jsonl, "
            "or set streaming: false"
        )
    records = [record for record in map(parsed_json, lines) if isinstance(record, dict)]
    if not records:
        raise UserError(f"cannot read {path} as JSON lines: none of its first {len(lines)} lines is a JSON record")
    names = list(dict.fromkeys(name for record in records for name in record))
    fields = _fields(options, names, path)
    defaults = IMAGE_FIELDS.get(fields.format, ())
    if options.image_column is None and defaults and not any(name in names for name in defaults):
        fields = _fields(options, [*names, defaults[0]], path)
    if fields.image is not None:
        check_image_paths([record.get(fields.image) for record in records], options.image_folder, path)
    pieces = max(1, math.ceil(size / shard_bytes))
    return [FilePart(path, prefix, fields, k * shard_bytes, min((k + 1) * shard_bytes, size)) for k in range(pieces)]


class ConversationStream(ShardStream):
    """Checked conversation rows (`{"key", "images", "turns"}`, images decoded to RGB PIL, plus
    `data.streaming.STATE_COLUMN`) from parquet and JSON-lines files, without end: epoch after epoch, reshuffled
    each time. Make one with `from_source`.

    Keys: a record's `id` when it has one (as `load_conversations`; repeats are not renamed, which would need every
    file read first), else its row in the file (parquet) or the byte offset of its line (JSON lines); prefixed with
    the file's path under the files' common folder when there are several files.

    `extra_check`, when set (before training starts), is called on every checked row (images not decoded yet) and
    returns a skip reason or None: e.g. conversations too long for `max_length`, which the map-style path drops
    before training. Its reasons are counted with the others.
    """

    def __init__(self, parts: Sequence[FilePart], *, image_folder: str | None = None,
                 max_images_per_sample: int | None = None, seed: int, buffer_size: int, rank: int = 0,
                 world_size: int = 1):
        super().__init__(parts, None, seed=seed, buffer_size=buffer_size, rank=rank, world_size=world_size)
        self.image_folder = os.path.abspath(image_folder) if image_folder else None
        self.max_images_per_sample = max_images_per_sample
        self.extra_check: Callable[[dict], str | None] | None = None

    @classmethod
    def from_source(
        cls, source: str | Sequence[str], *, format: str = "auto", image_folder: str | None = None,
        image_column: str | None = None, question_column: str | None = None, answer_column: str | None = None,
        min_ratings: dict[str, int] | None = None, max_images_per_sample: int | None = None,
        shard_bytes: int = SHARD_BYTES, **kwargs,
    ) -> ConversationStream:
        """The stream of `source`: parquet and JSON-lines files (a file, a folder searched recursively, a glob, or a
        list of them). The options are `load_conversations`'; "auto" tells each file's format from its columns
        (parquet) or first records (JSON lines). `shard_bytes`: the largest piece of a file one reader takes at a
        time. `kwargs`: `seed`, `buffer_size`, `rank`, `world_size` (see `ShardStream`).

        Reads every parquet footer and the first records of every JSON-lines file now, so that a misnamed field is
        one error before training; nothing else is read until training asks.
        """
        check_format(format)
        check_at_least({"max_images_per_sample": max_images_per_sample}, 0)
        check_at_least({"shard_bytes": shard_bytes}, 1)
        if image_folder is not None and not os.path.isdir(image_folder):
            raise missing_path("--image_folder", image_folder, "the folder the image paths of the data are under")
        options = _Options(format, image_folder, image_column, question_column, answer_column, min_ratings)
        files = conversation_files(source)
        local = {path: fsspec.core.url_to_fs(path)[1] for path in files}
        common = posixpath.commonpath([posixpath.dirname(p) for p in local.values()]) if len(files) > 1 else None
        parts = []
        for path in files:
            prefix = posixpath.relpath(local[path], common) + "/" if common is not None else ""
            read = _parquet_parts if path.lower().endswith(PARQUET) else _json_lines_parts
            parts += read(path, prefix, options, shard_bytes)
        return cls(parts, image_folder=image_folder, max_images_per_sample=max_images_per_sample, **kwargs)

    def _open(self, part: FilePart) -> _ParquetPart | _JsonLinesPart:
        return _ParquetPart(part) if part.is_parquet else _JsonLinesPart(part)

    def _checked(self, sample: tuple[FilePart, int, Any, str | None]) -> dict:
        """The verdict row of a record as a part read it: its conversation (images undecoded) or why it is skipped."""
        part, at, record, problem = sample
        if problem is not None:
            row = verdict_row(str(at), problem)
        else:
            from_json = not part.is_parquet
            row = check_row(
                {RECORD_FIELD: record} if from_json else record, at, fields=part.fields, image_folder=self.image_folder,
                from_json=from_json, renamed={}, max_images_per_sample=self.max_images_per_sample,
            )
        row["key"] = part.key_prefix + row["key"]
        if row["_skip"] is None and self.extra_check is not None:
            row["_skip"] = self.extra_check(row)
        return row

    def _clean(self, sample: tuple[FilePart, int, Any, str | None], position: StreamPosition) -> dict | None:
        row = self._checked(sample)
        if not self._count(row["key"], row.pop("_skip"), row.pop("_repairs"), position):
            return None
        row["images"] = [streaming._DECODE.decode_example(image) for image in row["images"]]
        return row

    def text_rows(self) -> Iterator[dict]:
        """Every usable record of every file, checked, images not decoded ({"key", "turns"}): for the texts (a tiny
        preset's tokenizer is trained on them). Reads the whole set once."""
        for ref in self.shards:
            part = self._open(ref)
            try:
                for index in range(len(part)):
                    row = self._checked(part.read(index))
                    if row["_skip"] is None:
                        yield {"key": row["key"], "turns": row["turns"]}
            finally:
                part.close()


__all__ = ["ROW_GROUP_UNREADABLE", "SHARD_BYTES", "ConversationStream", "FilePart", "conversation_files"]
