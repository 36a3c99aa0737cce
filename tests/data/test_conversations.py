"""Stage-2 conversations: every format gives the same rows, and every bad record is counted under its reason."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, Features, List, Value
from datasets import Image as ImageFeature
from PIL import Image

from cli import UserError
from data import conversations as conv
from data.conversation_loading import RECORD_NOT_JSON, detect_format, load_conversations
from data.conversation_readers import most_frequent_answer
from data.sanitize import IMAGE_MISSING, IMAGE_UNDECODABLE
from data.skip_report import SkipReport

PH = conv.IMAGE_PLACEHOLDER
COLOURS = {"red.png": (220, 30, 30), "green.jpg": (30, 160, 40), "blue.png": (40, 60, 220),
           "yellow.png": (230, 200, 20)}
# (images, [(question, answer), ...]): the images precede the first question, which every format can say.
SHARED = [
    (["red.png"], [("What colour is the circle?", "Red.")]),
    (["green.jpg", "blue.png"], [("Which one is blue?", "The second.")]),
    ([], [("Say hello.", "Hello.")]),
    (["yellow.png"], [("What shape is it?", "A circle."), ("And its colour?", "Yellow.")]),
]


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for name, colour in COLOURS.items():
        image = Image.new("RGB", (24, 20), (245, 245, 240))
        image.paste(colour, (4, 4, 16, 14))
        image.save(folder / name)
    return folder


def _pixels(image: Image.Image) -> tuple:
    return image.mode, image.size, np.asarray(image).tobytes()


def _rows(dataset) -> list[tuple]:
    """Rows without their keys, in an order that does not depend on them."""
    assert dataset.features == conv.CONVERSATION_FEATURES
    rows = [(tuple((t["role"], t["text"]) for t in row["turns"]), tuple(_pixels(i) for i in row["images"]))
            for row in dataset]
    return sorted(rows, key=lambda row: row[0])


def _expected(image_dir: Path) -> list[tuple]:
    rows = []
    for names, pairs in SHARED:
        turns = []
        for i, (question, answer) in enumerate(pairs):
            turns += [("user", PH * len(names) * (i == 0) + question), ("assistant", answer)]
        images = tuple(_pixels(Image.open(image_dir / name).convert("RGB")) for name in names)
        rows.append((tuple(turns), images))
    return sorted(rows, key=lambda row: row[0])


def _llava_records() -> list[dict]:
    records = []
    for i, (names, pairs) in enumerate(SHARED):
        conversation = []
        for j, (question, answer) in enumerate(pairs):
            # LLaVA puts the placeholder on a line of its own; the last record has none, and the reader adds it.
            lead = "<image>\n" * len(names) if j == 0 and i != len(SHARED) - 1 else ""
            conversation += [{"from": "human", "value": lead + question}, {"from": "gpt", "value": answer}]
        record = {"id": f"llava-{i}", "conversations": conversation}
        if names:
            record["image"] = names[0] if len(names) == 1 else names
        records.append(record)
    return records


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _image_value(image_dir: Path, name: str) -> dict:
    return {"bytes": (image_dir / name).read_bytes(), "path": None}


def _cauldron(image_dir: Path, rows: list[tuple] | None = None, **columns: list) -> Dataset:
    rows = rows or SHARED
    features = {"images": List(ImageFeature()),
                "texts": List({"user": Value("string"), "assistant": Value("string"), "source": Value("string")})}
    features |= {name: List(Value("int64")) for name in columns}
    data = {
        "images": [[_image_value(image_dir, n) for n in names] for names, _ in rows],
        "texts": [[{"user": q, "assistant": a, "source": "test"} for q, a in pairs] for _, pairs in rows],
        **columns,
    }
    return Dataset.from_dict(data, features=Features(features))


def _messages(image_dir: Path, typed: bool) -> Dataset:
    part = {"type": Value("string"), "text": Value("string")}
    content = List(part) if typed else Value("string")
    rows = {"messages": [], "images": []}
    for names, pairs in SHARED:
        messages = []
        for j, (question, answer) in enumerate(pairs):
            if typed:
                parts = [{"type": "image", "text": None}] * len(names) * (j == 0) + [{"type": "text", "text": question}]
                messages += [{"role": "user", "content": parts},
                             {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
            else:
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        rows["messages"].append(messages)
        rows["images"].append([_image_value(image_dir, n) for n in names])
    features = Features({"messages": List({"role": Value("string"), "content": content}),
                         "images": List(ImageFeature())})
    return Dataset.from_dict(rows, features=features)


def test_every_format_gives_the_same_conversations(image_dir: Path, tmp_path: Path) -> None:
    records = _llava_records()
    llava_json = tmp_path / "llava.json"
    llava_json.write_text(json.dumps(records))
    _cauldron(image_dir).save_to_disk(str(tmp_path / "cauldron"))
    _cauldron(image_dir).to_parquet(str(tmp_path / "cauldron.parquet"))
    _messages(image_dir, typed=True).save_to_disk(str(tmp_path / "typed"))
    _messages(image_dir, typed=False).to_parquet(str(tmp_path / "strings.parquet"))
    sources = {
        str(llava_json): {"image_folder": str(image_dir)},
        str(_write_jsonl(tmp_path / "llava.jsonl", records)): {"image_folder": str(image_dir), "format": "llava"},
        str(tmp_path / "cauldron"): {}, str(tmp_path / "cauldron.parquet"): {"format": "cauldron"},
        str(tmp_path / "typed"): {}, str(tmp_path / "strings.parquet"): {"format": "messages"},
    }
    expected = _expected(image_dir)
    for source, options in sources.items():
        report = SkipReport()
        loaded = load_conversations(source, cache_dir=str(tmp_path / "cache"), report=report, **options)
        assert _rows(loaded) == expected, source
        assert len(set(loaded["key"])) == len(SHARED) and report.kept == len(SHARED) and not report.skipped
        if source == str(llava_json):
            assert sorted(loaded["key"]) == [f"llava-{i}" for i in range(len(SHARED))]
            assert report.repaired == {conv.PLACEHOLDER_ADDED: 1}
            assert {image.mode for row in loaded for image in row["images"]} == {"RGB"}


def test_placeholders_inside_a_turn_and_a_system_turn(image_dir: Path, tmp_path: Path) -> None:
    question = "Is the first <image> redder than the second <image>?"
    llava = {"id": "mid", "image": ["red.png", "blue.png"], "conversations": [
        {"from": "system", "value": "Answer briefly."}, {"from": "human", "value": question},
        {"from": "gpt", "value": "Yes."}]}
    parts = [{"type": "text", "text": "Is the first "}, {"type": "image", "text": None},
             {"type": "text", "text": " redder than the second "}, {"type": "image", "text": None},
             {"type": "text", "text": "?"}]
    messages = {"messages": [[{"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
                              {"role": "user", "content": parts},
                              {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]}]],
                "images": [[_image_value(image_dir, "red.png"), _image_value(image_dir, "blue.png")]]}
    part = {"type": Value("string"), "text": Value("string")}
    features = Features({"messages": List({"role": Value("string"), "content": List(part)}),
                         "images": List(ImageFeature())})
    Dataset.from_dict(messages, features=features).save_to_disk(str(tmp_path / "messages"))
    from_llava = load_conversations(str(_write_jsonl(tmp_path / "mid.jsonl", [llava])), image_folder=str(image_dir),
                                    cache_dir=str(tmp_path / "cache"))
    from_messages = load_conversations(str(tmp_path / "messages"))
    assert _rows(from_llava) == _rows(from_messages)
    assert from_llava[0]["turns"] == [{"role": "system", "text": "Answer briefly."},
                                      {"role": "user", "text": question}, {"role": "assistant", "text": "Yes."}]


def _vqa(image_dir: Path, columns: dict[str, list], answer_feature) -> Dataset:
    images = [_image_value(image_dir, "red.png")] * (len(next(iter(columns.values()))) - 1) + [None]
    features = {"image": ImageFeature(), "question": Value("string"), "answers": answer_feature}
    return Dataset.from_dict({"image": images, **columns}, features=Features(features))


def test_vqa_columns(image_dir: Path, tmp_path: Path) -> None:
    ten = ["red", "crimson", "red", "maroon", "red", "crimson", "crimson", "red", "pink", "scarlet"]
    tie = ["blue", "navy", "navy", "blue"]
    questions = ["What colour?", "Which blue?", "No picture?"]
    plain = _vqa(image_dir, {"question": questions, "answers": [ten, tie, ["x"]]}, List(Value("string")))
    plain.save_to_disk(str(tmp_path / "plain"))
    report = SkipReport()
    rows = load_conversations(str(tmp_path / "plain"), report=report)
    assert [row["turns"] for row in rows] == [
        [{"role": "user", "text": PH + "What colour?"}, {"role": "assistant", "text": "red"}],
        [{"role": "user", "text": PH + "Which blue?"}, {"role": "assistant", "text": "blue"}],
    ]
    assert report.skipped == {IMAGE_MISSING: 1}
    dicts = [[{"answer": a, "answer_confidence": "yes"} for a in answers] for answers in (ten, tie, ["x"])]
    answer_struct = List({"answer": Value("string"), "answer_confidence": Value("string")})
    _vqa(image_dir, {"question": questions, "answers": dicts}, answer_struct).save_to_disk(str(tmp_path / "vqav2"))
    assert [row["turns"][1]["text"] for row in load_conversations(str(tmp_path / "vqav2"))] == ["red", "blue"]
    single = Dataset.from_dict({"img": [_image_value(image_dir, "blue.png")], "q": ["Colour?"], "a": ["blue"]},
                               features=Features({"img": ImageFeature(), "q": Value("string"), "a": Value("string")}))
    single.save_to_disk(str(tmp_path / "single"))
    row = load_conversations(str(tmp_path / "single"), question_column="q", answer_column="a")[0]
    assert row["turns"][0]["text"] == PH + "Colour?" and row["turns"][1]["text"] == "blue"
    with pytest.raises(UserError, match="question column 'qq' not found.*did you mean q\\?.*columns are: img, q, a"):
        load_conversations(str(tmp_path / "single"), question_column="qq", answer_column="a")
    renamed = single.rename_column("a", "answer").rename_column("q", "question")
    renamed.save_to_disk(str(tmp_path / "answer"))
    assert load_conversations(str(tmp_path / "answer"))[0]["turns"][1]["text"] == "blue"
    assert most_frequent_answer(["b", "a", "a", "b"]) == "b"


def test_every_skip_reason_is_counted(image_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (image_dir / "garbage.jpg").write_bytes(b"this is not an image")

    def record(image, *turns: tuple[str, str], ident: str | None = None) -> dict:
        out = {"conversations": [{"from": who, "value": text} for who, text in turns]}
        return out | ({"image": image} if image is not None else {}) | ({"id": ident} if ident else {})

    ask = ("human", "<image>\nWhat is it?")
    good = [record("red.png", ask, ("gpt", "A square."), ident="dup"),
            record(None, ("human", "Hi."), ("gpt", "Hello."), ident="dup")]
    bad = {
        conv.IMAGE_FILE_MISSING: [record("gone.png", ask, ("gpt", "?")), record(["gone.png"], ask, ("gpt", "?"))],
        IMAGE_UNDECODABLE: [record("garbage.jpg", ask, ("gpt", "?"))],
        conv.PLACEHOLDERS_MISMATCH: [record("red.png", ("human", "<image> and <image>"), ("gpt", "?"))],
        conv.EMPTY_TURN: [record(None, ("human", "Hi."), ("gpt", "  \n"))],
        conv.TURN_ORDER: [record(None, ("gpt", "Hello."), ("human", "Hi.")), record(None, ("human", "Hi."))],
        conv.TOO_MANY_IMAGES: [record(["red.png"] * 3, ("human", PH * 3), ("gpt", "Three."))],
        conv.PLACEHOLDER_OUTSIDE_USER_TURN: [record(None, ("human", "Hi."), ("gpt", "See <image>"))],
        conv.ROLE_UNKNOWN: [record(None, ("human", "Hi."), ("bot", "Hello."))],
        conv.CONVERSATION_MALFORMED: [{"conversations": "Hi."}, ["not", "a", "record"]],
        RECORD_NOT_JSON: ['{"id": "cut short", "conversa'],
    }
    records = good[:1] + [r for rs in bad.values() for r in rs] + good[1:]
    path = _write_jsonl(tmp_path / "bad.jsonl", records)
    for _ in range(2):  # the second load answers from the cache, and counts the same
        report = SkipReport()
        with caplog.at_level(logging.WARNING, logger="data.conversation_loading"):
            caplog.clear()
            loaded = load_conversations(str(path), image_folder=str(image_dir), max_images_per_sample=2,
                                        cache_dir=str(tmp_path / "cache"), report=report)
        assert report.skipped == {reason: len(rs) for reason, rs in bad.items()}
        assert report.kept == 2 and sorted(loaded["key"]) == ["dup", f"dup-{len(records) - 1}"]
        firsts = [m for m in caplog.messages if ": skipping " in m]
        assert sorted(m.rsplit(": ", 1)[1].split(" (later")[0] for m in firsts) == sorted(bad)


def test_finevision_ratings_drop_turns(image_dir: Path, tmp_path: Path) -> None:
    rows = [(["red.png"], [("One?", "1"), ("Two?", "2"), ("Three?", "3")]),
            (["blue.png"], [("Bad?", "bad"), ("Worse?", "worse")]),
            (["green.jpg"], [("Dropped?", "yes"), ("Kept?", "yes")])]
    finevision = _cauldron(image_dir, rows, relevance_ratings=[[5, 2, 4], [1, 1], [1, 5]],
                           formatting_ratings=[[5, 5, 1], [5, 5], [5, 5]])
    finevision.save_to_disk(str(tmp_path / "finevision"))
    report = SkipReport()
    loaded = load_conversations(str(tmp_path / "finevision"), min_ratings={"relevance": 3, "formatting_ratings": 2},
                                report=report)
    assert [row["turns"] for row in loaded] == [
        [{"role": "user", "text": PH + "One?"}, {"role": "assistant", "text": "1"}],
        [{"role": "user", "text": PH + "Kept?"}, {"role": "assistant", "text": "yes"}],
    ]
    assert report.skipped == {conv.NO_TURNS_AFTER_RATINGS: 1}
    assert report.repaired == {conv.TURNS_DROPPED_BY_RATINGS: 2}
    with pytest.raises(UserError, match=r"'relevanse'.*did you mean relevance\?.*ratings are: relevance, formatting"):
        load_conversations(str(tmp_path / "finevision"), min_ratings={"relevanse": 3})


def test_sources_that_fit_no_format_are_one_line_errors(image_dir: Path, tmp_path: Path) -> None:
    odd = _write_jsonl(tmp_path / "odd.jsonl", [{"id": 1, "conversation": [], "picture": "red.png"}])
    with pytest.raises(UserError, match=r"fields are id, conversation \(did you mean conversations\?\), picture"):
        load_conversations(str(odd))
    assert detect_format(["messages", "images"]) == "messages" and detect_format(["question", "answer"]) == "vqa"
    vqa = _write_jsonl(tmp_path / "vqa.jsonl", [{"image": "red.png", "question": "Colour?", "answer": "red"}])
    with pytest.raises(UserError, match="is not llava data: it has no 'conversations' field"):
        load_conversations(str(vqa), format="llava", image_folder=str(image_dir))
    with pytest.raises(UserError, match="relative paths .*--image_folder"):
        load_conversations(str(vqa))
    with pytest.raises(UserError, match="unknown conversation format 'lava' \\(did you mean llava\\?\\)"):
        load_conversations(str(vqa), format="lava")
    assert load_conversations(str(vqa), image_folder=str(image_dir), cache_dir=str(tmp_path / "c"))[0]["key"] == "0"
