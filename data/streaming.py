"""Training data read lazily from webdataset shards, split across processes and workers, resumable exactly.

`load_image_text_dataset` turns every shard into an Arrow table before the first step: for CC12M that is hours
of decoding and hundreds of GB in the `datasets` cache. `ShardStream` reads the same shards as training asks for
them, through the same cleaning (`data.cleaning.sample_from_files`) and the same skip counting, and writes nothing.

Why not `datasets.IterableDataset` (or webdataset): resuming mid-epoch has to give the samples the uninterrupted
run would have seen, in the same order, without decoding what was consumed. `datasets`' `state_dict` restores the
shard position but empties the shuffle buffer (its documentation says the buffered samples are lost), and the
Trainer's own resume decodes and discards every consumed batch. Here the shuffle works on sample *references*
(shard, index): the order of an epoch is a pure function of the seed, the epoch, the slot and the shards' sample
counts, so a position is two numbers per reader (epoch, samples drawn) and a resumed reader replays the draws from
tar headers alone, decoding nothing it skips. Samples are read by random access into their shard when drawn.

Who reads what: the job's readers are `slots = world_size x num_workers` (every DataLoader worker of every rank).
Each epoch the shard list is shuffled with (seed, epoch) and dealt round-robin to the slots, so every sample is
read by exactly one slot per epoch. Shard counts that do not divide evenly leave some slots a shard more: those
slots take longer over their epoch, and every slot goes straight on into its next epoch (the stream never ends;
training length is `max_steps`). So the first epoch of every slot together covers every sample exactly once, and
no process ever waits for another at an epoch boundary. A slot without a shard would have nothing to read: the
stream refuses to start with fewer shards than slots.
"""

from __future__ import annotations

import logging
import random
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import datasets
import fsspec
import torch

from cli import UserError

from .cleaning import CleaningOptions, check_text_fields, sample_from_files
from .hashing import seeded_hash
from .tar_shards import _MEMBER_RE, TAR_READ_ERRORS, ShardRef, is_tar_path, iter_tar_samples, list_shards, shard_folder

logger = logging.getLogger(__name__)

# The column each row of the stream carries its reader's position in: {"slot", "epoch", "drawn", "skipped"}.
STATE_COLUMN = "stream_state"

_DECODE = datasets.Image(mode="RGB")


class _Shard:
    """One tar opened for random access: its samples (key -> members, in file order), read one by one.

    What `ShardStream` asks of an opened shard (`ShardStream._open` makes them; other streams open other kinds):
    `len()` (its samples), `problem` (None, or what made part of it unreadable), `read(index)` (the sample, for
    `ShardStream._clean`), `skip(index)` (a draw replayed on resume: not read), `close()`.
    """

    def __init__(self, ref: ShardRef):
        self.ref = ref
        self.problem: str | None = None
        self.samples: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
        self._file = self._tar = None
        try:
            self._file = fsspec.open(ref.path, "rb").open()
            self._tar = tarfile.open(fileobj=self._file, mode="r:*")
            members = iter(self._tar)
            for member in members:
                match = _MEMBER_RE.match(member.name) if member.isfile() else None
                if match is None:
                    continue
                key, extension = match.group(1).removeprefix("./"), match.group(2).lower()
                if not self.samples or self.samples[-1][0] != key or extension in self.samples[-1][1]:
                    self.samples.append((key, {}))
                self.samples[-1][1][extension] = member
        except TAR_READ_ERRORS as err:
            # As the map-style loader: the samples before the damage are kept, the one being read is not.
            self.problem = f"{ref.path}: {err}"
            if self.samples:
                self.samples.pop()

    def __len__(self) -> int:
        return len(self.samples)

    def skip(self, index: int) -> None:
        pass  # a tar member is read on its own: nothing to keep or free

    def read(self, index: int) -> tuple[str, dict[str, bytes]]:
        key, members = self.samples[index]
        files = {}
        for extension, member in members.items():
            extracted = self._tar.extractfile(member)
            files[extension] = extracted.read() if extracted is not None else b""
        return self.ref.key_prefix + key, files

    def close(self) -> None:
        for handle in (self._tar, self._file):
            if handle is not None:
                handle.close()


