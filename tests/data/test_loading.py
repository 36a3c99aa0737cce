"""The one loading path: same samples from every writer and mode, bad samples counted exactly."""

from __future__ import annotations

import json
import random
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from datasets import Dataset, Features, List, Value
from datasets import Image as ImageFeature
from PIL import Image

from cli import UserError
from data import sanitize
from data.cleaning import QA_DROPPED, CleaningOptions, normalize_caption
from data.loading import OUTPUT_FEATURES, load_image_text_dataset, split_train_eval
from data.shard_writer import ShardWriter
from data.skip_report import SkipReport
from data.streaming import STATE_COLUMN, ShardStream
from data.synthetic import make_sample
from data.tar_shards import SHARD_DAMAGED, SHARD_EMPTY, SHARD_MISSING, list_shards

from .conftest import encode, read_tar


def _rows(dataset) -> list[dict]:
    """Rows with images as (mode, size, pixels) so they compare by value."""
    rows = []
    for row in dataset:
        image = row["image"]
        rows.append({**row, "image": (image.mode, image.size, np.asarray(image).tobytes())})
    return rows


def _counts(report: SkipReport) -> dict:
    return {k: v for k, v in report.to_dict().items() if k != "examples"}


def streamed(source) -> list[dict]:
    """The rows of one epoch of training's stream (`ShardStream`), in the loader's order (by key here: the stream
    draws its shards in an order of its own), as `_rows` gives them."""
    stream = ShardStream(list_shards(source if isinstance(source, list) else [str(source)]), CleaningOptions(),
                         seed=0, buffer_size=1)
    rows = []
    for row in stream:
        if row.pop(STATE_COLUMN)["epoch"] > 0:
            break
        rows.append(row)
    return _rows(sorted(rows, key=lambda row: row["key"]))


def test_generator_shards_same_rows_map_style_and_streaming(shapes_dir: Path, tmp_path: Path) -> None:
    map_report = SkipReport()
    mapped = load_image_text_dataset(shapes_dir, split="train", report=map_report, cache_dir=str(tmp_path))
    assert mapped.features == OUTPUT_FEATURES
    rows = _rows(mapped)
    assert sorted(rows, key=lambda row: row["key"]) == streamed(shapes_dir / "train")
    assert len(rows) == 30 and len({row["key"] for row in rows}) == 30
    assert _counts(map_report) == {"kept": 30, "skipped": {}, "repaired": {}, "shard_problems": {}}
    first = mapped[0]
    assert first["image"].mode == "RGB" and first["references"][0] == first["caption"]
    assert first["group_id"].count(":") >= 1  # the scene id, not a caption
    assert first["qa"] and first["negative_captions"]


def test_shard_caption_and_negatives_from_named_json_fields(shapes_dir: Path, tmp_path: Path) -> None:
    # The tiny stage 1 reads the shapes data's "size colour shape" captions: its caption_column names a .json field.
    fields = {"caption_column": "caption_color_first", "negative_captions_column": "negative_captions_color_first"}
    mapped = load_image_text_dataset(shapes_dir, split="train", cache_dir=str(tmp_path), **fields)
    default = load_image_text_dataset(shapes_dir, split="train", cache_dir=str(tmp_path))
    rows = _rows(mapped)
    stream = ShardStream.from_source(str(shapes_dir), seed=0, buffer_size=1,
                                     options=CleaningOptions().with_text_fields(*fields.values()))
    assert sorted(row["caption"] for row in stream.text_rows()) == sorted(mapped["caption"])
    records = {}
    for tar in sorted((shapes_dir / "train").glob("*.tar")):
        records |= {key: json.loads(files["json"]) for key, files in read_tar(tar).items()}
    assert len(rows) == len(records) == 30
    for row, plain in zip(rows, _rows(default)):
        record = records[row["key"]]
        assert row["caption"] == record["caption_color_first"] != plain["caption"] == record["caption"]
        assert row["negative_captions"] == record["negative_captions_color_first"]
        assert plain["negative_captions"] == record["negative_captions"]
        # Everything else is the sample's as before.
        assert {k: v for k, v in row.items() if k not in ("caption", "references", "negative_captions")} == {
            k: v for k, v in plain.items() if k not in ("caption", "references", "negative_captions")}
    # A misspelt field is one clear error before anything is read, not 30 skipped samples.
    with pytest.raises(UserError, match=r"caption field 'caption_colour_first' not found in the .json of sample "
                                        r".*\(did you mean caption_color_first\?\); its fields are: url, caption"):
        load_image_text_dataset(shapes_dir, split="train", caption_column="caption_colour_first")
    with pytest.raises(UserError, match=r"negative captions field 'negatives' not found"):
        ShardStream.from_source(str(shapes_dir), seed=0, buffer_size=1,
                                options=CleaningOptions().with_text_fields(None, "negatives"))


