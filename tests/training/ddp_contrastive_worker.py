"""Two-process half of the ITC equivalence test (run by torchrun; imported by the test for the reference).

Each rank runs a tiny dual encoder, wrapped in DistributedDataParallel, on its half of one fixed
batch and computes `contrastive_loss` with gather=True. It saves to <out_dir>/rank<r>.safetensors
its loss, the DDP-averaged gradients, a few hundred ITM negative draws and whether unequal local
batches are refused. The test runs the same model on the whole batch in one process and compares.

    torchrun --nproc_per_node 2 tests/training/ddp_contrastive_worker.py OUT_DIR
"""

import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from modeling.qformer_losses import contrastive_loss, gather_with_grad, sample_itm_negatives

GLOBAL_BATCH, PIXEL_DIM, TOKEN_DIM, NUM_QUERIES, WIDTH, NUM_NEGATIVES = 8, 6, 5, 3, 4, 2
# Pairs 1 and 5 repeat one caption across the two ranks (the case that needs the gathered ids);
# pairs 2 and 3 repeat another within rank 0.
GROUP_IDS = [0, 1, 2, 2, 3, 1, 4, 5]
# name -> (similarity, with group ids); without them the targets rest on the rank offset alone.
CASES = {"max": ("max", True), "mean": ("mean", True), "max-no-groups": ("max", False)}
ITM_DRAWS = 200


class TinyDualEncoder(nn.Module):
    """Per-query image embeddings, text embeddings and a learnable inverse temperature."""

    def __init__(self):
        super().__init__()
        self.image_proj = nn.Linear(PIXEL_DIM, NUM_QUERIES * WIDTH)
        self.text_proj = nn.Linear(TOKEN_DIM, WIDTH)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, pixels, tokens, negative_tokens):
        image = F.normalize(self.image_proj(pixels).unflatten(-1, (NUM_QUERIES, WIDTH)), dim=-1)
        text = F.normalize(self.text_proj(tokens), dim=-1)
        negatives = F.normalize(self.text_proj(negative_tokens), dim=-1)
        return image, text, negatives, self.log_logit_scale.exp()


def build_model() -> TinyDualEncoder:
    torch.manual_seed(0)
    return TinyDualEncoder()


def build_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randn(GLOBAL_BATCH, TOKEN_DIM, generator=generator)
    group_ids = torch.tensor(GROUP_IDS)
    tokens = tokens[[GROUP_IDS.index(g) for g in GROUP_IDS]]  # identical captions share features
    return {
        "pixels": torch.randn(GLOBAL_BATCH, PIXEL_DIM, generator=generator),
        "tokens": tokens,
        "negative_tokens": torch.randn(GLOBAL_BATCH, NUM_NEGATIVES, TOKEN_DIM, generator=generator),
        "group_ids": group_ids,
    }


def compute_loss(model, batch, case):
    similarity, with_group_ids = CASES[case]
    image, text, negatives, logit_scale = model(batch["pixels"], batch["tokens"], batch["negative_tokens"])
    return contrastive_loss(
        image,
        text,
        logit_scale,
        group_ids=batch["group_ids"] if with_group_ids else None,
        negative_text_embeds=negatives,
        similarity=similarity,
        gather=True,
    )


def _uneven_batches_refused(rank: int) -> bool:
    try:
        gather_with_grad(torch.zeros(2 + rank, WIDTH))
    except ValueError as error:
        return "same local batch size" in str(error)
    return False


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    local = {key: value.chunk(world_size)[rank] for key, value in build_batch().items()}
    results = {}
    for case in CASES:
        model = build_model()
        # Keep the wrapper alive through backward: its reducer's hooks do the gradient averaging.
        ddp_model = nn.parallel.DistributedDataParallel(model)
        output = compute_loss(ddp_model, local, case)
        output.loss.backward()
        results[f"{case}/loss"] = output.loss.detach()
        for name, parameter in model.named_parameters():
            results[f"{case}/grad/{name}"] = parameter.grad
    # ITM draws from the last case's similarities; the group ids are what matters to them.
    columns = output.logits_per_text.shape[1]
    generator = torch.Generator().manual_seed(rank)
    draws = [
        sample_itm_negatives(
            output.logits_per_image[:, :columns], output.logits_per_text, local["group_ids"], generator
        )
        for _ in range(ITM_DRAWS)
    ]
    results["itm/text_index_per_image"] = torch.stack([text for text, _ in draws])
    results["itm/image_index_per_text"] = torch.stack([image for _, image in draws])
    results["itm/row_offset"] = output.labels[:1]
    results["uneven_batches_refused"] = torch.tensor(_uneven_batches_refused(rank))
    save_file({key: value.contiguous() for key, value in results.items()}, str(out_dir / f"rank{rank}.safetensors"))
    # Both ranks leave together: a rank that tears gloo down while the other is still in it can leave that one hung.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
