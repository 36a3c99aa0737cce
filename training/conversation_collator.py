"""Stage-2 batches: conversations (images + user/assistant turns), loss on every assistant turn and nothing else.

Rows are in the conversation schema of `data.conversations` (`images`, `turns` with `IMAGE_PLACEHOLDER` where the
images go), or in the caption + question-answer layout of `data.loading` (the shapes shards, img2dataset
captions), which `CaptionQAConversations` turns into one conversation per sample. A batch holds every image of
its rows as `pixel_values` `(num_images, 3, H, W)`, in placeholder order, so rows may hold several images or none;
a batch without images has no `pixel_values` and costs no vision forward.
"""

import logging
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from cli import UserError
from data.conversations import IMAGE_PLACEHOLDER
from data.hashing import seeded_hash
from eval.generation import CAPTION_PROMPT

from .device_normalize import pixel_batch

logger = logging.getLogger(__name__)

# Varied captioning instructions, so the model learns the task rather than one prompt string; the first is the one
# evaluation asks.
CAPTION_INSTRUCTIONS = (
    CAPTION_PROMPT,
    "What is in this picture?",
    "Write a short caption for this image.",
    "Describe what you see.",
    "Give a one-sentence description of the image.",
    "What does the image show?",
)


@dataclass(frozen=True)
class CaptionQAConversations:
    """A sample of the caption + question-answer layout as one conversation about its image: a captioning turn (an
    instruction drawn per sample, answered with the caption) and up to `qa_turns` question-answer turns, in an order
    drawn per sample; the image goes with the first turn. Every draw is a function of the sample's key and `seed`,
    so resumed and multi-process runs give a sample the same conversation in any batch.

    Args:
        qa_turns: question-answer turns beside the caption (0: captions only).
        with_caption: include the captioning turn.
        seed: varies the draws between runs, never between processes or resumptions.
        instructions: the captioning instructions to draw from.
    """

    qa_turns: int = 3
    with_caption: bool = True
    seed: int = 0
    instructions: Sequence[str] = CAPTION_INSTRUCTIONS

    def pairs(self, row: dict) -> list[tuple[str, str]]:
        """The (question, answer) turns of the sample, in conversation order."""
        rng = random.Random(seeded_hash(row["key"], self.seed, bits=63))
        qa = list(row.get("qa") or [])
        rng.shuffle(qa)
        turns = [(pair["question"], pair["answer"]) for pair in qa[: self.qa_turns]]
        if self.with_caption:
            turns.append((rng.choice(self.instructions), row["caption"]))
        # Any turn may come first, i.e. right after the image: evaluation asks captions and questions that way.
        rng.shuffle(turns)
        if not turns:
            raise ValueError(f"sample {row['key']!r} gives no turn: no caption turn and no question-answer pairs")
        return turns

    def __call__(self, row: dict) -> dict:
        """The sample as a row of the conversation schema."""
        turns = []
        for i, (question, answer) in enumerate(self.pairs(row)):
            turns += [{"role": "user", "text": (IMAGE_PLACEHOLDER if i == 0 else "") + question},
                      {"role": "assistant", "text": answer}]
        return {"key": row["key"], "images": [row["image"]], "turns": turns}


def turn_instructions(turns: Sequence[dict]) -> list[str]:
    """The instruction of each image of a conversation, in placeholder order: the text of the user turn that holds it,
    without placeholders (what `VLMProcessor.image_instructions` reads from a rendered prompt)."""
    return [turn["text"].replace(IMAGE_PLACEHOLDER, "").strip()
            for turn in turns for _ in range(turn["text"].count(IMAGE_PLACEHOLDER))]


def chat_messages(turns: Sequence[dict]) -> list[dict]:
    """Schema turns as chat-template messages: each turn's text split at the placeholders into typed parts."""
    messages = []
    for turn in turns:
        pieces = turn["text"].split(IMAGE_PLACEHOLDER)
        content = [{"type": "text", "text": pieces[0]}] if pieces[0] else []
        for piece in pieces[1:]:
            content.append({"type": "image"})
            if piece:
                content.append({"type": "text", "text": piece})
        messages.append({"role": turn["role"], "content": content})
    return messages


