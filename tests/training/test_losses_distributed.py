"""Two real processes (torchrun, gloo, CPU) give the one-process loss and gradients of the whole batch."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.training import ddp_contrastive_worker as worker

REPO_ROOT = Path(__file__).resolve().parents[2]
WORLD_SIZE = 2
TIMEOUT_S = 180


# Slow tier (`make test`, not `make test-fast`): runs torchrun on two processes.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    """Run the worker once on two processes; what each rank saved."""
    out_dir = tmp_path_factory.mktemp("ddp_contrastive")
    command = [
        sys.executable, "-m", "torch.distributed.run",
        # --standalone: the rendezvous port is picked at bind time; a port probed free here and bound later could be
        # taken meanwhile by another test's torchrun (a CI run hung here once, possibly so).
        "--standalone", f"--nproc_per_node={WORLD_SIZE}",
        worker.__file__, str(out_dir),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    # A session of its own, so that a timeout can stop torchrun and both of its workers.
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        try:
            stdout, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # a worker outside torchrun's process group still holds the pipes
            stdout, stderr = "(not read: a worker still holds the pipes)", ""
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S}s\nstdout:\n{stdout}\nstderr:\n{stderr}")
    if process.returncode != 0:
        pytest.fail(f"torchrun exited with {process.returncode}\nstdout:\n{stdout}\nstderr:\n{stderr}")
    return [load_file(str(out_dir / f"rank{rank}.safetensors")) for rank in range(WORLD_SIZE)]


@pytest.mark.parametrize("case", worker.CASES)
def test_two_processes_match_one_process_on_the_concatenated_batch(rank_results, case):
    model = worker.build_model()
    reference = worker.compute_loss(model, worker.build_batch(), case)
    reference.loss.backward()

    rank_losses = torch.stack([saved[f"{case}/loss"] for saved in rank_results])
    loss_difference = (rank_losses.mean() - reference.loss.detach()).abs().item()
    print(f"{case}: max |mean rank loss - one-process loss| = {loss_difference:.2e}")
    assert loss_difference < 1e-5, f"mean of rank losses {rank_losses.tolist()} vs one process {reference.loss.item()}"
    # Each rank scores a different half of the rows, so a rank that ignored the other's half shows here.
    assert not torch.allclose(rank_losses[0], rank_losses[1])

    for name, parameter in model.named_parameters():
        for rank, saved in enumerate(rank_results):
            difference = (saved[f"{case}/grad/{name}"] - parameter.grad).abs().max().item()
            print(f"{case}: rank {rank} {name}: max |grad difference| = {difference:.2e}")
            assert difference < 1e-5, f"gradient of {name} on rank {rank} differs by {difference}"


def test_itm_negatives_come_from_the_gathered_batch_and_skip_duplicates_on_the_other_rank(rank_results):
    group_ids = torch.tensor(worker.GROUP_IDS)
    local_batch = worker.GLOBAL_BATCH // WORLD_SIZE
    for rank, saved in enumerate(rank_results):
        assert saved["itm/row_offset"].item() == rank * local_batch
        row_groups = group_ids[rank * local_batch : (rank + 1) * local_batch]
        for key in ("itm/text_index_per_image", "itm/image_index_per_text"):
            drawn = saved[key]  # [draws, local batch], indices into the gathered batch
            assert (group_ids[drawn] != row_groups).all(), f"rank {rank} {key} drew a column of the row's own group"
            assert ((drawn // local_batch) != rank).any(), f"rank {rank} {key} never drew from the other rank"


def test_unequal_local_batches_are_refused_with_a_clear_error(rank_results):
    assert all(saved["uneven_batches_refused"].item() for saved in rank_results)
