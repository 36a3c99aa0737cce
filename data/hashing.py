"""The seeded hash behind every deterministic choice: sample order, splits, negatives drawn, prompts picked.

Python's `hash()` is salted per process, so choices made with it would differ between the processes of one
distributed run and between a run and its resumption. This one depends only on its inputs.
"""

import hashlib


def seeded_hash(text: str, seed: int | str = "", bits: int = 64) -> int:
    """A `bits`-bit hash of `text` under `seed`, the same in every process, run and platform.

    `bits=63` fits a signed 64-bit integer (a `torch.long`).
    """
    digest = hashlib.blake2b(f"{seed}\0{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> (64 - bits)


__all__ = ["seeded_hash"]
