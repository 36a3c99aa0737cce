"""`SkipReport`: what loading kept, skipped and repaired, counted by reason."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

_EXAMPLES_PER_REASON = 3


@dataclass
class SkipReport:
    """Counts of one loading pass, by reason, with a few example keys per reason.

    `skipped`: samples left out; `repaired`: samples kept after a fix (e.g. CMYK converted to RGB,
    caption truncated); `shard_problems`: whole shards (or their unreadable tails) that gave no
    samples. Pass one to `load_image_text_dataset(..., report=...)`, then read or `log()` it.
    """

    kept: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    repaired: Counter[str] = field(default_factory=Counter)
    shard_problems: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, key: str, *, skip: str | None, repairs: list[str], shard_problem: str | None) -> None:
        """Count one row of the cleaning step (a sample, or a shard that yielded nothing)."""
        if shard_problem is not None:
            self._count(self.shard_problems, shard_problem, key)
        elif skip is not None:
            self._count(self.skipped, skip, key)
        else:
            self.kept += 1
            for repair in dict.fromkeys(repairs):  # a sample counts once per kind of repair
                self._count(self.repaired, repair, key)

    def _count(self, counter: Counter[str], reason: str, key: str) -> None:
        counter[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < _EXAMPLES_PER_REASON:
            examples.append(key)

    @property
    def total_skipped(self) -> int:
        """Samples left out, all reasons together."""
        return sum(self.skipped.values())

    def summary_lines(self) -> list[str]:
        """One readable line per reason, then a total."""
        lines = []
        for title, counter, unit in (
            ("skipped", self.skipped, "samples"),
            ("repaired", self.repaired, "samples"),
            ("unreadable", self.shard_problems, "shards"),
        ):
            for reason, count in sorted(counter.items(), key=lambda item: (-item[1], item[0])):
                lines.append(f"{title} {count} {unit}: {reason} (e.g. {', '.join(self.examples[reason])})")
        lines.append(
            f"kept {self.kept} samples, skipped {self.total_skipped}, repaired {sum(self.repaired.values())}, "
            f"unreadable shards {sum(self.shard_problems.values())}"
        )
        return lines

    def log(self, logger: logging.Logger | None = None, prefix: str = "") -> None:
        """Log the summary: problems as warnings, the total as info."""
        logger = logger or logging.getLogger(__name__)
        *problems, total = self.summary_lines()
        for line in problems:
            logger.warning("%s%s", prefix, line)
        logger.info("%s%s", prefix, total)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "kept": self.kept,
            "skipped": dict(self.skipped),
            "repaired": dict(self.repaired),
            "shard_problems": dict(self.shard_problems),
            "examples": self.examples,
        }
