"""Stage-2 labels: on real shapes rows, only the answers (each closed by the end-of-turn token) carry loss."""

from collections import Counter

import pytest
import torch
from datasets import Dataset

from cli import UserError
from data.conversations import IMAGE_PLACEHOLDER
from data.loading import load_image_text_dataset
from data.shapes import COLORS
from modeling.presets import build_vlm
from tests.conftest import tiny_qformer_and_processor
from tests.helpers import TINY_LM
from training.collators import ContrastiveCollator
from training.conversation_collator import ConversationCollator
from training.stage import text_corpus

NUM_ROWS = 6


@pytest.fixture(scope="module")
def rows_and_processor(shapes_data):
    dataset = load_image_text_dataset(str(shapes_data), split="train")
    qformer, qformer_processor = tiny_qformer_and_processor()
    _, processor = build_vlm(qformer, qformer_processor, corpus=text_corpus(dataset), lm=TINY_LM, lm_vocab_size=300)
    return [dataset[i] for i in range(NUM_ROWS)], processor


def labelled_runs(labels: torch.Tensor, input_ids: torch.Tensor) -> list[list[int]]:
    """The token ids of each maximal run of positions whose label is not -100."""
    runs, current = [], []
    for label, token in zip(labels.tolist(), input_ids.tolist()):
        if label == -100:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token, "a labelled position must predict its own input token"
            current.append(token)
    return runs + ([current] if current else [])


@pytest.mark.parametrize("qa_turns", [1, 20])
def test_only_answer_tokens_carry_loss(rows_and_processor, qa_turns):
    rows, processor = rows_and_processor
    end = processor.tokenizer.eos_token
    batch = ConversationCollator(processor, max_length=512, qa_turns=qa_turns)(rows)

    for i, row in enumerate(rows):
        runs = [processor.tokenizer.decode(run) for run in labelled_runs(batch["labels"][i], batch["input_ids"][i])]
        caption, answers = row["caption"] + end, [pair["answer"] + end for pair in row["qa"]]
        # The turns are drawn and ordered per sample (the caption turn may come anywhere): compare as multisets.
        assert len(runs) == 1 + min(qa_turns, len(answers)), f"row {i}: labelled spans {runs}"
        assert caption in runs, f"row {i}: the caption is not a labelled span: {runs}"
        others = list(runs)
        others.remove(caption)
        if qa_turns >= len(answers):
            assert sorted(others) == sorted(answers)
        else:
            assert all(run in answers for run in others), f"row {i}: {others} are not answers of {answers}"

    # Training pads on the right, and padding, like prompts and image tokens, carries no loss.
    mask = batch["attention_mask"]
    assert bool((mask.cummin(dim=1).values == mask).all()), "padding is not on the right"
    assert bool((batch["labels"][mask == 0] == -100).all())
    assert bool((batch["labels"][batch["input_ids"] == processor.image_token_id] == -100).all())


def test_the_same_sample_gets_the_same_conversation_in_any_batch(rows_and_processor):
    """Resumed and multi-process runs see each sample in a different batch; its instruction and turns must not
    depend on that."""
    rows, processor = rows_and_processor
    collator = ConversationCollator(processor, max_length=512, qa_turns=2)
    together = collator(rows)
    alone = collator(rows[3:4])
    length = int(alone["attention_mask"].sum())
    assert torch.equal(together["input_ids"][3, :length], alone["input_ids"][0, :length])
    assert torch.equal(together["labels"][3, :length], alone["labels"][0, :length])