@dataclass
class ConversationCollator:
    """Tokenized conversations with labels on the assistant turns (each answer and the end-of-turn token that closes
    it, so the model learns to stop), right-padded, and their images.

    Args:
        processor: a `VLMProcessor`.
        max_length: tokens per conversation, image tokens included. A conversation is never cut inside an image's
            tokens or an answer: the turns that do not fit whole are left out (counted in `turns_left_out`), and a
            sample whose images and first exchange do not fit is left out of its batch, counted in
            `samples_left_out` and logged (conversation data loses those before training, see
            `training.conversation_data.length_column`; `check_dataset` refuses settings that lose them at once).
        qa_turns, with_caption, seed, instructions: how rows of the caption + question-answer layout become
            conversations (see `CaptionQAConversations`).
        pixel_format: "float" (the image processor's output), "uint8" (normalised on the device by
            `DeviceNormalizeMixin`) or "none" (a feature cache supplies `vision_features`: the batch names the rows
            whose images it holds in `image_rows`, for `FeatureCacheCollator`).
        separate_turns: every user turn sees the conversation's images and its own question only, as evaluation asks
            them, never an earlier turn (whose caption or answers would give the answer away as text). For
            conversations whose images all open the first user turn (the caption + question-answer layout). The
            turns share one copy of what they all start with (the images, unless `instruction_aware` gives each turn
            its own): each turn's tokens get the positions and the attention they would have in a conversation of
            its own (a `(B, 1, T, T)` boolean `attention_mask` and `position_ids`).
        instruction_aware: the model's Q-Former reads instructions (`VLMConfig.instruction_aware_qformer`): the batch
            gives each image the text of the user turn that holds it as `qformer_input_ids`/`qformer_attention_mask`.
            With `separate_turns` every turn then has its own copy of the images, whose visual tokens read its own
            question; the batch holds each image once and `image_index` says which image each copy shows,
            so the vision encoder runs once per image.
    """

    processor: object
    max_length: int = 160
    qa_turns: int = 3
    with_caption: bool = True
    seed: int = 0
    instructions: Sequence[str] = CAPTION_INSTRUCTIONS
    pixel_format: str = "float"
    separate_turns: bool = False
    instruction_aware: bool = False
    caption_qa: CaptionQAConversations = field(init=False, repr=False, compare=False)
    turns_left_out: Counter = field(default_factory=Counter, init=False, repr=False, compare=False)
    # key -> tokens of each sample left out whole (see `_too_long`)
    samples_left_out: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    # rendered one-turn conversation -> its token ids and answer mask, for `separate_turns`: rendering the chat
    # template is most of the collator's time and question-answer pairs repeat. Bounded: cleared when full.
    _turn_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _TURN_CACHE_SIZE = 16384

    def __post_init__(self):
        self.caption_qa = CaptionQAConversations(self.qa_turns, self.with_caption, self.seed, tuple(self.instructions))

    def conversation(self, row: dict) -> dict:
        """The row as a conversation-schema row (rows of the caption + question-answer layout are drawn into one)."""
        return row if "turns" in row else self.caption_qa(row)

    def check_dataset(self, dataset, name: str) -> None:
        """Raises `UserError` before training when `dataset` does not fit these settings: question-answer turns
        asked for where no sample has any, or a `max_length` too short for a quarter or more of the first rows."""
        if "qa" in dataset.column_names and self.qa_turns and not any(len(pairs) for pairs in dataset["qa"]):
            raise UserError(
                f"qa_turns: {self.qa_turns} asks for question-answer turns, but no sample of {name} has "
                "question-answer pairs (qa); set qa_turns: 0 for caption-only data"
            )
        checked = [dataset[i] for i in range(min(8, len(dataset)))]
        try:
            self(checked)
        except UserError:
            if not self.samples_left_out:
                raise
        # An outlier is left out and counted while training; a quarter of the first rows is a setting to change.
        if self.samples_left_out and len(self.samples_left_out) * 4 >= len(checked):
            key, tokens = next(iter(self.samples_left_out.items()))
            raise UserError(f"sample {key!r} of {name} needs {tokens} tokens with its images and first answer whole, "
                            f"more than max_length: {self.max_length}; raise max_length")
        self.samples_left_out.clear()  # training counts its own

    # ------------------------------------------------------------------------------------------------------------
    # Rendering and tokenizing one conversation
    # ------------------------------------------------------------------------------------------------------------

    def render(self, turns: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The chat text of a conversation and the character spans of its assistant turns (each answer with its
        end-of-turn token; what a template writes after that, such as a newline, is not learned)."""
        messages = chat_messages(turns)
        text, spans = self.processor.apply_chat_template(messages, tokenize=False), []
        eos = self.processor.tokenizer.eos_token
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.processor.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
            if not text.startswith(prompt):
                raise ValueError("the chat template does not render a conversation as a prefix of its continuation")
            spans.append((len(prompt), text.index(eos, len(prompt)) + len(eos)))
        return text, spans

    def encode(self, turns: Sequence[dict]) -> tuple[list[int], list[bool]]:
        """Token ids of a conversation, each image placeholder expanded into `num_query_tokens` image tokens, and for
        each token whether it is part of an answer."""
        text, spans = self.render(turns)
        encoded = self.processor.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        image_id, queries = self.processor.image_token_id, self.processor.num_query_tokens
        ids, inside = [], []
        for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
            answer = end > start and any(start >= a and end <= b for a, b in spans)
            copies = queries if token == image_id else 1
            ids += [token] * copies
            inside += [answer and token != image_id] * copies
        return ids, inside

    def _fitting(self, key: str, turns: list[dict]) -> tuple[list[int], list[bool]] | None:
        """The conversation's tokens, without the trailing exchanges that would take it past `max_length`; None
        (the sample is left out, see `_too_long`) when what remains would still not fit."""
        ids, inside = self.encode(turns)
        kept = len(turns)
        while len(ids) > self.max_length:
            users = [i for i, turn in enumerate(turns[:kept]) if turn["role"] == "user"]
            if len(users) < 2 or IMAGE_PLACEHOLDER in "".join(t["text"] for t in turns[users[-1]:kept]):
                return self._too_long(key, len(ids))
            kept = users[-1]
            ids, inside = self.encode(turns[:kept])
        if kept < len(turns):
            self.turns_left_out["turns"] += len(turns) - kept
        return ids, inside

    # ------------------------------------------------------------------------------------------------------------
    # Batches
    # ------------------------------------------------------------------------------------------------------------

    def _too_long(self, key: str, tokens: int) -> None:
        """Counts and logs a sample whose images and first answer alone take more than `max_length` tokens: it is
        left out of its batch (cutting it would teach a cut answer). Conversation data never gets here (its loading
        drops such samples); caption + question-answer samples with an over-long caption can."""
        self.samples_left_out[key] = tokens
        logger.warning("left out sample %r: its images and first answer take %d tokens, more than max_length %d "
                       "(%d samples so far)", key, tokens, self.max_length, len(self.samples_left_out))

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        conversations = [self.conversation(row) for row in rows]
        if self.separate_turns:
            batch, instructions = self._shared_prefix_batch(conversations)
        else:
            encoded = [self._fitting(c["key"], list(c["turns"])) for c in conversations]
            if not any(e is not None for e in encoded):
                raise UserError(f"no sample of this batch fits max_length: {self.max_length} with its images and "
                                "first answer; raise max_length")
            batch = self._padded([e for e in encoded if e is not None])
            instructions = [turn_instructions(c["turns"]) if e is not None else []
                            for c, e in zip(conversations, encoded)]
        # Each kept conversation's images, once; a sequence holds them once per entry of its instructions (one per
        # image and copy): with several copies, `image_index` says which image each copy shows.
        images, image_index = [], []
        for conversation, own in zip(conversations, instructions):
            if own:
                count = len(conversation["images"])
                image_index += [len(images) + i % count for i in range(len(own))]
                images += conversation["images"]
        if images:
            batch.update(pixel_batch(self.processor.image_processor, images, self.pixel_format))
            if self.pixel_format == "none":
                batch["image_rows"] = torch.tensor([i for i, own in enumerate(instructions) if own])
            if len(image_index) != len(images):
                batch["image_index"] = torch.tensor(image_index)
            if self.instruction_aware:
                batch.update(self.processor.qformer_inputs([text for own in instructions for text in own]))
        return batch

    def _padded(self, encoded: list[tuple[list[int], list[bool]]]) -> dict[str, torch.Tensor]:
        pad_id, length = self.processor.tokenizer.pad_token_id, max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
        labels = torch.full((len(encoded), length), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
        for i, (ids, inside) in enumerate(encoded):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(ids)] = torch.where(torch.tensor(inside, dtype=torch.bool), input_ids[i, : len(ids)], -100)
            attention_mask[i, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def _one_turn(self, images: str, turn: tuple[dict, dict]) -> tuple[tuple[int, ...], tuple[bool, ...]]:
        """A one-exchange conversation about the images: its token ids and answer mask (cached)."""
        user, assistant = turn
        cache_key = (images, user["text"], assistant["text"])
        cached = self._turn_cache.get(cache_key)
        if cached is None:
            ids, inside = self.encode([{"role": "user", "text": images + user["text"]}, assistant])
            if len(self._turn_cache) >= self._TURN_CACHE_SIZE:
                self._turn_cache.clear()
            cached = self._turn_cache[cache_key] = (tuple(ids), tuple(inside))
        return cached

    def _shared_prefix_batch(self, conversations: Sequence[dict]) -> tuple[dict[str, torch.Tensor], list[int]]:
        """One sequence per conversation: the tokens every exchange starts with once (the images), then every
        exchange's own tokens, each placed (positions) and masked (attention) as if it followed that prefix alone.
        An exchange that would not fit whole is left out, with those after it. With `instruction_aware` the prefix
        ends before the images: each exchange has its own copy of them. Also the instruction of each image copy of
        each sequence (its exchange's question), one list per conversation."""
        pad_id, image_id = self.processor.tokenizer.pad_token_id, self.processor.image_token_id
        sequences, instructions = [], []
        for conversation in conversations:
            turns = conversation["turns"]
            roles = [turn["role"] for turn in turns]
            images = IMAGE_PLACEHOLDER * len(conversation["images"])
            if roles != ["user", "assistant"] * (len(turns) // 2) or not turns[0]["text"].startswith(images) or \
                    IMAGE_PLACEHOLDER in "".join(turn["text"] for turn in turns)[len(images):]:
                raise UserError(f"separate_turns needs conversations of user/assistant exchanges whose images all open "
                                f"the first user turn; sample {conversation['key']!r} is not one: set "
                                "separate_turns: false for this data")
            first = {**turns[0], "text": turns[0]["text"][len(images):]}
            encoded = [self._one_turn(images, pair) for pair in zip([first, *turns[2::2]], turns[1::2])]
            # The common prefix of the one-exchange conversations, never into an answer: shared tokens sit at the same
            # positions and see the same tokens in every exchange, so one copy serves them all.
            prefix = min(min(len(ids), inside.index(True) if True in inside else len(ids)) for ids, inside in encoded)
            for ids, _ in encoded[1:]:
                prefix = next((i for i in range(prefix) if ids[i] != encoded[0][0][i]), prefix)
            if self.instruction_aware and image_id in encoded[0][0]:
                prefix = min(prefix, encoded[0][0].index(image_id))
            questions = [first["text"], *(turn["text"] for turn in turns[2::2])]
            ids, labels = list(encoded[0][0][:prefix]), [-100] * prefix
            positions, segments = list(range(prefix)), [0] * prefix
            fits = True
            for k, (turn_ids, inside) in enumerate(encoded):
                # What follows the exchange's last answer token (the template's newline) is seen by no other token and
                # carries no loss: it is left out.
                end = max(i for i, keep in enumerate(inside) if keep) + 1 if any(inside) else len(inside)
                if len(ids) + end - prefix > self.max_length:
                    if k == 0:
                        fits = self._too_long(conversation["key"], end)
                        break
                    self.turns_left_out["turns"] += 2 * (len(encoded) - k)
                    break
                ids += turn_ids[prefix:end]
                labels += [t if keep else -100 for t, keep in zip(turn_ids[prefix:end], inside[prefix:end])]
                positions += range(prefix, end)
                segments += [k + 1] * (end - prefix)
            if fits is None:
                instructions.append([])
                continue
            sequences.append((ids, labels, positions, segments))
            per_copy = len(conversation["images"]) * self.processor.num_query_tokens
            copies = sum(token == image_id for token in ids) // per_copy if per_copy else 0
            # One copy per kept exchange when each has its own, else the shared one (read with the first question).
            asked = questions[: max(segments)] if copies > 1 else questions[:1]
            instructions.append([question.strip() for question in asked[:copies]
                                 for _ in conversation["images"]])
        if not sequences:
            raise UserError(f"no sample of this batch fits max_length: {self.max_length} with its images and first "
                            "answer; raise max_length")
        length = max(len(ids) for ids, *_ in sequences)
        padded = [[values + [fill] * (length - len(values)) for values, fill in zip(seq, (pad_id, -100, 0, -1))]
                  for seq in sequences]
        input_ids, labels, position_ids, segments = (torch.tensor([seq[i] for seq in padded]) for i in range(4))
        # Token i sees token j <= i of the shared prefix (segment 0) or of its own exchange; padding sees itself only.
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        same = (segments[:, :, None] == segments[:, None, :]) | (segments[:, None, :] == 0)
        visible = causal & same & (segments[:, None, :] >= 0)
        visible |= torch.eye(length, dtype=torch.bool)
        return {"input_ids": input_ids, "attention_mask": visible[:, None], "position_ids": position_ids,
                "labels": labels}, instructions


__all__ = [
    "CAPTION_INSTRUCTIONS", "CaptionQAConversations", "ConversationCollator", "chat_messages", "turn_instructions",
]
