"""Mask-feature classifier heads (spec §6-§7): every equation against independent hand /
numpy computations on tiny tensors, plus shapes, flags, init and input validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

from ctlesion.models.affinity import AffinityHead
from ctlesion.models.attention import AttentionHead, LSTM1Head, LSTM2Head
from ctlesion.models.mask_features import (
    ImageClassifier,
    MaskFeatureBranch,
    Refinement,
    RefinementBlock,
    Vectorisation,
)
from ctlesion.models.roi_batch import distance_order


# ---------------------------------------------------------------------------------------
# independent numpy references
# ---------------------------------------------------------------------------------------


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def np_classifier(cls: ImageClassifier, x: np.ndarray) -> np.ndarray:
    relu = lambda a: np.maximum(a, 0.0)  # noqa: E731
    h = relu(_np(cls.fc_l1.weight) @ x + _np(cls.fc_l1.bias))
    h = relu(_np(cls.fc_l2.weight) @ h + _np(cls.fc_l2.bias))
    return _np(cls.class_predict_logits.weight) @ h + _np(cls.class_predict_logits.bias)


def np_softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max())
    return e / e.sum()


def np_lstm(lstm: nn.LSTM, X: np.ndarray) -> np.ndarray:
    """Manually stepped single-layer LSTM, zero initial state; returns H [beta, hidden]."""
    sig = lambda a: 1.0 / (1.0 + np.exp(-a))  # noqa: E731
    w_ih, w_hh = _np(lstm.weight_ih_l0), _np(lstm.weight_hh_l0)
    b = _np(lstm.bias_ih_l0) + _np(lstm.bias_hh_l0)
    hid = lstm.hidden_size
    h, c, rows = np.zeros(hid), np.zeros(hid), []
    for x in X:                                   # over the RoIs, in the given order
        g = w_ih @ x + w_hh @ h + b
        i, f, gg, o = sig(g[:hid]), sig(g[hid:2 * hid]), np.tanh(g[2 * hid:3 * hid]), sig(g[3 * hid:])
        c = f * c + i * gg
        h = o * np.tanh(c)
        rows.append(h)
    return np.stack(rows)


def np_lstm_branch(branch, X: np.ndarray):
    """Eqs. 9-17 in numpy: returns (p, b*)."""
    H = np_lstm(branch.lstm, X)
    v = _np(branch.fc_v.weight) @ H[-1] + _np(branch.fc_v.bias)              # Eq. 11
    b = np.array([H[k] @ v for k in range(len(H))])                           # Eq. 12
    b_star = np_softmax(b)                                                     # Eqs. 13-14
    d = sum(b_star[k] * H[k] for k in range(len(H)))                           # Eq. 15
    d_star = d if branch.fc_d is None else _np(branch.fc_d.weight) @ d + _np(branch.fc_d.bias)  # Eq. 16
    return d_star + v, b_star                                                  # Eq. 17


def _randomise(module: nn.Module, seed: int = 1) -> None:
    """Give every parameter distinct known values (so no bias is a constant 0.01)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


def _count(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# ---------------------------------------------------------------------------------------
# Affinity (paper 000 Eqs. 1-7)
# ---------------------------------------------------------------------------------------


def test_affinity_hand_computed_example():
    head = AffinityHead(channels=4, rois=3, affinity_dim=2, num_classes=3).double()
    X = torch.tensor([[1, 0, 2, 1], [0, 1, 1, 0], [2, 1, 0, 1]], dtype=torch.float64)
    with torch.no_grad():
        head.layer.affinity_matrix.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))  # W [beta, C*]
        head.layer.affinity_vector.copy_(torch.tensor([1.0, 2.0]))                            # v [C*]
    z, Y = head.layer(X)
    # Y = W^T X: row 1 = x1 + x3, row 2 = x2 + x3
    assert Y.tolist() == [[3, 1, 2, 2], [2, 2, 1, 1]]
    # z = Y^T v = 1 * y_1 + 2 * y_2
    assert z.tolist() == [7, 5, 4, 4]
    logits, roi_weights = head.from_vectors(X)
    assert roi_weights.tolist() == [1, 2, 3]                     # W v
    np.testing.assert_allclose(_np(logits), np_classifier(head.classifier, np.array([7.0, 5, 4, 4])), rtol=1e-12)


