"""modeling.qformer_losses in one process, against formulas written out by hand here."""

import pytest
import torch
import torch.nn.functional as F

from modeling.qformer_losses import (
    contrastive_loss,
    gather_with_grad,
    itm_loss,
    query_text_similarity,
    sample_itm_negatives,
)

BATCH, QUERIES, WIDTH = 4, 3, 5


def _unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _loop_similarity(image, text, mode):
    """sim[i, j] from explicit loops over images, texts and queries."""
    sims = torch.empty(image.shape[0], text.shape[0])
    for i in range(image.shape[0]):
        for j in range(text.shape[0]):
            per_query = [float(torch.dot(image[i, q], text[j])) for q in range(image.shape[1])]
            sims[i, j] = max(per_query) if mode == "max" else sum(per_query) / len(per_query)
    return sims


def _cross_entropy(logits, targets):
    """Mean over rows of -sum_j targets[i, j] * log softmax(logits[i])[j]."""
    log_probabilities = logits - logits.exp().sum(dim=1, keepdim=True).log()
    return -(targets * log_probabilities).sum(dim=1).mean()


@pytest.mark.parametrize("mode", ["max", "mean"])
def test_query_text_similarity_matches_explicit_loops(mode):
    image, text = _unit(BATCH, QUERIES, WIDTH, seed=0), _unit(BATCH + 2, WIDTH, seed=1)
    torch.testing.assert_close(query_text_similarity(image, text, mode), _loop_similarity(image, text, mode))
    # One embedding per image: a plain cosine, whatever the mode.
    expected = _loop_similarity(image[:, :1], text, mode)
    torch.testing.assert_close(query_text_similarity(image[:, 0], text, mode), expected)


def test_max_and_mean_differ_and_unknown_modes_are_refused():
    image, text = _unit(BATCH, QUERIES, WIDTH, seed=0), _unit(BATCH, WIDTH, seed=1)
    assert (query_text_similarity(image, text, "max") > query_text_similarity(image, text, "mean")).all()
    with pytest.raises(ValueError, match="'max' or 'mean'"):
        query_text_similarity(image, text, "sum")


@pytest.mark.parametrize("mode", ["max", "mean"])
def test_contrastive_loss_matches_the_hand_written_formula(mode):
    image, text = _unit(BATCH, QUERIES, WIDTH, seed=2), _unit(BATCH, WIDTH, seed=3)
    scale = torch.tensor(14.0)
    output = contrastive_loss(image, text, scale, similarity=mode)

    logits = scale * _loop_similarity(image, text, mode)
    one_hot = torch.eye(BATCH)
    expected = (_cross_entropy(logits, one_hot) + _cross_entropy(logits.T, one_hot)) / 2
    torch.testing.assert_close(output.loss, expected)
    torch.testing.assert_close(output.logits_per_image, logits)
    torch.testing.assert_close(output.logits_per_text, logits.T)
    assert output.labels.tolist() == list(range(BATCH))
    torch.testing.assert_close(output.targets, one_hot)
    # Not distributed: gathering is the identity and changes nothing.
    assert gather_with_grad(text) is text
    torch.testing.assert_close(contrastive_loss(image, text, scale, similarity=mode, gather=False).loss, output.loss)


def test_logit_scale_is_clamped_at_100_like_clip():
    image, text = _unit(BATCH, QUERIES, WIDTH, seed=4), _unit(BATCH, WIDTH, seed=5)
    too_large = torch.tensor(1000.0, requires_grad=True)
    clamped = contrastive_loss(image, text, too_large)
    torch.testing.assert_close(clamped.loss, contrastive_loss(image, text, torch.tensor(100.0)).loss)
    clamped.loss.backward()
    assert too_large.grad.item() == 0.0


