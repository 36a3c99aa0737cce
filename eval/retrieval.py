"""Image-text retrieval: embeddings over a split, Recall@K and ranks both ways, and a similarity grid.

Tie rule. Scores that are exactly equal are ordered at random, and every number here is the
expectation over that random order (computed in closed form, no sampling). A model that gives
every pair the same score therefore lands exactly on chance level: with N candidates of which P
are correct, Recall@K = 1 - C(N-P, K) / C(N, K) (K/N when P = 1) and the mean rank is
(N+1)/(P+1). Ties are never resolved in the model's favour (which would make a constant model
perfect) nor against it.

Duplicates. Each image and each text carries a group id (the same scene, the same caption); a
text is correct for every image of its group and vice versa, so a retrieved duplicate is a hit.

Several texts per image (COCO and Flickr30k give five): every text is a query of its own for
text -> image, and an image -> text query is a hit at K when any of its image's texts is in the
top K. This is the standard COCO/Flickr30k protocol; the rank is that of the best-placed one.

Query subsets (e.g. the images showing a combination held out of training, and their texts): the
same ranking over every candidate, averaged over the subset's queries only.
"""

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.patches import Rectangle
from PIL import Image
from tqdm.auto import tqdm

from .figures import plt, save_figure

RECALL_AT = (1, 5, 10)
# A subset has fewer queries (a few dozen held-out images), so only its coarser recalls are reported.
SUBSET_RECALL_AT = (1, 5)