def test_shard_duplicate_groups_come_from_a_named_json_field(shapes_dir: Path, tmp_path: Path) -> None:
    """The generic loader reads a shard's duplicate group from the .json field `group_column` names ("group_id", which
    the shapes generator writes, by default); samples without one are grouped by their normalised caption."""
    default = load_image_text_dataset(shapes_dir, split="train", cache_dir=str(tmp_path))
    records = {}
    for tar in sorted((shapes_dir / "train").glob("*.tar")):
        records |= {key: json.loads(files["json"]) for key, files in read_tar(tar).items()}
    assert [row["group_id"] for row in default] == [records[row["key"]]["group_id"] for row in default]
    named = load_image_text_dataset(shapes_dir, split="train", cache_dir=str(tmp_path), group_column="url")
    # url is null in every record: each sample falls back to its normalised caption.
    assert [row["group_id"] for row in named] == [normalize_caption(row["caption"]) for row in named]
    with pytest.raises(UserError, match=r"group field 'scene_idd' not found"):
        load_image_text_dataset(shapes_dir, split="train", group_column="scene_idd")


def test_generator_and_img2dataset_shards_give_the_same_samples(
    shapes_dir: Path, img2dataset_run: dict, tmp_path: Path
) -> None:
    generated = _rows(load_image_text_dataset(shapes_dir, split="validation", cache_dir=str(tmp_path)))
    downloaded_map = load_image_text_dataset(img2dataset_run["output"], cache_dir=str(tmp_path))
    downloaded = _rows(downloaded_map)
    assert sorted(downloaded, key=lambda row: row["key"]) == streamed(img2dataset_run["output"])
    by_caption = {row["caption"]: row for row in downloaded}
    assert len(downloaded) == len(generated) + 1  # the shapes and the one good PNG
    for row in generated:
        twin = by_caption[row["caption"]]
        for column in ("group_id", "references", "qa", "negative_captions"):
            assert twin[column] == row[column], column
        (mode, size, pixels), (twin_mode, twin_size, twin_pixels) = row["image"], twin["image"]
        assert (mode, size) == (twin_mode, twin_size) == ("RGB", (64, 64))
        # img2dataset re-encodes the JPEG; the pictures stay the same up to compression noise.
        difference = np.abs(np.frombuffer(pixels, np.uint8).astype(int) - np.frombuffer(twin_pixels, np.uint8))
        assert difference.mean() < 3
    png = by_caption["a green png"]
    assert png["references"] == ["a green png"] and png["qa"] == [] and png["group_id"] == "a green png"