def test_affinity_matches_explicit_sums():
    beta, C, Cs = 3, 4, 2
    head = AffinityHead(channels=C, rois=beta, affinity_dim=Cs, num_classes=3).double()
    X = torch.randn(beta, C, dtype=torch.float64)
    Wn, vn, Xn = _np(head.layer.affinity_matrix), _np(head.layer.affinity_vector), _np(X)
    y = np.zeros((Cs, C))
    for r in range(Cs):
        for j in range(C):
            y[r, j] = sum(Wn[k, r] * Xn[k, j] for k in range(beta))          # Eq. 4
    z = np.array([sum(y[r, j] * vn[r] for r in range(Cs)) for j in range(C)])  # Eq. 7
    z_t, Y_t = head.layer(X)
    np.testing.assert_allclose(_np(Y_t), y, rtol=1e-12)
    np.testing.assert_allclose(_np(z_t), z, rtol=1e-12)
    logits, w = head.from_vectors(X)
    assert logits.shape == (3,) and w.shape == (beta,)
    np.testing.assert_allclose(_np(logits), np_classifier(head.classifier, z), rtol=1e-10)
    # z = X^T (W v): the per-RoI weights really are the RoI weighting
    np.testing.assert_allclose(Xn.T @ _np(w), z, rtol=1e-10)


def test_affinity_init_and_parameters():
    head = AffinityHead(channels=256, rois=8, affinity_dim=16)
    W, v = head.layer.affinity_matrix, head.layer.affinity_vector
    assert isinstance(W, nn.Parameter) and W.shape == (8, 16) and v.shape == (16,)
    assert 0.6 < W.std().item() < 1.4 and abs(W.mean().item()) < 0.4       # standard normal
    names = {n for n, _ in head.named_parameters()}
    assert {"layer.affinity_matrix", "layer.affinity_vector"} <= names
    assert all(n.startswith(("layer.", "classifier.")) for n in names)


# ---------------------------------------------------------------------------------------
# Attention (paper 004 Eqs. 1-8)
# ---------------------------------------------------------------------------------------


def test_attention_equations_against_numpy():
    beta, C = 3, 4
    head = AttentionHead(channels=C, rois=beta, num_classes=3).double()
    _randomise(head)
    X = torch.randn(beta, C, dtype=torch.float64)
    Xn = _np(X)
    x_star = np.concatenate([Xn[k] for k in range(beta)])                       # Eq. 1
    z = _np(head.layer.fc_z.weight) @ x_star + _np(head.layer.fc_z.bias)        # Eq. 2
    a = np.array([Xn[k] @ z for k in range(beta)])                              # Eq. 3
    a_star = np.exp(a) / np.exp(a).sum()                                        # Eqs. 4-5
    c = sum(a_star[k] * Xn[k] for k in range(beta))                             # Eq. 6
    c_star = _np(head.layer.fc_c.weight) @ c + _np(head.layer.fc_c.bias)        # Eq. 7
    o = c_star + z                                                              # Eq. 8
    logits, weights = head.from_vectors(X)
    np.testing.assert_allclose(_np(weights), a_star, rtol=1e-10)
    assert abs(weights.sum().item() - 1) < 1e-12
    np.testing.assert_allclose(_np(logits), np_classifier(head.classifier, o), rtol=1e-10)
    o_t, _ = head.layer(X)
    np.testing.assert_allclose(_np(o_t), o, rtol=1e-10)


def test_attention_flatten_is_row_major():
    # z_0 reads only x_2[1] (the 2nd RoI's 2nd channel): flatten(X) = [x_1, x_2, ...]
    head = AttentionHead(channels=2, rois=2, num_classes=3).double()
    with torch.no_grad():
        head.layer.fc_z.weight.zero_()
        head.layer.fc_z.bias.zero_()
        head.layer.fc_z.weight[0, 3] = 1.0
    X = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    _, a_star = head.from_vectors(X)
    # z = [4, 0]; a = X z = [4, 12]
    np.testing.assert_allclose(_np(a_star), np_softmax(np.array([4.0, 12.0])), rtol=1e-12)


