"""TRL's `SFTTrainer` trains the VLM as it is: its dataset format in, its collator, its fused LM head, no project code.

A user's path, end to end: a `datasets.Dataset` in TRL's conversational vision format (`messages` with typed content
parts + `images`), `SFTTrainer(model, args, train_dataset, processing_class=processor)` with `assistant_only_loss`.
TRL renders the chat template with `return_assistant_tokens_mask` (our template wraps each answer and its `<|im_end|>`
in `{% generation %}`), lets the processor expand each image into `num_query_tokens` image tokens and stack every
image of the batch as `pixel_values`. Its loss bypasses our `forward`: `SFTTrainer` patches the model's `forward`
(`trl.trainer.utils.add_fused_lm_head`) to run `model.base_model` (`model.model`, by `base_model_prefix`) and score
its `last_hidden_state` through `get_output_embeddings()` in chunks. The second test checks that the loss it optimises
is our own `ConversationCollator`'s loss on the same conversations, token for token.
"""

import copy

import pytest
import torch
from datasets import Dataset, Features, Image, List, Value
from PIL import Image as PILImage
from PIL import ImageDraw
from transformers import ProcessorMixin
from trl import SFTConfig, SFTTrainer

from data.conversations import IMAGE_PLACEHOLDER
from tests.conftest import tiny_vlm_and_processor
from tests.helpers import TINY_CORPUS
from training.conversation_collator import ConversationCollator