def _png_header(width: int, height: int) -> bytes:
    """A tiny PNG that claims a huge size: the shape of a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _noisy_jpeg() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "JPEG", quality=90)


def _gradient_16bit() -> Image.Image:
    return Image.fromarray(np.tile(np.arange(0, 64000, 1000, dtype=np.uint16), (16, 1)))


GOOD_CAPTION = b"a plain caption"
LONG_CAPTION = ("word " * 400).strip().encode()
# Every planted bad sample: its files, and what loading must do with it.
PLANTED = {
    "mode-l": ({"jpg": encode(Image.new("L", (32, 32), 90), "JPEG"), "txt": GOOD_CAPTION}, "repair", "image mode L converted to RGB"),
    "mode-rgba": ({"png": encode(Image.new("RGBA", (32, 32), (9, 9, 9, 100)), "PNG"), "txt": GOOD_CAPTION}, "repair", "image mode RGBA converted to RGB"),
    "mode-cmyk": ({"jpg": encode(Image.new("CMYK", (32, 32), (0, 200, 200, 0)), "JPEG"), "txt": GOOD_CAPTION}, "repair", "image mode CMYK converted to RGB"),
    "mode-p": ({"png": encode(Image.new("RGB", (32, 32), (200, 0, 0)).convert("P"), "PNG"), "txt": GOOD_CAPTION}, "repair", "image mode P converted to RGB"),
    "mode-16bit": ({"png": encode(_gradient_16bit(), "PNG"), "txt": GOOD_CAPTION}, "repair", "image mode I;16 converted to RGB"),
    "long-caption": ({"jpg": encode(Image.new("RGB", (32, 32)), "JPEG"), "txt": LONG_CAPTION}, "repair", sanitize.CAPTION_TRUNCATED),
    "corrupt": ({"jpg": bytes(range(256)) * 4, "txt": GOOD_CAPTION}, "skip", sanitize.IMAGE_UNDECODABLE),
    "truncated": ({"jpg": _noisy_jpeg()[:1500], "txt": GOOD_CAPTION}, "skip", sanitize.IMAGE_TRUNCATED),
    "one-pixel": ({"png": encode(Image.new("RGB", (1, 1)), "PNG"), "txt": GOOD_CAPTION}, "skip", sanitize.IMAGE_TOO_SMALL),
    "bomb": ({"png": _png_header(9_000, 9_000), "txt": GOOD_CAPTION}, "skip", sanitize.IMAGE_TOO_LARGE),  # our limit
    "big-bomb": ({"png": _png_header(20_000, 20_000), "txt": GOOD_CAPTION}, "skip", sanitize.IMAGE_TOO_LARGE),  # PIL's
    "empty-image": ({"jpg": b"", "txt": GOOD_CAPTION}, "skip", sanitize.IMAGE_EMPTY),
    "no-image": ({"txt": GOOD_CAPTION}, "skip", sanitize.IMAGE_MISSING),
    "empty-caption": ({"jpg": encode(Image.new("RGB", (32, 32)), "JPEG"), "txt": b""}, "skip", sanitize.CAPTION_EMPTY),
    "blank-caption": ({"jpg": encode(Image.new("RGB", (32, 32)), "JPEG"), "txt": b" \n\t "}, "skip", sanitize.CAPTION_EMPTY),
    "latin1-caption": ({"jpg": encode(Image.new("RGB", (32, 32)), "JPEG"), "txt": b"caf\xe9 au lait"}, "skip", sanitize.CAPTION_NOT_UTF8),
    "no-caption": ({"jpg": encode(Image.new("RGB", (32, 32)), "JPEG"), "json": b"{}"}, "skip", sanitize.CAPTION_MISSING),
    "bad-json": ({"jpg": encode(Image.new("RGB", (32, 32)), "JPEG"), "txt": GOOD_CAPTION, "json": b"{not json"}, "skip", "metadata json unreadable"),
    "bad-qa": (
        {"jpg": encode(Image.new("RGB", (32, 32)), "JPEG"), "txt": GOOD_CAPTION, "json": json.dumps({"qa": [{"question": "?"}, {"question": "how many?", "answer": "two"}]}).encode()},
        "repair", QA_DROPPED,
    ),
}
GOOD_SAMPLES = 3  # synthetic samples in the salted shard, and 2 more before the damage in the truncated one


def _write_shard(folder: Path, shard_id: int, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    with ShardWriter(folder, shard_id, pa.schema([("key", pa.string())])) as writer:
        for key, files in samples:
            writer.write(key, files, {"key": key})
    return folder / f"{shard_id:05d}.tar"


def _synthetic_samples(prefix: str, n: int) -> list[tuple[str, dict[str, bytes]]]:
    rng = random.Random(prefix)
    samples = []
    for i in range(n):
        jpg, record = make_sample(rng, f"{prefix}{i}", image_size=32)
        samples.append((f"{prefix}{i}", {"jpg": jpg, "txt": record["caption"].encode(), "json": json.dumps(record).encode()}))
    return samples


@pytest.fixture(scope="module")
def salted_shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Shards salted with every bad-sample kind, plus an empty, a zero-member, a truncated and a missing shard."""
    folder = tmp_path_factory.mktemp("salted")
    _write_shard(folder, 0, _synthetic_samples("good", GOOD_SAMPLES) + [(k, files) for k, (files, _, _) in PLANTED.items()])
    (folder / "00001.tar").write_bytes(b"")
    _write_shard(folder, 2, [])
    damaged = _write_shard(folder, 3, _synthetic_samples("cut", 4))
    with tarfile.open(damaged) as tar:
        third_image = tar.getmembers()[6]  # members go jpg, json, txt per sample
    damaged.write_bytes(damaged.read_bytes()[: third_image.offset_data + 100])
    return [str(p) for p in sorted(folder.glob("*.tar"))] + [str(folder / "00004.tar")]


