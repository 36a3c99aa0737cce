"""The same one-image conversations written in the stage-2 data formats people have: LLaVA JSON + image folder,
the Cauldron's images/texts (parquet), TRL's messages/images (save_to_disk) and VQA columns (parquet)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from datasets import Dataset, Features, List, Value
from datasets import Image as ImageFeature

from data.conversations import IMAGE_PLACEHOLDER as PH


def exchanges(conversation: dict) -> list[tuple[str, str]]:
    """(question, answer) pairs of a shard-derived conversation, the image placeholder taken off the first question
    (every format below says where the one image goes in its own way)."""
    turns = conversation["turns"]
    assert [turn["role"] for turn in turns] == ["user", "assistant"] * (len(turns) // 2)
    assert turns[0]["text"].startswith(PH) and PH not in "".join(turn["text"] for turn in turns)[len(PH):]
    pairs = [(user["text"], assistant["text"]) for user, assistant in zip(turns[::2], turns[1::2])]
    return [(pairs[0][0][len(PH):], pairs[0][1]), *pairs[1:]]


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # lossless: the decoded shard image, pixel for pixel
    return buffer.getvalue()


def write_llava(folder: Path, conversations: list[dict]) -> tuple[Path, Path]:
    """LLaVA's JSON list (`id`, `image` relative to an image folder, human/gpt turns, "<image>\\n" opening the first
    question) and the image folder."""
    images = folder / "llava_images"
    images.mkdir()
    records = []
    for conversation in conversations:
        name = f"{conversation['key']}.png"
        (images / name).write_bytes(png_bytes(conversation["images"][0]))
        turns = []
        for i, (question, answer) in enumerate(exchanges(conversation)):
            turns += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + question},
                      {"from": "gpt", "value": answer}]
        records.append({"id": conversation["key"], "image": name, "conversations": turns})
    path = folder / "llava.json"
    path.write_text(json.dumps(records, indent=1))
    return path, images


def write_cauldron(folder: Path, conversations: list[dict]) -> Path:
    """The Cauldron's layout (`images` list, `texts` of {user, assistant}), with an `id` column, as parquet."""
    features = Features({"id": Value("string"), "images": List(ImageFeature()),
                         "texts": List({"user": Value("string"), "assistant": Value("string")})})
    data = {
        "id": [c["key"] for c in conversations],
        "images": [[{"bytes": png_bytes(c["images"][0]), "path": None}] for c in conversations],
        "texts": [[{"user": q, "assistant": a} for q, a in exchanges(c)] for c in conversations],
    }
    path = folder / "cauldron.parquet"
    Dataset.from_dict(data, features=features).to_parquet(str(path))
    return path


def write_messages(folder: Path, conversations: list[dict]) -> Path:
    """TRL's layout (`messages` of role/content with typed parts, `images`), with an `id` column, saved to disk."""
    part = {"type": Value("string"), "text": Value("string")}
    features = Features({"id": Value("string"), "images": List(ImageFeature()),
                         "messages": List({"role": Value("string"), "content": List(part)})})
    data = {"id": [], "images": [], "messages": []}
    for conversation in conversations:
        messages = []
        for i, (question, answer) in enumerate(exchanges(conversation)):
            image = [{"type": "image", "text": None}] if i == 0 else []
            messages += [{"role": "user", "content": [*image, {"type": "text", "text": question}]},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        data["id"].append(conversation["key"])
        data["images"].append([{"bytes": png_bytes(conversation["images"][0]), "path": None}])
        data["messages"].append(messages)
    path = folder / "messages"
    Dataset.from_dict(data, features=features).save_to_disk(str(path))
    return path


def write_vqa(folder: Path, conversations: list[dict]) -> Path:
    """VQAv2's columns (`question`, `answers`: ten human answers, `image`), one row per first exchange; the answer
    given most often is the conversation's answer, so a reader that trains on the most frequent one agrees."""
    features = Features({"question_id": Value("string"), "image": ImageFeature(), "question": Value("string"),
                         "answers": List(Value("string"))})
    data = {"question_id": [], "image": [], "question": [], "answers": []}
    for conversation in conversations:
        question, answer = exchanges(conversation)[0]
        data["question_id"].append(conversation["key"])
        data["image"].append({"bytes": png_bytes(conversation["images"][0]), "path": None})
        data["question"].append(question)
        data["answers"].append([answer] * 6 + ["no"] * 4)
    path = folder / "vqa.parquet"
    Dataset.from_dict(data, features=features).to_parquet(str(path))
    return path