FEATURES = Features({
    "messages": List({"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})}),
    "images": List(Image()),
})
COLOURS = [(220, 30, 30), (30, 160, 40), (40, 60, 220), (230, 200, 20), (150, 40, 170), (240, 140, 20)]


def shape_image(i: int) -> PILImage.Image:
    """A 32x32 RGB picture: a coloured circle whose colour and position depend on `i`."""
    img = PILImage.new("RGB", (32, 32), (245, 245, 240))
    x = 4 + (i % 4) * 3
    ImageDraw.Draw(img).ellipse([x, 4 + i % 3, x + 16, 20 + i % 3], fill=COLOURS[i % len(COLOURS)])
    return img


def text(s: str) -> dict:
    return {"type": "text", "text": s}


IMAGE = {"type": "image"}
QUESTIONS, ANSWERS = TINY_CORPUS[3:8], TINY_CORPUS[8:]
CAPTIONS = TINY_CORPUS[:3]


def trl_rows(n: int = 24) -> list[dict]:
    """`n` conversations in TRL's format, cycling through six kinds: one image then a question; text only; two images;
    two turns about one image; an image in the second user turn; a system message then a two-image question."""
    rows = []
    for i in range(n):
        q, a = QUESTIONS[i % len(QUESTIONS)], ANSWERS[i % len(ANSWERS)]
        q2, a2 = QUESTIONS[(i + 2) % len(QUESTIONS)], ANSWERS[(i + 5) % len(ANSWERS)]
        caption = CAPTIONS[i % len(CAPTIONS)]
        kind = i % 6
        if kind == 0:
            messages, images = [("user", [IMAGE, text(q)]), ("assistant", [text(a)])], [i]
        elif kind == 1:
            messages, images = [("user", [text(q)]), ("assistant", [text(a)])], []
        elif kind == 2:
            messages, images = [("user", [IMAGE, IMAGE, text(q)]), ("assistant", [text(caption)])], [i, i + 1]
        elif kind == 3:
            messages = [("user", [IMAGE, text("describe the image.")]), ("assistant", [text(caption)]),
                        ("user", [text(q)]), ("assistant", [text(a)])]
            images = [i]
        elif kind == 4:
            messages = [("user", [text(q)]), ("assistant", [text(a)]),
                        ("user", [text("describe the image."), IMAGE]), ("assistant", [text(caption)])]
            images = [i]
        else:
            messages = [("system", [text("describe the image.")]), ("user", [IMAGE, text(q2), IMAGE]),
                        ("assistant", [text(a2)])]
            images = [i, i + 3]
        rows.append({"messages": [{"role": role, "content": content} for role, content in messages],
                     "images": [shape_image(j) for j in images]})
    return rows


def as_schema_row(key: str, row: dict) -> dict:
    """A TRL row as a row of the project's conversation schema: each image part becomes `IMAGE_PLACEHOLDER` in its
    turn's text (after `datasets` a text-less part carries `text: None`)."""
    turns = [{"role": m["role"],
              "text": "".join(IMAGE_PLACEHOLDER if part["type"] == "image" else part["text"] for part in m["content"])}
             for m in row["messages"]]
    return {"key": key, "images": list(row["images"]), "turns": turns}


@pytest.fixture(scope="module")
def tiny():
    return tiny_vlm_and_processor()


@pytest.fixture(scope="module")
def dataset():
    return Dataset.from_list(trl_rows(), features=FEATURES)


def sft_config(tmp_path, **kwargs) -> SFTConfig:
    # `SFTConfig`'s own defaults otherwise: max_length 1024 (no conversation here comes near it), gradient
    # checkpointing on, bf16 mixed precision on (CPU autocast), remove_unused_columns keeps TRL's vision columns.
    # A vision dataset needs no dataset_kwargs: TRL skips dataset preparation and tokenizes in its collator.
    defaults = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, use_cpu=True, report_to=[],
                    assistant_only_loss=True, logging_steps=1, save_strategy="no", seed=0, dataloader_num_workers=0)
    return SFTConfig(**{**defaults, **kwargs})


@pytest.mark.slow  # trains through TRL's SFTTrainer: the slow tier
def test_sft_trainer_trains_the_vlm(tiny, dataset, tmp_path):
    model, processor = copy.deepcopy(tiny[0]), tiny[1]
    trainer = SFTTrainer(model, args=sft_config(tmp_path, max_steps=20, learning_rate=3e-3, warmup_steps=0),
                         train_dataset=dataset, processing_class=processor)
    assert isinstance(trainer.processing_class, ProcessorMixin)
    trainer.train()

    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 20
    first, last = losses[0], sum(losses[-3:]) / 3
    print(f"TRL SFT losses: first {first:.3f}, mean of the last three {last:.3f}: {[round(x, 3) for x in losses]}")
    assert last < 0.6 * first, losses
    accuracy = [log["mean_token_accuracy"] for log in trainer.state.log_history if "mean_token_accuracy" in log]
    assert accuracy[-1] > accuracy[0]


def test_trl_batch_loss_equals_conversation_collator_loss(tiny, dataset, tmp_path):
    model, processor = copy.deepcopy(tiny[0]), tiny[1]
    trainer = SFTTrainer(model, args=sft_config(tmp_path, max_steps=1), train_dataset=dataset,
                         processing_class=processor)
    # Our template already marks the answers with {% generation %}: TRL keeps it rather than swapping in its own.
    assert trainer.chat_template is None and trainer.data_collator.assistant_only_loss
    model.eval()
    rows = [dataset[i] for i in range(12)]  # every kind of conversation, twice
    trl_batch = trainer.data_collator(copy.deepcopy(rows))
    ours = ConversationCollator(processor, max_length=4096)([as_schema_row(str(i), row) for i, row in enumerate(rows)])

    # The same tokens, the same labelled positions (each answer and its <|im_end|>), the same images in the same order.
    for name in ("input_ids", "attention_mask", "labels"):
        torch.testing.assert_close(trl_batch[name], ours[name], rtol=0, atol=0, msg=name)
    labelled = trl_batch["input_ids"][3][trl_batch["labels"][3] != -100]
    assert processor.tokenizer.decode(labelled) == "".join(
        m["content"][0]["text"] + "<|im_end|>" for m in rows[3]["messages"] if m["role"] == "assistant")
    num_images = sum(len(row["images"]) for row in rows)
    assert (trl_batch["input_ids"] == processor.image_token_id).sum() == num_images * processor.num_query_tokens
    assert len(trl_batch["pixel_values"]) == num_images
    torch.testing.assert_close(trl_batch["pixel_values"], ours["pixel_values"])

    with torch.no_grad():
        ours_loss = model(**ours).loss
        trl_model_loss = model(**trl_batch).loss  # the model's own head and loss on TRL's batch
        fused = trainer.compute_loss(model, dict(trl_batch))  # what TRL optimises: its fused, chunked LM head
    torch.testing.assert_close(trl_model_loss, ours_loss)
    torch.testing.assert_close(fused, ours_loss)

    # A batch of text-only rows: TRL passes images=None, and neither side builds pixel_values.
    text_rows = [row for row in rows if not row["images"]]
    trl_text = trainer.data_collator(copy.deepcopy(text_rows))
    ours_text = ConversationCollator(processor, max_length=4096)([as_schema_row("t", row) for row in text_rows])
    assert "pixel_values" not in trl_text and "pixel_values" not in ours_text
    for name in ("input_ids", "attention_mask", "labels"):
        torch.testing.assert_close(trl_text[name], ours_text[name], rtol=0, atol=0, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(trainer.compute_loss(model, dict(trl_text)), model(**ours_text).loss)