def _expected_report(long_caption: str) -> dict:
    skipped, repaired = {}, {}
    for _, action, reason in PLANTED.values():
        if reason == sanitize.CAPTION_TRUNCATED:
            action, reason = long_caption, (sanitize.CAPTION_TRUNCATED if long_caption == "repair" else sanitize.CAPTION_TOO_LONG)
        target = skipped if action == "skip" else repaired
        target[reason] = target.get(reason, 0) + 1
    return {
        "kept": GOOD_SAMPLES + 2 + sum(1 for _, action, _ in PLANTED.values() if action == "repair") - (long_caption == "skip"),
        "skipped": skipped,
        "repaired": repaired,
        "shard_problems": {SHARD_EMPTY: 2, SHARD_DAMAGED: 1, SHARD_MISSING: 1},
    }


def test_salted_shards_load_and_every_bad_sample_is_counted(salted_shards: list[str], tmp_path: Path) -> None:
    map_report = SkipReport()
    mapped = load_image_text_dataset(salted_shards, report=map_report, cache_dir=str(tmp_path))
    assert sorted(_rows(mapped), key=lambda row: row["key"]) == streamed(salted_shards)
    assert _counts(map_report) == _expected_report(long_caption="repair")
    cached_report = SkipReport()  # a second load is answered from the cache; the counts must not vanish
    load_image_text_dataset(salted_shards, report=cached_report, cache_dir=str(tmp_path))
    assert cached_report.to_dict() == map_report.to_dict()
    assert map_report.examples[sanitize.IMAGE_TRUNCATED] == ["truncated"]
    by_key = {row["key"]: row for row in mapped}
    assert set(by_key) == {f"good{i}" for i in range(3)} | {"cut0", "cut1"} | {
        key for key, (_, action, _) in PLANTED.items() if action == "repair"
    }
    assert all(row["image"].mode == "RGB" for row in by_key.values())
    assert len(by_key["long-caption"]["caption"]) <= 512 and by_key["long-caption"]["caption"].endswith("word")
    assert by_key["bad-qa"]["qa"] == [{"question": "how many?", "answer": "two", "type": "open", "about": None}]
    grey = np.asarray(by_key["mode-16bit"]["image"])[0, :, 0].astype(int)
    assert grey[0] < 5 and 120 < grey[32] < 140 and grey[-1] > 250  # the 16-bit range scaled, not clipped to white


def test_two_processes_read_the_same_rows_in_the_same_order(salted_shards: list[str], tmp_path: Path) -> None:
    one_report, two_report = SkipReport(), SkipReport()
    one = load_image_text_dataset(salted_shards, report=one_report, cache_dir=str(tmp_path / "one"))
    two = load_image_text_dataset(salted_shards, report=two_report, cache_dir=str(tmp_path / "two"), num_proc=2)
    assert _rows(two) == _rows(one)
    assert two_report.to_dict() == one_report.to_dict()
    # One cache for any number of processes: a one-process read finds the two-process result.
    cached_report = SkipReport()
    cached = load_image_text_dataset(salted_shards, report=cached_report, cache_dir=str(tmp_path / "two"))
    assert cached.cache_files == two.cache_files and cached_report.to_dict() == one_report.to_dict()


def test_long_captions_can_be_skipped_instead(salted_shards: list[str], tmp_path: Path) -> None:
    report = SkipReport()
    load_image_text_dataset(salted_shards, long_caption_policy="skip", report=report, cache_dir=str(tmp_path))
    assert _counts(report) == _expected_report(long_caption="skip")


def test_image_folder_with_metadata(tmp_path: Path) -> None:
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "red.jpg")
    Image.new("LA", (40, 30)).save(tmp_path / "grey.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    captions = {"red.jpg": "A red picture.", "grey.png": "a grey  picture", "broken.jpg": "broken"}
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f, "text": c}) + "\n" for f, c in captions.items()))
    report = SkipReport()
    dataset = load_image_text_dataset(str(tmp_path), report=report, cache_dir=str(tmp_path / "cache"))
    assert sorted(dataset["caption"]) == ["A red picture.", "a grey picture"]
    assert sorted(dataset["group_id"]) == ["a grey picture", "a red picture"]
    assert report.skipped == {sanitize.IMAGE_UNDECODABLE: 1}
    assert report.repaired == {"image mode LA converted to RGB": 1}