# ---------------------------------------------------------------------------------------
# LSTM-1 (paper 004 Eqs. 9-17)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("eq16", [True, False])
def test_lstm1_equations_against_manual_lstm(eq16):
    beta, C, hidden = 3, 4, 5
    head = LSTM1Head(channels=C, rois=beta, hidden=hidden, num_classes=3, eq16_linear=eq16).double()
    _randomise(head)
    X = torch.randn(beta, C, dtype=torch.float64)
    p, b_star = np_lstm_branch(head.layer.branch, _np(X))
    logits, weights = head.from_vectors(X)
    np.testing.assert_allclose(_np(weights), b_star, rtol=1e-10)
    np.testing.assert_allclose(_np(logits), np_classifier(head.classifier, p), rtol=1e-9)
    assert (head.layer.branch.fc_d is not None) == eq16


def test_lstm1_matches_lstmcell_and_depends_on_order():
    beta, C, hidden = 4, 4, 3
    head = LSTM1Head(channels=C, rois=beta, hidden=hidden).double()
    lstm = head.layer.branch.lstm
    cell = nn.LSTMCell(C, hidden).double()
    with torch.no_grad():
        for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, n).copy_(getattr(lstm, f"{n}_l0"))
    X = torch.randn(beta, C, dtype=torch.float64)
    h = c = torch.zeros(1, hidden, dtype=torch.float64)
    rows = []
    for k in range(beta):
        h, c = cell(X[k : k + 1], (h, c))
        rows.append(h[0])
    H_ref = torch.stack(rows)
    H, _ = lstm(X.unsqueeze(0))
    torch.testing.assert_close(H[0], H_ref)
    # the sequence order matters (the caller passes the distance order)
    l1, _ = head.from_vectors(X)
    l2, _ = head.from_vectors(X.flip(0))
    assert not torch.allclose(l1, l2)


