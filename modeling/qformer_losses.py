"""Stage-1 losses: image-text contrastive (ITC) and image-text matching (ITM) with hard negatives.

Correct under data parallelism the way open_clip's "local loss" is: every process scores its own
rows against the columns gathered from all processes (gathered with gradient), with targets offset
by ``rank * local_batch``. Under DDP, whose gradient averaging divides by the world size, the
gradients then equal those of one process holding the concatenated batch, and the mean of the
per-process losses equals that process's loss.

Shapes: ``B`` local batch, ``W`` world size, ``N = W * B`` gathered batch, ``Q`` query tokens,
``D`` embedding width, ``K`` extra hard negatives per image.
"""

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

Similarity = Literal["max", "mean"]

# CLIP caps the learnable inverse temperature at 100 so that logits cannot blow up.
MAX_LOGIT_SCALE = 100.0


def _distributed_world_size() -> int:
    # Ask torch's default process group itself: it is the group the collectives below run on,
    # whoever created it (accelerate, torchrun, a user's own init_process_group).
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _all_gather_dim0(tensor: torch.Tensor) -> torch.Tensor:
    # torch's functional collectives carry gradients back with a sum over processes (a
    # reduce-scatter). Not torch.distributed.nn.functional.all_gather: on gloo (torch 2.13) its
    # backward returns wrong gradients when the incoming gradient is non-contiguous, which the
    # "max" similarity produces. all_gather_single is the 2.13 name; older torch has the same op
    # as all_gather_tensor_autograd.
    from torch.distributed import _functional_collectives as functional

    gather = getattr(functional, "all_gather_single", None) or functional.all_gather_tensor_autograd
    return gather(tensor.contiguous(), 0, dist.group.WORLD)


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all processes along dim 0, gradient flowing back to each owner.

    Args:
        tensor: Tensor[B, ...], the same shape on every process.

    Returns:
        Tensor[W * B, ...], process 0's rows first. ``tensor`` itself when not distributed or
        with a single process.

    The backward pass sums each gathered slice's gradient over processes and hands it to the
    process that owns the slice; with DDP's averaging this yields the one-process gradient.
    """
    if _distributed_world_size() == 1:
        return tensor
    # Unequal sizes make the collective abort the process (seen with gloo) instead of raising;
    # one tiny gather of the sizes turns that into an error that says what to change.
    sizes = _all_gather_dim0(torch.tensor([tensor.shape[0]], device=tensor.device))
    if bool((sizes != tensor.shape[0]).any()):
        raise ValueError(
            f"gather_with_grad needs the same local batch size on every process, got {sizes.tolist()}: "
            "drop the last incomplete batch (dataloader_drop_last=True) or keep accelerate's "
            "even_batches=True."
        )
    return _all_gather_dim0(tensor)


def _columns(tensor: torch.Tensor, gather: bool) -> torch.Tensor:
    """The columns this process scores against: everyone's rows, or only its own."""
    return gather_with_grad(tensor) if gather else tensor


def _row_offset(batch: int, gather: bool) -> int:
    """The gathered column where this process's own rows start."""
    if not gather or _distributed_world_size() == 1:
        return 0
    return dist.get_rank() * batch


def query_text_similarity(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, mode: Similarity = "max"
) -> torch.Tensor:
    """Cosine similarity between images (one or Q embeddings each) and texts.

    Args:
        image_embeds: Tensor[N_img, Q, D] per-query embeddings, or Tensor[N_img, D]; L2-normalised.
        text_embeds: Tensor[N_txt, D], L2-normalised.
        mode: with per-query embeddings, "max" takes the best-matching query (BLIP-2's ITC),
            "mean" averages the cosine over the queries.

    Returns:
        Tensor[N_img, N_txt]. The one definition shared by the loss, the model and evaluation.
    """
    if mode not in ("max", "mean"):
        raise ValueError(f"similarity mode must be 'max' or 'mean', got {mode!r}")
    if image_embeds.dim() == 2:
        return image_embeds @ text_embeds.T
    if image_embeds.dim() != 3:
        raise ValueError(f"image_embeds must be [N, Q, D] or [N, D], got shape {tuple(image_embeds.shape)}")
    if mode == "mean":
        # The mean of dot products is the dot product with the mean query: no [N_img, N_txt, Q] tensor.
        return image_embeds.mean(dim=1) @ text_embeds.T
    return torch.einsum("iqd,td->itq", image_embeds, text_embeds).amax(dim=-1)