def _saved_dataset(path: Path, columns: dict, features: dict) -> str:
    Dataset.from_dict(columns, features=Features(features)).save_to_disk(str(path))
    return str(path)


def test_saved_dataset_with_custom_columns(tmp_path: Path) -> None:
    images = [encode(Image.new("RGB", (32, 32), c), "PNG") for c in ("red", "blue", "green")]
    source = _saved_dataset(
        tmp_path / "saved",
        {
            "picture": [{"bytes": b, "path": None} for b in images],
            "sentences": [["a red square", "red"], ["a blue square"], []],
            "q": ["what colour?", "what colour?", "what colour?"],
            "a": [["red", "crimson"], ["blue"], ["green"]],
            "image_id": [7, 8, 9],
            "foils": [["a blue square"], ["a red square", " "], []],
        },
        {
            "picture": ImageFeature(), "sentences": List(Value("string")), "q": Value("string"),
            "a": List(Value("string")), "image_id": Value("int64"), "foils": List(Value("string")),
        },
    )
    report = SkipReport()
    dataset = load_image_text_dataset(
        source, image_column="picture", caption_column="sentences", question_column="q", answer_column="a",
        group_column="image_id", negative_captions_column="foils", report=report, cache_dir=str(tmp_path / "cache"),
    )
    assert dataset["negative_captions"] == [["a blue square"], ["a red square"]]  # the blank one dropped, counted
    assert dataset["caption"] == ["a red square", "a blue square"]
    assert dataset["references"] == [["a red square", "red"], ["a blue square"]]
    assert dataset["qa"][0] == [{"question": "what colour?", "answer": "red", "type": "open", "about": None}]
    assert dataset["group_id"] == ["7", "8"] and dataset["key"] == ["0", "1"]
    assert report.skipped == {sanitize.CAPTION_MISSING: 1}
    with pytest.raises(ValueError, match=r"caption column 'nope' not found .* columns are: picture, sentences"):
        load_image_text_dataset(source, caption_column="nope")
    with pytest.raises(UserError, match=r"negative captions column 'foil' not found .*\(did you mean foils\?\)"):
        load_image_text_dataset(source, negative_captions_column="foil")
    with pytest.raises(UserError, match="no such file or folder"):
        load_image_text_dataset(str(tmp_path / "no" / "such" / "folder"))


def test_question_answer_data_without_captions(tmp_path: Path) -> None:
    source = _saved_dataset(
        tmp_path / "vqa",
        {"image": [encode(Image.new("RGB", (16, 16)), "PNG")] * 2, "question": ["is it dark?", " "], "answer": ["yes", "no"]},
        {"image": ImageFeature(), "question": Value("string"), "answer": Value("string")},
    )
    report = SkipReport()
    dataset = load_image_text_dataset(source, question_column="question", answer_column="answer", report=report)
    assert dataset["caption"] == [""] and dataset["qa"] == [[{"question": "is it dark?", "answer": "yes", "type": "open", "about": None}]]
    assert report.skipped == {"no caption and no usable question-answer pair": 1}


def _grouped() -> Dataset:
    rng = random.Random(0)
    groups = [f"g{i}" for i in range(25) for _ in range(rng.randint(1, 4))]
    return Dataset.from_dict({"group_id": groups, "index": list(range(len(groups)))})


def test_split_train_eval_keeps_duplicates_together_and_is_deterministic() -> None:
    dataset = _grouped()
    split = split_train_eval(dataset, eval_size=12, seed=1)
    train_groups, eval_groups = set(split["train"]["group_id"]), set(split["eval"]["group_id"])
    assert not train_groups & eval_groups
    assert len(split["train"]) + len(split["eval"]) == len(dataset)
    assert 12 <= len(split["eval"]) < 12 + 4
    assert split_train_eval(dataset, eval_size=12, seed=1)["eval"]["index"] == split["eval"]["index"]
    shuffled = dataset.shuffle(seed=3)
    assert set(split_train_eval(shuffled, eval_size=12, seed=1)["eval"]["group_id"]) == eval_groups
    assert set(split_train_eval(dataset, eval_size=12, seed=2)["eval"]["group_id"]) != eval_groups
