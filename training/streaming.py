"""Training on a `data.streaming.ShardStream`: its DataLoader, the readers' positions in every checkpoint, exact
resume from them, and the skipped samples of all readers in the logs.

Each batch carries the position of the reader (slot) that produced it, as of its last sample (`STATE_COLUMN`);
the Trainer records it when the batch is trained on, so the saved position is that of the consumed data, however
far the DataLoader's workers have read ahead. A checkpoint holds one `stream_state_rank<N>.json` per process,
written before trainer_state.json (with the RNG states), so the completeness rule of `training.checkpoints` covers
it. Resuming, each reader replays its draws from tar headers and reads on from there; the Trainer's own
fast-forward, which decodes and discards every consumed batch, is switched off (`ignore_data_skip`).
"""

import json
import logging
import os
from collections import Counter

import datasets
from accelerate.data_loader import prepare_data_loader
from accelerate.utils import gather_object
from torch.utils.data import DataLoader

from cli import UserError
from data.streaming import STATE_COLUMN, ShardStream, StreamPosition

logger = logging.getLogger(__name__)

STATE_FILE = "stream_state_rank{rank}.json"


def rows_to_check(dataset, n: int = 64):
    """What a collator's `check_dataset` can read: the dataset itself, or for a stream its first `n` rows (a whole
    stream cannot be read before training; a bad sample later on fails in its batch with the same message)."""
    if isinstance(dataset, ShardStream):
        return datasets.Dataset.from_list(dataset.peek(n))
    return dataset


class _WithStreamState:
    """The collator's batch plus the stream position of its last row (every batch comes from one reader)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, rows: list[dict]) -> dict:
        return {**self.collator(rows), STATE_COLUMN: rows[-1][STATE_COLUMN]}


class StreamingTrainerMixin:
    """Trainer mixin: everything a `ShardStream` training set needs; a no-op for map-style data."""

    _stream_states: dict[int, dict] | None = None
    _last_slot: int | None = None
    _logged_skips: dict | None = None
    _rng_checkpoint: str | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.streaming:
            if self.args.max_steps <= 0:
                raise UserError("a stream has no length: set max_steps (the number of optimizer steps to train)")
            # The Trainer's resume would decode and discard every consumed batch; the stream resumes itself.
            self.args.ignore_data_skip = True

    @property
    def streaming(self) -> bool:
        return isinstance(self.train_dataset, ShardStream)

    def get_train_dataloader(self):
        if not self.streaming:
            return super().get_train_dataloader()
        self.train_dataset.check_readers(self.args.dataloader_num_workers)
        workers = self.args.dataloader_num_workers
        loader = DataLoader(
            self.train_dataset, batch_size=self._train_batch_size, collate_fn=_WithStreamState(self.data_collator),
            num_workers=workers, pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers and workers > 0,
            prefetch_factor=self.args.dataloader_prefetch_factor if workers > 0 else None,
        )
        # Every process already reads its own shards: accelerate places batches on the device but must not split
        # the stream among the processes again (its default for an IterableDataset: read all, keep a slice).
        prepared = prepare_data_loader(loader, self.accelerator.device, num_processes=1, process_index=0,
                                       put_on_device=True, dispatch_batches=False)
        self.accelerator._dataloaders.append(prepared)  # as Accelerator.prepare does: the end-of-data signal
        return prepared

    def _load_rng_state(self, checkpoint):
        # The Trainer restores the RNG states before it makes the DataLoader's iterator, which draws its workers'
        # seed from the global RNG: the uninterrupted run made its iterator at step 0, so the resumed run's dropout
        # masks would differ from the next step on. Restored at the first step instead (where the Trainer's own
        # batch-skipping resume restores them too).
        if self.streaming and checkpoint is not None:
            self._rng_checkpoint = checkpoint
        else:
            super()._load_rng_state(checkpoint)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._rng_checkpoint is not None:
            super()._load_rng_state(self._rng_checkpoint)
            self._rng_checkpoint = None
        state = inputs.pop(STATE_COLUMN, None)
        if state is not None:
            if self._stream_states is None:
                self._stream_states = {}
            self._stream_states[state["slot"]] = state
            self._last_slot = state["slot"]
        return super().training_step(model, inputs, num_items_in_batch)

    def _stream_layout(self) -> dict:
        stream = self.train_dataset
        return {"world_size": stream.world_size, "dataloader_num_workers": self.args.dataloader_num_workers,
                "seed": stream.seed, "shuffle_buffer_size": stream.buffer_size, "shards": len(stream.shards)}

    def _save_rng_state(self, output_dir):
        # Before the RNG states and the barrier that precede trainer_state.json: part of a complete checkpoint.
        if self.streaming:
            workers = max(1, self.args.dataloader_num_workers)
            next_worker = 0 if self._last_slot is None else (self._last_slot % workers + 1) % workers
            state = {**self._stream_layout(), "next_worker": next_worker,
                     "positions": {str(slot): s for slot, s in (self._stream_states or {}).items()}}
            os.makedirs(output_dir, exist_ok=True)  # another rank may not have made it yet
            path = os.path.join(output_dir, STATE_FILE.format(rank=self.args.process_index))
            with open(path + ".tmp", "w") as f:
                json.dump(state, f, indent=1)
            os.replace(path + ".tmp", path)
        super()._save_rng_state(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if not self.streaming:
            return
        path = os.path.join(resume_from_checkpoint, STATE_FILE.format(rank=self.args.process_index))
        try:
            with open(path) as f:
                state = json.load(f)
        except FileNotFoundError:
            raise UserError(f"{path} is missing: {resume_from_checkpoint} was not written by a streaming run on "
                            f"{self.train_dataset.world_size} processes; resume it without --streaming, or with "
                            "the process count it was written with") from None
        layout = {key: state.get(key) for key in self._stream_layout()}
        if layout != self._stream_layout():
            changed = ", ".join(f"{k} {layout[k]} -> {v}" for k, v in self._stream_layout().items() if layout[k] != v)
            raise UserError(f"{resume_from_checkpoint} was read as a stream with other settings ({changed}); "
                            "resume with the settings it was written with")
        positions = {int(slot): StreamPosition(s["epoch"], s["drawn"], Counter(s["skipped"]))
                     for slot, s in state["positions"].items()}
        self._stream_states = {int(slot): s for slot, s in state["positions"].items()}
        self.train_dataset.resume(positions, state["next_worker"])
        logger.info("stream resumed from %s: %s", path,
                    ", ".join(f"reader {slot} at epoch {p.epoch}, sample {p.drawn}" for slot, p in positions.items()))

    def log(self, logs: dict, *args, **kwargs):
        # Training logging steps run on every process: the readers' skip counts are summed over all of them.
        if self.streaming and "loss" in logs:
            local = Counter()
            for state in (self._stream_states or {}).values():
                local.update(state["skipped"])
            total = Counter()
            for counts in gather_object([dict(local)]):
                total.update(counts)
            skipped = sum(n for reason, n in total.items() if not reason.startswith("repaired: "))
            logs = {**logs, "skipped_samples": skipped}
            if dict(total) != self._logged_skips and self.is_world_process_zero():
                logger.info("data so far: skipped %d samples; %s", skipped,
                            ", ".join(f"{reason}: {n}" for reason, n in sorted(total.items())) or "nothing to count")
            self._logged_skips = dict(total)
        super().log(logs, *args, **kwargs)


__all__ = ["STATE_FILE", "StreamingTrainerMixin", "rows_to_check"]
