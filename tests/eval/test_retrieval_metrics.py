"""Recall@K and ranks from similarity matrices whose answers are known."""

import itertools
import math
from statistics import median

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from eval.retrieval import retrieval_metrics, similarity_grid


def test_hand_built_three_by_three():
    # rows: images, columns: texts; image i belongs with text i.
    similarity = torch.tensor([
        [0.9, 0.1, 0.5],  # image 0: its text 0 is the top score            -> rank 1
        [0.8, 0.2, 0.3],  # image 1: 0.8 and 0.3 beat its 0.2               -> rank 3
        [0.4, 0.6, 0.7],  # image 2: its text 2 is the top score            -> rank 1
    ])
    # texts (columns): text 0 -> 0.9 first -> 1; text 1 -> 0.6 beats 0.2 -> 2; text 2 -> 0.7 first -> 1
    m = retrieval_metrics(similarity)
    assert m["i2t_r1"] == pytest.approx(2 / 3) and m["i2t_r5"] == 1.0 and m["i2t_r10"] == 1.0
    assert m["i2t_mean_rank"] == pytest.approx(5 / 3) and m["i2t_median_rank"] == 1.0
    assert m["t2i_r1"] == pytest.approx(2 / 3) and m["t2i_r5"] == 1.0
    assert m["t2i_mean_rank"] == pytest.approx(4 / 3) and m["t2i_median_rank"] == 1.0


def _sorted_rank(scores: list[float], correct: int) -> int:
    """1-based position of `correct` when the candidates are sorted by score, best first (no ties)."""
    order = sorted(range(len(scores)), key=lambda c: -scores[c])
    return order.index(correct) + 1


def test_distinct_scores_match_a_plain_sort():
    # 15 x 15 with all-distinct scores, so a plain sort gives the one true rank of every pair.
    generator = torch.Generator().manual_seed(0)
    similarity = torch.randperm(225, generator=generator).reshape(15, 15).float() / 225
    i2t = [_sorted_rank(similarity[i].tolist(), i) for i in range(15)]
    t2i = [_sorted_rank(similarity[:, t].tolist(), t) for t in range(15)]
    assert len(set(i2t)) > 4  # the ranks spread over R@1, R@5 and R@10 boundaries
    m = retrieval_metrics(similarity)
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            assert m[f"{name}_r{k}"] == pytest.approx(sum(r <= k for r in ranks) / 15)
        assert m[f"{name}_mean_rank"] == pytest.approx(sum(ranks) / 15)
        assert m[f"{name}_median_rank"] == median(ranks)


def test_duplicates_are_credited():
    # Images 0 and 1 show the same scene (group "a"); so do texts 0 and 1.
    similarity = torch.tensor([
        [0.5, 0.9, 0.1, 0.0],  # image 0 prefers text 1, its duplicate: a hit at rank 1
        [0.2, 0.3, 0.6, 0.1],  # image 1: text 2 (group b) first, then text 1 (group a) -> rank 2
        [0.1, 0.2, 0.7, 0.3],
        [0.0, 0.1, 0.2, 0.6],
    ])
    groups = ["a", "a", "b", "c"]
    m = retrieval_metrics(similarity, groups, groups)
    assert m["i2t_r1"] == pytest.approx(3 / 4) and m["i2t_mean_rank"] == pytest.approx(5 / 4)
    # text 0's best image is image 0 (0.5); text 1's is image 0 (0.9), a duplicate; texts 2 and 3
    # find their own image first: every text ranks 1.
    assert m["t2i_r1"] == 1.0 and m["t2i_mean_rank"] == 1.0
    # Without group ids, image 0 (0.9 on text 1 beats its 0.5) and image 1 (0.6 beats 0.3) miss at
    # rank 2, and text 1 (image 0's 0.9 beats image 1's 0.3) misses at rank 2.
    plain = retrieval_metrics(similarity)
    assert plain["i2t_r1"] == pytest.approx(2 / 4) and plain["t2i_r1"] == pytest.approx(3 / 4)


def test_perfect_model_scores_one():
    groups = [0, 0, 1, 2, 3, 3, 3, 4, 5, 6, 7, 8]
    similarity = torch.tensor([[float(a == b) for b in groups] for a in groups])
    m = retrieval_metrics(similarity, groups, groups)
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10",
                "i2t_mean_rank", "i2t_median_rank", "t2i_mean_rank", "t2i_median_rank"):
        assert m[key] == 1.0, key


