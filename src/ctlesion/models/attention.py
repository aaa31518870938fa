"""Attention, LSTM-1 and LSTM-2 heads of paper 004 (spec §7.2-§7.4).

All three read the mask features ``R [beta, C, 28, 28]`` of ONE image, rows in distance
order (:func:`~ctlesion.models.roi_batch.distance_order`), and run refinement (N = 1)
and vectorisation to ``X [beta, C]`` (spec §7.1). Then:

* **Attention** (Eqs. 1-8): ``x* = flatten(X)``; ``z = Linear_{beta C -> C}(x*)``;
  ``a = X z``; ``a* = softmax(a)``; ``c = X^T a*``; ``c* = Linear_{C -> C}(c)``;
  ``o = c* + z``; classifier(o).
* **LSTM-1** (Eqs. 9-17): ``H, h_beta = LSTM(X)`` (1 layer, zero initial state, over the
  beta RoIs in the given order); ``v = Linear(h_beta)``; ``b* = softmax(H v)``;
  ``d = H^T b*``; ``d* = Linear(d)``; ``p = d* + v``; classifier(p).
* **LSTM-2** (original code, spec §7.4): two LSTM-1 branches, ``pos`` and ``neg``, with
  separate weights, both reading the same X; logits =
  ``classifier_pos(p_pos) - classifier_neg(p_neg)``. ``eq16_linear=False`` drops the
  Eq. 16 Linear (``p = d + v``), as in the code (spec §10 #19).

Init (spec §7.4): conv weights Kaiming-normal (fan_out); every bias of the attention
layer (conv, BN, LSTM, Linear) 0.01; LSTM and Linear weights and the image classifiers
keep the PyTorch defaults.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .mask_features import ImageClassifier, MaskFeatureHead, Refinement, Vectorisation, init_layer

__all__ = ["AttentionLayer", "LSTMAttention", "LSTMLayer", "AttentionHead", "LSTM1Head", "LSTM2Head"]


# --------------------------------------------------------------------------------------
# Attention model (paper 004 Eqs. 1-8)
# --------------------------------------------------------------------------------------


class AttentionLayer(nn.Module):
    """Refinement + vectorisation + ``fc_z`` (Eq. 2) and ``fc_c`` (Eq. 7)."""

    def __init__(self, channels: int, rois: int, blocks: int, shared_refinement: bool = False) -> None:
        super().__init__()
        self.refinement = Refinement(channels, blocks=blocks, shared=shared_refinement)
        self.vectorisation = Vectorisation(channels)
        self.fc_z = nn.Linear(rois * channels, channels)
        self.fc_c = nn.Linear(channels, channels)
        init_layer(self.fc_z)
        init_layer(self.fc_c)

    def forward(self, X: Tensor) -> tuple[Tensor, Tensor]:
        """``X [beta, C] -> (o [C], a* [beta])``."""
        x_star = X.reshape(-1)                    # Eq. 1: [x_1, ..., x_beta], row-major
        z = self.fc_z(x_star)                     # Eq. 2
        a = X @ z                                 # Eq. 3, [beta]
        a_star = torch.softmax(a, dim=0)          # Eqs. 4-5
        c = X.t() @ a_star                        # Eq. 6, [C]
        c_star = self.fc_c(c)                     # Eq. 7
        return c_star + z, a_star                 # Eq. 8


class AttentionHead(MaskFeatureHead):
    """Attention layer + image classifier (paper 004 Eqs. 1-8; spec §7.2).

    ``forward(R [beta, C, 28, 28]) -> (logits [num_classes], a* [beta])``;
    ``from_vectors(X [beta, C])`` runs Eqs. 1-8 and the classifier. beta must equal
    ``rois`` (the Eq. 2 Linear reads beta*C inputs). Parameters: ``layer.refinement``,
    ``layer.vectorisation``, ``layer.fc_z``, ``layer.fc_c``, ``classifier``.
    """

    def __init__(self, channels: int = 256, rois: int = 16, num_classes: int = 3, blocks: int = 1,
                 shared_refinement: bool = False) -> None:
        super().__init__()
        self.channels = int(channels)
        self.rois = int(rois)
        self.num_classes = int(num_classes)
        self.layer = AttentionLayer(self.channels, self.rois, blocks, shared_refinement)
        self.classifier = ImageClassifier(self.channels, self.num_classes)

    def from_vectors(self, X: Tensor) -> tuple[Tensor, Tensor]:
        self._check_vectors(X, self.rois)
        o, a_star = self.layer(X)
        return self.classifier(o), a_star


# --------------------------------------------------------------------------------------
# LSTM with attention (paper 004 Eqs. 9-17)
# --------------------------------------------------------------------------------------


class LSTMAttention(nn.Module):
    """One LSTM + attention branch, Eqs. 9-17.

    ``lstm``: LSTM(C -> hidden, 1 layer, batch_first, zero initial state); ``fc_v``:
    Linear(hidden -> hidden) (Eq. 11); ``fc_d``: Linear(hidden -> hidden) (Eq. 16), or
    ``None`` when ``eq16_linear=False`` (then ``d* = d``, the original code).
    """

    def __init__(self, channels: int, hidden: int, eq16_linear: bool = True) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size=channels, hidden_size=hidden, num_layers=1, batch_first=True)
        self.fc_v = nn.Linear(hidden, hidden)
        self.fc_d: nn.Linear | None = nn.Linear(hidden, hidden) if eq16_linear else None
        init_layer(self)   # biases 0.01; LSTM / Linear weights keep the defaults

    def forward(self, X: Tensor) -> tuple[Tensor, Tensor]:
        """``X [beta, C] -> (p [hidden], b* [beta])``."""
        H, (h_n, _) = self.lstm(X.unsqueeze(0))   # Eq. 9; zero initial state
        H = H[0]                                  # Eq. 10, [beta, hidden]
        h_beta = h_n[-1, 0]                       # last hidden state, [hidden] (= H[-1])
        v = self.fc_v(h_beta)                     # Eq. 11
        b = H @ v                                 # Eq. 12, [beta]
        # Eqs. 13-14. Softmax down a [beta, 1] column, as the original code: the same float32
        # reduction order, so the weights (and logits) match the author's bit for bit.
        b_star = torch.softmax(b[:, None], dim=0)[:, 0]
        d = H.t() @ b_star                        # Eq. 15, [hidden]
        d_star = self.fc_d(d) if self.fc_d is not None else d   # Eq. 16 (paper) / absent (code)
        return d_star + v, b_star                 # Eq. 17


class LSTMLayer(nn.Module):
    """Refinement + vectorisation + LSTM/attention branch(es): ``branch`` (LSTM-1) or
    ``pos`` and ``neg`` (LSTM-2)."""

    def __init__(self, channels: int, hidden: int, blocks: int, eq16_linear: bool, branches: tuple[str, ...],
                 shared_refinement: bool = False) -> None:
        super().__init__()
        self.refinement = Refinement(channels, blocks=blocks, shared=shared_refinement)
        self.vectorisation = Vectorisation(channels)
        self.branch_names = tuple(branches)
        for name in self.branch_names:
            self.add_module(name, LSTMAttention(channels, hidden, eq16_linear))


class LSTM1Head(MaskFeatureHead):
    """LSTM-1: one LSTM + attention branch + image classifier (Eqs. 9-17; spec §7.3).

    ``forward(R [beta, C, 28, 28]) -> (logits [num_classes], b* [beta])``;
    ``from_vectors(X [beta, C])`` runs Eqs. 9-17 and the classifier. The LSTM reads the
    rows in the given order, so the caller passes them in distance order. ``rois`` is the
    nominal beta (16); the LSTM itself accepts any beta >= 1, so it is not enforced.
    ``eq16_linear`` (default True, the paper) keeps the Eq. 16 Linear.
    Parameters: ``layer.refinement``, ``layer.vectorisation``, ``layer.branch.{lstm,
    fc_v, fc_d}``, ``classifier``.
    """

    branches = ("branch",)

    def __init__(self, channels: int = 256, rois: int = 16, hidden: int = 256, num_classes: int = 3,
                 blocks: int = 1, eq16_linear: bool = True, shared_refinement: bool = False) -> None:
        super().__init__()
        self.channels = int(channels)
        self.rois = int(rois)
        self.hidden = int(hidden)
        self.num_classes = int(num_classes)
        self.eq16_linear = bool(eq16_linear)
        self.layer = LSTMLayer(self.channels, self.hidden, blocks, self.eq16_linear, self.branches, shared_refinement)
        self.add_classifiers()

    def add_classifiers(self) -> None:
        self.classifier = ImageClassifier(self.hidden, self.num_classes)

    def from_vectors(self, X: Tensor) -> tuple[Tensor, Tensor]:
        self._check_vectors(X, None)
        p, b_star = self.layer.branch(X)
        return self.classifier(p), b_star


class LSTM2Head(LSTM1Head):
    """LSTM-2: ``pos`` and ``neg`` LSTM + attention branches, two classifiers, logits
    subtracted (spec §7.4, §10 #18-19).

    Both branches read the same X (all beta RoIs, same order); nothing partitions the
    RoIs, "pos"/"neg" only name the intended roles. ``eq16_linear=True`` (default,
    paper) applies Eq. 16's Linear to d in each branch; ``False`` is the original code
    (``p = d + v``, one Linear per branch fewer).

    ``forward(R) -> (logits, b*_pos)``, ``logits = classifier_pos(p_pos) -
    classifier_neg(p_neg)`` ``[num_classes]``. The weights returned are those of the pos
    (class-relevant) branch; after each call ``last_weights`` holds both,
    ``{"pos": b*_pos, "neg": b*_neg}`` (detached). Parameters: ``layer.refinement``,
    ``layer.vectorisation``, ``layer.pos``, ``layer.neg``, ``classifier_pos``,
    ``classifier_neg``.
    """

    branches = ("pos", "neg")

    def add_classifiers(self) -> None:
        self.classifier_pos = ImageClassifier(self.hidden, self.num_classes)
        self.classifier_neg = ImageClassifier(self.hidden, self.num_classes)
        self.last_weights: dict[str, Tensor] | None = None

    def from_vectors(self, X: Tensor) -> tuple[Tensor, Tensor]:
        self._check_vectors(X, None)
        p_pos, b_pos = self.layer.pos(X)
        p_neg, b_neg = self.layer.neg(X)
        logits = self.classifier_pos(p_pos) - self.classifier_neg(p_neg)
        self.last_weights = {"pos": b_pos.detach(), "neg": b_neg.detach()}
        return logits, b_pos
