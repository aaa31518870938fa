"""The classification RoI batch (spec §4.2, §10 #9/#29, §11.5): candidates, filtering,
class-wise NMS, ranking, repetition padding and gradients, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from ctlesion.models.roi_batch import RoIBatch, build_roi_batch, repeat_pad_indices

IMAGE = (64, 64)  # (height, width)


# ---------------------------------------------------------------------------------------
# independent references
# ---------------------------------------------------------------------------------------


def softmax_row(logits: list[float]) -> list[float]:
    e = [math.exp(v) for v in logits]
    return [v / sum(e) for v in e]


def decode_clip(proposal, deltas, size=IMAGE, weights=(10.0, 10.0, 5.0, 5.0)) -> list[float]:
    """The (10, 10, 5, 5) box decoding by hand, then clipping to the image."""
    x1, y1, x2, y2 = proposal
    w, h = x2 - x1, y2 - y1
    cx, cy = x1 + 0.5 * w, y1 + 0.5 * h
    tx, ty, tw, th = deltas
    pcx, pcy = tx / weights[0] * w + cx, ty / weights[1] * h + cy
    pw, ph = math.exp(tw / weights[2]) * w, math.exp(th / weights[3]) * h
    height, width = size
    return [min(max(pcx - 0.5 * pw, 0.0), width), min(max(pcy - 0.5 * ph, 0.0), height),
            min(max(pcx + 0.5 * pw, 0.0), width), min(max(pcy + 0.5 * ph, 0.0), height)]


def original_padding(k: int, n: int, generator: torch.Generator | None) -> list[int]:
    """The original code's scheme written out: k-1 sorted distinct cut points from 1..n-2,
    bounds 0 and n, run j holds survivor j."""
    cuts = torch.randperm(n - 2, generator=generator)[: k - 1].sort()[0] + 1
    bounds = [0] + cuts.tolist() + [n]
    out: list[int] = []
    for j in range(k):
        out += [j] * (bounds[j + 1] - bounds[j])
    return out


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# Three well separated proposals inside the 64 x 64 image.
PROPOSALS = [[2.0, 2.0, 12.0, 12.0], [20.0, 20.0, 30.0, 34.0], [40.0, 5.0, 60.0, 15.0]]
LOGITS = {
    2: [[0.0, 2.0], [0.0, -1.0], [0.0, 0.5]],
    3: [[0.0, 2.0, 1.0], [0.0, -1.0, 0.3], [1.0, 0.5, 3.0]],
}


def _regression(num_props: int, num_classes: int) -> list[list[float]]:
    """Distinct, small, sign-alternating deltas: every (proposal, class, coordinate) differs."""
    return [[0.01 * (r * 4 * num_classes + j + 1) * (-1) ** j for j in range(4 * num_classes)]
            for r in range(num_props)]


def _expected_candidates(num_classes: int):
    """[(score, deltas, box, label, proposal)] for every (proposal, foreground class) pair."""
    reg = _regression(len(PROPOSALS), num_classes)
    out = []
    for r, (prop, logits) in enumerate(zip(PROPOSALS, LOGITS[num_classes])):
        probs = softmax_row(logits)
        for c in range(1, num_classes):
            deltas = reg[r][4 * c:4 * c + 4]
            out.append((probs[c], deltas, decode_clip(prop, deltas), c, r))
    return sorted(out, key=lambda t: -t[0])


def _inputs(num_classes: int, requires_grad: bool = False):
    props = torch.tensor(PROPOSALS)
    logits = torch.tensor(LOGITS[num_classes], requires_grad=requires_grad)
    reg = torch.tensor(_regression(len(PROPOSALS), num_classes), requires_grad=requires_grad)
    return props, logits, reg


# ---------------------------------------------------------------------------------------
# candidates, ranking, NMS, filtering
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("nms_thresh", [0.75, 0.25])
@pytest.mark.parametrize("num_classes", [2, 3])
def test_rows_are_softmax_scores_and_raw_class_deltas_in_decreasing_score(num_classes, nms_thresh):
    props, logits, reg = _inputs(num_classes)
    expected = _expected_candidates(num_classes)
    n = len(expected)  # R x (K - 1): every candidate survives, no padding
    batch = build_roi_batch(props, logits, reg, IMAGE, num_rois=n, nms_thresh=nms_thresh)
    assert isinstance(batch, RoIBatch)
    assert batch.rows.shape == (n, 5) and batch.boxes.shape == (n, 4) and batch.labels.shape == (n,)
    # For K = 3 the two classes of one proposal overlap almost completely (IoU > 0.9) and
    # are both kept, even at NMS 0.25: the NMS is class-wise.
    assert batch.num_survivors == n
    torch.testing.assert_close(batch.rows[:, 0], torch.tensor([e[0] for e in expected]), rtol=1e-6, atol=1e-7)
    assert torch.equal(batch.scores, batch.rows[:, 0])
    # Columns 1..4 are the class's raw regression outputs (not absolute coordinates).
    assert batch.rows[:, 1:].tolist() == torch.tensor([e[1] for e in expected]).tolist()
    torch.testing.assert_close(batch.boxes, torch.tensor([e[2] for e in expected]), rtol=1e-5, atol=1e-4)
    assert batch.labels.tolist() == [e[3] for e in expected]
    assert batch.labels.dtype == torch.int64
    # Background is never a candidate; the scores are strictly decreasing.
    assert (batch.labels >= 1).all()
    assert all(a > b for a, b in zip(batch.scores.tolist(), batch.scores.tolist()[1:]))


def test_hand_values_of_the_two_class_example():
    """The first example written out in full, so the references above are themselves checked."""
    props, logits, reg = _inputs(2)
    batch = build_roi_batch(props, logits, reg, IMAGE, num_rois=3)
    s0, s2, s1 = 1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(-0.5)), 1 / (1 + math.exp(1.0))
    torch.testing.assert_close(batch.scores, torch.tensor([s0, s2, s1]))
    # class-1 deltas of proposal r are regression[r, 4:8]
    assert batch.rows[0, 1:].tolist() == pytest.approx([0.05, -0.06, 0.07, -0.08])
    assert batch.rows[1, 1:].tolist() == pytest.approx([0.21, -0.22, 0.23, -0.24])
    assert batch.rows[2, 1:].tolist() == pytest.approx([0.13, -0.14, 0.15, -0.16])
    # proposal 0, deltas (0.05, -0.06, 0.07, -0.08): centre (7 + 0.05, 7 - 0.06), size 10 e^0.014 x 10 e^-0.016
    w, h = 10 * math.exp(0.014), 10 * math.exp(-0.016)
    torch.testing.assert_close(batch.boxes[0], torch.tensor([7.05 - w / 2, 6.94 - h / 2, 7.05 + w / 2, 6.94 + h / 2]))


def _same_class_boxes():
    # IoU(A, B) = 90 / 110 = 0.818; IoU(A, C) = IoU(B, C) = 50 / 150 = 0.333
    props = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [5.0, 0.0, 15.0, 10.0]])
    logits = torch.tensor([[0.0, 3.0], [0.0, 2.0], [0.0, 1.0]])
    return props, logits, torch.zeros(3, 8)  # zero deltas: decoded boxes = proposals


@pytest.mark.parametrize("nms_thresh, kept", [(0.75, [0, 2]), (0.25, [0]), (0.9, [0, 1, 2])])
def test_classwise_nms_suppresses_overlapping_boxes_of_the_same_class(nms_thresh, kept):
    props, logits, reg = _same_class_boxes()
    batch = build_roi_batch(props, logits, reg, IMAGE, num_rois=len(kept), nms_thresh=nms_thresh)
    assert batch.num_survivors == len(kept)
    assert batch.boxes.tolist() == props[kept].tolist()
    torch.testing.assert_close(batch.scores, torch.softmax(logits, 1)[kept, 1])


@pytest.mark.parametrize("nms_thresh", [0.75, 0.25])
def test_identical_boxes_of_different_classes_are_both_kept(nms_thresh):
    props = torch.tensor([[4.0, 4.0, 20.0, 20.0]])
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    batch = build_roi_batch(props, logits, torch.zeros(1, 12), IMAGE, num_rois=2, nms_thresh=nms_thresh)
    assert batch.num_survivors == 2
    assert batch.labels.tolist() == [2, 1]  # class 2 has the higher score
    assert batch.boxes.tolist() == [props[0].tolist()] * 2


def test_boxes_empty_after_clipping_are_dropped():
    props = torch.tensor([
        [70.0, 70.0, 80.0, 90.0],   # entirely outside the 64 x 64 image: clipped to a point
        [5.0, 5.0, 5.0, 20.0],      # zero width
        [-10.0, 10.0, -2.0, 20.0],  # left of the image
        [10.0, 10.0, 20.0, 20.0],   # the only valid box, with the LOWEST score
    ])
    logits = torch.tensor([[0.0, 4.0], [0.0, 3.0], [0.0, 2.0], [0.0, -1.0]])
    for min_area in (0.0, 1e-5):  # CTM keeps area > 0, SSM/AFF/LSTM area > 1e-5
        batch = build_roi_batch(props, logits, torch.zeros(4, 8), IMAGE, num_rois=1, min_area=min_area)
        assert batch.num_survivors == 1
        assert batch.boxes.tolist() == [[10.0, 10.0, 20.0, 20.0]]
        torch.testing.assert_close(batch.scores, torch.softmax(logits[3], 0)[1:])


@pytest.mark.parametrize("min_area, survives", [(5.99, True), (6.0, False), (6.01, False), (0.0, True)])
def test_min_area_is_a_strict_lower_bound(min_area, survives):
    # A 2 x 3 box (area 6, exact in float): dropped when area <= min_area.
    props = torch.tensor([[0.0, 0.0, 2.0, 3.0], [30.0, 30.0, 50.0, 50.0]])
    logits = torch.tensor([[0.0, 2.0], [0.0, 1.0]])
    batch = build_roi_batch(props, logits, torch.zeros(2, 8), IMAGE, num_rois=2, min_area=min_area)
    small_kept = [0.0, 0.0, 2.0, 3.0] in batch.boxes.tolist()
    assert small_kept is survives
    assert batch.num_survivors == (2 if survives else 1)


def test_top_n_truncation_keeps_the_best_scores_in_order():
    props = torch.tensor([[10.0 * i, 0.0, 10.0 * i + 8, 8.0] for i in range(6)])  # disjoint
    logits = torch.tensor([[0.0, v] for v in (0.3, 2.0, -1.0, 1.0, 0.5, -0.2)])
    batch = build_roi_batch(props, logits, torch.zeros(6, 8), IMAGE, num_rois=3)
    assert batch.num_survivors == 3
    assert batch.boxes.tolist() == props[[1, 3, 4]].tolist()
    torch.testing.assert_close(batch.scores, torch.sigmoid(torch.tensor([2.0, 1.0, 0.5])))


def test_padding_repeats_the_survivors_in_rank_order_with_the_seeded_run_lengths():
    props, logits, reg = _inputs(2)
    full = build_roi_batch(props, logits, reg, IMAGE, num_rois=3)
    padded = build_roi_batch(props, logits, reg, IMAGE, num_rois=11, generator=_gen(5))
    assert padded.num_survivors == 3 and padded.rows.shape == (11, 5)
    idx = repeat_pad_indices(3, 11, _gen(5))
    assert torch.equal(padded.rows, full.rows[idx])
    assert torch.equal(padded.boxes, full.boxes[idx])
    assert torch.equal(padded.labels, full.labels[idx])
    assert torch.equal(torch.unique_consecutive(padded.rows, dim=0), full.rows)
    again = build_roi_batch(props, logits, reg, IMAGE, num_rois=11, generator=_gen(5))
    assert torch.equal(again.rows, padded.rows)


def test_bad_shapes_are_rejected():
    props, logits, reg = _inputs(2)
    with pytest.raises(ValueError, match="box_regression"):
        build_roi_batch(props, logits, reg[:, :4], IMAGE, num_rois=4)
    with pytest.raises(ValueError, match="class_logits"):
        build_roi_batch(props, logits[:, 1], reg, IMAGE, num_rois=4)


# ---------------------------------------------------------------------------------------
# repetition padding (spec §4.2 step 7)
# ---------------------------------------------------------------------------------------

PAD_TABLE = [(k, n, seed)
             for k, n in [(1, 2), (1, 3), (1, 128), (2, 3), (2, 4), (3, 10), (5, 7), (6, 7), (7, 8),
                          (2, 128), (17, 128), (64, 128), (100, 128), (126, 128), (127, 128), (8, 16),
                          (15, 16), (4, 256), (255, 256)]
             for seed in (0, 1, 7)]


@pytest.mark.parametrize("k, n, seed", PAD_TABLE)
def test_padding_indices_properties(k, n, seed):
    idx = repeat_pad_indices(k, n, _gen(seed))
    values = idx.tolist()
    assert idx.dtype == torch.int64 and len(values) == n
    assert set(values) == set(range(k))                       # every survivor at least once
    assert all(a <= b for a, b in zip(values, values[1:]))    # rank order kept
    assert all(b - a in (0, 1) for a, b in zip(values, values[1:]))  # runs are contiguous
    assert values[0] == 0 and values[-1] == k - 1
    assert values.count(k - 1) >= 2                           # the last run is >= 2 when k < n
    # exactly the original formula on the same generator state
    assert values == original_padding(k, n, _gen(seed))


@pytest.mark.parametrize("k, n", [(1, 2), (3, 10), (64, 128), (127, 128)])
def test_padding_with_the_global_rng_matches_the_original(k, n):
    torch.manual_seed(123)
    ours = repeat_pad_indices(k, n).tolist()
    torch.manual_seed(123)
    assert ours == original_padding(k, n, None)


@pytest.mark.parametrize("n", [1, 2, 5, 128])
def test_padding_k_equals_n_is_the_identity(n):
    gen = _gen(0)
    state = gen.get_state()
    assert repeat_pad_indices(n, n, gen).tolist() == list(range(n))
    assert torch.equal(gen.get_state(), state)  # nothing drawn


def test_padding_is_reproducible_per_seed_and_differs_between_seeds():
    a = repeat_pad_indices(5, 128, _gen(3))
    assert torch.equal(a, repeat_pad_indices(5, 128, _gen(3)))
    others = [repeat_pad_indices(5, 128, _gen(s)) for s in range(4, 10)]
    assert all(not torch.equal(a, o) for o in others)
    # successive draws from one generator differ too
    gen = _gen(3)
    assert not torch.equal(repeat_pad_indices(5, 128, gen), repeat_pad_indices(5, 128, gen))


@pytest.mark.parametrize("k, n", [(0, 5), (6, 5), (-1, 3)])
def test_padding_rejects_impossible_counts(k, n):
    with pytest.raises(ValueError, match="0 < k <= n"):
        repeat_pad_indices(k, n)


# ---------------------------------------------------------------------------------------
# no survivors, gradients
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_props", [0, 2])
def test_zero_survivors_give_zero_rows_and_keep_the_graph(num_props):
    # Either no proposals at all, or only boxes outside the image.
    props = torch.tensor([[70.0, 70.0, 80.0, 80.0], [0.0, 0.0, 0.0, 10.0]])[:num_props]
    logits = torch.randn(num_props, 3, requires_grad=True)
    reg = torch.randn(num_props, 12, requires_grad=True)
    batch = build_roi_batch(props, logits, reg, IMAGE, num_rois=8)
    assert batch.num_survivors == 0
    assert batch.rows.shape == (8, 5) and not batch.rows.detach().any()
    assert batch.boxes.shape == (8, 4) and not batch.boxes.any()
    assert batch.labels.tolist() == [0] * 8
    assert batch.rows.requires_grad
    (batch.rows.sum() * 2.0).backward()  # a head's loss on an all-zero batch can still backprop
    assert logits.grad is not None and not logits.grad.any()


def test_gradients_flow_to_the_chosen_scores_and_deltas_only():
    props, logits, reg = _inputs(3, requires_grad=True)
    props.requires_grad_(True)
    batch = build_roi_batch(props, logits, reg, IMAGE, num_rois=13, generator=_gen(2))
    assert batch.rows.requires_grad and not batch.boxes.requires_grad
    # Which (proposal, class) each row is: its deltas are unique in the regression tensor.
    reg_list = reg.detach().tolist()
    counts = torch.zeros(3, 3)
    for row, label in zip(batch.rows.detach().tolist(), batch.labels.tolist()):
        (r,) = [r for r in range(3) if reg_list[r][4 * label:4 * label + 4] == row[1:]]
        counts[r, label] += 1
    assert counts.sum() == 13 and counts[:, 0].sum() == 0

    # delta columns -> box_regression: d(sum)/d(reg[r, 4c:4c+4]) = times (r, c) appears
    batch.rows[:, 1:].sum().backward(retain_graph=True)
    assert torch.equal(reg.grad, counts.repeat_interleave(4, dim=1))
    assert not logits.grad.any()
    assert props.grad is None  # the boxes are not differentiable

    # score column -> class_logits: the gradient of sum_{r,c} counts * softmax
    reg.grad, logits.grad = None, None
    batch.rows[:, 0].sum().backward()
    ref_logits = logits.detach().clone().requires_grad_(True)
    (torch.softmax(ref_logits, 1) * counts).sum().backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad)
    assert not reg.grad.any()
