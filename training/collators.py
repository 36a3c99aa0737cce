"""Stage-1 batches: images with their captions (and hard negatives). Stage 2's are in `conversation_collator`.

Rows come from `data.loading.load_image_text_dataset`: "image" (PIL, RGB), "caption", "key", "group_id",
"references", "qa" (list of {"question", "answer", "type"}), "negative_captions".
"""

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cli import UserError
from data.hashing import seeded_hash

from .device_normalize import pixel_batch


@dataclass
class ContrastiveCollator:
    """Stage 1: images, tokenized captions and a duplicate-aware group id per sample.

    Args:
        processor: the stage-1 processor (image processor + BERT-family tokenizer).
        max_length: caption tokens (longer captions are cut; the loader already bounds them in characters). A batch
            is padded to its longest caption only: every text output used is the first token's, and shorter
            batches cost less (docs/tiny-recipe.md, round three).
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


__all__ = ["ContrastiveCollator"]