@dataclass
class ContrastiveLossOutput:
    """What `contrastive_loss` computed, for logging, retrieval accuracy and ITM negative sampling.

    Attributes:
        loss: scalar, mean of the image->text and text->image cross-entropies.
        logits_per_image: Tensor[B, N + K], local images against gathered texts (scaled), then
            each image's own K hard-negative texts.
        logits_per_text: Tensor[B, N], local texts against gathered images (scaled).
        labels: Tensor[B] long, the gathered column of each local row's own pair.
        targets: Tensor[B, N], the target distribution over gathered columns (one-hot, or uniform
            over the columns sharing the row's group id). Also the targets for text->image.
        group_ids: Tensor[N] long, the gathered group ids (each sample its own group when none given).
    """

    loss: torch.Tensor
    logits_per_image: torch.Tensor
    logits_per_text: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor
    group_ids: torch.Tensor


def _check_contrastive_inputs(image_embeds, text_embeds, group_ids, negative_text_embeds) -> None:
    if text_embeds.dim() != 2:
        raise ValueError(f"text_embeds must be [B, D], got shape {tuple(text_embeds.shape)}")
    batch, width = text_embeds.shape
    if image_embeds.shape[0] != batch or image_embeds.shape[-1] != width:
        raise ValueError(
            f"image_embeds {tuple(image_embeds.shape)} must be [B, Q, D] or [B, D] with the B and D "
            f"of text_embeds {tuple(text_embeds.shape)}"
        )
    if group_ids is not None and tuple(group_ids.shape) != (batch,):
        raise ValueError(f"group_ids must be Tensor[{batch}] (one id per pair), got shape {tuple(group_ids.shape)}")
    if negative_text_embeds is not None and (
        negative_text_embeds.dim() != 3
        or negative_text_embeds.shape[0] != batch
        or negative_text_embeds.shape[-1] != width
    ):
        raise ValueError(
            f"negative_text_embeds must be [B, K, D] = [{batch}, K, {width}], got {tuple(negative_text_embeds.shape)}"
        )


def contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    group_ids: torch.Tensor | None = None,
    negative_text_embeds: torch.Tensor | None = None,
    similarity: Similarity = "max",
    gather: bool = True,
) -> ContrastiveLossOutput:
    """Symmetric image-text contrastive loss (InfoNCE), correct across processes.

    Args:
        image_embeds: Tensor[B, Q, D] per-query (or Tensor[B, D]) image embeddings, L2-normalised.
        text_embeds: Tensor[B, D] text embeddings, L2-normalised; row i pairs with image i.
        logit_scale: scalar tensor, the inverse temperature already exponentiated; clamped to 100.
        group_ids: Tensor[B] long, optional. Pairs sharing an id (the same scene, an identical
            caption) are all correct answers for each other: the target of a row is uniform over
            every gathered column with its id, so duplicates are never pushed apart as negatives.
            Without it every pair is its own group (one-hot targets).
        negative_text_embeds: Tensor[B, K, D], optional extra hard negatives for the image->text
            direction only, e.g. captions of the same scene with one colour swapped. Image i
            scores its own K negatives as K extra columns that are never targets; they are not
            gathered and other rows never see them.
        similarity: "max" or "mean" over queries, see `query_text_similarity`.
        gather: score local rows against the columns of all processes (True), or only the local
            ones (False: each process then sees a smaller problem).
    """
    _check_contrastive_inputs(image_embeds, text_embeds, group_ids, negative_text_embeds)
    batch = text_embeds.shape[0]
    all_images = _columns(image_embeds, gather)
    all_texts = _columns(text_embeds, gather)
    labels = _row_offset(batch, gather) + torch.arange(batch, device=text_embeds.device)
    # Ids must sit with the embeddings: NCCL gathers only device tensors.
    group_ids = labels if group_ids is None else group_ids.to(labels.device)
    all_group_ids = _columns(group_ids, gather)

    scale = logit_scale.clamp(max=MAX_LOGIT_SCALE)
    # Cross-entropy in float32 whatever the embeddings' dtype: bf16 blurs thousands of close logits.
    logits_per_image = (scale * query_text_similarity(image_embeds, all_texts, similarity)).float()
    logits_per_text = (scale * query_text_similarity(all_images, text_embeds, similarity).T).float()

    same_group = group_ids[:, None] == all_group_ids[None, :]
    targets = same_group.float() / same_group.sum(dim=1, keepdim=True)

    image_targets = targets
    if negative_text_embeds is not None:
        # Per-row similarity to the row's own negatives, through the same definition of similarity.
        own_negatives = torch.vmap(query_text_similarity, in_dims=(0, 0, None))(
            image_embeds.unsqueeze(1), negative_text_embeds, similarity
        ).squeeze(1)
        logits_per_image = torch.cat([logits_per_image, (scale * own_negatives).float()], dim=1)
        image_targets = F.pad(targets, (0, negative_text_embeds.shape[1]))

    loss = (F.cross_entropy(logits_per_image, image_targets) + F.cross_entropy(logits_per_text, targets)) / 2
    return ContrastiveLossOutput(
        loss=loss,
        logits_per_image=logits_per_image,
        logits_per_text=logits_per_text,
        labels=labels,
        targets=targets,
        group_ids=all_group_ids,
    )


