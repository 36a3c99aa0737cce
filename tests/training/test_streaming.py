"""Streaming training data (`--streaming true`): every sample once per epoch across processes and DataLoader
workers, a new order each epoch, exact resume that decodes nothing it skips, and the real scripts killed and
resumed on two processes."""

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from data.loading import load_image_text_dataset
from data.synthetic import generate_dataset
from tests.conftest import tiny_qformer_and_processor
from tests.training import stream_keys_worker
from tests.training.conversation_files import write_cauldron, write_llava
from tests.training.launch import (
    REPO,
    TIMEOUT_S,
    kill_tree,
    logged_losses,
    max_weight_difference,
    run_torchrun,
    script_env,
    stage1_args,
    stage2_args,
    trainer_state,
)
from training.checkpoints import is_complete_checkpoint
from training.conversation_collator import CaptionQAConversations

BATCH = 4  # stream_keys_worker's per-device batch


# Slow tier (`make test`, not `make test-fast`): trains through the real scripts, on two processes too.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory) -> Path:
    """90 training samples in 5 shards (20, 20, 20, 20, 10): 2 processes x 2 workers = 4 readers, so one reader
    gets two shards each epoch; and a validation split."""
    out = tmp_path_factory.mktemp("uneven")
    generate_dataset(out, {"train": 90, "validation": 32}, seed=5, image_size=32, samples_per_shard=20, num_proc=1)
    assert len(list((out / "train").glob("*.tar"))) == 5
    return out


def worker_run(data: Path, out: Path, steps: int, workers: int, nproc: int, resume_from: Path | None = None):
    target = [stream_keys_worker.__file__, str(data / "train"), str(out), str(steps), str(workers)]
    target += [str(resume_from)] if resume_from else []
    log = out.parent / f"{out.name}.log"
    if nproc == 1:
        with open(log, "w") as f:
            subprocess.run([sys.executable, *target], cwd=REPO, env=script_env(), stdout=f, stderr=subprocess.STDOUT,
                           timeout=TIMEOUT_S, check=True)
    else:
        run_torchrun(target, log, nproc=nproc)
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(nproc)]


def test_two_processes_with_two_workers_train_every_key_once_per_epoch_and_reshuffle(uneven_shards, tmp_path):
    # 24 steps of 4: the reader with two shards (up to 40 samples) finishes its first epoch within its 12 batches.
    ranks = worker_run(uneven_shards, tmp_path / "run", steps=24, workers=2, nproc=2)
    trained = [(key, epoch) for rank in ranks for _, key, epoch in rank["trained"]]
    first_epoch = Counter(key for key, epoch in trained if epoch == 0)
    print(f"\nfirst epoch: {len(first_epoch)} keys, each {set(first_epoch.values())} times; "
          f"{sum(1 for _, e in trained if e == 1)} samples of the second epoch trained")
    assert len(first_epoch) == 90 and set(first_epoch.values()) == {1}
    for rank in ranks:  # each rank's readers went on into epoch 1, in another order than in epoch 0
        epochs = [[key for _, key, e in rank["trained"] if e == epoch] for epoch in (0, 1)]
        assert epochs[1] and epochs[1] != epochs[0][: len(epochs[1])]


@pytest.mark.parametrize("nproc, workers", [(1, 0), (2, 2)], ids=["1-process", "2-processes-2-workers"])
def test_resumed_stream_trains_the_same_keys_and_decodes_only_the_next_batches(uneven_shards, tmp_path, nproc,
                                                                                workers):
    steps, resume_step = 21, 18
    uninterrupted = worker_run(uneven_shards, tmp_path / "whole", steps, workers, nproc)
    worker_run(uneven_shards, tmp_path / "first", steps, workers, nproc)
    checkpoint = tmp_path / "first" / f"checkpoint-{resume_step}"
    assert sorted(p.name for p in checkpoint.glob("stream_state_rank*.json")) == [
        f"stream_state_rank{r}.json" for r in range(nproc)]
    resumed = worker_run(uneven_shards, tmp_path / "first", steps, workers, nproc, resume_from=checkpoint)
    # What can be read ahead at the first step: the batch being trained on and the one accelerate reads ahead to
    # know whether the data has ended; with workers, each also holds up to 2 batches ready (prefetch_factor) and
    # may be part-way through the next. The replay itself decodes nothing.
    prefetched = (workers * 3 + 1 if workers else 2) * BATCH
    for rank, (whole, again) in enumerate(zip(uninterrupted, resumed)):
        expected = [row for row in whole["trained"] if row[0] > resume_step]
        print(f"\nrank {rank}: resumed at step {resume_step} ({resume_step * BATCH} samples consumed), decoded "
              f"{again['decoded_before_first_step']} before its first step (read-ahead bound {prefetched})")
        assert again["trained"] == expected
        assert again["decoded_before_first_step"] <= prefetched < resume_step * BATCH