def _expected_first_hit(
    scores: torch.Tensor, positives: torch.Tensor, ks: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank of the first correct candidate per query, in expectation over random tie-breaking.

    Args:
        scores: `(Q, C)` query-candidate similarities.
        positives: `(Q, C)` bool, True where the candidate is correct for the query.
        ks: the cut-offs K of Recall@K.

    Returns:
        `(recall (Q, len(ks)), rank (Q,))`: P(first hit within the top K), and the expected 1-based
        rank of the first hit.

    Only the best-scored correct candidate matters. Let `a` be the number of candidates scored
    strictly above it (all wrong), and `p` correct and `n` wrong candidates share its exact score.
    The first hit lands at `a + j` where `j` is the first correct position in a random order of the
    `n + p` tied ones: P(j > m) = C(n, m) / C(n + p, m) and E[j] = (n + p + 1) / (p + 1).
    """
    scores = scores.double()
    best = scores.masked_fill(~positives, -math.inf).max(dim=1, keepdim=True).values
    above = (scores > best).sum(dim=1).double()
    tied = scores == best
    p = (tied & positives).sum(dim=1).double()
    n = (tied & ~positives).sum(dim=1).double()
    rank = above + (n + p + 1) / (p + 1)

    recalls = []
    for k in ks:
        m = k - above  # places left in the top K once the strictly better wrong ones are counted
        m_safe = m.clamp(min=0).minimum(n)
        # log C(n, m) - log C(n + p, m), evaluated only where 0 < m <= n (elsewhere the answer is 0 or 1)
        log_miss = (
            torch.lgamma(n + 1) - torch.lgamma(n - m_safe + 1)
            - torch.lgamma(n + p + 1) + torch.lgamma(n + p - m_safe + 1)
        )
        hit = 1.0 - torch.exp(log_miss)
        hit = torch.where(m > n, torch.ones_like(hit), hit)
        recalls.append(torch.where(m <= 0, torch.zeros_like(hit), hit))
    return torch.stack(recalls, dim=1), rank


def _group_list(ids: Sequence | torch.Tensor, name: str, expected: int) -> list:
    """Group ids (ints or strings) as a list, checked against the matrix size."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    ids = list(ids)
    if len(ids) != expected:
        raise ValueError(f"{name} has {len(ids)} entries but the similarity matrix has {expected} along that axis.")
    return ids


def retrieval_metrics(
    similarity: torch.Tensor,
    image_group_ids: Sequence | torch.Tensor | None = None,
    text_group_ids: Sequence | torch.Tensor | None = None,
    query_subsets: Mapping[str, tuple[Sequence[bool], Sequence[bool]]] | None = None,
) -> dict:
    """Recall@1/5/10 and mean/median rank, image->text (i2t) and text->image (t2i).

    Args:
        similarity: `(N_img, N_txt)` scores, higher is more similar.
        image_group_ids: `N_img` ids; `None` means image i's only correct text is text i.
        text_group_ids: `N_txt` ids; a text is correct for every image with an equal id.
        query_subsets: name -> `(N_img flags, N_txt flags)`: the image and the text queries of a subset.

    Returns:
        `i2t_r1, i2t_r5, i2t_r10, t2i_r1, t2i_r5, t2i_r10` as fractions in [0, 1], and
        `i2t_mean_rank, i2t_median_rank, t2i_mean_rank, t2i_median_rank` (1 = first). Ties count at
        their expected value under a random order (see the module docstring); the median is taken
        over the per-query expected ranks. Each query subset adds `{name: {"i2t_r1", "i2t_r5", "t2i_r1",
        "t2i_r5", "num_images", "num_texts"}}`: the recalls of its queries, ranked among all candidates.
    """
    n_img, n_txt = similarity.shape
    if image_group_ids is None and text_group_ids is None:
        if n_img != n_txt:
            raise ValueError(
                f"similarity is {n_img}x{n_txt}; pass image_group_ids and text_group_ids for a non-square matrix."
            )
        image_group_ids = text_group_ids = list(range(n_img))
    elif image_group_ids is None or text_group_ids is None:
        raise ValueError("pass both image_group_ids and text_group_ids, or neither.")
    image_ids = _group_list(image_group_ids, "image_group_ids", n_img)
    text_ids = _group_list(text_group_ids, "text_group_ids", n_txt)
    codes = {g: c for c, g in enumerate(dict.fromkeys(image_ids + text_ids))}
    image_codes = torch.tensor([codes[g] for g in image_ids])
    text_codes = torch.tensor([codes[g] for g in text_ids])
    positives = image_codes[:, None] == text_codes[None, :]
    for name, ids, has in (("image", image_ids, positives.any(1)), ("text", text_ids, positives.any(0))):
        if not bool(has.all()):
            lonely = sorted({str(ids[i]) for i in torch.nonzero(~has).flatten().tolist()})[:5]
            raise ValueError(
                f"{name} group ids {lonely} have no counterpart on the other side; "
                "every group needs at least one image and one text."
            )

    results: dict = {}
    recalls: dict[str, torch.Tensor] = {}
    similarity = similarity.detach().cpu()
    for direction, scores, pos in (("i2t", similarity, positives), ("t2i", similarity.t(), positives.t())):
        recall, rank = _expected_first_hit(scores, pos, RECALL_AT)
        recalls[direction] = recall
        for k, value in zip(RECALL_AT, recall.mean(dim=0).tolist()):
            results[f"{direction}_r{k}"] = value
        results[f"{direction}_mean_rank"] = rank.mean().item()
        results[f"{direction}_median_rank"] = float(np.median(rank.numpy()))
    for name, (image_flags, text_flags) in (query_subsets or {}).items():
        results[name] = _subset_recalls(name, recalls, {"i2t": image_flags, "t2i": text_flags})
    return results


def _subset_recalls(name: str, recalls: Mapping[str, torch.Tensor], flags: Mapping[str, Sequence[bool]]) -> dict:
    """Recall@`SUBSET_RECALL_AT` averaged over the flagged queries of each direction.

    Args:
        recalls: direction -> `(Q, len(RECALL_AT))` per-query recalls from `_expected_first_hit`.
        flags: direction -> `Q` flags, True for the subset's queries.

    Returns:
        `{"i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "num_images", "num_texts"}`.
    """
    block: dict = {}
    counts = {}
    for direction, recall in recalls.items():
        mask = torch.tensor([bool(flag) for flag in flags[direction]], dtype=torch.bool)
        if len(mask) != len(recall):
            raise ValueError(f"query subset {name!r} has {len(mask)} {direction} flags for {len(recall)} queries; "
                             "give one per query")
        if not mask.any():
            raise ValueError(f"query subset {name!r} has no {direction} query; flag at least one image and one text")
        for k in SUBSET_RECALL_AT:
            block[f"{direction}_r{k}"] = recall[mask, RECALL_AT.index(k)].mean().item()
        counts["num_images" if direction == "i2t" else "num_texts"] = int(mask.sum())
    return {**block, **counts}


@torch.no_grad()
def compute_embeddings(
    model,
    dataset,
    image_processor,
    tokenizer,
    batch_size: int = 64,
    max_length: int = 64,
    texts: Sequence[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeds every image of `dataset` and every text with a stage-1 Q-Former.

    Args:
        model: a `QFormerModel` (or a VLM's `.qformer`): `get_image_embeds(pixel_values)` and
            `get_text_embeds(input_ids, attention_mask)`.
        dataset: rows with `"image"` (PIL) and `"caption"`: a `datasets.Dataset` or a list of dicts.
        image_processor, tokenizer: the Q-Former's own processors (its text tokenizer, not an LM's).
        texts: the texts to embed; default each row's caption.

    Returns:
        `(image_embeds (N, num_queries, D), text_embeds (T, D))` on the CPU, L2-normalised.
    """
    model.eval()
    device = next(model.parameters()).device
    texts = _column(dataset, "caption") if texts is None else list(texts)
    image_embeds, text_embeds = [], []
    for start in tqdm(range(0, len(dataset), batch_size), desc="retrieval image embeddings", unit="batch"):
        images = [r["image"] for r in _rows(dataset, start, start + batch_size)]
        pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"]
        image_embeds.append(model.get_image_embeds(pixel_values.to(device, model.dtype)).float().cpu())
    for start in tqdm(range(0, len(texts), batch_size), desc="retrieval text embeddings", unit="batch"):
        text = tokenizer(
            texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length,
            return_tensors="pt",
        )
        text_embeds.append(
            model.get_text_embeds(text["input_ids"].to(device), text["attention_mask"].to(device)).float().cpu()
        )
    return torch.cat(image_embeds), torch.cat(text_embeds)


def _rows(dataset, start: int, stop: int) -> list[dict]:
    """Rows `start:stop` as dicts, from a `datasets.Dataset` (columnar slices) or a list of dicts."""
    chunk = dataset[start:stop]
    if isinstance(chunk, dict):
        return [dict(zip(chunk, values)) for values in zip(*chunk.values())]
    return list(chunk)


def similarity_grid(
    images: Sequence[Image.Image],
    captions: Sequence[str],
    similarity: torch.Tensor,
    path: str | Path,
    positives: torch.Tensor | None = None,
) -> Path:
    """Draws images across the top, captions down the side and the similarity of each pair in the cells.

    Args:
        images: `N_img` PIL images (columns).
        captions: `N_txt` captions (rows).
        similarity: `(N_img, N_txt)` cosine similarities.
        path: where the PNG goes.
        positives: `(N_img, N_txt)` bool true pairs to outline; default the diagonal (image i with caption i).

    Returns:
        `path`, a PNG of (3.5 + 1.1 N_img) x (1.6 + 0.55 N_txt) inches at 100 dpi. The true pairs get a
        red outline; in a good model they are also the brightest cells.
    """
    n_img, n_txt = similarity.shape
    if len(images) != n_img or len(captions) != n_txt:
        raise ValueError(f"similarity is {n_img}x{n_txt} but got {len(images)} images and {len(captions)} captions.")
    if positives is None:
        positives = torch.eye(n_img, n_txt, dtype=torch.bool)
    values = similarity.detach().float().cpu().t().numpy()  # rows: captions, columns: images

    # Thumbnails with a white margin, so that neighbouring pictures stay apart.
    thumbs = [
        np.pad(np.asarray(img.convert("RGB").resize((88, 88))), ((4, 4), (4, 4), (0, 0)), constant_values=255)
        for img in images
    ]
    strip = np.concatenate(thumbs, axis=1)
    fig_w, fig_h = 3.5 + 1.1 * n_img, 1.6 + 0.55 * n_txt
    fig, axes = plt.subplots(
        2, 2, figsize=(fig_w, fig_h),
        gridspec_kw={"height_ratios": [1.1, 0.55 * n_txt], "width_ratios": [1.1 * n_img, 0.15]},
    )
    (top, corner), (grid, bar) = axes
    corner.set_axis_off()
    top.imshow(strip, extent=(-0.5, n_img - 0.5, 0, 1), aspect="auto")
    top.set_axis_off()
    top.set_title("image-text similarity (outlined: true pairs)")
    # Colours span the values present: an untrained model's near-equal scores still show their order.
    low, high = values.min(), max(values.max(), values.min() + 1e-6)
    cell = grid.imshow(values, cmap="viridis", aspect="auto", vmin=low, vmax=high)
    mid = (cell.norm.vmin + cell.norm.vmax) / 2
    for t in range(n_txt):
        for i in range(n_img):
            grid.text(i, t, f"{values[t, i]:.2f}", ha="center", va="center", fontsize=8,
                      color="black" if values[t, i] > mid else "white")
            if positives[i, t]:
                grid.add_patch(Rectangle((i - 0.5, t - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
    # Captions are text, not TeX (see `eval.captioning.caption_gallery`): "$" stays a dollar sign.
    grid.set_yticks(range(n_txt), [textwrap.shorten(c, 60, placeholder="...") for c in captions], fontsize=8,
                    parse_math=False)
    grid.set_xticks(range(n_img), [str(i) for i in range(n_img)])
    grid.set_xlabel("image")
    fig.colorbar(cell, cax=bar, label="cosine")
    fig.tight_layout()
    return save_figure(fig, path)


def evaluate_retrieval(
    model,
    dataset,
    image_processor,
    tokenizer,
    out_dir: str | Path | None = None,
    batch_size: int = 64,
    grid_size: int = 8,
    texts: Sequence[Sequence[str]] | None = None,
    row_subsets: Mapping[str, Sequence[bool]] | None = None,
) -> dict:
    """Retrieval metrics of a stage-1 Q-Former over `dataset`, and the similarity grid.

    Every row gives one image and its texts: `texts[i]` when given (e.g. all five captions of a
    COCO image), else its `caption`. Rows sharing a `group_id` are duplicates of each other (rows
    without one are their own group); a text belongs to its row's group. When `out_dir` is given
    the first `grid_size` rows are drawn, each with its first text, to `out_dir/similarity_grid.png`.
    `row_subsets` (name -> one flag per row) are query subsets: a subset's image queries are its rows'
    images, its text queries their texts.

    Returns:
        `retrieval_metrics`' numbers (with a block per row subset), `num_images` and `num_pairs` (texts, each
        paired with its image).
    """
    groups = [f"row-{i}" if g is None else g for i, g in enumerate(_column(dataset, "group_id"))]
    texts = [[c] for c in _column(dataset, "caption")] if texts is None else [list(t) for t in texts]
    if len(texts) != len(groups) or not all(texts):
        raise ValueError(f"need one non-empty list of texts per row; got {len(texts)} lists for {len(groups)} rows")
    flat = [text for row_texts in texts for text in row_texts]
    text_groups = [group for group, row_texts in zip(groups, texts) for _ in row_texts]
    image_embeds, text_embeds = compute_embeddings(model, dataset, image_processor, tokenizer, batch_size, texts=flat)
    similarity = pairwise_similarity(model, image_embeds, text_embeds)
    subsets = {name: (list(flags), [flag for flag, row_texts in zip(flags, texts) for _ in row_texts])
               for name, flags in (row_subsets or {}).items()}
    metrics = {**retrieval_metrics(similarity, groups, text_groups, subsets), "num_images": len(groups),
               "num_pairs": len(flat)}
    if out_dir is not None:
        n = min(grid_size, len(groups))
        first_texts = np.cumsum([0] + [len(t) for t in texts[: n - 1]]).tolist()  # where each row's texts start
        positives = torch.tensor([[a == b for b in groups[:n]] for a in groups[:n]])
        similarity_grid(
            [r["image"] for r in _rows(dataset, 0, n)], [flat[j] for j in first_texts],
            similarity[:n, first_texts], Path(out_dir) / "similarity_grid.png", positives,
        )
    return metrics


@torch.no_grad()
def pairwise_similarity(
    model, image_embeds: torch.Tensor, text_embeds: torch.Tensor, chunk: int = 256
) -> torch.Tensor:
    """`model.similarity` of every image with every text, `(N_img, N_txt)` on the CPU.

    Computed a block of images at a time: the per-query products are `(chunk, N_txt, num_queries)`,
    which for a whole split at once would not fit in memory.
    """
    device = next(model.parameters()).device
    texts = text_embeds.to(device)
    blocks = [
        model.similarity(image_embeds[s : s + chunk].to(device), texts).float().cpu()
        for s in range(0, len(image_embeds), chunk)
    ]
    return torch.cat(blocks)


def _column(dataset, name: str) -> list:
    """One column of every row (None where missing), without decoding the images of a `datasets.Dataset`."""
    if hasattr(dataset, "column_names"):
        return list(dataset[name]) if name in dataset.column_names else [None] * len(dataset)
    return [row.get(name) for row in dataset]
