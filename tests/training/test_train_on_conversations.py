"""`python -m training.train_vlm` trains from every stage-2 data format: the same conversations as LLaVA JSON + image
folder, the Cauldron's parquet and TRL's messages folder train to the same losses, VQA columns train, and a LLaVA file
with text-only, two-image and bad records trains with each bad record skipped and counted."""

import json
import re
import shutil

import pytest
from transformers import AutoModelForImageTextToText

from data.loading import load_image_text_dataset
from tests.conftest import tiny_qformer_and_processor
from tests.training.conversation_files import write_cauldron, write_llava, write_messages, write_vqa
from tests.training.launch import run, stage2_args
from training.conversation_collator import CaptionQAConversations

NUM_CONVERSATIONS = 24
STEPS = 3


# Slow tier (`make test`, not `make test-fast`): trains through the real script.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sources(shapes_data, tmp_path_factory):
    """{format: (data path, extra flags)} holding the same conversations (those the collator draws from the first
    shapes samples), and a saved tiny Q-Former."""
    folder = tmp_path_factory.mktemp("conversation_sources")
    shards = load_image_text_dataset(str(shapes_data), split="train", cache_dir=str(folder / "cache"))
    conversations = [CaptionQAConversations(qa_turns=1, seed=5)(shards[i]) for i in range(NUM_CONVERSATIONS)]
    llava, images = write_llava(folder, conversations)
    qformer, processor = tiny_qformer_and_processor()
    qformer.save_pretrained(folder / "qformer")
    processor.save_pretrained(folder / "qformer")
    return folder, {
        "llava": (llava, {"image_folder": images}),
        "cauldron": (write_cauldron(folder, conversations), {}),
        "messages": (write_messages(folder, conversations), {}),
        "vqa": (write_vqa(folder, conversations), {}),
    }


def train(folder, name, data, **flags) -> str:
    out = folder / f"vlm_{name}"
    args = stage2_args(data, folder / "qformer", out, max_steps=STEPS, per_device_train_batch_size=4,
                       max_eval_samples=4, separate_turns=False, max_length=256,
                       train_sampling_strategy="group_by_length", eval_strategy="steps", eval_steps=STEPS, **flags)
    output = run("training.train_vlm", args, folder / f"{name}.log")
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert type(model).__name__ == "VLMForConditionalGeneration"
    return output


def logged_losses(output: str) -> list[float]:
    return [float(loss) for loss in re.findall(r"\{'loss': '([0-9.]+)'", output)]


def test_the_same_conversations_in_three_formats_train_to_the_same_losses(sources):
    folder, paths = sources
    losses = {}
    for name in ("llava", "cauldron", "messages"):
        data, flags = paths[name]
        output = train(folder, name, data, **flags)
        losses[name] = logged_losses(output)
        assert "sample captions at step" in output
    assert len(losses["llava"]) == STEPS, losses
    assert losses["cauldron"] == losses["llava"] and losses["messages"] == losses["llava"], losses


def test_vqa_columns_with_answer_lists_train(sources):
    folder, paths = sources
    output = train(folder, "vqa", paths["vqa"][0])
    assert len(logged_losses(output)) == STEPS
    assert f"kept {NUM_CONVERSATIONS} samples, skipped 0" in output


def test_text_only_two_image_and_bad_records_train_and_are_counted(sources):
    folder, paths = sources
    data, flags = paths["llava"]
    records = json.loads(data.read_text())
    first = records[0]["image"]
    shutil.copy(flags["image_folder"] / first, flags["image_folder"] / "copy.png")
    question = {"from": "human", "value": "what color is the circle?"}
    records += [
        {"id": "text-only", "conversations": [question, {"from": "gpt", "value": "red"}]},
        {"id": "two-images", "image": [first, "copy.png"],
         "conversations": [{"from": "human", "value": "<image> <image>\nhow many shapes are there?"},
                           {"from": "gpt", "value": "two"}]},
        {"id": "three-images", "image": [first, first, first],
         "conversations": [{"from": "human", "value": "<image><image><image>"}, {"from": "gpt", "value": "three"}]},
        {"id": "missing-image", "image": "nowhere.png",
         "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "red"}]},
        {"id": "two-placeholders-one-image", "image": first,
         "conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "red"}]},
        {"id": "gpt-first", "conversations": [{"from": "gpt", "value": "red"}, question]},
        {"id": "too-long", "conversations": [question, {"from": "gpt", "value": " ".join(["red green blue"] * 120)}]},
    ]
    messy = folder / "messy.json"
    messy.write_text(json.dumps(records))
    output = train(folder, "messy", messy, max_images_per_sample=2, **flags)
    assert len(logged_losses(output)) == STEPS
    for reason in ("more than max_images_per_sample images (e.g. three-images)",
                   "image file missing (e.g. missing-image)",
                   "placeholders do not match images (e.g. two-placeholders-one-image)",
                   "turn order is not user/assistant (e.g. gpt-first)"):
        assert f"skipped 1 samples: {reason}" in output, reason
    assert f"kept {NUM_CONVERSATIONS + 3} samples, skipped 4" in output
    assert "the training data: skipped 1 of" in output and "(e.g. too-long)" in output