# ---------------------------------------------------------------------------------------
# LSTM-2 (spec §7.4)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("eq16", [True, False])
def test_lstm2_subtracts_two_branches(eq16):
    beta, C, hidden = 3, 4, 4
    head = LSTM2Head(channels=C, rois=beta, hidden=hidden, num_classes=3, eq16_linear=eq16).double()
    _randomise(head)
    X = torch.randn(beta, C, dtype=torch.float64)
    p_pos, b_pos = np_lstm_branch(head.layer.pos, _np(X))
    p_neg, b_neg = np_lstm_branch(head.layer.neg, _np(X))
    expected = np_classifier(head.classifier_pos, p_pos) - np_classifier(head.classifier_neg, p_neg)
    logits, weights = head.from_vectors(X)
    np.testing.assert_allclose(_np(logits), expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(_np(weights), b_pos, rtol=1e-10)
    np.testing.assert_allclose(_np(head.last_weights["pos"]), b_pos, rtol=1e-10)
    np.testing.assert_allclose(_np(head.last_weights["neg"]), b_neg, rtol=1e-10)


def test_lstm2_eq16_flag():
    C, hidden = 4, 4
    paper = LSTM2Head(channels=C, rois=3, hidden=hidden, eq16_linear=True).double()
    code = LSTM2Head(channels=C, rois=3, hidden=hidden, eq16_linear=False).double()
    # one Linear(hidden -> hidden) per branch more
    assert _count(paper) - _count(code) == 2 * (hidden * hidden + hidden)
    assert not any("fc_d" in n for n, _ in code.named_parameters())
    _randomise(paper)
    missing, unexpected = code.load_state_dict(paper.state_dict(), strict=False)
    assert not missing and sorted(unexpected) == ["layer.neg.fc_d.bias", "layer.neg.fc_d.weight",
                                                   "layer.pos.fc_d.bias", "layer.pos.fc_d.weight"]
    X = torch.randn(3, C, dtype=torch.float64)
    assert not torch.allclose(paper.from_vectors(X)[0], code.from_vectors(X)[0])
    # with Eq. 16's Linear set to the identity, the two variants agree
    with torch.no_grad():
        for br in (paper.layer.pos, paper.layer.neg):
            br.fc_d.weight.copy_(torch.eye(hidden))
            br.fc_d.bias.zero_()
    torch.testing.assert_close(paper.from_vectors(X)[0], code.from_vectors(X)[0])


def test_lstm_branches_have_separate_weights():
    head = LSTM2Head(channels=4, rois=3, hidden=4)
    assert head.layer.pos.lstm.weight_ih_l0.data_ptr() != head.layer.neg.lstm.weight_ih_l0.data_ptr()
    assert not torch.equal(head.layer.pos.lstm.weight_ih_l0, head.layer.neg.lstm.weight_ih_l0)
    assert head.classifier_pos is not head.classifier_neg


# ---------------------------------------------------------------------------------------
# init (spec §6.2, §7.4)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: AffinityHead(channels=8, rois=3, affinity_dim=2),
    lambda: AttentionHead(channels=8, rois=3),
    lambda: LSTM1Head(channels=8, rois=3, hidden=6),
    lambda: LSTM2Head(channels=8, rois=3, hidden=6),
])
def test_layer_biases_are_001_and_classifier_is_default(make):
    head = make()
    for name, p in head.named_parameters():
        is_bias = name.rsplit(".", 1)[-1].startswith("bias")
        if name.startswith("layer.") and is_bias:
            assert torch.all(p == 0.01), name
        if name.startswith("classifier") and is_bias:
            assert not torch.all(p == 0.01), name        # PyTorch default init
        if name.startswith("layer.") and (".bn" in name) and name.endswith("weight"):
            assert torch.all(p == 1.0), name
    # LSTM / Linear weights keep the defaults: uniform within +-1/sqrt(fan)
    for mod in head.layer.modules():
        if isinstance(mod, nn.LSTM):
            bound = 1 / mod.hidden_size ** 0.5
            assert mod.weight_ih_l0.abs().max() <= bound
        if isinstance(mod, nn.Linear):
            assert mod.weight.abs().max() <= 1 / mod.in_features ** 0.5


def test_conv_weights_kaiming_fan_out():
    torch.manual_seed(0)
    vec = Vectorisation(64)
    w = vec.conv_d_final.weight                      # fan_out = 64 * 7 * 7
    expected = (2.0 / (64 * 49)) ** 0.5
    assert abs(w.std().item() / expected - 1) < 0.05


# ---------------------------------------------------------------------------------------
# refinement
# ---------------------------------------------------------------------------------------


def test_refinement_block_shapes_and_layers():
    block = RefinementBlock(8)
    assert block.conv_down.weight.shape == (4, 8, 2, 2)
    assert block.bn.num_features == 4
    assert block.conv_up.weight.shape == (4, 8, 2, 2)        # ConvTranspose2d(4 -> 8)
    x = torch.randn(3, 8, 28, 28)
    assert block(x).shape == (3, 8, 28, 28)
    with pytest.raises(ValueError):
        RefinementBlock(7)


def test_shared_refinement_applies_one_block_n_squared_times():
    C = 4
    shared = Refinement(C, blocks=3, shared=True)
    paper = Refinement(C, blocks=3, shared=False)
    one = _count(RefinementBlock(C))
    assert len(shared.blocks) == 1 and _count(shared) == one and shared.applications == 9
    assert len(paper.blocks) == 3 and _count(paper) == 3 * one and paper.applications == 3
    x = torch.randn(3, C, 28, 28)
    with torch.no_grad():
        ref = x
        for _ in range(9):
            ref = shared.blocks[0](ref)
        torch.testing.assert_close(shared(x), ref)
        ref = x
        for b in paper.blocks:
            ref = b(ref)
        torch.testing.assert_close(paper(x), ref)
    # the head-level flag
    a = AffinityHead(channels=C, rois=3, affinity_dim=2, blocks=3, shared_refinement=False)
    b = AffinityHead(channels=C, rois=3, affinity_dim=2, blocks=3, shared_refinement=True)
    assert _count(a) - _count(b) == 2 * one
    # N = 1: both behave the same
    assert Refinement(C, 1, shared=True).applications == Refinement(C, 1).applications == 1


