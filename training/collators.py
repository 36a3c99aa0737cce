"""Batch builders for the two stages.

Rows come from `data.loading.load_image_text_dataset`: "image" (PIL, RGB), "caption", "key", "group_id",
"references", "qa" (list of {"question", "answer", "type"}), "negative_captions".
"""

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from cli import UserError
from data.hashing import seeded_hash
from eval.generation import CAPTION_PROMPT

from .device_normalize import pixel_batch

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


@dataclass
class ContrastiveCollator:
    """Stage 1: images, tokenized captions and a duplicate-aware group id per sample.

    Args:
        processor: the stage-1 processor (image processor + BERT-family tokenizer).
        max_length: caption tokens (longer captions are cut; the loader already bounds them in characters). A batch
            is padded to its longest caption only: every text output used is the first token's, and shorter
            batches cost less (11% of the tiny stage-1 step).
        hard_negatives: how many counterfactual captions per image to add (`negative_input_ids`,
            `(B * hard_negatives, L)`); rows with fewer cycle through theirs. A row with none is an error, because
            any stand-in caption could be a false negative.
        pixel_format: "float" (the image processor's output), "uint8" (normalised on the device by
            `DeviceNormalizeMixin`) or "none" (a feature cache supplies `vision_features`).
    """

    processor: object
    max_length: int = 48
    hard_negatives: int = 0
    pixel_format: str = "float"

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        tokenizer = self.processor.tokenizer
        text = tokenizer(
            [row["caption"] for row in rows],
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        batch = {
            **pixel_batch(self.processor.image_processor, [row["image"] for row in rows], self.pixel_format),
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "group_ids": torch.tensor([seeded_hash(row["group_id"], bits=63) for row in rows], dtype=torch.long),
        }
        if self.hard_negatives:
            negatives = [self._negatives_of(row) for row in rows]
            neg = tokenizer(
                [c for row_negs in negatives for c in row_negs],
                padding="longest",
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            batch["negative_input_ids"] = neg["input_ids"]
            batch["negative_attention_mask"] = neg["attention_mask"]
        return batch

    def check_dataset(self, dataset, name: str) -> None:
        """Raises `UserError` before training when `dataset` lacks what these settings need: with hard_negatives,
        counterfactual captions in every sample (read from the text column, no image decoded)."""
        if not self.hard_negatives:
            return
        missing = [key for key, negatives in zip(dataset["key"], dataset["negative_captions"]) if not negatives]
        if missing:
            raise UserError(
                f"hard_negatives: {self.hard_negatives} needs counterfactual captions (negative_captions), but "
                f"{len(missing)} of {len(dataset)} samples of {name} have none (e.g. {missing[0]!r}); set "
                "hard_negatives: 0 for data without them"
            )

    def _negatives_of(self, row: dict) -> list[str]:
        negatives = list(row.get("negative_captions") or [])
        if not negatives:
            raise UserError(
                f"sample {row['key']!r} has no negative_captions but hard_negatives={self.hard_negatives}; "
                "set hard_negatives: 0 for data without counterfactual captions"
            )
        # A per-sample shuffle, not the first K: the generator lists the colour changes first, so taking the head
        # of the list would almost never show the model a shape or position change. Seeded by the key, so resumed
        # and multi-process runs draw the same ones.
        random.Random(seeded_hash(row["key"], "negatives", bits=63)).shuffle(negatives)
        return (negatives * self.hard_negatives)[: self.hard_negatives]


@dataclass
class CaptioningCollator:
    """Stage 2: chat conversations about each image, with loss on the assistant's tokens only.

    Each sample becomes one conversation about its image: a captioning turn (an instruction chosen per sample,
    answered with the caption) and up to `qa_turns` question-answer turns, in an order drawn per sample (the image
    goes with the first turn). All choices are deterministic functions of the sample's key and `seed`. Labels are
    -100 everywhere except the answers and the `<|im_end|>`-style token that closes each answer (so the model learns
    to stop).

    Args:
        processor: a `VLMProcessor`.
        max_length: tokens per conversation, image tokens included; longer ones are cut at the end.
        qa_turns: question-answer turns after the caption (0: captions only).
        with_caption: include the captioning turn.
        seed: varies the instruction choice between runs, never between processes or resumptions.
        pixel_format: as in `ContrastiveCollator`.
        separate_turns: every turn sees the image and its own question only, as evaluation asks them, never an
            earlier turn (whose caption or answers would give the answer away as text). The turns share one copy
            of what they all start with (the image, when the chat template puts it first; with the image after the
            question each turn has its own copy): each one's tokens get the positions and the attention they would
            have in a conversation of its own (a `(B, 1, T, T)` boolean `attention_mask` and `position_ids`), so
            with the image first a batch costs what the multi-turn conversation costs (a token less per turn: the
            template's newline after each answer, which no other token sees).
    """

    processor: object
    max_length: int = 160
    qa_turns: int = 3
    with_caption: bool = True
    seed: int = 0
    instructions: Sequence[str] = field(default=CAPTION_INSTRUCTIONS)
    pixel_format: str = "float"
    separate_turns: bool = False
    # (question, answer) -> the turn's token ids, prefix length and answer mask, for `separate_turns`: rendering the
    # chat template twice per turn was most of the collator's time (0.09 s of a 0.45 s tiny stage-2 step), and
    # question-answer pairs repeat (a caption turn rarely does). Bounded: cleared when full.
    _turn_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _TURN_CACHE_SIZE = 16384

    def check_dataset(self, dataset, name: str) -> None:
        """Raises `UserError` before training when `dataset` does not fit these settings: question-answer turns
        asked for where no sample has any, or a `max_length` that cuts into the image tokens of the first batch."""
        if self.qa_turns and not any(len(pairs) for pairs in dataset["qa"]):
            raise UserError(
                f"qa_turns: {self.qa_turns} asks for question-answer turns, but no sample of {name} has "
                "question-answer pairs (qa); set qa_turns: 0 for caption-only data"
            )
        self([dataset[i] for i in range(min(8, len(dataset)))])

    def conversation(self, row: dict) -> list[tuple[str, str]]:
        """The (user text, assistant answer) turns for one sample."""
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

    def render(self, turns: list[tuple[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """The chat text of a conversation (image placeholder in the first turn) and the character spans of answers."""
        messages, spans = [], []
        text = ""
        for i, (question, answer) in enumerate(turns):
            content = [{"type": "text", "text": question}]
            if i == 0:
                content.insert(0, {"type": "image"})
            messages.append({"role": "user", "content": content})
            prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
            text = self.processor.apply_chat_template(messages, tokenize=False)
            if not text.startswith(prompt):
                raise ValueError("the chat template does not render a conversation as a prefix of its continuation")
            # The answer, the end-of-turn token and nothing after it (a template's trailing newline is not learned).
            end = text.index(self.processor.tokenizer.eos_token, len(prompt)) + len(self.processor.tokenizer.eos_token)
            spans.append((len(prompt), end))
        return text, spans

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        pixels = pixel_batch(self.processor.image_processor, [row["image"] for row in rows], self.pixel_format)
        if self.separate_turns:
            return {**self._shared_prefix_batch(rows), **pixels}
        texts, spans = zip(*(self._expanded(self.render(self.conversation(row))) for row in rows))
        self.processor.tokenizer.padding_side = "right"
        encoded = self._tokenize(list(texts), padding=True)
        self._check_image_tokens(encoded["input_ids"])
        labels = torch.full_like(encoded["input_ids"], -100)
        for i, answer_spans in enumerate(spans):
            inside = self._inside(encoded["offset_mapping"][i], answer_spans)
            labels[i, inside] = encoded["input_ids"][i, inside]
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], **pixels,
                "labels": labels}

    def _expanded(self, rendered: tuple[str, list[tuple[int, int]]]) -> tuple[str, list[tuple[int, int]]]:
        """Expands the image placeholder as the processor does; answers all come after it, so their spans shift."""
        text, spans = rendered
        image_tokens = self.processor.image_token * self.processor.num_query_tokens
        shift = len(image_tokens) - len(self.processor.image_token)
        return text.replace(self.processor.image_token, image_tokens, 1), [(a + shift, b + shift) for a, b in spans]

    def _tokenize(self, texts: list[str], padding: bool):
        return self.processor.tokenizer(
            texts, padding=padding, truncation=padding, max_length=self.max_length if padding else None,
            return_offsets_mapping=True, add_special_tokens=False, return_tensors="pt" if padding else None,
        )

    @staticmethod
    def _inside(offsets, spans: list[tuple[int, int]]):
        """Which tokens (by their character offsets) lie inside one of the answer spans."""
        offsets = torch.as_tensor(offsets).reshape(-1, 2)
        starts, ends = offsets[:, 0], offsets[:, 1]
        inside = torch.zeros(len(offsets), dtype=torch.bool)
        for start, end in spans:
            inside |= (starts >= start) & (ends <= end) & (ends > starts)
        return inside

    def _check_image_tokens(self, input_ids: torch.Tensor) -> None:
        # Each row holds its image's tokens once, or once per turn when the chat template puts the image after
        # each question: a cut copy would be a malformed image.
        counts = (input_ids == self.processor.image_token_id).sum(dim=1)
        if bool((counts == 0).any() | (counts % self.processor.num_query_tokens).any()):
            raise UserError(
                f"max_length: {self.max_length} cuts into the {self.processor.num_query_tokens} image tokens of a "
                f"conversation; raise max_length"
            )

    def _encoded_turn(self, turn: tuple[str, str]) -> tuple[tuple[int, ...], tuple[bool, ...]]:
        """A one-turn conversation about the image: its token ids and, for each token, whether it is part of the
        answer."""
        cached = self._turn_cache.get(turn)
        if cached is None:
            text, spans = self._expanded(self.render([turn]))
            encoded = self._tokenize([text], padding=False)
            inside = tuple(self._inside(encoded["offset_mapping"][0], spans).tolist())
            if len(self._turn_cache) >= self._TURN_CACHE_SIZE:
                self._turn_cache.clear()
            cached = self._turn_cache[turn] = (tuple(encoded["input_ids"][0]), inside)
        return cached

    def _shared_prefix_batch(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        """One sequence per image: the tokens every turn starts with once (the image, when the chat template puts it
        first), then every turn's own tokens, each turn placed (positions) and masked (attention) as if it followed
        that prefix alone. A turn that would not fit whole through its image tokens is left out."""
        pad_id, image_id = self.processor.tokenizer.pad_token_id, self.processor.image_token_id
        sequences = []
        for row in rows:
            turns = [self._encoded_turn(turn) for turn in self.conversation(row)]
            # The common prefix of the one-turn conversations, never into an answer: shared tokens sit at the same
            # positions and see the same tokens in every turn, so one copy serves them all.
            prefix = min(min(len(ids), inside.index(True) if True in inside else len(ids)) for ids, inside in turns)
            for ids, _ in turns[1:]:
                prefix = next((i for i in range(prefix) if ids[i] != turns[0][0][i]), prefix)
            ids, labels = list(turns[0][0][:prefix]), [-100] * prefix
            positions, segments = list(range(prefix)), [0] * prefix
            for k, (turn_ids, inside) in enumerate(turns):
                # What follows the turn's last answer token (the template's newline) is seen by no other token and
                # carries no loss: it is left out.
                end = max(i for i, keep in enumerate(inside) if keep) + 1 if any(inside) else len(inside)
                images = [i for i in range(prefix, end) if turn_ids[i] == image_id]
                if k and images and len(ids) + images[-1] - prefix >= self.max_length:
                    break
                ids += turn_ids[prefix:end]
                labels += [t if keep else -100 for t, keep in zip(turn_ids[prefix:end], inside[prefix:end])]
                positions += range(prefix, end)
                segments += [k + 1] * (end - prefix)
            sequences.append([values[: self.max_length] for values in (ids, labels, positions, segments)])
        length = max(len(ids) for ids, *_ in sequences)
        padded = [[values + [fill] * (length - len(values)) for values, fill in zip(seq, (pad_id, -100, 0, -1))]
                  for seq in sequences]
        input_ids, labels, position_ids, segments = (torch.tensor([seq[i] for seq in padded]) for i in range(4))
        self._check_image_tokens(input_ids)
        # Token i sees token j <= i of the shared prefix (segment 0) or of its own turn; padding sees itself only.
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        same = (segments[:, :, None] == segments[:, None, :]) | (segments[:, None, :] == 0)
        visible = causal & same & (segments[:, None, :] >= 0)
        visible |= torch.eye(length, dtype=torch.bool)
        return {"input_ids": input_ids, "attention_mask": visible[:, None], "position_ids": position_ids,
                "labels": labels}


__all__ = ["CAPTION_INSTRUCTIONS", "CaptioningCollator", "ContrastiveCollator"]
