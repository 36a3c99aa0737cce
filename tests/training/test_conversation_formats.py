"""Stage-2 data of every format trains the same, and every image's visual tokens land at its own placeholder.

The same conversations written as today's shapes shards (caption + question-answer pairs), LLaVA JSON with an image
folder, the Cauldron's images/texts and TRL's messages/images give identical batches through `ConversationCollator`
and identical losses over a few optimizer steps. Batches mixing multi-image, one-image and text-only rows place each
image's visual tokens at its placeholder, run the vision encoder on exactly the batch's images (never for text-only
batches), and label the same tokens as the rows would alone.
"""

from __future__ import annotations

import pytest
import torch

from data.conversation_loading import load_conversations
from data.conversations import IMAGE_PLACEHOLDER
from data.loading import load_image_text_dataset
from data.synthetic import generate_dataset
from tests.conftest import tiny_vlm_and_processor
from tests.training.conversation_files import exchanges, write_cauldron, write_llava, write_messages
from training.conversation_collator import ConversationCollator

PH = IMAGE_PLACEHOLDER
NUM_SHARD_ROWS = 4
SEED = 7  # the collator's seed: which instruction and question-answer pairs each sample's conversation draws
QA_TURNS = 2
MAX_LENGTH = 512
STEPS = 3
BATCH_SIZE = 2
# The order each format's file lists the conversations in (positions in shard order): loading keeps a file's order,
# and the keys, not the positions, say which conversation a row is.
WRITE_ORDERS = {"llava": [3, 1, 0, 2], "cauldron": [2, 0, 3, 1], "messages": [1, 3, 2, 0]}


# ------------------------------------------------------------------------------------------------------------------
# The same conversations in four formats
# ------------------------------------------------------------------------------------------------------------------


def collator(processor, **kwargs) -> ConversationCollator:
    return ConversationCollator(processor, max_length=MAX_LENGTH, qa_turns=QA_TURNS, seed=SEED, **kwargs)


@pytest.fixture(scope="module")
def processor():
    return tiny_vlm_and_processor()[1]


@pytest.fixture(scope="module")
def formats(tmp_path_factory, processor) -> dict[str, list[dict]]:
    """{format: its rows in shard order}: the shard rows themselves (caption + qa), and the conversations the collator
    draws from them, written as LLaVA, Cauldron and messages data and loaded back with `load_conversations`."""
    folder = tmp_path_factory.mktemp("formats")
    generate_dataset(folder / "shapes", {"train": NUM_SHARD_ROWS}, seed=3, image_size=32,
                     samples_per_shard=NUM_SHARD_ROWS, num_proc=1)
    shards = load_image_text_dataset(str(folder / "shapes"), split="train", cache_dir=str(folder / "cache"))
    shard_rows = [shards[i] for i in range(len(shards))]
    keys = [row["key"] for row in shard_rows]
    assert len(set(keys)) == NUM_SHARD_ROWS and all(row["qa"] for row in shard_rows)
    drawn = collator(processor).caption_qa
    conversations = [drawn(row) for row in shard_rows]
    assert conversations == [drawn(row) for row in shard_rows], "a sample's conversation depends on its key only"
    assert all(len(exchanges(c)) == 1 + QA_TURNS for c in conversations)

    def written(name: str) -> list[dict]:
        return [conversations[i] for i in WRITE_ORDERS[name]]

    llava, image_folder = write_llava(folder, written("llava"))
    sources = {
        "llava": load_conversations(str(llava), image_folder=str(image_folder), cache_dir=str(folder / "cache")),
        "cauldron": load_conversations(str(write_cauldron(folder, written("cauldron")))),
        "messages": load_conversations(str(write_messages(folder, written("messages")))),
    }
    rows = {"shards": shard_rows}
    for name, loaded in sources.items():
        assert loaded["key"] == [keys[i] for i in WRITE_ORDERS[name]], f"{name}: rows not in the file's order"
        by_key = {row["key"]: row for row in loaded}
        rows[name] = [by_key[key] for key in keys]
        for row, conversation in zip(rows[name], conversations):
            assert row["turns"] == conversation["turns"], name
    return rows


def batches(rows: list[dict], make: ConversationCollator) -> list[dict[str, torch.Tensor]]:
    return [make(rows[start:start + BATCH_SIZE]) for start in range(0, len(rows), BATCH_SIZE)]