def _draw_negatives(similarity: torch.Tensor, allowed: torch.Tensor, generator) -> torch.Tensor:
    """One column per row from softmax(similarity) restricted to ``allowed`` columns."""
    probabilities = similarity.float().masked_fill(~allowed, float("-inf")).softmax(dim=1)
    # A row whose allowed similarities are NaN, +inf or all -inf gives no usable distribution:
    # draw uniformly among its allowed columns instead.
    unusable = ~torch.isfinite(probabilities).all(dim=1, keepdim=True)
    probabilities = torch.where(unusable, allowed.float(), probabilities)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(1)


@torch.no_grad()
def sample_itm_negatives(
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    group_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    gather: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one hard negative per local image and per local text (BLIP-2's ITM sampling).

    Negatives are drawn from softmax(similarity) over the gathered batch with every column of the
    row's own group given zero probability, so a duplicate caption or scene is never a negative.

    Args:
        sim_i2t: Tensor[B, N], local images against gathered texts (e.g. the first N columns of
            `ContrastiveLossOutput.logits_per_image`; drop the K hard-negative columns).
        sim_t2i: Tensor[B, N], local texts against gathered images (`logits_per_text`).
        group_ids: Tensor[B] long, this process's group ids (gathered here); None: each sample
            its own group.
        generator: torch.Generator on the device of the similarities, for reproducible draws.
        gather: False when the similarities' columns are local only (N = B).

    Returns:
        (neg_text_index_per_image Tensor[B], neg_image_index_per_text Tensor[B]): indices into
        the gathered texts and images.
    """
    batch = sim_i2t.shape[0]
    if group_ids is None:
        group_ids = _row_offset(batch, gather) + torch.arange(batch, device=sim_i2t.device)
    all_group_ids = _columns(group_ids.to(sim_i2t.device), gather)
    expected = (batch, all_group_ids.shape[0])
    if tuple(sim_i2t.shape) != expected or tuple(sim_t2i.shape) != expected:
        raise ValueError(
            f"sim_i2t {tuple(sim_i2t.shape)} and sim_t2i {tuple(sim_t2i.shape)} must both be "
            f"[local batch, gathered batch] = {list(expected)}; slice hard-negative columns off "
            "logits_per_image, and pass gather=False if the columns are local only"
        )
    allowed = group_ids[:, None] != all_group_ids[None, :]
    if not bool(allowed.any(dim=1).all()):
        raise ValueError(
            "no ITM negative exists: every sample in the (gathered) batch has the same group id, "
            "a batch where every sample is a duplicate of one scene/caption. Shuffle the data or "
            "use larger batches so that a batch holds more than one group."
        )
    return _draw_negatives(sim_i2t, allowed, generator), _draw_negatives(sim_t2i, allowed, generator)


def itm_loss(itm_logits: torch.Tensor, itm_labels: torch.Tensor) -> torch.Tensor:
    """Image-text matching cross-entropy.

    Args:
        itm_logits: Tensor[N, 2], scores for (no match, match).
        itm_labels: Tensor[N] long, 1 for a matching pair, 0 for a negative.
    """
    if itm_logits.dim() != 2 or itm_logits.shape[1] != 2 or tuple(itm_labels.shape) != (itm_logits.shape[0],):
        raise ValueError(
            f"itm_logits must be [N, 2] and itm_labels [N], got {tuple(itm_logits.shape)} and {tuple(itm_labels.shape)}"
        )
    return F.cross_entropy(itm_logits.float(), itm_labels)