def draw_order(counts: Iterator[int], rng: random.Random, buffer_size: int) -> Iterator[tuple[int, int]]:
    """The (shard, index) references of one slot's epoch in training order: the shards' samples in file order
    through a shuffle buffer of `buffer_size` references. `counts` gives each shard's sample count, lazily."""
    buffer: list[tuple[int, int]] = []
    for shard, count in enumerate(counts):
        for index in range(count):
            if len(buffer) < buffer_size:
                buffer.append((shard, index))
                continue
            slot = rng.randrange(buffer_size)
            yield buffer[slot]
            buffer[slot] = (shard, index)
    rng.shuffle(buffer)
    yield from buffer


@dataclass
class StreamPosition:
    """Where one slot's reader is: the epoch it is in and how many samples it has drawn in it (kept or skipped)."""

    epoch: int = 0
    drawn: int = 0
    skipped: Counter = field(default_factory=Counter)


class ShardStream(torch.utils.data.IterableDataset):
    """Cleaned rows (the columns of `data.loading.OUTPUT_FEATURES`, image decoded, plus `STATE_COLUMN`) from
    webdataset shards, without end: epoch after epoch, reshuffled each time.

    Args:
        shards: the shards, as `data.tar_shards.list_shards` gives them.
        options: the cleaning limits (`data.cleaning.CleaningOptions`).
        seed: the order of every epoch follows from it.
        buffer_size: references in the shuffle buffer (samples are read when drawn, so it costs no memory to speak
            of); 1 reads each slot's shards in file order.
        rank, world_size: this process and the number of processes; each reads its own shards.
    """

    def __init__(self, shards: Sequence[ShardRef], options: CleaningOptions, *, seed: int, buffer_size: int,
                 rank: int = 0, world_size: int = 1):
        if buffer_size < 1:
            raise UserError(f"shuffle_buffer_size must be at least 1, got {buffer_size}")
        self.shards, self.options = list(shards), options
        self.seed, self.buffer_size, self.rank, self.world_size = seed, buffer_size, rank, world_size
        self.start: dict[int, StreamPosition] = {}
        self.next_worker = 0

    @classmethod
    def from_source(cls, source: str, *, split: str = "train", options: CleaningOptions | None = None,
                    **kwargs) -> ShardStream:
        """The stream of a shard source as `load_image_text_dataset` names them: a folder of tars (or of split
        folders), a .tar path, or a glob of them."""
        folder = shard_folder(source, split)
        if folder is None and not (is_tar_path(source) or "*" in source):
            raise UserError(f"streaming reads webdataset shards, and {source} holds none; give a folder of .tar "
                            "shards (python -m data.download or data.synthetic write them), or set streaming: false")
        shards, options = list_shards([folder or source]), options or CleaningOptions()
        check_text_fields(shards, options)
        return cls(shards, options, **kwargs)

    def text_rows(self) -> Iterator[dict]:
        """Every usable sample of every shard, cleaned, image not decoded: for the texts (a tiny preset's tokenizer
        is trained on them). Reads the whole set once."""
        for ref in self.shards:
            try:
                for key, files in iter_tar_samples(ref.path):
                    row = sample_from_files(ref.key_prefix + key, files, self.options)
                    if row["_skip"] is None:
                        yield row
            except TAR_READ_ERRORS:
                continue  # counted when training reads it

    def check_readers(self, num_workers: int) -> None:
        """Raises `UserError` when some reader (process x DataLoader worker) would get no shard."""
        slots = self.world_size * max(1, num_workers)
        if len(self.shards) < slots:
            raise UserError(
                f"streaming {len(self.shards)} shards to {self.world_size} processes x {max(1, num_workers)} "
                f"DataLoader workers leaves some readers without a shard; use at most "
                f"{max(1, len(self.shards) // self.world_size)} dataloader_num_workers, or more (smaller) shards"
            )

    def resume(self, positions: dict[int, StreamPosition], next_worker: int = 0) -> None:
        """Start each slot's reader where `positions` says (slots not named start at the beginning).

        A DataLoader takes batches from its workers in turn, always starting with worker 0; `next_worker` (the
        rank's slot whose batch was due next) makes worker 0 read for that slot, so batches keep their order.
        """
        self.start, self.next_worker = dict(positions), next_worker

    def peek(self, n: int) -> list[dict]:
        """The first `n` rows slot 0 of this process reads (decoded: for checks before training)."""
        rows = []
        for row in self:
            rows.append(row)
            if len(rows) == n:
                return rows
        return rows

    def _shard_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.shards)))
        random.Random(seeded_hash(f"shards/{epoch}", self.seed, bits=63)).shuffle(order)
        return order

    def slot_shards(self, slot: int, slots: int, epoch: int) -> list[ShardRef]:
        """The shards `slot` reads in `epoch`, in reading order."""
        return [self.shards[i] for i in self._shard_order(epoch)[slot::slots]]

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        slot, slots = self.rank * workers + (worker + self.next_worker) % workers, self.world_size * workers
        position = self.start.get(slot, StreamPosition())
        position = StreamPosition(position.epoch, position.drawn, Counter(position.skipped))
        while True:
            yield from self._epoch(slot, slots, position)
            position = StreamPosition(position.epoch + 1, 0, position.skipped)

    def _epoch(self, slot: int, slots: int, position: StreamPosition) -> Iterator[dict]:
        refs = self.slot_shards(slot, slots, position.epoch)
        replayed = position.drawn  # draws consumed before a checkpoint: replayed from the headers, not read
        opened: dict[int, _Shard] = {}
        left: dict[int, int] = {}  # samples of each open shard not drawn yet: it is closed when none are
        done = 0  # draws so far in this epoch

        def counts() -> Iterator[int]:
            for i, ref in enumerate(refs):
                shard = opened[i] = self._open(ref)
                left[i] = len(shard)
                if shard.problem is not None and done >= replayed:  # counted before the checkpoint otherwise
                    logger.warning("shard %s; going on with the next one", shard.problem)
                    position.skipped["shard truncated or corrupt"] += 1
                if not left[i]:
                    opened.pop(i).close()
                yield left[i]

        rng = random.Random(seeded_hash(f"samples/{position.epoch}/{slot}", self.seed, bits=63))
        try:
            for done, (i, index) in enumerate(draw_order(counts(), rng, self.buffer_size), start=1):
                shard = opened[i]
                left[i] -= 1
                if done > replayed:
                    row = self._clean(shard.read(index), position)
                    position.drawn = done
                    if row is not None:
                        row[STATE_COLUMN] = {"slot": slot, "epoch": position.epoch, "drawn": done,
                                             "skipped": dict(position.skipped)}
                        yield row
                else:
                    shard.skip(index)
                if not left[i]:
                    opened.pop(i).close()
        finally:
            for shard in opened.values():
                shard.close()

    def _open(self, ref: ShardRef) -> _Shard:
        """`ref` opened for reading its samples by index (see `_Shard` for what the stream asks of it)."""
        return _Shard(ref)

    def _clean(self, sample: tuple[str, dict[str, bytes]], position: StreamPosition) -> dict | None:
        """The cleaned row of what the shard read, its image decoded; None (counted in `position.skipped`) for a
        bad sample."""
        row = sample_from_files(*sample, self.options)
        row.pop("_shard_problem")
        if not self._count(row["key"], row.pop("_skip"), row.pop("_repairs"), position):
            return None
        row["image"] = _DECODE.decode_example(row["image"])
        return row

    @staticmethod
    def _count(key: str, reason: str | None, repairs: list[str], position: StreamPosition) -> bool:
        """Counts a sample's repairs and its skip reason in `position.skipped`; True when it is kept."""
        for repair in repairs:
            position.skipped[f"repaired: {repair}"] += 1
        if reason is None:
            return True
        if not any(not r.startswith("repaired: ") for r in position.skipped):
            logger.warning("skipping %s: %s (later ones are only counted)", key, reason)
        position.skipped[reason] += 1
        return False


__all__ = ["STATE_COLUMN", "ShardStream", "StreamPosition", "draw_order"]
