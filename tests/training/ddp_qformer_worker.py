"""Two-process half of the stage-1 model equivalence test (run by torchrun, gloo, CPU).

Each rank loads the saved QFormerModel and the saved batch, wraps the model in DistributedDataParallel as the
Trainer does for a PreTrainedModel (find_unused_parameters: the ITM head gets no gradient when ITM is off), runs its
half of the batch forward and backward once, and saves its loss and the DDP-averaged gradients to
<folder>/rank<r>.safetensors. The test compares them with one process on the whole batch.

    torchrun --nproc_per_node 2 tests/training/ddp_qformer_worker.py FOLDER
"""

import sys
from pathlib import Path

import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModel

import modeling  # noqa: F401  (registers QFormerModel with AutoModel)


def rank_results(folder: Path, rank: int, world_size: int) -> dict:
    """This rank's loss, logits shape and DDP-averaged gradients."""
    model = AutoModel.from_pretrained(folder / "model")
    # Dropout off: the two runs must compute the same function (the Trainer path keeps it on).
    model.eval()
    # Rows are split in order, so negatives (K per row, contiguous) stay with their row.
    local = {key: value.chunk(world_size)[rank] for key, value in load_file(str(folder / "batch.safetensors")).items()}
    # Keep the wrapper alive through backward: its hooks average the gradients.
    ddp_model = DistributedDataParallel(model, find_unused_parameters=True)
    output = ddp_model(**local)
    output.loss.backward()
    shape = output.logits_per_image.new_tensor(output.logits_per_image.shape)
    results = {"loss": output.loss.detach(), "logits_per_image_shape": shape}
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            results[f"grad/{name}"] = parameter.grad.detach().clone()
    return results


def main(folder: Path) -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    # The DDP wrapper lives and dies inside rank_results: destroyed after its process group, its reducer hung a
    # rank at exit about one run in five here.
    results = rank_results(folder, rank, world_size)
    save_file({key: value.contiguous() for key, value in results.items()}, str(folder / f"rank{rank}.safetensors"))
    dist.barrier()
    dist.destroy_process_group()

if __name__ == "__main__":
    main(Path(sys.argv[1]))
