"""One process of the streaming tests (run by torchrun, gloo, CPU; or plainly for one process).

A `Trainer` with the streaming mixin trains a one-weight model on a `ShardStream` of the shapes shards: the real
DataLoader path (workers, accelerate's device placement, the position riding along each batch), the real DDP
step, the real checkpoint and resume. The collator passes each row's key and reader epoch through to the
training step, which records them; every decoded image is counted (the stream's decoder, wrapped, in any worker).

    torchrun --nproc_per_node 2 tests/training/stream_keys_worker.py DATA OUT STEPS WORKERS [RESUME_FROM]

writes OUT/rank<r>.json: {"trained": [[step, key, epoch], ...], "decoded_before_first_step": n}.
"""

import json
import multiprocessing
import sys
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

import data.streaming
from data.streaming import STATE_COLUMN, ShardStream
from training.streaming import StreamingTrainerMixin

DECODED = multiprocessing.Value("i", 0)  # shared with the forked DataLoader workers


class CountingDecoder:
    def __init__(self, decoder):
        self.decoder = decoder

    def decode_example(self, value):
        with DECODED.get_lock():
            DECODED.value += 1
        return self.decoder.decode_example(value)


class OneWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x, keys=None, epochs=None):
        return {"loss": ((self.weight - x) ** 2).mean()}


def collate(rows):
    return {"x": torch.ones(len(rows)), "keys": [r["key"] for r in rows],
            "epochs": [r[STATE_COLUMN]["epoch"] for r in rows]}


class RecordingTrainer(Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trained, self.decoded_before_first_step = [], None

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.decoded_before_first_step is None:
            self.decoded_before_first_step = DECODED.value
        self.trained += [[self.state.global_step + 1, k, e] for k, e in zip(inputs["keys"], inputs["epochs"])]
        return super().training_step(model, inputs, num_items_in_batch)


class StreamTrainer(StreamingTrainerMixin, RecordingTrainer):
    pass


def main(source: str, out: str, steps: int, workers: int, resume_from: str | None = None) -> None:
    data.streaming._DECODE = CountingDecoder(data.streaming._DECODE)
    args = TrainingArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=4, dataloader_num_workers=workers,
        use_cpu=True, report_to="none", save_strategy="steps", save_steps=3, logging_steps=1, seed=0,
        remove_unused_columns=False, disable_tqdm=True, learning_rate=0.1,
    )
    stream = ShardStream.from_source(source, seed=0, buffer_size=8, rank=args.process_index,
                                     world_size=args.world_size)
    trainer = StreamTrainer(model=OneWeight(), args=args, train_dataset=stream, data_collator=collate)
    trainer.train(resume_from_checkpoint=resume_from)
    result = {"trained": trainer.trained, "decoded_before_first_step": trainer.decoded_before_first_step}
    (Path(out) / f"rank{args.process_index}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), *sys.argv[5:])