# ---------------------------------------------------------------------------------------
# full-size shapes, both BN modes, gradients
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("make, beta", [
    (lambda: AffinityHead(rois=8, affinity_dim=16), 8),
    (lambda: AttentionHead(rois=16), 16),
    (lambda: LSTM1Head(rois=16), 16),
    (lambda: LSTM2Head(rois=16, eq16_linear=True), 16),
    (lambda: LSTM2Head(rois=16, eq16_linear=False), 16),
])
def test_full_size_shapes(make, beta):
    head = make()
    R = torch.randn(beta, 256, 28, 28)
    with torch.no_grad():
        X = head.features(R)
        assert X.shape == (beta, 256)
        for train in (True, False):          # BN batch statistics over the RoIs, or running stats
            head.train(train)
            logits, weights = head(R)
            assert logits.shape == (3,) and weights.shape == (beta,)
            assert torch.isfinite(logits).all()


@pytest.mark.parametrize("make", [
    lambda: AffinityHead(channels=4, rois=3, affinity_dim=2, blocks=2),
    lambda: AttentionHead(channels=4, rois=3),
    lambda: LSTM1Head(channels=4, rois=3, hidden=5),
    lambda: LSTM2Head(channels=4, rois=3, hidden=5),
])
def test_gradients_reach_every_head_parameter(make):
    head = make().train()
    logits, _ = head(torch.randn(3, 4, 28, 28))
    logits.sum().backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_features_equal_refinement_then_vectorisation():
    head = AffinityHead(channels=4, rois=3, affinity_dim=2).eval()
    R = torch.randn(3, 4, 28, 28)
    with torch.no_grad():
        X = head.layer.vectorisation(head.layer.refinement(R))
        torch.testing.assert_close(head.features(R), X)
        torch.testing.assert_close(head(R)[0], head.from_vectors(X)[0])


# ---------------------------------------------------------------------------------------
# input validation
# ---------------------------------------------------------------------------------------


def test_wrong_input_sizes_raise():
    with pytest.raises(ValueError, match="28"):
        Vectorisation(4)(torch.randn(3, 4, 14, 14))
    head = AffinityHead(channels=4, rois=3, affinity_dim=2)
    with pytest.raises(ValueError, match="28"):
        head(torch.randn(3, 4, 14, 14))
    with pytest.raises(ValueError):
        head(torch.randn(3, 5, 28, 28))              # wrong channel count
    with pytest.raises(ValueError):
        head(torch.randn(4, 28, 28))                 # no RoI dimension
    with pytest.raises(ValueError, match="beta=3"):
        head.from_vectors(torch.randn(4, 4))          # W has one row per RoI rank
    with pytest.raises(ValueError, match="beta=3"):
        AttentionHead(channels=4, rois=3).from_vectors(torch.randn(2, 4))
    with pytest.raises(ValueError):
        LSTM1Head(channels=4, rois=3, hidden=4).from_vectors(torch.randn(3, 5))
    with pytest.raises(ValueError):
        MaskFeatureBranch(4, 6)(torch.randn(2, 3, 14, 14))


# ---------------------------------------------------------------------------------------
# classification branch, mask part (spec §6.1)
# ---------------------------------------------------------------------------------------