@pytest.fixture(scope="module")
def conversation_files(uneven_shards, tmp_path_factory) -> tuple[Path, Path]:
    """The 90 training samples as conversations in 5 files of two formats (3 LLaVA JSON-lines files naming their
    images in a folder, 2 Cauldron parquet files holding theirs): (the files' folder, the image folder)."""
    root = tmp_path_factory.mktemp("conversation_stream")
    rows = load_image_text_dataset(str(uneven_shards), split="train", cache_dir=str(root / "cache"))
    conversations = [CaptionQAConversations(qa_turns=1, seed=2)(row) for row in rows]
    data = root / "data"
    data.mkdir()
    llava, images = write_llava(root, conversations[:54])
    records = json.loads(llava.read_text())
    for i in range(3):
        with open(data / f"part{i}.jsonl", "w") as f:
            f.writelines(json.dumps(record) + "\n" for record in records[18 * i:18 * (i + 1)])
    for i, chunk in enumerate((conversations[54:72], conversations[72:])):
        (root / f"cauldron{i}").mkdir()
        write_cauldron(root / f"cauldron{i}", chunk).rename(data / f"part{3 + i}.parquet")
    return data, images


@pytest.mark.parametrize("stage", ["stage 1 on shards", "stage 2 on conversation files"])
def test_streaming_training_killed_on_two_processes_resumes_to_the_uninterrupted_result(
    uneven_shards, conversation_files, tmp_path, stage
):
    steps = 24  # well past checkpoint-8, where the run is killed
    common = {"max_steps": steps, "save_strategy": "steps", "save_steps": 4, "streaming": True,
              "shuffle_buffer_size": 16, "dataloader_num_workers": 2, "per_device_train_batch_size": 4}
    if stage == "stage 1 on shards":
        def command(out, **fields):
            return ["-m", "training.train_qformer", *stage1_args(uneven_shards, out, **common, **fields)]
    else:
        qformer, processor = tiny_qformer_and_processor()
        qformer.save_pretrained(tmp_path / "qformer")
        processor.save_pretrained(tmp_path / "qformer")
        data, images = conversation_files

        def command(out, **fields):
            # Evaluation reads the shapes shards' validation split: it may be in another format than training.
            return ["-m", "training.train_vlm", *stage2_args(
                uneven_shards, tmp_path / "qformer", out, train_data=data, image_folder=images, separate_turns=False,
                max_length=256, **common, **fields)]
    reference, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    run_torchrun(command(reference), tmp_path / "reference.log")

    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *command(killed)],
            cwd=REPO, env=script_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not is_complete_checkpoint(killed / "checkpoint-8"):
            assert process.poll() is None, f"the run ended before checkpoint-8:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, "no complete checkpoint-8 in time"
            time.sleep(0.005)
    finally:
        kill_tree(process.pid)  # kill -9, launcher and workers
        process.wait()
    assert not is_complete_checkpoint(killed / f"checkpoint-{steps}"), f"the run finished: raise steps above {steps}"

    output = run_torchrun(command(killed, resume_from_checkpoint=True), tmp_path / "resumed.log")
    assert "stream resumed from" in output and "Fast-forwarding" not in output
    difference = max_weight_difference(reference / "model.safetensors", killed / "model.safetensors")
    losses, expected = logged_losses(killed), logged_losses(reference)
    print(f"\n{stage}: streaming, 2 processes, killed after checkpoint-8, resumed: max |weight diff| "
          f"{difference:.1e}, losses equal: {losses == expected}")
    assert trainer_state(killed)["global_step"] == steps
    assert difference <= 1e-6
    assert losses == expected