def train_losses(processor, rows: list[dict]) -> list[float]:
    """Losses of `STEPS` AdamW steps of a freshly built (so identically initialised) tiny VLM on `rows`."""
    model = tiny_vlm_and_processor()[0]
    model.train()
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    inputs = batches(rows, collator(processor))
    losses = []
    for step in range(STEPS):
        loss = model(**inputs[step % len(inputs)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_every_format_gives_the_same_batches_and_losses(formats, processor):
    expected = batches(formats["shards"], collator(processor))
    assert all(batch["pixel_values"].shape[0] == BATCH_SIZE for batch in expected)
    for name, rows in formats.items():
        got_batches = batches(rows, collator(processor))
        assert len(got_batches) == len(expected), name
        for got, want in zip(got_batches, expected):
            assert got.keys() == want.keys(), name
            for field in want:
                assert torch.equal(got[field], want[field]), f"{name}: {field} differs from the shards'"
    losses = {name: train_losses(processor, rows) for name, rows in formats.items()}
    assert all(torch.isfinite(torch.tensor(values)).all() for values in losses.values())
    assert len(set(losses["shards"])) == STEPS, f"the steps changed nothing: {losses['shards']}"
    for name, values in losses.items():
        assert values == losses["shards"], f"{name}: losses {values} != the shards' {losses['shards']}"


# ------------------------------------------------------------------------------------------------------------------
# Multi-image, one-image and text-only rows in one batch
# ------------------------------------------------------------------------------------------------------------------

# Text before, between and after the two images; the tiny tokenizer knows these words.
TWO_IMAGES = "describe the image.<image>and<image>how many shapes are there?"


def two_images(images) -> dict:
    return {"key": "two", "images": list(images),
            "turns": [{"role": "user", "text": TWO_IMAGES}, {"role": "assistant", "text": "two"}]}


def text_only() -> dict:
    return {"key": "text", "images": [], "turns": [
        {"role": "user", "text": "is there a triangle?"}, {"role": "assistant", "text": "no"},
        {"role": "user", "text": "where is the square?"}, {"role": "assistant", "text": "bottom right"}]}


def one_image(image) -> dict:
    return {"key": "one", "images": [image], "turns": [
        {"role": "user", "text": "<image>what color is the circle?"}, {"role": "assistant", "text": "red"}]}


@pytest.fixture(scope="module")
def model():
    model = tiny_vlm_and_processor()[0]
    model.eval()
    return model


class LanguageModelInputs:
    """Captures the `inputs_embeds` the language model receives (the text embeddings with the visual tokens
    written in)."""

    def __init__(self, model):
        self.seen: list[torch.Tensor] = []
        self.handle = model.model.language_model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.seen.append(kwargs["inputs_embeds"].detach().clone())

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.handle.remove()


class VisionCalls:
    """Counts the vision encoder's forwards and the images each one sees."""

    def __init__(self, model):
        self.images: list[int] = []
        self.handle = model.model.qformer.vision_model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        pixel_values = kwargs["pixel_values"] if "pixel_values" in kwargs else args[0]
        self.images.append(pixel_values.shape[0])

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.handle.remove()


def unlabelled(batch: dict) -> dict:
    """The batch without labels: the model then gives logits at every position, not only the labelled ones."""
    return {name: value for name, value in batch.items() if name != "labels"}


def image_positions(batch: dict, processor, row: int) -> torch.Tensor:
    return (batch["input_ids"][row] == processor.image_token_id).nonzero().squeeze(1)


@torch.no_grad()
def test_swapping_two_images_swaps_their_visual_tokens(model, processor, shape_images):
    make = collator(processor)
    before, after = make([two_images(shape_images[:2])]), make([two_images(shape_images[1::-1])])
    assert torch.equal(before["input_ids"], after["input_ids"]) and torch.equal(before["labels"], after["labels"])
    assert torch.equal(before["pixel_values"][[1, 0]], after["pixel_values"])
    queries = processor.num_query_tokens
    positions = image_positions(before, processor, 0)
    assert len(positions) == 2 * queries
    first, second = positions[:queries], positions[queries:]
    # Each placeholder's image tokens are consecutive, with text between the two images and before the first.
    assert torch.equal(first, torch.arange(first[0], first[0] + queries))
    assert torch.equal(second, torch.arange(second[0], second[0] + queries)) and second[0] > first[-1] + 1
    with LanguageModelInputs(model) as captured:
        out_before, out_after = model(**unlabelled(before)), model(**unlabelled(after))
    embeds_before, embeds_after = captured.seen
    features = model.model.get_image_features(before["pixel_values"])  # (2 images, queries, hidden)
    # The visual tokens are the adapter's outputs, in placeholder order; swapping the images swaps them.
    torch.testing.assert_close(embeds_before[0, first], features[0])
    torch.testing.assert_close(embeds_before[0, second], features[1])
    torch.testing.assert_close(embeds_after[0, first], embeds_before[0, second])
    torch.testing.assert_close(embeds_after[0, second], embeds_before[0, first])
    assert not torch.allclose(embeds_before[0, first], embeds_before[0, second])
    # Text tokens are the same embeddings; before the first image nothing the model computes can change (causal).
    text = before["input_ids"][0] != processor.image_token_id
    assert torch.equal(embeds_before[0, text], embeds_after[0, text])
    start = int(first[0])
    torch.testing.assert_close(out_before.logits[0, :start], out_after.logits[0, :start])
    # From the images on, the logits change: at the text between them and after the second, the answer included.
    between = torch.arange(first[-1] + 1, second[0])
    after_images = torch.arange(second[-1] + 1, before["input_ids"].shape[1])
    for span in (between, after_images):
        assert (out_before.logits[0, span] - out_after.logits[0, span]).abs().amax(dim=-1).gt(1e-4).all()


@torch.no_grad()
def test_a_mixed_batch_places_each_image_in_its_own_row(model, processor, shape_images):
    rows = [text_only(), two_images(shape_images[:2]), one_image(shape_images[2])]
    make = collator(processor)
    batch = make(rows)
    assert batch["pixel_values"].shape[0] == 3
    queries = processor.num_query_tokens
    with LanguageModelInputs(model) as captured:
        together = model(**unlabelled(batch))
    (embeds,) = captured.seen
    features = model.model.get_image_features(batch["pixel_values"])
    # The text-only row holds no image token: its inputs are its token embeddings, nothing written in.
    assert len(image_positions(batch, processor, 0)) == 0
    torch.testing.assert_close(embeds[0], model.get_input_embeddings()(batch["input_ids"][0]))
    # Images are numbered over the batch, row by row: the two-image row gets images 0 and 1, the next row image 2.
    two, one = image_positions(batch, processor, 1), image_positions(batch, processor, 2)
    torch.testing.assert_close(embeds[1, two].reshape(2, queries, -1), features[:2])
    torch.testing.assert_close(embeds[2, one], features[2])
    # Each row computes what it computes alone (right padding: no real token sees a pad).
    for i, row in enumerate(rows):
        alone = make([row])
        length = alone["input_ids"].shape[1]
        assert torch.equal(batch["input_ids"][i, :length], alone["input_ids"][0])
        assert bool((batch["attention_mask"][i, length:] == 0).all())
        alone_logits = model(**unlabelled(alone)).logits[0]
        torch.testing.assert_close(together.logits[i, :length], alone_logits, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------------------------
# Text-only rows cost no vision forward
# ------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_text_only_rows_cost_no_vision_forward(model, processor, shape_images):
    make = collator(processor)
    text_batch = make([text_only(), {**text_only(), "key": "text-2"}])
    assert "pixel_values" not in text_batch
    with VisionCalls(model) as vision:
        out = model(**text_batch)
    assert vision.images == [] and out.image_features is None and torch.isfinite(out.loss)
    mixed = make([text_only(), two_images(shape_images[:2]), text_only(), one_image(shape_images[3])])
    with VisionCalls(model) as vision:
        out = model(**mixed)
    # One encoder pass over exactly the batch's three images, none for the text-only rows.
    assert vision.images == [3] and mixed["pixel_values"].shape[0] == 3 and out.image_features.shape[0] == 3


# ------------------------------------------------------------------------------------------------------------------
# A mixed batch trains, and labels the tokens the rows would alone
# ------------------------------------------------------------------------------------------------------------------


def test_a_mixed_batch_trains_and_its_loss_is_the_mean_over_its_rows_tokens(processor, shape_images, formats):
    rows = [two_images(shape_images[:2]), text_only(), formats["shards"][0], one_image(shape_images[3])]
    make = collator(processor)
    batch = make(rows)
    assert batch["pixel_values"].shape[0] == 4
    model = tiny_vlm_and_processor()[0]
    model.train()
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    for name, parameter in model.model.adapter.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, f"no gradient reaches the adapter's {name}"
    vision_grads = [p.grad for p in model.model.qformer.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in vision_grads), "no gradient reaches the Q-Former"

    # The batch loss is the mean over every labelled token of the batch of the loss each row gives them alone.
    model.eval()
    with torch.no_grad():
        mean = model(**batch).loss
        total, tokens = torch.zeros(()), 0
        for i, row in enumerate(rows):
            alone = make([row])
            length = alone["labels"].shape[1]
            assert torch.equal(batch["labels"][i, :length], alone["labels"][0]), f"row {i}: other tokens labelled"
            assert bool((batch["labels"][i, length:] == -100).all())
            count = int((alone["labels"][0, 1:] != -100).sum())
            assert count > 0
            total += model(**alone, num_items_in_batch=1).loss  # the row's summed token losses
            tokens += count
    assert tokens == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(mean, total / tokens, atol=1e-5, rtol=1e-5)