def test_mask_feature_branch_copy_matches_segmentation_path():
    C, width = 4, 6
    seg_head = MaskRCNNHeads(C, [width], 1)
    seg_pred = MaskRCNNPredictor(width, width, 2)
    _randomise(seg_head, 2)
    _randomise(seg_pred, 3)
    branch = MaskFeatureBranch(C, width)
    x = torch.randn(2, C, 14, 14)
    with torch.no_grad():
        ref = torch.relu(seg_pred.conv5_mask(seg_head(x)))
        assert not torch.allclose(branch(x), ref)
        branch.copy_from(seg_head, seg_pred)
        out = branch(x)
    assert out.shape == (2, width, 28, 28)
    torch.testing.assert_close(out, ref)
    # a copy, not shared storage
    assert branch.mask_fcn1.weight.data_ptr() != seg_head[0][0].weight.data_ptr()
    # same parameter shapes as the torchvision layers they mirror
    assert branch.mask_fcn1.weight.shape == seg_head[0][0].weight.shape
    assert branch.conv5_mask.weight.shape == seg_pred.conv5_mask.weight.shape


def test_extra_conv_is_frozen_and_absent_by_default():
    C, width = 4, 6
    default = MaskFeatureBranch(C, width)
    assert default.conv_reduce is None and not default.extra_conv
    assert not any("conv_reduce" in n for n, _ in default.named_parameters())

    code = MaskFeatureBranch(C, width, extra_conv=True)
    assert code.extra_conv and code.conv_reduce.weight.shape == (width, width, 3, 3)
    assert not code.conv_reduce.weight.requires_grad and not code.conv_reduce.bias.requires_grad
    assert _count(code, trainable_only=True) == _count(default)
    before = code.conv_reduce.weight.clone()
    seg_head, seg_pred = MaskRCNNHeads(C, [width], 1), MaskRCNNPredictor(width, width, 2)
    code.copy_from(seg_head, seg_pred)
    assert torch.equal(code.conv_reduce.weight, before)          # never copied
    x = torch.randn(2, C, 14, 14)
    with torch.no_grad():
        ref = torch.relu(code.conv_reduce(seg_pred.conv5_mask(seg_head(x))))
    out = code(x)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert code.conv_reduce.weight.grad is None                  # never trained
    assert code.mask_fcn1.weight.grad is not None


def test_copy_from_rejects_mismatched_heads():
    branch = MaskFeatureBranch(4, 6)
    with pytest.raises(ValueError):
        branch.copy_from(MaskRCNNHeads(4, [8], 1), MaskRCNNPredictor(8, 8, 2))     # wrong width
    with pytest.raises(ValueError):
        branch.copy_from(MaskRCNNHeads(4, [6, 6], 1), MaskRCNNPredictor(6, 6, 2))  # two convs
    with pytest.raises(ValueError):
        branch.copy_from(MaskRCNNHeads(4, [6], 1), nn.Sequential(nn.Conv2d(6, 6, 1)))


# ---------------------------------------------------------------------------------------
# RoI order (spec §7.1, §10 #20)
# ---------------------------------------------------------------------------------------


def test_distance_order_top_left_corner_ascending_stable():
    # top-left corners and their distances from (0, 0):
    #   0: (3, 4) -> 5     1: (0, 0) -> 0     2: (5, 0) -> 5
    #   3: (1, 1) -> 1.41  4: (4, 3) -> 5     5: (0, 5) -> 5    6: (2, 2) -> 2.83
    # the bottom-right corners are chosen to disagree with that order
    boxes = torch.tensor([
        [3, 4, 10, 10],
        [0, 0, 500, 500],
        [5, 0, 6, 1],
        [1, 1, 400, 400],
        [4, 3, 5, 4],
        [0, 5, 1, 6],
        [2, 2, 300, 300],
    ], dtype=torch.float32)
    order = distance_order(boxes)
    assert order.dtype == torch.long
    assert order.tolist() == [1, 3, 6, 0, 2, 4, 5]      # ties (distance 5) keep input order
    assert distance_order(boxes.flip(0)).tolist() == [5, 3, 0, 1, 2, 4, 6]
    assert distance_order(torch.zeros(0, 4)).tolist() == []
    with pytest.raises(ValueError):
        distance_order(torch.zeros(3, 2))


def test_image_classifier_layers():
    cls = ImageClassifier(256, 3)
    assert [(m.in_features, m.out_features) for m in cls.modules() if isinstance(m, nn.Linear)] == [
        (256, 128), (128, 128), (128, 3)]
    assert _count(cls) == 49_795
