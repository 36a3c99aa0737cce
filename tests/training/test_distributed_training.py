"""Stage 1 on two real processes (torchrun, gloo, CPU) equals one process on the concatenated batch.

Two levels: the real QFormerModel under DistributedDataParallel (one forward/backward, loss and every gradient),
and the real training script under torchrun against the same script in one process with twice the batch.
"""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from data.loading import load_image_text_dataset
from modeling.presets import build_tiny_qformer
from tests.training import ddp_qformer_worker
from tests.training.launch import (
    LEARNABLE_QFORMER,
    SMALL_QFORMER,
    SMALL_VISION,
    run,
    run_differences,
    run_torchrun,
    stage1_args,
    trainer_state,
)
from training.collators import ContrastiveCollator
from training.stage import text_corpus

WORLD_SIZE, LOCAL_BATCH, HARD_NEGATIVES = 2, 4, 2
TOLERANCE = 1e-5


# Slow tier (`make test`, not `make test-fast`): trains with torchrun on two processes.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_level(shapes_data, tmp_path_factory):
    """Saves a tiny trainable-vision QFormerModel and one batch, runs the worker on two processes; returns
    (folder, per-rank results)."""
    folder = tmp_path_factory.mktemp("ddp_qformer")
    rows = load_image_text_dataset(str(shapes_data), split="train")
    torch.manual_seed(0)
    model, processor = build_tiny_qformer(
        text_corpus(rows), vision=SMALL_VISION, qformer=SMALL_QFORMER, text_vocab_size=300,
        num_query_tokens=4, embed_dim=32, freeze_vision=False,
    )  # fmt: skip
    model.save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")

    batch_rows = [rows[i] for i in range(WORLD_SIZE * LOCAL_BATCH)]
    # Row 5 (rank 1) repeats row 1 (rank 0): a duplicate only the gathered group ids can see.
    batch_rows[LOCAL_BATCH + 1] = batch_rows[1]
    batch = ContrastiveCollator(processor, max_length=32, hard_negatives=HARD_NEGATIVES)(batch_rows)
    assert batch["group_ids"][1] == batch["group_ids"][LOCAL_BATCH + 1]
    assert batch["group_ids"].unique().numel() == WORLD_SIZE * LOCAL_BATCH - 1
    save_file(batch, str(folder / "batch.safetensors"))

    run_torchrun([ddp_qformer_worker.__file__, str(folder)], folder / "torchrun.log", nproc=WORLD_SIZE)
    return folder, [load_file(str(folder / f"rank{rank}.safetensors")) for rank in range(WORLD_SIZE)]


def test_ddp_qformer_loss_and_gradients_equal_one_process_on_the_whole_batch(model_level):
    folder, ranks = model_level
    model = AutoModel.from_pretrained(folder / "model")
    model.eval()
    output = model(**load_file(str(folder / "batch.safetensors")))
    output.loss.backward()

    # Each rank scored its rows against all 8 captions plus its own hard negatives.
    for saved in ranks:
        assert saved["logits_per_image_shape"].tolist() == [LOCAL_BATCH, WORLD_SIZE * LOCAL_BATCH + HARD_NEGATIVES]
    rank_losses = torch.stack([saved["loss"] for saved in ranks])
    loss_difference = (rank_losses.mean() - output.loss.detach()).abs().item()
    assert not torch.allclose(rank_losses[0], rank_losses[1]), "both ranks computed the same loss"

    expected = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert "vision_model.embeddings.patch_embeddings.projection.weight" in expected  # vision trains
    assert "logit_scale" in expected
    worst = 0.0
    for rank, saved in enumerate(ranks):
        got = {key.removeprefix("grad/") for key in saved if key.startswith("grad/")}
        assert got == expected.keys(), f"rank {rank}: gradients for {sorted(got ^ expected.keys())}"
        for name, grad in expected.items():
            difference = (saved[f"grad/{name}"] - grad).abs().max().item()
            assert difference < TOLERANCE, f"rank {rank}: gradient of {name} differs by {difference:.2e}"
            worst = max(worst, difference)
    print(f"\nDDP QFormerModel vs one process: |loss diff| = {loss_difference:.2e}, max |grad diff| = {worst:.2e} "
          f"over {len(expected)} tensors")
    assert loss_difference < TOLERANCE, f"mean rank loss {rank_losses.tolist()} vs one process {output.loss.item()}"


STEPS, LOCAL_TRAIN_BATCH = 3, 16


@pytest.fixture(scope="module")
def script_level(shapes_data, tmp_path_factory):
    """train_qformer under torchrun (2 x 16) and in one process (1 x 32), dropout off, same seed."""
    root = tmp_path_factory.mktemp("ddp_script")
    common = {"qformer_config": {**SMALL_QFORMER, **LEARNABLE_QFORMER}, "max_steps": STEPS, "use_cpu": True,
              "per_device_eval_batch_size": 16}
    two = root / "two_processes"
    output = run_torchrun(
        ["-m", "training.train_qformer",
         *stage1_args(shapes_data, two, per_device_train_batch_size=LOCAL_TRAIN_BATCH, **common)],
        root / "two.log",
    )  # fmt: skip
    one = root / "one_process"
    run("training.train_qformer",
        stage1_args(shapes_data, one, per_device_train_batch_size=2 * LOCAL_TRAIN_BATCH, **common), root / "one.log")
    return two, one, output


def test_torchrun_trains_stage1_on_two_processes(script_level, shapes_data):
    two, _, output = script_level
    state = trainer_state(two)
    assert state["global_step"] == STEPS
    # Each step consumed 2 x 16 samples of the 256: a single process would be at half this epoch.
    train_size = len(load_image_text_dataset(str(shapes_data), split="train"))
    assert state["log_history"][-1]["epoch"] == pytest.approx(STEPS * 2 * LOCAL_TRAIN_BATCH / train_size)
    assert (two / "model.safetensors").is_file()
    # Retrieval over the evaluation split, gathered from both processes.
    assert "eval_t2i_r1" in output and (two / "eval_results.json").is_file()


def test_torchrun_run_equals_one_process_with_the_doubled_batch(script_level):
    two, one, _ = script_level
    loss_difference, weight_difference = run_differences(
        two, one, STEPS, f"train_qformer 2x{LOCAL_TRAIN_BATCH} (torchrun) vs 1x{2 * LOCAL_TRAIN_BATCH}")
    assert loss_difference < TOLERANCE
    # Without the cross-process gather each rank would contrast 16 captions instead of 32 and differ here.
    assert weight_difference < TOLERANCE