@pytest.mark.parametrize("group_size", [1, 2])
def test_constant_model_is_at_chance(group_size):
    """Chance: the correct candidates sit at uniformly random places among the N candidates.

    With P correct of N, P(none in the top K) = C(N-P, K) / C(N, K), so Recall@K = 1 - that
    (K/N for P = 1), and the first correct one's expected place is (N+1)/(P+1).
    """
    n = 20
    groups = [i // group_size for i in range(n)]
    m = retrieval_metrics(torch.full((n, n), 0.3), groups, groups)
    p = group_size
    for k in (1, 5, 10):
        chance = 1 - math.comb(n - p, k) / math.comb(n, k)
        assert m[f"i2t_r{k}"] == pytest.approx(chance) and m[f"t2i_r{k}"] == pytest.approx(chance)
    assert m["i2t_mean_rank"] == pytest.approx((n + 1) / (p + 1))
    if group_size == 1:
        assert m["i2t_r1"] == pytest.approx(1 / n) and m["i2t_r10"] == pytest.approx(10 / n)


def _brute_force_expectation(scores: list[list[int]], positives: list[list[bool]], k: int) -> tuple[float, float]:
    """Mean over queries of P(hit in top k) and of the first-hit rank, by trying every tie-break order."""
    recalls, ranks = [], []
    for row, pos in zip(scores, positives):
        candidates = range(len(row))
        orders = list(itertools.permutations(candidates))
        first_hits = []
        for tie_break in orders:
            ranked = sorted(candidates, key=lambda c: (-row[c], tie_break[c]))
            first_hits.append(next(place for place, c in enumerate(ranked, 1) if pos[c]))
        recalls.append(sum(h <= k for h in first_hits) / len(orders))
        ranks.append(sum(first_hits) / len(orders))
    return sum(recalls) / len(recalls), sum(ranks) / len(ranks)


@settings(max_examples=25, deadline=None)
@given(data=st.data(), n_img=st.integers(2, 5), n_txt=st.integers(2, 5))
def test_ties_count_at_their_expected_value(data, n_img, n_txt):
    # Scores from {0, 1, 2} make ties common; groups are drawn so that each group has both sides.
    n_groups = data.draw(st.integers(1, min(n_img, n_txt)))
    def ids(n: int) -> list[int]:
        extra = n - n_groups
        return list(range(n_groups)) + data.draw(st.lists(st.integers(0, n_groups - 1), min_size=extra, max_size=extra))

    image_groups, text_groups = ids(n_img), ids(n_txt)
    row = st.lists(st.integers(0, 2), min_size=n_txt, max_size=n_txt)
    scores = data.draw(st.lists(row, min_size=n_img, max_size=n_img))
    m = retrieval_metrics(torch.tensor(scores, dtype=torch.float32), image_groups, text_groups)
    pos = [[a == b for b in text_groups] for a in image_groups]
    columns = [list(c) for c in zip(*scores)]
    for k in (1, 5):
        i2t_recall, i2t_rank = _brute_force_expectation(scores, pos, k)
        t2i_recall, t2i_rank = _brute_force_expectation(columns, [list(c) for c in zip(*pos)], k)
        assert m[f"i2t_r{k}"] == pytest.approx(i2t_recall) and m[f"t2i_r{k}"] == pytest.approx(t2i_recall)
    assert m["i2t_mean_rank"] == pytest.approx(i2t_rank) and m["t2i_mean_rank"] == pytest.approx(t2i_rank)


def test_rejects_a_group_without_counterpart():
    with pytest.raises(ValueError, match="no counterpart"):
        retrieval_metrics(torch.zeros(2, 2), ["a", "b"], ["a", "c"])


def test_similarity_grid_draws_the_images(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    images = [Image.new("RGB", (40, 30), c) for c in colours]
    # Dollar signs are text, not TeX: a caption with two of them once failed a whole evaluation at its picture.
    captions = ["a red picture", "a green picture", "a blue picture", "costs $x^$ with no image of its own"]
    similarity = torch.tensor([[0.9, 0.1, 0.2, 0.0], [0.3, 0.8, 0.1, 0.2], [0.0, 0.2, 0.7, 0.1]])
    path = similarity_grid(images, captions, similarity, tmp_path / "grid.png")
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.size == (round((3.5 + 1.1 * 3) * 100), round((1.6 + 0.55 * 4) * 100))
        pixels = np.asarray(png.convert("RGB")).reshape(-1, 3)
    for colour in colours:  # each thumbnail's solid colour is in the picture
        assert (np.abs(pixels.astype(int) - colour).sum(axis=1) < 10).sum() > 500, colour
    with pytest.raises(ValueError, match="3x4"):
        similarity_grid(images[:2], captions, similarity, tmp_path / "bad.png")