def test_group_ids_give_soft_targets_uniform_over_the_group():
    image, text = _unit(BATCH, QUERIES, WIDTH, seed=6), _unit(BATCH, WIDTH, seed=7)
    scale = torch.tensor(10.0)
    output = contrastive_loss(image, text, scale, group_ids=torch.tensor([5, 9, 5, 2]))

    targets = torch.tensor([[0.5, 0, 0.5, 0], [0, 1, 0, 0], [0.5, 0, 0.5, 0], [0, 0, 0, 1]])
    logits = scale * _loop_similarity(image, text, "max")
    expected = (_cross_entropy(logits, targets) + _cross_entropy(logits.T, targets)) / 2
    torch.testing.assert_close(output.targets, targets)
    torch.testing.assert_close(output.loss, expected)
    assert output.group_ids.tolist() == [5, 9, 5, 2]


def test_identical_captions_are_not_pushed_apart_as_negatives():
    image = _unit(BATCH, QUERIES, WIDTH, seed=8)
    base_text = _unit(BATCH, WIDTH, seed=9)
    base_text[2] = base_text[0]  # pairs 0 and 2: two images with the same caption
    scale = torch.tensor(10.0)

    def loss_and_text_gradient(group_ids):
        text = base_text.clone().requires_grad_()
        loss = contrastive_loss(image, text, scale, group_ids=group_ids).loss
        loss.backward()
        return loss.detach(), text.grad

    soft_loss, soft_gradient = loss_and_text_gradient(torch.tensor([0, 1, 0, 2]))
    hard_loss, hard_gradient = loss_and_text_gradient(None)
    # Identical captions have identical logits, so in value the soft loss is lower or equal to
    # treating them as negatives: here exactly equal, as the log-probabilities of the two copies match.
    assert soft_loss <= hard_loss + 1e-6
    torch.testing.assert_close(soft_loss, hard_loss)
    # Where they differ is which copy each image is told to prefer: soft targets treat the two
    # copies alike, hard targets pull image 0 to caption 0 and push it from caption 2 (and back).
    torch.testing.assert_close(soft_gradient[0], soft_gradient[2])
    assert not torch.allclose(hard_gradient[0], hard_gradient[2], atol=1e-4)


@pytest.mark.parametrize("mode", ["max", "mean"])
def test_negative_text_embeds_are_extra_columns_that_are_never_targets(mode):
    image, text = _unit(BATCH, QUERIES, WIDTH, seed=10), _unit(BATCH, WIDTH, seed=11)
    negatives = _unit(BATCH, 2, WIDTH, seed=12)
    negatives[0, 1] = text[0]  # a negative equal to the positive still only counts against it
    scale = torch.tensor(12.0)
    output = contrastive_loss(image, text, scale, negative_text_embeds=negatives, similarity=mode)

    logits = scale * _loop_similarity(image, text, mode)
    own_negatives = torch.stack(
        [scale * _loop_similarity(image[i : i + 1], negatives[i], mode)[0] for i in range(BATCH)]
    )
    image_logits = torch.cat([logits, own_negatives], dim=1)
    image_targets = torch.cat([torch.eye(BATCH), torch.zeros(BATCH, 2)], dim=1)
    expected = (_cross_entropy(image_logits, image_targets) + _cross_entropy(logits.T, torch.eye(BATCH))) / 2
    torch.testing.assert_close(output.logits_per_image, image_logits)
    torch.testing.assert_close(output.logits_per_text, logits.T)  # text->image is untouched
    torch.testing.assert_close(output.loss, expected)
    assert output.loss > contrastive_loss(image, text, scale, similarity=mode).loss