@pytest.mark.parametrize("layout", ["image first", "instruction_aware"])
def test_separate_turns_equal_one_conversation_per_turn(shapes_data, layout):
    """With separate_turns each turn must see the image and its own question only: the shared-prefix batch gives
    every answer token the logits it gets in a conversation of its own (the way evaluation asks), whether all turns
    share one copy of the image or the Q-Former reads each question (a copy in every turn, its visual tokens drawn
    for that question)."""
    dataset = load_image_text_dataset(str(shapes_data), split="train")
    rows = [dataset[i] for i in range(NUM_ROWS)]
    instruction_aware = layout == "instruction_aware"
    qformer, qformer_processor = tiny_qformer_and_processor()
    model, processor = build_vlm(qformer, qformer_processor, corpus=text_corpus(dataset), lm=TINY_LM,
                                 lm_vocab_size=300, instruction_aware_qformer=instruction_aware)
    model.eval()
    collator = ConversationCollator(processor, max_length=1024, qa_turns=20, separate_turns=True,
                                    instruction_aware=instruction_aware)
    shared = collator(rows)
    # A second batch of the same rows is built from the collator's cache of encoded turns: it must not differ.
    again = collator(rows)
    assert all(torch.equal(shared[name], again[name]) for name in shared)
    assert shared["attention_mask"].shape == (len(rows), 1, shared["input_ids"].shape[1], shared["input_ids"].shape[1])
    copies = (shared["input_ids"] == processor.image_token_id).sum(dim=1) // processor.num_query_tokens
    turns_per_row = torch.tensor([1 + len(row["qa"]) for row in rows])
    assert torch.equal(copies, turns_per_row if layout != "image first" else torch.ones_like(copies))
    # Each image is in the batch once; image_index names the image of each copy, row by row.
    assert len(shared["pixel_values"]) == len(rows)
    if layout == "image first":
        assert "image_index" not in shared
    else:
        assert shared["image_index"].tolist() == [i for i, n in enumerate(copies.tolist()) for _ in range(n)]
    assert ("qformer_input_ids" in shared) == instruction_aware
    if instruction_aware:
        asked = processor.qformer_tokenizer.batch_decode(shared["qformer_input_ids"], skip_special_tokens=True)
        questions = [question for row in rows for question, _ in collator.caption_qa.pairs(row)]
        assert asked == processor.qformer_tokenizer.batch_decode(
            processor.qformer_inputs(questions)["qformer_input_ids"], skip_special_tokens=True)
    with torch.no_grad():
        hidden = model(**{**shared, "labels": None}).logits
    alone = ConversationCollator(processor, max_length=1024, qa_turns=0)
    checked = 0
    for i, row in enumerate(rows):
        pairs = collator.caption_qa.pairs(row)
        assert len(pairs) == 1 + len(row["qa"])
        # Each turn after the first starts where the positions fall back to the end of the shared prefix.
        positions = shared["position_ids"][i]
        starts = (positions[1:] < positions[:-1]).nonzero().flatten() + 1
        prefix = int(positions[starts[0]])
        assert processor.tokenizer.decode(shared["input_ids"][i, :prefix]).startswith("<|im_start|>user")
        pixels = processor.image_processor([row["image"]], return_tensors="pt")["pixel_values"]
        for k, (question, answer) in enumerate(pairs):
            turns = [{"role": "user", "text": IMAGE_PLACEHOLDER + question}, {"role": "assistant", "text": answer}]
            text, _ = alone.render(turns)
            assert text.index(processor.image_token) < text.index(question)
            ids = torch.tensor([alone.encode(turns)[0]])
            with torch.no_grad():
                single = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                               **processor.qformer_inputs([question])).logits[0]
            assert torch.equal(shared["input_ids"][i, :prefix], ids[0, :prefix])
            begin = prefix if k == 0 else int(starts[k - 1])
            # The shared sequence leaves out what follows the answer's end token (the template's newline).
            assert processor.tokenizer.decode(ids[0, -1]) == "\n"
            end = begin + len(ids[0]) - prefix - 1
            assert torch.equal(shared["input_ids"][i, begin:end], ids[0, prefix:-1])
            torch.testing.assert_close(hidden[i, begin:end], single[prefix:-1], atol=1e-4, rtol=1e-4)
            checked += 1
    assert checked == sum(1 + len(row["qa"]) for row in rows)
    # Only answers carry loss, and every answer of every turn does.
    answers = [processor.tokenizer.decode(run) for i in range(len(rows))
               for run in labelled_runs(shared["labels"][i], shared["input_ids"][i])]
    end_token = processor.tokenizer.eos_token
    assert sorted(answers) == sorted([r["caption"] + end_token for r in rows]
                                     + [qa["answer"] + end_token for r in rows for qa in r["qa"]])


