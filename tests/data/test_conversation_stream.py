"""Streaming stage-2 conversations (`ConversationStream`) from parquet and JSON-lines files: every record once per
epoch across 2 processes x 2 DataLoader workers, exact resume that checks and decodes only what comes after the
checkpoint, bad records counted by reason, and the same rows as the map-style loader."""

from __future__ import annotations

import itertools
import json
import pickle
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, List, Value
from datasets import Image as ImageFeature
from PIL import Image

import data.conversation_stream
import data.streaming
from cli import UserError
from data import conversations as conv
from data.conversation_loading import RECORD_NOT_JSON, load_conversations
from data.conversation_stream import ConversationStream
from data.sanitize import IMAGE_UNDECODABLE
from data.streaming import STATE_COLUMN, StreamPosition

PH = conv.IMAGE_PLACEHOLDER
SHARD_BYTES = 700  # a few row groups / lines per part: 5 files become more parts than the 4 readers
COLOURS = [(220, 30, 30), (30, 160, 40), (40, 60, 220), (230, 200, 20), (120, 40, 160), (20, 20, 20)]
# Bad records planted in the files, by the reason they are skipped for.
PLANTED = {conv.IMAGE_FILE_MISSING: 1, conv.PLACEHOLDERS_MISMATCH: 1, RECORD_NOT_JSON: 1, IMAGE_UNDECODABLE: 1,
           "shard truncated or corrupt": 1}


def _png(colour: tuple[int, int, int], size: tuple[int, int] = (24, 20)) -> bytes:
    from io import BytesIO

    image = Image.new("RGB", size, (245, 245, 240))
    image.paste(colour, (4, 4, 16, 14))
    buffer = BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_parquet(path: Path, start: int, count: int, bad: int | None = None) -> list[str]:
    """Cauldron-style rows (0-2 images, one or two user/assistant pairs), 3 per row group; returns the good keys."""
    images, texts = [], []
    for i in range(start, start + count):
        n = i % 3
        images.append([{"bytes": b"not an image" if i == bad else _png(COLOURS[(i + j) % 6]), "path": None}
                       for j in range(n)])
        texts.append([{"user": f"Question {i}?", "assistant": f"Answer {i}."}] * (1 + i % 2))
    features = Features({"images": List(ImageFeature()),
                         "texts": List({"user": Value("string"), "assistant": Value("string")})})
    Dataset.from_dict({"images": images, "texts": texts}, features=features).to_parquet(str(path), batch_size=3)
    return [f"parquet/{path.name}/{row}" for row in range(count) if start + row != bad]