def test_inconsistent_inputs_are_refused_by_name():
    image, text = _unit(BATCH, QUERIES, WIDTH, seed=13), _unit(BATCH, WIDTH, seed=14)
    scale = torch.tensor(10.0)
    with pytest.raises(ValueError, match="image_embeds"):
        contrastive_loss(image[:2], text, scale)
    with pytest.raises(ValueError, match="group_ids"):
        contrastive_loss(image, text, scale, group_ids=torch.zeros(BATCH + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="negative_text_embeds"):
        contrastive_loss(image, text, scale, negative_text_embeds=_unit(BATCH, WIDTH, seed=15))


def _masked_softmax(similarity, allowed):
    weights = similarity.exp() * allowed
    return weights / weights.sum(dim=1, keepdim=True)


def test_itm_negatives_skip_the_own_group_and_follow_the_masked_softmax():
    group_ids = torch.tensor([0, 1, 0, 2, 3, 3])
    sim_i2t = 3 * torch.randn(6, 6, generator=torch.Generator().manual_seed(16))
    sim_t2i = 3 * torch.randn(6, 6, generator=torch.Generator().manual_seed(17))
    generator = torch.Generator().manual_seed(18)
    draws = 3000
    texts, images = zip(*(sample_itm_negatives(sim_i2t, sim_t2i, group_ids, generator) for _ in range(draws)))
    texts, images = torch.stack(texts), torch.stack(images)  # [draws, 6]

    allowed = group_ids[:, None] != group_ids[None, :]
    for drawn, similarity in ((texts, sim_i2t), (images, sim_t2i)):
        assert (group_ids[drawn] != group_ids).all(), "drew a column of the row's own group"
        frequencies = F.one_hot(drawn, 6).float().mean(dim=0)  # [row, column]
        torch.testing.assert_close(frequencies, _masked_softmax(similarity, allowed), atol=0.04, rtol=0)


def test_itm_negatives_without_group_ids_skip_only_the_own_pair():
    sim = torch.zeros(3, 3)
    drawn = torch.stack([sample_itm_negatives(sim, sim)[0] for _ in range(200)])
    assert (drawn != torch.arange(3)).all()
    assert set(drawn[:, 0].tolist()) == {1, 2}


def test_itm_negatives_fall_back_to_uniform_when_the_softmax_is_unusable():
    group_ids = torch.tensor([0, 0, 1, 2])
    sim = torch.randn(4, 4, generator=torch.Generator().manual_seed(19))
    sim[0, 2:] = float("-inf")  # every allowed column impossible: softmax has nothing to normalise
    sim[1, 3] = float("nan")
    generator = torch.Generator().manual_seed(20)
    drawn = torch.stack([sample_itm_negatives(sim, sim, group_ids, generator)[0] for _ in range(400)])
    assert (group_ids[drawn] != group_ids).all()
    for row in (0, 1):
        counts = torch.bincount(drawn[:, row], minlength=4)
        assert counts[:2].sum() == 0 and (counts[2:] > 120).all(), f"row {row}: not uniform over 2 and 3: {counts}"


def test_itm_negatives_in_a_batch_of_duplicates_raise_a_clear_error():
    sim = torch.randn(4, 4)
    with pytest.raises(ValueError, match="every sample is a duplicate"):
        sample_itm_negatives(sim, sim, torch.full((4,), 7))


def test_itm_negatives_refuse_similarities_that_still_carry_hard_negative_columns():
    image, text = _unit(BATCH, QUERIES, WIDTH, seed=21), _unit(BATCH, WIDTH, seed=22)
    output = contrastive_loss(image, text, torch.tensor(10.0), negative_text_embeds=_unit(BATCH, 2, WIDTH, seed=23))
    with pytest.raises(ValueError, match="slice hard-negative columns off"):
        sample_itm_negatives(output.logits_per_image, output.logits_per_text)
    columns = output.logits_per_text.shape[1]
    sample_itm_negatives(output.logits_per_image[:, :columns], output.logits_per_text)


def test_itm_loss_is_cross_entropy_with_label_1_for_a_match():
    logits = torch.tensor([[0.2, 1.5], [2.0, -1.0], [0.0, 0.0]])
    labels = torch.tensor([1, 0, 1])
    expected = -torch.stack([logits[i].softmax(0)[labels[i]].log() for i in range(3)]).mean()
    torch.testing.assert_close(itm_loss(logits, labels), expected)
    with pytest.raises(ValueError, match="itm_logits must be"):
        itm_loss(logits[:, :1], labels)