def test_a_turn_that_does_not_fit_whole_is_left_out(shapes_data):
    """With a copy of the image in every turn (an instruction-aware Q-Former reads each question), a max_length that
    would cut a turn (its image tokens or its answer) leaves the turn out, and the turns after it, rather than
    feeding the model a piece of an image or an answer."""
    dataset = load_image_text_dataset(str(shapes_data), split="train")
    rows = [dataset[i] for i in range(NUM_ROWS)]
    qformer, qformer_processor = tiny_qformer_and_processor()
    _, processor = build_vlm(qformer, qformer_processor, corpus=text_corpus(dataset), lm=TINY_LM, lm_vocab_size=300,
                             instruction_aware_qformer=True)
    settings = {"qa_turns": 20, "separate_turns": True, "instruction_aware": True}
    full = ConversationCollator(processor, max_length=1024, **settings)(rows)
    for max_length in (60, 97, 150):
        batch = ConversationCollator(processor, max_length=max_length, **settings)(rows)
        assert batch["input_ids"].shape[1] <= max_length
        for i in range(len(rows)):
            images = batch["input_ids"][i] == processor.image_token_id
            assert int(images.sum()) % processor.num_query_tokens == 0 and int(images.sum()) > 0
            # What is kept is the start of the whole conversation, token for token.
            kept = int((batch["position_ids"][i] > 0).sum()) + 1
            assert torch.equal(batch["input_ids"][i, :kept], full["input_ids"][i, :kept])


@pytest.mark.parametrize("separate_turns", [False, True])
def test_a_sample_whose_first_answer_does_not_fit_is_left_out_and_counted(rows_and_processor, separate_turns):
    """A caption + question-answer sample whose image and first answer alone pass max_length (an over-long caption)
    is left out of its batch with its image, counted and logged; the other rows are as they would be without it.
    `check_dataset` refuses settings that leave samples out at once."""
    rows, processor = rows_and_processor
    long_row = {**rows[1], "key": "long", "caption": " ".join([rows[1]["caption"]] * 40)}
    make = ConversationCollator(processor, max_length=160, qa_turns=0, separate_turns=separate_turns)
    batch = make([rows[0], long_row, rows[2]])
    expected = ConversationCollator(processor, max_length=160, qa_turns=0, separate_turns=separate_turns)(
        [rows[0], rows[2]])
    assert make.samples_left_out.keys() == {"long"}
    assert batch.keys() == expected.keys()
    for name in expected:
        assert torch.equal(batch[name], expected[name]), name
    with pytest.raises(UserError, match="sample 'long' of the data needs .* tokens .* raise max_length"):
        make.check_dataset(Dataset.from_list([long_row]), "the data")


def test_hard_negatives_cover_every_kind_of_change(shapes_data):
    """The generator lists colour changes first; the collator must still show shape, size and position changes,
    and pick the same ones for a sample wherever it lands."""
    dataset = load_image_text_dataset(str(shapes_data), split="train")
    rows = [dataset[i] for i in range(64)]
    _, qformer_processor = tiny_qformer_and_processor()
    collator = ContrastiveCollator(qformer_processor, max_length=32, hard_negatives=2)
    kinds = Counter()
    for row in rows:
        chosen = collator._negatives_of(row)
        assert len(chosen) == 2 and set(chosen) <= set(row["negative_captions"])
        assert chosen == collator._negatives_of(dict(row))
        changed = {a for a, b in zip(row["caption"].split(), chosen[0].split()) if a != b}
        kinds["colour" if changed <= set(COLORS) else "other"] += 1
    assert kinds["other"] >= 16, kinds
    batch = collator(rows[:4])
    assert batch["negative_input_ids"].shape[0] == 8 and batch["negative_input_ids"].shape[1] <= 32