def _llava(ident: str, image: str | list | None, question: str, answer: str = "Yes.") -> dict:
    record = {"id": ident, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    return record | ({"image": image} if image is not None else {})


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict:
    """A folder of 3 parquet files and 2 LLaVA JSON-lines files (images in an image folder), with bad records."""
    root = tmp_path_factory.mktemp("conversations")
    folder = root / "images"
    folder.mkdir()
    for i, colour in enumerate(COLOURS):
        (folder / f"{i}.png").write_bytes(_png(colour))
    (root / "data" / "parquet").mkdir(parents=True)
    (root / "data" / "llava").mkdir()
    keys = _write_parquet(root / "data" / "parquet" / "a.parquet", 0, 10, bad=4)
    keys += _write_parquet(root / "data" / "parquet" / "b.parquet", 10, 7)
    keys += _write_parquet(root / "data" / "parquet" / "c.parquet", 17, 12)
    (root / "data" / "parquet" / "broken.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    for name, count in (("x", 14), ("y", 9)):
        lines = []
        for i in range(count):
            ident = f"{name}-{i}"
            if i == 0:  # text only, so the first records of a file need not show the image field
                record = _llava(ident, None, "Say hello.", "Hello.")
            elif i == 5:  # longer than a part: the parts it covers hold no record of their own
                record = _llava(ident, f"{i % 6}.png", "<image>\nDescribe it. " + "Really. " * 120)
            else:
                record = _llava(ident, f"{i % 6}.png", f"<image>\nWhat colour is {ident}?", f"Colour {i}.")
            lines.append(json.dumps(record))
            keys.append(f"llava/{name}.jsonl/{ident}")
        if name == "x":
            bad = [_llava("x-gone", "gone.png", "<image>\nWhat?"), _llava("x-two", "1.png", "<image> or <image>?")]
            lines[3:3] = [json.dumps(r) for r in bad] + ['{"id": "x-cut", "conversa', ""]
        (root / "data" / "llava" / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return {"data": str(root / "data"), "images": str(folder), "keys": sorted(keys), "root": root}


def _stream(source: dict, **kwargs) -> ConversationStream:
    options = {"image_folder": source["images"], "shard_bytes": SHARD_BYTES, "seed": 3, "buffer_size": 4} | kwargs
    return ConversationStream.from_source(source["data"], **options)


def _pixels(image: Image.Image) -> tuple:
    return image.mode, image.size, np.asarray(image).tobytes()


def _comparable(row: dict) -> tuple:
    return row["key"], tuple((t["role"], t["text"]) for t in row["turns"]), tuple(map(_pixels, row["images"]))


def _first_epoch_of_each_slot(loader) -> list[dict]:
    """The rows a DataLoader gives until each of its workers' readers has started its second epoch."""
    rows, past = [], set()
    for row in loader:
        state = row[STATE_COLUMN]
        if state["epoch"] == 0:
            rows.append(row)
        else:
            past.add(state["slot"])
            if len(past) == loader.num_workers:
                return rows
    raise AssertionError("the stream ended")


def test_two_processes_with_two_workers_read_every_record_once_per_epoch(source):
    rows = []
    for rank in range(2):
        stream = _stream(source, rank=rank, world_size=2)
        stream.check_readers(2)
        assert len(stream.shards) >= 8  # the files are read in parts: more parts than readers
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
        rows += _first_epoch_of_each_slot(loader)
    counts = Counter(row["key"] for row in rows)
    print(f"\n{len(_stream(source).shards)} parts of 6 files; first epoch: {len(counts)} keys from "
          f"{len({row[STATE_COLUMN]['slot'] for row in rows})} readers, each {set(counts.values())} times")
    assert sorted(counts) == source["keys"] and set(counts.values()) == {1}
    assert {row[STATE_COLUMN]["slot"] for row in rows} == {0, 1, 2, 3}
    for row in rows:
        assert all(isinstance(image, Image.Image) and image.mode == "RGB" for image in row["images"])
        assert sum(turn["text"].count(PH) for turn in row["turns"]) == len(row["images"])


def _slot_rows(stream: ConversationStream, worker: int, n: int, monkeypatch) -> list[dict]:
    """The first `n` rows of DataLoader worker `worker` (of 2) of the stream's process, read here."""
    with monkeypatch.context() as patch:
        patch.setattr(torch.utils.data, "get_worker_info", lambda: SimpleNamespace(num_workers=2, id=worker))
        return list(itertools.islice(iter(stream), n))


class _Counting:
    """Wraps a function, counting its calls."""

    def __init__(self, function):
        self.function, self.calls = function, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.function(*args, **kwargs)


@pytest.mark.parametrize("rank, worker", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_resumed_reader_gives_the_uninterrupted_rows_and_reads_only_those(source, monkeypatch, rank, worker):
    total = 40  # well into every reader's second epoch
    decoder = _Counting(data.streaming._DECODE.decode_example)
    monkeypatch.setattr(data.streaming, "_DECODE", SimpleNamespace(decode_example=decoder))
    checked = _Counting(data.conversation_stream.check_row)
    monkeypatch.setattr(data.conversation_stream, "check_row", checked)
    whole, checked_by = [], []  # the rows, and how many records had been checked when each was given
    with monkeypatch.context() as patch:
        patch.setattr(torch.utils.data, "get_worker_info", lambda: SimpleNamespace(num_workers=2, id=worker))
        for row in itertools.islice(_stream(source, rank=rank, world_size=2), total):
            whole.append(row)
            checked_by.append(checked.calls)
    epochs = Counter(row[STATE_COLUMN]["epoch"] for row in whole)
    assert epochs[0] and epochs[1]
    for stop in (1, epochs[0] // 2, epochs[0], epochs[0] + 3):
        state = whole[stop - 1][STATE_COLUMN]
        resumed = _stream(source, rank=rank, world_size=2)  # a new process: nothing carried over but the position
        resumed.resume({state["slot"]: StreamPosition(state["epoch"], state["drawn"], Counter(state["skipped"]))})
        decoder.calls = checked.calls = 0
        again = _slot_rows(resumed, worker, total - stop, monkeypatch)
        print(f"\nreader {state['slot']} resumed after {stop} rows (epoch {state['epoch']}, draw {state['drawn']}, "
              f"skipped {sum(state['skipped'].values())}): checked {checked.calls} records for the next "
              f"{len(again)} rows, decoded {decoder.calls} images")
        assert list(map(_comparable, again)) == list(map(_comparable, whole[stop:]))
        assert [row[STATE_COLUMN] for row in again] == [row[STATE_COLUMN] for row in whole[stop:]]
        # Only the records drawn after the position are checked (kept or skipped), none of the replayed draws.
        assert checked.calls == checked_by[-1] - checked_by[stop - 1]
        assert decoder.calls == sum(len(row["images"]) for row in again)


def test_bad_records_and_files_are_skipped_and_counted_once_per_epoch(source):
    stream = _stream(source, rank=0, world_size=1)
    counted, keys = Counter(), []
    for slot in range(4):  # one epoch of each of 4 readers: every part once
        position = StreamPosition()
        keys += [row["key"] for row in stream._epoch(slot, 4, position)]
        counted.update(position.skipped)
    assert sorted(keys) == source["keys"]
    assert dict(counted) == PLANTED
    stream.extra_check = lambda row: "too long" if len(row["turns"][0]["text"]) > 500 else None
    position = StreamPosition()
    kept = sum(1 for _ in stream._epoch(0, 1, position))
    assert position.skipped["too long"] == 2 and kept == len(source["keys"]) - 2


def test_rows_are_those_of_the_map_style_loader(source, tmp_path):
    streamed = {row["key"]: _comparable(row)[1:] for row in _stream(source).peek(200)
                if row[STATE_COLUMN]["epoch"] == 0}
    assert sorted(streamed) == source["keys"]
    for name, prefix in (("parquet/c.parquet", "parquet/c.parquet/"), ("llava/y.jsonl", "llava/y.jsonl/")):
        loaded = load_conversations(f"{source['data']}/{name}", image_folder=source["images"],
                                    cache_dir=str(tmp_path / "cache"))
        for row in loaded:
            assert streamed[prefix + row["key"]] == _comparable(row)[1:]


def test_text_rows_and_what_cannot_be_streamed(source, tmp_path):
    texts = list(_stream(source).text_rows())
    assert sorted(row["key"] for row in texts) == source["keys"] and set(texts[0]) == {"key", "turns"}
    with pytest.raises(UserError, match="leaves some readers without a shard"):
        _stream(source, shard_bytes=2**30, world_size=2).check_readers(4)  # 6 files, 8 readers
    listing = tmp_path / "llava.json"
    listing.write_text(json.dumps([_llava("0", "0.png", "<image>\nWhat?")]))
    with pytest.raises(UserError, match="is a JSON list; streaming reads JSON lines"):
        ConversationStream.from_source(str(listing), image_folder=source["images"], seed=0, buffer_size=1)
    with pytest.raises(UserError, match="relative paths .*--image_folder"):
        ConversationStream.from_source(f"{source['data']}/llava", seed=0, buffer_size=1)
    with pytest.raises(UserError, match="no .parquet or .jsonl files"):
        ConversationStream.from_source(source["images"], seed=0, buffer_size=1)
    with pytest.raises(UserError, match="unknown conversation format 'lava'"):
        ConversationStream.from_source(source["data"], format="lava", seed=0, buffer_size=1)


def test_stream_pickles_for_spawned_workers(source, monkeypatch):
    stream = _stream(source, rank=0, world_size=2)
    copy = pickle.loads(pickle.dumps(stream))
    assert list(map(_comparable, _slot_rows(copy, 1, 5, monkeypatch))) == list(
        map(_comparable, _slot_rows(stream, 1, 5, monkeypatch)))


def test_a_parquet_part_reads_each_row_group_once_and_frees_it_when_drawn(source, monkeypatch):
    stream = _stream(source, shard_bytes=2**30)  # one part per file
    [part] = [p for p in stream.shards if p.path.endswith("c.parquet")]  # 12 rows in row groups of 3
    groups = _Counting(data.conversation_stream._ParquetPart._read_group)
    monkeypatch.setattr(data.conversation_stream._ParquetPart, "_read_group",
                        lambda self, group: groups(self, group))
    opened = stream._open(part)
    order = [5, 0, 11, 3, 4, 1, 9, 6, 2, 10, 8, 7]
    for index in order[:4]:  # replayed draws, as after a checkpoint: nothing read
        opened.skip(index)
    assert groups.calls == 0
    rows = [opened.read(index)[1:3] for index in order[4:]]
    assert [at for at, _ in rows] == order[4:] and all(record["texts"] for _, record in rows)
    assert groups.calls == 4 and not opened._groups  # every row group read once, none kept once all drawn
    opened.close()


def test_json_lines_whose_first_records_have_no_image_still_read_the_images(source, monkeypatch):
    monkeypatch.setattr(data.conversation_stream, "SAMPLED_RECORDS", 1)  # y.jsonl opens with a text-only record
    stream = ConversationStream.from_source(f"{source['data']}/llava/y.jsonl", image_folder=source["images"], seed=0,
                                            buffer_size=1)
    assert stream.shards[0].fields.image == "image"
    position = StreamPosition()
    rows = list(stream._epoch(0, 1, position))
    assert len(rows) == 9 and sum(len(row["images"]) for row in rows) == 8 and not position.skipped
