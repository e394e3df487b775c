"""The standalone MIDAS component: every formula against values worked out by hand."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmbalance.misalignment import (
    MisalignmentLoss,
    anchors_of,
    draw_sources,
    hard_sample_weights,
    misaligned_features,
    misaligned_inputs,
    official_alpha_step,
    paper_alpha_step,
    soft_labels,
    step_alpha,
)

LN = math.log
MODALITIES = ["a", "b"]


def hand_batch():
    """Two samples, two classes; features are logits (identity heads), fusion sums them.

    f^a_0 = [ln 9, 0]   -> p^a_0 = (0.9, 0.1)      f^b_0 = [ln 7, ln 3] -> p^b_0 = (0.7, 0.3)
    f^a_1 = [0, ln 4]   -> p^a_1 = (0.2, 0.8)      f^b_1 = [ln 7, ln 3] -> p^b_1 = (0.7, 0.3)
    labels (0, 1); the only partners are 0 <-> 1, so the misaligned samples are
    row 0 = (f^a_0, f^b_1), labels (0, 1), and row 1 = (f^a_1, f^b_0), labels (1, 0):
    draw_sources' layout for the one anchor 0 (V = 1), row 1 being its mirror.
    """
    features = {
        "a": torch.tensor([[LN(9), 0.0], [0.0, LN(4)]]),
        "b": torch.tensor([[LN(7), LN(3)], [LN(7), LN(3)]]),
    }
    labels = torch.tensor([0, 1])
    sources = torch.tensor([[0, 1], [1, 0]])
    return features, labels, sources


def sum_fusion(features):
    return features["a"] + features["b"]


# Worked out once for the hand batch:
# row 0: a = p^a_0[0] = 0.9, b = p^b_1[1] = 0.3 -> c = (0.75, 0.25);
#        fused = [ln 9 + ln 7, ln 3] = [ln 63, ln 3] -> p~ = (63/66, 3/66) = (21/22, 1/22)
# row 1: a = p^a_1[1] = 0.8, b = p^b_0[0] = 0.7 -> c = (0.8/1.5, 0.7/1.5) = (8/15, 7/15);
#        fused = [ln 7, ln 4 + ln 3] = [ln 7, ln 12] -> p~ = (7/19, 12/19); slot a (label 1) 12/19, slot b (label 0) 7/19
# hard weights (anchor 0 for both rows): row 0 replaces slot b, s = cos(f^b_0, f^b_1) = 1 (equal features),
# w = 1 + (1 + 1)/2 = 2; row 1 replaces slot a, s = cos(f^a_0, f^a_1) = cos([ln 9, 0], [0, ln 4]) = 0, w = 1.5.
TERM_0 = -(0.75 * LN(21 / 22) + 0.25 * LN(1 / 22))  # ~ 0.807651
TERM_1 = -(8 / 15 * LN(12 / 19) + 7 / 15 * LN(7 / 19))  # ~ 0.711064


def component(**options):
    return MisalignmentLoss(MODALITIES, **options)


# -- soft labels ----------------------------------------------------------------
def test_soft_label_of_the_spec_example():
    # a = 0.9, b = 0.3: c = 0.9 / 1.2 = 0.75 and 0.3 / 1.2 = 0.25
    assert torch.allclose(soft_labels(torch.tensor([[0.9, 0.3]])), torch.tensor([[0.75, 0.25]]))
    # three slots: (0.2, 0.2, 0.6) / 1.0 stays as is; (1, 1, 2) / 4 = (0.25, 0.25, 0.5)
    c = soft_labels(torch.tensor([[0.2, 0.2, 0.6], [1.0, 1.0, 2.0]]))
    assert torch.allclose(c, torch.tensor([[0.2, 0.2, 0.6], [0.25, 0.25, 0.5]]))


# -- hard-sample weights --------------------------------------------------------------
def weights_for(u, v, similarity="cosine"):
    features = {"a": torch.tensor([[1.0, 0.0], [5.0, 5.0]]), "b": torch.tensor([u, v])}
    return hard_sample_weights(features, torch.tensor([[0, 1]]), MODALITIES, similarity, anchors=torch.tensor([0]))


def test_hard_sample_weight_from_cosine():
    assert weights_for([1.0, 2.0], [2.0, 4.0]).item() == pytest.approx(2.0)  # s = 1: 1 + 2/2
    assert weights_for([1.0, 2.0], [-1.0, -2.0]).item() == pytest.approx(1.0)  # s = -1: 1 + 0/2
    assert weights_for([1.0, 0.0], [0.0, 3.0]).item() == pytest.approx(1.5)  # s = 0: 1 + 1/2


def test_hard_sample_weight_from_l2():
    # s = 1 - |u - v|^2 / (|u|^2 + |v|^2)
    assert weights_for([1.0, 2.0], [1.0, 2.0], "l2").item() == pytest.approx(2.0)  # u = v: s = 1
    assert weights_for([1.0, 2.0], [-1.0, -2.0], "l2").item() == pytest.approx(1.0)  # u = -v: 1 - 20/10 = -1
    assert weights_for([1.0, 0.0], [0.0, 1.0], "l2").item() == pytest.approx(1.5)  # 1 - 2/2 = 0
    # same direction, different length: cosine says 1, l2 says 1 - 1/5 = 0.8 -> w = 1 + 1.8/2 = 1.9
    assert weights_for([2.0, 0.0], [1.0, 0.0], "l2").item() == pytest.approx(1.9)
    assert weights_for([2.0, 0.0], [1.0, 0.0], "cosine").item() == pytest.approx(2.0)


def test_hard_sample_weight_averages_replaced_slots_for_three_modalities():
    features = {
        "a": torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
        "b": torch.tensor([[1.0, 0.0], [0.0, 1.0]]),  # cos(b_0, b_1) = 0
        "c": torch.tensor([[1.0, 0.0], [2.0, 0.0]]),  # cos(c_0, c_1) = 1
    }
    sources = torch.tensor(
        [
            [0, 1, 1],  # base 0, b and c replaced: s = (0 + 1)/2 = 0.5 -> w = 1 + 1.5/2 = 1.75
            [0, 0, 1],  # only c replaced: s = 1 -> w = 2
            [0, 1, 0],  # only b replaced: s = 0 -> w = 1.5
            [1, 0, 0],  # base 1, b and c replaced: same pairs as row 0 -> 1.75
            [0, 0, 0],  # nothing replaced (only without the label check): s = 1 -> 2
        ]
    )
    # not draw_sources' layout (5 rows): each row's anchor, its base, is given; here it is slot 0's source
    w = hard_sample_weights(features, sources, ["a", "b", "c"], anchors=torch.tensor([0, 0, 0, 1, 0]))
    assert torch.allclose(w, torch.tensor([1.75, 2.0, 1.5, 1.75, 2.0]))


def test_mirrored_pair_reads_the_replaced_modality():
    # labels (0, 1): anchor 0's partner is 1 and anchor 1's is 0, so draw_sources is deterministic:
    # shift 0 rows (0, 1), (1, 0) with anchors 0, 1; shift 1 rows (1, 0), (0, 1), the mirrors, anchors 0, 1.
    sources, _ = draw_sources(torch.tensor([0, 1]), 2)
    assert torch.equal(sources, torch.tensor([[0, 1], [1, 0], [1, 0], [0, 1]]))
    assert torch.equal(anchors_of(sources), torch.tensor([0, 1, 0, 1]))
    features = {"a": torch.tensor([[3.0, 4.0], [1.0, 0.0]]), "b": torch.tensor([[1.0, 0.0], [0.0, 2.0]])}
    # first half, slot b replaced: cos(f^b_0, f^b_1) = 0 -> w = 1 + (0 + 1)/2 = 1.5
    # mirrored half, slot a replaced: cos(f^a_0, f^a_1) = 3 / (5 * 1) = 0.6 -> w = 1 + 1.6/2 = 1.8
    # (reading every row from slot 0 gives 1.5 for all four)
    w = hard_sample_weights(features, sources, MODALITIES)
    assert torch.allclose(w, torch.tensor([1.5, 1.5, 1.8, 1.8]))
    # l2, s = 1 - |u - v|^2 / (|u|^2 + |v|^2): b: 1 - 5/5 = 0 -> w = 1.5; a: 1 - 20/26 = 3/13 -> w = 1 + 8/13 = 21/13
    w = hard_sample_weights(features, sources, MODALITIES, "l2")
    assert torch.allclose(w, torch.tensor([1.5, 1.5, 21 / 13, 21 / 13]))


def test_hard_sample_weight_reads_each_row_from_its_anchor_for_three_modalities():
    features = {
        "a": torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]),  # cos(a0, a1) = 0, cos(a0, a2) = -1
        "b": torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]]),  # cos(b0, b1) = 1, cos(b0, b2) = 0
        "c": torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 1.0]]),  # cos(c0, c1) = 0.6, cos(c0, c2) = 0.8
    }
    # draw_sources' layout for V = 2 anchors: groups (0, 1, 2) and (1, 0, 1) (the anchor may recur),
    # shift k fills slot m from member (m + k) mod 3; rows are shift-major.
    sources = torch.tensor(
        [
            [0, 1, 2],  # anchor 0; b, c replaced: s = (cos(b0, b1) + cos(c0, c2))/2 = (1 + 0.8)/2 = 0.9 -> w = 1.95
            [1, 0, 1],  # anchor 1; b replaced: s = cos(b1, b0) = 1 -> w = 2
            [1, 2, 0],  # anchor 0; a, b replaced: s = (cos(a0, a1) + cos(b0, b2))/2 = 0 -> w = 1.5
            [0, 1, 1],  # anchor 1; a replaced: s = cos(a1, a0) = 0 -> w = 1.5
            [2, 0, 1],  # anchor 0; a, c replaced: s = (cos(a0, a2) + cos(c0, c1))/2 = (-1 + 0.6)/2 = -0.2 -> w = 1.4
            [1, 1, 0],  # anchor 1; c replaced: s = cos(c1, c0) = 0.6 -> w = 1.8
        ]
    )
    assert torch.equal(anchors_of(sources), torch.tensor([0, 1, 0, 1, 0, 1]))
    # (reading every row from slot 0 gives 1.65, 1.9, 1.5 for rows 2, 3, 4)
    w = hard_sample_weights(features, sources, ["a", "b", "c"])
    assert torch.allclose(w, torch.tensor([1.95, 2.0, 1.5, 1.5, 1.4, 1.8]))


# -- alpha ---------------------------------------------------------------------
def test_paper_alpha_step_moves_only_the_weakest_modality():
    alpha = torch.tensor([1.0, 1.0, 1.3])
    # mean c = (0.5, 0.2, 0.3): slot 1 is the least confident; its mean q is 0.1
    weak, delta = paper_alpha_step(torch.tensor([0.5, 0.2, 0.3]), torch.tensor([0.6, 0.1, 0.3]))
    assert weak.item() == 1 and delta.item() == pytest.approx(0.1)  # 0.2 - 0.1
    new = step_alpha(alpha, weak, delta, eta=0.5)
    assert torch.allclose(new, torch.tensor([1.0, 1.05, 1.3]))  # 1 + 0.5 * 0.1; others untouched


def test_paper_alpha_step_decreases_and_floors_at_one():
    # Δα = 0.2 - 0.5 = -0.3, η = 0.5: 1.5 -> 1.5 - 0.15 = 1.35
    weak, delta = paper_alpha_step(torch.tensor([0.8, 0.2]), torch.tensor([0.5, 0.5]))
    assert weak.item() == 1 and delta.item() == pytest.approx(-0.3)
    assert torch.allclose(step_alpha(torch.tensor([1.0, 1.5]), weak, delta, eta=0.5), torch.tensor([1.0, 1.35]))
    # from 1.05 the same step would give 0.9: floored at 1
    assert torch.allclose(step_alpha(torch.tensor([1.0, 1.05]), weak, delta, eta=0.5), torch.tensor([1.0, 1.0]))


def test_sign_rule_moves_by_eta():
    weak, delta = paper_alpha_step(torch.tensor([0.7, 0.3]), torch.tensor([0.9, 0.1]), rule="sign")
    assert weak.item() == 1 and delta.item() == 1.0  # sign(0.3 - 0.1)
    assert torch.allclose(step_alpha(torch.ones(2), weak, delta, eta=0.05), torch.tensor([1.0, 1.05]))
    _, delta = paper_alpha_step(torch.tensor([0.7, 0.3]), torch.tensor([0.2, 0.8]), rule="sign")
    assert delta.item() == -1.0  # sign(0.3 - 0.8)


def test_official_alpha_step_compares_ratios_and_clamps():
    # unimodal means (0.8, 0.4): weak b, dominant a, ratio 2. Fused ratio 0.6/0.2 = 3 > 2 -> +1
    weak, delta = official_alpha_step(torch.tensor([0.8, 0.4]), torch.tensor([0.6, 0.2]))
    assert weak.item() == 1 and delta.item() == 1.0
    # fused ratio 0.5/0.4 = 1.25 < 2 -> -1
    assert official_alpha_step(torch.tensor([0.8, 0.4]), torch.tensor([0.5, 0.4]))[1].item() == -1.0
    # 9.98 + 0.05 = 10.03 -> capped at alpha_max = 10; 1.02 - 0.05 = 0.97 -> floored at 1
    assert torch.allclose(step_alpha(torch.tensor([1.0, 9.98]), weak, torch.tensor(1.0), 0.05, alpha_max=10.0), torch.tensor([1.0, 10.0]))
    assert torch.allclose(step_alpha(torch.tensor([1.0, 1.02]), weak, torch.tensor(-1.0), 0.05, alpha_max=10.0), torch.tensor([1.0, 1.0]))


# -- drawing misaligned samples ------------------------------------------------
@pytest.mark.parametrize("num_modalities", [2, 3])
def test_misaligned_samples_never_have_a_single_label(num_modalities):
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(1, 12, (1,), generator=generator))
        labels = torch.randint(0, 3, (n,), generator=generator)
        sources, valid = draw_sources(labels, num_modalities, generator)
        kept = int(valid.sum())
        assert sources.shape == (num_modalities * kept, num_modalities)
        source_labels = labels[sources]
        assert bool((source_labels != source_labels[:, :1]).any(dim=1).all())  # at least two labels per sample
        has_other_label = (labels[:, None] != labels[None, :]).any(dim=1)
        assert torch.equal(valid, has_other_label)  # only anchors without a partner are dropped
        assert torch.equal(sources[:kept, 0], valid.nonzero().squeeze(1))  # shift 0 starts from each anchor
        for shift in range(1, num_modalities):  # shift k is shift 0 rotated k slots: each member fills each slot once
            assert torch.equal(sources[shift * kept : (shift + 1) * kept], sources[:kept].roll(-shift, dims=1))


@pytest.mark.parametrize("num_modalities", [2, 3])
@pytest.mark.parametrize("require_distinct", [True, False])
def test_anchors_of_drawn_samples(num_modalities, require_distinct):
    generator = torch.Generator().manual_seed(3)
    for _ in range(50):
        labels = torch.randint(0, 3, (int(torch.randint(1, 10, (1,), generator=generator)),), generator=generator)
        sources, valid = draw_sources(labels, num_modalities, generator, require_distinct=require_distinct)
        anchors = anchors_of(sources)
        # row r belongs to the (r mod V)-th kept anchor, and holds it in some slot
        assert torch.equal(anchors, valid.nonzero().squeeze(1).repeat(num_modalities))
        assert bool((sources == anchors[:, None]).any(dim=1).all())
    with pytest.raises(ValueError, match="anchors"):
        anchors_of(torch.tensor([[0, 1, 2]] * 2))  # 2 rows are not 3 shifts per anchor


def test_pair_is_both_swaps_and_partner_is_uniform_over_other_labels():
    labels = torch.tensor([0, 1, 1, 1])
    generator = torch.Generator().manual_seed(1)
    counts = torch.zeros(4)
    for _ in range(3000):
        sources, _ = draw_sources(labels, 2, generator)
        assert torch.equal(sources[4:], sources[:4].flip(1))  # (x^1_i, x^2_j) and (x^1_j, x^2_i)
        counts[sources[0, 1]] += 1  # anchor 0's partner
    assert counts[0] == 0
    assert torch.allclose(counts[1:] / 3000, torch.full((3,), 1 / 3), atol=0.04)


def test_single_label_batch_gives_no_misaligned_samples_and_no_crash():
    labels = torch.zeros(5, dtype=torch.long)
    for m in (2, 3):
        sources, valid = draw_sources(labels, m, torch.Generator().manual_seed(0))
        assert sources.shape == (0, m) and not valid.any()
    midas = component()
    features = {"a": torch.randn(5, 2, requires_grad=True), "b": torch.randn(5, 2)}
    loss, stats = midas(features, features, labels, sum_fusion, torch.Generator().manual_seed(0))
    assert loss.item() == 0.0 and stats["count"].item() == 0 and stats["weak_modality"].item() == -1
    midas.update_alpha(stats)
    assert torch.equal(midas.alpha, torch.ones(2))
    assert draw_sources(torch.zeros(0, dtype=torch.long), 2)[0].shape == (0, 2)


def test_unchecked_pairs_follow_a_permutation():
    labels = torch.zeros(6, dtype=torch.long)  # every pair has equal labels, and all are used
    sources, valid = draw_sources(labels, 2, torch.Generator().manual_seed(0), require_distinct=False)
    assert valid.all() and sources.shape == (12, 2)
    assert torch.equal(sources[:6, 1].sort().values, torch.arange(6))
    assert torch.equal(sources[6:], sources[:6].flip(1))


def test_same_generator_state_same_samples():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    a = draw_sources(labels, 3, torch.Generator().manual_seed(5))[0]
    b = draw_sources(labels, 3, torch.Generator().manual_seed(5))[0]
    assert torch.equal(a, b)


def test_gathers_features_and_inputs_by_slot():
    sources = torch.tensor([[0, 2], [2, 0]])
    x = {"a": torch.arange(3.0)[:, None], "b": torch.arange(3.0)[:, None, None] * 10}  # inputs of any shape
    out = misaligned_inputs(x, sources, MODALITIES)
    assert out["a"].flatten().tolist() == [0.0, 2.0] and out["b"].flatten().tolist() == [20.0, 0.0]
    assert misaligned_features(x, sources, MODALITIES)["b"].shape == (2, 1, 1)


# -- the loss --------------------------------------------------------------------
def test_misaligned_loss_of_the_hand_batch():
    features, labels, sources = hand_batch()
    loss, stats = component()(features, features, labels, sum_fusion, sources=sources)
    # mean over the two rows of w * term, with w = (2, 1.5): (2 T0 + 1.5 T1) / 2 = T0 + 0.75 T1 ~ 1.340949
    assert loss.item() == pytest.approx(TERM_0 + 0.75 * TERM_1, rel=1e-5)
    assert stats["count"].item() == 2
    # mean c = ((0.75 + 8/15)/2, (0.25 + 7/15)/2) ~ (0.641667, 0.358333)
    assert torch.allclose(stats["confidence"], torch.tensor([(0.75 + 8 / 15) / 2, (0.25 + 7 / 15) / 2]))
    # q per slot (labels differ, so q = p~[y^(m)]): a (21/22 + 12/19)/2, b (1/22 + 7/19)/2
    assert torch.allclose(stats["fused_confidence"], torch.tensor([(21 / 22 + 12 / 19) / 2, (1 / 22 + 7 / 19) / 2]))


def test_alpha_and_hard_weighting_switches():
    features, labels, sources = hand_batch()
    midas = component(hard_weighting=False)
    midas.alpha.copy_(torch.tensor([2.0, 1.0]))
    loss, _ = midas(features, features, labels, sum_fusion, sources=sources)
    # w = 1; slot a's term doubled: T0' = -(2*0.75 ln(21/22) + 0.25 ln(1/22)), T1' = -(2*8/15 ln(12/19) + 7/15 ln(7/19))
    t0 = -(1.5 * LN(21 / 22) + 0.25 * LN(1 / 22))
    t1 = -(16 / 15 * LN(12 / 19) + 7 / 15 * LN(7 / 19))
    assert loss.item() == pytest.approx((t0 + t1) / 2, rel=1e-5)  # ~ 0.899344
    no_alpha = component(hard_weighting=False, weak_weighting=False)
    no_alpha.alpha.copy_(torch.tensor([2.0, 1.0]))  # ignored when weak weighting is off
    assert no_alpha(features, features, labels, sum_fusion, sources=sources)[0].item() == pytest.approx((TERM_0 + TERM_1) / 2, rel=1e-5)


def test_shared_labels_add_their_terms():
    # three slots, labels (0, 0, 1) with c = (0.25, 0.25, 0.5) and fused p~ = (0.5, 0.5):
    # -(0.25 ln 0.5 + 0.25 ln 0.5 + 0.5 ln 0.5) = ln 2
    features = {m: torch.zeros(2, 2) for m in "abc"}
    midas = MisalignmentLoss(list("abc"), hard_weighting=False)
    logits = {"a": torch.zeros(2, 2), "b": torch.zeros(2, 2), "c": torch.tensor([[0.0, 0.0], [-9.0, 9.0]])}
    # slot confidences: a = p^a_0[0] = 0.5, b = p^b_0[0] = 0.5, c = p^c_1[1] ~ 1 -> c ~ (0.25, 0.25, 0.5)
    loss, _ = midas(features, logits, torch.tensor([0, 1]), lambda f: f["a"], sources=torch.tensor([[0, 0, 1]]))
    assert loss.item() == pytest.approx(LN(2), rel=1e-4)


def test_update_alpha_after_the_hand_batch():
    features, labels, sources = hand_batch()
    midas = component()
    _, stats = midas(features, features, labels, sum_fusion, sources=sources)
    # m^ = b (0.358333 < 0.641667); mean q^b = (1/22 + 7/19)/2 ~ 0.206938
    # Δα = 0.358333 - 0.206938 ~ 0.151396; α_b = 1 + 0.05 * Δα ~ 1.0075698
    delta = (0.25 + 7 / 15) / 2 - (1 / 22 + 7 / 19) / 2
    assert stats["weak_modality"].item() == 1 and stats["delta_alpha"].item() == pytest.approx(delta, rel=1e-5)
    midas.update_alpha(stats)
    assert torch.allclose(midas.alpha, torch.tensor([1.0, 1 + 0.05 * delta]))


def test_official_variant_on_the_hand_batch():
    features, labels, sources = hand_batch()
    paper, official = component(), component(variant="official")
    paper_loss, _ = paper(features, features, labels, sum_fusion, sources=sources)
    official_loss, stats = official(features, features, labels, sum_fusion, sources=sources)
    assert official_loss.item() == pytest.approx(paper_loss.item())  # the same mean over the two swaps, not halved
    # unimodal means a (0.9 + 0.8)/2 = 0.85, b (0.3 + 0.7)/2 = 0.5: weak b, ratio 1.7;
    # fused means a (21/22 + 12/19)/2 ~ 0.793, b (1/22 + 7/19)/2 ~ 0.207: ratio ~ 3.83 > 1.7 -> α_b + η
    assert torch.allclose(stats["unimodal_confidence"], torch.tensor([0.85, 0.5]))
    official.update_alpha(stats)
    assert torch.allclose(official.alpha, torch.tensor([1.0, 1.05]))
    official.alpha.fill_(9.99)
    official.update_alpha(stats)
    assert official.alpha[1].item() == pytest.approx(10.0)  # clamped at alpha_max
    # the official pairing ignores labels: a one-label batch still gives 2N samples
    assert official.draw_sources(torch.zeros(4, dtype=torch.long), torch.Generator())[0].shape == (8, 2)


def test_official_loss_is_the_mean_over_misaligned_samples_not_halved():
    features, labels, sources = hand_batch()
    # both weightings off: (T0 + T1) / 2 ~ (0.807651 + 0.711064) / 2 ~ 0.759357, the mean over the K = 2 samples
    plain = component(variant="official", weak_weighting=False, hard_weighting=False)
    assert plain(features, features, labels, sum_fusion, sources=sources)[0].item() == pytest.approx((TERM_0 + TERM_1) / 2, rel=1e-5)
    # with α = (2, 1) and w = 1, the terms of test_alpha_and_hard_weighting_switches: (t0 + t1) / 2 ~ 0.899344
    weak = component(variant="official", hard_weighting=False)
    weak.alpha.copy_(torch.tensor([2.0, 1.0]))
    t0 = -(1.5 * LN(21 / 22) + 0.25 * LN(1 / 22))
    t1 = -(16 / 15 * LN(12 / 19) + 7 / 15 * LN(7 / 19))
    assert weak(features, features, labels, sum_fusion, sources=sources)[0].item() == pytest.approx((t0 + t1) / 2, rel=1e-5)
    # defaults (α = 1, w = (2, 1.5)): (2 T0 + 1.5 T1) / 2 ~ 1.340949, the paper variant's value
    official, paper = component(variant="official"), component()
    official_loss = official(features, features, labels, sum_fusion, sources=sources)[0]
    assert official_loss.item() == pytest.approx(TERM_0 + 0.75 * TERM_1, rel=1e-5)
    assert official_loss.item() == pytest.approx(paper(features, features, labels, sum_fusion, sources=sources)[0].item())


def test_no_gradient_into_the_confidences():
    features, labels, sources = hand_batch()
    features = {m: f.clone().requires_grad_() for m, f in features.items()}
    logits = {m: f.detach().clone().requires_grad_() for m, f in features.items()}
    loss, _ = component()(features, logits, labels, sum_fusion, sources=sources)
    to_logits = torch.autograd.grad(loss, list(logits.values()), retain_graph=True, allow_unused=True)
    assert all(g is None or not g.any() for g in to_logits)
    to_features = torch.autograd.grad(loss, list(features.values()))
    assert all(g.abs().sum() > 0 for g in to_features)  # the fused path is trained


def test_feature_and_input_level_agree_for_deterministic_encoders():
    torch.manual_seed(0)
    encoders = {"a": nn.Linear(3, 4), "b": nn.Linear(5, 4)}
    inputs = {"a": torch.randn(6, 3), "b": torch.randn(6, 5)}
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    fusion = nn.Linear(8, 3)

    def encode(x):
        return {m: encoders[m](x[m]) for m in MODALITIES}

    def fuse(f):
        return fusion(torch.cat([f["a"], f["b"]], 1))

    features = encode(inputs)
    sources, _ = draw_sources(labels, 2, torch.Generator().manual_seed(0))
    midas = component()
    feature_level, _ = midas(features, features, labels, fuse, sources=sources)
    input_level, _ = midas(features, features, labels, fuse, sources=sources, misaligned=lambda s: encode(misaligned_inputs(inputs, s, MODALITIES)))
    assert torch.allclose(feature_level, input_level, atol=1e-6)


def test_pooled_statistics_weight_each_process_by_its_count():
    def stats(count, confidence):
        c = torch.tensor(confidence)
        return {"count": torch.tensor(float(count)), "confidence": c, "fused_confidence": c, "unimodal_confidence": c, "fused_probability": c}

    first, second = stats(4, [0.6, 0.4]), stats(2, [0.3, 0.7])
    flat_of_second = []
    MisalignmentLoss.pool(second, lambda flat: flat_of_second.append(flat) or flat)
    pooled = MisalignmentLoss.pool(first, lambda flat: (flat + flat_of_second[0]) / 2)  # what a 2-process mean returns
    # (4 * 0.6 + 2 * 0.3) / 6 = 0.5 and (4 * 0.4 + 2 * 0.7) / 6 = 0.5
    assert torch.allclose(pooled["confidence"], torch.tensor([0.5, 0.5]))
    assert pooled["count"].item() == 3.0  # the mean count; only ratios matter


def test_state_dict_keeps_alpha():
    midas = component()
    midas.alpha.copy_(torch.tensor([1.5, 2.25]))
    restored = component()
    restored.load_state_dict(midas.state_dict())
    assert torch.equal(restored.alpha, torch.tensor([1.5, 2.25]))


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="similarity"):
        component(similarity="dot")
    with pytest.raises(ValueError, match="at least 2"):
        MisalignmentLoss(["a"])


def test_the_docstring_loop_runs_without_the_trainer():
    torch.manual_seed(0)
    encoders = nn.ModuleDict({"audio": nn.Linear(3, 4), "video": nn.Linear(5, 4)})
    heads = nn.ModuleDict({m: nn.Linear(4, 3) for m in encoders})
    fusion_layer = nn.Linear(8, 3)

    def fusion(features):
        return fusion_layer(torch.cat([features["audio"], features["video"]], 1))

    params = [*encoders.parameters(), *heads.parameters(), *fusion_layer.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.5)
    loader = [({"audio": torch.randn(8, 3), "video": torch.randn(8, 5)}, torch.randint(0, 3, (8,))) for _ in range(5)]

    midas = MisalignmentLoss(["audio", "video"], eta=1.0)
    generator = torch.Generator().manual_seed(0)
    for inputs, labels in loader:
        features = {m: encoders[m](inputs[m]) for m in midas.modalities}
        unimodal = {m: heads[m](f) for m, f in features.items()}
        fused = fusion(features)
        mis_loss, stats = midas(features, unimodal, labels, fusion, generator)
        loss = F.cross_entropy(fused, labels) + mis_loss + sum(F.cross_entropy(z, labels) for z in unimodal.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        midas.update_alpha(stats)
    assert torch.isfinite(loss) and (midas.alpha >= 1).all()
    assert "alpha" in midas.state_dict()
